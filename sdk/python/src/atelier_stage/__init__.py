"""Atelier stage commands in Python.

A pipeline stage set to `{ command = [...] }` in atelier.toml runs a program that gets its
stage input as JSON on stdin and speaks the worker protocol on stdout: progress, artifact
and heartbeat lines while it works, then one `result` (merged into the pipeline's state)
or one `error`. :func:`run` does all of that around a function::

    from atelier_stage import Stage, run

    def ideas(stage: Stage) -> dict:
        stage.progress(50, "thinking")
        return {"ideas": [{"title": stage.context.get("title", "Untitled"), "pitch": "..."}]}

    run(ideas)

Heartbeats go out from a thread of their own while the function works (the server ends a
stage that is silent for the pipeline's `heartbeat_timeout_ms`). Raise
:class:`RetryableError` or :class:`PermanentError` to fail the stage; any other exception
fails it as retryable (as the server treats a command that crashes), with its traceback on
the job's stderr, and a :class:`MemoryError` is reported so that the server sees the memory
outcome and retries with more memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, NoReturn, Optional

from ._protocol import (
    ARTIFACT_KIND_BYTES_MAX,
    ARTIFACT_URI_BYTES_MAX,
    PERCENT_MAX,
    Channel,
    LineTooLong,
    encode,
    error_message,
    progress_message,
)

__all__ = [
    "PermanentError",
    "RetryableError",
    "Stage",
    "StageError",
    "StageInput",
    "run",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEATS_PER_TIMEOUT",
    "default_heartbeat_s",
    "RETRY_AFTER_WAIT_MAX_S",
]

__version__ = "0.1.0"

#: How often the heartbeat thread writes a line at most: well inside the server's default
#: heartbeat timeout (30 s), and cheap (one short line a second). A pipeline with a shorter
#: `heartbeat_timeout_ms` (the server passes it as ATELIER_HEARTBEAT_TIMEOUT_MS) gets four
#: beats per timeout instead.
HEARTBEAT_INTERVAL_S = 1.0
#: Beats per heartbeat timeout, when that timeout is short.
HEARTBEATS_PER_TIMEOUT = 4
#: The longest a `Retry-After` hint is waited out before the error is reported.
RETRY_AFTER_WAIT_MAX_S = 60.0
#: The exit code of a stage that reported an error (the error line is what the server reads).
EXIT_FAILED = 1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The stages in the order the server runs them.
STAGES = ("generating_ideas", "creating_images", "uploading", "creating_products")

# Made beforehand: when memory has run out, even building this line may fail.
_MEMORY_ERROR_LINE = b'{"type":"error","error":"MemoryError: out of memory","retryable":true}\n'


class StageError(Exception):
    """A failure the stage reports as its `error` line."""

    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetryableError(StageError):
    """A failure that may pass (a busy or unreachable service): the server tries the
    commission again after its backoff, while attempts remain.

    `retry_after` (seconds, e.g. from an HTTP `Retry-After`) is waited out, with heartbeats,
    before the error is reported, up to :data:`RETRY_AFTER_WAIT_MAX_S`: the protocol has no
    field to tell the server when to retry, so the next attempt cannot come sooner."""

    retryable = True

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(StageError):
    """A failure that another attempt would repeat (a refused request, bad input): the
    commission fails."""

    retryable = False


@dataclass(frozen=True)
class StageInput:
    """What the server hands a stage command on stdin."""

    stage: str
    commission_id: int
    job_id: int
    attempt: int
    context: Dict[str, Any] = field(default_factory=dict)
    #: What the earlier stages returned, merged.
    state: Dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def parse(text: str) -> "StageInput":
        """Reads the stage input; `ValueError` naming what is wrong."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("the stage input is not a JSON object")
        stage = doc.get("stage")
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        ids = {}
        for key in ("commission_id", "job_id", "attempt"):
            value = doc.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, not {value!r}")
            ids[key] = value
        context = doc.get("context") or {}
        state = doc.get("state") or {}
        if not isinstance(context, dict) or not isinstance(state, dict):
            raise ValueError("context and state must be JSON objects")
        return StageInput(stage=stage, context=context, state=state, **ids)


