"""Gradient spike clipping against the second moment of an inner transformation (SPAM)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._types import SpecLike
from optax_ext.primitives._matrices import MatrixLeaves, map_matrices
from optax_ext.primitives._state import get_field


class ClipSpikesState(NamedTuple):
    """State of :func:`clip_spikes`: step ``count`` (int32) and the wrapped ``inner_state``."""

    count: chex.Array
    inner_state: optax.OptState


def clip_spikes(
    inner: optax.GradientTransformation,
    threshold: float = 5000.0,
    *,
    every: int = 0,
    grace_steps: int = 0,
    nu_field: str = "nu",
) -> optax.GradientTransformation:
    """Clips gradient entries whose square exceeds ``threshold`` times the inner second moment.

    Algorithm (``v`` = the inner state's ``nu`` *before* this step's update, ``t`` 1-based)::

        if active(t):  g_i <- sign(g_i) * sqrt(threshold * v_i)   where  g_i^2 > threshold * v_i
        u, inner_state <- inner.update(g, inner_state)

    ``active(t)`` is ``t >= grace_steps`` and, when ``every > 0``, ``t mod every >= grace_steps``:
    SPAM switches clipping off for ``grace_steps`` steps after each momentum reset (its
    ``grad_accu_steps``), when ``v`` has just been zeroed. After the clip ``|g_i| <=
    sqrt(threshold * v_i)`` holds exactly.

    Args:
      inner: the transformation whose second moment is the reference (e.g. :func:`scale_by_adam`).
      threshold: spike threshold ``theta``; 0 disables clipping. Default 5000 (SPAM).
      every: reset period of an enclosing :func:`momentum_reset` (0: none). Default 0.
      grace_steps: see ``active`` above. Default 0.
      nu_field: name of the second-moment field in ``inner``'s state. Default ``"nu"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments of ``update`` are forwarded
      to ``inner``) with :class:`ClipSpikesState`.

    References:
      Huang et al., 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
      ICLR 2025, arXiv 2501.06842; code: github.com/TianjinYellow/SPAM-Optimizer
      (``galore_torch/SPAM.py`` at e8185fb).

    Notes:
      The reference compares against the raw (not bias-corrected) second moment, as here.
      Entries whose second moment is exactly 0 (no history since init or the last reset) are
      left alone; the reference would clip them to 0 if clipping were active then, which its
      defaults (``grace_steps`` = 20 after init and after every reset) avoid in practice.
      Non-finite gradient entries are not clipped (NaN fails the comparison; inf is clipped
      only when ``v`` is finite and the threshold active).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.clip_spikes(optax_ext.scale_by_adam(b2=0.5), threshold=4.0)
      >>> s = tx.init(jnp.zeros(1))
      >>> _, s = tx.update(jnp.array([1.0]), s)           # v = 0.5, m = 0.1
      >>> _, s = tx.update(jnp.array([100.0]), s)         # 100 clipped to sqrt(4 * 0.5)
      >>> round(float(s.inner_state.mu[0]), 5)            # 0.9 * 0.1 + 0.1 * sqrt(2)
      0.23142
    """

    def init_fn(params):
        inner_state = inner.init(params)
        get_field(inner_state, nu_field, "clip_spikes")
        return ClipSpikesState(count=jnp.zeros([], jnp.int32), inner_state=inner_state)

    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        nu = get_field(state.inner_state, nu_field, "clip_spikes")
        t = state.count + 1
        period = jnp.maximum(jnp.asarray(every, jnp.int32), 1)
        in_window = jnp.where(jnp.asarray(every) > 0, t % period >= grace_steps, True)
        active = (t >= grace_steps) & in_window & (jnp.asarray(threshold) > 0)

        def clip(g, v):
            bound2 = threshold * v.astype(jnp.float32)
            g32 = g.astype(jnp.float32)
            spike = active & (bound2 > 0) & (g32 * g32 > bound2)
            return jnp.where(spike, jnp.sign(g32) * jnp.sqrt(bound2), g32).astype(g.dtype)

        updates = jax.tree.map(clip, updates, nu)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return updates, ClipSpikesState(
            count=optax.safe_increment(state.count), inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_quantile(
    quantile: float = 0.9,
    *,
    offset: float = 1e-9,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Clamps each matrix update to ``±(q-quantile of its |entries| + offset)``.

    ROOT's outlier suppression: the entries above the per-matrix quantile are the "outliers"
    ``O = sign(U) max(|U| - eps, 0)``; the base ``B = U - O = clip(U, -eps, eps)`` is kept::

        eps = Q_q(|U|) + offset        # linear interpolation, as numpy.quantile
        U  <- clip(U, -eps, eps)

    Args:
      quantile: level ``q`` in [0, 1]. Default 0.9 (ROOT, hard-coded there).
      offset: added to the quantile. Default 1e-9.
      specs: which axes are fan-in/fan-out; the quantile is per matrix of the view.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` (path and shape named).

    References:
      He et al., 2025, "ROOT: Robust Orthogonalized Optimizer for Neural Network Training",
      arXiv 2511.20626; code: github.com/huawei-noah/noah-research ``ROOT/examples/
      example_train.py`` at aa0f80c (``simple_quantile``).

    Notes:
      The README calls this soft-thresholding; keeping the base rather than the outliers makes
      it a hard clip. The quantile needs a sort per matrix per step.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.clip_by_quantile(0.5, offset=0.0)
      >>> u, _ = tx.update({"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}, tx.init(None))
      >>> u["w"].tolist()
      [[1.0, -2.0], [2.5, -2.5]]
    """

    def clip(u):
        a = jnp.abs(u.astype(jnp.float32)).reshape(u.shape[0], -1)
        eps = jnp.quantile(a, quantile, axis=-1, method="linear") + offset
        eps = eps[:, None, None]
        return jnp.clip(u.astype(jnp.float32), -eps, eps).astype(u.dtype)

    def init_fn(params):
        if params is not None:
            MatrixLeaves(params, specs, "clip_by_quantile")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(clip, updates, specs, "clip_by_quantile"), state

    return optax.GradientTransformation(init_fn, update_fn)
