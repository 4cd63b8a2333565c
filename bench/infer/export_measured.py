"""Exports a model to ONNX the way the server does (`python -m loraforge_engine export-onnx`, a child process)
and measures it from outside: wall time and the exporter's peak RSS (getrusage of the waited-for child).
Prints one JSON object on stdout: {"dir", "seconds", "peak_rss_bytes", "date"}; the exporter's log goes to stderr.

    python bench/infer/export_measured.py MODEL_DIR OUT_ROOT [--dtype fp32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    a = p.parse_args()
    # The engine first; a PYTHONPATH already set (wheels carried to a device machine) stays after it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "engine"), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "loraforge_engine", "export-onnx", a.model, "--out", a.out, "--dtype", a.dtype],
                       env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"the exporter failed (exit {r.returncode})")
    # ru_maxrss of the children waited for: this process has only the one child (kilobytes on Linux).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out_dir = json.loads(r.stdout.strip().split("\n")[-1])["dir"]
    print(json.dumps({"dir": out_dir, "seconds": seconds, "peak_rss_bytes": peak,
                      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}))


if __name__ == "__main__":
    main()
