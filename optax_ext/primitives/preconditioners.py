"""Shampoo-eigenbasis preconditioning: Adam in the eigenbasis of per-axis Gram factors (SOAP)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_ext._boxes import with_boxes
from optax_ext._types import is_masked, leaves_with_path
from optax_ext.kernels import lapack, scaled, sharding
from optax_ext.kernels.matricize import bucket_apply
from optax_ext.kernels.newton_schulz import NewtonSchulz
from optax_ext.primitives._matrices import MatrixLeaves


@dataclasses.dataclass(frozen=True)
class SoapLayout:
    """Which axes of each tensor get a Shampoo factor (static under ``inject_hyperparams``).

    Attributes:
      max_precond_dim: axes larger than this get no factor (e.g. a vocabulary axis): the
        rotation leaves them as they are. Default 10000.
      merge_dims: merge consecutive axes while their product stays <= ``max_precond_dim``.
      precondition_1d: give 1-D tensors a factor (default: plain Adam for them).
    """

    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False


BasisHook = Callable[[int, int, jax.Array, jax.Array], jax.Array]
"""``(leaf_index, axis, count, basis) -> basis``: replaces a computed eigenbasis (tests)."""


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Attributes:
      count: number of calls so far (int32); the first call only builds the preconditioner, so
        the bias-correction step is ``count - 1``.
      mu: first moment in the rotated basis (param-shaped).
      nu: second moment in the rotated basis (param-shaped).
      gg: per leaf, a tuple with one float32 Gram factor ``(d_i, d_i)`` per (merged) axis, or
        None for axes without one (larger than ``max_precond_dim``, or 1-D leaves without
        ``precondition_1d``): the tree structure never changes. On a device mesh, ``init``
        spreads the rows of every factor over all devices (when they divide ``d_i``), and
        ``update`` returns every state leaf in the layout it received.
      q: per leaf, the eigenbases matching ``gg`` (parameter dtype), laid out like ``gg``.
      gg_exponent: per leaf, an int32 scalar per factor of ``gg`` (None where ``gg`` is None):
        the Gram factor is ``gg * 2**gg_exponent`` (0 unless gradients reached ``2**40``;
        see :mod:`optax_ext.kernels.scaled`), so it never overflows float32.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    gg: Any
    q: Any
    gg_exponent: Any


def merged_shape(shape: Sequence[int], max_dim: int, merge: bool) -> tuple[int, ...]:
    """SOAP's ``merge_dims``: merge consecutive axes while the product stays <= ``max_dim``."""
    if not merge:
        return tuple(shape)
    out: list[int] = []
    cur = 1
    for d in shape:
        if cur * d > max_dim and cur > 1:
            out.append(cur)
            cur = d
        else:
            cur *= d
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def _merged(x: jax.Array, mshape: tuple[int, ...]) -> jax.Array:
    """``x`` reshaped to its merged shape. Under explicit mesh axes each merged group keeps the
    sharding of its leading axis (the layout a reshape can carry); a sharding of another axis
    of the group is gathered first."""
    if tuple(x.shape) == mshape:
        return x
    mesh = sharding.mesh_of(x)
    if mesh is not None and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
        spec = list(jax.typeof(x).sharding.spec) + [None] * x.ndim
        want, axis = [], 0
        for size in mshape:  # the axes of x that make up this merged axis
            lead, prod = axis, 1
            while prod < size:
                prod *= x.shape[axis]
                want.append(spec[axis] if axis == lead else None)
                axis += 1
        want += [None] * (x.ndim - len(want))
        if want != spec[: x.ndim]:
            x = jax.sharding.reshard(x, NamedSharding(mesh, P(*want)))
    return x.reshape(mshape)


