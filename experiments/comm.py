"""Bytes per step of 1-bit Adam vs a float32 gradient all-reduce, measured from the program.

Traces one ``onebit_adam`` update under ``jax.shard_map`` on W (fake CPU) devices for a
transformer-shaped parameter tree and lists every collective of each phase with
:func:`optax_ext.kernels.communication.collective_traffic`: warm-up is the float32 all-reduce
of the gradients (what data-parallel Adam sends every step), the compressed phase the packed
signs and scales. Nothing is executed, so the shapes can be real model sizes.

    python -m experiments.comm                       # GPT-2 small shapes, W = 2..64
    python -m experiments.comm --model tiny --workers 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# Fake CPU devices for tracing (set before JAX starts).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_ext  # noqa: E402
from optax_ext.kernels.communication import collective_traffic  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "gpt2"  # "gpt2" (124M shapes, untied head) or "tiny"
    workers: tuple[int, ...] = (2, 4, 8, 16, 32, 64)


def model_shapes(name: str) -> dict:
    """Flax-layout parameter shapes of a GPT-style model (paths as in ``models/``)."""
    vocab, d, layers, ctx = (50257, 768, 12, 1024) if name == "gpt2" else (256, 64, 2, 64)
    block = {
        "attn": {n: {"kernel": (d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"fc": {"kernel": (d, 4 * d)}, "proj": {"kernel": (4 * d, d)}},
        "ln1": {"scale": (d,)},
        "ln2": {"scale": (d,)},
    }
    return {
        "wte": {"embedding": (vocab, d)},
        "wpe": {"embedding": (ctx, d)},
        "blocks": {str(i): block for i in range(layers)},
        "ln_f": {"scale": (d,)},
        "lm_head": {"kernel": (d, vocab)},
    }


def phase_traffic(shapes: dict, workers: int) -> dict[str, dict[str, float]]:
    """Operand and wire bytes per device for the warm-up and the compressed phase."""
    mesh = jax.make_mesh((workers,), ("data",), devices=jax.devices()[:workers])
    typed = lambda shape, spec: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.float32, sharding=NamedSharding(mesh, spec)
    )
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: typed(s, P()), shapes, is_leaf=is_shape)
    grads = jax.tree.map(lambda s: typed((workers, *s), P("data")), shapes, is_leaf=is_shape)
    tx = optax_ext.onebit_adam(freeze_step=10)
    specs = optax_ext.per_device_state_specs(tx, params, mesh, "data")
    init = jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
    state = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        jax.eval_shape(init, params),
        specs,
    )
    update = jax.shard_map(
        lambda g, s, p: tx.update(jax.tree.map(lambda x: x[0], g), s, p),
        mesh=mesh,
        in_specs=(P("data"), specs, P()),
        out_specs=(P(), specs),
    )
    out = {}
    for phase, where in (("fp32", ("cond[1]",)), ("1bit", ("cond[2]",))):
        transfers = [
            t for t in collective_traffic(update, grads, state, params) if t.where == where
        ]
        out[phase] = {
            "operand": sum(t.operand_bytes for t in transfers),
            "wire": sum(t.wire_bytes for t in transfers),
            "ops": len(transfers),
        }
    return out


def main(config: Config) -> None:
    shapes = model_shapes(config.model)
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    numel = sum(int(jnp.prod(jnp.array(s))) for s in leaves)
    print(f"model {config.model}: {numel / 1e6:.1f}M parameters in {len(leaves)} tensors")
    print("bytes per device per step; wire = ring all-reduce / all-to-all / all-gather sends")
    print()
    header = "| W | fp32 all-reduce operand | fp32 wire | 1-bit operands | 1-bit wire | ratio |"
    print(header)
    print("|---|---|---|---|---|---|")
    for w in config.workers:
        t = phase_traffic(shapes, w)
        fp, ob = t["fp32"], t["1bit"]
        print(
            f"| {w} | {fp['operand'] / 2**20:.2f} MiB | {fp['wire'] / 2**20:.2f} MiB "
            f"| {ob['operand'] / 2**20:.3f} MiB | {ob['wire'] / 2**20:.3f} MiB "
            f"| 1/{fp['wire'] / ob['wire']:.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=Config.model, choices=("gpt2", "tiny"))
    parser.add_argument("--workers", type=int, nargs="+", default=list(Config.workers))
    args = parser.parse_args()
    main(Config(model=args.model, workers=tuple(args.workers)))
