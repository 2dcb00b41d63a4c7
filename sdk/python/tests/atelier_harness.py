"""A real `atelier serve` on loopback for the SDK's and the shop pipeline's tests, and a small
HTTP client:
as the Rust end-to-end harness does it (tests/src/lib.rs), with a secret of the test's own
so tokens are minted here (HS256, with hmac and hashlib), and workers running as the test's
own user whatever accounts the machine has."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[3]
SDK_SRC = REPO / "sdk" / "python" / "src"
#: How long the server may take to print its address.
START_TIMEOUT_S = 20.0
#: How long one HTTP request to it may take.
REQUEST_TIMEOUT_S = 10.0
#: How long a graceful stop may take before the server is killed.
STOP_TIMEOUT_S = 10.0
TERMINAL_STATES = {"completed", "failed", "cancelled"}


def atelier_bin() -> Path:
    """The server binary: `ATELIER_BIN`, else target/debug/atelier of this repository."""
    path = Path(os.environ.get("ATELIER_BIN") or REPO / "target" / "debug" / "atelier")
    if not path.is_file():
        raise FileNotFoundError(f"no atelier binary at {path}: build it (cargo build --bins) or set ATELIER_BIN")
    return path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(secret: str, user: str, admin: bool = False, ttl_s: int = 3600) -> str:
    """An HS256 JWT the server accepts: `sub`, `role`, `iat`, `exp`."""
    now = int(time.time()) - 1
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"exp": now + ttl_s, "iat": now, "role": "admin" if admin else "user", "sub": user}
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


class Response:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """`atelier serve` with a fresh data dir under `work`, its config file `config`, and
    `env` on top of the test settings. Stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    def __init__(self, work: Path, config: str, env: Optional[Dict[str, str]] = None) -> None:
        self.secret = secrets.token_hex(32)
        self.data_dir = work / "data"
        self.log_path = work / "server.log"
        config_path = work / "atelier.toml"
        config_path.write_text(config)
        # Nothing of the caller's own Atelier or shop settings leaks in.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "SHOP_"))}
        base.update(
            {
                "ATELIER_LISTEN": "127.0.0.1:0",
                "ATELIER_DATA_DIR": str(self.data_dir),
                "ATELIER_SECRET": self.secret,
                "ATELIER_CONFIG": str(config_path),
                "RUST_LOG": "warn",
                # Tests poll faster than any client would.
                "ATELIER_USER_RATE": "0",
                # Jobs run as the test's own user (root included) whatever accounts the
                # machine has, as in the Rust harness: the worker user is not under test.
                "ATELIER_WORKER_USER": str(os.geteuid()),
                "ATELIER_ALLOW_ROOT_WORKERS": "true",
            }
        )
        base.update(env or {})
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(atelier_bin()), "serve"],
            env=base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.base = self._wait_for_address()

    def _wait_for_address(self) -> str:
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def drain() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"atelier serve did not start; its log:\n{self.log()}")
            found = re.match(r"atelier listening on (http://\S+)", line.strip())
            if found:
                return found.group(1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self._log.close()

    def token(self, user: str, admin: bool = False) -> str:
        return mint_token(self.secret, user, admin)

    def request(self, method: str, path: str, token: Optional[str] = None, body: Any = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                return Response(r.status, dict(r.headers.items()), r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, dict(e.headers.items()), e.read())

    def create(self, token: str, body: Dict[str, Any]) -> int:
        r = self.request("POST", "/api/commissions", token, body)
        assert r.status == 201, f"create answered {r.status}: {r.body!r}"
        return int(r.json()["task_id"])

    def wait_terminal(self, token: str, task_id: int, timeout_s: float) -> Dict[str, Any]:
        """The commission's snapshot once it is completed, failed or cancelled."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = self.request("GET", f"/api/commissions/{task_id}", token).json()
            if snapshot["state"] in TERMINAL_STATES:
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"commission {task_id} is still {snapshot['state']} after {timeout_s} s: {snapshot}")
            time.sleep(0.05)

    def events(self, token: str, task_id: int) -> List[Dict[str, Any]]:
        """Every event of a terminal commission, from its SSE stream (which ends after the
        terminal event)."""
        req = urllib.request.Request(f"{self.base}/api/progress/{task_id}/stream")
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Accept", "text/event-stream")
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return list(_sse_data(r))

    def jobs(self, token: str, task_id: int) -> List[Dict[str, Any]]:
        return list(self.request("GET", f"/api/commissions/{task_id}/jobs", token).json()["items"])


def _sse_data(stream: Any) -> Iterator[Dict[str, Any]]:
    for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def of_type(events: List[Dict[str, Any]], kind: str) -> List[Dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def at_s(event: Dict[str, Any]) -> float:
    """An event's `at` (RFC 3339, milliseconds, UTC) in seconds since the epoch."""
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def png_size(data: bytes) -> Tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {data[:16]!r}"
    assert data[12:16] == b"IHDR", "a PNG starts with its IHDR chunk"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
