"""Small HTTP servers on 127.0.0.1 that answer as the shop pipeline's four services would
(`/ideas`, `/image`, `/upload`, `/product`), each following a plan of answers the test sets:
a status with headers (429 with `Retry-After`, 400), a hang, then good answers."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import shop_png  # noqa: E402 - the example's own encoder, found through the line above

#: The longest a planned hang holds its request (the test's own timeouts are far shorter).
HANG_S_MAX = 30.0
SERVICES = ("ideas", "image", "upload", "product")
KEY = "test-key"
#: The image the fake image service answers: 2x2, four colours.
IMAGE = shop_png.encode_rgb(2, 2, bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]))


@dataclass
class Answer:
    status: int = 200
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False


@dataclass
class Seen:
    service: str
    at: float
    authorization: Optional[str]
    content_type: Optional[str]
    body: bytes


class FakeServices:
    def __init__(self) -> None:
        self.plans: Dict[str, List[Answer]] = {s: [] for s in SERVICES}
        self.seen: List[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        fakes = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                fakes._answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def plan(self, service: str, *answers: Answer) -> None:
        """The next requests to `service` get `answers`, in order; later ones the good answer."""
        with self._lock:
            self.plans[service].extend(answers)

    def env(self) -> Dict[str, str]:
        """The server's environment that points every stage at these services."""
        out = {}
        for s in SERVICES:
            out[f"SHOP_{s.upper()}_URL"] = f"{self.base}/{s}"
            out[f"SHOP_{s.upper()}_KEY"] = KEY
        return out

    def requests_to(self, service: str) -> List[Seen]:
        with self._lock:
            return [s for s in self.seen if s.service == service]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        service = h.path.strip("/")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.seen.append(Seen(service, time.time(), h.headers.get("Authorization"), h.headers.get("Content-Type"), body))
            planned = self.plans.get(service)
            answer = planned.pop(0) if planned else self._good(service, body)
        if answer.hang:
            self.release.wait(HANG_S_MAX)
            return
        h.send_response(answer.status)
        for k, v in {"Content-Type": "application/json", **answer.headers}.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(answer.body)))
        h.end_headers()
        h.wfile.write(answer.body)

    def _good(self, service: str, body: bytes) -> Answer:
        if service == "ideas":
            asked = json.loads(body)
            ideas = [{"title": f"Remote idea {i}: {asked['title']}", "pitch": f"pitch {i}"} for i in range(3)]
            return ok({"ideas": ideas})
        if service == "image":
            return ok({"data": [{"b64_json": base64.b64encode(IMAGE).decode()}]})
        if service == "upload":
            return ok({"url": f"{self.base}/hosted/{hashlib.sha256(body).hexdigest()}.png"})
        if service == "product":
            return ok({"id": "prod-1", "url": f"{self.base}/products/prod-1"})
        return Answer(404, body=b'{"error":"no such service"}')


def ok(doc: object) -> Answer:
    return Answer(200, body=json.dumps(doc).encode())


def status(code: int, headers: Optional[Dict[str, str]] = None, message: str = "") -> Answer:
    return Answer(code, headers or {}, json.dumps({"error": message or f"status {code}"}).encode())


def hang() -> Answer:
    return Answer(hang=True)
