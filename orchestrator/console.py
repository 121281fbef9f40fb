"""The sweep's terminal: rlseg's own lines only. While Ray starts, MLflow opens its store and Tune runs, everything
else they print or log (Ray's banners and token warning, Tune's experiment box and TensorBoard hint, MLflow's
database messages) goes to `sweep.log` in the run folder; `-v` lets it through instead.

rlseg's own lines written meanwhile go through `out()` / `err()`, the streams that were the terminal when the
diversion began, and a live status line (cells done / running / failed, each running cell's epoch, an ETA) sits
under them on a terminal (a TTY; elsewhere, such as CI logs, the per-cell lines alone are printed).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

LOG_FILE = "sweep.log"
NOISY_LOGGERS = ("ray", "mlflow", "alembic", "optuna")

_streams: list[tuple[IO[str], IO[str]]] = []     # (stdout, stderr) of the terminal, innermost diversion last


def out() -> IO[str]:
    """Where rlseg's own lines go: the terminal's stdout, even while other output is diverted."""
    return _streams[-1][0] if _streams else sys.stdout


def err() -> IO[str]:
    return _streams[-1][1] if _streams else sys.stderr


class Log:
    """The file that diverted output goes to: a temporary one until the run folder exists (`settle`)."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="rlseg-", suffix=".log")
        self.stream: IO[str] = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace")

    def settle(self, run_dir: Path) -> None:
        """Move the log into the run folder (appending to a resumed run's) and keep writing there."""
        target = Path(run_dir) / LOG_FILE
        if self.path == str(target):
            return
        self.stream.flush()
        with open(target, "a", encoding="utf-8") as dst, open(self.path, encoding="utf-8", errors="replace") as src:
            shutil.copyfileobj(src, dst)
        old, self.path = self.path, str(target)
        self.stream.close()
        os.remove(old)
        self.stream = open(target, "a", buffering=1, encoding="utf-8", errors="replace")


@contextlib.contextmanager
def diverted(log: Log | None) -> Iterator[None]:
    """While inside: sys.stdout, sys.stderr and the noisy libraries' log handlers write to `log` (None: nothing is
    diverted, -v). Nested use is fine."""
    if log is None:
        yield
        return
    _streams.append((sys.stdout, sys.stderr))
    moved = []
    for name in NOISY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                old = handler.setStream(log.stream)      # None when it already wrote there (a handler seen twice)
                if old is not None:
                    moved.append((handler, old))
    sys.stdout = sys.stderr = log.stream
    try:
        yield
    finally:
        sys.stdout, sys.stderr = _streams.pop()
        for handler, stream in reversed(moved):
            handler.setStream(stream)


class LiveLine:
    """A status line kept at the bottom of a terminal: lines written through `line` appear above it."""

    def __init__(self) -> None:
        self.text = ""

    @staticmethod
    def _tty(stream: IO[str]) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        stream = out()
        if self.text and self._tty(stream):
            stream.write("\r\033[K")
        stream.write(text + "\n")
        if self.text and self._tty(stream):
            stream.write(self.text)
        stream.flush()

    def show(self, text: str) -> None:
        stream = out()
        self.text = text
        if self._tty(stream):
            stream.write("\r\033[K" + text)
            stream.flush()

    def clear(self) -> None:
        stream = out()
        if self.text and self._tty(stream):
            stream.write("\r\033[K")
            stream.flush()
        self.text = ""
