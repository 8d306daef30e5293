"""AuON and Hybrid-AuON: momentum braked by the RMS of its elementwise cosh (Maity, 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.newton_schulz import NewtonSchulz
from optax_ext.primitives.moments import momentum
from optax_ext.primitives.normalize import scale_by_cosh_rms
from optax_ext.primitives.orthogonalize import orthogonalize, scale_by_shape
from optax_ext.recipes import _common

VARIANTS = ("head", "hybrid", "v1")


def scale_by_auon(
    beta: float = 0.95,
    gamma: float = 1.5,
    *,
    variant: str = "head",
    nesterov: bool = True,
    ns: NewtonSchulz = NewtonSchulz(dtype="float32"),
    v1_dtype: str | None = "bfloat16",
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AuON's direction: EMA Nesterov momentum, optionally orthogonalized, then the cosh brake.

    Algorithm::

        M <- b M + (1 - b) G;   U <- (1 - b) G + b M
        "hybrid":  U <- NS5(U)                          (fp32, Muon's triple)
        "head"/"hybrid":  U <- U / (sqrt(mean(cosh(gamma U/||U||)^2)) + 1e-8)
        "v1":      X = U/||U||;  U <- sqrt(max(1, n/m)) X / (sqrt(mean(cosh(X)^2)) + 1e-8)

    Args:
      beta: momentum. Default 0.95.
      gamma: cosh scale (HEAD). Default 1.5; v1 uses 1 regardless.
      variant: ``"head"`` (package ``AuON``), ``"hybrid"`` (``HybridAuON``) or ``"v1"`` (the
        arXiv v1 code).
      nesterov: Default True.
      ns: the Hybrid's orthogonalization; default 5 fp32 Muon steps.
      v1_dtype: compute dtype of v1's normalisation (the reference casts to bf16).
      specs, mu_dtype: see :func:`optax_ext.scale_by_muon`.

    Returns:
      An ``optax.GradientTransformation``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    mom = momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype)
    if variant == "v1":
        return optax.chain(
            mom,
            scale_by_cosh_rms(1.0, normalize=True, dtype=v1_dtype, specs=specs),
            scale_by_shape("sqrt_fan_out_over_fan_in", specs=specs),
        )
    ortho = [orthogonalize(ns, specs=specs)] if variant == "hybrid" else []
    return optax.chain(mom, *ortho, scale_by_cosh_rms(gamma, specs=specs))


AUON_ADAM_LR_RATIO = 8e-3 / 0.24
"""AuON's auxiliary Adam lr over its main lr (the package's class defaults)."""


def auon(
    learning_rate: optax.ScalarOrSchedule = 0.24,
    beta: float = 0.95,
    weight_decay: float = 0.0,
    *,
    gamma: float = 1.5,
    variant: str = "head",
    nesterov: bool = True,
    ns: NewtonSchulz = NewtonSchulz(dtype="float32"),
    v1_dtype: str | None = "bfloat16",
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.8,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.01,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AuON on hidden matrices, the package's Adam on embeddings, head and vectors.

    Algorithm (hidden matrices, ``auon/optimizer.py``; see :func:`scale_by_auon`)::

        W <- W (1 - lr wd)
        M <- b M + (1 - b) G;   U <- (1 - b) G + b M
        W <- W - lr U / (sqrt(mean(cosh(gamma U / (||U||_F + 1e-7))^2)) + 1e-8)

    The brake ``r >= 1`` is ~1 unless the momentum concentrates in a few entries, so the step is
    an SGD step with EMA-Nesterov momentum (no normalisation, no shape factor): use lr ~0.1-0.24.
    Other parameters take ``auon.Adam``: ``W <- W (1 - lr_a wd_a) - lr_a sqrt(1 - b2^t)/(1 -
    b1^t) m / (sqrt(v) + eps)``.

    Args:
      learning_rate: Default 0.24 (class default; the README example uses 0.08).
      beta: momentum. Default 0.95.
      weight_decay: decoupled decay of the hidden matrices. Default 0.
      gamma: Default 1.5.
      variant: ``"head"`` (default), ``"hybrid"`` (5 fp32 NS steps before the brake, the
        package's ``HybridAuON``; the paper describes one step) or ``"v1"`` (arXiv v1:
        unit-norm direction with the KJ factor ``sqrt(max(1, fan_out / fan_in))``).
      nesterov, ns, v1_dtype, specs, mu_dtype: see :func:`scale_by_auon`; the statistics are per
        matrix of the ``(fan_in, fan_out)`` view.
      adam_learning_rate: Default ``learning_rate / 30`` (the package defaults 8e-3 and 0.24),
        a scaled copy that follows a schedule passed as ``learning_rate``; an explicit value
        wins. adam_b1, adam_b2, adam_eps: 0.8, 0.95, 1e-8.
      adam_weight_decay: Default 0.01 (``auon.Adam`` default).
      param_labels: as :func:`optax_ext.muon`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: for an unknown variant; in ``init`` for a hidden leaf with ``ndim < 2``.

    References:
      Maity, 2025, "AuON: A Linear-time Alternative to (Semi-)Orthogonal Momentum Updates",
      arXiv 2509.24320; code: github.com/ryyzn9/AuON (``auon/optimizer.py``, ``auon/adam.py`` at
      bba2e82; v1 ``Auon_Adam_train.py`` at c87b862).

    Notes:
      - HEAD and v1 are different algorithms (HEAD: update ~ momentum; v1: unit-norm update),
        so their learning rates do not transfer.
      - HEAD accepts any tensor; following the README we route ``ndim < 2`` parameters,
        embeddings and the head to the Adam group.
      - HEAD skips the step when ``||U|| = 0``; our brake maps a zero update to zero, the same.

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((4, 8))}, "ln": {"scale": jnp.ones(8)}}
      >>> tx = optax_ext.auon()
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["mlp"]["kernel"].shape
      (4, 8)
    """
    hidden = optax.chain(
        scale_by_auon(
            beta,
            gamma,
            variant=variant,
            nesterov=nesterov,
            ns=ns,
            v1_dtype=v1_dtype,
            specs=specs,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_learning_rate = _common.auxiliary_learning_rate(
        adam_learning_rate, learning_rate, AUON_ADAM_LR_RATIO
    )
    other = _common.adamw(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay, bias_correction="hf"
    )
    return _common.hidden_and_other(hidden, other, param_labels)


def hybrid_auon(
    learning_rate: optax.ScalarOrSchedule = 0.24,
    beta: float = 0.95,
    weight_decay: float = 0.0,
    *,
    gamma: float = 1.5,
    nesterov: bool = True,
    ns: NewtonSchulz = NewtonSchulz(dtype="float32"),
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.8,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.01,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Hybrid-AuON: :func:`auon` with ``variant="hybrid"`` (5 fp32 Newton-Schulz steps, then the
    cosh brake). Same arguments and defaults as :func:`auon`.

    References:
      Maity, 2025, arXiv 2509.24320; code: github.com/ryyzn9/AuON (``HybridAuON`` at bba2e82).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.hybrid_auon(0.02)
      >>> p = {"w": jnp.ones((4, 8))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (4, 8)
    """
    return auon(
        learning_rate,
        beta,
        weight_decay,
        gamma=gamma,
        variant="hybrid",
        nesterov=nesterov,
        ns=ns,
        adam_learning_rate=adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_eps=adam_eps,
        adam_weight_decay=adam_weight_decay,
        param_labels=param_labels,
        specs=specs,
        mu_dtype=mu_dtype,
    )
