"""Odd-polynomial (Newton-Schulz) iterations towards the polar factor, and the exact SVD reference.

For ``X = U S V^T`` the polar factor is ``U V^T``. An odd polynomial ``p(x) = a x + b x^3 + c x^5``
applied to a matrix, ``p(X) = a X + b (X X^T) X + c (X X^T)^2 X``, acts on the singular values
only, so iterating it drives every singular value of a Frobenius-normalised ``X`` (all in
``(0, 1]``) towards 1 without an SVD. The coefficient presets below come from the papers and
reference codes that use them; each preset documents the band its output singular values land in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_ext._types import canonicalize_dtype
from optax_ext.kernels import lapack

Triple = tuple[float, float, float]

MUON_COEFFS: Triple = (3.4445, -4.7750, 2.0315)
"""Muon's quintic (Jordan et al., 2024), the same triple every step.

It maximises the slope at zero rather than converging: after 5 steps, singular values of the
Frobenius-normalised input (``s / ||X||_F``) in ``[3e-3, 1]`` land in ``[0.68, 1.21]``
(:data:`MUON_BAND`), the "roughly Uniform(0.5, 1.5)" of the reference; smaller ones are
amplified by ``3.4445^5 ~ 486`` but do not reach the band.
"""

MUON_BAND = ((3e-3, 1.0), (0.68, 1.21))
"""(input range of ``s / ||X||_F``, output range of singular values) for 5 Muon steps."""

POLAR_EXPRESS_COEFFS: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""Polar Express per-step quintics (Amsel et al., 2025, arXiv 2505.16932) as used by
modded-nanogpt; use with ``norm_scale=1.02, eps=1e-6``. Singular values with ``s / ||X||_F`` in
``[1e-3, 1]`` land in ``[0.84, 1.15]`` after the 5 steps (:data:`POLAR_EXPRESS_BAND`)."""

POLAR_EXPRESS_BAND = ((1e-3, 1.0), (0.84, 1.15))
"""(input range of ``s / ||X||_F``, output range of singular values), 5 Polar Express steps."""

LIPSCHITZ_ORTHO_COEFFS: tuple[Triple, ...] = tuple(
    (a / 1024, b / 1024, c / 1024)
    for a, b, c in (
        (3955, -8306, 5008),
        (3735, -6681, 3463),
        (3799, -6499, 3211),
        (4019, -6385, 2906),
        (2677, -3029, 1162),
        (2172, -1833, 682),
    )
)
"""Six per-step quintics of ``modula.atom.orthogonalize`` (Newhouse et al., 2025,
arXiv 2507.13338); use with ``eps=1e-12``."""

HARD_CAP_COEFFS: tuple[Triple, ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)
"""Spectral hard cap of Newhouse et al. (2025): four quintics, **no** pre-normalisation; maps
each singular value s to about ``min(1, s)`` (the reference golden: 3.72 -> 1.0099)."""


@dataclasses.dataclass(frozen=True)
class ShapeCoeffs:
    """Per-shape coefficient triples keyed by ``(min(m, n), max(m, n))``, with a fallback.

    ROOT (He et al., 2025) fits one quintic per matrix shape ("AdaNewton"). The key is
    orientation-free, so a tall and a wide matrix of the same sizes share a triple.

    Attributes:
      table: ``((min_dim, max_dim), (a, b, c))`` pairs.
      fallback: the triple for shapes not in the table.
    """

    table: tuple[tuple[tuple[int, int], Triple], ...]
    fallback: Triple = MUON_COEFFS

    def lookup(self, m: int, n: int) -> Triple:
        """The triple for an ``m x n`` matrix."""
        key = (min(m, n), max(m, n))
        for k, triple in self.table:
            if tuple(k) == key:
                return triple
        return self.fallback


