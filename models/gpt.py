"""Decoder-only transformers: GPT-2 style and LLaMA style, in one ``Transformer`` module.

``arch="gpt2"``: token + learned position embeddings, pre-LayerNorm blocks, causal multi-head
attention and a GELU MLP (``4 * d_model``), all with biases, final LayerNorm, linear head.
``arch="llama"``: token embeddings, pre-RMSNorm blocks, rotary (RoPE) grouped-query attention and
a SwiGLU MLP, no biases, final RMSNorm, linear head. See :mod:`models` for the parameter paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import (
    Dtype,
    SigmaReparamLinear,
    apply_rope,
    linear,
    norm,
    shrink_gradient,
    softcap,
)
from models.losses import lm_loss

Metrics = dict[str, jax.Array]


def _call_linear(layer: nnx.Module, x: jax.Array, deterministic: bool) -> jax.Array:
    if isinstance(layer, SigmaReparamLinear):
        return layer(x, deterministic=deterministic)
    return layer(x)


def _dropout(drop: nnx.Dropout | None, x: jax.Array, deterministic: bool) -> jax.Array:
    return x if drop is None else drop(x, deterministic=deterministic)


def _maybe_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    return nnx.Dropout(rate, rngs=rngs) if rate > 0.0 else None


def _residual_std(config: ModelConfig) -> float:
    if config.scale_residual_init:
        return config.init_std / math.sqrt(2 * config.n_layer)
    return config.init_std


class Attention(nnx.Module):
    """Causal self-attention with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    Query head ``h`` reads key/value head ``h // (n_head // n_kv_head)`` (grouped-query
    attention; ``n_kv_head == n_head`` is multi-head attention). Scores and the softmax are
    float32. Optional per-head QK-norm (before RoPE), RoPE (llama) and dropout on the
    probabilities and the output.

    Args:
      config: the model configuration (dims, arch, options).
      rngs: random streams (``params``, and ``dropout`` when ``config.dropout > 0``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        d, h, kv, dh = config.d_model, config.n_head, config.kv_heads, config.head_dim
        make = functools.partial(
            linear,
            use_bias=config.arch == "gpt2",
            sigma_reparam=config.sigma_reparam,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.q_proj = make(d, h * dh, std=config.init_std)
        self.k_proj = make(d, kv * dh, std=config.init_std)
        self.v_proj = make(d, kv * dh, std=config.init_std)
        self.o_proj = make(h * dh, d, std=_residual_std(config))
        if config.qk_norm:
            make_norm = functools.partial(
                norm, config.arch, dh, eps=config.eps, rngs=rngs, dtype=dtype,
                param_dtype=param_dtype,
            )  # fmt: skip
            self.q_norm, self.k_norm = make_norm(), make_norm()
        else:
            self.q_norm = self.k_norm = None
        self.attn_drop = _maybe_dropout(config.dropout, rngs)
        self.resid_drop = _maybe_dropout(config.dropout, rngs)
        self.n_head, self.n_kv_head, self.head_dim = h, kv, dh
        self.rope_theta = config.rope_theta if config.arch == "llama" else None
        self.dtype = dtype

    def __call__(
        self, x: jax.Array, *, deterministic: bool = False, return_entropy: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """Attends causally over ``x``.

        Args:
          x: ``[B, T, D]`` input.
          deterministic: evaluation mode (no dropout, σReparam vectors not updated).
          return_entropy: also return the attention entropy per head.

        Returns:
          ``(y, entropy)``: ``[B, T, D]`` output and, if asked, the ``[n_head]`` entropy
          ``-sum_s p_ts log p_ts`` averaged over batch and query positions ``t`` (else ``None``).
        """
        b, t, _ = x.shape
        h, kv, dh = self.n_head, self.n_kv_head, self.head_dim
        group = h // kv
        q = _call_linear(self.q_proj, x, deterministic).reshape(b, t, h, dh)  # [B, T, H, Dh]
        k = _call_linear(self.k_proj, x, deterministic).reshape(b, t, kv, dh)  # [B, T, K, Dh]
        v = _call_linear(self.v_proj, x, deterministic).reshape(b, t, kv, dh)  # [B, T, K, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            positions = jnp.arange(t)  # [T]
            q = apply_rope(q, positions, theta=self.rope_theta)
            k = apply_rope(k, positions, theta=self.rope_theta)
        q = q.reshape(b, t, kv, group, dh)  # [B, T, K, G, Dh]; head h = k * G + g
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
        )  # [B, K, G, T, T]
        scores = scores / math.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        logp = jax.nn.log_softmax(scores, axis=-1)  # [B, K, G, T, T]
        probs = jnp.exp(logp)
        entropy = None
        if return_entropy:
            plogp = jnp.where(causal, probs * logp, 0.0)
            entropy = -jnp.sum(plogp, axis=-1).mean(axis=(0, 3)).reshape(h)  # [H]
        probs = _dropout(self.attn_drop, probs.astype(self.dtype), deterministic)
        y = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))  # [B, T, K, G, Dh]
        y = _call_linear(self.o_proj, y.reshape(b, t, h * dh), deterministic)  # [B, T, D]
        return _dropout(self.resid_drop, y, deterministic), entropy


