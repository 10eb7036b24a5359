"""Power-of-two scaling of stored float16 factors (what `convert --to diffusers` does to fold alpha/r), next to
the float64 round trip it replaced for the values the exponent alone cannot move (loratools now takes those
from a table of all 65536 results).

    python benchmarks/bench_scale.py [--repeat 5]

Two sets of SDXL-shaped rank-128 factors: the ones the convert benchmark writes (std 0.1/sqrt(r), ~1% of the
values subnormal or near it) and factors like trained up-factors (std 1e-3, ~10%). Both ways scale by 0.5 and
must give the same bits; the table shows the best of N, in process, one core.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import sdxl_kohya_modules, table

from loratools.io.arrays import _FLOAT_BITS, scale_by_power_of_two


def float64_round_trip(buf: bytearray, dtype: str, k: float) -> None:
    """The baseline: the same exponent move for normal values, the others decoded to float64, multiplied and
    encoded back (numpy's float16 casts are done in software)."""
    _, e = math.frexp(k)
    e -= 1
    code, shift, top = _FLOAT_BITS[dtype]
    bits = np.frombuffer(buf, dtype=code)
    lo, hi = max(1, 1 - e), min(top - 1, top - 1 - e)
    field = np.bitwise_and(bits, np.array(top << shift, dtype=code))
    field -= np.array(lo << shift, dtype=code)
    rest = np.flatnonzero(field > np.array((hi - lo) << shift, dtype=code))
    others = bits[rest]
    (np.add if e > 0 else np.subtract)(bits, np.array(abs(e) << shift, dtype=code), out=bits)
    exp = (others >> shift) & top
    plain = (exp != top) & ((others & 0x7FFF) != 0)
    with np.errstate(over="ignore"):
        others[plain] = (others[plain].view("<f2").astype(np.float64) * k).astype("<f2").view(code)
    bits[rest] = others


def factors(std_of, count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _, shape in sdxl_kohya_modules()[:count]:
        out_f = shape[0]
        r = min(128, out_f, int(np.prod(shape[1:])))
        out.append((rng.standard_normal((out_f, r), dtype=np.float32) * std_of(r)).astype(np.float16).tobytes())
    return out


def best(fn, data: list[bytes], repeat: int) -> tuple[float, list[bytearray]]:
    times = []
    for _ in range(repeat):
        bufs = [bytearray(b) for b in data]
        t = time.perf_counter()
        for b in bufs:
            fn(b, "F16", 0.5)
        times.append(time.perf_counter() - t)
    return min(times), bufs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modules", type=int, default=400, help="how many of SDXL's 986 modules")
    args = ap.parse_args()
    rows = []
    for name, std_of in (("convert benchmark's factors", lambda r: 0.1 / np.sqrt(r)),
                         ("trained-like (std 1e-3)", lambda r: 1e-3)):
        data = factors(std_of, args.modules)
        size = sum(map(len, data)) / 1e6
        small = sum(int(np.count_nonzero(np.abs(np.frombuffer(b, np.float16)) < 2.0**-13)) for b in data)
        new, a = best(scale_by_power_of_two, data, args.repeat)
        old, b = best(float64_round_trip, data, args.repeat)
        assert a == b, "the two ways disagree"
        values = sum(len(d) for d in data) // 2
        rows.append([name, f"{size:.0f}", f"{small / values:.1%}", f"{old:.3f}", f"{new:.3f}", f"{old / new:.2f}x"])
    print(f"power-of-two scaling (x0.5) of float16 up-factors, best of {args.repeat}")
    print(table(rows, ["factors", "MB", "values redone", "float64 round trip s", "loratools s", "speed-up"]))


if __name__ == "__main__":
    main()
