"""The external services the shop pipeline calls, each behind an endpoint and a key from the
environment (`SHOP_<NAME>_URL`, `SHOP_<NAME>_KEY`), and how their answers become the stage's
outcome: a busy or unreachable service is a retryable error (honouring `Retry-After`), a
refused request a permanent one. Without an endpoint a stage uses its local fallback."""

from __future__ import annotations

import email.utils
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

from atelier_stage import PermanentError, RetryableError

#: How long one HTTP request may take (`SHOP_HTTP_TIMEOUT_S`).
HTTP_TIMEOUT_S_DEFAULT = 30.0
#: How long a whole stage may take (`SHOP_STAGE_TIMEOUT_S`): the stage's own timeout,
#: inside the pipeline's `timeout_seconds`.
STAGE_TIMEOUT_S_DEFAULT = 120.0
#: The most of an error body quoted in a stage's error.
QUOTE_CHARS_MAX = 200
#: The largest answer read from a service (an image fits).
ANSWER_BYTES_MAX = 16 * 1024 * 1024
#: Statuses that say "later": the request may succeed if made again.
RETRYABLE_STATUSES = {408, 425, 429, 500, 502, 503, 504}


def seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise PermanentError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise PermanentError(f"{name}={raw!r} must be positive")
    return value


def stage_timeout_s() -> float:
    return seconds_from_env("SHOP_STAGE_TIMEOUT_S", STAGE_TIMEOUT_S_DEFAULT)


def retry_after_s(value: Optional[str]) -> Optional[float]:
    """A `Retry-After` header's delay: seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Service:
    """One external API: `SHOP_<NAME>_URL` and `SHOP_<NAME>_KEY` (sent as a bearer token)."""

    def __init__(self, name: str) -> None:
        self.name = name
        prefix = f"SHOP_{name.upper()}"
        self.url = os.environ.get(f"{prefix}_URL", "").strip() or None
        self.key = os.environ.get(f"{prefix}_KEY", "").strip() or None

    @property
    def configured(self) -> bool:
        return self.url is not None

    def post(self, body: bytes, content_type: str) -> Dict[str, Any]:
        """POSTs `body` and returns the JSON object answered; a stage error otherwise."""
        assert self.url is not None, "post needs an endpoint"
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = seconds_from_env("SHOP_HTTP_TIMEOUT_S", HTTP_TIMEOUT_S_DEFAULT)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                raw = answer.read(ANSWER_BYTES_MAX + 1)
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, socket.timeout) or isinstance(e, socket.timeout):
                reason = f"no answer within {timeout:g} s"
            raise RetryableError(f"{self.name} service unreachable: {reason}") from None
        if len(raw) > ANSWER_BYTES_MAX:
            raise PermanentError(f"{self.name} service answered over {ANSWER_BYTES_MAX} bytes")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise PermanentError(f"{self.name} service answered something other than JSON: {_quote(raw)}") from None
        if not isinstance(doc, dict):
            raise PermanentError(f"{self.name} service answered {type(doc).__name__}, not a JSON object")
        return doc

    def post_json(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        return self.post(json.dumps(doc).encode(), "application/json")

    def _refused(self, e: urllib.error.HTTPError) -> Exception:
        said = _quote(e.read(QUOTE_CHARS_MAX * 4))
        message = f"{self.name} service answered {e.code}: {said}"
        if e.code in RETRYABLE_STATUSES:
            return RetryableError(message, retry_after=retry_after_s(e.headers.get("Retry-After")))
        return PermanentError(message)


def _quote(raw: bytes) -> str:
    text = raw.decode(errors="replace").strip()
    return text[:QUOTE_CHARS_MAX] + ("..." if len(text) > QUOTE_CHARS_MAX else "") or "(empty)"
