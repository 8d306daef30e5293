"""Multi-device checks; run by tests/test_distributed.py in a process with 8 fake CPU devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ext
from optax_ext.kernels import NewtonSchulz

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def collectives(compiled_text: str) -> dict[str, int]:
    """Number of each collective op in an optimized HLO module."""
    return {k: len(re.findall(rf"\b{k}(?:-start)?\(", compiled_text)) for k in COLLECTIVES}


def mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(KINDS[kind],) * len(shape))


def test_eight_devices():
    assert jax.device_count() == 8


def ortho(steps=5):
    return optax.partition(
        {
            "hidden": optax_ext.orthogonalize(NewtonSchulz(steps=steps, dtype="float32")),
            "other": optax.identity(),
        },
        optax_ext.labels.hidden_matrices,
    )


PARAMS = {
    "a": (64, 64),
    "b": (64, 64),
    "stack": (3, 64, 32),  # stacked layers: the leading axis is a batch of matrices
    "v": (64,),
}
LAYOUTS = {
    "fsdp": ((8,), ("data",), {"a": P("data"), "b": P(None, "data"), "stack": P(None, "data")}),
    "fsdp+tp": (
        (4, 2),
        ("data", "model"),
        {"a": P("data", "model"), "b": P("model", "data"), "stack": P(None, "data", "model")},
    ),
}


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_orthogonalize_sharded_equals_single_device(kind, layout):
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in PARAMS.items()}
    tx = ortho()
    f = lambda g: tx.update(g, tx.init(g))[0]  # noqa: E731
    ref = jax.jit(f)(params)
    shape, names, specs = LAYOUTS[layout]
    m = mesh(shape, names, kind)
    sharded = {k: jax.device_put(v, NamedSharding(m, specs.get(k, P()))) for k, v in params.items()}
    out = jax.jit(f)(sharded)
    for k in params:
        np.testing.assert_allclose(out[k], ref[k], atol=1e-5)
        if kind == "explicit":  # updates keep their parameter's layout
            assert out[k].sharding.is_equivalent_to(sharded[k].sharding, out[k].ndim)


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_one_fsdp_matrix_costs_one_exchange_each_way_for_any_step_count(kind):
    m = mesh((8,), ("data",), kind)
    g = {"w": jax.device_put(jnp.ones((64, 64)), NamedSharding(m, P("data", None)))}
    counts = []
    for steps in (3, 10):
        tx = ortho(steps)
        text = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(g).compile().as_text()  # noqa: B023
        counts.append(collectives(text))
    assert counts[0] == counts[1]  # independent of the number of Newton-Schulz steps
    assert sum(counts[0].values()) <= 2, counts[0]


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_bucket_of_stacked_matrices_one_exchange_each_way(kind):
    m = mesh((8,), ("data",), kind)
    sh = NamedSharding(m, P("data", None))
    g = {f"w{i}": jax.device_put(jnp.ones((64, 64)) * (i + 1), sh) for i in range(6)}
    tx = ortho()
    text = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(g).compile().as_text()
    counts = collectives(text)
    assert sum(counts.values()) <= 2, counts


def _recipe_collectives(tx, kind):
    """Collectives of ``tx.update`` on six row-sharded 64x64 hidden matrices (one bucket)."""
    from experiments.collectives import count  # noqa: PLC0415

    return count(tx, KINDS[kind])


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("recipe", ["muon", "normuon"])
def test_recipe_collectives_do_not_grow_with_newton_schulz_steps(recipe, kind):
    import dataclasses  # noqa: PLC0415

    counts = []
    for steps in (3, 8):
        ns = dataclasses.replace(NewtonSchulz.muon(dtype="float32"), steps=steps)
        counts.append(_recipe_collectives(getattr(optax_ext, recipe)(0.02, ns=ns), kind))
    assert counts[0] == counts[1], counts
    if recipe == "muon":  # six FSDP matrices, one bucket: one exchange each way, nothing else
        assert sum(counts[0].values()) <= 2, counts[0]


# Every matrix recipe of experiments/collectives.py (SOAP and COSMOS included: their factors,
# bases and moments are updated in the owner layout, with their refresh conditionals inside it).
BOUNDED = ["muon", "normuon", "root", "auon", "hybrid_auon", "lipschitz_muon", "conda", "galore",
           "apollo_mini", "soap", "cosmos"]


@pytest.mark.parametrize("recipe", BOUNDED)
def test_automatic_axes_need_no_more_collectives_than_explicit_ones(recipe):
    from experiments.collectives import RECIPES  # noqa: PLC0415

    explicit, auto = (_recipe_collectives(RECIPES[recipe](), kind) for kind in KINDS)
    assert sum(auto.values()) <= sum(explicit.values()), (explicit, auto)
    if recipe in AT_MOST:
        assert sum(explicit.values()) <= AT_MOST[recipe], explicit


def test_replicated_state_of_a_bucket_needs_no_more_collectives_under_automatic_axes():
    """COSMOS at rank 4: its (4, 4) Gram matrices are replicated (8 devices do not divide 4),
    so the bucket stacks replicated items; under automatic axes they come back without
    being split per item again (before: 5 more collective-permutes than explicit axes)."""
    tx = lambda: optax_ext.cosmos(0.01, subspace=optax_ext.OnlinePCA(rank=4))  # noqa: E731
    explicit, auto = (_recipe_collectives(tx(), kind) for kind in KINDS)
    assert sum(auto.values()) <= sum(explicit.values()), (explicit, auto)


# Owner-computes SOAP and COSMOS on one bucket: one all-to-all each way per stacked array
# (SOAP: gradient, two moments, two Gram factors, two bases; COSMOS: gradient, momentum,
# second moment, basis, projected Gram in, four of them out) and one all-gather of the
# per-matrix exponents back; no per-matrix collective.
AT_MOST = {"soap": 15, "cosmos": 10}
