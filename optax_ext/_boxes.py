"""Flax partitioning metadata ("boxes") on parameters, carried over to optimizer states.

flax linen ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` (from ``nn.with_partitioning`` /
``nn.with_logical_partitioning``) and nnx ``Variable``s with sharding metadata are pytree nodes
whose single child is the value; the axis names live in the node. ``jax.tree.map`` over boxed
params keeps every box around whatever the function returns, so a state leaf whose shape differs
from its parameter (a low-rank moment, a SOAP factor, a per-leaf scalar, block scales) ends up
wrapped in the parameter's box with names of the wrong rank, and ``nn.get_partition_spec`` /
``nnx.get_partition_spec`` on the state give specs that jit rejects.

:func:`with_boxes` fixes this once for any transformation: it runs the transformation on the
unboxed values and boxes every state leaf again from the parameter it belongs to, with names
that match the leaf's own rank (:func:`state_names`). Flax is imported by the user, never here:
if it is not loaded, nothing can be boxed and every function is the identity.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext._types import is_masked

# nnx keeps the axis names under one of these metadata keys (newest first).
_NNX_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def _linen_box_type():
    meta = sys.modules.get("flax.core.meta")
    return None if meta is None else meta.AxisMetadata


def _nnx_variable_type():
    variablelib = sys.modules.get("flax.nnx.variablelib")
    return None if variablelib is None else variablelib.Variable


def is_box(x: Any) -> bool:
    """True for a flax metadata box: linen ``AxisMetadata`` or an nnx ``Variable``."""
    for box_type in (_linen_box_type(), _nnx_variable_type()):
        if box_type is not None and isinstance(x, box_type):
            return True
    return False


def has_boxes(tree: Any) -> bool:
    """True if any node of ``tree`` is a flax metadata box."""
    if _linen_box_type() is None and _nnx_variable_type() is None:
        return False
    return any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box))


def _open(box: Any) -> tuple[Any, jax.tree_util.PyTreeDef]:
    """The box's value and the one-level treedef that puts a new value in the same box."""
    children, treedef = jax.tree_util.tree_flatten(box, is_leaf=lambda x: x is not box)
    (value,) = children
    return value, treedef


def unbox(tree: Any) -> Any:
    """``tree`` with every box replaced by its value (no sharding constraint applied)."""
    return jax.tree.map(lambda x: _open(x)[0] if is_box(x) else x, tree, is_leaf=is_box)


def box_names(box: Any) -> tuple[Any, ...] | None:
    """The per-axis names of a box, or None if it carries none."""
    if _linen_box_type() is not None and isinstance(box, _linen_box_type()):
        names = getattr(box, "names", None)
    else:
        meta = box.get_metadata()
        names = next((meta[k] for k in _NNX_NAME_KEYS if meta.get(k) is not None), None)
    return tuple(names) if isinstance(names, (tuple, list)) else None


def _renamed(box: Any, value: Any, names: tuple[Any, ...]) -> Any:
    """A box like ``box`` around ``value`` with per-axis ``names``."""
    if _linen_box_type() is not None and isinstance(box, _linen_box_type()):
        return box.replace(value=value, names=names)
    meta = box.get_metadata()
    key = next(k for k in _NNX_NAME_KEYS if meta.get(k) is not None)
    return box.replace(value, **{key: names})


def state_names(
    shape: Sequence[int], param_shape: Sequence[int], names: Sequence[Any]
) -> tuple[Any, ...]:
    """Axis names of a state array of ``shape`` kept for a parameter of ``param_shape``.

    An axis of the state shares the parameter's axis at the same position when the two sizes
    agree; with equal ranks every position is compared (a projected moment ``(b, r, n)`` of a
    ``(b, m, n)`` parameter keeps the names of ``b`` and ``n``), with different ranks only the
    leading run of agreeing axes (per-matrix statistics ``(*batch,)``, a SOAP factor ``(m, m)``).
    Shared axes keep the parameter's names; the others get None. The same rule lays out state
    on an explicit mesh (:func:`optax_ext.kernels.sharding.align`).

    Args:
      shape: the state array's shape.
      param_shape: its parameter's shape.
      names: the parameter's axis names (``len(names) == len(param_shape)``).

    Returns:
      A tuple of ``len(shape)`` names.
    """
    out: list[Any] = [None] * len(shape)
    same_rank = len(shape) == len(param_shape)
    for i, size in enumerate(shape[: len(param_shape)]):
        if size == param_shape[i]:
            out[i] = names[i]
        elif not same_rank:
            break
    return tuple(out)


