"""Training, comparison, memory, spike and speed experiments for optax-ext.

On import (before JAX starts its backend) this turns off XLA's concurrency-optimized CPU
scheduler where the installed jaxlib is one known to have that flag (< 0.11; XLA rejects
unknown flags): with it, programs that run many independent LAPACK calls inside a conditional
(SOAP's eigendecompositions on a GPT-2-sized tree) can deadlock on a 2-core CPU (seen with jax
0.10.2). The flag only affects the CPU backend.
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
