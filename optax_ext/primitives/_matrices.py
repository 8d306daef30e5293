"""Tree-level plumbing shared by the matrix primitives: validate, view, bucket, restore."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext._types import (
    MatrixSpec,
    SpecLike,
    is_masked,
    leaf_error,
    leaves_with_path,
    require_matrix,
    spec_for,
)
from optax_ext.kernels import sharding
from optax_ext.kernels.matricize import (
    batch_shape,
    bucket_apply,
    matricize,
    matrix_shape,
    unmatricize,
)


class MatrixLeaves:
    """The matrix leaves of a tree, with their specs, validated once.

    Masked leaves (None, ``optax.MaskedNode``) are kept aside and restored untouched. So are
    zero-size leaves (e.g. ``(0, 32)``), once validated: they have no matrix to transform, so their
    update passes through (a zero-size array) and their state is the zero-size leaf itself, stable
    across steps.

    Args:
      tree: parameters, updates or any tree with the parameters' structure.
      specs: see :data:`optax_ext.SpecLike`.
      who: name of the calling transformation, for error messages.
    """

    def __init__(self, tree: Any, specs: SpecLike, who: str):
        self.pairs, self.treedef = leaves_with_path(tree)
        self.active: list[int] = []
        self.specs: list[MatrixSpec] = []
        self.shapes: list[tuple[int, ...]] = []
        from optax_ext.labels import axis_names_of  # labels builds on the shared types

        with axis_names_of(tree):  # a boxed tree (primitives without with_boxes): its names
            for i, (path, leaf) in enumerate(self.pairs):
                if is_masked(leaf):
                    continue
                spec = spec_for(specs, path, leaf)
                require_matrix(path, leaf, spec, who)
                if jnp.size(leaf) == 0:  # nothing to transform: passes like a masked leaf
                    continue
                self.active.append(i)
                self.specs.append(spec)
                self.shapes.append(tuple(jnp.shape(leaf)))

    def __len__(self) -> int:
        return len(self.active)

    def paths(self) -> list[tuple[Any, ...]]:
        """Key paths of the active leaves."""
        return [self.pairs[i][0] for i in self.active]

    def matrix_shapes(self) -> list[tuple[int, int, int]]:
        """``(batch, fan_in, fan_out)`` of every active leaf."""
        return [matrix_shape(s, sp) for s, sp in zip(self.shapes, self.specs)]

    def batch_shapes(self) -> list[tuple[int, ...]]:
        """Batch-axis sizes of every active leaf's matrix view."""
        return [batch_shape(s, sp) for s, sp in zip(self.shapes, self.specs)]

    def require_shapes_of(self, params: Any | None, who: str) -> None:
        """Raises naming the leaf if an active leaf's shape differs from its parameter's (e.g. a
        transposed gradient, which state arithmetic would otherwise broadcast). None: no check."""
        if params is None:
            return
        for path, shape, p in zip(self.paths(), self.shapes, self.leaves(params)):
            if tuple(jnp.shape(p)) != shape:
                rule = f"{who} got an update of this shape for a parameter of shape {jnp.shape(p)}"
                raise leaf_error(path, shape, rule)

    def leaves(self, tree: Any) -> list[Any]:
        """The active leaves of ``tree`` (same structure as the tree this was built from)."""
        flat = self.treedef.flatten_up_to(tree)
        return [flat[i] for i in self.active]

    def views(self, tree: Any) -> list[jax.Array]:
        """``(batch, fan_in, fan_out)`` views of the active leaves of a param-shaped ``tree``."""
        return [matricize(x, spec=sp) for x, sp in zip(self.leaves(tree), self.specs)]

    def restore(self, mats: Sequence[jax.Array], like: Any | None = None) -> Any:
        """Builds a param-shaped tree from views; masked positions come from ``like`` (or None)."""
        flat = (
            list(self.treedef.flatten_up_to(like))
            if like is not None
            else [leaf for _, leaf in self.pairs]
        )
        for k, i in enumerate(self.active):
            flat[i] = unmatricize(mats[k], shape=self.shapes[k], spec=self.specs[k])
        return self.treedef.unflatten(flat)

    def stored(
        self, arrays: Sequence[jax.Array], like: Any | None = None, *, spread: bool = False
    ) -> Any:
        """A tree of per-leaf state arrays kept as ``(*batch, p, q)``, from ``(b, p, q)`` arrays.

        With ``like`` (the parameters), each array is laid out like its parameter; ``spread``
        also shards it over the mesh axes of a projected-away side (see ``sharding.align``).
        """
        flat = (
            list(self.treedef.flatten_up_to(like))
            if like is not None
            else [leaf for _, leaf in self.pairs]
        )
        for k, i in enumerate(self.active):
            a = arrays[k]
            a = a.reshape(*batch_shape(self.shapes[k], self.specs[k]), *a.shape[1:])
            flat[i] = a if like is None else sharding.align(a, flat[i], spread=spread)
        return self.treedef.unflatten(flat)

    def unstored(self, tree: Any) -> list[jax.Array]:
        """Inverse of :meth:`stored`: ``(b, p, q)`` arrays from a tree of ``(*batch, p, q)``."""
        out = []
        for k, a in enumerate(self.leaves(tree)):
            nb = len(batch_shape(self.shapes[k], self.specs[k]))
            out.append(a.reshape(-1, *a.shape[nb:]))
        return out


def map_matrices(fn: Callable[[jax.Array], jax.Array], tree: Any, specs: SpecLike, who: str) -> Any:
    """Applies a batched matrix kernel to every matrix leaf, once per same-shape bucket."""
    leaves = MatrixLeaves(tree, specs, who)
    outs = bucket_apply(fn, [(v,) for v in leaves.views(tree)])
    return leaves.restore(outs, like=tree)
