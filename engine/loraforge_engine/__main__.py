"""Command line: python -m loraforge_engine {train, make-tiny-model, make-dataset}.

`train` speaks to its supervisor through stdout (JobEvents, one JSON per line) and the exit code:
0 success, 2 invalid spec, 3 bad data, 4 stopped by SIGTERM/SIGINT, 1 anything else. Before any non-zero
exit it emits a LOG_LEVEL_ERROR event with a one-line reason; tracebacks go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_DATA, EXIT_STOPPED = 0, 1, 2, 3, 4

from .openmp import set_wait_policy  # noqa: E402 - imports nothing heavy

# Before torch loads OpenMP: idle threads poll briefly, then sleep (see openmp.py).
set_wait_policy()


def _quiet_libraries() -> None:
    """No progress bars, library logging at WARNING, on stderr; never any network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    logging.captureWarnings(True)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _stop_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the supervising worker dies (even by kill -9), so an
    orphaned engine saves a checkpoint and stops instead of training on unsupervised."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    supervisor = os.environ.get("LORAFORGE_SUPERVISOR_PID")
    if supervisor and supervisor.isdigit() and os.getppid() != int(supervisor):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took effect


def cmd_train(args) -> int:
    # Claim stdout before importing anything heavy: from here on only events reach it.
    from .events import EventWriter, claim_stdout

    events_out = claim_stdout()
    try:
        return _train(args, EventWriter(events_out))
    finally:
        events_out.close()


def _train(args, events) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # a second signal: stop now, without a checkpoint
            events.log("error", f"{signal.Signals(signum).name} received again; exiting without a checkpoint")
            os._exit(EXIT_STOPPED)
        stop.set()
        print(f"[loraforge] {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _stop_with_parent()

    from .config import SpecError, load_spec

    try:
        if args.spec == "-":
            text = sys.stdin.read()
        else:
            with open(args.spec, encoding="utf-8") as f:
                text = f.read()
        spec = load_spec(text)
    except SpecError as e:
        events.log("error", f"invalid spec: {e}")
        return EXIT_SPEC
    except OSError as e:
        events.log("error", f"cannot read spec {args.spec!r}: {e.strerror or e}")
        return EXIT_SPEC

    try:
        _quiet_libraries()
        from .data import DataError
        from .train import Stopped, run
    except Exception as e:
        traceback.print_exc()
        events.log("error", f"engine failed to start: {type(e).__name__}: {e}")
        return EXIT_ERROR

    try:
        lora, final_step = run(spec, args.output_dir, events, stop, resume_from=args.resume_from)
    except Stopped:
        return EXIT_STOPPED
    except SpecError as e:  # a spec this model or device cannot honour (e.g. 8-bit AdamW without CUDA)
        events.log("error", f"invalid spec: {e}")
        return EXIT_SPEC
    except DataError as e:
        traceback.print_exc()
        events.log("error", str(e))
        return EXIT_DATA
    except BaseException as e:  # noqa: BLE001 - the supervisor needs a reason for anything
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        events.log("error", f"training failed: {type(e).__name__}{': ' + first if first else ''}")
        return EXIT_ERROR

    events.succeeded(lora, final_step)
    return EXIT_OK


def cmd_make_tiny_model(args) -> int:
    _quiet_libraries()
    from .tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, arch=args.arch)
    print(path, file=sys.stderr)
    return EXIT_OK


def cmd_make_dataset(args) -> int:
    from .tiny import make_dataset

    path = make_dataset(args.dir, count=args.count, size=args.size, seed=args.seed, fmt=args.format)
    print(path, file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge_engine",
                                     description="loraforge training engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA; JobEvents (JSON lines) on stdout")
    p.add_argument("--spec", required=True, help="TrainingSpec as proto3 JSON: a file, or - for stdin")
    p.add_argument("--output-dir", required=True, help="folder for the LoRA, checkpoints/ and validation/")
    p.add_argument("--resume-from", default=None,
                   help="checkpoint folder to resume from, or 'latest' (newest under OUTPUT_DIR/checkpoints)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny-model", help="write a deterministic tiny SD-1.x or SDXL model (diffusers layout)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("sd", "sdxl"), default="sd",
                   help="sd: SD-1.x architecture; sdxl: SDXL (two text encoders, size/crop conditioning)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("make-dataset", help="write a deterministic synthetic captioned image set")
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="shorter image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jsonl", "txt"), default="jsonl")
    p.set_defaults(func=cmd_make_dataset)

    from .onnx_export import add_subcommand as add_export_onnx  # export-onnx: see onnx_export.py

    add_export_onnx(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
