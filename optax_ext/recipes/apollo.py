"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-level performance (Zhu et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.projections import RandomProjector
from optax_ext.primitives.moments import scale_by_adam, scale_by_bias_correction
from optax_ext.primitives.normalize import norm_growth_limiter
from optax_ext.primitives.projection import Projector, scale_by_projected_norm_ratio
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def scale_by_apollo(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    projector: Projector = RandomProjector(rank=256, update_every=200),
    scale_type: str = "channel",
    scale: float = 1.0,
    scale_front: bool = False,
    limiter: bool = True,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """APOLLO's direction before the learning rate (see :func:`apollo`)."""
    root = scale**0.5
    return optax.chain(
        scale_by_projected_norm_ratio(
            scale_by_adam(b1, b2, eps, bias_correction="none"),
            projector,
            scale_type=scale_type,
            specs=specs,
        ),
        optax.scale(root) if scale_front else optax.identity(),
        norm_growth_limiter(1.01, specs=specs) if limiter else optax.identity(),
        optax.identity() if scale_front else optax.scale(root),
        scale_by_bias_correction(b1, b2),
    )


def apollo(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    projector: Projector = RandomProjector(rank=256, update_every=200),
    scale_type: str = "channel",
    scale: float = 1.0,
    scale_front: bool = False,
    limiter: bool = True,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """APOLLO: the raw gradient with per-channel learning rates estimated in a random sketch.

    Algorithm (hidden matrices; ``k`` the 0-based step, ``t = k + 1``)::

        if k mod T == 0:  P <- N(0, 1/r) random sketch of the smaller side (not orthonormal)
        R <- proj_P(G);   M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R^2
        N <- M / (sqrt(V) + eps);   phi_c = ||N_c|| / (||R_c|| + 1e-8)   per channel c
        S <- G * phi;   S <- limit(S) (norm growth <= 1.01x per step);   S <- sqrt(scale) S
        W <- W - lr sqrt(1 - b2^t)/(1 - b1^t) S;   W <- W (1 - lr wd)

    Other parameters take the HF AdamW path of the same class.

    Args:
      learning_rate: Default 1e-3 (class default; the released scripts use 0.01).
      b1, b2, eps: Defaults 0.9, 0.999, 1e-6.
      weight_decay: decoupled decay after the step with the plain lr. Default 0.
      projector: default ``RandomProjector(rank=256, update_every=200)`` (README: rank 1/4 of
        the model dim, gap 200); ``SVDProjector`` gives the ``proj="svd"`` variant. The projected
        side follows ``side="std"``: the smaller of fan-in/fan-out of a flax ``(in, out)``
        kernel; channels are the entries of the other side.
      scale_type: ``"channel"`` (APOLLO, default) or ``"tensor"`` (APOLLO-Mini).
      scale: the README's ``scale``; it enters as ``sqrt(scale)``. Default 1.
      scale_front: apply ``sqrt(scale)`` before the limiter (same result up to the 1e-8 guard).
      limiter: the norm-growth limiter (the reference's ``disable_nl=False``). Default True.
      param_labels, specs: as :func:`optax_ext.galore`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: for an unknown ``scale_type``; in ``init`` for a hidden leaf with ``ndim < 2``.

    References:
      Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, 2025, "APOLLO: SGD-like Memory,
      AdamW-level Performance", MLSys 2025, arXiv 2412.05270; code:
      github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py``, ``random_projector.py`` at
      76b3472).

    Notes:
      - Follows the code: ``sqrt(scale)`` (the argument is the square of the multiplier), the
        moments are kept across refreshes although the sketch is redrawn, HF bias correction on
        the whole step, decay after the step.
      - Random sketches: the reference draws them from torch's CPU Mersenne-Twister with a seed
        chain per parameter; we draw ``fold_in(fold_in(key(seed), leaf), step)`` (reproducible,
        resumable, not bit-equal to torch). Tests replay the recorded sketches.
      - float16 parameters: float32 state and arithmetic, float16 updates; zero-size leaves
        pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> from optax_ext.kernels import RandomProjector
      >>> params = {"w": jnp.ones((8, 16))}
      >>> tx = optax_ext.apollo(projector=RandomProjector(rank=2, update_every=10))
      >>> tx.update(params, tx.init(params), params)[0]["w"].shape
      (8, 16)
    """
    hidden = optax.chain(
        scale_by_apollo(
            b1,
            b2,
            eps,
            projector=projector,
            scale_type=scale_type,
            scale=scale,
            scale_front=scale_front,
            limiter=limiter,
            specs=specs,
        ),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(weight_decay, learning_rate),
    )
    other = _common.adamw(
        learning_rate, b1, b2, eps, weight_decay, bias_correction="hf", decay_after_update=True
    )
    return _common.float16_in_float32(_common.hidden_and_other(hidden, other, param_labels))


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    projector: Projector = RandomProjector(rank=1, update_every=200),
    scale: float = 128.0,
    scale_front: bool = True,
    limiter: bool = True,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """APOLLO-Mini: rank-1 sketch, one learning-rate factor per matrix (tensor-wise).

    :func:`apollo` with ``scale_type="tensor"``, rank 1 and ``scale=128`` (``sqrt(128)`` times
    the step), ``scale_front=True`` as in the released Mini scripts. The optimizer state is
    ``2 max(m, n) + 1`` numbers per ``m x n`` matrix: "SGD-like memory".

    References:
      Zhu et al., 2025, arXiv 2412.05270; code: github.com/zhuhanqing/APOLLO (76b3472).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> params = {"w": jnp.ones((8, 16))}
      >>> tx = optax_ext.apollo_mini()
      >>> tx.update(params, tx.init(params), params)[0]["w"].shape
      (8, 16)
    """
    return apollo(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        projector=projector,
        scale_type="tensor",
        scale=scale,
        scale_front=scale_front,
        limiter=limiter,
        param_labels=param_labels,
        specs=specs,
    )
