"""AdaBelief (Zhuang et al., 2020)."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.elementwise import scale_by_adabelief
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def adabelief(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    *,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdaBelief as in ``adabelief_pytorch`` 0.2.x: belief variance, RAdam rectification.

    Algorithm (see :func:`optax_ext.scale_by_adabelief`)::

        W <- W (1 - lr wd)                     (weight_decouple; fixed_decay: W (1 - wd))
        m <- b1 m + (1 - b1) g;  s <- b2 s + (1 - b2)(g - m)^2 + eps
        W <- W - lr * rectified step (SGD while rho_t < 5)

    Args:
      learning_rate: Default 1e-3 (README Transformer row: 5e-4).
      b1, b2: Defaults 0.9, 0.999.
      eps: Default 1e-16 (0.2.x; plays the role of Adam's eps squared).
      weight_decay: Default 0.
      rectify: Default True. degenerated_to_sgd: Default True.
      weight_decouple: decoupled decay (default) or L2 (``g <- g + wd W``).
      fixed_decay: with decoupling, ``W (1 - wd)`` instead of ``W (1 - lr wd)``.
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris, Duncan, 2020, "AdaBelief Optimizer:
      Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020, arXiv 2010.07468;
      code: github.com/juntang-zhuang/Adabelief-Optimizer (2855178).

    Notes:
      Defaults changed between package versions (0.0.5: eps 1e-8, no decoupling, no
      rectification); these are 0.2.x's. ``optax.adabelief`` has neither rectification nor the
      accumulated eps.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.adabelief()
      >>> tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))[0].shape
      (2,)
    """
    if not weight_decouple:
        return _common.tied(optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            scale_by_adabelief(b1, b2, eps, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd),
            optax.scale_by_learning_rate(learning_rate),
        ))
    core = scale_by_adabelief(b1, b2, eps, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd)
    if fixed_decay:
        return _common.tied(optax.chain(
            core,
            optax.scale_by_learning_rate(learning_rate),
            add_decoupled_weight_decay(weight_decay, 1.0, after_update=False, mask=mask),
        ))
    return _common.tied(optax.chain(
        core,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))
