"""`devices`: what a worker advertises about its host (kind, count, memory per device)."""

from __future__ import annotations

import json
import os
import subprocess

import torch

from helpers import engine_cmd, engine_env


def test_devices_reports_this_host():
    proc = subprocess.run(engine_cmd("devices"), capture_output=True, text=True, env=engine_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"kind", "count", "memory_mb", "names"}
    if torch.cuda.is_available():
        assert out["kind"] == "cuda"
        assert out["count"] == torch.cuda.device_count()
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(out["count"]))
        assert out["memory_mb"] == smallest // (1 << 20)
        assert len(out["names"]) == out["count"]
    else:
        # A CPU host: its usable cores and its total memory.
        assert out == {
            "kind": "cpu",
            "count": len(os.sched_getaffinity(0)),
            "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20),
            "names": [],
        }
