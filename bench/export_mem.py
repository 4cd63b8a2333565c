"""Peak memory and time of the ONNX export, measured on a model made by bench/models.py.

    PYTHONPATH=engine engine/.venv/bin/python bench/export_mem.py --model sd15 --work /tmp/bench-export
        [--dtype fp32|fp16] [--no-check] [--engine DIR] [--phases]

Runs `python -m loraforge_engine export-onnx` as the server does, into a fresh cache folder, and reports:
the model's fp32 size (every weight of the components the export loads, counted from the safetensors headers as
float32), the export's peak resident memory (the child's ru_maxrss from wait4), their ratio, and the wall time.
--phases also prints, at each of the exporter's progress lines, the peak so far (VmHWM) and the resident memory
then (anonymous and file-backed), to see which step sets the peak.
--engine runs another checkout's engine folder (to compare with an older exporter on the same model).
The last line is a Markdown row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")


def fp32_bytes(model_dir: Path) -> dict[str, int]:
    """Per component: its floating-point weights' size in float32 (from the safetensors headers, no loading)."""
    out = {}
    for part in PARTS:
        total = 0
        for f in sorted((model_dir / part).glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                numel = 1
                for d in t["shape"]:
                    numel *= d
                total += numel * (4 if t["dtype"] in ("F64", "F32", "F16", "BF16") else ELEMENT_BYTES[t["dtype"]])
        if total:
            out[part] = total
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak so far), VmRSS (now) and its anonymous / file-backed parts, from /proc/PID/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, sd15 or sdxl (bench/models.py)")
    ap.add_argument("--work", default="/tmp/bench-export", help="where the model is made (once) and exported")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--no-check", action="store_true", help="pass --no-check to the exporter")
    ap.add_argument("--engine", default=str(ROOT / "engine"), help="the engine folder to run (default: this one)")
    ap.add_argument("--phases", action="store_true", help="print the peak so far at each progress line")
    args = ap.parse_args()

    work = Path(args.work)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "engine"), HF_HUB_OFFLINE="1")
    made = subprocess.run([sys.executable, str(ROOT / "bench" / "models.py"), args.model, str(work)], env=env,
                          capture_output=True, text=True)
    if made.returncode != 0:
        sys.stderr.write(made.stderr)
        return made.returncode
    model = Path(made.stdout.strip().splitlines()[-1])
    sizes = fp32_bytes(model)
    total = sum(sizes.values())
    print(f"model {model}: fp32 size {gib(total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in sizes.items()) + ")")

    out = work / f"onnx-bench-{args.model}-{args.dtype}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh export every run
    cmd = [sys.executable, "-m", "loraforge_engine", "export-onnx", str(model), "--out", str(out), "--dtype", args.dtype]
    if args.no_check:
        cmd.append("--no-check")
    child_env = dict(env, PYTHONPATH=args.engine)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    for line in proc.stderr:
        line = line.rstrip("\n")
        tail = (tail + [line])[-20:]
        if args.phases and (line.startswith("progress") or line.startswith("exporting")):
            m = {k: gib(v * 1024) for k, v in memory_kib(proc.pid).items()}
            print(f"  {time.perf_counter() - t0:6.1f} s  peak {m.get('VmHWM', '?'):>9}  now {m.get('VmRSS', '?'):>9} "
                  f"(anon {m.get('RssAnon', '?'):>9}, file {m.get('RssFile', '?'):>9})  {line}", flush=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        print("\n".join(tail), file=sys.stderr)
        print(f"export failed (exit {code})", file=sys.stderr)
        return 1
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    export_dir = Path(json.loads(stdout.strip().splitlines()[-1])["dir"])
    on_disk = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file())
    print(f"export: {seconds:.0f} s, peak RSS {gib(peak)} = {peak / total:.2f}x the fp32 size; {gib(on_disk)} on disk "
          f"in {export_dir}")
    shown = " ".join(["bench/export_mem.py", "--model", args.model, "--dtype", args.dtype]
                     + (["--no-check"] if args.no_check else []))
    print(f"| {args.model} | {args.dtype} | {gib(total)} | {gib(peak)} | {peak / total:.2f}x | {seconds:.0f} s | `{shown}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
