"""The stage command's end of the worker protocol: one JSON object per line on the stream
the worker reads (the command's stdout), written whole and never interleaved.

The limits mirror the server's (`workers/src/inside/protocol.rs`, `engine/src/limits.rs`):
a line the server would refuse fails the whole attempt as a protocol error, so the SDK
refuses it first, with a message that says which limit.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, Optional

#: The longest result the server keeps, in bytes of JSON.
RESULT_BYTES_MAX = 64 * 1024
#: The longest protocol line the server reads (without the newline).
LINE_BYTES_MAX = RESULT_BYTES_MAX + 1024
#: A progress message's longest length in bytes.
MESSAGE_BYTES_MAX = 4 * 1024
#: The server keeps this much of an error; the SDK cuts longer ones itself.
ERROR_BYTES_MAX = 4096
ARTIFACT_KIND_BYTES_MAX = 64
ARTIFACT_URI_BYTES_MAX = 2048
PERCENT_MAX = 100


class LineTooLong(ValueError):
    """A protocol line over :data:`LINE_BYTES_MAX`."""


def encode(message: Dict[str, Any]) -> bytes:
    """The line for `message`, newline included; :class:`LineTooLong` past the limit."""
    line = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    if len(line) > LINE_BYTES_MAX:
        raise LineTooLong(f"a {message.get('type')} line of {len(line)} bytes is over the {LINE_BYTES_MAX}-byte limit")
    return line + b"\n"


def cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, on a character boundary."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


class Channel:
    """The protocol stream. Lines from the stage's own thread and from the heartbeat thread
    go through one lock, each in whole writes, so they never interleave; once the final
    line (`result` or `error`) is out, nothing more is written: the server fails a stage
    that says anything after it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: Dict[str, Any]) -> bool:
        """Writes one line; False once the final line is out (nothing is written then)."""
        return self._write(encode(message), final=False)

    def finish(self, message: Dict[str, Any]) -> bool:
        """Writes the final line, once; False when another one was first."""
        return self._write(encode(message), final=True)

    def finish_raw(self, line: bytes) -> bool:
        """Writes a final line made beforehand (when even encoding one may fail: no memory)."""
        return self._write(line, final=True)

    def _write(self, line: bytes, final: bool) -> bool:
        with self._lock:
            if self._closed:
                return False
            if final:
                self._closed = True
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            return True


def error_message(error: str, retryable: bool) -> Dict[str, Any]:
    return {"type": "error", "error": cut(error, ERROR_BYTES_MAX), "retryable": retryable}


def progress_message(stage: str, percent: int, message: Optional[str]) -> Dict[str, Any]:
    line: Dict[str, Any] = {"type": "progress", "stage": stage, "percent": percent}
    if message is not None:
        line["message"] = cut(message, MESSAGE_BYTES_MAX)
    return line
