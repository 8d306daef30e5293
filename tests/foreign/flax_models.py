"""Small models written the way external Flax trainers write them, from flax's stock modules.

- :class:`LinenLM`: a decoder LM with ``nn.Embed``, ``nn.scan``-stacked blocks of
  ``nn.MultiHeadDotProductAttention`` (``DenseGeneral`` kernels ``(D, H, Dh)`` / ``(H, Dh, D)``,
  biases ``(H, Dh)``) and an ``nn.Dense`` MLP, and an untied ``nn.Dense`` output head; every
  parameter boxed by ``nn.with_logical_partitioning`` (``LogicallyPartitioned``), with the
  stacked axis named ``layers``.
- :class:`ConvNet`: ``nn.Conv`` layers and a classifier, kernels boxed by ``nn.with_partitioning``
  with mesh axis names (``Partitioned``).
- :class:`NnxMLP`: an nnx model whose parameters carry sharding metadata
  (``nnx.with_partitioning``).

The optimizer knows nothing about these models: the tests use only what a trainer has (the
params tree, its metadata, the model's own loss).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Logical axis -> mesh axis, on a ("data", "model") mesh (FSDP on embed, tensor parallel on
# heads / mlp / vocab).
LOGICAL_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", "data"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("layers", None),
    ("length", None),
)


def _logical(init, names):
    return nn.with_logical_partitioning(init, names)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int = 32
    d: int = 16
    heads: int = 2
    mlp: int = 32
    layers: int = 2
    length: int = 8


class Block(nn.Module):
    """Pre-LN transformer block (scan body: ``(x, None) -> (x, None)``)."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x, _):
        cfg = self.cfg
        normal = nn.initializers.normal(0.02)
        h = nn.LayerNorm(scale_init=_logical(nn.initializers.ones, ("embed",)),
                         bias_init=_logical(nn.initializers.zeros, ("embed",)))(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=cfg.heads,
            kernel_init=_logical(normal, ("embed", "heads", "kv")),
            bias_init=_logical(nn.initializers.zeros, ("heads", "kv")),
            out_kernel_init=_logical(normal, ("heads", "kv", "embed")),
            out_bias_init=_logical(nn.initializers.zeros, ("embed",)),
        )(h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
        x = x + h  # [B, T, D]
        h = nn.LayerNorm(scale_init=_logical(nn.initializers.ones, ("embed",)),
                         bias_init=_logical(nn.initializers.zeros, ("embed",)))(x)
        h = nn.Dense(cfg.mlp, kernel_init=_logical(normal, ("embed", "mlp")),
                     bias_init=_logical(nn.initializers.zeros, ("mlp",)))(h)
        h = nn.Dense(cfg.d, kernel_init=_logical(normal, ("mlp", "embed")),
                     bias_init=_logical(nn.initializers.zeros, ("embed",)))(nn.gelu(h))
        return x + h, None


class LinenLM(nn.Module):
    """Decoder LM: embed -> scanned blocks -> LayerNorm -> untied head."""

    cfg: LMConfig = LMConfig()

    @nn.compact
    def __call__(self, tokens):  # [B, T] int
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.d,
                     embedding_init=_logical(nn.initializers.normal(1.0), ("vocab", "embed")))(
            tokens)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(cfg, name="blocks")(x, None)
        x = nn.LayerNorm(scale_init=_logical(nn.initializers.ones, ("embed",)),
                         bias_init=_logical(nn.initializers.zeros, ("embed",)))(x)
        return nn.Dense(cfg.vocab, kernel_init=_logical(nn.initializers.normal(0.02),
                                                        ("embed", "vocab")),
                        use_bias=False, name="lm_head")(x)  # [B, T, V]


def lm_batch(cfg: LMConfig = LMConfig(), batch: int = 4, seed: int = 0):
    """A fixed batch of a learnable sequence task (next token = current token + 1 mod vocab)."""
    start = jax.random.randint(jax.random.key(seed), (batch, 1), 0, cfg.vocab)
    return (start + jnp.arange(cfg.length + 1)[None]) % cfg.vocab  # [B, T+1]


def lm_loss(model: LinenLM, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class ConvNet(nn.Module):
    """Two ``nn.Conv`` layers, mean pool, classifier."""

    classes: int = 4

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        part = nn.with_partitioning
        init = nn.initializers.lecun_normal()
        x = nn.relu(nn.Conv(8, (3, 3), kernel_init=part(init, (None, None, None, "model")),
                            bias_init=part(nn.initializers.zeros, ("model",)))(x))
        x = nn.relu(nn.Conv(8, (3, 3), kernel_init=part(init, (None, None, "model", None)),
                            bias_init=part(nn.initializers.zeros, (None,)))(x))
        x = x.mean(axis=(1, 2))  # [B, 8]
        return nn.Dense(self.classes, kernel_init=part(init, ("model", None)),
                        bias_init=part(nn.initializers.zeros, (None,)),
                        name="classifier")(x)


def conv_batch(batch: int = 8, seed: int = 0):
    """Images whose class is the channel with the largest mean (learnable by the net)."""
    x = jax.random.normal(jax.random.key(seed), (batch, 6, 6, 4))
    return x, jnp.argmax(x.mean(axis=(1, 2)), axis=-1)


def conv_loss(model: ConvNet, params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y).mean()


class NnxMLP(nnx.Module):
    """Embedding, two hidden ``nnx.Linear`` layers and an untied head, with sharding metadata."""

    def __init__(self, vocab: int = 32, d: int = 16, hidden: int = 32, *, rngs: nnx.Rngs):
        part = nnx.with_partitioning
        init = nnx.initializers.lecun_normal()
        self.embed = nnx.Embed(vocab, d, embedding_init=part(nnx.initializers.normal(1.0),
                                                             ("model", "data")), rngs=rngs)
        self.up = nnx.Linear(d, hidden, kernel_init=part(init, ("data", "model")),
                             bias_init=part(nnx.initializers.zeros, ("model",)), rngs=rngs)
        self.down = nnx.Linear(hidden, d, kernel_init=part(init, ("model", "data")),
                               rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False,
                                  kernel_init=part(init, ("data", "model")), rngs=rngs)

    def __call__(self, tokens):  # [B, T] int
        x = self.embed(tokens)
        x = x + self.down(nnx.gelu(self.up(x)))
        return self.lm_head(x)  # [B, T, V]
