"""Building blocks: σReparam linear layer, rotary embeddings, soft-cap, gradient shrink, norms.

Every kernel is stored in Flax layout ``(fan_in, fan_out)``: a layer computes ``y = x @ W``.
PyTorch stores the transpose ``(out, in)``; where a formula comes from PyTorch code the docstring
says which side each vector lives on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


class SpectralState(nnx.Variable):
    """Power-iteration state of a σReparam layer (the vector ``u``).

    A plain :class:`flax.nnx.Variable`, not an :class:`flax.nnx.Param`: ``nnx.split(model,
    nnx.Param, ...)`` puts it with the non-trainable state, so optimizers never see it, and a
    training forward pass updates it in place.
    """


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)``, as ``torch.nn.functional.normalize``."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def power_iteration_step(kernel: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One power-iteration step for the spectral norm of a ``(fan_in, fan_out)`` kernel.

    With ``W = kernel^T`` the PyTorch ``(out, in)`` weight, this is the step of σReparam's
    ``SpectralNormedWeight``; ``u`` lives on the fan-in side (a right singular vector of ``W``,
    a left singular vector of ``kernel``)::

        v = normalize(W u)     = normalize(u @ kernel)   # [fan_out], no gradient
        u' = normalize(W^T v)  = normalize(kernel @ v)   # [fan_in], no gradient
        sigma = v^T W u'       = u' @ kernel @ v         # d sigma / d kernel = u' v^T

    Computed in float32 whatever the kernel dtype.

    Args:
      kernel: ``[fan_in, fan_out]`` matrix.
      u: ``[fan_in]`` current estimate of the top left singular vector of ``kernel``.

    Returns:
      ``(sigma, u_new)``: the scalar estimate of the largest singular value (differentiable in
      ``kernel``) and the updated ``[fan_in]`` vector (float32, no gradient).

    Example:
      >>> k = jnp.diag(jnp.array([3.0, 1.0]))
      >>> sigma, u = power_iteration_step(k, jnp.array([1.0, 0.0]))
      >>> float(sigma)
      3.0
    """
    k = kernel.astype(jnp.float32)  # [I, O]
    u = jax.lax.stop_gradient(u.astype(jnp.float32))  # [I]
    v = jax.lax.stop_gradient(_normalize(u @ k))  # [O]
    u_new = jax.lax.stop_gradient(_normalize(k @ v))  # [I]
    sigma = u_new @ k @ v  # []
    return sigma, u_new


