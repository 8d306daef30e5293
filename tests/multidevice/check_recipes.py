"""Every recipe under SPMD on 8 fake devices: same parameters as one device, state sharded
like its parameter, and pmap data parallelism with the caller's pmean."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_target, small_params
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from registry import KERNEL_COVERED, RECIPES

from optax_ext.kernels import NewtonSchulz
from optax_ext.kernels.spectral import LIPSCHITZ_ORTHO

STEPS = 5
BY_NAME = {e.name: e for e in RECIPES}
# One tree covers every layout on a (data=4, model=2) mesh: FSDP rows and columns, tensor-parallel
# rows and columns, a sharded stacked leaf, a tensor-parallel vector and a replicated vector.
SPECS = {
    "wte": {"embedding": P("data", None)},
    "blocks": {
        "attn": {"kernel": P("data", "model"), "bias": P("model")},
        "mlp": {"kernel": P("model", "data")},
        "stack": {"kernel": P(None, None, "data")},
        "ln": {"scale": P()},
    },
    "lm_head": {"kernel": P(None, "model")},
}
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def _grads(params, target, t, noise=None):
    """Gradients of the quadratic, perturbed per step so every step differs (and, with a
    ``noise = (scale, pattern)`` of a traced scale, by ``scale * pattern`` relative, entry-wise:
    a fixed pattern, the same every step; ``scale = 0`` gives exactly the unperturbed gradients,
    ``x * 1``, so the reference and the sensitivity runs share one compiled step)."""
    g = jax.tree.map(lambda p, q: (p - q) * (1.0 + 0.1 * t), params, target)
    if noise is not None:
        scale, pattern = noise
        g = jax.tree.map(lambda x, r: x * (1 + scale * r), g, pattern)
    return g


@functools.cache
def noise_pattern():
    """The fixed standard-normal pattern of the sensitivity runs' gradient perturbation (drawn
    once, outside the compiled steps)."""
    leaves, treedef = jax.tree.flatten(small_params())
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


# SOAP and COSMOS run Adam in an eigenbasis: the rank-deficient directions of this small
# problem hold rounding noise, and m / (sqrt(v) + 1e-8) of noise is +-1, so any change of
# reduction order (sharding, pmap, another compilation) flips those updates. A larger eps
# keeps the check about the layout, not about the sign of noise.
# (A 1e-7 relative change of the gradients moves SOAP's parameters by 1e-2 here with eps=1e-8.)
OVERRIDES = {"soap": dict(eps=1e-2), "soap:one_sided_1d": dict(eps=1e-2), "cosmos": dict(eps=1e-2)}
# APOLLO and Fira scale by ratios of projected-gradient norms; with rows of norm ~1e-3 they
# amplify reduction-order differences a few-fold (the pmap run, unsharded, shows the same gap).
ATOL = {"apollo": 1e-4, "apollo:svd": 1e-4, "apollo_mini": 1e-4, "fira": 1e-4, "soap": 1e-4,
        "soap:one_sided_1d": 1e-4}
# COSMOS tracks its rank-2 basis by online PCA of nearly degenerate Gram matrices here: a 1e-7
# relative change of the gradients moves the parameters by 2e-2 within five steps (any rank,
# any eps), so it is compared after its first two steps.
STEPS_FOR = {"cosmos": 2}


def fp32_kwargs(entry):
    """The entry's settings with every Newton-Schulz iteration in float32 (bf16 iterations round
    differently when their reductions are split over devices: the 1e-5 check is an fp32 one)."""
    kwargs = {**entry.kwargs, **OVERRIDES.get(entry.name, {})}
    sig = inspect.signature(entry.factory).parameters
    if "ns" in sig:
        ns = kwargs.get("ns", sig["ns"].default) or LIPSCHITZ_ORTHO
        if isinstance(ns, NewtonSchulz):
            kwargs["ns"] = dataclasses.replace(ns, dtype="float32")
    if "v1_dtype" in sig:
        kwargs["v1_dtype"] = "float32"
    return kwargs


def _run(entry, params, target, noise=None, step=None):
    tx = optax.with_extra_args_support(entry.factory(**fp32_kwargs(entry)))

    @jax.jit
    def _step(params, state, t, noise):
        g = _grads(params, target, t, noise)
        extra = entry.extra_args(t, params, g) if entry.extra_args else {}
        updates, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

    step = _step if step is None else step
    state = state0 = jax.jit(tx.init)(params)
    for t in range(STEPS_FOR.get(entry.name, STEPS)):
        params, state = step(params, state, jnp.float32(t), noise)
    return (params, state, state0), step


@functools.cache
def _one_device(name):
    """The one-device run (no gradient noise) and its compiled step, which takes the noise."""
    params = small_params()
    (got, state, _), step = _run(BY_NAME[name], params, quadratic_target(params),
                                 (jnp.float32(0), noise_pattern()))
    return jax.device_get((got, state)), step


def reference(name):
    return _one_device(name)[0]


# Rounding noise of the gradients' reduction: an fp32 sum of 8 terms in another order differs
# from the one-device gradient by about one ulp (6e-8 relative); the recipe's own response to
# such a change bounds what a correct multi-device run can differ by.
NOISE = 1e-7
SENSITIVITY_MARGIN = 4.0  # several ulps of accumulated difference over the steps
SENSITIVITY_LIMIT = 1e-3  # a recipe more sensitive than this is compared another way (above)


@functools.cache
def sensitivity(name):
    """Largest parameter change after the reference run when the one-device gradients are
    perturbed by ``NOISE`` (relative, entry-wise): the recipe's own sensitivity to rounding."""
    params = small_params()
    (got, _, _), _ = _run(BY_NAME[name], params, quadratic_target(params),
                          (jnp.float32(NOISE), noise_pattern()), step=_one_device(name)[1])
    want, _ = reference(name)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _state_leaves_like_params(state, params):
    """State leaves with the shape of a parameter (every parameter shape here is unique)."""
    by_shape = {p.shape: p for p in jax.tree.leaves(params)}
    return [(s, by_shape[s.shape]) for s in jax.tree.leaves(state)
            if s.ndim and s.shape in by_shape]


