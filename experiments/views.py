"""Muon on a DenseGeneral (flax ``nn.MultiHeadDotProductAttention``) byte-level LM: the old
default view (``MatrixSpec()``: last two axes, ``(embed, heads, head_dim)`` read as ``embed``
matrices of ``heads x head_dim``) vs the true view of :func:`optax_ext.labels.matrix_view`, vs AdamW.

    python -m experiments.views [--steps 300] [--out results/views]

Writes ``results.json`` and ``results.md`` (final train loss over the last 20 steps, validation
loss) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ext
from experiments import data


class Block(nn.Module):
    """Pre-norm block: DenseGeneral multi-head attention, then a Dense MLP."""

    d: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False)(
            nn.LayerNorm()(x), mask=mask
        )
        y = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
        return x + nn.Dense(self.d)(nn.gelu(y))


class LM(nn.Module):
    """Token + position embeddings, blocks, an untied head named as in flax's lm1b example."""

    vocab: int
    d: int
    heads: int
    layers: int
    seq_len: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.d))
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = Block(self.d, self.heads)(x, mask)
        return nn.Dense(self.vocab, name="logitdense")(nn.LayerNorm()(x))


def run(tx, model, params, inputs, targets, val):
    """Trains with one ``lax.scan`` over the steps; returns per-step losses and the val loss."""

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    @jax.jit
    def train(p):
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), (inputs, targets))
        val_loss = jnp.mean(jnp.stack([loss_fn(p, x, y) for x, y in val]))
        return losses, val_loss

    losses, val_loss = train(params)
    return np.asarray(losses), float(val_loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/views")
    args = ap.parse_args(argv)

    splits = data.load_tokens()
    stream = data.batches(splits.train, batch_size=args.batch, seq_len=args.seq_len, seed=args.seed)
    xs, ys = zip(*(next(stream) for _ in range(args.steps)))
    inputs, targets = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))
    val = [
        (jnp.asarray(x), jnp.asarray(y))
        for x, y in data.eval_batches(splits.val, batch_size=args.batch, seq_len=args.seq_len,
                                      count=8)
    ]
    model = LM(splits.vocab_size, args.d, args.heads, args.layers, args.seq_len)
    params = model.init(jax.random.key(args.seed), inputs[0])["params"]
    print(optax_ext.labels.describe(params, optax_ext.muon))

    def sched(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, args.steps // 10, args.steps)

    aux = sched(3e-3)
    runs = {
        "muon, old view MatrixSpec()": optax_ext.muon(
            sched(0.02), adam_learning_rate=aux, specs=optax_ext.MatrixSpec()
        ),
        "muon, true view (default)": optax_ext.muon(sched(0.02), adam_learning_rate=aux),
        "adamw": optax.adamw(aux, b2=0.95, weight_decay=0.0),
    }
    results = {}
    for name, tx in runs.items():
        t0 = time.perf_counter()
        losses, val_loss = run(tx, model, params, inputs, targets, val)
        results[name] = {
            "train_loss_last20": float(losses[-20:].mean()),
            "val_loss": val_loss,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, results[name], flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta.update(corpus=splits.source, jax=jax.__version__)
    (out / "results.json").write_text(json.dumps({"config": meta, "results": results}, indent=1))
    lines = [
        "# Muon on a DenseGeneral LM: old default view vs true view vs AdamW",
        "",
        f"`python -m experiments.views --steps {args.steps}`: byte-level stdlib corpus, "
        f"d={args.d}, heads={args.heads}, layers={args.layers}, batch {args.batch}x"
        f"{args.seq_len}, warm-up + cosine, muon lr 0.02, AdamW / auxiliary lr 3e-3, CPU, "
        f"jax {jax.__version__}, seed {args.seed}.",
        "",
        "| run | train loss (last 20 steps) | val loss |",
        "|---|---|---|",
        *(f"| {k} | {v['train_loss_last20']:.3f} | {v['val_loss']:.3f} |" for k, v in
          results.items()),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
