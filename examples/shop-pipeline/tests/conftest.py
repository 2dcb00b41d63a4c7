"""Fixtures of the shop pipeline's end-to-end tests: a server factory that stops what it
started, and the fake services."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
# The example's own config writer, and the SDK's server harness.
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "sdk" / "python" / "tests")]
import configure  # noqa: E402
from atelier_harness import Server  # noqa: E402
from fake_services import FakeServices  # noqa: E402

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