class MLP(nnx.Module):
    """GPT-2 MLP: ``proj(gelu(fc(x)))`` with the tanh GELU, ``fc`` to ``ffn_dim``, biases.

    Args:
      config: the model configuration.
      rngs: random streams.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        make = functools.partial(
            linear, use_bias=True, sigma_reparam=config.sigma_reparam, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype,
        )  # fmt: skip
        self.fc = make(config.d_model, config.ffn_dim, std=config.init_std)
        self.proj = make(config.ffn_dim, config.d_model, std=_residual_std(config))
        self.drop = _maybe_dropout(config.dropout, rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = False) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        hidden = jax.nn.gelu(_call_linear(self.fc, x, deterministic), approximate=True)  # [B, T, F]
        y = _call_linear(self.proj, hidden, deterministic)  # [B, T, D]
        return _dropout(self.drop, y, deterministic)


class SwiGLU(nnx.Module):
    """LLaMA MLP: ``down(silu(gate(x)) * up(x))``, no biases.

    Args:
      config: the model configuration.
      rngs: random streams.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        make = functools.partial(
            linear, use_bias=False, sigma_reparam=config.sigma_reparam, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype,
        )  # fmt: skip
        self.gate = make(config.d_model, config.ffn_dim, std=config.init_std)
        self.up = make(config.d_model, config.ffn_dim, std=config.init_std)
        self.down = make(config.ffn_dim, config.d_model, std=_residual_std(config))
        self.drop = _maybe_dropout(config.dropout, rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = False) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        gate = jax.nn.silu(_call_linear(self.gate, x, deterministic))  # [B, T, F]
        hidden = gate * _call_linear(self.up, x, deterministic)  # [B, T, F]
        y = _call_linear(self.down, hidden, deterministic)  # [B, T, D]
        return _dropout(self.drop, y, deterministic)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Args:
      config: the model configuration.
      rngs: random streams.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = norm(config.arch, config.d_model, eps=config.eps, **kw)
        self.attn = Attention(config, **kw)
        self.ln_2 = norm(config.arch, config.d_model, eps=config.eps, **kw)
        self.mlp = MLP(config, **kw) if config.arch == "gpt2" else SwiGLU(config, **kw)

    def __call__(
        self, x: jax.Array, *, deterministic: bool = False, return_entropy: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """``[B, T, D] -> ([B, T, D], [n_head] entropy or None)``."""
        y, entropy = self.attn(
            self.ln_1(x), deterministic=deterministic, return_entropy=return_entropy
        )
        x = x + y  # [B, T, D]
        x = x + self.mlp(self.ln_2(x), deterministic=deterministic)  # [B, T, D]
        return x, entropy


class Transformer(nnx.Module):
    """Decoder-only language model (GPT-2 or LLaMA style, by ``config.arch``).

    Calling it maps ``[B, T]`` int tokens to ``[B, T, vocab_size]`` float32 logits (soft-capped
    if ``config.logit_softcap``); with ``return_metrics=True`` it returns ``(logits, metrics)``
    with ``metrics["attn_entropy"]`` of shape ``[n_layer, n_head]``.

    Args:
      config: the model configuration.
      rngs: random streams (``params``; ``dropout`` when ``config.dropout > 0``).
      dtype: compute dtype; ``None`` means ``config.dtype``.
      param_dtype: parameter dtype; ``None`` means ``config.param_dtype``.

    Example:
      >>> model = Transformer(ModelConfig.preset("gpt2-tiny"), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 256)
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype | None = None,
        param_dtype: Dtype | None = None,
    ):
        dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
        param_dtype = config.params_dtype if param_dtype is None else jnp.dtype(param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.normal(config.init_std)
        d = config.d_model
        self.config = config
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=init, **kw)
        self.wpe = (
            nnx.Embed(config.block_size, d, embedding_init=init, **kw)
            if config.arch == "gpt2"
            else None
        )
        self.drop = _maybe_dropout(config.dropout, rngs)
        self.blocks = nnx.List([Block(config, **kw) for _ in range(config.n_layer)])
        self.ln_f = norm(config.arch, d, eps=config.eps, **kw)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(d, config.vocab_size, use_bias=False, kernel_init=init, **kw)
        )
        self.deterministic = False

    def __call__(
        self,
        tokens: jax.Array,
        *,
        deterministic: bool | None = None,
        return_metrics: bool = False,
    ) -> jax.Array | tuple[jax.Array, Metrics]:
        """Logits of the next token at every position.

        Args:
          tokens: ``[B, T]`` integer tokens, ``T <= block_size``.
          deterministic: evaluation mode (no dropout, σReparam vectors not updated); ``None``
            uses the mode set by ``model.train()`` / ``model.eval()`` (training by default).
          return_metrics: also return ``{"attn_entropy": [n_layer, n_head]}``.

        Returns:
          ``[B, T, vocab_size]`` float32 logits, or ``(logits, metrics)``.

        Raises:
          ValueError: if ``T > block_size``.
        """
        config = self.config
        deterministic = self.deterministic if deterministic is None else deterministic
        _, t = tokens.shape
        if t > config.block_size:
            raise ValueError(f"Sequence length {t} exceeds block_size={config.block_size}.")
        x = self.wte(tokens)  # [B, T, D]
        if self.wpe is not None:
            x = x + self.wpe(jnp.arange(t))[None]  # [B, T, D]
        x = shrink_gradient(x, config.embed_grad_shrink)
        x = _dropout(self.drop, x, deterministic)
        entropies = []
        for block in self.blocks:
            x, entropy = block(x, deterministic=deterministic, return_entropy=return_metrics)
            entropies.append(entropy)
        x = self.ln_f(x)  # [B, T, D]
        logits = self.wte.attend(x) if self.lm_head is None else self.lm_head(x)  # [B, T, V]
        logits = logits.astype(jnp.float32)
        if config.logit_softcap is not None:
            logits = softcap(logits, config.logit_softcap)
        if return_metrics:
            return logits, {"attn_entropy": jnp.stack(entropies)}  # [L, H]
        return logits

    def loss(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, Metrics]:
        """Language-model loss with the configuration's ``output`` and ``z_loss``.

        Args:
          tokens: ``[B, T]`` input tokens.
          targets: ``[B, T]`` next tokens.
          mask: optional ``[B, T]`` weights (1 = counted).
          deterministic: as in ``__call__``.

        Returns:
          ``(loss, metrics)`` from :func:`models.losses.lm_loss`.
        """
        logits = self(tokens, deterministic=deterministic)
        return lm_loss(
            logits, targets, z_loss=self.config.z_loss, output=self.config.output, mask=mask
        )


def make_model(
    config: ModelConfig | str, *, seed: int = 0, rngs: nnx.Rngs | None = None, **overrides: Any
) -> Transformer:
    """A :class:`Transformer` from a configuration or a preset name.

    Args:
      config: a :class:`ModelConfig` or a preset name (``"llama-tiny"``).
      seed: seed of the ``params`` and ``dropout`` streams when ``rngs`` is not given.
      rngs: random streams (overrides ``seed``).
      **overrides: :class:`ModelConfig` fields replaced before building.

    Returns:
      The model, in training mode.
    """
    if isinstance(config, str):
        config = ModelConfig.preset(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return Transformer(config, rngs=rngs if rngs is not None else nnx.Rngs(seed))
