"""Shared aliases, the matrix axis spec and error helpers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """Which axes of an N-D parameter form the fan-in and fan-out sides of its matrix view.

    Axes not named are batch axes (kept in their original order, leading the view). The default
    spec reads the last two axes as ``(fan_in, fan_out)``, the layout of flax ``Dense`` kernels;
    any leading axes (stacked layers, heads, experts) are batch axes.

    Recipes and primitives do not use this class default for N-D leaves unless told to: their
    default is :func:`optax_ext.labels.matrix_view`, which reads the leaf's path (and flax
    partitioning names when given) to find the true view of DenseGeneral, scanned and conv
    kernels.

    Examples: a flax convolution kernel ``(kh, kw, in, out)`` treated as one matrix per kernel,
    like the PyTorch references that view conv weights as ``(out, in * kh * kw)``::

        MatrixSpec(fan_in_axes=(0, 1, 2), fan_out_axes=(3,))

    a DenseGeneral query kernel ``(embed, heads, head_dim)`` as one ``embed x heads*head_dim``
    matrix, and a fused ``(d, 3 d)`` qkv kernel as three ``d x d`` matrices::

        MatrixSpec(fan_in_axes=(0,), fan_out_axes=(1, 2))
        MatrixSpec(fan_out_splits=3)

    Attributes:
      fan_in_axes: axes flattened into the fan-in (row) side of the view. Default ``(-2,)``.
      fan_out_axes: axes flattened into the fan-out (column) side of the view. Default ``(-1,)``.
      fan_out_splits: the flattened fan-out side is ``k`` equal, independent matrices (a fused
        ``[q | k | v]`` kernel: ``k = 3``); they become ``k`` more entries of the batch, the
        split index after the batch axes. Default 1.
    """

    fan_in_axes: tuple[int, ...] = (-2,)
    fan_out_axes: tuple[int, ...] = (-1,)
    fan_out_splits: int = 1

    def resolve(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Returns ``(batch_axes, fan_in_axes, fan_out_axes)`` as non-negative axes for ``ndim``.

        Raises:
          ValueError: if an axis is out of range, repeated, or a side is empty.
        """
        fan_in = tuple(_normalize_axis(a, ndim) for a in self.fan_in_axes)
        fan_out = tuple(_normalize_axis(a, ndim) for a in self.fan_out_axes)
        named = fan_in + fan_out
        if not fan_in or not fan_out:
            raise ValueError(
                f"MatrixSpec needs at least one fan-in and one fan-out axis, got {self}"
            )
        if len(set(named)) != len(named):
            raise ValueError(f"MatrixSpec names an axis twice: {self}")
        if not isinstance(self.fan_out_splits, int) or self.fan_out_splits < 1:
            raise ValueError(f"MatrixSpec.fan_out_splits must be a positive int: {self}")
        batch = tuple(a for a in range(ndim) if a not in named)
        return batch, fan_in, fan_out


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D parameter")
    return axis % ndim


SpecLike = MatrixSpec | Callable[[KeyPath, jax.Array], MatrixSpec] | None
"""A single spec for every leaf, a function ``(path, leaf) -> MatrixSpec``, or None (default:
:func:`optax_ext.labels.matrix_view`, the view read from the leaf's path and shape)."""


def spec_for(specs: SpecLike, path: KeyPath, leaf: Any) -> MatrixSpec:
    """Returns the MatrixSpec that ``specs`` assigns to the leaf at ``path``.

    Raises:
      ValueError: with ``specs=None``, for an N-D leaf whose view the default rule cannot tell
        (see :func:`optax_ext.labels.matrix_view`).
    """
    if specs is None:
        from optax_ext import labels  # labels builds on this module

        return labels.matrix_view(path, leaf)
    if isinstance(specs, MatrixSpec):
        return specs
    spec = specs(path, leaf)
    if not isinstance(spec, MatrixSpec):
        raise TypeError(
            f"{jax.tree_util.keystr(path)}: the spec function returned {type(spec).__name__}, "
            "expected a MatrixSpec"
        )
    return spec


def leaf_error(path: KeyPath, shape: Sequence[int], rule: str) -> ValueError:
    """A ValueError naming the parameter path, its shape and the rule it breaks."""
    where = jax.tree_util.keystr(tuple(path)) or "<root>"
    return ValueError(f"parameter {where} with shape {tuple(shape)}: {rule}")


def is_masked(x: Any) -> bool:
    """True for leaves that transformations pass through untouched (None, optax.MaskedNode)."""
    return x is None or isinstance(x, optax.MaskedNode)


def leaves_with_path(tree: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """Flattens ``tree`` keeping None/MaskedNode as leaves; returns (path-leaf pairs, treedef)."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)


def require_matrix(path: KeyPath, leaf: Any, spec: MatrixSpec, who: str) -> None:
    """Raises a ValueError naming the leaf if it cannot be viewed as a matrix under ``spec``."""
    shape = jnp.shape(leaf)
    if len(shape) < 2:
        raise leaf_error(
            path,
            shape,
            f"{who} acts on matrices (ndim >= 2); route 0-D/1-D parameters to another "
            "transformation, e.g. with optax.partition and optax_ext.labels",
        )
    try:
        spec.resolve(len(shape))
    except ValueError as e:
        raise leaf_error(path, shape, f"{who}: {e}") from None


def canonicalize_dtype(dtype: Any) -> jnp.dtype | None:
    """``None`` stays None; strings and dtypes become a numpy dtype."""
    return None if dtype is None else jnp.dtype(dtype)
