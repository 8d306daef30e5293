"""Optimizer-state memory of every recipe on real model shapes, without allocating anything.

    python -m experiments.memory                       # all optimizers, GPT-2 124M .. LLaMA-7B
    python -m experiments.memory --models llama-60m,llama-7b --optimizers adamw,conda,apollo_mini
    python -m experiments.memory --mesh data=64,model=4   # per device, FSDP x tensor parallel

For each model preset the parameter tree is built abstractly (``jax.eval_shape`` of the model's
constructor: no weights exist), each optimizer's ``init`` is evaluated abstractly on it, and the
state's bytes are counted (``optax_ext.state_nbytes``). Cells give the state in GiB and in bytes
per parameter (fp32 AdamW: 8). The table goes to stdout and to ``results/memory/memory.md``
(with ``memory.json``).

With ``--mesh data=N,model=M`` the cells are per-device parameter + state bytes on an ``N x M``
mesh, still without devices: the parameters are laid out on a ``jax.sharding.AbstractMesh`` with
explicit axes (each matrix's first axis divisible by ``N`` over ``data``, FSDP; its last axis
divisible by ``M`` over ``model``, tensor parallel; other leaves replicated), ``init`` is traced
by ``jax.eval_shape`` under that mesh, and every state leaf's shard is counted as the library
lays it out (sharding in types). Written to ``results/memory/mesh_data<N>_model<M>.md/.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import models
import optax_ext
from experiments import registry, train

MODELS = ("gpt2-124m", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")


@functools.cache
def abstract_params(preset: str) -> Any:
    """The parameter tree of ``preset`` as shape-dtype structs (nothing is allocated)."""
    cfg = models.ModelConfig.preset(preset)
    return jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(models.make_model(cfg), nnx.Param)))


def state_bytes(optimizer: str, preset: str, steps: int = 10_000) -> tuple[int, int]:
    """``(optimizer-state bytes, parameter count)`` of ``optimizer`` on ``preset``."""
    params = abstract_params(preset)
    tx, _, _ = train.build_optimizer(
        train.TrainConfig(optimizer=optimizer, steps=steps, grad_clip=0.0)
    )
    n = sum(x.size for x in jax.tree.leaves(params))
    return optax_ext.state_nbytes(jax.eval_shape(tx.init, params)), n


def per_device_nbytes(tree: Any) -> int:
    """Bytes of a tree of arrays or shape-dtype structs that one device holds.

    Each leaf counts with its sharding's shard shape (``sharding.shard_shape``; the full shape
    without a sharding); with even layouts every device holds the same.
    """
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=8,model=2"`` -> ``{"data": 8, "model": 2}`` (axes ``data`` and ``model`` only)."""
    axes: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name not in ("data", "model") or not size.isdigit() or int(size) < 1 or name in axes:
            raise ValueError(f"--mesh: expected data=N,model=M with positive sizes, got {text!r}")
        axes[name] = int(size)
    return {"data": axes.get("data", 1), "model": axes.get("model", 1)}


def param_spec(shape: tuple[int, ...], axes: dict[str, int]) -> PartitionSpec:
    """FSDP x tensor parallel: the first axis divisible by ``data`` over ``data``, the last other
    axis divisible by ``model`` over ``model``; vectors and scalars replicated."""
    spec: list[Any] = [None] * len(shape)
    if len(shape) < 2:
        return PartitionSpec(*spec)
    for name, order in (("data", range(len(shape))), ("model", reversed(range(len(shape))))):
        for i in order:
            if spec[i] is None and axes[name] > 1 and shape[i] % axes[name] == 0:
                spec[i] = name
                break
    return PartitionSpec(*spec)


