"""Shampoo-eigenbasis preconditioning: Adam in the eigenbasis of per-axis Gram factors (SOAP)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._boxes import with_boxes
from optax_ext._types import is_masked, leaf_error, leaves_with_path
from optax_ext.kernels import sharding
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
        ``precondition_1d``): the tree structure never changes.
      q: per leaf, the eigenbases matching ``gg`` (parameter dtype).
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    gg: Any
    q: Any


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


def _has_factor(shape: Sequence[int], max_dim: int, precondition_1d: bool) -> list[bool]:
    if len(shape) == 1 and not precondition_1d:
        return [False]
    return [d <= max_dim for d in shape]


def rotate(x: jax.Array, qs: Sequence[jax.Array | None], *, back: bool = False) -> jax.Array:
    """Contracts every axis ``i`` of ``x`` with ``qs[i]`` (``x Q`` into, ``x Q^T`` back).

    A cyclic sweep: the contracted (or, without a factor, moved) axis goes last, so after all
    axes the order is restored. 2-D: ``Q_0^T X Q_1`` (``back``: ``Q_0 X Q_1^T``).
    """
    hp = jax.lax.Precision.HIGHEST
    for q in qs:
        if q is None:
            x = jnp.moveaxis(x, 0, -1)
        else:
            x = jnp.tensordot(x, q.astype(x.dtype), axes=((0,), (1 if back else 0,)), precision=hp)
    return x


def gram(x: jax.Array, axis: int) -> jax.Array:
    """``x`` contracted with itself over every axis but ``axis`` (float32 ``(d, d)``)."""
    x = x.astype(jnp.float32)
    others = tuple(a for a in range(x.ndim) if a != axis)
    return jnp.tensordot(x, x, axes=(others, others), precision=jax.lax.Precision.HIGHEST)


def _eigh_descending(gg: jax.Array) -> jax.Array:
    d = gg.shape[-1]
    _, vecs = jnp.linalg.eigh(gg + 1e-30 * jnp.eye(d, dtype=gg.dtype))
    return vecs[..., ::-1]


def _power_qr(gg: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    hp = jax.lax.Precision.HIGHEST
    est = jnp.einsum("bij,bik,bkj->bj", q, gg, q, precision=hp)  # diag(Q^T GG Q)
    perm = jnp.argsort(-est, axis=-1)
    q = jnp.take_along_axis(q, perm[:, None, :], axis=-1)
    q, _ = jnp.linalg.qr(jnp.matmul(gg, q, precision=hp))
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
        gg, q = [], []
        for _, x in pairs:
            if is_masked(x):
                gg.append(x)
                q.append(x)
                continue
            mshape, has = factors(jnp.shape(x))
            gg.append(
                tuple(jnp.zeros((d, d), jnp.float32) if h else None for d, h in zip(mshape, has))
            )
            q.append(tuple(jnp.zeros((d, d), x.dtype) if h else None for d, h in zip(mshape, has)))
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            gg=treedef.unflatten(gg),
            q=treedef.unflatten(q),
        )

    def hook(index, axis, count, basis):
        return basis if basis_hook is None else basis_hook(index, axis, count, basis)

    def update_fn(updates, state, params=None):
        del params
        pairs, treedef = leaves_with_path(updates)
        active = [i for i, (_, g) in enumerate(pairs) if not is_masked(g)]
        flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
        gs = [pairs[i][1] for i in active]
        mshapes = [factors(jnp.shape(g))[0] for g in gs]
        ms = [flat(state.mu)[i].reshape(s) for i, s in zip(active, mshapes)]
        vs = [flat(state.nu)[i].reshape(s) for i, s in zip(active, mshapes)]
        ggs = [list(flat(state.gg)[i]) for i in active]
        qs = [list(flat(state.q)[i]) for i in active]
        shapes = [factors(jnp.shape(g)) for g in gs]
        gms = [g.reshape(s) for g, (s, _) in zip(gs, shapes)]
        count = state.count
        t = count.astype(jnp.float32)  # real updates including this one, from call 2 on

        # Statistics with this step's gradient (used after the step, so G never preconditions
        # itself). On the first call GG starts at 0 so the EMA gives (1 - bs) G G^T.
        new_gg = []
        for g, gg, (_, has) in zip(gms, ggs, shapes):
            new_gg.append(
                [
                    bs * f + (1 - bs) * gram(g, a) if h else f
                    for a, (f, h) in enumerate(zip(gg, has))
                ]
            )

        def first_call():
            items, where = [], []
            for k, (gg, (_, has)) in enumerate(zip(new_gg, shapes)):
                for a, h in enumerate(has):
                    if h:
                        items.append((gg[a][None],))
                        where.append((k, a))
            bases = bucket_apply(_eigh_descending, items)
            out_q = [list(q) for q in qs]
            for (k, a), b in zip(where, bases):
                out_q[k][a] = hook(active[k], a, count, b[0].astype(qs[k][a].dtype))
            zeros = [jnp.zeros_like(g) for g in gms]
            return zeros, ms, vs, out_q

        def later_call():
            out, new_m, new_v, new_q = [], [], [], []
            bc = jnp.sqrt(1 - b2**t) / (1 - b1**t)
            refresh = (count % jnp.maximum(jnp.asarray(precondition_frequency), 1)) == 0
            for g, m, v, q, (_, has) in zip(gms, ms, vs, qs, shapes):
                qq = [qi if h else None for qi, h in zip(q, has)]
                gt = rotate(g, qq)
                m = (b1 * m + (1 - b1) * gt).astype(m.dtype)
                v = (b2 * v + (1 - b2) * jnp.square(gt)).astype(v.dtype)
                n = rotate(m / (jnp.sqrt(v) + eps), qq, back=True)
                if normalize_grads:
                    n = n / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(n))))
                out.append((n * bc).astype(g.dtype))
                new_m.append(m)
                new_v.append(v)
                new_q.append(q)

            def do_refresh():
                items, where = [], []
                for k, (gg, q, (_, has)) in enumerate(zip(new_gg, new_q, shapes)):
                    for a, h in enumerate(has):
                        if h:
                            items.append((gg[a][None], q[a][None].astype(jnp.float32)))
                            where.append((k, a))
                results = bucket_apply(_power_qr, items)
                ms2, vs2 = list(new_m), list(new_v)
                qs2 = [list(q) for q in new_q]
                m_orig = [
                    rotate(m, [qi if h else None for qi, h in zip(q, has)], back=True)
                    for m, q, (_, has) in zip(new_m, new_q, shapes)
                ]
                for (k, a), (qn, perm) in zip(where, results):
                    vs2[k] = jnp.take(vs2[k], perm[0], axis=a)
                    qs2[k][a] = hook(active[k], a, count, qn[0].astype(new_q[k][a].dtype))
                for k, (_, has) in enumerate(shapes):
                    qq = [qi if h else None for qi, h in zip(qs2[k], has)]
                    ms2[k] = rotate(m_orig[k], qq).astype(new_m[k].dtype)
                return ms2, vs2, qs2

            def keep():
                return new_m, new_v, [list(q) for q in new_q]

            new_m, new_v, new_q = jax.lax.cond(refresh, do_refresh, keep)
            return out, new_m, new_v, new_q

        out, new_m, new_v, new_q = jax.lax.cond(count == 0, first_call, later_call)

        def rebuild(values, like_tree, cast=None):
            flat_like = list(flat(like_tree))
            for k, i in enumerate(active):
                val = values[k]
                flat_like[i] = val if cast is None else cast(val, flat_like[i])
            return treedef.unflatten(flat_like)

        reshape_as = lambda val, like: val.reshape(like.shape).astype(like.dtype)  # noqa: E731
        return rebuild(out, updates, reshape_as), ScaleBySoapState(
            count=optax.safe_increment(count),
            mu=rebuild(new_m, state.mu, reshape_as),
            nu=rebuild(new_v, state.nu, reshape_as),
            gg=rebuild([tuple(g) for g in new_gg], state.gg),
            q=rebuild([tuple(q) for q in new_q], state.q),
        )

    return with_boxes(sharding.gathered(optax.GradientTransformation(init_fn, update_fn)))


@dataclasses.dataclass(frozen=True)
class OnlinePCA:
    """COSMOS's input-side basis: rank-``rank`` online PCA of ``G^T G`` (static spec).

    Attributes:
      rank: basis size ``r`` (must not exceed the fan-in size). Default 64.
    """

    rank: int = 64


class ScaleByCosmosState(NamedTuple):
    """State of :func:`scale_by_cosmos` (per matrix leaf, PyTorch orientation ``m = fan_out``).

    Attributes:
      count: number of steps so far (int32).
      mu: sum-form momentum ``M`` (param-shaped).
      nu: second moment of ``G P``, ``(*batch, fan_out, r)``.
      basis: ``P``, ``(*batch, fan_in, r)``.
      gram: ``S``, the projected Gram EMA, ``(*batch, r, r)``.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    basis: optax.Updates
    gram: optax.Updates


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

    Args:
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8 (class; README: 0.95, 0.95).
      subspace: :class:`OnlinePCA` with the rank (default 64). The basis spans the fan-in side
        of a flax ``(in, out)`` kernel (the PyTorch input dimension), always.
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
      ValueError: in ``init`` for a leaf with ``ndim < 2`` or a rank above its fan-in size.

    References:
      Liu et al., 2025, "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of
      LLMs", arXiv 2502.17410; code: github.com/lliu606/COSMOS (``COSMOS_optim.py`` at 61de180).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_cosmos(subspace=optax_ext.OnlinePCA(rank=2))
      >>> g = {"w": jnp.arange(12.0).reshape(4, 3) / 10}
      >>> u, s = tx.update(g, tx.init(g))
      >>> s.basis["w"].shape, round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 4)
      ((4, 2), 1.0)
    """
    ns = NewtonSchulz.muon() if ns is None else ns
    r = subspace.rank
    who = "scale_by_cosmos"
    hp = jax.lax.Precision.HIGHEST
    mm = lambda a, b: jnp.matmul(a, b, precision=hp)  # noqa: E731
    tr = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731

    def check(leaves):
        for path, (_, n_in, _) in zip(leaves.paths(), leaves.matrix_shapes()):
            if r > n_in:
                raise leaf_error(path, (n_in,), f"COSMOS rank {r} exceeds the fan-in size {n_in}")

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        check(leaves)
        shapes = leaves.matrix_shapes()
        dts = [x.dtype for x in leaves.leaves(params)]
        nu = [jnp.zeros((b, m_out, r), d) for (b, _, m_out), d in zip(shapes, dts)]
        basis = [jnp.zeros((b, n_in, r), d) for (b, n_in, _), d in zip(shapes, dts)]
        gram = [jnp.zeros((b, r, r), jnp.float32) for b, _, _ in shapes]
        return ScaleByCosmosState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=leaves.stored(nu, params),
            basis=leaves.stored(basis, params),
            gram=leaves.stored(gram, params),
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
        outs, nus, bases, grams = [], [], [], []
        for g, m, v, p_old, s_old in zip(
            leaves.views(updates),
            leaves.views(mu),
            leaves.unstored(state.nu),
            leaves.unstored(state.basis),
            leaves.unstored(state.gram),
        ):
            dtype = g.dtype
            g, m = tr(g.astype(jnp.float32)), tr(m.astype(jnp.float32))  # torch (m, n)
            p_old, v = p_old.astype(jnp.float32), v.astype(jnp.float32)
            gtg = mm(tr(g), g)

            def init_basis(g=g, gtg=gtg):
                u, _, _ = jnp.linalg.svd(gtg, full_matrices=False)
                p = u[..., :r]
                gp = mm(g, p)
                return p, (1 - b2) * mm(tr(gp), gp)

            def track_basis(g=g, gtg=gtg, p_old=p_old, s_old=s_old):
                p_hat = b2 * mm(p_old, s_old) + (1 - b2) * mm(gtg, p_old)
                p, _ = jnp.linalg.qr(p_hat)
                tt = mm(tr(p_old), p)
                gp = mm(g, p)
                return p, b2 * mm(mm(tr(tt), s_old), tt) + (1 - b2) * mm(tr(gp), gp)

            p, s = jax.lax.cond(first, init_basis, track_basis)
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
            outs.append(tr(d).astype(dtype))
            nus.append(v.astype(dtype))
            bases.append(p.astype(dtype))
            grams.append(s)
        return leaves.restore(outs, like=updates), ScaleByCosmosState(
            count=count,
            mu=mu,
            nu=leaves.stored(nus, like=updates),
            basis=leaves.stored(bases, like=updates),
            gram=leaves.stored(grams, like=updates),
        )

    return with_boxes(sharding.gathered(optax.GradientTransformation(init_fn, update_fn)))


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
