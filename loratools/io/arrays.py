"""numpy views of safetensors data, and the bfloat16/float8 conversions numpy lacks.

Kept apart from the header reader so that reading headers never imports numpy.
"""

from __future__ import annotations

import math

import numpy as np

# Dtypes numpy can view in place; the file is little-endian whatever the host is.
_NUMPY_DTYPES = {name: np.dtype(code) for name, code in [
    ("BOOL", "?"), ("U8", "u1"), ("I8", "i1"), ("I16", "<i2"), ("U16", "<u2"), ("F16", "<f2"), ("I32", "<i4"),
    ("U32", "<u4"), ("F32", "<f4"), ("I64", "<i8"), ("U64", "<u8"), ("F64", "<f8")]}  # fmt: skip


# --- dtype conversions (numpy has no bfloat16 or float8) -------------------------------------------------------


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a shift."""
    return (np.asarray(bits, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), to nearest with ties to even; NaN stays NaN."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    return np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)


def numpy_to_bf16_bytes(values: np.ndarray) -> bytes:
    """Little-endian bfloat16 bytes of ``values`` (any float dtype)."""
    return float32_to_bf16_bits(values).astype("<u2").tobytes()


def _f8_table(exp_bits: int, man_bits: int, finite_max: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of a sign/exponent/mantissa float8 format."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    frac = man / (1 << man_bits)
    values = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (exp - bias)) * sign
    top = exp == (1 << exp_bits) - 1
    if finite_max:  # e4m3fn: no infinities, only the all-ones code is NaN
        values[top & (man == (1 << man_bits) - 1)] = np.nan
    else:  # e5m2 follows IEEE
        values[top & (man == 0)] = sign[top & (man == 0)] * np.inf
        values[top & (man != 0)] = np.nan
    return values.astype(np.float32)


_F8_TABLES = {
    "F8_E4M3": _f8_table(4, 3, finite_max=True),
    "F8_E5M2": _f8_table(5, 2, finite_max=False),
    # e8m0 is an exponent only: 2**(code-127), 0xFF is NaN
    "F8_E8M0": np.append(np.ldexp(np.float32(1), np.arange(-127, 128)), np.float32(np.nan)).astype(np.float32),
}


def from_bytes(raw, dtype: str, shape) -> np.ndarray:
    """A tensor's bytes as numpy: a read-only view where numpy has the dtype, else float32 values."""
    if dtype in _NUMPY_DTYPES:
        return np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return bf16_bits_to_float32(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    return _F8_TABLES[dtype][np.frombuffer(raw, dtype=np.uint8)].reshape(shape)


def little_endian_bytes(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of ``array`` in little-endian byte order (copied only when needed)."""
    le = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le).reshape(-1).view(np.uint8)


# --- scaling stored floats -------------------------------------------------------------------------------------

# (unsigned view, mantissa bits, exponent mask) of the IEEE-style float layouts
_FLOAT_BITS = {"F16": ("<u2", 10, 0x1F), "BF16": ("<u2", 7, 0xFF), "F32": ("<u4", 23, 0xFF)}


def scale_by_power_of_two(buf: bytearray, dtype: str, k: float) -> bool:
    """Multiply the little-endian floats in ``buf`` by ``k`` in place, if ``k`` is a power of two and ``dtype``
    a float layout; returns False (``buf`` untouched) otherwise.

    Scaling by 2**e only moves the exponent, so for normal values whose result stays normal it is exact and is
    done on the bits (numpy has no bfloat16, and importing torch would cost more than converting a file). The other
    values (subnormal before or after, overflowing, zero, infinite, NaN) are redone in integer arithmetic with the
    rounding of a float multiply (to nearest, ties to even).
    """
    layout = _FLOAT_BITS.get(dtype)
    mantissa, e = math.frexp(k)
    if layout is None or mantissa != 0.5 or not buf:
        return False
    e -= 1  # k == 2**e
    code, shift, top = layout
    bits = np.frombuffer(buf, dtype=code)
    lo, hi = max(1, 1 - e), min(top - 1, top - 1 - e)  # exponents that are normal before and after
    if lo <= hi:
        # lo <= exponent <= hi as one unsigned compare: exponents below lo wrap around to large numbers
        field = np.bitwise_and(bits, np.array(top << shift, dtype=code))
        field -= np.array(lo << shift, dtype=code)
        rest = np.flatnonzero(field > np.array((hi - lo) << shift, dtype=code))
    else:  # no value stays normal (a huge k)
        rest = np.arange(bits.size)
    others = bits[rest]
    step = np.array(abs(e) << shift, dtype=code)
    (np.add if e > 0 else np.subtract)(bits, step, out=bits)  # the exponent moves; `others` are redone below
    if rest.size:
        bits[rest] = _scale_bits(others.astype(np.int64), e, shift, top).astype(code)
    return True


def _scale_bits(x: np.ndarray, e: int, shift: int, top: int) -> np.ndarray:
    """``x`` (float bit patterns in a signed integer array) times 2**e, correctly rounded, for any exponent.
    Computed for every element and picked with ``where``: cheaper than masked assignments."""
    sign_bit = 1 << (shift + top.bit_length())
    sign, mag = x & sign_bit, x & (sign_bit - 1)
    field, frac = mag >> shift, mag & ((1 << shift) - 1)
    finite = (mag != 0) & (field != top)  # zeros, infinities and NaNs stay as they are
    if e < 0:
        # The significand in units of the smallest subnormal is sig << (field - 1) (sig = frac for subnormals),
        # so times 2**e it is sig >> d, rounded; that count of units is the subnormal's encoding, and a
        # carry into 1 << shift is the least normal. Values that stay normal only move the exponent.
        normal = field > 0
        sig = frac | (normal.astype(x.dtype) << shift)
        d = np.clip(np.where(normal, 1 - field, 0) - e, 1, shift + 2)  # beyond shift + 2 all rounds to 0
        q, r, half = sig >> d, sig & ((1 << d) - 1), (1 << d) >> 1
        q += (r > half) | ((r == half) & (q & 1).astype(bool))
        out = np.where(field + e >= 1, mag + (e << shift), q)
    else:
        # exact: growing never rounds; a result beyond the largest exponent is infinite
        length = np.frexp(frac.astype(np.float64))[1]  # bit length of a subnormal's frac
        new_field = np.where(field > 0, field, length - shift) + e
        normalised = (frac << np.maximum(shift - length + 1, 0)) + ((new_field - 1) << shift)
        grown_sub = np.where(new_field > 0, normalised, frac << np.minimum(e, shift))
        out = np.where(new_field >= top, top << shift, np.where(field > 0, mag + (e << shift), grown_sub))
    return sign | np.where(finite, out, mag)


# Bits that are all ones exactly in the NaN/Inf codes of each float dtype (float8 E4M3 has NaN only, 0x7F/0xFF).
_NONFINITE_BITS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F)}
# Every bit but the sign: zero exactly in +0 and -0. Other dtypes are looked at byte by byte (no -0 there).
_MAGNITUDE_BITS = {"F16": ("<u2", 0x7FFF), "BF16": ("<u2", 0x7FFF), "F32": ("<u4", 0x7FFFFFFF),
                   "F64": ("<u8", 0x7FFFFFFFFFFFFFFF), "F8_E4M3": ("u1", 0x7F), "F8_E5M2": ("u1", 0x7F)}
_CHUNK = 1 << 16  # elements per pass: the temporary stays in the cache


def _any_bits(raw, code: str, mask: int, every: bool) -> bool:
    """Whether some element of ``raw`` (viewed as ``code``) has every bit of ``mask`` set (``every``) or any of
    them; one cache-sized piece at a time, stopping at the first piece that has one."""
    bits = np.frombuffer(raw, dtype=code)
    mask = bits.dtype.type(mask)
    scratch = np.empty(min(bits.size, _CHUNK), dtype=bits.dtype)
    for start in range(0, bits.size, _CHUNK):
        masked = scratch[: min(_CHUNK, bits.size - start)]
        np.bitwise_and(bits[start : start + _CHUNK], mask, out=masked)
        top = masked.max()  # a masked value is a subset of the mask's bits: the mask itself is the largest
        hit = (top == mask) if every else (top != 0)
        if hit:
            return True
    return False


def all_finite(raw, dtype: str) -> bool:
    """Whether a tensor's stored bytes hold no NaN or Inf, read from the bits (no decoding, no float copy).
    Integer and bool tensors are finite."""
    spec = _NONFINITE_BITS.get(dtype)
    return spec is None or not _any_bits(raw, *spec, every=True)


def any_nonzero(raw, dtype: str) -> bool:
    """Whether a tensor's stored bytes hold a value other than +0 and -0 (stops at the first piece with one)."""
    if dtype == "F8_E8M0":  # an exponent only: no code is zero
        return len(raw) > 0
    return _any_bits(raw, *_MAGNITUDE_BITS.get(dtype, ("u1", 0xFF)), every=False)