def _box_like(box: Any, x: Any) -> Any:
    """``x`` (a state array kept for the parameter boxed in ``box``) in a box of its own rank."""
    param = _open(box)[0]
    if not hasattr(x, "shape") or not hasattr(param, "shape"):
        return x
    if tuple(x.shape) == tuple(param.shape):
        return _open(box)[1].unflatten([x])
    names = box_names(box)
    if names is None or len(names) != len(param.shape):
        return x
    return _renamed(box, x, state_names(x.shape, param.shape, names))


def box_state(state: Any, params: Any) -> Any:
    """Boxes the arrays of ``state`` (built on unboxed params) from the boxes of ``params``.

    Every subtree of ``state`` with the structure of ``params`` (a moment ``mu``, a tree of
    per-leaf tuples or NamedTuples) is matched leaf by leaf with ``params``; each array found
    under a boxed parameter gets a box of its own rank (:func:`state_names`). Arrays elsewhere
    (step counters, shared keys) stay unboxed.

    Args:
      state: an optimizer state computed on ``unbox(params)``.
      params: the boxed parameters (or updates: any tree with their boxes).

    Returns:
      ``state`` with boxes.
    """
    pleaves, ptree = jax.tree_util.tree_flatten(
        params, is_leaf=lambda x: is_box(x) or is_masked(x)
    )

    def walk(node):
        try:
            subtrees = ptree.flatten_up_to(node)
        except (ValueError, TypeError):
            subtrees = None
        if subtrees is not None:
            boxed = [
                jax.tree.map(lambda x, b=p: _box_like(b, x), sub) if is_box(p) else sub
                for sub, p in zip(subtrees, pleaves)
            ]
            return ptree.unflatten(boxed)
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_nodes == 1:  # an array or an empty node
            return node
        return treedef.unflatten([walk(c) for c in children])

    return walk(state)


def rebox_like(tree: Any, like: Any) -> Any:
    """Puts each value of ``tree`` back in the box at the same position of ``like``."""
    return jax.tree.map(
        lambda b, x: _open(b)[1].unflatten([x]) if is_box(b) else x,
        like,
        tree,
        is_leaf=lambda x: is_box(x) or is_masked(x),
    )


def with_boxes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` that accepts flax-boxed params and keeps every state leaf's metadata right.

    ``tx`` runs on unboxed values; updates come back in the boxes of the incoming updates, and
    each state array kept for a boxed parameter is boxed with names of its own rank
    (:func:`box_state`), so ``nn.get_partition_spec(state)``, ``nn.logical_to_mesh_sharding``
    and ``nnx.get_partition_spec`` work on the state. Without boxes ``tx`` runs unchanged.

    Args:
      tx: an ``optax.GradientTransformation`` (extra-args or not).

    Returns:
      A transformation of the same type.
    """

    from optax_ext.labels import axis_names_of  # labels builds on this module

    def init_fn(params):
        if not has_boxes(params):
            return tx.init(params)
        with axis_names_of(params):  # the default matrix views read the boxes' axis names
            return box_state(tx.init(unbox(params)), params)

    def update_fn(updates, state, params=None, **extra_args):
        if not (has_boxes(updates) or has_boxes(state) or has_boxes(params)):
            return tx.update(updates, state, params, **extra_args)
        with axis_names_of(params if has_boxes(params) else updates):
            new_updates, new_state = tx.update(
                unbox(updates), unbox(state), unbox(params), **extra_args
            )
        ref = params if has_boxes(params) else updates
        return rebox_like(new_updates, updates), box_state(new_state, ref)

    return type(tx)(init_fn, update_fn)


def mismatched_names(state: Any) -> list[str]:
    """Paths of boxes in ``state`` whose names do not match their value's rank (for checks)."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_box)[0]:
        if not is_box(x):
            continue
        names = box_names(x)
        value = _open(x)[0]
        if names is not None and hasattr(value, "shape") and len(names) != jnp.ndim(value):
            bad.append(f"{jax.tree_util.keystr(path)}: names {names}, shape {value.shape}")
    return bad
