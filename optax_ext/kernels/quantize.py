"""Block-wise dynamic quantization: the 8-bit maps and codecs of the bitsandbytes optimizers.

A tensor is flattened (C order) and cut into blocks of ``block_size`` consecutive entries (the
last block may be partial). Each block stores its absolute maximum ``absmax`` in float32 and every
entry an index (``uint8`` code) into a sorted map of at most 256 float32 values in ``[-1, 1]``:
the value nearest to ``x / absmax``. Dequantizing gives ``map[code] * absmax``. The "dynamic" map
(a sign bit, a run of zeros that selects the exponent ``10^-e``, an indicator bit and a linear
fraction) keeps a roughly constant relative precision over seven decades, which suits optimizer
statistics whose entries span orders of magnitude.

Shapes: ``x`` any shape (size ``n``); codes ``uint8[x.shape]``; absmax
``float32[ceil(n / block_size)]``; maps ``float32[2**total_bits]``.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockQuantizer:
    """How optimizer-state tensors are quantized (a frozen spec, static under ``jit``).

    Attributes:
      bits: code width; the dynamic maps have ``2**bits`` values. Default 8 (bitsandbytes).
        Codes are stored one per ``uint8`` for every width (no sub-byte packing), so a width
        below 8 lowers precision, not memory.
      block_size: entries per block sharing one float32 ``absmax``. Default 256 (bitsandbytes
        optimizers since 0.44; the paper used 2048).
      min_size: tensors with fewer entries keep their state in full precision. Default 4096
        (bitsandbytes ``min_8bit_size``).
      sign_fix: for signed maps, never store a negative value as zero or positive (see
        :func:`quantize_blockwise`). Default True (the CUDA optimizer kernels).
    """

    bits: int = 8
    block_size: int = 256
    min_size: int = 4096
    sign_fix: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"BlockQuantizer.bits must be in [2, 8], got {self.bits}")
        if self.block_size < 1:
            raise ValueError(f"BlockQuantizer.block_size must be >= 1, got {self.block_size}")
        if self.min_size < 0:
            raise ValueError(f"BlockQuantizer.min_size must be >= 0, got {self.min_size}")

    def code(self, signed: bool) -> np.ndarray:
        """The dynamic map of this width (:func:`dynamic_map` with ``bits - 1`` exponent bits) as
        a read-only numpy array: a constant, safe to build inside ``jit`` and to close over."""
        return _dynamic_map_np(bool(signed), self.bits - 1, self.bits)


def _round_f32(value: fractions.Fraction) -> np.float32:
    """``value`` rounded once to the nearest float32 (ties to even)."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess]
    candidates.append(np.nextafter(guess, np.float32(np.inf)))
    err = [abs(fractions.Fraction(float(c)) - value) for c in candidates]
    best = min(err)
    ties = [c for c, e in zip(candidates, err) if e == best]
    return min(ties, key=lambda c: int(np.array(c).view(np.uint32)) & 1)


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """``a * b + c`` with one float32 rounding (a fused multiply-add)."""
    frac = fractions.Fraction
    return _round_f32(frac(float(a)) * frac(float(b)) + frac(float(c)))


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` as its CPU kernel computes it.

    ``step = (end - start) / (steps - 1)`` in float32; the first half is ``start + step * i``,
    the second ``end - step * (steps - 1 - i)``, each a fused multiply-add (one rounding).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32(np.float32(end32 - start32) / np.float32(steps - 1))
    out = np.empty(steps, np.float32)
    for i in range(steps):
        if i < steps // 2:
            out[i] = _fma_f32(step, np.float32(i), start32)
        else:
            out[i] = _fma_f32(-step, np.float32(steps - 1 - i), end32)
    return out


@functools.cache
def _dynamic_map_np(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
    non_sign_bits = total_bits - 1
    if not 1 <= max_exponent_bits <= non_sign_bits:
        raise ValueError(
            f"dynamic_map needs 1 <= max_exponent_bits <= total_bits - 1, got "
            f"max_exponent_bits={max_exponent_bits}, total_bits={total_bits}"
        )
    data: list[float] = []

    def level(exponent: int, items: int) -> None:
        bounds = _linspace_f32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)  # float32 midpoints
        vals = np.float32(10.0**exponent) * means  # float32 scale of the decade
        data.extend(vals.tolist())
        if signed:
            data.extend((-vals).tolist())

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        level(i - (max_exponent_bits - 1), 2**shift + 1)
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional > 0:  # exponent bits all zero and no indicator bit: more fraction values
        level(0, additional + 1)
    data += [0.0, 1.0]
    if len(data) > 2**total_bits:
        raise ValueError(f"dynamic_map: {len(data)} values do not fit in {total_bits} bits")
    data += [0.0] * (2**total_bits - len(data))
    out = np.array(sorted(data), np.float32)
    out.setflags(write=False)
    return out


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> jax.Array:
    """The dynamic ("tree") quantization map: ``2**total_bits`` sorted float32 values in [-1, 1].

    For exponent level ``i = 0 .. max_exponent_bits - 1`` the map holds the midpoints of
    ``linspace(0.1, 1, k_i + 1)`` scaled by ``10^(i - max_exponent_bits + 1)``, with
    ``k_i = 2^(i + total_bits - 1 - max_exponent_bits)`` values per level (twice as many if
    unsigned) and their negatives if signed; then 0 and 1, padded with zeros and sorted. With
    the defaults: signed = 127 negatives down to -0.99297, 0 (index 127), 127 positives and 1.0
    (no -1); unsigned = 0, 254 positives from 3.25e-7, and 1.0.

    Built with the float32 arithmetic of the reference (``torch.linspace`` on CPU, float32
    midpoints and scales), so the values are bit-identical to bitsandbytes'
    ``create_dynamic_map``.

    Args:
      signed: include negative values (first moments) or not (second moments). Default True.
      max_exponent_bits: number of decades minus one is ``max_exponent_bits - 1``. Default 7.
      total_bits: code width. Default 8. bitsandbytes pads every map to 256 entries; this
        returns ``2**total_bits`` (the same for 8 bits).

    Returns:
      ``float32[2**total_bits]``, sorted ascending.

    Raises:
      ValueError: if the settings do not describe a map of ``2**total_bits`` values.

    References:
      Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization", ICLR,
      arXiv 2110.02861; Dettmers, 2016, "8-Bit Approximations for Parallelism in Deep
      Learning", arXiv 1511.04561. Code: bitsandbytes ``functional.create_dynamic_map`` at
      github.com/bitsandbytes-foundation/bitsandbytes/tree/95f9af309d4d5793847169c39288dcd3fcbdf564

    Example:
      >>> from optax_ext.kernels import dynamic_map
      >>> m = dynamic_map(signed=True)
      >>> m.shape, float(m[127]), float(m[255]), round(float(m[0]), 5)
      ((256,), 0.0, 1.0, -0.99297)
    """
    return jnp.asarray(_dynamic_map_np(bool(signed), int(max_exponent_bits), int(total_bits)))


def num_blocks(size: int, block_size: int) -> int:
    """Number of blocks ``ceil(size / block_size)`` of a tensor with ``size`` entries."""
    return -(-size // block_size)


def _check_code(code: jax.Array | np.ndarray) -> None:
    if np.ndim(code) != 1 or not 2 <= code.shape[0] <= 256:
        raise ValueError(f"code must be a 1-D map of 2 to 256 values, got shape {code.shape}")


def _blocks(flat: jax.Array, block_size: int) -> jax.Array:
    """``(n,)`` -> ``(n_blocks, block_size)``, the last block padded with zeros."""
    nb = num_blocks(flat.shape[0], block_size)
    return jnp.pad(flat, (0, nb * block_size - flat.shape[0])).reshape(nb, block_size)


def _take(table, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a small replicated table; on an explicit-axis mesh the result is laid
    out like ``idx`` (each device looks up its own entries, no communication)."""
    table = jnp.asarray(table)
    s = getattr(jax.typeof(idx), "sharding", None)
    mesh = getattr(s, "mesh", None)
    types = tuple(getattr(mesh, "axis_types", ()))
    if mesh is not None and jax.sharding.AxisType.Explicit in types and mesh.size > 1:
        return table.at[idx].get(out_sharding=s)
    return table[idx]


def _midpoints(code: jax.Array) -> jax.Array:
    """``(code[k] + code[k+1]) * 0.5`` in float32, padded with +inf to 255 entries."""
    mid = (code[:-1] + code[1:]) * 0.5
    return jnp.pad(mid, (0, 255 - mid.shape[0]), constant_values=jnp.inf)


def _count_below(table: jax.Array, y: jax.Array) -> jax.Array:
    """``searchsorted(table, y, side="left")`` for a sorted table of 255 values: an unrolled,
    branch-free binary search (eight gathers from the table). Used when the map is traced."""
    idx = jnp.zeros(y.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        idx = jnp.where(_take(table, idx + (step - 1)) < y, idx + step, idx)
    return idx


_BUCKET_SHIFT = 16  # buckets of 2**16 consecutive float32 bit patterns: 65,536 of them
_MAX_PER_BUCKET = 4  # maps with more midpoints in one bucket use the binary search


def _order_key(bits):
    """Signed-int32 keys that order float32 bit patterns as the floats (sign-magnitude -> two's
    complement; -0.0 sorts just below +0.0): works on numpy and jax int32 arrays alike."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@functools.lru_cache(maxsize=64)
def _bucket_table(code_bytes: bytes) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Host-side tables for :func:`_nearest` on a constant map (cached by its bytes).

    Returns ``(table, mids, steps)`` with ``steps`` the most midpoints any bucket of the float32
    order keys holds (None when that exceeds ``_MAX_PER_BUCKET``). With ``steps <= 1`` (the
    dynamic maps), ``table`` is one packed int32 per bucket ``j``: the number of midpoints below
    the bucket (bits 17 and up), whether it holds one (bit 16), and that midpoint's key offset
    inside the bucket (bits 0-15); ``mids`` is then unused. Otherwise ``table`` holds only the
    counts and ``mids`` the midpoints padded with ``+inf``.
    """
    code = np.frombuffer(code_bytes, np.float32)
    mids = (code[:-1] + code[1:]) * np.float32(0.5) + np.float32(0.0)  # float32; -0.0 -> +0.0
    keys = np.sort(_order_key(mids.view(np.int32)).astype(np.int64))
    starts = np.arange(-(2**31), 2**31, 2**_BUCKET_SHIFT, dtype=np.int64)
    first = np.searchsorted(keys, starts, side="left")
    inside = np.searchsorted(keys, starts + 2**_BUCKET_SHIFT, side="left") - first
    steps = int(np.max(inside))
    if steps > _MAX_PER_BUCKET:
        return None
    if steps <= 1:
        has = inside > 0
        offset = np.where(has, keys[np.minimum(first, len(keys) - 1)] - starts, 0)
        packed = (first << (_BUCKET_SHIFT + 1)) | (has.astype(np.int64) << _BUCKET_SHIFT) | offset
        return packed.astype(np.int32), mids, steps
    padded = np.concatenate([mids, np.full(steps, np.inf, np.float32)])
    return first.astype(np.uint8), padded, steps


def _nearest(code: jax.Array | np.ndarray, y: jax.Array) -> jax.Array:
    """``searchsorted(midpoints of code, y, side="left")`` (int32): the nearest map value.

    For a constant map, the top 16 bits of ``y``'s float32 order key select one of 65,536
    buckets of consecutive floats; a table gives the number of midpoints below the bucket and
    the (at most ``_MAX_PER_BUCKET``) midpoints inside it are compared with ``y``. For the
    dynamic maps (at most one midpoint per bucket) that is a single lookup in a packed int32
    table and one integer comparison of the low 16 key bits: one gather per entry, fused by
    XLA with the elementwise work around it. A traced map falls back to :func:`_count_below`.
    """
    try:
        table = _bucket_table(np.asarray(code, np.float32).tobytes())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        table = None
    if table is None:
        return _count_below(_midpoints(jnp.asarray(code, jnp.float32)), y)
    table, mids, steps = table
    y = y + 0.0  # -0.0 -> +0.0: equal floats, equal keys
    key = _order_key(jax.lax.bitcast_convert_type(y, jnp.int32))
    bucket = (key >> _BUCKET_SHIFT) + 2 ** (31 - _BUCKET_SHIFT)
    entry = _take(table, bucket).astype(jnp.int32)
    if steps <= 1:
        low = key & (2**_BUCKET_SHIFT - 1)  # y's key offset inside its bucket
        has = (entry >> _BUCKET_SHIFT) & 1
        above = (low > (entry & (2**_BUCKET_SHIFT - 1))).astype(jnp.int32)
        return (entry >> (_BUCKET_SHIFT + 1)) + has * above
    mids = jnp.asarray(mids)
    return entry + sum((_take(mids, entry + s) < y).astype(jnp.int32) for s in range(steps))


def _negatives(code: jax.Array | np.ndarray) -> int | None:
    """For a constant sorted map whose sign bits are a prefix (negatives, then the rest), the
    number of entries with the sign bit set; None for a traced map or any other pattern."""
    try:
        c = np.asarray(code, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    k = int(np.sum(np.signbit(c)))
    return k if bool(np.all(np.signbit(c[:k]))) else None


def quantize_blockwise(
    x: jax.Array, code: jax.Array, *, block_size: int = 256, sign_fix: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` block-wise to the nearest values of ``code``.

    Algorithm (per block ``b`` of ``block_size`` consecutive entries of ``x.reshape(-1)``)::

        a_b = max |x_i|                               (float32; non-finite x_i count as 0)
        c_i = argmin_k |code[k] - x_i / a_b|          (searchsorted on the midpoints of code)
        sign_fix: if signbit(code[c_i]) != signbit(x_i):  c_i <- c_i + 1 if x_i > 0 else c_i - 1

    The nearest value is found by comparing with the float32 midpoints
    ``(code[k] + code[k+1]) * 0.5``; an exact tie goes to the lower index (as ``torch.bucketize``;
    the CUDA binary search may pick either). The sign fix (CUDA optimizer kernels) keeps a tiny
    negative entry from becoming 0: it moves one index down, to the smallest-magnitude negative
    value; positive entries may become 0 (0 has no sign bit). Non-finite entries are stored as
    the code of 0 and do not enter ``a_b`` (the 8-bit optimizers zero the state of non-finite
    gradient entries). A block with ``a_b = 0`` stores the code of 0.

    Args:
      x: any shape and float dtype (computed in float32).
      code: the sorted map, ``float32[k]`` with ``k <= 256`` (e.g. :func:`dynamic_map`).
      block_size: entries per block. Default 256 (the optimizers'; bitsandbytes'
        ``quantize_blockwise`` itself defaults to 4096).
      sign_fix: apply the sign fix (for signed maps). Default False.

    Returns:
      ``(codes, absmax)``: ``uint8[x.shape]`` and ``float32[ceil(x.size / block_size)]``.

    Raises:
      ValueError: if ``code`` is not a 1-D map of at most 256 values or ``block_size < 1``.

    References:
      Dettmers et al., 2022, arXiv 2110.02861; bitsandbytes ``csrc/kernels.cu``
      (``kQuantizeBlockwise``, ``quantize_2D`` and the sign fix in
      ``kOptimizerStatic8bit2StateBlockwise``) at commit 95f9af3.

    Notes:
      Divides by ``a_b`` exactly; the CUDA kernels multiply by a reciprocal or use a fast
      division (``__fdividef``), which can only change a code when ``x / a_b`` lies within an
      ulp of a midpoint (none of the reference goldens does).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_ext.kernels import dynamic_map, quantize_blockwise, dequantize_blockwise
      >>> x = jnp.array([0.5, -0.25, 0.5, -1e-9])
      >>> codes, absmax = quantize_blockwise(x, dynamic_map(), block_size=2)
      >>> absmax.tolist(), codes.tolist()      # -1e-9 / 0.5 rounds to 0 (index 127)
      ([0.5, 0.5], [255, 35, 255, 127])
      >>> codes, absmax = quantize_blockwise(x, dynamic_map(), block_size=2, sign_fix=True)
      >>> codes.tolist()                        # sign fix: the smallest negative value instead
      [255, 35, 255, 126]
      >>> dequantize_blockwise(codes, absmax, dynamic_map(), block_size=2)[:2].tolist()
      [0.5, -0.2503906190395355]
    """
    _check_code(code)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x = jnp.asarray(x)
    flat = x.reshape(-1).astype(jnp.float32)
    codes, absmax = quantize_blocks(_blocks(flat, block_size), code, sign_fix=sign_fix)
    codes = codes.reshape(-1)[: flat.shape[0]].reshape(x.shape)
    return codes, absmax


def quantize_blocks(
    blocks: jax.Array, code: jax.Array, *, sign_fix: bool = False
) -> tuple[jax.Array, jax.Array]:
    """:func:`quantize_blockwise` on a tensor already cut into blocks: one block per row.

    Row-wise only, so it runs unchanged on blocks sharded over their rows (each device
    quantizes the blocks it holds, without communication).

    Args:
      blocks: ``(n_blocks, block_size)``, any float dtype (computed in float32).
      code: the sorted map.
      sign_fix: see :func:`quantize_blockwise`.

    Returns:
      ``(codes, absmax)``: ``uint8[n_blocks, block_size]`` and ``float32[n_blocks]``.
    """
    blocks = blocks.astype(jnp.float32)
    blocks = jnp.where(jnp.isfinite(blocks), blocks, jnp.zeros_like(blocks))
    absmax = jnp.max(jnp.abs(blocks), axis=1, initial=0.0)  # [nb]
    scale = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    y = blocks / scale[:, None]  # in [-1, 1]
    idx = _nearest(code, y)  # nearest value, ties to the lower index
    if sign_fix:
        k = _negatives(code)  # signbit(code[idx]) without a gather: idx < k (constant map)
        neg = idx < k if k is not None else jnp.signbit(_take(jnp.asarray(code, jnp.float32), idx))
        flip = neg != jnp.signbit(blocks)
        idx = jnp.where(flip, idx + jnp.where(blocks > 0, 1, -1), idx)
        idx = jnp.clip(idx, 0, code.shape[0] - 1)
    return idx.astype(jnp.uint8), absmax


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    *,
    block_size: int = 256,
) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax`` of each entry's block.

    Args:
      codes: ``uint8`` of any shape (size ``n``).
      absmax: ``float32[ceil(n / block_size)]``.
      code: the map the codes index.
      block_size: entries per block, as when quantizing. Default 256.

    Returns:
      ``float32[codes.shape]``.

    Raises:
      ValueError: if ``absmax`` does not have one entry per block.
    """
    _check_code(code)
    code = jnp.asarray(code, jnp.float32)
    n = int(np.prod(codes.shape))
    if absmax.shape != (num_blocks(n, block_size),):
        raise ValueError(
            f"absmax has shape {absmax.shape}; codes of shape {codes.shape} in blocks of "
            f"{block_size} need ({num_blocks(n, block_size)},)"
        )
    vals = dequantize_blocks(_blocks(codes.reshape(-1), block_size), absmax, code)
    return vals.reshape(-1)[:n].reshape(codes.shape)


def dequantize_blocks(codes: jax.Array, absmax: jax.Array, code: jax.Array) -> jax.Array:
    """:func:`dequantize_blockwise` on codes already cut into blocks (row-wise, like
    :func:`quantize_blocks`): ``code[codes] * absmax[:, None]``, float32."""
    code = jnp.asarray(code, jnp.float32)
    return _take(code, codes.astype(jnp.int32)) * absmax.astype(jnp.float32)[:, None]
