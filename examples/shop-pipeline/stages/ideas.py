"""generating_ideas: product ideas from a post (the commission's context: `title`, `text`),
from an ideas service when `SHOP_IDEAS_URL` is set, else from a local heuristic that gives
the same ideas for the same post."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Dict, List

import services
from atelier_stage import PermanentError, Stage, run

IDEAS_COUNT = 3
#: The post is cut to this many characters before anything reads it.
POST_CHARS_MAX = 10_000
STYLES = ["Minimal", "Vintage", "Bold", "Pastel", "Geometric", "Botanical", "Retro", "Cosmic"]
PRODUCTS = ["Poster", "Mug", "T-shirt", "Tote bag", "Notebook", "Sticker set", "Phone case", "Pillow"]
STOPWORDS = set(
    "about after again also because been before being could every from have into just like more most "
    "much only other over said some such than that their them then there these they this those through "
    "very were what when where which while will with would your".split()
)


def keywords(text: str, count: int) -> List[str]:
    """The post's most frequent words of four letters or more, first seen first among equals."""
    words = [w for w in re.findall(r"[a-z][a-z'-]{3,}", text.lower()) if w not in STOPWORDS]
    seen = Counter(words)
    order = {w: i for i, w in reversed(list(enumerate(words)))}
    return sorted(seen, key=lambda w: (-seen[w], order[w]))[:count]


def local_ideas(title: str, text: str) -> List[Dict[str, str]]:
    digest = hashlib.sha256(f"{title}\0{text}".encode()).digest()
    words = keywords(f"{title} {text}", IDEAS_COUNT) or [title.lower()]
    ideas = []
    for i in range(IDEAS_COUNT):
        style = STYLES[digest[2 * i] % len(STYLES)]
        product = PRODUCTS[(digest[2 * i + 1] + i) % len(PRODUCTS)]
        theme = words[i % len(words)]
        ideas.append(
            {
                "title": f"{style} {product}: {title}",
                "pitch": f"A {style.lower()} {product.lower()} on the theme of '{theme}', after \"{title}\"",
            }
        )
    return ideas


def remote_ideas(service: services.Service, title: str, text: str) -> List[Dict[str, str]]:
    answer = service.post_json({"title": title, "text": text, "count": IDEAS_COUNT})
    ideas = answer.get("ideas")
    if not isinstance(ideas, list) or not ideas:
        raise PermanentError("ideas service answered no 'ideas' list")
    good = [i for i in ideas if isinstance(i, dict) and isinstance(i.get("title"), str)]
    if not good:
        raise PermanentError("ideas service answered ideas without a 'title'")
    return [{"title": i["title"], "pitch": str(i.get("pitch", ""))} for i in good[:IDEAS_COUNT]]


def generate(stage: Stage) -> Dict[str, Any]:
    title = str(stage.context.get("title") or "Untitled").strip()[:120]
    text = str(stage.context.get("text") or "")[:POST_CHARS_MAX]
    service = services.Service("ideas")
    if service.configured:
        stage.progress(10, "asking the ideas service")
        ideas = remote_ideas(service, title, text)
    else:
        ideas = local_ideas(title, text)
    stage.progress(100, f"{len(ideas)} ideas")
    return {"ideas": ideas}


if __name__ == "__main__":
    run(generate, timeout_s=services.stage_timeout_s())
