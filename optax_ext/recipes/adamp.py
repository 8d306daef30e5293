"""AdamP and SGDP (Heo et al., 2021), and ⊥Grad AdamW (Prieto et al., 2025)."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.moments import momentum, scale_by_adam
from optax_ext.primitives.radial import project_out_parallel, project_out_radial
from optax_ext.recipes import _common


def adamp(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    channel_axis: str = "last",
) -> optax.GradientTransformation:
    """AdamP: Adam whose updates lose their radial component on scale-invariant weights.

    Algorithm (per tensor; see :func:`optax_ext.project_out_radial`)::

        m, v <- Adam moments;  u = m_hat / (sqrt(v_hat) + eps)   (nesterov: b1 m + (1-b1) g)
        if a channel/layer view of (g, W) is near-orthogonal (cos < delta/sqrt(dim)):
            u <- u - W^ <W^, u> per row;   ratio <- wd_ratio     (else ratio 1)
        W <- W (1 - lr wd ratio) - lr u

    Args:
      learning_rate: Default 1e-3. b1, b2, eps: Defaults 0.9, 0.999, 1e-8.
      weight_decay: Default 0 (README example 1e-2).
      delta: Default 0.1. wd_ratio: Default 0.1 (keep both, say the authors).
      nesterov: Default False.
      channel_axis: output-channel axis, ``"last"`` for flax ``(in, out)`` kernels (rows of
        PyTorch weights) or ``"first"``. The channel view groups entries by output unit.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

    References:
      Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, 2021, "AdamP: Slowing Down the Slowdown for
      Momentum Optimizers on Scale-invariant Weights", ICLR 2021, arXiv 2006.08217; code:
      github.com/clovaai/AdamP (``adamp/adamp.py`` at 7f6f038).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.adamp()
      >>> p = {"w": jnp.ones((3, 4))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (3, 4)
    """
    return _common.float16_in_float32(optax.chain(
        project_out_radial(
            scale_by_adam(b1, b2, eps, nesterov=nesterov),
            delta=delta,
            wd_ratio=wd_ratio,
            weight_decay=weight_decay,
            eps=eps,
            channel_axis=channel_axis,
        ),
        optax.scale_by_learning_rate(learning_rate),
    ))


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.0,
    weight_decay: float = 0.0,
    *,
    nesterov: bool = False,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    channel_axis: str = "last",
) -> optax.GradientTransformation:
    """SGDP: SGD with momentum and AdamP's radial projection.

    Algorithm::

        b <- mu b + g;   d = g + mu b (nesterov) or b
        project d as AdamP does (test on g and W);  W <- W (1 - lr wd ratio) - lr d

    Args:
      learning_rate: required (the reference has no default).
      beta: momentum ``mu``. Default 0 (reference default). Dampening is not offered (0).
      weight_decay: Default 0.
      nesterov, delta, wd_ratio, eps, channel_axis: as :func:`adamp`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

    References:
      Heo et al., 2021, arXiv 2006.08217; code: github.com/clovaai/AdamP (``adamp/sgdp.py`` at
      7f6f038).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.sgdp(0.1, 0.9)
      >>> p = {"w": jnp.ones((3, 4))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (3, 4)
    """
    return _common.float16_in_float32(optax.chain(
        project_out_radial(
            momentum(beta, nesterov=nesterov, ema=False),
            delta=delta,
            wd_ratio=wd_ratio,
            weight_decay=weight_decay,
            eps=eps,
            channel_axis=channel_axis,
        ),
        optax.scale_by_learning_rate(learning_rate),
    ))


def perp_adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """⊥AdamW: AdamW on gradients with their weight-parallel component removed.

    Algorithm (per tensor)::

        g <- g - (<g, W> / <W, W>) W
        W <- W (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)

    Args:
      learning_rate, b1, b2, eps: Adam (defaults 1e-3, 0.9, 0.999, 1e-8).
      weight_decay: Default 0.01 (``torch.optim.AdamW``).
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformation`` (needs ``params``).

    References:
      Prieto, Barsbey, Mediano, Birdal, 2025, "Grokking at the Edge of Numerical Stability",
      ICLR 2025, arXiv 2501.04697 (⊥Grad); code:
      github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.perp_adamw()
      >>> p = {"w": jnp.ones((3, 4))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (3, 4)
    """
    decay = optax.add_decayed_weights(weight_decay, mask)
    return _common.float16_in_float32(optax.chain(
        project_out_parallel(),
        scale_by_adam(b1, b2, eps),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    ))
