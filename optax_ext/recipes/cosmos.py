"""COSMOS: SOAP on the leading eigensubspace, Muon on the rest (Liu et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext import labels
from optax_ext._types import SpecLike
from optax_ext.kernels.matricize import matrix_shape
from optax_ext.kernels.newton_schulz import NewtonSchulz
from optax_ext.primitives.preconditioners import (
    OnlinePCA,
    scale_by_cosmos,
    scale_by_cosmos_adam,
)
from optax_ext.recipes import _common


def cosmos_labels(params: Any, *, max_dim: int = 10000) -> Any:
    """``"hidden"`` for hidden matrices whose fan-out is <= ``max_dim``, else ``"other"``."""

    def label(path, x, lab):
        if lab != labels.HIDDEN:
            return "other"
        spec = labels.DEFAULT_RULE.matrix_spec(path, x)
        return labels.HIDDEN if matrix_shape(jnp.shape(x), spec)[2] <= max_dim else "other"

    return jax.tree_util.tree_map_with_path(label, params, labels.param_labels(params))


def cosmos(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    lr_ratio: float = 0.1,
    subspace: OnlinePCA = OnlinePCA(rank=64),
    gamma: float = 0.2,
    nesterov: bool = True,
    use_momentum_without_nesterov: bool = False,
    ns: NewtonSchulz = NewtonSchulz.muon(),
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """COSMOS on hidden matrices (update RMS ``lr * lr_ratio``), its own Adam elsewhere.

    Algorithm (hidden matrices; see :func:`optax_ext.scale_by_cosmos`)::

        D = A (SOAP-like part on the rank-r input subspace) + gamma NS5(residual)
        W <- W (1 - lr wd) - lr lr_ratio sqrt(mn) D / ||D||_F

    Other tensors (vectors, embeddings, head, and matrices with fan-out > 10000) take the
    reference's Adam (:func:`optax_ext.scale_by_cosmos_adam`): ``W <- W (1 - lr wd) - lr u``.

    Args:
      learning_rate: ``lr`` (the embeddings' lr). Default 1e-3 (README: 2e-3).
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8 (README: betas 0.95, 0.95).
      weight_decay: decoupled, before the step. Default 0 (README: 0.1).
      lr_ratio: hidden-matrix lr relative to ``lr``. Default 0.1 (README: 0.2).
      subspace: :class:`optax_ext.OnlinePCA`, rank 64 by default; the basis spans the fan-in
        side of flax ``(in, out)`` kernels (the PyTorch input dimension).
      gamma: Default 0.2.
      nesterov, use_momentum_without_nesterov: see the primitive (the code ignores the momentum
        when ``nesterov=False``; the flag offers the fixed form).
      ns: Newton-Schulz spec; default Muon's bf16 quintic (the reference's).
      param_labels: default: hidden matrices with fan-out <= 10000 (the reference's
        ``size(0) <= 10000`` rule, applied on top of the hidden-matrix labels).
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` for a hidden leaf with ``ndim < 2`` or ``rank > fan_in``.

    References:
      Liu, Xu, Zhang, Kang, Li, Liang, Chen, Zhao, 2025, "COSMOS: A Hybrid Adaptive Optimizer
      for Memory-Efficient Training of LLMs", arXiv 2502.17410; code: github.com/lliu606/COSMOS
      (``COSMOS_optim.py`` at 61de180).

    Notes:
      - Follows HEAD code, not the paper v3: ``sqrt(mn)`` for both normalisations, the
        ``lr_ratio`` factor, Nesterov with sum-form momentum.
      - The non-matrix Adam keeps the code's hard-coded ``0.1`` momentum coefficient and
        ``0.9`` bias-correction base, which is a consistent Adam only for ``b1 = 0.9``.
      - The basis is refreshed by one power-iteration + QR step every step (no period).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}, "ln": {"scale": jnp.ones(16)}}
      >>> tx = optax_ext.cosmos(subspace=optax_ext.OnlinePCA(rank=2))
      >>> u, s = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["mlp"]["kernel"].shape
      (8, 16)
    """
    hidden = optax.chain(
        scale_by_cosmos(
            b1,
            b2,
            eps,
            subspace=subspace,
            gamma=gamma,
            nesterov=nesterov,
            use_momentum_without_nesterov=use_momentum_without_nesterov,
            ns=ns,
            specs=specs,
        ),
        optax.scale(lr_ratio),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    other = optax.chain(
        scale_by_cosmos_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _common.float16_in_float32(
        _common.hidden_and_other(hidden, other, param_labels or cosmos_labels)
    )
