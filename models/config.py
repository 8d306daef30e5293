"""Model configuration: one frozen dataclass for both architectures, with named presets.

``ModelConfig`` describes a decoder-only language model, either GPT-2 style (``arch="gpt2"``:
learned positions, LayerNorm, GELU MLP, biases) or LLaMA style (``arch="llama"``: RoPE, RMSNorm,
SwiGLU, grouped-query attention, no biases). The stability options (QK-norm, z-loss, logit
soft-cap, StableMax output, σReparam, embedding gradient shrink) are fields that are off by default.

Presets (:data:`PRESETS`, :meth:`ModelConfig.preset`) cover CPU-sized models for tests and demos
and the LLaMA shapes of the GaLore / APOLLO / Conda pretraining experiments.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

Arch = Literal["gpt2", "llama"]
Output = Literal["softmax", "stablemax"]

ARCHS: tuple[str, ...] = ("gpt2", "llama")
OUTPUTS: tuple[str, ...] = ("softmax", "stablemax")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def _round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape, dtypes and stability options of a decoder-only transformer.

    Attributes:
      arch: ``"gpt2"`` (learned positions, pre-LayerNorm, GELU MLP, biases) or ``"llama"``
        (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases).
      vocab_size: vocabulary size; 256 is byte-level.
      block_size: maximum sequence length (size of the GPT-2 position table).
      n_layer: number of transformer blocks.
      n_head: number of query heads.
      n_kv_head: number of key/value heads (grouped-query attention); ``None`` means ``n_head``.
        Must divide ``n_head``.
      d_model: residual stream width; ``d_model / n_head`` is the head dimension.
      d_ff: hidden width of the MLP; ``None`` means ``4 * d_model`` (gpt2) or
        ``int(8 * d_model / 3)`` rounded up to a multiple of 32 (llama SwiGLU).
      dropout: dropout rate on embeddings, attention probabilities and residual branches.
      tie_embeddings: compute logits with the token embedding (no separate ``lm_head``).
      rope_theta: RoPE base frequency (llama).
      norm_eps: epsilon of LayerNorm / RMSNorm; ``None`` means 1e-5 (gpt2) or 1e-6 (llama).
      init_std: standard deviation of the normal initialisation of embeddings and kernels.
      scale_residual_init: divide the init std of the residual projections (``attn.o_proj``,
        ``mlp.proj`` / ``mlp.down``) by ``sqrt(2 * n_layer)`` (GPT-2).
      dtype: name of the compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: name of the parameter dtype.
      qk_norm: normalise queries and keys per head (LayerNorm for gpt2, RMSNorm for llama,
        over the head dimension, weights shared across heads) before RoPE and the dot product.
      z_loss: coefficient of the PaLM z-loss ``z_loss * mean(logsumexp(logits)^2)``.
      logit_softcap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma 2).
      output: ``"softmax"`` cross-entropy or ``"stablemax"`` (Prieto et al., 2025).
      sigma_reparam: every hidden linear layer is a σReparam linear (Zhai et al., 2023).
      embed_grad_shrink: GLM-130B embedding gradient shrink ``alpha``; 1.0 is off.
    """

    arch: Arch = "gpt2"
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    d_ff: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float | None = None
    init_std: float = 0.02
    scale_residual_init: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Stability options, all off by default.
    qk_norm: bool = False
    z_loss: float = 0.0
    logit_softcap: float | None = None
    output: Output = "softmax"
    sigma_reparam: bool = False
    embed_grad_shrink: float = 1.0

    def __post_init__(self) -> None:
        def fail(rule: str) -> None:
            raise ValueError(f"ModelConfig: {rule}.")

        if self.arch not in ARCHS:
            fail(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.output not in OUTPUTS:
            fail(f"output must be one of {OUTPUTS}, got {self.output!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            fail(f"n_head={self.n_head} must divide d_model={self.d_model}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            fail(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.arch == "llama" and self.head_dim % 2:
            fail(f"RoPE needs an even head dimension, got {self.head_dim}")
        if self.d_ff is not None and self.d_ff < 1:
            fail(f"d_ff must be positive, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.z_loss < 0.0:
            fail(f"z_loss must be non-negative, got {self.z_loss}")
        if self.logit_softcap is not None and self.logit_softcap <= 0.0:
            fail(f"logit_softcap must be positive or None, got {self.logit_softcap}")
        if not 0.0 <= self.embed_grad_shrink <= 1.0:
            fail(f"embed_grad_shrink must be in [0, 1], got {self.embed_grad_shrink}")

    # Derived sizes.

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_head``."""
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head`` resolved)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP (``d_ff`` resolved)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return _round_up(int(8 * self.d_model / 3), 32)

    @property
    def eps(self) -> float:
        """Norm epsilon (``norm_eps`` resolved)."""
        if self.norm_eps is not None:
            return self.norm_eps
        return 1e-5 if self.arch == "gpt2" else 1e-6

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a NumPy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """``param_dtype`` as a NumPy dtype."""
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        """Number of trainable parameters (``nnx.Param`` elements), computed analytically.

        Counts embeddings, the separate head unless tied, norms, biases, QK-norm weights and the
        σReparam gains; the σReparam power-iteration vectors are state, not parameters.
        """
        d, v, f, dh = self.d_model, self.vocab_size, self.ffn_dim, self.head_dim
        kv = self.kv_heads * dh
        gpt2 = self.arch == "gpt2"
        bias = 1 if gpt2 else 0
        norm = 2 * d if gpt2 else d  # LayerNorm: scale + bias; RMSNorm: scale
        attn = (d * d + bias * d) + 2 * (d * kv + bias * kv) + (d * d + bias * d)
        if gpt2:
            mlp, n_linear = (d * f + f) + (f * d + d), 6
        else:
            mlp, n_linear = 3 * d * f, 7
        qk = 2 * (2 * dh if gpt2 else dh) if self.qk_norm else 0
        gains = n_linear if self.sigma_reparam else 0
        block = attn + mlp + 2 * norm + qk + gains
        embed = v * d + (self.block_size * d if gpt2 else 0)
        head = 0 if self.tie_embeddings else d * v
        return embed + self.n_layer * block + norm + head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named configuration from :data:`PRESETS`, with fields overridden by keyword.

        Args:
          name: a key of :data:`PRESETS` (``"gpt2-tiny"``, ``"llama-60m"``, ...).
          **overrides: any :class:`ModelConfig` field, e.g. ``qk_norm=True``.

        Returns:
          The configuration.

        Raises:
          ValueError: for an unknown name or an invalid field value.

        Example:
          >>> ModelConfig.preset("llama-60m").num_params()
          58073600
          >>> ModelConfig.preset("gpt2-tiny", z_loss=1e-4).z_loss
          0.0001
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


def _llama(vocab: int, d: int, layers: int, heads: int, ffn: int, block: int) -> dict[str, Any]:
    return dict(
        arch="llama",
        vocab_size=vocab,
        d_model=d,
        n_layer=layers,
        n_head=heads,
        d_ff=ffn,
        block_size=block,
    )


PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {
        # CPU-sized byte-level models (tests, demos).
        "gpt2-tiny": dict(arch="gpt2", block_size=128, n_layer=2, n_head=4, d_model=128),
        "llama-tiny": _llama(256, 128, 2, 4, 352, 128),
        "gpt2-small": dict(arch="gpt2", block_size=256, n_layer=4, n_head=4, d_model=256),
        "llama-20m": _llama(256, 384, 12, 6, 1024, 512),
        # GPT-2 small (124M with the head tied to the token embedding, as in GPT-2);
        # vocab 50304 = 50257 padded to a multiple of 64 (nanoGPT).
        "gpt2-124m": dict(
            arch="gpt2",
            vocab_size=50304,
            block_size=1024,
            n_layer=12,
            n_head=12,
            d_model=768,
            tie_embeddings=True,
        ),
        # LLaMA shapes of the GaLore / APOLLO / Conda C4 pretraining runs (T5 vocab of 32000,
        # untied head, sequence length 256).
        "llama-60m": _llama(32000, 512, 8, 8, 1376, 256),
        "llama-130m": _llama(32000, 768, 12, 12, 2048, 256),
        "llama-350m": _llama(32000, 1024, 24, 16, 2736, 256),
        "llama-1b": _llama(32000, 2048, 24, 32, 5461, 256),
        "llama-7b": _llama(32000, 4096, 32, 32, 11008, 256),
    }
)
"""Named configurations: field values applied over the :class:`ModelConfig` defaults."""
