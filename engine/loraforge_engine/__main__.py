"""Command line: python -m loraforge_engine {train, model-hash, devices, export-onnx, make-tiny-model, make-dataset}.

`train` speaks to its supervisor through stdout (JobEvents, one JSON per line) and the exit code:
0 success, 2 invalid spec, 3 bad data, 4 stopped by SIGTERM/SIGINT, 5 a data-parallel rank died (retryable: the
job resumes from its last checkpoint; distributed.py), 1 anything else. Before exiting 1, 2 or 3
it emits a LOG_LEVEL_ERROR event with a one-line reason and a FAILED state whose error is a google.rpc.Status
(INTERNAL, INVALID_ARGUMENT, FAILED_PRECONDITION); tracebacks go to stderr.
`model-hash` prints a base model's identity (fingerprint.py). Imports stay inside the commands: `model-hash`
must not pay for torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_DATA, EXIT_STOPPED = 0, 1, 2, 3, 4


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


class StopOnSignal:
    """SIGTERM/SIGINT handling for `train`: the first signal asks the training loop to finish its step, save a
    checkpoint and stop (`is_set()` is what the loop polls); a signal again, AGAIN_AFTER_S or more after the
    first, exits at once without a checkpoint.

    The handler takes no lock: it runs between any two bytecodes of the main thread, and a second signal may
    run it again inside the first. threading.Event.set takes a lock, and when a Node worker is killed with -9
    the kernel sends its engine two SIGTERMs 0.4 ms apart: the nested handler waited forever for the lock its
    outer call held (an orphaned engine hung in CI). Signals closer together than AGAIN_AFTER_S are one request
    (that same burst), not a user's second Ctrl-C."""

    AGAIN_AFTER_S = 1.0

    def __init__(self, events, exit_now=os._exit, clock=None):
        import time

        from .events import note

        self._events, self._exit_now, self._clock = events, exit_now, clock or time.monotonic
        self._note = note  # imported here: the handler imports nothing (the import system has its own locks)
        self._first: float | None = None  # when the first signal came (clock seconds)

    def is_set(self) -> bool:
        return self._first is not None

    def handle(self, signum: int, _frame=None) -> None:
        name = signal.Signals(signum).name
        now = self._clock()
        if self._first is None:
            self._first = now
            self._note(f"[loraforge] {name}: finishing the current step, then saving a checkpoint")
        elif now - self._first >= self.AGAIN_AFTER_S:
            try:
                self._events.log("error", f"{name} received again; exiting without a checkpoint")
            finally:  # exit even if the log could not be written
                self._exit_now(EXIT_STOPPED)


def _fail(events, code: int, message: str) -> None:
    """Report a failure: an ERROR log line for people, a FAILED state with a google.rpc.Status for the worker."""
    events.log("error", message)
    events.failed(code, message)


def _train(args, events) -> int:
    from .events import FAILED_PRECONDITION, INTERNAL, INVALID_ARGUMENT, note

    stop = StopOnSignal(events)
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
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
        _fail(events, INVALID_ARGUMENT, f"invalid spec: {e}")
        return EXIT_SPEC
    except OSError as e:
        _fail(events, INVALID_ARGUMENT, f"cannot read spec {args.spec!r}: {e.strerror or e}")
        return EXIT_SPEC

    from . import distributed

    if distributed.in_rank():  # one rank of a data-parallel run: only rank 0 reports events
        distributed.enter_rank()
        rank = distributed.Group.from_env().rank
        if rank != 0:
            events = distributed.RankEvents(events.stream, rank)
    elif spec.num_devices > 1:  # data parallel: this process launches the ranks (distributed.py)
        return distributed.launch(spec, text, args.output_dir, args.resume_from, events)

    try:
        _quiet_libraries()
        from .data import DataError
        from .train import Stopped, run
    except Exception as e:
        note(traceback.format_exc().rstrip())
        _fail(events, INTERNAL, f"engine failed to start: {type(e).__name__}: {e}")
        return EXIT_ERROR

    try:
        lora, final_step = run(spec, args.output_dir, events, stop, resume_from=args.resume_from)
    except Stopped:
        return EXIT_STOPPED
    except SpecError as e:  # a spec this model or device cannot honour (e.g. 8-bit AdamW without CUDA)
        _fail(events, INVALID_ARGUMENT, f"invalid spec: {e}")
        return EXIT_SPEC
    except DataError as e:
        note(traceback.format_exc().rstrip())
        _fail(events, FAILED_PRECONDITION, str(e))
        return EXIT_DATA
    except BaseException as e:  # noqa: BLE001 - the supervisor needs a reason for anything
        note(traceback.format_exc().rstrip())
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(events, INTERNAL, f"training failed: {type(e).__name__}{': ' + first if first else ''}")
        return EXIT_ERROR

    events.succeeded(lora, final_step, root=args.output_dir)
    return EXIT_OK


def cmd_model_hash(args) -> int:
    from .confined import pinned_model
    from .data import DataError
    from .fingerprint import model_hash

    try:
        folder, _ = pinned_model(args.model_dir)  # with data roots: only files inside them are read
        digest = model_hash(folder)
    except (OSError, DataError) as e:
        print(f"model-hash: {e}", file=sys.stderr, flush=True)
        return EXIT_SPEC
    print(digest, flush=True)
    return EXIT_OK


def cmd_devices(args) -> int:
    from .devices import detect

    print(json.dumps(detect()), flush=True)
    return EXIT_OK


def cmd_make_tiny_model(args) -> int:
    _quiet_libraries()
    from .tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, arch=args.arch)
    print(path, file=sys.stderr)
    return EXIT_OK


def cmd_make_dataset(args) -> int:
    from .tiny import make_dataset

    path = make_dataset(args.dir, count=args.count, size=args.size, seed=args.seed, fmt=args.format,
                        mixed=args.mixed)
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

    p = sub.add_parser("model-hash", help="print a base model's identity: the content hash that LoRA files record "
                                          "and the ONNX export cache uses (fast: no torch)")
    p.add_argument("model_dir", help="diffusers-layout model folder")
    p.set_defaults(func=cmd_model_hash)

    p = sub.add_parser("devices", help="print this host's training devices as JSON: kind (cuda or cpu), count, "
                                       "memory_mb per device (what a worker advertises; devices.py)")
    p.set_defaults(func=cmd_devices)

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
    p.add_argument("--mixed", action="store_true",
                   help="mixed sizes and aspect ratios, plus a tiny, a corrupt and (txt) an uncaptioned image")
    p.set_defaults(func=cmd_make_dataset)

    from .onnx_export import add_subcommand as add_export_onnx  # export-onnx: see onnx_export.py

    add_export_onnx(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
