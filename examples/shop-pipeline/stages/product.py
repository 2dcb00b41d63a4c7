"""creating_products: a product for the first idea on a print-on-demand shop when
`SHOP_PRODUCT_URL` is set, else the product record alone; the record is the stage's result."""

from __future__ import annotations

import hashlib
from typing import Any, Dict

import services
from atelier_stage import PermanentError, Stage, run


def record(stage: Stage) -> Dict[str, Any]:
    ideas = stage.state.get("ideas")
    if not isinstance(ideas, list) or not ideas or not isinstance(ideas[0], dict):
        raise PermanentError("no idea to make a product of")
    title = str(ideas[0].get("title") or "Untitled")
    digest = hashlib.sha256(f"price\0{title}".encode()).digest()
    return {
        "title": title,
        "description": str(ideas[0].get("pitch") or ""),
        "image_url": stage.state.get("image_url"),
        "price_cents": 1500 + (int.from_bytes(digest[:2], "big") % 35) * 100 + 99,
        "currency": "USD",
    }


def create(stage: Stage) -> Dict[str, Any]:
    product = record(stage)
    service = services.Service("product")
    if service.configured:
        stage.progress(10, "creating the product in the shop")
        answer = service.post_json(product)
        if not isinstance(answer.get("id"), (str, int)):
            raise PermanentError("shop answered no product 'id'")
        product["shop_id"] = str(answer["id"])
        if isinstance(answer.get("url"), str):
            product["shop_url"] = answer["url"]
    stage.progress(100, "product ready")
    return {"product": product}


if __name__ == "__main__":
    run(create, timeout_s=services.stage_timeout_s())
