"""The SDK's own tests: real stage processes (this Python running a small stage script) fed
a stage input on stdin, their protocol lines read from stdout and checked line by line."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

SDK_SRC = Path(__file__).resolve().parents[1] / "src"
#: How long one stage process may run in these tests.
RUN_TIMEOUT_S = 30
#: The markers the server looks for in the last line of a job's stderr to call a failure the
#: memory outcome (workers/src/executor/process/classify.rs, `looks_like_oom`).
OOM_MARKERS = ["memory allocation of", "MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc", "failed to allocate"]
PROTOCOL_KEYS = {
    "progress": {"type", "stage", "percent", "message"},
    "artifact": {"type", "stage", "kind", "uri"},
    "heartbeat": {"type"},
    "result": {"type", "result"},
    "error": {"type", "error", "retryable"},
}


class Ran:
    def __init__(self, p: subprocess.CompletedProcess, took_s: float) -> None:
        self.code = p.returncode
        self.stderr = p.stderr.decode(errors="replace")
        self.took_s = took_s
        self.lines: List[Dict[str, Any]] = [json.loads(line) for line in p.stdout.decode().splitlines()]

    def types(self) -> List[str]:
        return [line["type"] for line in self.lines]

    @property
    def last(self) -> Dict[str, Any]:
        return self.lines[-1]

    def last_stderr_line(self) -> str:
        return [line.strip() for line in self.stderr.splitlines() if line.strip()][-1]


def stage_input(**context: Any) -> Dict[str, Any]:
    return {"stage": "creating_images", "commission_id": 7, "job_id": 9, "attempt": 1, "context": context, "state": {"ideas": ["x"]}}


def run_stage(
    tmp_path: Path,
    body: str,
    given: Any = None,
    env: Optional[Dict[str, str]] = None,
    memory_bytes: Optional[int] = None,
) -> Ran:
    """Runs a stage script whose handler is `body` (the function `handle(stage)`, then the
    `run` call) and checks every line it wrote against the protocol."""
    script = tmp_path / "stage.py"
    script.write_text("import sys, time\nfrom atelier_stage import *\n" + textwrap.dedent(body))
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SDK_SRC), os.environ.get("PYTHONPATH")]))

    def limit() -> None:
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    started = time.monotonic()
    text = given if isinstance(given, str) else json.dumps(given if given is not None else stage_input())
    p = subprocess.run(
        [sys.executable, str(script)],
        input=text.encode(),
        capture_output=True,
        cwd=tmp_path,
        env=full_env,
        timeout=RUN_TIMEOUT_S,
        preexec_fn=limit,
    )
    ran = Ran(p, time.monotonic() - started)
    for line in ran.lines:
        assert set(line) <= PROTOCOL_KEYS[line["type"]], line
    finals = [i for i, line in enumerate(ran.lines) if line["type"] in ("result", "error")]
    assert finals == [len(ran.lines) - 1], f"exactly one final line, last: {ran.lines}"
    return ran


def test_a_result_after_progress_and_prints_go_to_stderr(tmp_path: Path) -> None:
    ran = run_stage(
        tmp_path,
        """
        def handle(stage):
            print("chatter")
            stage.progress(40, "drawing")
            stage.progress(100)
            return {"seen": [stage.name, stage.context, stage.state, stage.attempt, stage.input.job_id]}
        run(handle)
        """,
        stage_input(title="Fox"),
    )
    assert ran.code == 0, ran.stderr
    progress = [line for line in ran.lines if line["type"] == "progress"]
    assert progress == [
        {"type": "progress", "stage": "creating_images", "percent": 40, "message": "drawing"},
        {"type": "progress", "stage": "creating_images", "percent": 100},
    ]
    assert ran.last == {"type": "result", "result": {"seen": ["creating_images", {"title": "Fox"}, {"ideas": ["x"]}, 1, 9]}}
    assert "chatter" in ran.stderr


def test_a_short_heartbeat_timeout_from_the_server_sets_the_default_rate(tmp_path: Path) -> None:
    ran = run_stage(
        tmp_path,
        """
        def handle(stage):
            time.sleep(0.6)
            return {"rates": [default_heartbeat_s(e) for e in ({}, {"ATELIER_HEARTBEAT_TIMEOUT_MS": "30000"},
                                                               {"ATELIER_HEARTBEAT_TIMEOUT_MS": "bad"})]}
        run(handle)
        """,
        env={"ATELIER_HEARTBEAT_TIMEOUT_MS": "400"},
    )
    assert ran.code == 0, ran.stderr
    assert ran.types().count("heartbeat") >= 5, ran.types()
    assert ran.last == {"type": "result", "result": {"rates": [1.0, 1.0, 1.0]}}, "else every second"


def test_heartbeats_go_out_while_the_stage_works_and_stop_at_its_result(tmp_path: Path) -> None:
    ran = run_stage(
        tmp_path,
        """
        def handle(stage):
            time.sleep(1.0)
            return None
        run(handle, heartbeat_s=0.1)
        """,
    )
    assert ran.code == 0, ran.stderr
    assert ran.types().count("heartbeat") >= 5, ran.types()
    assert ran.last == {"type": "result", "result": {}}


def test_an_uncaught_exception_is_a_retryable_error_line_with_its_traceback(tmp_path: Path) -> None:
    ran = run_stage(tmp_path, "def handle(stage):\n    return {}['missing']\nrun(handle)\n")
    assert ran.code == 1
    assert ran.last == {"type": "error", "error": "KeyError: 'missing'", "retryable": True}
    assert "Traceback (most recent call last)" in ran.stderr and ran.last_stderr_line() == "KeyError: 'missing'"
    assert not any(m in ran.last_stderr_line() for m in OOM_MARKERS)


@pytest.mark.parametrize(
    "raised, line",
    [
        ("RetryableError('busy')", {"type": "error", "error": "busy", "retryable": True}),
        ("PermanentError('refused')", {"type": "error", "error": "refused", "retryable": False}),
        ("ValueError('x' * 10000)", {"type": "error", "error": "ValueError: " + "x" * 4081 + "...", "retryable": True}),
    ],
)
def test_stage_errors_say_whether_to_retry(tmp_path: Path, raised: str, line: Dict[str, Any]) -> None:
    ran = run_stage(tmp_path, f"def handle(stage):\n    raise {raised}\nrun(handle)\n")
    assert (ran.code, ran.last) == (1, line)


def test_retry_after_is_waited_out_with_heartbeats_before_the_error(tmp_path: Path) -> None:
    ran = run_stage(
        tmp_path,
        """
        def handle(stage):
            raise RetryableError("429 from the image service", retry_after=1.5)
        run(handle, heartbeat_s=0.2)
        """,
    )
    assert ran.last == {"type": "error", "error": "429 from the image service (retry after 1.5 s)", "retryable": True}
    assert ran.took_s >= 1.5 and ran.types().count("heartbeat") >= 5, (ran.took_s, ran.types())


def test_a_memory_error_ends_as_the_server_reads_the_memory_outcome(tmp_path: Path) -> None:
    # A real allocation failure under an address-space limit, as the job controller sets one.
    ran = run_stage(
        tmp_path,
        """
        def handle(stage):
            stage.progress(10)
            hoard = b"x" * (1 << 30)
            return {"size": len(hoard)}
        run(handle, heartbeat_s=0.1)
        """,
        memory_bytes=256 << 20,
    )
    assert ran.code == 1
    assert ran.last["type"] == "error" and ran.last["retryable"] is True, ran.last
    assert ran.last["error"].startswith("MemoryError"), ran.last
    # The server's rule: an error line right after stderr's last line was an allocation failure.
    assert any(m in ran.last_stderr_line() for m in OOM_MARKERS), ran.stderr


def test_the_stages_own_timeout_ends_a_stage_stuck_in_a_call(tmp_path: Path) -> None:
    ran = run_stage(
        tmp_path,
        """
        import threading
        def handle(stage):
            threading.Event().wait()  # never returns
        run(handle, heartbeat_s=0.1, timeout_s=1)
        """,
    )
    assert ran.code == 1
    assert ran.last == {"type": "error", "error": "the stage timed out after 1 s (its own timeout)", "retryable": True}
    assert 1.0 <= ran.took_s < RUN_TIMEOUT_S and ran.types().count("heartbeat") >= 5, (ran.took_s, ran.types())


@pytest.mark.parametrize(
    "given, said",
    [
        ("not json", "bad stage input: Expecting value"),
        ([1, 2], "bad stage input: the stage input is not a JSON object"),
        ({**stage_input(), "stage": "packing"}, "bad stage input: unknown stage 'packing'"),
        ({**stage_input(), "attempt": "1"}, "bad stage input: attempt must be a non-negative integer"),
    ],
)
def test_a_bad_stage_input_is_a_permanent_error(tmp_path: Path, given: Any, said: str) -> None:
    ran = run_stage(tmp_path, "run(lambda stage: {})\n", given)
    assert ran.code == 1 and ran.last["retryable"] is False, ran.last
    assert ran.last["error"].startswith(said), ran.last


@pytest.mark.parametrize(
    "body, error",
    [
        ("stage.progress(50)\n    stage.progress(40)", "ValueError: progress went down from 50% to 40%"),
        ("stage.progress(101)", "ValueError: progress must be an integer 0..=100, not 101"),
        ("return ['not', 'a', 'dict']", "the stage returned list, not a dict"),
        ("return {'big': 'x' * (70 * 1024)}", "the stage's result is too long: a result line of"),
        ("return {'when': time}", "the stage's result is not JSON: Object of type module"),
    ],
)
def test_what_the_server_would_refuse_is_refused_here_first(tmp_path: Path, body: str, error: str) -> None:
    ran = run_stage(tmp_path, f"def handle(stage):\n    {body}\nrun(handle)\n")
    assert ran.code == 1 and ran.last["error"].startswith(error), ran.last


def test_store_png_keeps_the_artifact_by_its_hash_and_reports_it(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    png = b"\x89PNG\r\n\x1a\n" + b"pixels"
    ran = run_stage(
        tmp_path,
        f"""
        def handle(stage):
            uri = stage.store_png({png!r})
            again = stage.store_png({png!r})
            assert stage.read_artifact(uri) == {png!r}
            try:
                stage.store_png(b"GIF89a")
            except ValueError as e:
                return {{"uri": uri, "again": again, "refused": str(e)}}
        run(handle)
        """,
        env={"ATELIER_ARTIFACTS_DIR": str(artifacts)},
    )
    digest = hashlib.sha256(png).hexdigest()
    uri = f"/artifacts/{digest}.png"
    assert (artifacts / f"{digest}.png").read_bytes() == png
    assert sorted(p.name for p in artifacts.iterdir()) == [f"{digest}.png"]
    assert [line for line in ran.lines if line["type"] == "artifact"] == [
        {"type": "artifact", "stage": "creating_images", "kind": "image", "uri": uri}
    ] * 2
    assert ran.last["result"] == {"uri": uri, "again": uri, "refused": ran.last["result"]["refused"]}
    assert "must be a PNG" in ran.last["result"]["refused"]
