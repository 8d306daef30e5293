"""add_decoupled_weight_decay."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext


@pytest.mark.parametrize("after", [True, False])
def test_decay_forms(after):
    tx = optax_ext.add_decoupled_weight_decay(0.1, 0.5, after_update=after)
    p, u = jnp.array([2.0, -1.0]), jnp.array([0.3, 0.2])
    out, _ = tx.update(u, tx.init(p), p)
    want = (p + u) * (1 - 0.05) - p if after else p * (1 - 0.05) + u - p
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_schedule_mask_and_missing_params():
    lr = optax.linear_schedule(1.0, 0.0, 2)
    tx = optax_ext.add_decoupled_weight_decay(0.5, lr, mask={"a": True, "b": False})
    p = {"a": jnp.ones(1), "b": jnp.ones(1)}
    s = tx.init(p)
    u0, s = tx.update({"a": jnp.zeros(1), "b": jnp.zeros(1)}, s, p)
    u1, s = tx.update({"a": jnp.zeros(1), "b": jnp.zeros(1)}, s, p)
    assert float(u0["a"][0]) == pytest.approx(-0.5) and float(u1["a"][0]) == pytest.approx(-0.25)
    assert float(u0["b"][0]) == 0.0
    with pytest.raises(ValueError, match="needs params"):
        plain = optax_ext.add_decoupled_weight_decay(0.1, 1.0)
        plain.update(jnp.zeros(1), plain.init(None))
