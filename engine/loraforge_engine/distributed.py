"""Data-parallel training of one job on N devices of one worker (spec.num_devices > 1).

The worker still starts one engine process per job. With num_devices > 1 that process becomes a launcher
(`launch`): it starts N rank processes, each the same `train` command with LORAFORGE_RANK/LORAFORGE_WORLD_SIZE
(and torch's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) in its environment, on loopback with a free port; gloo
between CPU ranks, NCCL between CUDA ranks (one visible GPU each). The launcher is our own ~150 lines of
subprocess rather than torchrun/elastic or torch.multiprocessing because it must keep the engine's contract with
the worker: only rank 0's events reach stdout (the launcher forwards them and holds back the final state until
every rank has ended), SIGTERM reaches every rank, the exit code keeps its meaning, and a dead rank ends the job
at once (elastic would restart or wait for the group; mp.spawn shares one stdout among the ranks).

In each rank (`Group`): every global batch of train_batch_size × N samples is drawn exactly as one process with
that batch size draws it (same ids, same VAE sample, noise and timesteps, drawn for the whole batch and sliced),
and rank r trains on its contiguous slice. The loss of a slice is the sum of its per-sample losses over the
global batch's size, and the LoRA gradients are summed across ranks once per optimizer step (one all_reduce of
the flattened gradients after accumulation: LoRA gradients are a few MB, so one collective beats DDP's
per-bucket hooks, and a rank whose slice of a short last batch is empty simply adds zeros). So N ranks × batch
B compute the gradient of 1 × batch N·B up to float rounding. Ranks agree on a stop request with a collective
before each step, so they stop after the same step and rank 0 saves the checkpoint; only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .config import SpecError
from .events import EventWriter, note

RANK_ENV, WORLD_ENV, CPUS_ENV = "LORAFORGE_RANK", "LORAFORGE_WORLD_SIZE", "LORAFORGE_RANK_CPUS"
TIMEOUT_ENV = "LORAFORGE_DIST_TIMEOUT_S"
# A collective waits this long for a peer before it fails: long enough for rank 0's validation images and
# checkpoint (the other ranks wait for it at the next step), short enough that a stuck peer ends the job.
DEFAULT_TIMEOUT_S = 1800.0
# After one rank fails, the others get this long to end on their own (they fail the same way, or their next
# collective notices the lost peer) before the launcher kills them.
GRACE_S = 10.0
# The engine's exit code when a rank died (killed by a signal): the worker retries the job, which resumes from
# its last checkpoint. 0-4 are __main__'s.
EXIT_RANK_LOST = 5


def in_rank(environ=os.environ) -> bool:
    """Whether this process is one rank of a launched group (not the launcher, not a single-process run)."""
    return bool(environ.get(RANK_ENV))


def enter_rank(environ=os.environ) -> None:
    """A rank's first act: run on its share of the cores (the launcher's LORAFORGE_RANK_CPUS), before torch starts
    its thread pool."""
    cpus = environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except (OSError, ValueError):
            pass  # a restricted container: run where the launcher runs


# ------------------------------------------------------------------------------------------------ the ranks


class Group:
    """This process's place in the data-parallel group: rank 0 of 1 for an ordinary run."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.started = False

    @classmethod
    def from_env(cls, environ=os.environ) -> Group:
        if not in_rank(environ):
            return cls()
        return cls(int(environ[RANK_ENV]), int(environ[WORLD_ENV]))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, spec):
        """The device this rank trains on, from spec.device_kind: CPU even where CUDA exists; CUDA (GPU number
        `rank` of the visible ones) or a SpecError when there are too few; unspecified: CUDA if present."""
        import torch

        kind = spec.device_kind or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cpu":
            return torch.device("cpu")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = self.world
        if visible < need:
            seen = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""
            raise SpecError([("device_kind" if visible == 0 else "num_devices",
                              f"the job needs {need} CUDA device{'s' if need > 1 else ''}; this worker sees "
                              f"{visible}{where}")])
        torch.cuda.set_device(self.rank)
        return torch.device("cuda", self.rank)

    def start(self, device) -> None:
        """Join the group (rank 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT): NCCL on CUDA, gloo on CPU."""
        if self.world == 1:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=self.rank, world_size=self.world, timeout=timeout,
                                    device_id=device)
        else:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timeout)
        self.started = True

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of n samples (empty where n < world)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum_gradients(self, params: list, *scalars: float) -> list[float]:
        """Sum the parameters' gradients (None counts as zeros) and `scalars` across ranks, in one all_reduce;
        return the summed scalars. Every rank then holds the same gradients."""
        if self.world == 1:
            return list(scalars)
        import torch
        import torch.distributed as dist

        device = params[0].device
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        flat = torch.cat([*parts, torch.tensor(scalars, dtype=torch.float32, device=device)])
        dist.all_reduce(flat)
        at = 0
        for p in params:
            n = p.numel()
            summed = flat[at:at + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            at += n
        return flat[at:].tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a collective: every rank must call it at the same point)."""
        if self.world == 1:
            return bool(flag)
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, value: int) -> int:
        """Rank 0's `value` on every rank (a seed drawn at random must be one seed for the whole group)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def broadcast(self, tensors: list) -> None:
        """Rank 0's values of `tensors` on every rank (the start of training: equal LoRA weights everywhere)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)

    def _collective_device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend() == "nccl" else torch.device("cpu")

    def backend(self) -> str | None:
        if not self.started:
            return None
        import torch.distributed as dist

        return dist.get_backend()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False


class RankEvents(EventWriter):
    """The events of a rank other than 0: warnings and errors go to stderr (prefixed with the rank) and, with its
    FAILED state, to its stdout, which the launcher reads to say why a rank failed; nothing else is written."""

    def __init__(self, out, rank: int):
        super().__init__(out)
        self.rank = rank

    def emit(self, event) -> None:
        kind = event.WhichOneof("payload")
        if kind == "state" or (kind == "log" and event.log.level >= 3):  # LOG_LEVEL_WARNING and above
            super().emit(event)

    def log(self, level: str, message: str) -> None:
        if level in ("warning", "error"):
            from .contract import job_pb2
            from .events import LEVELS

            super().emit(job_pb2.JobEvent(log=job_pb2.LogLine(level=LEVELS[level], message=message)))
            note(f"[loraforge rank {self.rank}] {level.upper()}: {message}")

    def dataset_report(self, report) -> None:
        pass

    def checkpoint(self, *args, **kwargs) -> None:
        pass

    def validation(self, *args, **kwargs) -> None:
        pass

    def succeeded(self, *args, **kwargs) -> None:
        pass


# ------------------------------------------------------------------------------------------------ the launcher


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_shares(cpus: list[int], world: int) -> list[list[int]] | None:
    """Disjoint, contiguous slices of `cpus`, one per rank (as even as can be), or None with fewer cores than ranks."""
    if len(cpus) < world:
        return None
    return [cpus[r * len(cpus) // world:(r + 1) * len(cpus) // world] for r in range(world)]


@dataclass
class _Rank:
    index: int
    proc: subprocess.Popen
    state: str | None = None  # the last "state" event line it wrote (rank 0: held back until the end)
    failure: dict | None = None  # its FAILED state's error (google.rpc.Status as JSON)
    errors: list[str] = field(default_factory=list)  # its ERROR log messages
    killed_by_us: bool = False
    ended_at: float | None = None


def _read_events(rank: _Rank, events: EventWriter) -> None:
    """A rank's stdout: rank 0's events are forwarded, except its state (held back until every rank has ended);
    every rank's failure and error logs are kept to explain a failed run."""
    for line in rank.proc.stdout:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            note(f"[loraforge] rank {rank.index} wrote a line that is not an event: {line[:200]}")
            continue
        if "state" in ev:
            rank.state = line
            if ev["state"].get("error"):
                rank.failure = ev["state"]["error"]
            continue
        if ev.get("log", {}).get("level") == "LOG_LEVEL_ERROR":
            rank.errors.append(ev["log"].get("message", ""))
        if rank.index == 0:
            events.forward(line)


