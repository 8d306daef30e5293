"""The layout rule for per-matrix state (``sharding.aligned_spec``): pure, no devices needed."""

from jax.sharding import PartitionSpec as P

from optax_ext.kernels.sharding import aligned_spec

MESH = {"data": 64, "model": 4}


def test_state_keeps_the_parameters_sharding_where_the_axes_agree():
    assert aligned_spec((4096, 32), (4096, 11008), P("data", "model"), MESH) == P("data", None)
    assert aligned_spec((4096, 32), (4096, 11008), P("data", "model"), MESH,
                        spread=True) == P("data", "model")


def test_spread_puts_left_over_mesh_axes_on_an_unsharded_axis_they_divide():
    # projected moments (r, n) of a row-sharded (m, n) matrix: the rows' axis goes to n
    assert aligned_spec((2, 64), (64, 64), P("data", None), {"data": 8}, spread=True) == P(
        None, "data")


def test_spread_joins_a_sharded_axis_when_no_unsharded_one_divides():
    # rank 32 < 64 devices: the data axis joins n's model axis (4096 = 256 * 16)
    assert aligned_spec((32, 4096), (4096, 4096), P("data", "model"), MESH,
                        spread=True) == P(None, ("model", "data"))
    # nothing divides: the left-over axis stays unused (replicated over it)
    assert aligned_spec((32, 12), (4096, 12), P("data", None), MESH, spread=True) == P(None, None)
