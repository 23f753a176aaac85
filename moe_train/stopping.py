"""Stopping a run without losing it: SIGTERM / Ctrl-C on the driver asks the workers to checkpoint and end.

``ray job stop`` (and so ``upmoe jobs stop``) sends SIGTERM to the driver; Ray Train's workers are actors on other
processes and nodes, which never see it. So the driver's handler sets a flag in a tiny Ray actor, rank 0 reads it
after every step, and all ranks agree on it with one all-reduce: they finish the step in progress, write a
checkpoint and report it, and the driver returns normally. A second signal stops at once (the latest checkpoint
is what remains). Ray SIGKILLs a job ``RAY_JOB_STOP_WAIT_TIME_S`` after the SIGTERM (3 s by default), so
``upmoe submit`` raises that for training jobs (``STOP_WAIT_S``, unless ``--env`` sets it).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray

STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # read by Ray's job supervisor, from the job's runtime_env
STOP_WAIT_S = 600  # how long Ray waits for a stopped training job to checkpoint before killing it


@ray.remote(num_cpus=0)
class StopFlag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@contextlib.contextmanager
def stop_on_signal(flag: Any) -> Iterator[None]:
    """While the block runs, the first SIGTERM/SIGINT sets ``flag``; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    received = []

    def handle(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print(
            f"{signal.Signals(signum).name}: finishing the current step and checkpointing it "
            "(send it again to stop now)",
            file=sys.stderr,
            flush=True,
        )
        flag.set.remote()

    for s in previous:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
