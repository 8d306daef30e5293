"""Removing the radial (weight-parallel) component of gradients or updates (AdamP, SGDP, ⊥Grad)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._boxes import with_boxes


def _row_axes(ndim: int, channel_axis: int, layer: bool) -> tuple[int, ...]:
    """Axes summed over for one "row": all of them (layer view) or all but the channel axis.

    Rows are reductions over axes rather than reshapes, so a sharded tensor keeps its layout
    (explicit-axis meshes refuse reshapes that merge sharded axes)."""
    if layer:
        return tuple(range(ndim))
    return tuple(a for a in range(ndim) if a != channel_axis % ndim)


def remove_radial(
    x: jax.Array, p: jax.Array, *, axes: tuple[int, ...] = (1,), eps: float = 1e-8
) -> jax.Array:
    """``x_i - p^_i <p^_i, x_i>`` per row, ``p^_i = p_i / (||p_i|| + eps)``; a row is a slice
    over ``axes`` (default: the rows of a ``(R, L)`` matrix)."""
    pn = p / (jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True)) + eps)
    return x - pn * jnp.sum(pn * x, axis=axes, keepdims=True)


def _max_cosine(g: jax.Array, p: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    gn = jnp.maximum(jnp.sqrt(jnp.sum(g * g, axis=axes)), eps)
    pn = jnp.maximum(jnp.sqrt(jnp.sum(p * p, axis=axes)), eps)
    return jnp.max(jnp.abs(jnp.sum(g * p, axis=axes)) / (gn * pn))


class ProjectOutRadialState(NamedTuple):
    """State of :func:`project_out_radial`.

    Attributes:
      inner_state: the wrapped transformation's state.
      projected: per leaf, which view fired at the last step (int32: 0 none, 1 channel,
        2 layer); a diagnostic, recomputed every step.
    """

    inner_state: optax.OptState
    projected: optax.Updates


def project_out_radial(
    inner: optax.GradientTransformation,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    channel_axis: str = "last",
) -> optax.GradientTransformationExtraArgs:
    """Projects the radial component out of the updates of scale-invariant weights (AdamP).

    Algorithm (per tensor ``p`` with ``ndim > 1``, gradient ``g``, ``u = inner(g)``)::

        for view in (channel, layer):              # rows per output channel, then one row
            cos_i = |<g_i, p_i>| / (max(||g_i||, eps) max(||p_i||, eps))
            if max_i cos_i < delta / sqrt(row length):           # scale-invariant: project
                u_i <- u_i - p^_i <p^_i, u_i>,  p^_i = p_i / (||p_i|| + eps);  ratio <- wd_ratio
                break
        u <- u + weight_decay * ratio * p          # decoupled decay, before the learning rate

    Args:
      inner: the statistic (Adam for AdamP, momentum for SGDP).
      delta: cosine threshold. Default 0.1.
      wd_ratio: weight-decay multiplier for projected tensors. Default 0.1.
      weight_decay: decoupled decay (placed before ``scale_by_learning_rate``, so the weights
        become ``p (1 - lr wd ratio)``). Default 0.
      eps: Default 1e-8.
      channel_axis: the output-channel axis: ``"last"`` (default) for flax ``(in, out)`` kernels
        and ``HWIO`` convolutions (rows of a PyTorch ``(out, in)`` weight), ``"first"`` for
        PyTorch-layout weights (a string, so ``inject_hyperparams`` keeps it static). 0-D/1-D
        tensors are never projected and get the full decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ProjectOutRadialState`; needs
      ``params``.

    Raises:
      ValueError: if ``update`` is called without ``params``.

    References:
      Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021, arXiv 2006.08217; code: github.com/clovaai/AdamP
      (``adamp/adamp.py`` at 7f6f038).

    Example:
      >>> import jax.numpy as jnp, optax, optax_ext
      >>> p = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> g = jnp.array([[0.0, 1.0], [1.0, 0.0]])       # orthogonal to every weight row
      >>> tx = optax_ext.project_out_radial(optax.identity())
      >>> u, s = tx.update(g, tx.init(p), p)
      >>> int(s.projected)                               # channel view fired
      1
    """
    if channel_axis not in ("last", "first"):
        raise ValueError(f"channel_axis must be 'last' or 'first', got {channel_axis!r}")
    axis = -1 if channel_axis == "last" else 0
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        projected = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params)
        return ProjectOutRadialState(inner.init(params), projected)

    def project(u, g, p):
        if jnp.ndim(p) <= 1 or jnp.size(p) == 0:  # zero-size: no direction to project
            return u + weight_decay * p, jnp.zeros([], jnp.int32)
        g32, p32, u32 = (x.astype(jnp.float32) for x in (g, p, u))
        outs, fired = [], []
        for layer in (False, True):
            axes = _row_axes(p.ndim, axis, layer)
            length = math.prod(p.shape[a] for a in axes)
            fired.append(_max_cosine(g32, p32, axes, eps) < delta / math.sqrt(length))
            outs.append(remove_radial(u32, p32, axes=axes, eps=eps))
        which = jnp.where(fired[0], 1, jnp.where(fired[1], 2, 0)).astype(jnp.int32)
        out = jnp.where(which == 1, outs[0], jnp.where(which == 2, outs[1], u32))
        ratio = jnp.where(which > 0, wd_ratio, 1.0)
        return (out + weight_decay * ratio * p32).astype(u.dtype), which

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("project_out_radial needs params: call update(g, state, params)")
        u, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        pairs = jax.tree.map(project, u, updates, params)
        out = jax.tree.map(lambda _, pr: pr[0], u, pairs)
        which = jax.tree.map(lambda _, pr: pr[1], u, pairs)
        return out, ProjectOutRadialState(inner_state, which)

    return with_boxes(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def project_out_parallel(*, eps: float = 1e-30) -> optax.GradientTransformation:
    """Removes from each gradient tensor its component parallel to the weights (⊥Grad).

    Algorithm (per tensor)::

        g <- g - (<g, w> / (<w, w> + eps)) w

    Placed before an optimizer (e.g. AdamW), it stops the "naive loss minimization" direction
    (growing the weight norm along the current weights) that drives softmax collapse.

    Args:
      eps: added to ``<w, w>`` (zero weights leave the gradient unchanged). Default 1e-30.

    Returns:
      A stateless ``optax.GradientTransformation`` that needs ``params``.

    Raises:
      ValueError: if ``update`` is called without ``params``.

    References:
      Prieto, Barsbey, Mediano, Birdal, 2025, "Grokking at the Edge of Numerical Stability",
      ICLR 2025, arXiv 2501.04697 (⊥Grad, "orthogonal gradient"); code:
      github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.project_out_parallel()
      >>> u, _ = tx.update(jnp.array([1.0, 1.0]), tx.init(None), jnp.array([2.0, 0.0]))
      >>> u.tolist()
      [0.0, 1.0]
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def perp(g, w):
        g32, w32 = g.astype(jnp.float32), w.astype(jnp.float32)
        coef = jnp.sum(g32 * w32) / (jnp.sum(w32 * w32) + eps)
        return (g32 - coef * w32).astype(g.dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_out_parallel needs params: call update(g, state, params)")
        return jax.tree.map(perp, updates, params), state

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))
