"""project_low_rank and column_normalize."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext
from optax_ext.kernels import FAN_IN, RandomProjector, SVDProjector, projected_axis


@dataclasses.dataclass(frozen=True)
class CountingProjector:
    """Returns a basis that encodes the step it was computed at (to observe refreshes)."""

    rank: int = 2
    update_every: int = 3
    side: str = "std"

    def axis(self, m, n):
        return projected_axis(m, n, self.side)

    def rank_for(self, m, n):
        return self.rank

    def bases(self, mats, *, count):
        out = []
        for x in mats:
            b, m, n = x.shape
            d = m if self.axis(m, n) == FAN_IN else n
            e = jnp.eye(d, self.rank, dtype=x.dtype) * (1.0 + count.astype(x.dtype))
            out.append(jnp.broadcast_to(e, (b, d, self.rank)))
        return out


def test_round_trip_stays_in_subspace_and_identity_inner():
    rng = np.random.default_rng(0)
    g = {
        "a": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32),
    }
    tx = optax_ext.project_low_rank(optax.identity(), SVDProjector(rank=3, update_every=5))
    state = tx.init(g)
    u, state = jax.jit(tx.update)(g, state)
    for k in g:
        q = state.basis[k]
        assert q.shape[-1] == 3
        # u = Q Q^T g (fan-in, smaller side) for "a"; fan-out for "stack"
        if k == "a":
            proj = q @ jnp.swapaxes(q, -1, -2) @ g[k]
        else:
            proj = g[k] @ q @ jnp.swapaxes(q, -1, -2)
        np.testing.assert_allclose(u[k], proj, atol=1e-5)
    # low-rank inner state shape
    assert state.inner_state == optax.EmptyState()


def test_refresh_on_schedule_and_inner_state_kept():
    g = {"w": jnp.ones((4, 6))}
    tx = optax_ext.project_low_rank(optax_ext.scale_by_adam(), CountingProjector(update_every=3))
    state = tx.init(g)
    step = jax.jit(tx.update)
    seen = []
    for _ in range(7):
        _, state = step(g, state)
        seen.append(float(state.basis["w"][0, 0]))
    assert seen == [1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 7.0]  # refreshed at 0-based steps 0, 3, 6
    assert int(state.inner_state.count) == 7  # inner moments persist across refreshes
    assert state.inner_state.mu["w"].shape == (2, 6)


def test_user_projector_replays_recorded_bases():
    rng = np.random.default_rng(1)
    recorded = jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.float32)  # one basis per refresh

    @dataclasses.dataclass(frozen=True)
    class Recorded:
        update_every: int = 2

        def axis(self, m, n):
            return FAN_IN

        def rank_for(self, m, n):
            return 2

        def bases(self, mats, *, count):
            return [recorded[count // 2][None] for _ in mats]

    g = {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}
    tx = optax_ext.project_low_rank(optax.identity(), Recorded())
    s = tx.init(g)
    for t in range(5):
        u, s = tx.update(g, s)
        q = recorded[t // 2]
        np.testing.assert_allclose(u["w"], q @ q.T @ g["w"], atol=1e-5)


def test_random_projector_runs_and_errors_name_leaf():
    g = {"w": jnp.ones((8, 16)), "b": jnp.ones(8)}
    tx = optax_ext.project_low_rank(optax.identity(), RandomProjector(rank=4, update_every=2))
    with pytest.raises(ValueError, match=r"\['b'\].*\(8,\)"):
        tx.init(g)
    del g["b"]
    u, s = tx.update(g, tx.init(g))
    assert u["w"].shape == (8, 16) and s.basis["w"].shape == (8, 4)


def test_zero_gradients_finite():
    g = {"w": jnp.zeros((6, 4))}
    for tx in (
        optax_ext.project_low_rank(optax_ext.scale_by_adam(), SVDProjector(rank=2, update_every=1)),
        optax_ext.column_normalize(),
    ):
        u, _ = tx.update(g, tx.init(g))
        assert bool(jnp.all(u["w"] == 0))


def numpy_conda(grads, b1, b2, eps, T):
    """Independent numpy version of Conda's matrix update (conda.md, flax (in, out) layout)."""
    m_ = v_ = p_ = None
    outs = []
    for k, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        m_ = (1 - b1) * g if m_ is None else b1 * m_ + (1 - b1) * g
        fan_in_side = g.shape[0] <= g.shape[1]
        if k % T == 0:
            u, _, vt = np.linalg.svd(m_, full_matrices=False)
            p_ = u if fan_in_side else vt.T
        rot = (lambda x, p=p_: p.T @ x) if fan_in_side else (lambda x, p=p_: x @ p)
        back = (lambda x, p=p_: p @ x) if fan_in_side else (lambda x, p=p_: x @ p.T)
        gr, mr = rot(g), rot(m_)
        v_ = (1 - b2) * gr**2 if v_ is None else b2 * v_ + (1 - b2) * gr**2
        t = k + 1
        outs.append(back(mr / (np.sqrt(v_) + eps)) * np.sqrt(1 - b2**t) / (1 - b1**t))
    return outs


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (6, 6)])
def test_column_normalize_matches_numpy_reference(shape):
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(5)]
    tx = optax_ext.column_normalize(0.9, 0.99, 1e-8, projector=SVDProjector(None, update_every=2))
    s = tx.init({"w": jnp.zeros(shape)})
    step = jax.jit(tx.update)
    for g, want in zip(grads, numpy_conda(grads, 0.9, 0.99, 1e-8, 2)):
        u, s = step({"w": jnp.asarray(g)}, s)
        np.testing.assert_allclose(u["w"], want, atol=1e-5, rtol=1e-4)
