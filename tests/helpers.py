"""Shared test utilities: tolerances, small parameter trees, golden trajectories and replay."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

GOLDENS = pathlib.Path(__file__).parent / "goldens"

# One per-dtype tolerance table for kernel property tests.
TOL = {
    jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}


def tol(dtype: Any) -> dict[str, float]:
    """Tolerances for comparisons in ``dtype``."""
    return TOL[jnp.dtype(dtype)]


def small_params(dtype: Any = jnp.float32, seed: int = 0) -> dict[str, Any]:
    """A tiny transformer-shaped parameter tree: hidden matrices (one stacked), embedding, head,
    vectors. Labels: ``blocks/*/kernel`` and ``stack`` hidden, ``wte`` embed, ``lm_head`` head."""
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = lambda key, shape: (0.1 * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
    return {
        "wte": {"embedding": n(k[0], (24, 8))},
        "blocks": {
            "attn": {"kernel": n(k[1], (8, 16)), "bias": n(k[2], (16,))},
            "mlp": {"kernel": n(k[3], (16, 8))},
            "stack": {"kernel": n(k[4], (2, 8, 8))},
            "ln": {"scale": jnp.ones((8,), dtype)},
        },
        "lm_head": {"kernel": n(k[5], (8, 24))},
    }


def quadratic_target(params: Any, seed: int = 1) -> Any:
    """A fixed target for the quadratic loss ``0.5 ||p - target||^2`` used by descent tests."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [(0.1 * jax.random.normal(kk, x.shape)).astype(x.dtype) for kk, x in zip(keys, leaves)]
    )


def quadratic_loss(params: Any, target: Any) -> jax.Array:
    """``0.5 * sum ||p - target||^2`` in float32."""
    sq = jax.tree.map(
        lambda p, t: jnp.sum(jnp.square(p.astype(jnp.float32) - t.astype(jnp.float32))),
        params,
        target,
    )
    return 0.5 * sum(jax.tree.leaves(sq))


# ----------------------------------------------------------------------------------------------
# Goldens: trajectories of the authors' reference implementations (see tests/goldens/README.md).


def load_golden(name: str) -> tuple[Mapping[str, np.ndarray], dict[str, Any]]:
    """``(npz arrays, json metadata)`` of ``tests/goldens/<name>``."""
    arrays = np.load(GOLDENS / f"{name}.npz")
    meta = json.loads((GOLDENS / f"{name}.json").read_text())
    return arrays, meta


def golden_runs(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the runs stored in a golden (those with ``<run>/params/...``)."""
    return sorted({k.split("/")[0] for k in arrays.files if "/params/" in k})


def golden_keys(arrays: Mapping[str, np.ndarray], run: str) -> list[str]:
    """Parameter keys of a run, in the golden's order of first appearance."""
    return sorted(k.split("/")[-1] for k in arrays.files if k.startswith(f"{run}/params/"))


def torch_to_flax(x: np.ndarray, *, matrix_ndim: int = 2) -> np.ndarray:
    """Maps a PyTorch ``(out, in)`` matrix (or ``(T, out, in)`` sequence) to flax ``(in, out)``."""
    return np.swapaxes(x, -1, -2) if x.ndim >= matrix_ndim else x


def run_sequences(
    arrays: Mapping[str, np.ndarray],
    run: str,
    *,
    layout: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(init params, gradients (T, ...), expected params (T, ...))`` of a run, in our layout.

    ``layout(key, array)`` maps one array (a single tensor for init, a ``(T, ...)`` sequence for
    gradients and params) from the reference layout to ours; default: transpose 2-D matrices.
    """
    keys = golden_keys(arrays, run)
    if layout is None:
        layout = lambda k, a: a  # noqa: E731
    init = {k: layout(k, arrays[f"init/{k}"][None])[0] for k in keys}
    grads = {k: layout(k, arrays[f"{run}/grad/{k}"]) for k in keys}
    expected = {k: layout(k, arrays[f"{run}/params/{k}"]) for k in keys}
    return init, grads, expected


def matrix_layout(key: str, a: np.ndarray) -> np.ndarray:
    """Default golden layout map: sequences of 2-D matrices ``(T, out, in)`` -> ``(T, in, out)``."""
    return np.swapaxes(a, -1, -2) if a.ndim == 3 else a


def replay(
    tx: optax.GradientTransformation,
    init: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-5,
    rtol: float = 0.0,
    extra_args: Callable[[int], dict[str, Any]] | None = None,
    steps: int | None = None,
) -> list[dict[str, float]]:
    """Feeds the recorded gradients to ``tx`` and compares the parameters after every step.

    Raises:
      AssertionError naming the first step (1-based) and leaf whose parameters differ by more
      than ``atol + rtol * |expected|``, with the maximum difference.

    Returns:
      Per step, the maximum absolute difference per leaf (for reporting).
    """
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, g, extra):
        updates, state = tx.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state

    n = steps or next(iter(grads.values())).shape[0]
    report = []
    for t in range(n):
        g = {k: jnp.asarray(v[t]) for k, v in grads.items()}
        extra = extra_args(t) if extra_args else {}
        params, state = step(params, state, g, extra)
        diffs = {}
        for k in expected:
            got = np.asarray(params[k], np.float64)
            want = np.asarray(expected[k][t], np.float64)
            err = np.abs(got - want)
            diffs[k] = float(err.max())
            bound = atol + rtol * np.abs(want)
            if not np.all(err <= bound):
                raise AssertionError(
                    f"step {t + 1}, leaf {k!r}: max |diff| = {err.max():.3e} > atol {atol:g}"
                    f" (rtol {rtol:g}); per-leaf max diffs this step: "
                    + ", ".join(f"{kk}={v:.2e}" for kk, v in diffs.items())
                )
        report.append(diffs)
    return report


def strict_xfail(ids, failing, reason):
    """``ids`` as pytest parameters, the ``failing`` ones marked ``xfail(strict=True)``."""
    import pytest  # noqa: PLC0415

    mark = pytest.mark.xfail(strict=True, reason=reason)
    return [pytest.param(n, marks=mark) if n in failing else n for n in ids]
