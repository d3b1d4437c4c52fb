"""Peak resident memory per method, from a background thread that samples the process's RSS.

The RSS is the whole process's: the target's weights count for every method, and memory one method freed may still
be held by the allocator while the next one runs. Differences of a few tens of MB between methods mean little.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

INTERVAL = 0.05  # seconds between samples


class PeakMemory:
    """``with sampler.track(): ...`` returns (via ``sampler.last_peak_mb``) the peak RSS seen inside the block."""

    def __init__(self, interval: float = INTERVAL):
        import psutil  # the bench extra; imported here so that the CLI can explain how to install it

        self.process = psutil.Process()
        self.interval = interval
        self.last_peak_mb: float | None = None
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, name="falconspec-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        rss = self.process.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._lock:
            self._peak = 0
        self._sample()
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self.last_peak_mb = self._peak / 2**20