class Stage:
    """The running stage: its input, and the lines it may send while it works."""

    def __init__(self, given: StageInput, channel: Channel, environ: Mapping[str, str]) -> None:
        self.input = given
        self._channel = channel
        self._percent = 0
        artifacts = environ.get("ATELIER_ARTIFACTS_DIR")
        #: Where artifacts are stored (`ATELIER_ARTIFACTS_DIR`); None outside a job.
        self.artifacts_dir: Optional[Path] = Path(artifacts) if artifacts else None
        #: The job's own dir, also the working dir.
        self.job_dir = Path(environ.get("ATELIER_JOB_DIR") or os.getcwd())

    @property
    def name(self) -> str:
        return self.input.stage

    @property
    def context(self) -> Dict[str, Any]:
        return self.input.context

    @property
    def state(self) -> Dict[str, Any]:
        return self.input.state

    @property
    def attempt(self) -> int:
        return self.input.attempt

    def progress(self, percent: int, message: Optional[str] = None) -> None:
        """Reports how far the stage is, 0..100, never less than before."""
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= PERCENT_MAX:
            raise ValueError(f"progress must be an integer 0..={PERCENT_MAX}, not {percent!r}")
        if percent < self._percent:
            raise ValueError(f"progress went down from {self._percent}% to {percent}%")
        self._percent = percent
        self._channel.send(progress_message(self.name, percent, message))

    def heartbeat(self) -> None:
        """A sign of life; the heartbeat thread sends these by itself."""
        self._channel.send({"type": "heartbeat"})

    def artifact(self, uri: str, kind: str = "image") -> None:
        """Records an artifact of this stage by its URI."""
        if not 0 < len(kind.encode()) <= ARTIFACT_KIND_BYTES_MAX:
            raise ValueError(f"an artifact kind must be 1..={ARTIFACT_KIND_BYTES_MAX} bytes")
        if not 0 < len(uri.encode()) <= ARTIFACT_URI_BYTES_MAX:
            raise ValueError(f"an artifact uri must be 1..={ARTIFACT_URI_BYTES_MAX} bytes")
        self._channel.send({"type": "artifact", "stage": self.name, "kind": kind, "uri": uri})

    def store_png(self, data: bytes, kind: str = "image") -> str:
        """Stores a PNG where the server serves it (`/artifacts/{sha256}.png`), records it as
        an artifact of this stage, and returns its URI."""
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError("an artifact must be a PNG (the server serves artifacts as image/png)")
        digest = hashlib.sha256(data).hexdigest()
        path = self._artifacts() / f"{digest}.png"
        try:
            # The same content stored before: touched, as the server sweeps artifacts by age.
            os.utime(path)
        except FileNotFoundError:
            _write_atomic(path, data)
        uri = f"/artifacts/{digest}.png"
        self.artifact(uri, kind)
        return uri

    def read_artifact(self, uri: str) -> bytes:
        """The bytes of an artifact stored by :meth:`store_png` (in this job or another)."""
        name = uri.rsplit("/", 1)[-1]
        if not uri.startswith("/artifacts/") or len(name) != 68 or not name.endswith(".png"):
            raise ValueError(f"not an artifact URI: {uri!r} (expected /artifacts/<sha256>.png)")
        return (self._artifacts() / name).read_bytes()

    def _artifacts(self) -> Path:
        if self.artifacts_dir is None:
            raise RuntimeError("ATELIER_ARTIFACTS_DIR is not set: artifacts exist only inside a job")
        return self.artifacts_dir


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes via a temporary file and a rename, so a reader never sees a partial file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Heartbeat(threading.Thread):
    """Sends a heartbeat every `interval_s` until stopped; past the stage's deadline, reports
    that it timed out and ends the process (the stage's own work cannot be interrupted from
    here: a thread blocked in a read has no other way out)."""

    def __init__(self, channel: Channel, interval_s: float, timeout_s: Optional[float]) -> None:
        super().__init__(name="atelier-heartbeat", daemon=True)
        self._channel = channel
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._stop_event = threading.Event()

    def remaining_s(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while True:
            wait_s = self._interval_s
            remaining = self.remaining_s()
            if remaining is not None:
                wait_s = min(wait_s, remaining)
            if self._stop_event.wait(wait_s):
                return
            if self.remaining_s() == 0.0:
                self._time_out()
                return
            try:
                if not self._channel.send({"type": "heartbeat"}):
                    return
            except OSError:
                return  # The reader is gone: the stage is being ended.

    def _time_out(self) -> None:
        error = f"the stage timed out after {self._timeout_s:g} s (its own timeout)"
        if self._channel.finish(error_message(error, True)):
            print(f"atelier_stage: {error}", file=sys.stderr, flush=True)
            os._exit(EXIT_FAILED)


def default_heartbeat_s(environ: Mapping[str, str]) -> float:
    """Every second, or a quarter of `ATELIER_HEARTBEAT_TIMEOUT_MS` when that is shorter (a
    missing or malformed value: every second)."""
    try:
        timeout_s = int(environ.get("ATELIER_HEARTBEAT_TIMEOUT_MS", "")) / 1000
    except ValueError:
        return HEARTBEAT_INTERVAL_S
    if timeout_s <= 0:
        return HEARTBEAT_INTERVAL_S
    return min(HEARTBEAT_INTERVAL_S, timeout_s / HEARTBEATS_PER_TIMEOUT)


def run(
    handler: Callable[[Stage], Optional[Mapping[str, Any]]],
    *,
    heartbeat_s: Optional[float] = None,
    timeout_s: Optional[float] = None,
) -> NoReturn:
    """Runs `handler` as this process's stage and exits: 0 after its result, 1 after an error.

    `handler` gets the :class:`Stage` and returns a dict (None: `{}`), merged into the
    pipeline's state. Heartbeats go out every `heartbeat_s` meanwhile (None: every second, or
    a quarter of the pipeline's heartbeat timeout when that is shorter); past `timeout_s`
    (None: no timeout of its own) the stage fails as retryable and the process ends.
    Anything the stage prints goes to stderr (the job's log): stdout carries the protocol."""
    if heartbeat_s is None:
        heartbeat_s = default_heartbeat_s(os.environ)
    if not heartbeat_s > 0:
        raise ValueError(f"heartbeat_s must be positive, not {heartbeat_s!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
    sys.stdout.flush()
    channel = Channel(os.dup(1))
    os.dup2(2, 1)
    sys.exit(_run(handler, channel, heartbeat_s, timeout_s))


def _run(
    handler: Callable[[Stage], Optional[Mapping[str, Any]]],
    channel: Channel,
    heartbeat_s: float,
    timeout_s: Optional[float],
) -> int:
    try:
        given = StageInput.parse(sys.stdin.read())
    except ValueError as e:
        channel.finish(error_message(f"bad stage input: {e}", False))
        return EXIT_FAILED
    beat = _Heartbeat(channel, heartbeat_s, timeout_s)
    beat.start()
    try:
        result = handler(Stage(given, channel, os.environ))
        line = _result_line(result)
    except MemoryError as e:
        _report_memory_error(channel, e)
        return EXIT_FAILED
    except StageError as e:
        _wait_retry_after(e, beat)
        beat.stop()
        channel.finish(error_message(_describe(e), e.retryable))
        return EXIT_FAILED
    except BaseException as e:  # noqa: BLE001 - every ending must be an error line
        traceback.print_exc()
        sys.stderr.flush()
        beat.stop()
        retryable = not isinstance(e, (SystemExit, KeyboardInterrupt))
        channel.finish(error_message(f"{type(e).__name__}: {e}", retryable))
        return EXIT_FAILED
    beat.stop()
    channel.finish(line)
    return 0


def _result_line(result: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The result line; `PermanentError` when the server would refuse it."""
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        raise PermanentError(f"the stage returned {type(result).__name__}, not a dict")
    line = {"type": "result", "result": dict(result)}
    try:
        encode(line)
    except (TypeError, ValueError) as e:
        kind = "too long" if isinstance(e, LineTooLong) else "not JSON"
        raise PermanentError(f"the stage's result is {kind}: {e}") from e
    return line


def _describe(e: StageError) -> str:
    if isinstance(e, RetryableError) and e.retry_after is not None:
        return f"{e.message} (retry after {e.retry_after:g} s)"
    return e.message


def _wait_retry_after(e: StageError, beat: _Heartbeat) -> None:
    """Waits out a retryable error's `retry_after` (capped, and never past the stage's own
    deadline), heartbeats going on meanwhile."""
    if not isinstance(e, RetryableError) or not e.retry_after or e.retry_after <= 0:
        return
    wait_s = min(e.retry_after, RETRY_AFTER_WAIT_MAX_S)
    remaining = beat.remaining_s()
    if remaining is not None:
        wait_s = min(wait_s, max(0.0, remaining - 0.1))
    time.sleep(wait_s)


def _report_memory_error(channel: Channel, e: MemoryError) -> None:
    """The server tells a stage command that ran out of memory from one that failed by the
    last line of the job's stderr just before the stage's error: Python's own `MemoryError`
    line, as a traceback ends (`workers/src/executor/process/classify.rs`). So the traceback
    goes to stderr first, and if even that fails for want of memory, the bare name."""
    try:
        traceback.print_exception(type(e), e, e.__traceback__)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - out of memory: write what needs no allocation
        os.write(2, b"\nMemoryError\n")
    e.__traceback__ = None
    try:
        channel.finish(error_message(f"MemoryError: {e}" if str(e) else "MemoryError", True))
    except MemoryError:
        channel.finish_raw(_MEMORY_ERROR_LINE)
