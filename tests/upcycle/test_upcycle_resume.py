"""``upmoe upcycle --resume`` after the whole job is SIGKILLed mid-run (driver, Ray and its workers).

The job runs as a subprocess in its own session with its own local Ray (``RAY_ADDRESS=local``), stretched by
``UPMOE_UPCYCLE_TASK_DELAY_S`` so it is killed after some shards have landed. Every process of that session is
killed by id afterwards (never by name: other Ray clusters on the machine are left alone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from upcycle_testlib import files_except_report, report

from upcycle.job import MANIFEST, partial_dir

UPMOE = Path(sys.executable).with_name("upmoe")
FLAGS = ("--max-parallel", "1", "--no-progress", "--eval-tokens", "0")


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of the session (the job's process group first), by id; wait until they are gone."""
    with_pg = True
    deadline = time.monotonic() + timeout
    while True:
        if with_pg:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with_pg = False
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {sid} survive SIGKILL: {members}")
        time.sleep(0.1)


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Session ids of the subprocesses a test starts; all of their processes are killed at the end."""
    started: list[int] = []
    yield started
    for sid in started:
        _kill_session(sid)


def _env(delay: float | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UPMOE_UPCYCLE_TASK_DELAY_S"}
    env["RAY_ADDRESS"] = "local"  # a private local Ray, never some cluster already running here
    if delay is not None:
        env["UPMOE_UPCYCLE_TASK_DELAY_S"] = str(delay)
    return env


def _start(sessions: list[int], log: Path, *args: str | Path, delay: float | None = None) -> subprocess.Popen:
    with log.open("w") as f:
        proc = subprocess.Popen(
            [str(UPMOE), "upcycle", *map(str, args)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(delay),
            start_new_session=True,
        )
    sessions.append(proc.pid)
    return proc


def _run(sessions: list[int], log: Path, *args: str | Path, timeout: float = 240) -> str:
    proc = _start(sessions, log, *args)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill_session(proc.pid)  # Ray normally stops with its driver; make sure
    assert rc == 0, f"upmoe upcycle {args} failed with {rc}:\n{log.read_text()[-4000:]}"
    return log.read_text()


def _recorded_shards(out: Path) -> int:
    try:
        return len(json.loads((partial_dir(out) / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_resume_after_kill_reuses_shards_and_matches_an_uninterrupted_run(
    qwen2_six_layers: Path, tmp_path: Path, sessions: list[int]
) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    proc = _start(sessions, tmp_path / "killed.log", qwen2_six_layers, out, *FLAGS, delay=1.5)
    deadline = time.monotonic() + 180
    while _recorded_shards(out) < 2:
        assert proc.poll() is None, f"the job ended before it was killed:\n{(tmp_path / 'killed.log').read_text()}"
        assert time.monotonic() < deadline, "no 2 shards recorded within 180 s"
        time.sleep(0.05)
    _kill_session(proc.pid)
    proc.wait(timeout=30)

    recorded = _recorded_shards(out)
    assert 2 <= recorded < 7, f"{recorded} of 7 shards recorded: the kill came too late to test anything"
    assert not out.exists(), "a killed run left something at OUT_DIR"
    assert partial_dir(out).is_dir()

    log = _run(sessions, tmp_path / "resumed.log", qwen2_six_layers, out, *FLAGS, "--resume", "--json")
    rep = report(out)
    assert rep["reused_shards"] >= 2 and rep["reused_shards"] == recorded
    assert f"resume: reusing {recorded} verified shard(s), computing {7 - recorded}" in log
    assert not partial_dir(out).exists() and not (out / MANIFEST).exists()

    _run(sessions, tmp_path / "ref.log", qwen2_six_layers, ref, *FLAGS)
    assert report(ref)["reused_shards"] == 0
    resumed, uninterrupted = files_except_report(out), files_except_report(ref)
    assert sorted(resumed) == sorted(uninterrupted)
    for name in resumed:
        assert resumed[name] == uninterrupted[name], f"{name} differs between the resumed and an uninterrupted run"
