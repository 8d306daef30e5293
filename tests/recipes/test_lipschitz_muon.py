"""lipschitz_muon and lipschitz_bound: the golden decay-step-project, multi-step and embedding
checks against a transcription of the reference, and the bound on param trees.

Layouts: the reference's Linear weights are ``(fan_out, fan_in)``; our flax kernels
``(fan_in, fan_out)`` are their transposes. Its ``Embed`` table is ``(d_embed, vocab)``; a flax
``Embed`` table ``(vocab, d_embed)`` is its transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_golden

import optax_ext
from optax_ext.kernels import spectral
from optax_ext.primitives.constraints import SPECTRAL_METHODS, W_MAX_SENSITIVE

ARRAYS, META = load_golden("lipschitz")
STEP = META["decay_step_project"]
GOLDEN_METHODS = list(STEP["results"])


def one_step(method, w_ref, g_ref, key):
    tx = optax_ext.lipschitz_muon(
        STEP["lr"],
        0.9,
        STEP["wd"],
        method=method,
        w_max=STEP["w_max"],
        target_norm=STEP["target_norm"],
        spectral_wd=STEP["spectral_wd"],
    )
    params = {"w": jnp.asarray(w_ref).T}
    u, _ = tx.update({"w": jnp.asarray(g_ref).T}, tx.init(params), params, key=key)
    return optax.apply_updates(params, u)["w"].T


@pytest.mark.parametrize("method", GOLDEN_METHODS)
def test_golden_decay_step_project(method):
    """One step from the constrained W0 (lr 0.05, wd 0.1, w_max 1): momentum's (1 - beta)
    factor is removed by the orthogonalization, so the first step equals the golden's."""
    assert method in SPECTRAL_METHODS
    assert (method in W_MAX_SENSITIVE) == (method in STEP["sensitive_to_wmax"])
    new = jax.jit(lambda w, g: one_step(method, w, g, jax.random.PRNGKey(0)))(
        ARRAYS["step/W0"], ARRAYS["step/grad"]
    )
    np.testing.assert_allclose(new, ARRAYS[f"step/{method}/projected"], atol=1e-5, rtol=0)
    svals = np.linalg.svd(np.asarray(new, np.float64), compute_uv=False)
    np.testing.assert_allclose(svals, ARRAYS[f"step/{method}/svals"], atol=1e-5)


def reference_steps(method, w, grads, lr, wd, w_max, beta, keys):
    """Transcription of the reference loop for one Linear (fan_out, fan_in): optimizers.Muon,
    Linear.dualize, Atom.decay_step_project and Linear.project."""
    fan_out, fan_in = w.shape
    buf = jnp.zeros_like(w)
    for g, key in zip(grads, keys):
        buf = beta * buf + (1 - beta) * g
        d = spectral.lipschitz_orthogonalize(buf) * np.sqrt(fan_out / fan_in)
        eta = lr * 1.0
        w = w * (1 - wd * eta) - lr * d
        scale = np.sqrt(fan_out / fan_in)
        alpha = spectral.soft_cap_coupling(w_max, wd * eta, eta / scale)
        s = scale * w_max if method in ("hard_cap", "orthogonal", "spec_normalize") else scale
        x = w / s
        if method == "soft_cap":
            p = spectral.spectral_soft_cap(x, alpha)
        elif method == "hard_cap":
            p = spectral.spectral_hard_cap(x)
        else:
            p = spectral.spectral_hammer(x, key, w_max=w_max)
        w = s * p
    return w


@pytest.mark.parametrize("method", ["soft_cap", "hard_cap", "spec_hammer"])
def test_several_steps_follow_the_reference_loop(method):
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(ARRAYS["step/W0"])
    grads = [jnp.asarray(rng.standard_normal(w0.shape), jnp.float32) for _ in range(3)]
    keys = [jax.random.PRNGKey(t) for t in range(3)]
    want = reference_steps(method, w0, grads, 0.05, 0.1, 1.0, 0.9, keys)
    tx = optax_ext.lipschitz_muon(0.05, 0.9, 0.1, method=method, w_max=1.0)
    params, state = {"w": w0.T}, tx.init({"w": w0.T})
    for g, key in zip(grads, keys):
        u, state = tx.update({"w": g.T}, state, params, key=key)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params["w"].T, want, atol=1e-5)


