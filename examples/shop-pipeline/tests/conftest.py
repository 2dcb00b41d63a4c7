"""Fixtures of the shop pipeline's end-to-end tests: a server factory that stops what it
started, and the fake services."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from atelier_harness import Server
from fake_services import FakeServices

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import configure  # noqa: E402 - the example's own config writer, found through the line above

StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Starts `atelier serve` with the shop pipeline (stages run by this Python) plus `extra`
    lines in its table, and `env` on top of the test settings."""
    started: List[Server] = []

    def start(env: Optional[Dict[str, str]] = None, extra: Optional[List[str]] = None) -> Server:
        python = sys.executable
        sdk = None if configure.has_sdk(python) else configure.SDK_SRC
        config = configure.pipeline_table("shop", python, sdk, extra)
        work = tmp_path / f"server-{len(started)}"
        work.mkdir()
        server = Server(work, config, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fakes() -> Iterator[FakeServices]:
    services = FakeServices()
    yield services
    services.close()
