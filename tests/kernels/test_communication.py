"""1-bit compressed all-reduce: packing, padding, the two-level scheme and error feedback.

Workers are simulated with ``jax.vmap(axis_name=...)`` (collective semantics on one device);
the byte counts of the real collectives are checked on fake devices in
``tests/multidevice/check_onebit_adam.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import onebit_reference as ref
import pytest

from optax_ext.kernels import communication as comm


@pytest.mark.parametrize(
    ("numel", "workers", "expected"),
    [(2048, 4, 2048), (16, 4, 32), (16, 1, 16), (1, 1, 8), (16, 3, 72), (100, 8, 128)],
)
def test_padded_size_is_a_multiple_of_w_lcm_w_8(numel, workers, expected):
    assert comm.padded_size(numel, workers) == expected == ref.padded(numel, workers)


def test_signs_pack_eight_per_byte_like_numpy_and_zero_maps_to_plus_one():
    x = jnp.array([0.5, -1.0, 0.0, -0.0, -2.0, 3.0, 1e-30, -1e-30] * 3)
    packed = comm.pack_signs(x)
    assert packed.dtype == jnp.uint8 and packed.shape == (3,)
    np.testing.assert_array_equal(packed, np.packbits(np.asarray(x) >= 0))
    np.testing.assert_array_equal(
        comm.unpack_signs(packed), np.where(np.asarray(x) >= 0, 1.0, -1.0)
    )


def test_rms_sign_scale_and_error():
    x = jnp.array([3.0, -1.0, 0.0, 2.0, -4.0, 1.0, 0.5, -0.5])
    _, scale, error = comm.rms_sign(x)
    np.testing.assert_allclose(scale, np.sqrt(np.mean(np.asarray(x) ** 2)), rtol=1e-6)
    np.testing.assert_allclose(x - error, scale * np.where(np.asarray(x) >= 0, 1, -1), rtol=1e-6)


def _simulated(workers):
    """compressed_allreduce on ``workers`` vmapped workers: (xs, we, se) -> (means, we, se)."""

    @jax.jit
    def run(xs, we, se):
        return jax.vmap(lambda x, e, s: comm.compressed_allreduce(x, e, s, "w"), axis_name="w")(
            xs, we, se
        )

    return run


@pytest.mark.parametrize(("workers", "sizes"), [(2, (5, 64)), (3, (16, 1)), (4, (33, 20, 8))])
def test_compressed_allreduce_matches_the_numpy_transcription(workers, sizes):
    rng = np.random.default_rng(workers)
    run = _simulated(workers)
    we = [jnp.zeros((workers, comm.padded_size(n, workers))) for n in sizes]
    se = [jnp.zeros((workers, comm.padded_size(n, workers) // workers)) for n in sizes]
    np_we = [[np.zeros(comm.padded_size(n, workers), np.float32)] * workers for n in sizes]
    np_se = [
        [np.zeros(comm.padded_size(n, workers) // workers, np.float32)] * workers for n in sizes
    ]
    for _ in range(3):  # errors carried over calls
        xs = [rng.standard_normal((workers, n)).astype(np.float32) for n in sizes]
        means, we, se = run([jnp.asarray(x) for x in xs], we, se)
        for i, x in enumerate(xs):
            want = ref.compressed_allreduce(list(x), np_we[i], np_se[i])
            for w in range(workers):  # every worker holds the same result
                np.testing.assert_allclose(means[i][w], want, atol=1e-6)
            np.testing.assert_allclose(we[i], np.stack(np_we[i]), atol=1e-6)
            np.testing.assert_allclose(se[i], np.stack(np_se[i]), atol=1e-6)


def test_error_feedback_makes_the_running_average_track_the_true_mean():
    """With fixed inputs, the average of T compressed results converges to the mean (error
    O(1/T): the buffers stay bounded); without feedback the compression bias stays."""
    workers, n, steps = 4, 48, 200
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal((workers, n)).astype(np.float32) + 0.3)]
    mean = np.asarray(xs[0]).mean(axis=0)
    run = _simulated(workers)
    zeros = ([jnp.zeros((workers, 64))], [jnp.zeros((workers, 16))])

    @functools.partial(jax.jit, static_argnums=0)
    def average(feedback, xs):
        def body(carry, _):
            we, se = carry
            means, we2, se2 = run(xs, we, se)
            return ((we2, se2) if feedback else zeros), means[0][0]

        _, outs = jax.lax.scan(body, zeros, None, length=steps)
        return outs

    with_fb = np.asarray(average(True, xs))
    without = np.asarray(average(False, xs))
    err = lambda outs, t: np.abs(outs[:t].mean(axis=0) - mean).max()  # noqa: E731
    assert err(with_fb, steps) < 0.05 * err(without, steps)
    assert err(with_fb, steps) < 0.25 * err(with_fb, steps // 8)  # keeps shrinking with T
    assert err(without, steps) > 0.1  # one-shot 1-bit compression is biased