def test_embeddings_and_token_heads_follow_embed_dualize_and_project():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)  # flax (vocab, d)
    head = jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)  # flax (d, vocab)
    params = {"wte": {"embedding": table}, "lm_head": {"kernel": head}}
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    lr, wd, beta = 0.1, 0.2, 0.9
    tx = optax_ext.lipschitz_muon(lr, beta, wd, head="tokens", max_inflation=16.0)
    new = optax.apply_updates(params, tx.update(g, tx.init(params), params)[0])

    def reference(w_ref, g_ref):  # Embed: weights (d, vocab), tokens are columns (axis -2)
        d = spectral.rms_cap((1 - beta) * g_ref, axis=-2, max_inflation=16.0)
        w = w_ref * (1 - wd * lr) - lr * d
        return spectral.rms_cap(w, axis=-2, max_inflation=1.0)

    np.testing.assert_allclose(
        new["wte"]["embedding"], reference(table.T, g["wte"]["embedding"].T).T, atol=1e-6
    )
    np.testing.assert_allclose(
        new["lm_head"]["kernel"], reference(head, g["lm_head"]["kernel"]), atol=1e-6
    )
    rms = np.sqrt(np.mean(np.asarray(new["wte"]["embedding"]) ** 2, axis=-1))
    assert rms.max() <= 1 + 1e-6


