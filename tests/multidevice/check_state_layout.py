"""Optimizer state laid out like its parameters on 8-way FSDP, under both kinds of mesh axes.

The parameters are sharded as a user shards them for FSDP (the first axis of each matrix, all
divisible by 8, over an 8-device ``data`` axis; vectors replicated). Per-device state bytes are
compared with the ideal, total state bytes / 8: ``init`` on the placed parameters, and (under
automatic axes) the state that a jitted step returns (without pinned ``out_shardings``: it must
come back in the layout it went in, so pinning it to the shardings ``init`` returned compiles
the same program).
"""

import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from registry import RECIPES

from experiments.memory import per_device_nbytes

BY_NAME = {e.name: e for e in RECIPES}
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
LIMIT = 1.3  # per-device state / (total state / 8)
NAMES = list(BY_NAME)
# One jitted step per kind of state layout (CI time): full-size moments (Muon, NorMuon's
# neuron statistics, ROOT, spike clipping), low-rank projections (SVD and random bases, Fira's
# residual and limiter, APOLLO's norm ratio, Conda's rotated moments), block quantization,
# SOAP's spread Gram factors and eigenbases (refreshed at the third call), COSMOS's basis,
# projected Gram matrix and second moment.
STEPPED = ["muon", "normuon", "root", "galore", "fira", "apollo", "apollo_mini", "conda",
           "spam", "adamw_8bit(min_size=0)", "soap", "cosmos"]
SHAPES = {
    "wte": {"embedding": (256, 32)},
    "blocks": {
        "attn": {"kernel": (64, 256), "bias": (256,)},
        "mlp": {"kernel": (256, 64)},
        "proj": {"kernel": (128, 128)},
        "ln": {"scale": (64,)},
    },
    "lm_head": {"kernel": (32, 256)},
}


def fsdp_params(mesh):
    """The parameter tree, each matrix's first axis sharded over ``data``."""
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))

    def make(shape):
        x = 0.1 * jax.random.normal(next(keys), shape)
        return jax.device_put(x, NamedSharding(mesh, P("data") if len(shape) >= 2 else P()))

    return jax.tree.map(make, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def ratio(state) -> float:
    """Per-device state bytes over the ideal (total bytes / device count)."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return per_device_nbytes(state) / (total / jax.device_count())


def _same_layout(a, b):
    return all(x.sharding.is_equivalent_to(y.sharding, x.ndim)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if x.ndim)


def _init(name, kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(KINDS[kind],))
    entry = BY_NAME[name]
    tx = optax.with_extra_args_support(entry.factory(**entry.kwargs))
    with jax.set_mesh(mesh):
        params = fsdp_params(mesh)
        return mesh, entry, tx, params, tx.init(params)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_init_lays_state_out_like_its_parameters(name, kind):
    *_, state = _init(name, kind)
    assert ratio(state) <= LIMIT, (name, kind, ratio(state))


# Under automatic axes only: under explicit axes the layouts are part of the types, and
# check_recipes.py asserts for every recipe that a jitted run returns each state leaf in the
# layout init gave it.
@pytest.mark.parametrize("name", STEPPED)
def test_update_returns_state_in_the_layout_it_received(name):
    mesh, entry, tx, params, state = _init(name, "auto")

    def step(params, state, t):
        g = jax.tree.map(lambda p: p * (1.0 + t), params)
        extra = entry.extra_args(t, params, g) if entry.extra_args else {}
        updates, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

    before = state
    with jax.set_mesh(mesh):
        f = jax.jit(step)
        for t in range(3):  # past a basis refresh (every 3 steps in the registry; SOAP: call 3)
            params, state = f(params, state, jnp.float32(t))
    assert _same_layout(state, before)
    assert ratio(state) <= LIMIT, (name, ratio(state))
    for p in jax.tree.leaves(params):
        assert math.isfinite(float(jnp.sum(p)))


# A jitted init under automatic axes: the parameters are traced and their shardings unknown,
# so state of other shapes (projected moments, bases) is the partitioner's choice (replicated:
# pin it with out_shardings); parameter-shaped state is tied to its parameter
# (optax_ext.recipes._common.tie_to_params). One recipe per kind of state layout.
JIT_INIT = ["muon", "normuon", "root", "lion", "adabelief", "exadam", "sophia", "onebit_adam",
            "lipschitz_muon", "spam", "adamw_8bit(min_size=0)", "cosmos"]
JIT_INIT_PROJECTED = ["galore", "conda"]  # low-rank state replicated: only the moments tied


@pytest.mark.parametrize("name", JIT_INIT + JIT_INIT_PROJECTED)
def test_jitted_init_under_automatic_axes_ties_parameter_shaped_state(name):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    entry = BY_NAME[name]
    tx = optax.with_extra_args_support(entry.factory(**entry.kwargs))
    with jax.set_mesh(mesh):
        params = fsdp_params(mesh)
        state = jax.jit(tx.init)(params)
    by_shape = {p.shape: p for p in jax.tree.leaves(params)}
    tied = [(s, by_shape[s.shape]) for s in jax.tree.leaves(state) if s.shape in by_shape]
    assert tied
    for s, p in tied:
        assert s.sharding.is_equivalent_to(p.sharding, s.ndim), (name, s.shape, s.sharding)
    if name in JIT_INIT:
        assert ratio(state) <= LIMIT, (name, ratio(state))
