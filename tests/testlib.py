"""Helpers shared across the test directories: ``upmoe`` in the test process, and free TCP ports."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from upmoe.cli import main


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    def last_json(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


def run_cli(*args: str | Path) -> CliResult:
    """``upmoe ARGS`` in this process, with its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return CliResult(rc, out.getvalue(), err.getvalue())


def free_port() -> int:
    """A TCP port nothing listens on right now (for a server a test starts, or to refuse a connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
