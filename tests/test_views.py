"""True matrix views of the kernels flax builds: DenseGeneral attention, nn.scan stacks, conv.

Each orthogonalized kernel's update, for a well-conditioned gradient, must have (near-)equal
singular values in its true fan-in x fan-out view, for every orthogonalizing recipe of
``tests/registry.py``; every matrix recipe must take its views from the one rule.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import RECIPES

import optax_ext
from optax_ext import MatrixSpec, labels
from optax_ext.kernels import PolarSVD, matricize

D, H, DH, F, V, L = 16, 2, 8, 32, 40, 2


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * DH)(x)
        return x + nn.Dense(D)(nn.gelu(nn.Dense(F)(nn.LayerNorm()(x)))), None


class LM(nn.Module):
    """Embedding, one plain DenseGeneral attention, scanned blocks, an untied head whose name
    is not a head name (flax lm1b's ``logitdense``)."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=H, name="attention")(x)
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan()(x, None)
        return nn.Dense(V, name="logitdense")(nn.LayerNorm()(x))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(12, (3, 3))(x))
        return nn.Dense(10, name="classifier")(x.mean(axis=(1, 2)))


@functools.cache  # initialised once per process, on first use (not at collection)
def lm_params():
    return LM().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


@functools.cache
def conv_params():
    return ConvNet().init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))["params"]


def true_view(path: str, shape: tuple[int, ...]) -> MatrixSpec:
    """The view each kernel should get, written out by hand for these two models."""
    lead = len(shape) - 3  # scanned: one leading layer axis
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
        return MatrixSpec((lead,), (lead + 1, lead + 2))
    if path.endswith("out/kernel"):
        return MatrixSpec((lead, lead + 1), (lead + 2,))
    if "Conv" in path:
        return MatrixSpec((0, 1, 2), (3,))
    return MatrixSpec((len(shape) - 2,), (len(shape) - 1,))


def hidden_leaves(params):
    lab = labels.param_labels(params)
    pairs = jax.tree_util.tree_flatten_with_path(params)[0]
    return [
        (p, x) for (p, x), la in zip(pairs, jax.tree.leaves(lab)) if la == labels.HIDDEN
    ]


def key(path) -> str:
    return "/".join(labels.path_names(path))


def test_labels_of_foreign_models():
    lab = labels.param_labels(lm_params())
    attn = lab["ScanBlock_0"]["MultiHeadDotProductAttention_0"]
    assert attn["query"]["bias"] == "vector"  # (layers, heads, head_dim)
    assert lab["attention"]["query"]["bias"] == "vector"  # (heads, head_dim)
    assert attn["query"]["kernel"] == attn["out"]["kernel"] == "hidden"
    assert lab["logitdense"]["kernel"] == "head" and lab["Embed_0"]["embedding"] == "embed"
    assert lab["ScanBlock_0"]["LayerNorm_0"]["scale"] == "vector"  # (layers, d)
    clab = labels.param_labels(conv_params())
    assert clab["Conv_0"]["kernel"] == "hidden" and clab["classifier"]["kernel"] == "head"


@pytest.mark.parametrize("model", ["lm", "conv"])
def test_default_views_are_the_true_views(model):
    params = lm_params() if model == "lm" else conv_params()
    for path, x in hidden_leaves(params):
        expected = true_view(key(path), x.shape)
        assert labels.matrix_view(path, x) == expected, key(path)