def launch(spec, spec_text: str, output_dir: str, resume_from: str | None, events: EventWriter) -> int:
    """Run `train` as spec.num_devices rank processes and wait for them; return the engine's exit code (0 done, 1-3
    as a single process's, 4 stopped, EXIT_RANK_LOST when a rank died). SIGTERM/SIGINT are passed to every rank."""
    from .__main__ import EXIT_DATA, EXIT_ERROR, EXIT_OK, EXIT_SPEC, EXIT_STOPPED
    from .events import FAILED_PRECONDITION, INTERNAL, INVALID_ARGUMENT

    world = spec.num_devices
    port = free_port()
    base = dict(os.environ)
    base.update({WORLD_ENV: str(world), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "LORAFORGE_SUPERVISOR_PID": str(os.getpid())})
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: the ranks never leave this machine
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    shares = cpu_shares(cpus, world)
    fixed = base.get("LORAFORGE_CPU_THREADS")
    if shares is None:
        events.log("warning", f"{world} ranks share {len(cpus)} CPU core{'s' if len(cpus) > 1 else ''}: one thread each")
    cmd = [sys.executable, "-m", "loraforge_engine", "train", "--spec", "-", "--output-dir", output_dir]
    if resume_from:
        cmd += ["--resume-from", resume_from]

    ranks: list[_Rank] = []
    readers: list[threading.Thread] = []
    relayed: list[int] = []

    def relay(signum, _frame=None) -> None:
        relayed.append(signum)
        for r in ranks:
            if r.proc.returncode is None:
                try:
                    os.kill(r.proc.pid, signum)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)

    for r in range(world):
        env = dict(base, **{RANK_ENV: str(r), "RANK": str(r), "LOCAL_RANK": str(r)})
        if shares is not None:
            env[CPUS_ENV] = ",".join(map(str, shares[r]))
        if fixed and fixed.isdigit():
            env["LORAFORGE_CPU_THREADS"] = str(max(1, int(fixed) // world))  # the fixed count, divided
        elif shares is None:
            env["LORAFORGE_CPU_THREADS"] = "1"
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                encoding="utf-8")
        rank = _Rank(r, proc)
        ranks.append(rank)
        readers.append(threading.Thread(target=_read_events, args=(rank, events), daemon=True))
        readers[-1].start()
        proc.stdin.write(spec_text)
        proc.stdin.close()
    if relayed:  # a stop asked for while the ranks were starting
        relay(relayed[-1])
    how = "gloo between CPU processes" if spec.device_kind == "cpu" else "NCCL between GPUs, else gloo on CPU"
    events.log("info", f"data parallel: {world} ranks (pids {', '.join(str(r.proc.pid) for r in ranks)}; "
                       f"{how}); effective batch {spec.train_batch_size} per device x {world} devices x "
                       f"{spec.gradient_accumulation_steps} accumulation = "
                       f"{spec.train_batch_size * world * spec.gradient_accumulation_steps}")

    def stopped(returncode: int) -> int:
        """A rank that a relayed stop signal caught before its handler was installed (still starting) stopped."""
        return EXIT_STOPPED if relayed and returncode in (-signal.SIGTERM, -signal.SIGINT) else returncode

    # Wait for every rank; after the first failure, the rest get GRACE_S to end on their own, then SIGKILL.
    failed_at = None
    while any(r.proc.returncode is None for r in ranks):
        for r in ranks:
            if r.proc.returncode is None and r.proc.poll() is not None:
                r.ended_at = time.monotonic()
                if stopped(r.proc.returncode) not in (EXIT_OK, EXIT_STOPPED) and failed_at is None:
                    failed_at = r.ended_at
                    note(f"[loraforge] rank {r.index} (pid {r.proc.pid}) ended with "
                         f"{_ending(r.proc.returncode)}; stopping the other ranks")
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for r in ranks:
                if r.proc.returncode is None:
                    r.killed_by_us = True
                    r.proc.kill()
        time.sleep(0.05)
    for t in readers:  # the rest of each rank's stdout (a grandchild holding the pipe must not block us)
        t.join(timeout=5)

    codes = [stopped(r.proc.returncode) for r in ranks]
    if all(c == EXIT_OK for c in codes) and ranks[0].state:
        events.forward(ranks[0].state)
        return EXIT_OK
    if all(c in (EXIT_OK, EXIT_STOPPED) for c in codes):
        return EXIT_STOPPED
    lost = [r for r, c in zip(ranks, codes) if c < 0 and not r.killed_by_us]
    if lost:
        names = "; ".join(f"rank {r.index} of {world} (pid {r.proc.pid}) was killed by "
                          f"{signal.Signals(-r.proc.returncode).name}" for r in lost)
        message = (f"{names}; the other ranks were stopped, and a retry resumes from the last checkpoint")
        events.log("error", message)
        events.failed(14, message)  # UNAVAILABLE: the worker retries this exit code
        return EXIT_RANK_LOST
    # The cause: a spec or data error (every rank meets it; rank 0's report is the one to pass on), else the rank
    # that failed first (the others most likely failed on the collective it left).
    bad = [r for r, c in zip(ranks, codes) if c not in (EXIT_OK, EXIT_STOPPED) and not r.killed_by_us]
    bad.sort(key=lambda r: (r.proc.returncode not in (EXIT_SPEC, EXIT_DATA), r.ended_at or 0, r.index))
    cause = bad[0] if bad else next(r for r in ranks if r.killed_by_us)
    code = cause.proc.returncode if cause.proc.returncode in (EXIT_SPEC, EXIT_DATA, EXIT_ERROR) else EXIT_ERROR
    if cause.index == 0 and cause.state:
        events.forward(cause.state)
        return code
    reason = (cause.failure or {}).get("message") or (cause.errors[-1] if cause.errors else
                                                       f"it ended with {_ending(cause.proc.returncode)}")
    rpc = (cause.failure or {}).get("code") or {EXIT_SPEC: INVALID_ARGUMENT, EXIT_DATA: FAILED_PRECONDITION}.get(
        code, INTERNAL)
    message = f"rank {cause.index} of {world} failed: {reason}"
    events.log("error", message)
    events.failed(int(rpc), message)
    return code


def _ending(returncode: int) -> str:
    return f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
