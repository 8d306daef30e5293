"""Pieces every recipe shares: the AdamW that papers use for non-matrix parameters, the split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike

from optax_ext import labels
from optax_ext.kernels import sharding
from optax_ext.primitives.moments import scale_by_adam
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    bias_correction: str = "standard",
    decay_after_update: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AdamW in the variant a reference code uses for the parameters its method does not cover.

    Args:
      learning_rate: ``lr`` (scalar or schedule).
      b1, b2, eps: Adam's constants.
      weight_decay: decoupled decay ``wd`` (``W <- W (1 - lr wd)``).
      bias_correction: ``"standard"`` (torch/optax: ``m_hat / (sqrt(v_hat) + eps)``), ``"hf"``
        (HF AdamW: ``eps`` on the uncorrected ``sqrt(v)``) or ``"none"``;
        see :func:`optax_ext.scale_by_adam`.
      decay_after_update: decay the updated weights (HF AdamW, GaLore/Conda family) instead of the
        current ones (torch AdamW, Muon's auxiliary Adam).
      mu_dtype: dtype of the first moment.

    Returns:
      ``chain(scale_by_adam, [decay], scale_by_learning_rate, [decay])``.
    """
    moments = scale_by_adam(b1, b2, eps, bias_correction=bias_correction, mu_dtype=mu_dtype)
    if decay_after_update:
        return optax.chain(
            moments,
            optax.scale_by_learning_rate(learning_rate),
            add_decoupled_weight_decay(weight_decay, learning_rate, after_update=True),
        )
    return optax.chain(
        moments,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def hidden_and_other(
    hidden: optax.GradientTransformation,
    other: optax.GradientTransformation,
    param_labels: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """``optax.partition`` of hidden matrices (the method) and everything else (its fallback).

    Args:
      hidden: transformation for leaves labelled ``"hidden"``.
      other: transformation for the rest (embeddings, head, vectors).
      param_labels: a labels tree or ``params -> labels`` function with values ``"hidden"`` and
        ``"other"``, or the four labels of :func:`optax_ext.labels.param_labels` (``"embed"``,
        ``"head"``, ``"vector"`` go to ``other``); default
        :func:`optax_ext.labels.hidden_matrices`. Any other label raises a ValueError listing
        the labels found and expected.
    """
    if param_labels is None:
        two_way = labels.hidden_matrices
    elif callable(param_labels):
        given = param_labels
        two_way = lambda params: labels.as_hidden_and_other(given(params))  # noqa: E731
    else:
        two_way = labels.as_hidden_and_other(param_labels)
    return tied(optax.partition({"hidden": hidden, "other": other}, two_way))


def auxiliary_learning_rate(
    adam_learning_rate: optax.ScalarOrSchedule | None,
    learning_rate: optax.ScalarOrSchedule,
    ratio: float,
) -> optax.ScalarOrSchedule:
    """The auxiliary (AdamW) lr of a recipe: the explicit value, else ``ratio * learning_rate``.

    The default follows the main lr's schedule (warm-up, decay) the way a PyTorch scheduler
    scales every parameter group; ``ratio`` is the reference's auxiliary lr over its main lr.

    Args:
      adam_learning_rate: the user's auxiliary lr (scalar or schedule), or None.
      learning_rate: the main lr: a scalar, a schedule, or the array that
        ``optax.inject_hyperparams`` passes.
      ratio: reference auxiliary lr / reference main lr.

    Returns:
      ``adam_learning_rate`` if given, else the scaled copy of ``learning_rate``.
    """
    if adam_learning_rate is not None:
        return adam_learning_rate
    if callable(learning_rate):
        return lambda count: ratio * learning_rate(count)
    return ratio * learning_rate


def float16_in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``tx`` in float32 on float16 leaves: float32 state, float16 updates.

    float16 cannot hold Adam's ``eps = 1e-8`` (it rounds to 0) nor ``g^2`` of small or large
    gradients, so a recipe run in float16 divides 0 by 0. This wrapper casts float16 gradients
    and parameters to float32 before ``tx`` (whose state is therefore float32 for those leaves)
    and casts the update back to float16; other dtypes pass through unchanged (bf16 stays bf16).
    Loss scaling stays with the caller: unscale the gradients before the update, as usual.

    Every recipe goes through this wrapper, so it also makes the flax partitioning names of boxed
    params (``nn.with_partitioning`` / nnx sharding metadata) visible to the default matrix views
    of the recipe's primitives (:func:`optax_ext.labels.axis_names_of`), and ties the state to
    the parameters' layout when ``init`` is traced under automatic mesh axes
    (:func:`tie_to_params`).

    Args:
      tx: the recipe's transformation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state.
    """
    tx = optax.with_extra_args_support(tx)
    up = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.float16 else x, tree
    )

    def init_fn(params):
        with labels.axis_names_of(params):
            return tie_to_params(tx.init(up(params)), params)

    def update_fn(updates, state, params=None, **extra_args):
        with labels.axis_names_of(updates if params is None else params):
            params = None if params is None else up(params)
            out, state = tx.update(up(updates), state, params, **extra_args)
        return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tied(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``init`` ties parameter-shaped state to the parameters (see
    :func:`tie_to_params`); ``update`` unchanged (extra arguments passed on).

    Args:
      tx: a transformation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state.
    """
    tx = optax.with_extra_args_support(tx)
    return optax.GradientTransformationExtraArgs(
        lambda params: tie_to_params(tx.init(params), params), tx.update)


def tie_to_params(state: Any, params: Any) -> Any:
    """``state`` with its parameter-shaped leaves laid out like their parameters, in a ``jit``.

    Under automatic mesh axes a traced ``init`` (``jax.jit(tx.init)(params)``) does not know
    the parameters' shardings, and state built with ``zeros_like`` has no data dependence on
    them, so without pinned ``out_shardings`` the partitioner replicates it: 8x the ideal
    per-device bytes on 8 devices. This ties every state leaf that has the shape of its
    parameter to it with ``shard_alike``, so it gets the parameter's input sharding: the leaves
    of state subtrees structured like ``params`` (moments) leaf by leaf, other leaves when
    exactly one parameter has their shape. State of other shapes (projected moments, bases,
    factors) keeps the partitioner's choice: pin those with ``out_shardings`` (see
    docs/DISTRIBUTED.md). A no-op for concrete parameters (eager ``init`` lays the state out
    from their shardings), explicit axes (shardings are in the types) and single devices.

    Args:
      state: the state ``init`` built.
      params: the parameters it was built from.

    Returns:
      ``state``, same structure, shapes and dtypes.
    """
    leaves, treedef = jax.tree.flatten(params)
    traced = [x for x in leaves if isinstance(x, jax.core.Tracer) and jnp.ndim(x)]
    mesh = sharding.mesh_of(traced[0]) if traced else None
    if mesh is None or any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return state
    by_shape: dict[tuple[int, ...], list[jax.Array]] = {}
    for x in leaves:
        by_shape.setdefault(jnp.shape(x), []).append(x)

    def tie(s, p):
        ok = isinstance(s, jax.Array) and jnp.ndim(s) and jnp.shape(s) == jnp.shape(p)
        return shard_alike(s, p)[0] if ok else s

    def like_params(node) -> bool:
        return node is not None and jax.tree.structure(node) == treedef

    def visit(node):
        if like_params(node):
            return jax.tree.map(tie, node, params)
        matches = by_shape.get(jnp.shape(node), []) if isinstance(node, jax.Array) else []
        return tie(node, matches[0]) if len(matches) == 1 else node

    return jax.tree.map(visit, state, is_leaf=like_params)
