"""SOAP and COSMOS sensitivity to one-ulp gradient changes: which settings a multi-device
comparison with one device can hold to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext
from optax_ext.kernels import NewtonSchulz

STEPS = 4
LAYERS = 8  # 16 matrices, 32 Gram factors: more factors than devices


def make_params():
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * LAYERS)
    n = lambda k, s: 0.1 * jax.random.normal(k, s)  # noqa: E731
    return {
        f"l{i}": {"a": n(keys[2 * i], (32, 32)), "b": n(keys[2 * i + 1], (64, 64))}
        for i in range(LAYERS)
    }


def make_target(params):
    return jax.tree.map(lambda p: 0.5 * jnp.flip(p, 0), params)


def grads(params, target, t, term):
    """Quadratic gradients ``(p - target) (1 + 0.1 t)`` plus ``term``. SOAP's first call only
    builds its bases, so the first real gradient is exactly 1.1x the one the bases come from:
    rotated, it is diagonal up to rounding and Adam's first step is the sign of that rounding
    noise (a 1e-7 perturbation moves the parameters by 1e-2, see below). The non-proportional
    runs add a fixed step-dependent term (:func:`terms`) so that every rotated entry is signal,
    not noise; the proportional ones add zeros (one compiled step serves both)."""
    return jax.tree.map(lambda p, q, r: (p - q) * (1.0 + 0.1 * t) + r, params, target, term)


def terms(params, *, proportional):
    """The term added to each step's gradients: zeros, or 0.05 N(0, 1) entry-wise, a new draw
    each step (drawn once, outside the compiled step)."""
    if proportional:
        return [jax.tree.map(jnp.zeros_like, params)] * STEPS
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for t in range(STEPS):
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), t), len(leaves))
        out.append(treedef.unflatten(
            [0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return out


# eps: Adam in an eigenbasis divides rotated moments by sqrt(v) + eps; coordinates whose v is
# tiny hold rounding noise that eps = 1e-8 amplifies (the test below measures it), so the
# layout comparison uses eps = 1e-2, where a one-ulp change of the gradients stays < 1e-5.
RECIPES = {
    "soap": lambda eps: optax_ext.soap(1e-2, eps=eps, precondition_frequency=2),
    "cosmos": lambda eps: optax.chain(
        optax_ext.scale_by_cosmos(
            eps=eps, subspace=optax_ext.OnlinePCA(rank=4), ns=NewtonSchulz.muon(dtype="float32")
        ),
        optax.scale(-1e-2),
    ),
}
EPS = 1e-2


def run(name, params, target, scales, *, proportional=False, eps=EPS):
    """The parameters after ``STEPS`` steps with the gradients scaled by each of ``scales``
    (one compiled step, the scale an argument)."""
    tx = RECIPES[name](eps)

    @jax.jit
    def step(params, state, t, term, scale):
        g = jax.tree.map(lambda x: x * scale, grads(params, target, t, term))
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    added = terms(params, proportional=proportional)
    out = []
    for scale in scales:
        p, state = params, tx.init(params)
        for t in range(STEPS):
            p, state = step(p, state, jnp.float32(t), added[t], jnp.float32(scale))
        out.append(p)
    return out


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# What the eps of the layout comparison buys: a one-ulp change moves the parameters by at most
# the tolerance that tests/multidevice/check_recipes.py allows SOAP (1e-4), where eps = 1e-8
# moves them by over 1e-3. The exact figures depend on rounding (code generation, the BLAS's
# threads: 1.2e-5 to 5e-5 at eps = 1e-2 seen), so the bounds leave an order of magnitude.
TOLERANCE = 1e-4


@pytest.mark.parametrize("name", list(RECIPES))
def test_one_device_sensitivity(name):
    """On one device, a one-ulp change of the gradients (x (1 + 1e-7); both recipes are
    scale-invariant up to eps): with the eps of the layout comparison both move by less than
    the comparison's tolerance; with eps = 1e-8, on gradients proportional to the ones the
    bases come from (rotated, diagonal up to rounding), SOAP moves by more than 1e-3 (1e-2
    measured): the algorithm's own sensitivity, which any other reduction order (the
    partitioner's) shows as well. Holds under both CPU code generations."""
    params = make_params()
    target = make_target(params)
    moved_by = {}
    cases = [(EPS, False)] + ([(1e-8, True)] if name == "soap" else [])
    for eps, proportional in cases:
        base, moved = run(name, params, target, (1.0, 1 + 1e-7), eps=eps,
                          proportional=proportional)
        moved_by[eps, proportional] = max_diff(base, moved)
        print(f"{name} eps={eps} proportional={proportional}: one ulp moves the parameters by "
              f"{moved_by[eps, proportional]:.2e}")
    assert moved_by[EPS, False] < TOLERANCE, moved_by
    if name == "soap":  # rounding noise divided by its own RMS: a +-1 update
        assert moved_by[1e-8, True] > 10 * TOLERANCE, moved_by
