"""Sophia (Liu et al., 2023) and AdaHessian (Yao et al., 2021)."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.hessian import scale_by_adahessian, scale_by_sophia
from optax_ext.recipes import _common


def sophia(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    *,
    batch_size: float = 5120,
    update_every: int = 10,
    variant: str = "g",
    gamma: float = 0.01,
    eps: float = 1e-12,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia: sign momentum clipped by a diagonal Hessian estimate refreshed every k steps.

    Algorithm (see :func:`optax_ext.scale_by_sophia`)::

        W <- W (1 - lr wd)
        W <- W - lr sign(m) min(|m| / (rho B h + 1e-15), 1)       (each entry moves <= lr)

    ``update`` needs ``hessian_fn=params -> estimate`` (called only on refresh steps, inside a
    ``lax.cond``) or ``hessian=<tree>``: for SophiaG the Gauss-Newton-Bartlett estimate
    (:func:`optax_ext.kernels.gauss_newton_bartlett`, sampled labels on the next batch), for
    the Hutchinson variant :func:`optax_ext.kernels.hutchinson` with Gaussian probes.

    Args:
      learning_rate: Default 1e-4 (README GPT-2 125M: 6e-4 with rho 0.05, wd 0.2).
      b1, b2: Defaults 0.965, 0.99.
      rho: Default 0.04; tune it so that 10-50% of the entries are unclipped.
      weight_decay: decoupled, before the step. Default 0.1.
      batch_size: ``B`` (tokens per step). Default 5120 (``step(bs=5120)``).
      update_every: ``k``. Default 10.
      variant: ``"g"`` (SophiaG, default) or ``"h"`` (levanter's Hutchinson form).
      gamma, eps: for ``"h"``.
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Liu, Li, Hall, Liang, Ma, 2023, "Sophia", arXiv 2305.14342; code:
      github.com/Liuhong99/Sophia (``sophia.py``, ``train_sophiag.py`` at a7e1572).

    Notes:
      ``optax.contrib.sophia`` runs its own Hutchinson estimator every step-interval with a
      fixed key schedule and bias-corrects the momentum; ours reproduces the official SophiaG
      (no bias correction, clip ratio with ``rho B h``) and accepts any estimator.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.sophia()
      >>> p = jnp.ones(3)
      >>> tx.update(p, tx.init(p), p, hessian=jnp.ones(3))[0].shape
      (3,)
    """
    return _common.tied(optax.chain(
        scale_by_sophia(
            b1,
            b2,
            rho,
            batch_size=batch_size,
            update_every=update_every,
            variant=variant,
            gamma=gamma,
            eps=eps,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))


def adahessian(
    learning_rate: optax.ScalarOrSchedule = 0.15,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    *,
    hessian_power: float = 1.0,
    spatial: str | int = "none",
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaHessian: Adam whose second moment is the EMA of the squared Hutchinson diagonal.

    Algorithm (see :func:`optax_ext.scale_by_adahessian`)::

        W <- W - lr (m_hat / ((sqrt(u))^p / (sqrt(1 - b2^k))^p + eps) + wd W)

    ``update`` needs, every step, ``hessian_fn=params -> v * (H v)`` (e.g.
    ``lambda p: optax_ext.kernels.hutchinson(loss, p, key)``) or ``hessian=<tree>``.

    Args:
      learning_rate: Default 0.15. b1, b2: Defaults 0.9, 0.999. eps: Default 1e-4.
      weight_decay: lr-scaled, not preconditioned. Default 0.
      hessian_power: Default 1 (0.5 suggested for some tasks).
      spatial: ``"none"`` (README's file), ``"row"`` (the instruction file) or a block size.
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Yao et al., 2021, "ADAHESSIAN", AAAI 2021, arXiv 2006.00719; code:
      github.com/amirgholami/adahessian (85ebc00).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.adahessian()
      >>> p = jnp.ones(3)
      >>> tx.update(p, tx.init(p), p, hessian=jnp.ones(3))[0].shape
      (3,)
    """
    return _common.tied(optax.chain(
        scale_by_adahessian(b1, b2, eps, hessian_power=hessian_power, spatial=spatial),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))
