"""Memory accounting of optimizer states."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def state_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a tree (an optimizer state), without allocating anything.

    Counts ``size * itemsize`` of every array leaf: ``jax.Array``, ``np.ndarray`` or
    ``jax.ShapeDtypeStruct``, so ``state_nbytes(jax.eval_shape(tx.init, params))`` measures an
    optimizer's state for parameters that are never materialized. ``None`` and
    ``optax.MaskedNode`` hold nothing.

    Args:
      tree: any pytree of arrays or shape-dtype structs.

    Returns:
      The total number of bytes.

    Raises:
      TypeError: for a leaf without ``shape`` and ``dtype`` (e.g. a Python scalar).

    Example:
      >>> import jax, jax.numpy as jnp, optax, optax_ext
      >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
      >>> n = optax_ext.state_nbytes(jax.eval_shape(optax.adamw(1e-3).init, params))
      >>> n / 1024**2                                  # mu and nu in float32, plus a count
      8.000003814697266
    """
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            where = jax.tree_util.keystr(path) or "<root>"
            raise TypeError(f"state_nbytes: leaf {where} is a {type(leaf).__name__}, not an array")
        total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total
