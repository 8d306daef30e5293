"""Conda: column-normalized Adam (Wang et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.projections import SVDProjector
from optax_ext.primitives.normalize import column_normalize
from optax_ext.primitives.projection import Projector
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def conda(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    projector: Projector = SVDProjector(rank=None, update_every=50),
    scale: float = 1.0,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Conda: Adam normalization in the full singular basis of the first moment.

    Algorithm (hidden matrices; ``k`` the 0-based step, ``t = k + 1``)::

        M <- b1 M + (1 - b1) G
        if k mod T == 0:  P <- all singular vectors of M on the smaller side
        V <- b2 V + (1 - b2) (P^T G)^2
        W <- W - lr sqrt(1 - b2^t)/(1 - b1^t) scale P ((P^T M) / (sqrt(V) + eps))
        W <- W (1 - lr wd)                                       # after the step, plain lr

    Other parameters take the same class's HF AdamW path (same lr, betas, eps, wd).

    Args:
      learning_rate: Default 1e-3 (class default). Released LLaMA scripts: 0.01 with betas
        (0.9, 0.99), gap 2000, scale 0.25; GPT-2: 0.006, wd 0.01, scale 0.25, gap 2000.
      b1, b2: Defaults 0.9, 0.999. eps: Default 1e-8 (the signature's; the docstring says 1e-6).
      weight_decay: Default 0.
      projector: default ``SVDProjector(rank=None, update_every=50)``: full-rank basis of the
        smaller side of the ``(fan_in, fan_out)`` view of a flax ``(in, out)`` kernel (fan-in on
        ties), refreshed at 0-based steps ``k % 50 == 0`` (argparse default ``update_proj_gap``).
      scale: multiplies the back-projected update (not the decay). Default 1.0.
      param_labels: default :func:`optax_ext.labels.hidden_matrices` (the launchers put the
        attention/MLP linear weights in the Conda group).
      specs, mu_dtype: see :func:`optax_ext.column_normalize`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      Wang, Zhou, Dong, Li, Li, Zhou, Lao, Fang, Lin, 2025, "Conda: Column-Normalized Adam for
      Training Large Language Models Faster", arXiv 2509.24218; code:
      github.com/jie040109/Conda (``conda_torch/conda.py``, ``projector.py`` at 449af71).

    Notes:
      Follows the code, not the paper: the basis comes from the SVD of the updated first moment
      (the paper's "left singular vectors" become the smaller side), is never truncated, ``V``
      lives in rotated coordinates and is not rotated at a refresh, HF bias correction, decay
      after the step with the unscaled lr. The update is invariant to singular-vector signs.
      float16 parameters get float32 state and arithmetic, and float16 updates; zero-size
      leaves pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}, "ln": {"scale": jnp.ones(16)}}
      >>> tx = optax_ext.conda()
      >>> u, s = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["mlp"]["kernel"].shape
      (8, 16)
    """
    hidden = optax.chain(
        column_normalize(b1, b2, eps, projector=projector, specs=specs, mu_dtype=mu_dtype),
        optax.scale(scale),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(weight_decay, learning_rate),
    )
    other = _common.adamw(
        learning_rate, b1, b2, eps, weight_decay, bias_correction="hf", decay_after_update=True
    )
    # float16 parameters: state and arithmetic in float32, the update cast back
    return _common.float16_in_float32(_common.hidden_and_other(hidden, other, param_labels))
