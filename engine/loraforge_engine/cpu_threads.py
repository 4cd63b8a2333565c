"""How many threads a CPU training step runs on: as many as there are cores that other work leaves free.

torch's Linux wheels use GNU OpenMP, whose idle threads poll for a while before they sleep. That is the fastest
way to wait when the engine has its cores to itself, so the engine leaves OpenMP's wait policy as it is. It is the
worst when other work takes one of the cores: each parallel operator then waits for a thread that has no core,
while its partner polls on the other. So between steps the engine looks at how busy its cores were with work
other than its own (the kernel's per-core counters less the CPU time of the engine and its helper processes) and
runs the next steps on the cores that were free, at least one: a single thread has no partner to wait for.
LORAFORGE_CPU_THREADS=N fixes the count instead.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

ENV = "LORAFORGE_CPU_THREADS"
LOOK_EVERY_S = 1.0  # how often (at most) the counters are read: a window long enough to average bursts
# Other work must fill this much of a core before a thread gives way (a daemon's blip must not move the count).
MARGIN = 0.5


def _read_proc_stat() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, all ticks) since boot, from /proc/stat (steal counts as busy: another guest's)."""
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                cores[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return cores


def _read_own_ticks(helpers: Callable[[], list[int]] = list) -> int:
    """The engine's own CPU time in clock ticks: this process (all its threads), its children it has waited for, and
    the helper processes `helpers()` names that still run (the base-model hash at idle priority: it takes only CPU
    time nothing else wants, so it must not make the engine give up a thread)."""
    def ticks(pid: str, children: bool = False) -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime (fields 14 and 15 of the whole line); cutime, cstime (16 and 17) for waited-for children
        return sum(int(x) for x in fields[11:15 if children else 13])

    total = ticks("self", children=True)
    for pid in helpers():
        try:
            total += ticks(str(pid))
        except (OSError, ValueError, IndexError):
            pass  # it ended: waited for, its time is in this process's children's share above
    return total


def threads_for(others_busy: float, cores: int) -> int:
    """Threads for a step when other work keeps `others_busy` of our `cores` cores busy: the free ones, at least 1."""
    return max(1, min(cores, math.floor(cores - others_busy + (1 - MARGIN))))


class CoreShare:
    """Reads how busy the engine's cores are with other work; `look()` says when the thread count should change."""

    def __init__(self, max_threads: int, clock: Callable[[], float] = time.monotonic,
                 read_cores: Callable[[], dict[int, tuple[int, int]]] = _read_proc_stat,
                 read_own: Callable[[], int] = _read_own_ticks, cpus: set[int] | None = None):
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self.max_threads = max(1, min(max_threads, len(self.cpus)))
        self.threads = self.max_threads
        self._clock, self._read_cores, self._read_own = clock, read_cores, read_own
        self._rise_seen = False  # a higher count is taken only when two looks in a row ask for it
        self._last = self._sample()

    def _sample(self) -> tuple[float, int, int, int]:
        cores = self._read_cores()
        busy = sum(cores[c][0] for c in self.cpus if c in cores)
        total = sum(cores[c][1] for c in self.cpus if c in cores)
        return self._clock(), busy, total, self._read_own()

    def others_busy(self, now: tuple[float, int, int, int]) -> float:
        """Cores' worth of other work since the last sample."""
        _, busy0, total0, own0 = self._last
        _, busy1, total1, own1 = now
        per_core = (total1 - total0) / len(self.cpus)  # ticks that passed on each core
        if per_core <= 0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / per_core

    def look(self) -> int | None:
        """The new thread count when it should change now, else None (also when the last look is too recent)."""
        if self._clock() - self._last[0] < LOOK_EVERY_S:
            return None
        now = self._sample()
        others = self.others_busy(now)
        self._last = now
        wanted = min(self.max_threads, threads_for(others, len(self.cpus)))
        if wanted > self.threads and not self._rise_seen:
            self._rise_seen = True
            return None
        self._rise_seen = False
        if wanted == self.threads:
            return None
        self.threads = wanted
        return wanted


def core_share(max_threads: int, environ=os.environ, helpers: Callable[[], list[int]] = list) -> CoreShare | None:
    """A CoreShare for this process (`helpers`: the pids of its own helper processes, whose CPU time is not other
    work), or None where the count is fixed (LORAFORGE_CPU_THREADS) or the kernel's counters cannot be read (not
    Linux)."""
    if environ.get(ENV):
        return None
    try:
        return CoreShare(max_threads, read_own=lambda: _read_own_ticks(helpers))
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def fixed_threads(environ=os.environ) -> int | None:
    """LORAFORGE_CPU_THREADS as a count, if set (a positive integer)."""
    value = environ.get(ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV} must be a positive integer, not {value!r}")
    return int(value)