def _unmerged(y: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :func:`_merged`: ``y`` in ``like``'s shape, dtype and (explicit) layout."""
    if y.shape != like.shape:
        y = y.reshape(like.shape)
    return sharding.match(y.astype(like.dtype), like)


def _spread(x: jax.Array, like: Any) -> jax.Array:
    """``x`` with its rows spread over every device of ``like``'s mesh (when they divide;
    otherwise replicated on that mesh, the layout ``update`` returns it in).

    SOAP's ``d x d`` factors share no axis with their parameter that would shard them the
    same way (an FSDP ``(m, n)`` kernel shards ``m`` only, so its ``n x n`` factor would be
    replicated); spreading the rows of every factor over all devices keeps the per-device
    factor bytes at ``1 / devices`` of the total. Concrete parameters (eager ``init``) on a
    multi-device ``NamedSharding``, or traced ones on an explicit-axis mesh; otherwise ``x``.
    """
    if isinstance(like, jax.core.Tracer):
        mesh = sharding.mesh_of(like)
        if mesh is None or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
            return x
        devices = math.prod(mesh.axis_sizes)
        place = lambda spec: jax.sharding.reshard(x, NamedSharding(mesh, spec))  # noqa: E731
    else:
        s = getattr(like, "sharding", None)
        if not isinstance(s, NamedSharding) or s.mesh.size <= 1:
            return x
        mesh, devices = s.mesh, s.mesh.size
        place = lambda spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    if x.shape[0] % devices:
        return place(P())
    return place(P(tuple(mesh.axis_names)))


def _per_axis(values: Sequence[Any], has: Sequence[bool]) -> tuple[Any, ...]:
    """``values`` (one per axis with a factor) spread over all axes, None where ``has`` is not."""
    it = iter(values)
    return tuple(next(it) if h else None for h in has)


def _has_factor(shape: Sequence[int], max_dim: int, precondition_1d: bool) -> list[bool]:
    if len(shape) == 1 and not precondition_1d:
        return [False]
    return [d <= max_dim for d in shape]


def rotate(x: jax.Array, qs: Sequence[jax.Array | None], *, back: bool = False) -> jax.Array:
    """Contracts every axis ``1 + i`` of a batch ``x`` with ``qs[i]`` (``x Q`` into, ``x Q^T``
    back), each batch entry with its own ``Q``: ``x`` is ``(b, d_1, ..., d_k)``, ``qs[i]`` is
    ``(b, d_i, d_i)`` or None (the axis is left as it is).

    A cyclic sweep: the contracted (or, without a factor, moved) axis goes last, so after all
    axes the order is restored. 2-D entries: ``Q_0^T X Q_1`` (``back``: ``Q_0 X Q_1^T``).
    """
    hp = jax.lax.Precision.HIGHEST
    for q in qs:
        if q is None:
            x = jnp.moveaxis(x, 1, -1)
        else:
            dims = (((1,), (2 if back else 1,)), ((0,), (0,)))
            x = jax.lax.dot_general(
                x, q.astype(x.dtype), dims, precision=hp, preferred_element_type=x.dtype
            )
    return x


def gram(x: jax.Array, axis: int) -> jax.Array:
    """Each entry of a batch ``x`` contracted with itself over every axis but ``1 + axis``
    (float32 ``(b, d, d)``)."""
    x = x.astype(jnp.float32)
    others = tuple(a for a in range(1, x.ndim) if a != 1 + axis)
    dims = ((others, others), ((0,), (0,)))
    return jax.lax.dot_general(x, x, dims, precision=jax.lax.Precision.HIGHEST)


def _eigh_descending(gg: jax.Array) -> jax.Array:
    d = gg.shape[-1]
    _, vecs = lapack.eigh(gg + 1e-30 * jnp.eye(d, dtype=gg.dtype))
    return vecs[..., ::-1]


def _power_qr(gg: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    hp = jax.lax.Precision.HIGHEST
    est = jnp.einsum("bij,bik,bkj->bj", q, gg, q, precision=hp)  # diag(Q^T GG Q)
    perm = jnp.argsort(-est, axis=-1)
    q = jnp.take_along_axis(q, perm[:, None, :], axis=-1)
    q = lapack.qr(jnp.matmul(gg, q, precision=hp))
    return q, perm


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    *,
    precondition_frequency: int = 10,
    layout: SoapLayout = SoapLayout(),
    normalize_grads: bool = False,
    basis_hook: BasisHook | None = None,
) -> optax.GradientTransformation:
    """SOAP's direction: Adam in the eigenbasis of Shampoo's per-axis Gram factors.

    Algorithm (per tensor; ``t`` the number of real updates; 2-D shown)::

        call 1:  GG_L, GG_R <- (1 - bs) (G G^T, G^T G);  Q_* <- eigh(GG_*) (descending);  u = 0
        later:   G~ = Q_L^T G Q_R;  m <- b1 m + (1 - b1) G~;  v <- b2 v + (1 - b2) G~^2
                 u = sqrt(1 - b2^t)/(1 - b1^t) Q_L (m / (sqrt(v) + eps)) Q_R^T
                 [normalize_grads: u <- u / (1e-30 + rms(u))]
                 GG_* <- bs GG_* + (1 - bs) (G G^T, G^T G)     (this step's G, after use)
                 if t mod f == 0:  per side: sort Q's columns by diag(Q^T GG Q), permute v
                                   accordingly, Q <- qr(GG Q).Q;  m re-expressed in the new Q

    Args:
      b1, b2: Defaults 0.95, 0.95.
      shampoo_beta: Gram EMA ``bs``; None = ``b2`` (the reference's ``-1``).
      eps: Default 1e-8.
      precondition_frequency: ``f``. Default 10.
      layout: :class:`SoapLayout` (``max_precond_dim`` 10000, no ``merge_dims``, no
        ``precondition_1d``).
      normalize_grads: RMS-normalise the update. Default False.
      basis_hook: replaces each computed eigenbasis (a test hook for replaying a reference's
        bases); a callable, so pass it through ``static_args`` of ``inject_hyperparams``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleBySoapState`.

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade, 2024, "SOAP:
      Improving and Stabilizing Shampoo using Adam", ICLR 2025, arXiv 2409.11321; code:
      github.com/nikhilvyas/SOAP (``soap.py`` at a1e5535).

    Notes:
      - Follows the code: the first call only builds the preconditioner (no step), ``v`` is
        permuted (not rotated) at a refresh, ``m`` is re-rotated exactly, the refresh is one
        power-iteration step with QR (``eigh`` only at the first call), Gram factors are fp32.
      - Degenerate eigenspaces at the first call (a Gram matrix of rank < d) make the initial
        basis arbitrary inside the null space; the trajectory depends on that choice, so
        different eigensolvers (torch, numpy, XLA) give different, equally valid, runs.
      - Both sides are treated alike: a flax ``(in, out)`` kernel gets factors for fan-in and
        fan-out, the same pair a PyTorch ``(out, in)`` weight gets. ``data_format`` (PyTorch
        channels-last) has no counterpart.
      - Overflow: the Gram factors are kept as ``gg * 2**gg_exponent`` (the gradient is scaled
        by a power of two before it is squared), so gradients up to the float32 range leave
        them and the bases finite; ``v`` is Adam's second moment and saturates at ``inf``
        above ``~1e19`` as Adam's does (those entries' updates are then 0).
      - Tensors with the same merged shape, factored axes and dtypes are processed as one
        stacked batch (one ``eigh``/QR call per factor axis and bucket). On a device mesh the
        batch is laid out "owner computes" (:func:`optax_ext.kernels.bucket_apply`): each
        device rotates, refreshes and re-rotates the tensors it holds whole, with no per-matrix
        collective; gradient, moments, factors, bases and exponents cost one all-to-all each
        way per stacked array (the exponents one all-gather back), and every output returns
        to its input's layout. Tensors without a factor (1-D ones by default) are plain Adam in
        their own layout.
      - On CPU the eigendecompositions and QR steps run one matrix per LAPACK call (see
        :mod:`optax_ext.kernels.lapack`: batched calls can deadlock XLA's CPU runtime).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_soap(precondition_frequency=2)
      >>> g = {"w": jnp.arange(6.0).reshape(2, 3)}
      >>> s = tx.init(g)
      >>> u, s = tx.update(g, s)          # first call: preconditioner only
      >>> float(abs(u["w"]).max()), [x.shape for x in s.gg["w"]]
      (0.0, [(2, 2), (3, 3)])
    """
    bs = b2 if shampoo_beta is None else shampoo_beta

    def factors(shape):
        mshape = merged_shape(shape, layout.max_precond_dim, layout.merge_dims)
        return mshape, _has_factor(mshape, layout.max_precond_dim, layout.precondition_1d)

    def init_fn(params):
        pairs, treedef = leaves_with_path(params)
        gg, q, ge = [], [], []
        for _, x in pairs:
            if is_masked(x):
                gg.append(x)
                q.append(x)
                ge.append(x)
                continue
            mshape, has = factors(jnp.shape(x))
            zeros = lambda d, dt: _spread(jnp.zeros((d, d), dt), x)  # noqa: E731
            gg.append(tuple(zeros(d, jnp.float32) if h else None for d, h in zip(mshape, has)))
            q.append(tuple(zeros(d, x.dtype) if h else None for d, h in zip(mshape, has)))
            ge.append(tuple(jnp.zeros([], jnp.int32) if h else None for h in has))
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            gg=treedef.unflatten(gg),
            q=treedef.unflatten(q),
            gg_exponent=treedef.unflatten(ge),
        )

    def step(static, count, g, m, v, *stats):
        """One bucket of same-signature tensors, stacked on a leading axis ``b``.

        ``static`` is ``(has, index)``: which axes have a factor, and the leaf index when a
        ``basis_hook`` needs it (then the bucket holds that leaf alone). ``stats``: the ``k``
        factors, the ``k`` bases, and the exponents as one ``(b, k)`` array (none without a
        factor). Returns the update, ``m``, ``v`` and the new ``stats``, in that order.
        """
        has, index = static
        k = len(stats) // 2
        gg, q = list(stats[:k]), list(stats[k : 2 * k])
        ge = [stats[2 * k][:, j] for j in range(k)]
        axes = [a for a, h in enumerate(has) if h]
        tensor_axes = tuple(range(1, g.ndim))

        # Statistics with this step's gradient (used after the step, so G never preconditions
        # itself). On the first call GG starts at 0 so the EMA gives (1 - bs) G G^T. Kept as
        # value * 2**exponent: the gradient is scaled by a power of two before it is squared.
        eg = scaled.safe_exponent(g, axes=tensor_axes)
        gs = scaled.scale_down(g, eg)
        pairs = [scaled.ema(f, e, gram(gs, a), 2 * eg, bs) for a, f, e in zip(axes, gg, ge)]
        gg, ge = [f for f, _ in pairs], [e for _, e in pairs]

        def hooked(a, basis):
            if basis_hook is None:
                return basis
            return basis.at[0].set(basis_hook(index, a, count, basis[0]).astype(basis.dtype))

        def first_call():
            eigh = [_eigh_descending(f).astype(qi.dtype) for f, qi in zip(gg, q)]
            return jnp.zeros_like(g), m, v, [hooked(a, b) for a, b in zip(axes, eigh)]

        def later_call():
            t = count.astype(jnp.float32)  # real updates including this one, from call 2 on
            bc = jnp.sqrt(1 - b2**t) / (1 - b1**t)
            refresh = (count % jnp.maximum(jnp.asarray(precondition_frequency), 1)) == 0
            gt = rotate(g, _per_axis(q, has))
            new_m = (b1 * m + (1 - b1) * gt).astype(m.dtype)
            new_v = (b2 * v + (1 - b2) * jnp.square(gt)).astype(v.dtype)
            n = rotate(new_m / (jnp.sqrt(new_v) + eps), _per_axis(q, has), back=True)
            if normalize_grads:
                rms = jnp.sqrt(jnp.mean(jnp.square(n), axis=tensor_axes, keepdims=True))
                n = n / (1e-30 + rms)
            out = (n * bc).astype(g.dtype)

            def do_refresh():
                m_orig = rotate(new_m, _per_axis(q, has), back=True)
                vs, bases = new_v, []
                for a, f, qi in zip(axes, gg, q):
                    qn, perm = _power_qr(f, qi.astype(jnp.float32))
                    vs = jax.vmap(lambda x, p, a=a: jnp.take(x, p, axis=a))(vs, perm)
                    bases.append(hooked(a, qn.astype(qi.dtype)))
                return rotate(m_orig, _per_axis(bases, has)).astype(new_m.dtype), vs, bases

            return out, *jax.lax.cond(refresh, do_refresh, lambda: (new_m, new_v, q))

        out, m, v, q = jax.lax.cond(count == 0, first_call, later_call)
        return out, m, v, *gg, *q, *([jnp.stack(ge, axis=1)] if k else [])

    def update_fn(updates, state, params=None):
        del params
        pairs, treedef = leaves_with_path(updates)
        flat = treedef.flatten_up_to
        mus, nus, ggs, qs, ges = map(
            flat, (state.mu, state.nu, state.gg, state.q, state.gg_exponent)
        )
        count = state.count
        kernel = lambda static, *arrays: step(static, count, *arrays)  # noqa: E731
        present = lambda xs: [x for x in xs if x is not None]  # noqa: E731

        # Same-signature tensors (merged shape, axes with a factor, dtypes) run as one stacked
        # batch, laid out "owner computes" on a mesh: each device rotates, refreshes and
        # re-rotates the tensors it holds whole; every output goes back to its input's layout.
        items, statics, where, done = [], [], [], {}
        for i, (_, g) in enumerate(pairs):
            if is_masked(g):
                continue
            mshape, has = factors(jnp.shape(g))
            arrays = [_merged(x, mshape)[None] for x in (g, mus[i], nus[i])]
            static = (tuple(has), i if basis_hook is not None else None)
            if not any(has):  # Adam (no factor): elementwise, in the leaf's own layout
                done[i] = kernel(static, *arrays)
                continue
            arrays += [x[None] for x in present(ggs[i]) + present(qs[i])]
            arrays.append(jnp.stack(present(ges[i]))[None])
            items.append(tuple(arrays))
            statics.append(static)
            where.append(i)
        width = max(map(len, items), default=0)
        done.update(zip(where, bucket_apply(kernel, items, static=statics, out_like=range(width))))

        new_u, new_m, new_v = flat(updates), list(mus), list(nus)
        new_gg, new_q, new_ge = list(ggs), list(qs), list(ges)
        for i, (u, m, v, *stats) in done.items():
            new_u[i] = _unmerged(u[0], pairs[i][1])
            new_m[i] = _unmerged(m[0], mus[i])
            new_v[i] = _unmerged(v[0], nus[i])
            if stats:
                k, has = len(stats) // 2, [x is not None for x in ggs[i]]
                new_gg[i] = _per_axis([x[0] for x in stats[:k]], has)
                new_q[i] = _per_axis([x[0] for x in stats[k : 2 * k]], has)
                new_ge[i] = _per_axis([stats[2 * k][0, j] for j in range(k)], has)
        new_state = ScaleBySoapState(
            count=optax.safe_increment(count),
            mu=treedef.unflatten(new_m),
            nu=treedef.unflatten(new_v),
            gg=treedef.unflatten(new_gg),
            q=treedef.unflatten(new_q),
            gg_exponent=treedef.unflatten(new_ge),
        )
        return (
            sharding.keep_layout(treedef.unflatten(new_u), updates),
            sharding.keep_layout(new_state, state),
        )

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


