"""Time one optimizer update of every recipe on a GPT-2-124M-shaped parameter tree.

    python -m experiments.bench_step                 # GPU: GPT-2 124M shapes, fp32 params
    python -m experiments.bench_step --small         # CPU smoke run: GPT-2-tiny shapes
    python -m experiments.bench_step --optimizers adamw,muon,optax_muon,conda --reps 50

Each optimizer of ``experiments/registry.py`` (hidden matrices to its matrix branch,
embeddings/head/vectors to its fallback, as the recipe partitions them) gets a jitted
``update(grads, state, params)``; after compilation and a warm-up, ``--reps`` calls (default
30) are timed one by one with ``block_until_ready`` and the median is reported, as a ratio to
``optax.adamw`` and to ``optax.contrib.muon`` (with AdamW on the rest) measured in the same run.
Absolute milliseconds are printed only on an accelerator (on a CPU they say nothing about a
GPU). The state is threaded through the calls, so periodic work (projector refreshes,
preconditioner updates) is counted at its real frequency when ``--reps`` covers the period.
Hessian-based recipes get a fixed curvature estimate (their estimator costs model passes,
outside the optimizer).

Two floors are printed for the same tree: the FLOP floor (the Newton-Schulz FLOPs of a
5-step quintic over every hidden matrix / the measured bf16 matmul rate) and the HBM floor (the
bytes an fp32 AdamW update must move -- read g, p, m, v, write m, v, p -- / the measured copy
bandwidth). Results go to stdout and ``results/bench_step[_small].md``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import models
import optax_ext
from experiments import registry

BASELINES = ("adamw", "optax_muon")


def param_tree(preset: str, seed: int = 0) -> Any:
    """Float32 parameters with the shapes and paths of ``preset`` (random normal * 0.02)."""
    cfg = models.ModelConfig.preset(preset)
    shapes = jax.eval_shape(
        lambda: nnx.to_pure_dict(nnx.state(models.make_model(cfg), nnx.Param))
    )
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [0.02 * jax.random.normal(k, s.shape, jnp.float32) for k, s in zip(keys, leaves)]
    )


def update_times(update: Any, grads: Any, state: Any, params: Any, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of a jitted ``update(grads, state, params)``.

    The state is threaded through the calls, so periodic work (projector refreshes,
    preconditioner updates) is counted at its real frequency when ``reps`` covers its period;
    three calls first compile and leave the state-building first steps behind.
    """
    for _ in range(3):
        _, state = jax.block_until_ready(update(grads, state, params))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _, state = jax.block_until_ready(update(grads, state, params))
        times.append(time.perf_counter() - t)
    return times


def time_update(name: str, params: Any, grads: Any, reps: int, steps: int = 10_000) -> float:
    """Median seconds of one jitted update of optimizer ``name`` (state threaded)."""
    entry = registry.get(name)
    tx = entry.build(lambda count: 1e-3, steps)
    extra = {}
    if entry.needs is not None:  # a fixed curvature estimate: the estimator is model work
        curvature = jax.tree.map(jnp.abs, grads)
        extra = {"hessian_fn": lambda p: curvature}

    @jax.jit
    def update(grads, state, params):
        return tx.update(grads, state, params, **extra)

    state = jax.jit(tx.init)(params)
    return statistics.median(update_times(update, grads, state, params, reps))


def hidden_matrices(params: Any) -> list[tuple[int, ...]]:
    """Shapes of the hidden matrices (the leaves ``optax_ext.labels`` calls hidden)."""
    labels = optax_ext.labels.param_labels(params)
    return [
        p.shape
        for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
        if lab == "hidden"
    ]


def newton_schulz_flops(shapes: list[tuple[int, ...]], steps: int = 5) -> float:
    """FLOPs of ``steps`` quintic Newton-Schulz iterations over matrices of ``shapes``."""
    total = 0.0
    for shape in shapes:
        batch = math.prod(shape[:-2])
        m, n = sorted(shape[-2:])
        total += batch * steps * (4 * m * m * n + 2 * m**3)  # X X^T, A A, B X
    return total


def matmul_rate(size: int, reps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s on a ``size x size`` product."""
    a = jnp.ones((size, size), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    jax.block_until_ready(out)
    return reps * 2 * size**3 / (time.perf_counter() - t)


def copy_bandwidth(nbytes: int, reps: int = 10) -> float:
    """Measured bytes/s of an elementwise copy (read + write) of ``nbytes``."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.000001)
    jax.block_until_ready(f(x))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(x)
    jax.block_until_ready(out)
    return reps * 2 * x.nbytes / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; unknown optimizers give a one-line error and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="GPT-2-tiny shapes (CPU smoke run)")
    parser.add_argument("--optimizers", default=",".join(sorted(registry.OPTIMIZERS)))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = [o for o in args.optimizers.split(",") if o]
    try:
        for n in names:
            registry.get(n)
    except registry.UnknownOptimizer as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(BASELINES) + [n for n in names if n not in BASELINES]
    preset = "gpt2-tiny" if args.small else "gpt2-124m"
    params = param_tree(preset)
    grads = jax.tree.map(lambda p: 0.01 * jnp.sign(p) + 1e-3 * p, params)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    device = jax.devices()[0]
    accel = device.platform != "cpu"

    shapes = hidden_matrices(params)
    rate = matmul_rate(512 if args.small else 8192)
    bandwidth = copy_bandwidth((16 if args.small else 1024) * 2**20)
    flop_floor = newton_schulz_flops(shapes) / rate
    hbm_floor = 7 * 4 * n_params / bandwidth

    results = {}
    for name in names:
        results[name] = time_update(name, params, grads, args.reps)
        print(f"{name:>16}: {results[name] / results['adamw']:6.2f}x AdamW", flush=True)
    head = ["optimizer", "vs optax.adamw", "vs optax.contrib.muon"]
    if accel:
        head.insert(1, "median ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(results, key=results.get):
        row = [name, f"{results[name] / results['adamw']:.2f}x",
               f"{results[name] / results['optax_muon']:.2f}x"]
        if accel:
            row.insert(1, f"{1e3 * results[name]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    floors = (
        f"floors on this device: Newton-Schulz (5 quintic steps over {len(shapes)} hidden "
        f"matrices) = {newton_schulz_flops(shapes) / 1e9:.1f} GFLOP, "
        f"{flop_floor / results['adamw']:.2f}x AdamW's time"
        + (f" ({1e3 * flop_floor:.2f} ms at {rate / 1e12:.0f} TFLOP/s bf16)" if accel else "")
        + f"; AdamW HBM floor = {7 * 4 * n_params / 2**20:.0f} MiB moved, "
        f"{hbm_floor / results['adamw']:.2f}x AdamW's time"
        + (f" ({1e3 * hbm_floor:.2f} ms at {bandwidth / 1e9:.0f} GB/s)" if accel else "")
    )
    md = "\n".join(lines)
    text = (
        f"# Optimizer update time\n\n{preset} parameter tree ({n_params:,} fp32 parameters), "
        f"{device.device_kind}, jax {jax.__version__}, median of {args.reps} updates.\n\n"
        f"{md}\n\n{floors}\n"
    )
    out = pathlib.Path(args.out or f"results/bench_step{'_small' if args.small else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + md + "\n\n" + floors + f"\n\ntable: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
