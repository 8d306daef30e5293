"""Training, comparison, memory, spike and speed experiments for optax-ext.

On import (before JAX starts its backend) this turns off XLA's concurrency-optimized CPU
scheduler where the installed jaxlib knows that flag (XLA aborts on unknown flags, so
:func:`xla_flag_known` checks first). It only lowers the odds of one CPU hang: jaxlib's batched
LAPACK calls block an intra-op pool thread while their per-matrix tasks wait for that same pool,
so as many concurrent batched calls as pool threads deadlock. The library itself avoids it: every
decomposition it runs (SOAP, COSMOS, SVD projection bases, SVD polar factors, spectral caps)
goes one matrix per LAPACK call on CPU (optax_ext/kernels/lapack.py), so library users need no
flag; it stays here as a guard for batched decompositions outside the library (test references).
CPU backend only.

It also runs OpenBLAS single-threaded (``OPENBLAS_NUM_THREADS=1`` unless the caller set it).
jaxlib's CPU LAPACK kernels call the OpenBLAS bundled with SciPy, whose own thread pool
busy-waits for work. With several CPU devices (a fake 8-device mesh) each device thread calls
LAPACK at once and their OpenBLAS thread servers spin against each other: on 2 cores a GaLore
step with its SVD refresh took 1 to 16 s from run to run, against 0.7 s single-threaded. XLA
already runs independent operations and devices in parallel, so for the small matrices these
experiments decompose nothing is lost. Set it yourself before importing JAX in code that does
not import this package (see docs/DISTRIBUTED.md).
"""

import functools
import mmap
import os
import pathlib
from importlib import util

_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"


@functools.cache
def xla_flag_known(name: str) -> bool:
    """Whether the installed jaxlib defines the XLA flag ``name`` (without its ``--``).

    XLA aborts the process on an unknown flag in ``XLA_FLAGS`` and flags come and go between
    jaxlib releases, so a flag is only ever set after this check. Flag names are compiled into
    jaxlib's shared libraries as strings; this looks for the name there without importing JAX
    (which would start the backend before the flags are set).

    Args:
      name: the flag, e.g. ``"xla_cpu_use_fusion_emitters"``.

    Returns:
      True if a jaxlib shared library contains the name; False if not, or if jaxlib is missing.
    """
    spec = util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = name.encode()
    for folder in spec.submodule_search_locations:
        for lib in sorted(pathlib.Path(folder).glob("*.so"), key=lambda p: -p.stat().st_size):
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
    return False


def add_xla_flag(name: str, value: str) -> bool:
    """Appends ``--name=value`` to ``XLA_FLAGS`` unless the caller set it or jaxlib lacks it.

    Only has an effect before JAX initialises its backend (and in subprocesses started later,
    which inherit the environment).

    Args:
      name: the flag without its ``--``.
      value: its value, as XLA parses it (``"false"``, ``"0"``, ...).

    Returns:
      True if ``XLA_FLAGS`` now carries the flag (set here or by the caller).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if name in flags:
        return True
    if not xla_flag_known(name):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()
    return True


add_xla_flag(_NAME, "false")
# Before JAX loads SciPy's OpenBLAS (see the module docstring); inherited by subprocesses.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