ROOT_COEFFS = ShapeCoeffs(
    table=(
        ((2048, 2048), (3.4916, -4.8224, 2.1095)),
        ((2048, 3072), (3.4509, -4.5790, 1.9325)),
        ((2048, 8192), (2.9794, -3.6674, 1.6207)),
        ((2048, 16384), (3.1943, -3.8221, 1.5322)),
    ),
    fallback=MUON_COEFFS,
)
"""The shape table released with ROOT (noah-research ``ROOT/examples/example_train.py``)."""

Coeffs = Triple | Sequence[Triple] | ShapeCoeffs


def _per_step(coeffs: Coeffs, steps: int, m: int, n: int) -> tuple[Triple, ...]:
    if isinstance(coeffs, ShapeCoeffs):
        return (coeffs.lookup(m, n),) * steps
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        return (tuple(float(c) for c in coeffs),) * steps  # type: ignore[return-value]
    per_step = tuple(tuple(float(c) for c in t) for t in coeffs)  # type: ignore[union-attr]
    if any(len(t) != 3 for t in per_step):
        raise ValueError(f"coefficients must be (a, b, c) triples, got {coeffs}")
    if len(per_step) != steps:
        raise ValueError(f"{len(per_step)} per-step coefficient triples given for {steps} steps")
    return per_step  # type: ignore[return-value]


