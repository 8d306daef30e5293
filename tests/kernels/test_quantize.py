"""Dynamic maps and block-wise quantization (bitsandbytes 8-bit optimizers)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_golden
from hypothesis import given, settings

from optax_ext.kernels import (
    BlockQuantizer,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)

GOLDEN, _ = load_golden("bnb8bit")
GOLDEN_CPU, _ = load_golden("bnb8bit_cpu")


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_the_reference_bit_for_bit(signed):
    key = "map/dynamic_signed" if signed else "map/dynamic_unsigned"
    np.testing.assert_array_equal(_bits(dynamic_map(signed)), _bits(GOLDEN[key]))
    np.testing.assert_array_equal(_bits(GOLDEN_CPU[key]), _bits(GOLDEN[key]))


def test_dynamic_map_layout():
    s, u = np.asarray(dynamic_map(True)), np.asarray(dynamic_map(False))
    assert s.dtype == u.dtype == np.float32 and s.shape == u.shape == (256,)
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
    assert (s < 0).sum() == 127 and s[127] == 0.0 and s[255] == 1.0 and s[0] > -1.0
    np.testing.assert_array_equal(s[:127], -s[128:255][::-1])  # symmetric except for 1.0
    assert u[0] == 0.0 and (u > 0).sum() == 255 and u[255] == 1.0
    # two values in the smallest decade of the unsigned map, 128 in the largest
    assert ((u > 0) & (u < 1e-6)).sum() == 2 and ((u >= 0.1) & (u < 1.0)).sum() == 128


def test_dynamic_map_other_widths_and_bad_settings():
    m = np.asarray(dynamic_map(True, max_exponent_bits=3, total_bits=4))
    assert m.shape == (16,) and m[7] == 0.0 and m[-1] == 1.0 and np.all(np.diff(m) > 0)
    assert np.asarray(BlockQuantizer(bits=4).code(False)).shape == (16,)
    codes, absmax = quantize_blockwise(jnp.linspace(-1.0, 1.0, 33), jnp.asarray(m), block_size=8)
    assert int(codes.max()) == 15 and int(codes.min()) == 0  # indices into the 16 values
    deq = dequantize_blockwise(codes, absmax, jnp.asarray(m), block_size=8)
    assert float(jnp.abs(deq - jnp.linspace(-1.0, 1.0, 33)).max()) < 0.25
    with pytest.raises(ValueError, match="max_exponent_bits"):
        dynamic_map(True, max_exponent_bits=8, total_bits=8)
    for bad in (dict(bits=9), dict(block_size=0), dict(min_size=-1)):
        with pytest.raises(ValueError, match="BlockQuantizer"):
            BlockQuantizer(**bad)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "name", ["signed_bs256", "signed_bs2048", "unsigned_bs256", "unsigned_bs2048"]
)
def test_golden_codes_absmax_and_dequant_bit_exact(name, jit):
    code = dynamic_map(name.startswith("signed"))
    bs = int(name.split("bs")[1])
    q = lambda x: quantize_blockwise(x, code, block_size=bs)  # noqa: E731
    dq = lambda c, a: dequantize_blockwise(c, a, code, block_size=bs)  # noqa: E731
    if jit:
        q, dq = jax.jit(q), jax.jit(dq)
    with jax.numpy_dtype_promotion("strict"):
        codes, absmax = q(jnp.asarray(GOLDEN[f"quant/{name}/input"]))
        deq = dq(codes, absmax)
    assert codes.dtype == jnp.uint8 and absmax.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(codes), GOLDEN[f"quant/{name}/codes"])
    np.testing.assert_array_equal(_bits(absmax), _bits(GOLDEN[f"quant/{name}/absmax"]))
    np.testing.assert_array_equal(_bits(deq), _bits(GOLDEN[f"quant/{name}/dequant"]))


# (size, block_size): partial last blocks, one block, many blocks.
SIZES = [(5, 4), (64, 16), (40, 64), (48, 1)]


@st.composite
def heavy_tailed(draw):
    n, bs = draw(st.sampled_from(SIZES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 2, n)  # spans ten decades
    if draw(st.booleans()):
        x[rng.integers(0, n)] = 0.0
    return x.astype(np.float32), bs


def _neighbours(code, y):
    """Largest map value <= y and smallest >= y."""
    hi = code[np.clip(np.searchsorted(code, y, side="left"), 0, len(code) - 1)]
    lo = code[np.clip(np.searchsorted(code, y, side="right") - 1, 0, len(code) - 1)]
    return lo, hi


_JIT_Q = jax.jit(quantize_blockwise, static_argnames=("block_size", "sign_fix"))
_JIT_DQ = jax.jit(dequantize_blockwise, static_argnames=("block_size",))


def _round_trip(x, bs, signed):
    code = dynamic_map(signed)
    q = lambda v, fix: _JIT_Q(v, code, block_size=bs, sign_fix=fix)  # noqa: E731
    dq = lambda c, a: _JIT_DQ(c, a, code, block_size=bs)  # noqa: E731
    with jax.numpy_dtype_promotion("strict"):
        codes, absmax = q(jnp.asarray(x), False)
        deq = np.asarray(dq(codes, absmax), np.float64)
        fixed, absmax_fixed = q(jnp.asarray(x), True)
        deq_fixed = np.asarray(dq(fixed, absmax_fixed), np.float64)
    np.testing.assert_array_equal(absmax, absmax_fixed)
    return (
        np.asarray(code, np.float64),
        np.asarray(codes),
        np.asarray(absmax),
        deq,
        fixed,
        deq_fixed,
    )


# Jitted: eagerly, every example's new size would compile each of the kernel's ops again; the
# eager path is checked bit for bit against the reference by the golden test above.
@settings(max_examples=8)  # each example quantizes 3 ways and dequantizes 3 times
@given(case=heavy_tailed())
def test_round_trip_error_within_half_the_local_gap_and_sign_fix(case):
    x, bs = case
    for signed in (True, False):
        x = x if signed else np.abs(x)
        c64, codes, absmax, deq, fixed, deq_fixed = _round_trip(x, bs, signed)
        for b in range(absmax.shape[0]):  # one absmax per block
            assert float(absmax[b]) == float(np.abs(x[b * bs : (b + 1) * bs]).max())
        a = np.repeat(absmax.astype(np.float64), bs)[: x.size]
        y = np.where(a > 0, x / np.where(a > 0, a, 1.0), 0.0)
        lo, hi = _neighbours(c64, y)
        # half the gap between the neighbouring values; below the smallest value (the signed
        # map has no -1) the distance to it
        bound = np.where(y < c64[0], c64[0] - y, 0.5 * (hi - lo)) * a
        err = np.abs(deq - x)
        assert np.all(err <= bound * (1 + 1e-6) + 1e-7 * a), (err - bound).max()
        # the value is the nearest one (ties either way)
        dist = np.abs(c64[None, :] * a[:, None] - x[:, None].astype(np.float64)).min(axis=1)
        assert np.all(err <= dist * (1 + 1e-6) + 1e-7 * a)
        if not signed:
            continue
        # sign fix: negative entries stay negative; only those that rounded to 0 move, by one
        # index, to the smallest negative value
        assert np.all(deq_fixed[x < 0] < 0)
        moved = codes != np.asarray(fixed)
        assert np.all(codes[moved] == 127) and np.all(np.asarray(fixed)[moved] == 126)
        assert np.all(x[moved] < 0)
        np.testing.assert_array_equal(deq_fixed[~moved], deq[~moved])


def test_sign_fix_hand_worked():
    code = dynamic_map(True)
    x = jnp.array([-1e-9, 1e-9, 1.0, -0.0, 0.0, -0.5])
    codes, absmax = quantize_blockwise(x, code, block_size=6, sign_fix=True)
    # tiny negative -> 126 (-5.5e-7); tiny positive -> 0 (127); -0.0 has its sign bit set
    assert codes.tolist() == [126, 127, 255, 126, 127, 35] and absmax.tolist() == [1.0]
    codes, _ = quantize_blockwise(x, code, block_size=6)
    assert codes.tolist() == [127, 127, 255, 127, 127, 35]
    assert float(code[35]) == pytest.approx(-0.5, abs=0.01)


def test_non_finite_entries_and_zero_blocks():
    for signed, zero_code in ((True, 127), (False, 0)):
        code = dynamic_map(signed)
        x = jnp.array([jnp.nan, 0.25, jnp.inf, -jnp.inf, 0.0, 0.0, 0.0, 0.0])
        codes, absmax = quantize_blockwise(x, code, block_size=4, sign_fix=signed)
        assert absmax.tolist() == [0.25, 0.0]  # non-finite entries do not enter absmax
        assert codes.tolist() == [zero_code, 255, zero_code, zero_code] + [zero_code] * 4
        deq = dequantize_blockwise(codes, absmax, code, block_size=4)
        assert deq.tolist() == [0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_shapes_dtypes_and_errors():
    code = dynamic_map(True)
    x = jnp.arange(-12.0, 12.0).reshape(2, 3, 4).astype(jnp.bfloat16)
    codes, absmax = _JIT_Q(x, code, block_size=5)
    assert codes.shape == (2, 3, 4) and codes.dtype == jnp.uint8 and absmax.shape == (5,)
    deq = _JIT_DQ(codes, absmax, code, block_size=5)
    assert deq.shape == (2, 3, 4) and deq.dtype == jnp.float32
    np.testing.assert_allclose(deq, x.astype(jnp.float32), rtol=0.02, atol=1e-6)
    codes, absmax = _JIT_Q(jnp.float32(-3.0), code)  # 0-d
    assert codes.shape == () and absmax.tolist() == [3.0]
    codes, absmax = _JIT_Q(jnp.zeros((0, 4)), code)
    assert codes.shape == (0, 4) and absmax.shape == (0,)
    with pytest.raises(ValueError, match="absmax"):
        _JIT_DQ(jnp.zeros(10, jnp.uint8), jnp.ones(2), code, block_size=4)
    with pytest.raises(ValueError, match="code"):
        _JIT_Q(jnp.ones(3), jnp.linspace(-1, 1, 257))
    with pytest.raises(ValueError, match="block_size"):
        _JIT_Q(jnp.ones(3), code, block_size=0)