# Every entry (but registry.KERNEL_COVERED) under explicit axes (where layouts are part of
# the types, so every kernel must keep them consistent). Under automatic axes the partitioner
# places the computation and the numerics are what can differ: one recipe per kind of kernel
# (Newton-Schulz, SVD and random projections, eigenbases, online PCA, block quantization,
# radial projection, Hessian statistic, spike clipping, spectral constraints, 1-bit error
# feedback), to keep CI time.
AUTO = ["muon", "root", "auon", "conda", "galore", "apollo_mini", "soap", "cosmos", "spam",
        "adamp", "sophia", "adamw_8bit(min_size=0)", "onebit_adam", "lipschitz_muon"]
CASES = ([(n, "explicit") for n in BY_NAME if n not in KERNEL_COVERED]
         + [(n, "auto") for n in AUTO])


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_sharded_run_matches_one_device(name, kind):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(KINDS[kind],) * 2)
    shard = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    params = jax.tree.map(shard, small_params(), SPECS)
    target = jax.tree.map(shard, quadratic_target(small_params()), SPECS)
    with (jax.set_mesh if hasattr(jax, "set_mesh") else jax.sharding.use_mesh)(mesh):
        (got, state, state0), _ = _run(BY_NAME[name], params, target)
    want, want_state = reference(name)
    atol = 1e-5
    if name in ATOL:  # the recipes above known to amplify rounding: their measured sensitivity
        assert sensitivity(name) < SENSITIVITY_LIMIT, (name, sensitivity(name))
        atol = max(ATOL[name], SENSITIVITY_MARGIN * sensitivity(name))
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got),
                          jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path[0]))
    for path, a in jax.tree_util.tree_leaves_with_path(got):  # parameters keep their layout
        spec = SPECS
        for k in path:
            spec = spec[k.key]
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), path
    if kind == "explicit":  # no silent replication: moments are laid out like their parameter
        # (under automatic axes the partitioner picks state layouts; pin them with out_shardings,
        # as experiments/train.py does)
        for s, p in _state_leaves_like_params(state, got):
            assert s.sharding.is_equivalent_to(p.sharding, s.ndim), (s.shape, s.sharding, p)
        # and every state leaf comes back from the steps in the layout init gave it (so the
        # per-device state that check_state_layout.py measures after init holds while training)
        for (path, s), s0 in zip(jax.tree_util.tree_leaves_with_path(state),
                                 jax.tree.leaves(state0)):
            assert s.sharding.is_equivalent_to(s0.sharding, s.ndim), (
                jax.tree_util.keystr(path), s.sharding, s0.sharding)
    del want_state


# One recipe per family (the recipes are unchanged under pmap: what matters is that each kind of
# state and kernel runs per replica and stays identical across replicas).
PMAP = ["muon", "conda", "apollo_mini", "soap", "spam", "sophia", "adamw_8bit(min_size=0)",
        "onebit_adam"]


@pytest.mark.parametrize("name", PMAP)
def test_pmap_data_parallel_with_pmean_matches_one_device(name):
    entry = BY_NAME[name]
    tx = optax.with_extra_args_support(entry.factory(**fp32_kwargs(entry)))
    params, target = small_params(), quadratic_target(small_params())
    n = jax.device_count()
    # Per-device gradients whose mean is the single-device gradient.
    offsets = [jax.tree.map(lambda x, i=i: (i - (n - 1) / 2) * 0.01 * jnp.ones_like(x), params)
               for i in range(n)]
    offsets = jax.tree.map(lambda *xs: jnp.stack(xs), *offsets)

    def step(params, state, offset, t):
        g = jax.tree.map(jnp.add, _grads(params, target, t), offset)
        g = jax.lax.pmean(g, "data")
        extra = entry.extra_args(t, params, g) if entry.extra_args else {}
        updates, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

    pstep = jax.pmap(step, axis_name="data", in_axes=(0, 0, 0, None))
    rep = jax.tree.map(lambda x: jnp.stack([x] * n), params)
    state = jax.pmap(tx.init)(rep)
    for t in range(STEPS_FOR.get(name, STEPS)):
        rep, state = pstep(rep, state, offsets, jnp.float32(t))
    want, _ = reference(name)
    # The replicas' gradients are an 8-way pmean, summed in another order than the one-device
    # gradient (and not always in the same order from run to run): the tolerance is the
    # recipe's measured response to a gradient change of that size, at least the fp32 1e-5.
    # (Conda measures 1.5e-5 here: its SVD basis of the momentum turns with the rounding.)
    sens = sensitivity(name)
    assert sens < SENSITIVITY_LIMIT, (name, sens)
    atol = max(ATOL.get(name, 1e-5), SENSITIVITY_MARGIN * sens)
    for a, b in zip(jax.tree.leaves(rep), jax.tree.leaves(want)):
        np.testing.assert_allclose(a[0], b, atol=atol, rtol=1e-5)
        np.testing.assert_array_equal(a[0], a[-1])  # replicas stay identical
