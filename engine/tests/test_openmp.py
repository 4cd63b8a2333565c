"""The engine's OpenMP wait policy: a short poll, then sleep, unless the operator chose otherwise."""

from __future__ import annotations

import subprocess
import sys

from helpers import engine_env

from loraforge_engine.openmp import SPIN_COUNT, set_wait_policy


def test_default_is_a_short_poll_then_sleep():
    env: dict[str, str] = {}
    set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SPIN_COUNT}


def test_an_operators_setting_is_kept_whole():
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(given)
        set_wait_policy(env)
        assert env == given  # nothing added: a spin count next to ACTIVE would change what the operator asked for


def test_the_engine_command_sets_it_before_torch_loads():
    env = {k: v for k, v in engine_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import runpy, sys; sys.argv = ['loraforge_engine', '--help']\n"
            "try:\n    runpy.run_module('loraforge_engine', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"PASSIVE {SPIN_COUNT} False"
