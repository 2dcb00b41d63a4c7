"""uploading: the stored image to an image host when `SHOP_UPLOAD_URL` is set (its URL becomes
the product's image), else the artifact's own URI is kept."""

from __future__ import annotations

from typing import Any, Dict

import services
from atelier_stage import PermanentError, Stage, run


def upload(stage: Stage) -> Dict[str, Any]:
    uri = stage.state.get("artifact_uri")
    if not isinstance(uri, str):
        raise PermanentError("no image to upload (creating_images stored none)")
    service = services.Service("upload")
    if not service.configured:
        stage.progress(100, "no image host set: keeping the artifact")
        return {"image_url": uri}
    stage.progress(10, "uploading")
    answer = service.post(stage.read_artifact(uri), "image/png")
    hosted = answer.get("url")
    if not isinstance(hosted, str) or not hosted:
        raise PermanentError("image host answered no 'url'")
    stage.artifact(hosted, kind="hosted_image")
    stage.progress(100, "uploaded")
    return {"image_url": hosted}


if __name__ == "__main__":
    run(upload, timeout_s=services.stage_timeout_s())