@dataclasses.dataclass(frozen=True)
class OnlinePCA:
    """COSMOS's input-side basis: rank-``rank`` online PCA of ``G^T G`` (static spec).

    Attributes:
      rank: basis size ``r``, capped per matrix at its fan-in size (see :meth:`rank_for`), as
        the other low-rank transformations cap theirs. Default 64.
    """

    rank: int = 64

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"OnlinePCA: rank must be a positive int, got {self.rank!r}")

    def rank_for(self, fan_in: int) -> int:
        """The basis size for a matrix with ``fan_in`` inputs: ``min(rank, fan_in)``."""
        return min(self.rank, fan_in)


class ScaleByCosmosState(NamedTuple):
    """State of :func:`scale_by_cosmos` (per matrix leaf, PyTorch orientation ``m = fan_out``).

    Attributes:
      count: number of steps so far (int32).
      mu: sum-form momentum ``M`` (param-shaped).
      nu: second moment of ``G P``, ``(*batch, fan_out, r)``.
      basis: ``P``, ``(*batch, fan_in, r)``.
      gram: ``S``, the projected Gram EMA, ``(*batch, r, r)``, stored divided by
        ``2**gram_exponent``.
      gram_exponent: ``(*batch,)`` int32, 0 unless gradients reached ``2**40`` (see
        :mod:`optax_ext.kernels.scaled`): ``S`` never overflows float32.

    ``r`` is ``subspace.rank_for(fan_in)`` for each leaf.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    basis: optax.Updates
    gram: optax.Updates
    gram_exponent: optax.Updates


def scale_by_cosmos(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    subspace: OnlinePCA = OnlinePCA(rank=64),
    gamma: float = 0.2,
    nesterov: bool = True,
    use_momentum_without_nesterov: bool = False,
    ns: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """COSMOS's direction: SOAP-like Adam on a leading input subspace, Muon on the rest.

    Algorithm (PyTorch orientation: ``G`` is ``(fan_out, fan_in) = (m, n)``; ``t`` 1-based)::

        M <- b1 M + G;   c1 = (1 - b1^t)/(1 - b1);   c2 = 1 - b2^t
        t = 1:  P <- top-r left singular vectors of G^T G;  S <- (1 - b2) (G P)^T (G P)
        t > 1:  P <- qr(b2 P S + (1 - b2) G^T G P).Q;  T = P_old^T P
                S <- b2 T^T S T + (1 - b2) (G P)^T (G P)
        V <- b2 V + (1 - b2) (G P)^2
        U = (G + b1 M) / (1 + b1 c1)            (nesterov; else G / c1, the code's branch)
        A = ((U P) / (sqrt(V)/sqrt(c2) + eps)) P^T
        O = NS5(U - U P P^T);   O <- sqrt(mn) O / (||O|| + eps)
        D = A + gamma O;   u = sqrt(mn) D / (||D|| + eps)

    Same-shaped matrices are processed together, one batched call per shape, laid out "owner
    computes" on a device mesh (see :func:`optax_ext.kernels.bucket_apply`): each device
    updates the basis, Gram matrix and second moment of the matrices it holds whole, and each
    of them goes back to its storage layout, which follows the parameter where the axes agree
    (``sharding.align`` with ``spread``: a row-sharded ``(fan_in, fan_out)`` kernel keeps its
    ``basis`` row-sharded and spreads ``nu`` and ``gram`` over their largest divisible axis).

    Args:
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8 (class; README: 0.95, 0.95).
      subspace: :class:`OnlinePCA` with the rank (default 64), capped at each matrix's fan-in
        size. The basis spans the fan-in side of a flax ``(in, out)`` kernel (the PyTorch
        input dimension), always.
      gamma: weight of the Muon part. Default 0.2.
      nesterov: Default True.
      use_momentum_without_nesterov: with ``nesterov=False`` the reference ignores the momentum
        (``U = G / c1``); True uses ``U = M / c1`` instead. Default False (= code).
      ns: the Newton-Schulz spec; default Muon's bf16 quintic.
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByCosmosState`. Every matrix update
      has RMS exactly 1 (Frobenius norm ``sqrt(mn)``).

    Raises:
      ValueError: in ``init`` for a leaf with ``ndim < 2``.

    References:
      Liu et al., 2025, "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of
      LLMs", arXiv 2502.17410; code: github.com/lliu606/COSMOS (``COSMOS_optim.py`` at 61de180).

    Notes:
      ``S`` and ``G^T G`` are kept with a power-of-two exponent, so gradients up to the float32
      range leave the basis finite; ``V`` is an Adam second moment and saturates at ``inf``
      for gradients above ``~1e19``, as Adam's does (that step's adaptive part is then 0).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_cosmos(subspace=optax_ext.OnlinePCA(rank=2))
      >>> g = {"w": jnp.arange(12.0).reshape(4, 3) / 10}
      >>> u, s = tx.update(g, tx.init(g))
      >>> s.basis["w"].shape, round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 4)
      ((4, 2), 1.0)
    """
    ns = NewtonSchulz.muon() if ns is None else ns
    who = "scale_by_cosmos"
    hp = jax.lax.Precision.HIGHEST
    mm = lambda a, b: jnp.matmul(a, b, precision=hp)  # noqa: E731
    tr = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        shapes = leaves.matrix_shapes()
        ranks = [subspace.rank_for(n_in) for _, n_in, _ in shapes]
        dts = [x.dtype for x in leaves.leaves(params)]
        nu = [jnp.zeros((b, m_out, r), d) for (b, _, m_out), r, d in zip(shapes, ranks, dts)]
        basis = [jnp.zeros((b, n_in, r), d) for (b, n_in, _), r, d in zip(shapes, ranks, dts)]
        gram = [jnp.zeros((b, r, r), jnp.float32) for (b, _, _), r in zip(shapes, ranks)]
        expo = [jnp.zeros((b,), jnp.int32) for b, _, _ in shapes]
        return ScaleByCosmosState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=leaves.stored(nu, params, spread=True),
            basis=leaves.stored(basis, params, spread=True),
            gram=leaves.stored(gram, params, spread=True),
            gram_exponent=leaves.stored(expo, params),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, who)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        first = state.count == 0
        c1 = (1 - b1**t) / (1 - b1)
        c2 = 1 - b2**t
        mu = jax.tree.map(lambda g, m: b1 * m + g, updates, state.mu)

        def step(g, m, v, p_old, s_old, e_old):
            """One bucket of same-shaped matrices, ``(b, fan_in, fan_out)`` views."""
            dtype = g.dtype
            g, m = tr(g.astype(jnp.float32)), tr(m.astype(jnp.float32))  # torch (m, n)
            p_old, v = p_old.astype(jnp.float32), v.astype(jnp.float32)
            r = p_old.shape[-1]
            eg = scaled.safe_exponent(g, axes=(-2, -1))  # G = gs 2**eg, exactly
            gs = scaled.scale_down(g, eg)
            gtg = mm(tr(gs), gs)  # G^T G 2**(-2 eg)

            def init_basis():
                u, _, _ = lapack.svd(gtg)
                p = u[..., :r]
                gp = mm(gs, p)
                zero = jnp.zeros_like(s_old)
                return (p, *scaled.ema(zero, jnp.zeros_like(e_old), mm(tr(gp), gp), 2 * eg, b2))

            def track_basis():
                e = jnp.maximum(e_old, 2 * eg)
                s_al = jnp.ldexp(s_old, (e_old - e)[:, None, None])
                gtg_al = jnp.ldexp(gtg, (2 * eg - e)[:, None, None])
                p = lapack.qr(b2 * mm(p_old, s_al) + (1 - b2) * mm(gtg_al, p_old))
                tt = mm(tr(p_old), p)
                gp = mm(gs, p)
                return (p, *scaled.ema(mm(mm(tr(tt), s_old), tt), e_old, mm(tr(gp), gp), 2 * eg, b2))

            p, s, e = jax.lax.cond(first, init_basis, track_basis)
            gp = mm(g, p)
            v = b2 * v + (1 - b2) * gp * gp
            if nesterov:
                u = (g + b1 * m) / (1 + b1 * c1)
            else:
                u = (m if use_momentum_without_nesterov else g) / c1
            up = mm(u, p)
            a = mm(up / (jnp.sqrt(v) / jnp.sqrt(c2) + eps), tr(p))
            size = (g.shape[-2] * g.shape[-1]) ** 0.5
            fro = lambda x: jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))  # noqa: E731
            o = ns.apply(u - mm(up, tr(p))).astype(jnp.float32)
            o = size * o / (fro(o) + eps)
            d = a + gamma * o
            d = size * d / (fro(d) + eps)
            return tr(d).astype(dtype), v.astype(dtype), p.astype(dtype), s, e

        items = list(
            zip(
                leaves.views(updates),
                leaves.views(mu),
                leaves.unstored(state.nu),
                leaves.unstored(state.basis),
                leaves.unstored(state.gram),
                leaves.unstored(state.gram_exponent),
            )
        )
        # each output back in the layout of the input it replaces (owner computes on a mesh)
        outs = bucket_apply(step, items, out_like=(0, 2, 3, 4, 5))
        outs, nus, bases, grams, expos = zip(*outs) if items else [()] * 5
        new_state = ScaleByCosmosState(
            count=count,
            mu=mu,
            nu=leaves.stored(list(nus), like=updates, spread=True),
            basis=leaves.stored(list(bases), like=updates, spread=True),
            gram=leaves.stored(list(grams), like=updates, spread=True),
            gram_exponent=leaves.stored(list(expos), like=updates),
        )
        return (
            sharding.keep_layout(leaves.restore(list(outs), like=updates), updates),
            sharding.keep_layout(new_state, state),
        )

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


class ScaleByCosmosAdamState(NamedTuple):
    """State of :func:`scale_by_cosmos_adam`: ``count``, ``mu``, ``nu``."""

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_cosmos_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """The Adam that COSMOS's reference code runs on non-matrix tensors, constants included.

    Algorithm::

        m <- b1 m + 0.1 g;   v <- b2 v + (1 - b2) g^2
        u = m / (1 - 0.9^t) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The hard-coded 0.1 and 0.9 make it a consistent Adam only for ``b1 = 0.9``; kept for
    fidelity with ``COSMOS_optim.py`` (61de180). Use a standard Adam for anything else.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_cosmos_adam(0.9, 0.999)
      >>> round(float(tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))[0][0]), 4)
      1.0
    """

    def init_fn(params):
        return ScaleByCosmosAdamState(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + 0.1 * g, updates, state.mu)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        out = jax.tree.map(
            lambda m, v, g: (m / (1 - 0.9**t) / (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps)).astype(
                g.dtype
            ),
            mu,
            nu,
            updates,
        )
        return out, ScaleByCosmosAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
