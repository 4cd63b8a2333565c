"""Session fixtures: the tiny model and the synthetic data set are built once, through the CLI users run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import engine_cmd, engine_env  # noqa: E402

# A thread count that follows the load (cpu_threads) changes float summation order mid-run, so runs that must
# match bit for bit (resume against an uninterrupted run) would differ on a busy machine. Tests fix the count;
# test_cpu_threads lets it follow the cores on purpose.
os.environ.setdefault("LORAFORGE_CPU_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    subprocess.run(engine_cmd("make-tiny-model", str(path), "--seed", "0"), check=True, env=engine_env(),
                   capture_output=True)
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes"
    subprocess.run(engine_cmd("make-dataset", str(path), "--count", "16", "--size", "64", "--seed", "0"),
                   check=True, env=engine_env(), capture_output=True)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    subprocess.run(engine_cmd("make-tiny-model", str(path), "--seed", "0", "--arch", "sdxl"), check=True,
                   env=engine_env(), capture_output=True)
    return path
