"""creating_images: a 256x256 PNG for the first idea, from an image-generation service when
`SHOP_IMAGE_URL` is set, else drawn here; stored as the stage's artifact either way."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Dict

import shop_png as png
import services
from atelier_stage import PermanentError, Stage, run

SIDE_PX = 256


def first_idea(stage: Stage) -> Dict[str, str]:
    ideas = stage.state.get("ideas")
    if not isinstance(ideas, list) or not ideas or not isinstance(ideas[0], dict):
        raise PermanentError("no idea to draw (generating_ideas made none)")
    return ideas[0]


def draw(seed: bytes, stage: Stage) -> bytes:
    """A gradient between two colours of the seed, with a disc: the same seed, the same image."""
    top, bottom, disc = seed[0:3], seed[3:6], seed[6:9]
    cx, cy = SIDE_PX // 4 + seed[9] % (SIDE_PX // 2), SIDE_PX // 4 + seed[10] % (SIDE_PX // 2)
    r2 = (SIDE_PX // 8 + seed[11] % (SIDE_PX // 6)) ** 2
    rows = []
    for y in range(SIDE_PX):
        t = y * 255 // (SIDE_PX - 1)
        base = bytes((a * (255 - t) + b * t) // 255 for a, b in zip(top, bottom))
        row = bytearray(base * SIDE_PX)
        for x in range(SIDE_PX):
            if (x - cx) ** 2 + (y - cy) ** 2 <= r2:
                row[3 * x : 3 * x + 3] = disc
        rows.append(bytes(row))
        if y % 64 == 63:
            stage.progress((y + 1) * 90 // SIDE_PX, f"drew {y + 1} of {SIDE_PX} rows")
    return png.encode_rgb(SIDE_PX, SIDE_PX, b"".join(rows))


def generated(service: services.Service, idea: Dict[str, str]) -> bytes:
    answer = service.post_json(
        {"prompt": idea.get("pitch") or idea["title"], "size": f"{SIDE_PX}x{SIDE_PX}", "response_format": "b64_json"}
    )
    try:
        encoded = answer["data"][0]["b64_json"]
        image = base64.b64decode(encoded, validate=True)
    except (KeyError, IndexError, TypeError, binascii.Error):
        raise PermanentError("image service answered no data[0].b64_json image") from None
    if not image.startswith(png.SIGNATURE):
        raise PermanentError("image service answered an image that is not a PNG")
    return image


def create(stage: Stage) -> Dict[str, Any]:
    idea = first_idea(stage)
    service = services.Service("image")
    if service.configured:
        stage.progress(10, "asking the image service")
        image = generated(service, idea)
    else:
        image = draw(hashlib.sha256(idea["title"].encode()).digest(), stage)
    uri = stage.store_png(image)
    stage.progress(100, "stored")
    return {"artifact_uri": uri, "image_url": uri, "image_sha256": hashlib.sha256(image).hexdigest()}


if __name__ == "__main__":
    run(create, timeout_s=services.stage_timeout_s())
