"""Optimizer-state memory of every recipe on real model shapes, without allocating anything.

    python -m experiments.memory                       # all optimizers, GPT-2 124M .. LLaMA-7B
    python -m experiments.memory --models llama-60m,llama-7b --optimizers adamw,conda,apollo_mini

For each model preset the parameter tree is built abstractly (``jax.eval_shape`` of the model's
constructor: no weights exist), each optimizer's ``init`` is evaluated abstractly on it, and the
state's bytes are counted (``optax_ext.state_nbytes``). Cells give the state in GiB and in bytes
per parameter (fp32 AdamW: 8). The table goes to stdout and to ``results/memory/memory.md``
(with ``memory.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from typing import Any

import jax
from flax import nnx

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
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args(argv)
    optimizers = [o for o in args.optimizers.split(",") if o]
    presets = [m for m in args.models.split(",") if m]
    try:
        for o in optimizers:
            registry.get(o)
        for m in presets:
            models.ModelConfig.preset(m)
        md, rows = memory_table(optimizers, presets)
    except (registry.UnknownOptimizer, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    intro = (
        "# Optimizer-state memory\n\nState of each optimizer (GiB, and bytes per parameter) on "
        "abstract parameters (`jax.eval_shape`), float32 parameters. Settings as in "
        "`experiments/registry.py`: the low-rank recipes use its small-model ranks (GaLore, "
        "Fira, APOLLO: 32; APOLLO-Mini: 1; Conda: full rank); the papers use ranks of 128-1024 "
        "at these sizes, and the projected state grows linearly with the rank.\n\n"
    )
    (out / "memory.md").write_text(intro + md + "\n")
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    print(md)
    print(f"\ntable: {out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
