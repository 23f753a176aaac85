"""The peak of this process's anonymous memory over a block of code, for measurements in a fresh process.

The kernel keeps no peak of anonymous memory alone (VmHWM also counts mapped files, which are reclaimable
and not the code's), so a thread samples ``RssAnon`` while the block runs. Kept free of heavy imports: a
measuring process imports it before anything it measures.
"""

from __future__ import annotations

import threading


def anon_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


class AnonPeak:
    """``with AnonPeak() as p: ...``, then ``p.bytes``: the block's peak above what the process held before."""

    def __init__(self, interval_s: float = 0.0002) -> None:
        self.interval_s = interval_s
        self.bytes = 0
        self._peak = self._before = 0
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, anon_kib())
            self._done.wait(self.interval_s)

    def __enter__(self) -> AnonPeak:
        self._before = anon_kib()
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._watcher.join()
        self.bytes = (max(self._peak, anon_kib()) - self._before) * 1024