def test_head_as_matrix_is_constrained_and_vectors_take_adamw():
    rng = np.random.default_rng(2)
    params = {
        "wte": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
        "blocks": {"0": {"mlp": {"fc": {"kernel": jnp.zeros((8, 32))}}}},
        "ln": {"scale": jnp.ones(8)},
        "lm_head": {"kernel": jnp.asarray(3 * rng.standard_normal((8, 16)), jnp.float32)},
    }
    g = jax.tree.map(jnp.ones_like, params)
    tx = optax_ext.lipschitz_muon(0.1, w_max=1.0, method="pure_svd")
    new = optax.apply_updates(params, tx.update(g, tx.init(params), params)[0])
    head = np.asarray(new["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(np.sqrt(8 / 16) * np.linalg.norm(head, 2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(new["ln"]["scale"], 1 - 3e-4, rtol=1e-6)  # Adam's first step
    # labels can be given as a tree; "head" still follows the head treatment
    lab = optax_ext.labels.param_labels(params)
    tx2 = optax_ext.lipschitz_muon(0.1, w_max=1.0, method="pure_svd", param_labels=lab)
    new2 = optax.apply_updates(params, tx2.update(g, tx2.init(params), params)[0])
    jax.tree.map(np.testing.assert_array_equal, new, new2)
    with pytest.raises(ValueError, match="head must be one of"):
        optax_ext.lipschitz_muon(head="unembed")


# ----------------------------------------------------------------------------------------------
# The bound.


def reference_bound(output):
    """The reference's utils.calculate_lipschitz_constant on its logged ``output`` dict."""
    res, par = output["results"], output["parameters"]
    n = par["num_blocks"]
    alpha = 1 / (2 * n)
    norm = lambda name: res[name]["weight_norm"][-1]  # noqa: E731
    acts = [1.0]
    for i in range(n):
        acts.append((1 - alpha) * acts[-1] + alpha * (norm(f"w{i}") * norm(f"v{i}") / 3) * acts[-1])
        mlp = norm(f"mlp_out{i}") * norm(f"mlp_in{i}") / 1.1289
        acts.append((1 - alpha) * acts[-1] + alpha * mlp * acts[-1])
    total = norm("embed")
    for i in range(n):
        att = (
            (norm(f"w{i}") / 3)
            * (norm(f"v{i}") + 2 * norm(f"v{i}") * acts[2 * i] ** 2 * norm(f"q{i}") * norm(f"k{i}"))
            * par["softmax_scale"]
        )
        total = (1 - alpha) * total + alpha * total * att
        mlp = norm(f"mlp_out{i}") * norm(f"mlp_in{i}") / 1.1289
        total = (1 - alpha) * total + alpha * total * mlp
    return total * norm("out")


@pytest.mark.parametrize(("blocks", "scale"), [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_bound_matches_the_reference_formula(blocks, scale):
    rng = np.random.default_rng(blocks)
    names = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    norms = {
        "embed": 1.0,
        "unembed": float(rng.uniform(0.5, 3)),
        "blocks": [{n: float(rng.uniform(0.5, 4)) for n in names} for _ in range(blocks)],
    }
    logged = {"embed": norms["embed"], "out": norms["unembed"]}
    for i, b in enumerate(norms["blocks"]):
        logged |= {f"q{i}": b["q"], f"k{i}": b["k"], f"v{i}": b["v"], f"w{i}": b["o"]}
        logged |= {f"mlp_in{i}": b["mlp_in"], f"mlp_out{i}": b["mlp_out"]}
    output = {
        "parameters": {"num_blocks": blocks, "softmax_scale": scale},
        "results": {k: {"weight_norm": [v]} for k, v in logged.items()},
    }
    got = optax_ext.lipschitz_bound(norms=norms, softmax_scale=scale)
    np.testing.assert_allclose(got, reference_bound(output), rtol=1e-5)


def scaled_orthogonal(fan_in, fan_out, rms_norm, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((max(fan_in, fan_out),) * 2))
    w = q[:fan_in, :fan_out] * rms_norm * np.sqrt(fan_out / fan_in)
    return jnp.asarray(w, jnp.float32)  # RMS->RMS norm exactly rms_norm


def gpt_params(norms, d=8, vocab=16, stacked=False):
    blocks = {}
    for i, b in enumerate(norms["blocks"]):
        attn = {
            f"{n}_proj": {"kernel": scaled_orthogonal(d, d, b[n], 10 * i + j)}
            for j, n in enumerate("qkvo")
        }
        mlp = {
            "fc": {"kernel": scaled_orthogonal(d, 4 * d, b["mlp_in"], 10 * i + 5)},
            "proj": {"kernel": scaled_orthogonal(4 * d, d, b["mlp_out"], 10 * i + 6)},
        }
        blocks[str(i)] = {"attn": attn, "mlp": mlp, "ln": {"scale": jnp.ones(d)}}
    if stacked:
        blocks = jax.tree.map(lambda *x: jnp.stack(x), *blocks.values())
    table = np.ones((vocab, d), np.float32) * 0.5
    table[3] = norms["embed"]  # largest token RMS
    return {
        "wte": {"embedding": jnp.asarray(table)},
        "blocks": blocks,
        "lm_head": {"kernel": scaled_orthogonal(d, vocab, norms["unembed"], 99)},
    }


@pytest.mark.parametrize("stacked", [False, True])
def test_bound_reads_norms_from_a_flax_gpt_tree(stacked):
    names = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    rng = np.random.default_rng(3)
    norms = {
        "embed": 1.0,
        "unembed": 2.0,
        "blocks": [{n: float(rng.uniform(0.5, 2)) for n in names} for _ in range(2)],
    }
    params = gpt_params(norms, stacked=stacked)
    read = optax_ext.layer_norms(params)
    np.testing.assert_allclose(read["embed"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(read["unembed"], 2.0, rtol=1e-5)
    for got, want in zip(read["blocks"], norms["blocks"]):
        for n in names:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5)
    np.testing.assert_allclose(
        optax_ext.lipschitz_bound(params), optax_ext.lipschitz_bound(norms=norms), rtol=1e-5
    )


def test_bound_edge_cases():
    norms = {"embed": 1.5, "unembed": 2.0, "blocks": []}
    np.testing.assert_allclose(optax_ext.lipschitz_bound(norms=norms), 3.0)
    one = {n: 1.0 for n in ("q", "k", "v", "o", "mlp_in", "mlp_out")}
    params = gpt_params({"embed": 1.0, "unembed": 1.0, "blocks": [one]})
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    np.testing.assert_allclose(optax_ext.layer_norms(tied)["unembed"], 1.0, rtol=1e-6)
    gated = dict(params)
    gated["blocks"] = {
        "0": {**params["blocks"]["0"], "mlp": {"gate": {"kernel": jnp.ones((8, 8))}}}
    }
    with pytest.raises(ValueError, match="blocks/0/mlp/gate/kernel: gated MLPs"):
        optax_ext.layer_norms(gated)
    missing = dict(params)
    missing["blocks"] = {"0": {"attn": params["blocks"]["0"]["attn"]}}
    with pytest.raises(ValueError, match=r"block 0: missing \['mlp_in', 'mlp_out'\]"):
        optax_ext.layer_norms(missing)
    # a larger weight never lowers the bound
    bigger = {**one, "v": 2.0}
    lo = optax_ext.lipschitz_bound(norms={"embed": 1.0, "unembed": 1.0, "blocks": [one]})
    hi = optax_ext.lipschitz_bound(norms={"embed": 1.0, "unembed": 1.0, "blocks": [bigger]})
    assert float(hi) > float(lo)
