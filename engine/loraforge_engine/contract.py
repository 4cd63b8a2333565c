"""The contract's generated Python messages, and the validator of its rules: every engine module takes them from here.

engine/gen holds protoc's output for proto/ (loraforge.v1 and its dependencies buf.validate, google.api,
google.rpc); `npm run generate` rewrites it, nobody edits it. This is the one place that puts it on sys.path.
protovalidate itself imports buf.validate from there, so it is imported after the path is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

GEN_DIR = str(Path(__file__).resolve().parents[1] / "gen")
if GEN_DIR not in sys.path:
    sys.path.insert(0, GEN_DIR)

from google.protobuf import json_format  # noqa: E402
from google.rpc import status_pb2  # noqa: E402
from loraforge.v1 import job_pb2, training_spec_pb2  # noqa: E402

__all__ = ["GEN_DIR", "json_format", "job_pb2", "status_pb2", "training_spec_pb2", "validator"]

_validator = None


def validator():
    """protovalidate's Validator, made on first use (it compiles each message's rules once and keeps them)."""
    global _validator
    if _validator is None:
        import protovalidate

        _validator = protovalidate.Validator()
    return _validator
