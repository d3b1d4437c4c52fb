"""How much CPU other processes used while a benchmark ran.

Benchmarks and calibration measure speed, so they need to know whether they had the CPU to themselves. The 1-minute
load average, read at a run's start and end, smooths over a minute, counts the benchmark's own threads
and sees nothing of the hours between. Here a daemon thread samples, every ``interval`` seconds, the machine's busy
CPU time (Linux ``/proc/stat``: user, nice, system, irq, softirq and steal, the time a hypervisor gave to other
guests) minus this process's own CPU time (all its threads): the cores that other work kept busy, on average over the
run and in its busiest interval. Where ``/proc/stat`` does not exist it measures nothing and callers fall back to
the load average.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal (guest time is inside user)


def busy_cpu_seconds(stat: Path = PROC_STAT) -> float | None:
    """Seconds the machine's CPUs have spent busy since boot (all cores together), or None without ``/proc/stat``."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    return sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherProcessesLoad:
    """``with OtherProcessesLoad() as load: ...`` then ``load.summary()``: the cores other processes kept busy."""

    def __init__(self, interval: float = 15.0, busy=busy_cpu_seconds, own=own_cpu_seconds, clock=time.monotonic):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval, self._busy, self._own, self._clock = interval, busy, own, clock
        self.samples: list[tuple[float, float]] = []  # (seconds, other processes' CPU seconds) per interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, float, float] | None = None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy()
        return None if busy is None else (self._clock(), busy, self._own())

    def sample(self) -> None:
        """Close the current interval (the thread calls this every ``interval`` seconds)."""
        now = self._read()
        if now is None or self._last is None:
            return
        seconds = now[0] - self._last[0]
        others = (now[1] - self._last[1]) - (now[2] - self._last[2])
        if seconds > 0:
            self.samples.append((seconds, max(others, 0.0)))
        self._last = now

    def __enter__(self) -> "OtherProcessesLoad":
        self._last = self._read()
        if self._last is not None:
            self._thread = threading.Thread(target=self._run, name="other-processes-load", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()

    def summary(self) -> dict | None:
        """``mean_cores`` (other processes' CPU seconds per second of the run), ``max_cores`` (the busiest
        interval's), ``interval_s`` and ``samples``; None where nothing could be measured."""
        if not self.samples:
            return None
        seconds = sum(s for s, _ in self.samples)
        return {"mean_cores": round(sum(o for _, o in self.samples) / seconds, 3),
                "max_cores": round(max(o / s for s, o in self.samples), 3),
                "interval_s": self.interval, "samples": len(self.samples)}


def shared(load: dict, cores: int) -> bool:
    """Was the CPU shared? Other processes kept a quarter of the ``cores`` busy on average, or half of them over one
    sampling interval (``load``: an :meth:`OtherProcessesLoad.summary`)."""
    return load["mean_cores"] >= 0.25 * cores or load["max_cores"] >= 0.5 * cores
