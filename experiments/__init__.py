"""Training, comparison, memory, spike and speed experiments for optax-ext.

On import (before JAX starts its backend) this turns off XLA's concurrency-optimized CPU
scheduler where the installed jaxlib is one known to have that flag (< 0.11; XLA rejects
unknown flags). It only lowers the odds of one CPU hang: jaxlib's batched LAPACK calls block an
intra-op pool thread while their per-matrix tasks wait for that same pool, so as many
concurrent batched calls as pool threads deadlock. The library itself avoids it: every
decomposition it runs (SOAP, COSMOS, SVD projection bases, SVD polar factors, spectral caps)
goes one matrix per LAPACK call on CPU (optax_ext/kernels/lapack.py), so library users need no
flag; it stays here as a guard for batched decompositions outside the library (test references).
CPU backend only.
"""

import os
from importlib import metadata

_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"


def _known_jaxlib() -> bool:
    try:
        major, minor = (int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) < (0, 11)


if _NAME not in os.environ.get("XLA_FLAGS", "") and _known_jaxlib():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_NAME}=false".strip()
