"""Thread settings that keep flexgen-lite a good neighbour on shared cores, applied before torch is loaded.

torch's OpenMP pool (GNU libgomp here; Intel's libiomp in some builds) spin-waits between parallel regions:
by default 300,000 spins in libgomp, 200 ms in libiomp. Alone on the machine that hides the wake-up of its
threads; beside another busy process (or a second run) a spinning thread burns the time slice the thread it
waits for needs, and a decode step of many small regions ran 5-25x slower (issue 24, measured on 2 cores).
Sleeping at once (OMP_WAIT_POLICY=PASSIVE) pays a futex wake-up per region instead. A short spin, about the gap
between a step's regions, keeps most of the first and none of the collapse: measured on 2 shared cores, OPT-125m
bf16 decode of 32 rows took 2.5 s with GOMP_SPINCOUNT=1000, 3.6 s passive, 12.5 s with the default.

libgomp reads its environment once, when torch loads it, so flexgen_lite/__init__ imports this module first;
a program that imported torch before flexgen_lite keeps torch's defaults (`applied` says so). Any of the
variables set by the user is left as it is, and so are the others (GOMP_SPINCOUNT=300000 restores the default).
"""

from __future__ import annotations

import os
import sys

BOUNDED_SPIN = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}  # libgomp: spins; libiomp: milliseconds
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def bound_spin(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Set BOUNDED_SPIN in `environ` unless the user chose a wait policy; what was set."""
    if any(name in environ for name in USER_CHOICES):
        return {}
    environ.update(BOUNDED_SPIN)
    return dict(BOUNDED_SPIN)


def applied() -> bool:
    """Whether torch's OpenMP runs with the bounded spin set before torch loaded, or with the user's choice."""
    return _set_before_torch or (not SET and any(name in os.environ for name in USER_CHOICES))


_torch_loaded = "torch" in sys.modules
SET = bound_spin()
_set_before_torch = bool(SET) and not _torch_loaded
