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

STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # read by Ray's job supervisor, from the job's runtime_env
STOP_WAIT_S = 600  # how long Ray waits for a stopped training job to checkpoint before killing it


class StopFlag:
    """Held by a zero-CPU Ray actor (``start_stop_flag``)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def start_stop_flag() -> Any:
    """The flag's actor. Ray is imported here, not at module level: ``upmoe submit`` reads this module's constants
    and should not load Ray's core for them."""
    import ray

    return ray.remote(num_cpus=0)(StopFlag).remote()


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
            if handler is not None:  # None: installed outside Python, nothing to restore
                signal.signal(s, handler)


class StopPoll:
    """Rank 0's view of the flag, refreshed without blocking the step: one actor call in flight at a time, so
    a stop is seen a step or so after the signal, and a step never waits on the actor."""

    def __init__(self, flag: Any) -> None:
        self.flag, self.pending, self.asked = flag, None, False

    def asked_now(self) -> bool:
        import ray

        if self.pending is None:
            self.pending = self.flag.is_set.remote()
        ready, _ = ray.wait([self.pending], timeout=0)
        if ready:
            self.asked, self.pending = bool(ray.get(self.pending)), None
        return self.asked
