"""A stage written with the SDK that runs out of memory under a real `atelier serve` is the
memory outcome: retried with double memory up to the pipeline's cap, as
`a_command_stage_out_of_memory_is_retried_with_double_memory` (tests/e2e/isolation.rs) shows
for a bare python3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from atelier_harness import SDK_SRC, Server

HUNGRY = """
from atelier_stage import run

def hoard(stage):
    stage.progress(10, "hoarding")
    data = b"x" * (512 << 20)
    return {"size": len(data)}

run(hoard)
"""


def test_a_memory_error_in_a_stage_is_retried_with_double_memory(tmp_path: Path) -> None:
    script = tmp_path / "hungry.py"
    script.write_text(HUNGRY)
    command = json.dumps([sys.executable, str(script)])
    config = f"""
[pipelines.hungry]
memory_mb = 128
memory_max_mb = 256
env = {{ PYTHONPATH = {json.dumps(str(SDK_SRC))} }}
stages.generating_ideas = {{ command = {command} }}
"""
    # Without a job cgroup the limit is RLIMIT_AS: the allocation fails in Python (a
    # MemoryError the SDK reports) instead of the kernel killing the stage at the limit.
    s = Server(tmp_path, config, {"ATELIER_CGROUP": "off", "RETRY_BASE_MS": "10", "RETRY_CAP_MS": "20"})
    try:
        alice = s.token("alice")
        task = s.create(alice, {"context": {}, "pipeline": "hungry", "max_attempts": 3})
        done = s.wait_terminal(alice, task, 60)
        assert done["state"] == "failed", done
        ended = [(j["status"], j["error_message"]) for j in s.jobs(alice, task)]
        assert ended == [
            ("killed", "memory limit exceeded (128 MiB); the next attempt gets 256 MiB"),
            ("killed", "memory limit exceeded (256 MiB, the cap)"),
        ], ended
    finally:
        s.stop()
