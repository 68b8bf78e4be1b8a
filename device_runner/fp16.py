"""fp16 -> fp32 conversion of cached K/V rows: exact, and 3x faster than numpy's own cast.

The K/V cache stores fp16; every training step reads its rows as fp32 (docs/design.md section 10).
numpy's wheels convert float16 one element at a time (no F16C path): 0.096 CPU s per vit_b16 K (or
V) tensor at batch 32 on the reference machine, 0.19 s of every step. onnxruntime 1.19.2's Cast is
0.051 s (1.32's 0.018, but a Cast inside the graph holds the fp16 rows next to their copy). Integer
and float ufuncs are vectorized in every numpy wheel, so the conversion is done with them, chunk by
chunk while the chunk sits in the L2 cache: 0.028 s (bench/fp16_convert.py). On the 16-bit pattern h read as a signed integer and widened to int32:

    y = h << 13           exponent and mantissa land in the fp32 fields (bits 13-27); a negative
                          h sign-extends, so bits 28-31 are all its sign
    y &= 0x8FFFE000       keep the sign bit and the 15 shifted bits
    y as float32 * 2**112 rebiases the exponent (15 -> 127) exactly, the sign riding along; a
                          subnormal fp16 (exponent 0) is a subnormal fp32 here and comes out normal

Only infinities and NaNs (fp16 exponent 31) land elsewhere, on finite values of magnitude >= 65536
(the largest finite fp16 is 65504); a chunk that holds any is converted again by numpy's own cast.
The result is bit for bit `src.astype(np.float32)` (tests/test_fp16.py checks all 65536 patterns).
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 17
"""Values per pass: 512 KiB of fp32 output, which stays in a core's L2 cache between the passes
(vit_b16 K, 58 M values: 0.045 / 0.030 / 0.028 / 0.028 CPU s at chunks of 2**14 / 2**16 / 2**17 / 2**18)."""

_REBIAS = np.float32(2.0**112)
_OVERFLOW = np.float32(65536.0)
_SIGN_AND_MAGNITUDE = np.int32(-0x70002000)  # 0x8FFFE000 as int32


def fp16_to_fp32(src: np.ndarray, out: np.ndarray) -> None:
    """out[...] = src, float16 -> float32, bit for bit as numpy's cast; out may be a row of a
    larger array. Non-contiguous arrays take numpy's cast."""
    if src.dtype != np.float16 or out.dtype != np.float32 or src.size != out.size:
        raise ValueError(f"fp16_to_fp32: {src.dtype}{list(src.shape)} -> {out.dtype}{list(out.shape)}")
    if not (src.flags.c_contiguous and out.flags.c_contiguous):
        np.copyto(out, src.reshape(out.shape))
        return
    halves = src.reshape(-1).view(np.int16)
    floats = out.reshape(-1)
    bits = floats.view(np.int32)
    for start in range(0, halves.size, CHUNK):
        h, f, y = halves[start : start + CHUNK], floats[start : start + CHUNK], bits[start : start + CHUNK]
        y[...] = h  # sign-extending widen
        np.left_shift(y, 13, out=y)
        np.bitwise_and(y, _SIGN_AND_MAGNITUDE, out=y)
        np.multiply(f, _REBIAS, out=f)
        if f.max() >= _OVERFLOW or f.min() <= -_OVERFLOW:  # an infinity or a NaN in this chunk
            np.copyto(f, h.view(np.float16))
