"""Orthogonalization of matrix updates, and the shape factors that Muon variants put on them."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.newton_schulz import NewtonSchulz, PolarSVD
from optax_ext.primitives._matrices import MatrixLeaves, map_matrices


def orthogonalize(
    method: NewtonSchulz | PolarSVD | Callable[[jax.Array], jax.Array] = NewtonSchulz(),
    *,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Replaces each matrix update ``U = A S B^T`` by (an approximation of) ``A B^T``.

    The update's singular values are all set to (about) one while its singular vectors are
    kept: the steepest-descent direction under the spectral norm. Same-shaped matrices are
    stacked and orthogonalized by one batched kernel call.

    Algorithm::

        U <- NS(U)      in the (fan_in, fan_out) view of every leaf

    Args:
      method: a :class:`~optax_ext.kernels.NewtonSchulz` spec (default: Muon's 5 bf16 quintic
        steps), :class:`~optax_ext.kernels.PolarSVD` (exact) or any batched callable
        ``(b, m, n) -> (b, m, n)`` (a callable argument must be a ``static_args`` of
        ``optax.inject_hyperparams``, which otherwise treats it as a schedule).
      specs: which axes are fan-in/fan-out (default :func:`optax_ext.labels.matrix_view`: 2-D
        leaves as ``(in, out)``; DenseGeneral, ``nn.scan``-stacked and conv kernels in their
        true view; ambiguous N-D leaves raise). The polar factor is transpose-equivariant, so
        the fan-in/fan-out choice only matters for N-D leaves.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: in ``init`` or ``update``, for a leaf with ``ndim < 2`` (its path and shape are
        named).

    References:
      Jordan et al., 2024, Muon, https://kellerjordan.github.io/posts/muon/ ;
      Bernstein & Newhouse, 2024, "Old Optimizer, New Norm", arXiv 2409.20325.

    Notes:
      A zero update stays zero. Non-finite entries make their whole matrix non-finite; wrap the
      optimizer in ``optax.apply_if_finite`` to skip such steps.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.orthogonalize(optax_ext.kernels.PolarSVD())
      >>> u, _ = tx.update({"w": jnp.diag(jnp.array([3.0, 0.5]))}, tx.init(None))
      >>> u["w"].round(4).tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """

    def init_fn(params):
        if params is not None:
            MatrixLeaves(params, specs, "orthogonalize")
        return optax.EmptyState()

    kernel = method.apply if hasattr(method, "apply") else method

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(kernel, updates, specs, "orthogonalize"), state

    return optax.GradientTransformation(init_fn, update_fn)


def _kj(m: int, n: int) -> float:
    return math.sqrt(max(1.0, n / m))


SHAPE_RULES: dict[str, Callable[[int, int], float]] = {
    "sqrt_fan_out_over_fan_in": _kj,
    "kj": _kj,
    "sqrt_max_dim": lambda m, n: math.sqrt(max(m, n)),
    "rms": lambda m, n: math.sqrt(max(m, n)),
    "moonlight": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "sqrt_fan_out_over_fan_in_plain": lambda m, n: math.sqrt(n / m),
    "none": lambda m, n: 1.0,
}
"""Shape factors ``f(fan_in, fan_out)`` by name.

- ``"sqrt_fan_out_over_fan_in"`` (alias ``"kj"``): ``sqrt(max(1, fan_out / fan_in))``, Muon's
  reference (KellerJordan/Muon; ``sqrt(max(1, rows/cols))`` of a PyTorch ``(out, in)`` weight).
- ``"sqrt_max_dim"`` (alias ``"rms"``): ``sqrt(max(fan_in, fan_out))``, unit update RMS for a
  semi-orthogonal update (modded-nanogpt records of Oct 2024).
- ``"moonlight"``: ``0.2 * sqrt(max(fan_in, fan_out))``, update RMS 0.2 like AdamW's
  (Liu et al., 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982; ROOT, Conda).
- ``"sqrt_fan_out_over_fan_in_plain"``: ``sqrt(fan_out / fan_in)``, the RMS->RMS dual scaling of
  modular norms (Newhouse et al., 2025).
- ``"none"``: 1.
"""


def shape_factor(rule: str, fan_in: int, fan_out: int) -> float:
    """The factor ``rule`` (a key of :data:`SHAPE_RULES`) gives a ``fan_in x fan_out`` matrix."""
    if rule not in SHAPE_RULES:
        raise ValueError(f"unknown shape rule {rule!r}; expected one of {sorted(SHAPE_RULES)}")
    return SHAPE_RULES[rule](fan_in, fan_out)


def scale_by_shape(
    rule: str = "sqrt_fan_out_over_fan_in", *, specs: SpecLike = None
) -> optax.GradientTransformation:
    """Multiplies each matrix update by a factor of its fan-in and fan-out sizes.

    Args:
      rule: a key of :data:`SHAPE_RULES`. Default ``"sqrt_fan_out_over_fan_in"`` =
        ``sqrt(max(1, fan_out / fan_in))`` (Muon).
      specs: which axes are fan-in/fan-out (default :func:`optax_ext.labels.matrix_view`, the
        view every matrix primitive uses); the factor uses the sizes of the flattened matrix
        view (``embed x heads*head_dim`` for a DenseGeneral query kernel; for a PyTorch conv
        weight the Muon reference instead reads the kernel's last two dims; we use the
        flattened view on purpose).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: for an unknown rule, or a leaf with ``ndim < 2``.

    References:
      Muon (Jordan et al., 2024); Moonlight (Liu et al., 2025, arXiv 2502.16982).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_shape("sqrt_fan_out_over_fan_in")
      >>> float(tx.update({"w": jnp.ones((4, 16))}, tx.init(None))[0]["w"][0, 0])
      2.0
    """
    shape_factor(rule, 1, 1)

    def init_fn(params):
        if params is not None:
            MatrixLeaves(params, specs, "scale_by_shape")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, "scale_by_shape")
        flat = list(leaves.treedef.flatten_up_to(updates))
        for i, (_, m, n) in zip(leaves.active, leaves.matrix_shapes()):
            x = flat[i]
            flat[i] = (x * jnp.asarray(shape_factor(rule, m, n), jnp.float32)).astype(x.dtype)
        return leaves.treedef.unflatten(flat), state

    return optax.GradientTransformation(init_fn, update_fn)
