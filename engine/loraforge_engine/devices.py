"""`python -m loraforge_engine devices`: what this host can train on, as one JSON line on stdout.

{"kind": "cuda", "count": 2, "memory_mb": 81559, "names": ["NVIDIA H100 80GB HBM3", ...]} where torch sees
GPUs (memory: the smallest device's total, in MiB, since a job's every device must hold it), else
{"kind": "cpu", "count": <usable cores>, "memory_mb": <host memory total in MiB>, "names": []}.
A worker asks once at start and advertises the answer (server/src/jobs/capabilities.ts).
"""

from __future__ import annotations

import os

MIB = 1 << 20


def cpu_devices() -> dict:
    """The host's usable cores (its CPU affinity, as a container limits it) and total memory."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"kind": "cpu", "count": max(1, cores), "memory_mb": memory // MIB, "names": []}


def detect() -> dict:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return {
            "kind": "cuda",
            "count": len(props),
            "memory_mb": min(p.total_memory for p in props) // MIB,
            "names": [p.name for p in props],
        }
    return cpu_devices()