def newton_schulz(
    x: jax.Array,
    *,
    steps: int = 5,
    coeffs: Coeffs = MUON_COEFFS,
    eps: float = 1e-7,
    norm_scale: float = 1.0,
    normalize: bool = True,
    transpose: bool = True,
    dtype: str | jnp.dtype | None = "bfloat16",
) -> jax.Array:
    """Approximates the polar factor ``U V^T`` of each matrix by an odd-polynomial iteration.

    Algorithm (per matrix ``X``, viewed so that rows <= columns)::

        X <- X / (norm_scale * ||X||_F + eps)            # if normalize
        for (a, b, c) in per-step coefficients:
            A <- X X^T;   X <- a X + (b A + c A A) X

    Args:
      x: array of shape ``(..., m, n)``; leading axes are a batch.
      steps: number of iterations (static). Default 5.
      coeffs: one ``(a, b, c)`` triple for every step, a sequence of ``steps`` triples, or a
        :class:`ShapeCoeffs` table. Default Muon's quintic.
      eps: added to the Frobenius norm before dividing. Default 1e-7 (Muon).
      norm_scale: multiplies the norm (Polar Express uses 1.02). Default 1.
      normalize: divide by the Frobenius norm first (False for the spectral hard cap).
      transpose: iterate on the wide orientation (transpose when ``m > n``), so the Gram matrix
        is ``min(m, n)^2``. The result is returned in the input orientation.
      dtype: compute dtype, e.g. ``"bfloat16"`` (Muon's reference) or ``"float32"``; None keeps
        ``x.dtype``. Float32 matmuls run at full (not TF32) precision.

    Returns:
      Array of the shape and dtype of ``x``. A zero matrix maps to zero; non-finite entries
      propagate to their matrix.

    References:
      Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
      https://kellerjordan.github.io/posts/muon/ ; code: github.com/KellerJordan/Muon
      (``zeropower_via_newtonschulz5`` at 857d1ad).
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs an array with ndim >= 2, got shape {x.shape}")
    m, n = x.shape[-2:]
    per_step = _per_step(coeffs, steps, m, n)
    compute = canonicalize_dtype(dtype) or jnp.dtype(x.dtype)
    precision = jax.lax.Precision.HIGHEST if compute == jnp.float32 else None
    mm = lambda p, q: jnp.matmul(p, q, precision=precision)  # noqa: E731
    out_dtype = x.dtype
    swap = transpose and m > n
    if swap:
        x = jnp.swapaxes(x, -1, -2)
    if normalize:
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
        x = (x.astype(jnp.float32) / (norm_scale * norm + eps)).astype(compute)
    else:
        x = x.astype(compute)
    # Scalars multiply in float32 and round once (as PyTorch does for bf16 tensors): a weak-typed
    # scalar would first be rounded to the compute dtype (3.4445 -> 3.4375 in bf16).
    scale = lambda s, t: (s * t.astype(jnp.float32)).astype(compute)  # noqa: E731
    for a, b, c in per_step:
        gram = mm(x, jnp.swapaxes(x, -1, -2))
        poly = scale(b, gram) + scale(c, mm(gram, gram))
        x = scale(a, x) + mm(poly, x)
    if swap:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


def polar_svd(x: jax.Array, *, rtol: float | None = None) -> jax.Array:
    """Exact polar factor ``U V^T`` by SVD: the reference for the iterations above.

    Singular directions with singular value below ``rtol * max(s)`` are dropped (a zero matrix
    maps to zero), so the result is the partial isometry of the polar decomposition.

    Args:
      x: array of shape ``(..., m, n)``.
      rtol: relative cut-off; default ``max(m, n) * finfo(float32).eps``.

    Returns:
      Array of the shape and dtype of ``x``, computed in float32 (float64 if x is float64).
    """
    if x.ndim < 2:
        raise ValueError(f"polar_svd needs an array with ndim >= 2, got shape {x.shape}")
    work = jnp.promote_types(x.dtype, jnp.float32)
    u, s, vt = lapack.svd(x.astype(work))  # one LAPACK call per matrix on CPU
    rtol = max(x.shape[-2:]) * jnp.finfo(work).eps if rtol is None else rtol
    keep = (s > rtol * jnp.max(s, axis=-1, keepdims=True)).astype(work)
    out = jnp.matmul(u * keep[..., None, :], vt, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class NewtonSchulz:
    """Selector for :func:`newton_schulz` (frozen, static under ``optax.inject_hyperparams``).

    Plain data with an :meth:`apply` method, deliberately not callable: ``inject_hyperparams``
    treats callable arguments as schedules. Attributes mirror the kernel's keyword arguments.
    Presets: :meth:`muon`, :meth:`polar_express`, :meth:`root`.
    """

    steps: int = 5
    coeffs: Coeffs = MUON_COEFFS
    eps: float = 1e-7
    norm_scale: float = 1.0
    normalize: bool = True
    transpose: bool = True
    dtype: str | None = "bfloat16"

    def apply(self, x: jax.Array) -> jax.Array:
        """Applies the iteration to ``x`` of shape ``(..., m, n)``."""
        return newton_schulz(
            x,
            steps=self.steps,
            coeffs=self.coeffs,
            eps=self.eps,
            norm_scale=self.norm_scale,
            normalize=self.normalize,
            transpose=self.transpose,
            dtype=self.dtype,
        )

    @classmethod
    def muon(cls, dtype: str | None = "bfloat16") -> NewtonSchulz:
        """Muon: 5 steps of (3.4445, -4.7750, 2.0315), ``||X||_F + 1e-7``, bf16."""
        return cls(steps=5, coeffs=MUON_COEFFS, eps=1e-7, dtype=dtype)

    @classmethod
    def polar_express(cls, dtype: str | None = "bfloat16") -> NewtonSchulz:
        """Polar Express: 5 per-step triples, ``1.02 ||X||_F + 1e-6``."""
        return cls(steps=5, coeffs=POLAR_EXPRESS_COEFFS, eps=1e-6, norm_scale=1.02, dtype=dtype)

    @classmethod
    def root(cls, dtype: str | None = "float32") -> NewtonSchulz:
        """ROOT's AdaNewton: per-shape triples, 5 steps, float32."""
        return cls(steps=5, coeffs=ROOT_COEFFS, eps=1e-7, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class PolarSVD:
    """Selector for the exact polar factor :func:`polar_svd` (slow; a reference)."""

    rtol: float | None = None

    def apply(self, x: jax.Array) -> jax.Array:
        """Applies :func:`polar_svd` to ``x`` of shape ``(..., m, n)``."""
        return polar_svd(x, rtol=self.rtol)
