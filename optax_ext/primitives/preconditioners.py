"""Shampoo-eigenbasis preconditioning: Adam in the eigenbasis of per-axis Gram factors (SOAP)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._types import is_masked, leaves_with_path
from optax_ext.kernels.matricize import bucket_apply


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

    return optax.GradientTransformation(init_fn, update_fn)
