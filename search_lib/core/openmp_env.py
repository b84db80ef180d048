"""How long OpenMP's threads busy-wait at a barrier: bounded, and set before torch loads OpenMP.

torch's CPU kernels run on OpenMP (libgomp), whose threads spin at every barrier before they sleep
(300,000 rounds by default). Alone on its cores that hides the cost of waking a thread, and a training of many
small operations needs it; beside another busy process a spinning thread holds a core the other process's
threads need. The toolkit's own runs do not meet that way: they take turns at the cores step by step
(`search_lib.core.turns`), so the bound is set for a run alone, 10,000 rounds (about 0.2 ms here: at 1,000 a
training epoch alone was 10-20% slower), and still keeps a process from spinning for milliseconds beside
someone else's work. libgomp reads its settings once, when it loads, so the toolkit's packages set the default
on import, before anything imports torch (`search_lib/__init__.py`, `eval_lib/__init__.py`,
`benchmarks/__init__.py`); a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is left as it is. Nothing here
imports anything but ``os``. Measured in docs/benchmarks.md ("A shared box").
"""

from __future__ import annotations

import os

SPIN_ENV = "GOMP_SPINCOUNT"
WAIT_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT = "10000"  # about 0.2 ms here; measured in docs/benchmarks.md ("A shared box")


def bound_spinning(environ: dict | None = None) -> bool:
    """Set GOMP_SPINCOUNT to the toolkit's default unless the user set it or OMP_WAIT_POLICY; True when set.
    It takes effect only when OpenMP has not been loaded yet (the toolkit's packages call it on import)."""
    environ = os.environ if environ is None else environ
    if any(str(environ.get(name, "")).strip() for name in (SPIN_ENV, WAIT_ENV)):
        return False
    environ[SPIN_ENV] = SPIN_COUNT
    return True


def spinning(environ: dict | None = None) -> dict[str, str | None]:
    """The two settings as this process's environment has them (for the run's provenance record)."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) for name in (SPIN_ENV, WAIT_ENV)}
