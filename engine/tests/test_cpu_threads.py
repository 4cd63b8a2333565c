"""The engine runs a CPU step on the cores that other work leaves free (loraforge_engine/cpu_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import of_kind, run_train
from loraforge_engine import cpu_threads
from loraforge_engine.cpu_threads import CoreShare, threads_for


@pytest.mark.parametrize("others,cores,threads", [
    (0.0, 2, 2), (0.4, 2, 2),   # a daemon's blip does not cost a thread
    (0.6, 2, 1), (1.0, 2, 1), (2.0, 2, 1), (5.0, 2, 1),  # never fewer than one
    (0.0, 16, 16), (3.2, 16, 13), (15.9, 16, 1),
])
def test_threads_are_the_cores_left_free(others, cores, threads):
    assert threads_for(others, cores) == threads


class Counters:
    """Stand-in for the kernel's counters (/proc/stat, /proc/self/stat): ticks advanced by hand."""

    def __init__(self, cores: int):
        self.t, self.busy, self.all, self.own = 0.0, [0] * cores, [0] * cores, 0

    def advance(self, seconds: float, others_busy: float, own_busy: float = 1.0, hz: int = 100):
        """`seconds` pass; other work keeps `others_busy` cores busy, this process `own_busy`."""
        self.t += seconds
        ticks = int(seconds * hz)
        for c in range(len(self.all)):
            self.all[c] += ticks
            self.busy[c] += round(ticks * (others_busy + own_busy) / len(self.all))
        self.own += round(ticks * own_busy)

    def share(self, max_threads: int) -> CoreShare:
        return CoreShare(max_threads, clock=lambda: self.t,
                         read_cores=lambda: {c: (self.busy[c], self.all[c]) for c in range(len(self.all))},
                         read_own=lambda: self.own, cpus=set(range(len(self.all))))


def test_a_busy_neighbour_takes_threads_away_at_once_and_they_come_back_after_two_quiet_looks():
    k = Counters(2)
    share = k.share(2)
    k.advance(0.5, others_busy=1.0)
    assert share.look() is None  # less than LOOK_EVERY_S since the last reading
    k.advance(0.6, others_busy=1.0)
    assert share.look() == 1 and share.threads == 1
    k.advance(1.25, others_busy=1.0, own_busy=1.0)
    assert share.look() is None  # unchanged
    k.advance(1.25, others_busy=0.0)
    assert share.look() is None  # one quiet look is not enough to go back up
    k.advance(1.25, others_busy=0.0)
    assert share.look() == 2
    k.advance(1.25, others_busy=0.0, own_busy=2.0)  # our own threads never count as other work
    assert share.look() is None and share.threads == 2


def test_the_count_never_exceeds_what_the_engine_started_with():
    k = Counters(4)
    share = k.share(2)  # e.g. OMP_NUM_THREADS=2 on a 4-core machine
    assert share.max_threads == 2
    for _ in range(3):
        k.advance(1.25, others_busy=0.0)
        assert share.look() is None


def test_the_real_counters_see_busy_processes_beside_this_one():
    cores = len(os.sched_getaffinity(0))
    share = CoreShare(cores)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(cpu_threads.LOOK_EVERY_S + 0.5)
        assert share.look() == 1
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_the_engines_own_helper_processes_are_not_other_work():
    """The base-model hash runs in an idle-priority child: its CPU time counts as the engine's own while it runs
    (named by `helpers`) and once it has been waited for, so no window in between sees it as other work."""
    def child_ticks(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 60
        while child_ticks(busy.pid) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        alone = cpu_threads._read_own_ticks()
        with_helper = cpu_threads._read_own_ticks(lambda: [busy.pid])
        assert with_helper - alone >= 10
    finally:
        busy.kill()
        busy.wait()
    assert cpu_threads._read_own_ticks() - alone >= 10  # waited for: in this process's children's share


def test_a_fixed_count_turns_the_sharing_off():
    assert cpu_threads.core_share(2, environ={"LORAFORGE_CPU_THREADS": "2"}) is None
    assert cpu_threads.fixed_threads({"LORAFORGE_CPU_THREADS": "3"}) == 3
    assert cpu_threads.fixed_threads({}) is None
    with pytest.raises(ValueError, match="LORAFORGE_CPU_THREADS"):
        cpu_threads.fixed_threads({"LORAFORGE_CPU_THREADS": "many"})


def test_a_training_run_gives_way_to_busy_processes(tiny_model, dataset, tmp_path):
    cores = len(os.sched_getaffinity(0))
    spec = {"baseModel": str(tiny_model), "datasetDir": str(dataset), "resolution": 64, "trainBatchSize": 4,
            "maxTrainSteps": 60, "seed": 1, "centerCrop": True}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        code, events, err = run_train(spec, tmp_path / "o", share_cores=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert code == 0, err[-2000:]
    logs = [log.message for log in of_kind(events, "log")]
    assert any(m.startswith("training on 1 CPU thread:") for m in logs), logs
