"""How the engine's idle OpenMP threads wait. Call before torch is imported: OpenMP reads it once, at load.

torch's Linux wheels use GNU OpenMP (libgomp), whose idle threads by default poll for 300 000 rounds before
they sleep. On a CPU shared with other busy processes (another job, the server's inference, a test run) those
polling threads took the cores the others needed: tiny-model steps ran 4-40x slower. Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) avoids that, but then every parallel kernel must wake a sleeping thread, which on a
virtual machine costs tens of microseconds, and a small model's step runs hundreds of them. A short poll
before sleeping (GOMP_SPINCOUNT=300) keeps most of both: measured with bench/omp_wait on the 2-core
development machine, 1.20x passive's images/s for one engine alone, 0.90x per process with two engines
training at once (bench/RESULTS.md). An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "300"


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sleep after a short poll, unless the environment already says how OpenMP threads wait."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