def _well_conditioned(shape, spec, seed):
    """A gradient whose true-view matrices have singular values spread over [1, 2]."""
    from optax_ext.kernels import matrix_shape, unmatricize

    b, m, n = matrix_shape(shape, spec)
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((b, m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((b, n, k)))[0]
    s = np.linspace(1.0, 2.0, k)
    g = jnp.asarray(np.einsum("bik,k,bjk->bij", u, s, v), jnp.float32)
    return unmatricize(g, shape=shape, spec=spec)


def _grads(params):
    hidden = {key(p) for p, _ in hidden_leaves(params)}

    def grad(path, x):
        if key(path) in hidden:
            return _well_conditioned(x.shape, true_view(key(path), x.shape), len(key(path)))
        return jnp.full(x.shape, 0.1, x.dtype)

    return jax.tree_util.tree_map_with_path(grad, params)


def _spread(update, spec):
    """max/min singular value of each matrix of the view, the worst over the batch."""
    s = np.linalg.svd(np.asarray(matricize(update, spec=spec), np.float64), compute_uv=False)
    return float((s.max(axis=-1) / s.min(axis=-1)).max())


# The orthogonalizing recipes (Muon, Polar Express, ROOT, hybrid AuON, Lipschitz Muon) are
# checked the same way on the foreign models, with their default and with explicit views
# (tests/foreign/test_foreign_models.py); here, the primitive chain that assembles one.
ORTHOGONALIZING = ["chain:momentum+orthogonalize+scale_by_shape"]


def _entry(name):
    found = [e for e in RECIPES if e.name == name]
    assert found, f"{name} is not in tests/registry.py"
    return found[0]


@pytest.mark.parametrize("name", ORTHOGONALIZING)
@pytest.mark.parametrize("model", ["lm", "conv"])
def test_orthogonalized_updates_have_equal_singular_values_in_the_true_view(name, model):
    params = lm_params() if model == "lm" else conv_params()
    params = jax.tree.map(jnp.zeros_like, params)  # no decay terms in the update
    entry = _entry(name)
    tx = entry.factory(**entry.kwargs)
    updates, _ = jax.jit(tx.update)(_grads(params), jax.jit(tx.init)(params), params)
    flat = dict((key(p), u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0])
    for path, x in hidden_leaves(params):
        spread = _spread(flat[key(path)], true_view(key(path), x.shape))
        assert spread < 1.8, (name, key(path), spread)  # Newton-Schulz band ~[0.68, 1.13]


def test_the_check_tells_the_old_view_from_the_true_one():
    params = jax.tree.map(jnp.zeros_like, lm_params())
    old = optax_ext.muon(0.02, ns=PolarSVD(), specs=MatrixSpec())
    new = optax_ext.muon(0.02, ns=PolarSVD())
    g = _grads(params)
    path = "attention/query/kernel"
    spec = true_view(path, (D, H, DH))
    u_old = jax.jit(old.update)(g, old.init(params), params)[0]["attention"]["query"]["kernel"]
    u_new = jax.jit(new.update)(g, new.init(params), params)[0]["attention"]["query"]["kernel"]
    assert _spread(u_old, spec) > 2.0 and _spread(u_new, spec) < 1.01
    # Muon's shape factor on the true 16 x 16 view is 1 (the old (2, 8) slices got 2)
    sv = np.linalg.svd(np.asarray(matricize(u_new, spec=spec)), compute_uv=False)
    np.testing.assert_allclose(sv, 0.02, rtol=1e-3)


MATRIX_RECIPES = [
    e for e in RECIPES if e.name.split(":")[0] in {
        "muon", "normuon", "root", "auon", "hybrid_auon", "galore", "fira", "apollo",
        "apollo_mini", "conda", "cosmos", "lipschitz_muon",
    } or e.name.startswith("chain:") and "orthogonalize" in e.name or "column" in e.name
    or "project_low_rank" in e.name
]


@pytest.mark.parametrize("entry", MATRIX_RECIPES, ids=lambda e: e.name)
def test_every_matrix_recipe_takes_its_views_from_the_one_rule(entry, monkeypatch):
    params = lm_params()
    asked = set()
    rule = labels.matrix_view

    def spy(path, leaf, names=None, **kw):
        asked.add(key(path))
        return rule(path, leaf, names, **kw)

    monkeypatch.setattr(labels, "matrix_view", spy)
    tx = entry.factory(**entry.kwargs)
    # views are read while tracing: init and update are traced, not compiled (the recipes'
    # updates on these kernels are run by the checks above and by tests/foreign/)
    state = jax.eval_shape(tx.init, params)
    g = _grads(params)
    extra = entry.extra_args(0, params, g) if entry.extra_args else {}
    for _ in range(entry.noop_calls + 1):
        updates, state = jax.eval_shape(lambda g, s, p: tx.update(g, s, p, **extra), g, state,
                                        params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    stacked = {key(p) for p, x in hidden_leaves(params) if x.ndim >= 3}
    assert stacked <= asked, sorted(stacked - asked)


def test_per_head_option_and_partitioning_names():
    q = jnp.zeros((L, D, H, DH))
    path = ("blocks", "attn", "query", "kernel")
    assert labels.matrix_view(path, q, per_head=True) == MatrixSpec((1,), (3,))
    out = jnp.zeros((H, DH, D))
    assert labels.matrix_view(("attn", "o_proj", "kernel"), out, per_head=True) == MatrixSpec(
        (1,), (2,)
    )
    # flax partitioning names settle the view whatever the path says
    names = ("layers", "embed", "heads", "kv")
    assert labels.matrix_view(("w",), q, names) == MatrixSpec((1,), (2, 3))
    assert labels.matrix_view(("w",), q, names, per_head=True) == MatrixSpec((1,), (3,))
    names = ("layers", "heads", "kv", "embed")
    assert labels.matrix_view(("w",), jnp.zeros((L, H, DH, D)), names) == MatrixSpec(
        (1, 2), (3,)
    )
    assert labels.matrix_view(("w",), jnp.zeros((L, D, F)), ("layers", "embed", "mlp")) == (
        MatrixSpec((1,), (2,))
    )
    # per head through the recipe's specs: each head's (D, DH) block is orthogonal
    g = {"attn": {"query": {"kernel": _well_conditioned((D, H, DH), MatrixSpec((0,), (1, 2)), 3)}}}
    tx = optax_ext.orthogonalize(PolarSVD(), specs=labels.matrix_specs(per_head=True))
    u = tx.update(g, tx.init(g))[0]["attn"]["query"]["kernel"]
    for h in range(H):
        np.testing.assert_allclose(u[:, h, :].T @ u[:, h, :], np.eye(DH), atol=1e-5)


def test_fused_qkv_as_three_matrices():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((D, 3 * D)), jnp.float32)
    specs = labels.matrix_specs(views={r".*qkv/kernel": MatrixSpec(fan_out_splits=3)})
    tx = optax_ext.orthogonalize(PolarSVD(), specs=specs)
    g = {"attn": {"qkv": {"kernel": w}}}
    u = tx.update(g, tx.init(g))[0]["attn"]["qkv"]["kernel"]
    for k in range(3):
        block = u[:, k * D : (k + 1) * D]
        np.testing.assert_allclose(block.T @ block, np.eye(D), atol=1e-5)
    with pytest.raises(ValueError, match="fan_out_splits=3"):
        matricize(jnp.zeros((4, 5)), spec=MatrixSpec(fan_out_splits=3))


def test_ambiguous_nd_leaf_raises_with_the_fix():
    params = {"mixer": {"kernel": jnp.zeros((3, 8, 8))}}
    with pytest.raises(ValueError, match=r"mixer.*\(3, 8, 8\).*ambiguous.*specs=optax_ext"):
        optax_ext.muon().init(params)
    fix = labels.matrix_specs(views={"mixer/kernel": MatrixSpec((1,), (2,))})
    optax_ext.muon(specs=fix).init(params)
    # the same leaf under a stack name is a stack of (8, 8) matrices
    assert labels.matrix_view(("layers", "mlp", "kernel"), params["mixer"]["kernel"]) == (
        MatrixSpec((1,), (2,))
    )


def test_describe_table():
    d = labels.describe(lm_params(), optax_ext.muon)
    rows = {r.path: r for r in d.rows}
    q = rows["ScanBlock_0/MultiHeadDotProductAttention_0/query/kernel"]
    assert q.label == "hidden" and q.view == (L, D, H * DH) and q.shape_factor == 1.0
    assert rows["ScanBlock_0/Dense_1/kernel"].shape_factor == pytest.approx(np.sqrt(2.0))
    assert rows["logitdense/kernel"].label == "head" and rows["logitdense/kernel"].view is None
    text = str(d)
    assert "query/kernel" in text and f"{L} x {D} x {H * DH}" in text
    bad = labels.describe({"mixer": {"kernel": jnp.zeros((3, 8, 8))}})
    assert bad.rows[0].view is None and "ambiguous" in bad.rows[0].note and "!" in str(bad)
