"""NorMuon, ROOT and AuON against the authors' code (goldens) and independent numpy checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_golden, matrix_layout, replay, run_sequences

import optax_ext
from optax_ext.kernels import NewtonSchulz, newton_schulz

NS32 = NewtonSchulz.muon(dtype="float32")


def bf16_tol(arrays, bf16_run, fp32_run, factor=4.0):
    """4x the reference's own bf16-vs-fp32 gap (see tests/recipes/test_muon.py)."""
    keys = [k.split("/")[-1] for k in arrays.files if k.startswith(f"{fp32_run}/params/")]
    return factor * max(
        float(np.abs(arrays[f"{bf16_run}/params/{k}"] - arrays[f"{fp32_run}/params/{k}"]).max())
        for k in keys
    )


NORMUON = load_golden("normuon")[0]


@pytest.mark.parametrize(
    "run,ns,atol",
    [
        ("head_fp32_wd0", NS32, 1e-5),
        ("c5320abe_fp32_wd0", NS32, 1e-5),
        (
            "c5320abe_bf16_wd0",
            NewtonSchulz.muon(),
            bf16_tol(NORMUON, "c5320abe_bf16_wd0", "c5320abe_fp32_wd0"),
        ),
    ],
)
def test_golden_normuon(run, ns, atol):
    init, grads, expected = run_sequences(NORMUON, run, layout=matrix_layout)
    replay(
        optax_ext.normuon(0.02, ns=ns, adam_learning_rate=1e-3), init, grads, expected, atol=atol
    )


def numpy_neuron_norm(o, s, b2, eps, axis, eps_inside, rescale):
    m, n = o.shape
    red = 0 if axis == "fan_out" else (1 if axis == "fan_in" else (0 if n >= m else 1))
    nu = np.linalg.norm(o)
    s = b2 * s + (1 - b2) * np.mean(o**2, axis=red, keepdims=True)
    x = o / np.sqrt(np.maximum(s, eps)) if eps_inside else o / (np.sqrt(s) + eps)
    if rescale == "preserve_norm":
        x = x * nu / (np.linalg.norm(x) + eps)
    elif rescale == "match_rms":
        x = x * 0.2 * np.sqrt(m * n) / (np.linalg.norm(x) + eps)
    return x, s


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize(
    "axis,eps_inside,rescale,b2",
    [
        ("fan_out", False, "preserve_norm", 0.95),
        ("longer", True, "preserve_norm", 0.9),  # modded-nanogpt
        ("fan_out", False, "match_rms", 0.95),  # paper
    ],
)
def test_neuron_norm_variants_against_numpy(shape, axis, eps_inside, rescale, b2):
    rng = np.random.default_rng(0)
    tx = optax_ext.scale_by_neuron_norm(
        b2, 1e-10, axis=axis, eps_inside=eps_inside, rescale=rescale
    )
    state = tx.init({"w": jnp.zeros(shape)})
    s = 0.0
    for _ in range(3):
        o = rng.standard_normal(shape)
        u, state = tx.update({"w": jnp.asarray(o, jnp.float32)}, state)
        want, s = numpy_neuron_norm(o, s, b2, 1e-10, axis, eps_inside, rescale)
        np.testing.assert_allclose(u["w"], want, rtol=2e-5, atol=1e-6)


def test_normuon_state_is_one_value_per_output_neuron():
    params = {"w": jnp.ones((16, 4)), "stack": jnp.ones((3, 8, 16))}
    state = optax_ext.scale_by_neuron_norm().init(params)
    assert state.nu["w"].shape == (1, 4) and state.nu["stack"].shape == (3, 1, 16)


ROOT, ROOT_META = load_golden("root")


@pytest.mark.parametrize("run,lr", [("lr1e-3_wd0", 1e-3), ("lr2e-2_wd0", 2e-2)])
def test_golden_root(run, lr):
    init, grads, expected = run_sequences(ROOT, run, layout=matrix_layout)
    replay(optax_ext.root(lr, 0.0), init, grads, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(2048, 2048), (3072, 2048)])
def test_root_coefficient_table_probes(shape):
    """The released per-shape triples, on the reference's probe inputs (the tall 3072x2048
    input checks the orientation-free key). The 2048x8192 and 16384x2048 probes take too long
    on two CPU cores for the suite."""
    x = np.random.RandomState(7).randn(*shape).astype(np.float32)
    # flax layout: the transpose of the PyTorch matrix; NS is transpose-equivariant.
    y = np.asarray(NewtonSchulz.root().apply(jnp.asarray(x.T))).T
    key = f"probe/{shape[0]}x{shape[1]}"
    np.testing.assert_allclose(y[:16, :16], ROOT[f"{key}/top_left_16x16"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), ROOT[f"{key}/row_norms"], rtol=1e-4)
    # fp32 sums over 4M entries in another order: relative, not absolute, agreement.
    np.testing.assert_allclose(np.linalg.norm(y), ROOT[f"{key}/fro_norm"], rtol=2e-4)


def test_root_weight_decay_and_clip_quantile_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    g = rng.standard_normal((8, 16)).astype(np.float32)
    tx = optax_ext.root(0.01, 0.1)
    u, _ = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.asarray(w)}), {"w": jnp.asarray(w)})
    nest = g + 0.95 * g
    eps = np.quantile(np.abs(nest), 0.9) + 1e-9
    x = np.asarray(newton_schulz(jnp.asarray(np.clip(nest, -eps, eps)), dtype="float32"))
    want = w * (1 - 0.01 * 0.1) - 0.01 * 0.2 * np.sqrt(16) * x
    np.testing.assert_allclose(w + np.asarray(u["w"]), want, atol=1e-6)


AUON = load_golden("auon")[0]


@pytest.mark.parametrize("run,variant", [("auon_wd0", "head"), ("hybrid_wd0", "hybrid")])
def test_golden_auon_head_and_hybrid(run, variant):
    init, grads, expected = run_sequences(AUON, run, layout=matrix_layout)
    tx = optax_ext.auon(0.02, variant=variant, adam_learning_rate=1e-3, adam_weight_decay=0.0)
    replay(tx, init, grads, expected, atol=1e-5)


@pytest.mark.parametrize(
    "run,dtype,atol",
    [
        ("v1_fp32", "float32", 1e-5),
        ("v1_bf16", "bfloat16", bf16_tol(AUON, "v1_bf16", "v1_fp32")),
    ],
)
def test_golden_auon_v1(run, dtype, atol):
    init, grads, expected = run_sequences(AUON, run, layout=matrix_layout)
    replay(optax_ext.auon(0.02, variant="v1", v1_dtype=dtype), init, grads, expected, atol=atol)


def test_auon_weight_decay_and_zero_momentum():
    w = jnp.ones((4, 8))
    tx = optax_ext.auon(0.1, weight_decay=0.5)
    u, _ = tx.update({"w": jnp.zeros((4, 8))}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(w + u["w"], w * (1 - 0.05), rtol=1e-6)  # skip step, still decay
    with pytest.raises(ValueError, match="variant"):
        optax_ext.auon(variant="v2")