def sharded_bytes(optimizer: str, preset: str, axes: dict[str, int]) -> dict[str, int]:
    """Per-device parameter and state bytes, and totals, of ``optimizer`` on ``preset``."""
    params = abstract_params(preset)
    tx, _, _ = train.build_optimizer(
        train.TrainConfig(optimizer=optimizer, steps=10_000, grad_clip=0.0)
    )
    mesh = jax.sharding.AbstractMesh(
        (axes["data"], axes["model"]), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
    )

    def placed_init(params):
        placed = jax.tree.map(
            lambda p: jax.sharding.reshard(p, param_spec(p.shape, axes)), params
        )
        return placed, tx.init(placed)

    with jax.sharding.use_abstract_mesh(mesh):
        placed, state = jax.eval_shape(placed_init, params)
    return {
        "param_bytes_per_device": per_device_nbytes(placed),
        "state_bytes_per_device": per_device_nbytes(state),
        "state_bytes": optax_ext.state_nbytes(state),
    }


def mesh_table(
    optimizers: list[str], presets: list[str], axes: dict[str, int]
) -> tuple[str, list[dict[str, Any]]]:
    """Per-device parameter + state GiB (and state over its ideal share) on an abstract mesh."""
    devices = axes["data"] * axes["model"]
    rows = []
    head = ["optimizer"] + list(presets)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in optimizers:
        cells = [name]
        for p in presets:
            b = sharded_bytes(name, p, axes)
            ideal = b["state_bytes"] / devices
            ratio = b["state_bytes_per_device"] / ideal if ideal else 1.0
            rows.append({"optimizer": name, "model": p, **axes, **b})
            per_device = b["param_bytes_per_device"] + b["state_bytes_per_device"]
            cells.append(f"{per_device / 2**30:.2f} GiB ({ratio:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def memory_table(optimizers: list[str], presets: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and its rows (one dict per optimizer x preset)."""
    rows = []
    counts = {p: sum(x.size for x in jax.tree.leaves(abstract_params(p))) for p in presets}
    head = ["optimizer"] + [f"{p} ({counts[p] / 1e6:,.0f}M)" for p in presets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in optimizers:
        cells = [name]
        for p in presets:
            nbytes, n = state_bytes(name, p)
            rows.append({"optimizer": name, "model": p, "params": n, "state_bytes": nbytes})
            cells.append(f"{nbytes / 2**30:.2f} GiB ({nbytes / n:.2f} B/p)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; unknown names give a one-line error and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(sorted(registry.OPTIMIZERS)))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--mesh", default=None, help="data=N,model=M: per-device bytes")
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args(argv)
    optimizers = [o for o in args.optimizers.split(",") if o]
    presets = [m for m in args.models.split(",") if m]
    try:
        axes = parse_mesh(args.mesh) if args.mesh else None
        for o in optimizers:
            registry.get(o)
        for m in presets:
            models.ModelConfig.preset(m)
        md, rows = (
            mesh_table(optimizers, presets, axes) if axes else memory_table(optimizers, presets)
        )
    except (registry.UnknownOptimizer, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if axes:
        stem = f"mesh_data{axes['data']}_model{axes['model']}"
        intro = (
            f"# Per-device memory on a data={axes['data']} x model={axes['model']} mesh\n\n"
            "Parameters + optimizer state per device (GiB), float32 parameters laid out FSDP x "
            "tensor parallel (each matrix's first axis divisible by the `data` size over `data`, "
            "its last axis divisible by the `model` size over `model`); in brackets the "
            "per-device state over its ideal share (total state / devices). Computed without "
            "devices (`jax.eval_shape` on a `jax.sharding.AbstractMesh` with explicit axes: the "
            "state as the library lays it out). Ranks and settings as in the single-device "
            "table (`memory.md`). `python -m experiments.memory --mesh "
            f"data={axes['data']},model={axes['model']}`.\n\n"
        )
    else:
        stem = "memory"
        intro = (
            "# Optimizer-state memory\n\nState of each optimizer (GiB, and bytes per parameter) "
            "on abstract parameters (`jax.eval_shape`), float32 parameters. Settings as in "
            "`experiments/registry.py`: the low-rank recipes use its small-model ranks (GaLore, "
            "Fira, APOLLO: 32; APOLLO-Mini: 1; Conda: full rank); the papers use ranks of "
            "128-1024 at these sizes, and the projected state grows linearly with the rank.\n\n"
        )
    (out / f"{stem}.md").write_text(intro + md + "\n")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(md)
    print(f"\ntable: {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
