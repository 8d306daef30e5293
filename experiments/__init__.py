"""Training, comparison, memory, spike and speed experiments for optax-ext.

On import (before JAX starts its backend) this turns off XLA's concurrency-optimized CPU
scheduler: with it, programs that run many independent LAPACK calls inside a conditional (SOAP's
eigendecompositions on a GPT-2-sized tree) can deadlock on a 2-core CPU (seen with jax 0.10.2).
The flag only affects the CPU backend.
"""

import os

_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
