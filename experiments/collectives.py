"""Collectives in the compiled optimizer update of each matrix recipe on a sharded bucket.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.collectives

Six FSDP-sharded 64x64 hidden matrices (rows over an 8-device ``data`` axis: one bucket of
same-shaped matrices) go through each recipe's jitted ``update`` under an explicit-axis and an
automatic-axis mesh; the table counts the collective ops in the optimized HLO
(``lower(...).compile().as_text()``). Runs on CPU with fake devices: it counts communication,
it does not time it. The table is printed and written to ``results/collectives.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ext
from optax_ext.kernels import NewtonSchulz, RandomProjector, SVDProjector

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
RECIPES = {
    "adamw (optax)": lambda: optax.adamw(0.01),
    "muon": lambda: optax_ext.muon(0.02, ns=NewtonSchulz.muon(dtype="float32")),
    "normuon": lambda: optax_ext.normuon(0.02, ns=NewtonSchulz.muon(dtype="float32")),
    "root": lambda: optax_ext.root(0.01),
    "auon": lambda: optax_ext.auon(0.2),
    "hybrid_auon": lambda: optax_ext.hybrid_auon(0.02),
    "lipschitz_muon": lambda: optax_ext.lipschitz_muon(0.02),
    "conda": lambda: optax_ext.conda(0.01, projector=SVDProjector(None, 10)),
    "galore": lambda: optax_ext.galore(0.01, projector=SVDProjector(8, 10)),
    "apollo_mini": lambda: optax_ext.apollo_mini(0.01, projector=RandomProjector(1, 10)),
    "soap": lambda: optax_ext.soap(0.01),
    "cosmos": lambda: optax_ext.cosmos(0.01, subspace=optax_ext.OnlinePCA(rank=8)),
}


def count(tx: optax.GradientTransformation, kind: AxisType) -> dict[str, int]:
    """Collective ops in ``tx.update`` compiled for six row-sharded 64x64 matrices."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    sh = NamedSharding(mesh, P("data", None))
    params = {
        "blocks": {
            f"h{i}": {"kernel": jax.device_put(jnp.full((64, 64), (i + 1) / 64, "float32"), sh)}
            for i in range(6)
        }
    }
    with jax.set_mesh(mesh):
        state = tx.init(params)  # on the placed parameters: the state is laid out like them
        text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    return {k: len(re.findall(rf"\b{k}(?:-start)?\(", text)) for k in COLLECTIVES}


def _cell(c: dict[str, int]) -> str:
    parts = [f"{v} {k}" for k, v in c.items() if v]
    return f"{sum(c.values())} ({', '.join(parts)})" if parts else "0"


def main(argv: list[str] | None = None) -> int:
    """Prints the table (needs 8 devices: fake CPU devices via ``XLA_FLAGS``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/collectives.md")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        print("error: needs 8 devices; run with "
              "XLA_FLAGS=--xla_force_host_platform_device_count=8", file=sys.stderr)
        return 2
    lines = ["| recipe | explicit axes | automatic axes |", "|---|---|---|"]
    for name, build in RECIPES.items():
        cells = [_cell(count(build(), k)) for k in (AxisType.Explicit, AxisType.Auto)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Collectives per optimizer update\n\nSix FSDP row-sharded 64x64 hidden matrices on 8 "
        "devices (one bucket); counts of collective ops in the compiled update "
        "(`python -m experiments.collectives`).\n\n" + "\n".join(lines) + "\n"
    )
    print(f"\ntable: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
