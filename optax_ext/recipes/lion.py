"""Lion (Chen et al., 2023) and Lion-K (Chen, Liang, Liu, 2023)."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.elementwise import scale_by_lion
from optax_ext.recipes import _common


def lion(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    mask: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Lion: the sign of an interpolated momentum, with decoupled weight decay.

    Algorithm::

        W <- W (1 - lr wd)
        W <- W - lr sign(b1 m + (1 - b1) g);   m <- b2 m + (1 - b2) g

    Args:
      learning_rate: Default 1e-4 (use 3-10x less than AdamW's, README).
      b1, b2: Defaults 0.9, 0.99 (README: 0.95, 0.98 is more stable in some runs).
      weight_decay: Default 0 (authors; ``optax.lion`` defaults to 1e-3). Use 3-10x AdamW's.
      mask: weight-decay mask (tree or function).
      mu_dtype: momentum dtype; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023,
      arXiv 2302.06675; code: github.com/google/automl (``lion/lion_pytorch.py`` at 6a54c87).

    Notes:
      The decay is added to the signed update before the learning rate (``W - lr (sign + wd
      W)``), the authors' optax form; it differs from the PyTorch ``W (1 - lr wd) - lr sign``
      by float32 rounding only (<= 3e-7 over 12 steps at wd 0.1).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.lion(0.1)
      >>> u, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)), jnp.zeros(2))
      >>> [round(float(x), 6) for x in u]
      [-0.1, 0.1]
    """
    return _common.tied(optax.chain(
        scale_by_lion(b1, b2, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))


def lion_k(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    k: str = "l1",
    k_param: float = 1.0,
    mask: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Lion-K: Lion with the sign replaced by the (sub)gradient of a convex ``K``.

    Algorithm::

        W <- W - lr (grad K(b1 m + (1 - b1) g) + wd W);   m <- b2 m + (1 - b2) g

    With ``K = ||.||_1`` (``k="l1"``) this is Lion; the paper shows Lion-K minimises
    ``f(x) + K*(x)``-type objectives, i.e. solves the problem constrained to ``{||x||_inf <=
    1/wd}`` for Lion.

    Args:
      learning_rate, b1, b2, weight_decay, mask, mu_dtype: as :func:`lion`.
      k: ``"l1"`` (sign, Lion), ``"l2"`` (per-tensor normalised momentum) or ``"huber"``
        (``clip(x / k_param, -1, 1)``: linear near zero, sign beyond ``k_param``).
      k_param: Huber threshold. Default 1.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: for an unknown ``k``.

    References:
      Chen, Liang, Liu, 2023, "Lion Secretly Solves Constrained Optimization: As Lyapunov
      Predicts", ICLR 2024, arXiv 2310.05898.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.lion_k(1.0, k="huber", k_param=1.0)
      >>> u, _ = tx.update(jnp.array([5.0, -40.0]), tx.init(jnp.zeros(2)), jnp.zeros(2))
      >>> [round(float(x), 3) for x in u]
      [-0.5, 1.0]
    """
    return _common.tied(optax.chain(
        scale_by_lion(b1, b2, k=k, k_param=k_param, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))
