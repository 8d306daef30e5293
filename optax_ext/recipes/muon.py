"""Muon: momentum orthogonalized by Newton-Schulz (Jordan et al., 2024)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.newton_schulz import NewtonSchulz, PolarSVD
from optax_ext.primitives.moments import momentum
from optax_ext.primitives.orthogonalize import orthogonalize, scale_by_shape
from optax_ext.recipes import _common


def scale_by_muon(
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    ema: bool = True,
    ns: NewtonSchulz | PolarSVD = NewtonSchulz.muon(),
    shape_rule: str = "sqrt_fan_out_over_fan_in",
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Muon's direction for hidden matrices: momentum, orthogonalized, shape-scaled.

    Algorithm (``G`` the gradient, ``M`` the momentum)::

        M <- b M + (1 - b) G;  U <- (1 - b) G + b M      # ema=True, nesterov=True (default)
        M <- b M + G;          U <- G + b M              # ema=False (modded-nanogpt, Oct 2024)
        U <- NS5(U)                                      # in the (fan_in, fan_out) view
        U <- U * shape_factor(fan_in, fan_out)           # default sqrt(max(1, fan_out/fan_in))

    Args:
      beta: momentum ``b``. Default 0.95.
      nesterov: Nesterov look-ahead. Default True (the reference classes fix it on).
      ema: EMA (``lerp``) momentum (default) or the sum form of the Oct 2024 speedrun record.
      ns: orthogonalization; default ``NewtonSchulz.muon()`` (5 bf16 quintic steps). Use
        ``NewtonSchulz.polar_express()`` for the per-step coefficients of current speedruns.
      shape_rule: a key of :data:`optax_ext.SHAPE_RULES`: ``"sqrt_fan_out_over_fan_in"``
        (KellerJordan/Muon), ``"sqrt_max_dim"`` (unit RMS, Oct 2024 records) or ``"moonlight"``
        (``0.2 sqrt(max(fan_in, fan_out))``, AdamW-matched RMS).
      specs: which axes are fan-in/fan-out (default :func:`optax_ext.labels.matrix_view`).
      mu_dtype: momentum dtype (default: parameter dtype).

    Returns:
      An ``optax.GradientTransformation`` (chain of momentum, orthogonalize, scale_by_shape).
    """
    return optax.chain(
        momentum(beta, nesterov=nesterov, ema=ema, mu_dtype=mu_dtype),
        orthogonalize(ns, specs=specs),
        scale_by_shape(shape_rule, specs=specs),
    )


MUON_ADAM_LR_RATIO = 3e-4 / 0.02
"""Muon's auxiliary Adam lr over its main lr in the reference (KellerJordan/Muon README)."""


def muon(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    beta: float = 0.95,
    weight_decay: float = 0.0,
    *,
    nesterov: bool = True,
    ema: bool = True,
    ns: NewtonSchulz | PolarSVD = NewtonSchulz.muon(),
    shape_rule: str = "sqrt_fan_out_over_fan_in",
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float | None = None,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Muon on hidden matrices, Adam on embeddings, head and vectors (``MuonWithAuxAdam``).

    Algorithm (hidden matrices ``W``; see :func:`scale_by_muon`)::

        U <- shape_factor * NS5(nesterov(momentum(G)))
        W <- W (1 - lr wd) - lr U

    Everything else (labels ``"embed"``, ``"head"``, ``"vector"`` of
    :func:`optax_ext.labels.hidden_matrices`) takes the reference's auxiliary Adam:
    ``W <- W (1 - lr_a wd_a) - lr_a m_hat / (sqrt(v_hat) + eps)``.

    Args:
      learning_rate: lr of the hidden matrices. Default 0.02.
      beta: momentum. Default 0.95.
      weight_decay: decoupled decay of the hidden matrices (multiplicative, before the step).
        Default 0.
      nesterov, ema, ns, shape_rule, specs, mu_dtype: see :func:`scale_by_muon`. The
        orthogonalization acts on the ``(fan_in, fan_out)`` view of each flax ``(in, out)``
        kernel; the KJ factor is ``sqrt(max(1, fan_out / fan_in))``.
      adam_learning_rate: lr of the auxiliary Adam. Default ``0.015 * learning_rate`` (the
        reference's 3e-4 at lr 0.02), a scaled copy that follows a schedule passed as
        ``learning_rate`` (and ``optax.inject_hyperparams``); an explicit value wins.
      adam_b1, adam_b2, adam_eps: Default 0.9, 0.95, 1e-10.
      adam_weight_decay: decay of the auxiliary group; default ``weight_decay``.
      param_labels: labels tree or function with values ``"hidden"``/``"other"`` or the four
        labels of :func:`optax_ext.labels.param_labels`; default
        :func:`optax_ext.labels.hidden_matrices`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
      https://kellerjordan.github.io/posts/muon/ ; code: github.com/KellerJordan/Muon
      (``muon.py`` at 857d1ad); Liu et al., 2025, "Muon is Scalable for LLM Training",
      arXiv 2502.16982 (Moonlight scale).

    Notes:
      - Follows the code: EMA momentum (the blog writes ``M <- mu M + G``; equivalent up to the
        ``(1 - b)`` factor that the normalisation removes), multiplicative decay before the step.
      - Conv/N-D leaves: the shape factor uses the flattened matrix view; the reference reads the
        raw last two dims of a 4-D PyTorch gradient (``kh / kw``), which we do not copy.
      - The reference leaves the bf16 NS output in bf16; we cast back to the update dtype.
      - float16 parameters: float32 state and arithmetic, float16 updates; zero-size leaves
        pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((4, 8))}, "ln": {"scale": jnp.ones(8)}}
      >>> tx = optax_ext.muon(0.02)
      >>> g = jax.tree.map(jnp.ones_like, params)
      >>> u, _ = tx.update(g, tx.init(params), params)
      >>> u["mlp"]["kernel"].shape, u["ln"]["scale"].shape
      ((4, 8), (8,))
    """
    hidden = optax.chain(
        scale_by_muon(
            beta,
            nesterov=nesterov,
            ema=ema,
            ns=ns,
            shape_rule=shape_rule,
            specs=specs,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    other = _common.adamw(
        _common.auxiliary_learning_rate(adam_learning_rate, learning_rate, MUON_ADAM_LR_RATIO),
        adam_b1,
        adam_b2,
        adam_eps,
        weight_decay if adam_weight_decay is None else adam_weight_decay,
    )
    return _common.float16_in_float32(_common.hidden_and_other(hidden, other, param_labels))