class SigmaReparamLinear(nnx.Module):
    """σReparam linear layer: ``y = x @ (gamma / sigma(W)) W + b``.

    The kernel ``W`` (``(fan_in, fan_out)``) is divided by an estimate of its spectral norm and
    multiplied by a learnable scalar ``gamma``. The estimate takes one power-iteration step per
    call (:func:`power_iteration_step`) from a persistent vector ``u`` kept in a
    :class:`SpectralState`; a training call (``deterministic=False``) stores the new ``u``, an
    evaluation call does the same step without storing it.

    **Algorithm** (Zhai et al., 2023; ``W`` in PyTorch layout ``(out, in)``)::

        v = normalize(W u);  u <- normalize(W^T v)       # stop-gradient
        sigma = v^T W u                                  # with gradient w.r.t. W
        W_hat = gamma * W / sigma

    Init: ``u`` is the top singular vector on the fan-in side from an SVD of the initial kernel
    and ``gamma`` is the initial spectral norm ``sigma_0``, so ``W_hat == W`` at init.

    Args:
      in_features: fan-in.
      out_features: fan-out.
      use_bias: add a bias (initialised to zeros).
      kernel_init: initializer of the kernel; ``None`` means ``N(0, 0.02^2)``.
      deterministic: default mode: ``False`` updates ``u`` on each call (``model.train()`` /
        ``model.eval()`` set it).
      rngs: random streams (``params``).
      dtype: compute dtype of the matmul (``None``: the input's). ``sigma`` is always float32.
      param_dtype: dtype of ``kernel``, ``bias`` and ``gamma``; ``u`` is float32.

    References:
      Zhai et al., "Stabilizing Transformer Training by Preventing Attention Entropy Collapse",
      ICML 2023, https://arxiv.org/abs/2303.06296. Reference code:
      https://github.com/apple/ml-sigma-reparam/blob/fea4e359126f812bd3e0a12234c56330fe4b5fa2/vision/layers.py
      (``SpectralNormedWeight``, ``SNLinear``).

    Notes:
      - Follows the PyTorch ``SNLinear``: ``gamma`` starts at ``sigma_0`` and ``u`` on the fan-in
        side. The authors' Flax ``SNDense`` (``speech/layers.py``) starts ``gamma`` at 1 and keeps
        ``u`` on the fan-out side; both estimate the same singular value.
      - Evaluation calls recompute ``sigma`` with one step from the stored ``u`` (as PyTorch in
        ``eval()``) instead of reusing a stored ``sigma`` (as ``SNDense``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        kernel_init: nnx.Initializer | None = None,
        deterministic: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kernel_init = kernel_init or nnx.initializers.normal(0.02)
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        left, s, _ = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
        self.kernel = nnx.Param(kernel)  # [I, O]
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.gamma = nnx.Param(s[0].astype(param_dtype))  # []
        self.u = SpectralState(left[:, 0])  # [I], float32
        self.in_features, self.out_features = in_features, out_features
        self.deterministic = deterministic
        self.dtype, self.param_dtype = dtype, param_dtype

    def sigma(self) -> jax.Array:
        """The current spectral-norm estimate (one step from the stored ``u``, not stored)."""
        return power_iteration_step(self.kernel[...], self.u[...])[0]

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """Applies the layer to the last axis of ``x`` (``[..., in_features]``)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        sigma, u = power_iteration_step(self.kernel[...], self.u[...])
        if not deterministic:
            self.u[...] = u
        dtype = self.dtype or x.dtype
        scale = self.gamma[...].astype(jnp.float32) / sigma  # []
        w_hat = (scale * self.kernel[...].astype(jnp.float32)).astype(dtype)  # [I, O]
        y = x.astype(dtype) @ w_hat  # [..., O]
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    std: float,
    sigma_reparam: bool = False,
    rngs: nnx.Rngs,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear | SigmaReparamLinear:
    """A hidden linear layer: ``nnx.Linear`` or :class:`SigmaReparamLinear`.

    Both have a ``kernel`` param of shape ``(in_features, out_features)`` drawn from
    ``N(0, std^2)`` and, if ``use_bias``, a zero ``bias``.
    """
    init = nnx.initializers.normal(std)
    if sigma_reparam:
        return SigmaReparamLinear(
            in_features,
            out_features,
            use_bias=use_bias,
            kernel_init=init,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=init,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def norm(
    arch: str,
    num_features: int,
    *,
    eps: float,
    rngs: nnx.Rngs,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.LayerNorm | nnx.RMSNorm:
    """LayerNorm (``scale``, ``bias``) for ``"gpt2"``, RMSNorm (``scale``) for ``"llama"``."""
    cls = nnx.LayerNorm if arch == "gpt2" else nnx.RMSNorm
    return cls(num_features, epsilon=eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
    """Rotary position embedding, in the LLaMA / Hugging Face "rotate half" layout.

    The head dimension is split into halves ``(x1, x2)`` rotated by angles
    ``position * theta^(-2i / head_dim)``: ``(x1 cos - x2 sin, x2 cos + x1 sin)``. Computed in
    float32 and cast back.

    Args:
      x: ``[B, T, H, Dh]`` queries or keys (``Dh`` even).
      positions: ``[T]`` integer positions.
      theta: base frequency.

    Returns:
      ``[B, T, H, Dh]``, the dtype of ``x``.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, Dh/2]
    cos = jnp.cos(angles)[None, :, None, :]  # [1, T, 1, Dh/2]
    sin = jnp.sin(angles)[None, :, None, :]  # [1, T, 1, Dh/2]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]  # [B, T, H, Dh/2]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, T, H, Dh]
    return out.astype(x.dtype)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """Logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2), smooth and bounded by ``cap``."""
    return cap * jnp.tanh(logits / cap)


def shrink_gradient(x: jax.Array, alpha: float) -> jax.Array:
    """GLM-130B gradient shrink: the identity forward, ``alpha`` times the gradient backward.

    Equal to GLM's ``alpha * x + (1 - alpha) * stop_gradient(x)``, written as
    ``stop_gradient(x) + alpha * (x - stop_gradient(x))`` so that the forward value is exactly
    ``x`` and the backward pass is exactly one multiplication by ``alpha``.

    References:
      Zeng et al., "GLM-130B: An Open Bilingual Pre-trained Model", ICLR 2023,
      https://arxiv.org/abs/2210.02414 (section 3.3, "Embedding Layer Gradient Shrink").
    """
    if alpha == 1.0:
        return x
    frozen = jax.lax.stop_gradient(x)
    return frozen + alpha * (x - frozen)
