"""Property: a LoRA file with arbitrary header entries and arbitrary numbers gets, from inspect (with --stats),
convert to every target, resize and merge, either a result whose written tensors are all finite or a
LoraToolsError: never another exception, never a hang (each call has a deadline).

Files are written with the project's writer from raw bytes, so any dtype can hold anything: NaN, Inf, huge,
subnormal, negative, zero or random bit patterns; alphas of odd shapes and dtypes; factors whose ranks or sides
do not agree, empty factors, LoHa and LoKr modules, and keys no format knows.
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loratools
from loratools.errors import LoraToolsError
from loratools.io.header import DTYPE_SIZES
from loratools.io.reader import SafetensorsFile
from loratools.io.writer import write_safetensors

META = {"ss_base_model_version": "sd_v1"}
SECONDS_PER_CALL = 30
# Rows of values worth a try in a tensor: ordinary ones and every edge a float has.
SPECIAL = [0.0, -0.0, 1.0, -3.5, 1e-30, 6.5e4, 7e4, 1e30, 3e38, 1e39, -1e300, math.inf, -math.inf, math.nan]
FLOATS = ["F16", "BF16", "F32", "F64"]


class Stuck(BaseException):
    """A call that did not return in time (a BaseException: no handler in the code under test may take it)."""


@contextmanager
def deadline(seconds: int):
    def stuck(*_):
        raise Stuck(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """``values`` (float64) stored as ``dtype``, rounding as a cast does (overflow to Inf included)."""
    if not values.size:
        return b""
    if dtype in ("BF16", "F8_E4M3"):
        import torch

        with np.errstate(over="ignore"):
            wide = values.astype(np.float32)
        t = torch.from_numpy(wide).to(torch.bfloat16 if dtype == "BF16" else torch.float8_e4m3fn)
        return t.view(torch.uint8).numpy().tobytes()
    numpy_type = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "U8": np.uint8}[dtype]
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.issubdtype(numpy_type, np.floating):
            values = np.nan_to_num(values, posinf=1e9, neginf=-1e9).clip(-1e9, 1e9)
        return values.astype(numpy_type).astype(np.dtype(numpy_type).newbyteorder("<")).tobytes()


@st.composite
def tensor(draw, shape):
    """(dtype, shape, bytes) of a factor: mostly a float dtype, with ordinary, special, zero or random contents."""
    dtype = draw(st.sampled_from(FLOATS * 3 + ["F8_E4M3", "I32", "U8"]))
    fill = draw(st.sampled_from(["normal"] * 4 + ["special", "zero", "bits", "scaled", "scaled"]))
    n = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if fill == "bits":
        return dtype, shape, rng.bytes(n * DTYPE_SIZES[dtype])
    values = np.zeros(n) if fill == "zero" else rng.standard_normal(n)
    if fill == "scaled":
        values *= draw(st.sampled_from(SPECIAL))
    if fill == "special" and n:
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
    return dtype, shape, encode(values, dtype)


@st.composite
def alpha(draw):
    """An .alpha entry: usually one number in a float, sometimes another dtype, shape or none at all."""
    shape = draw(st.sampled_from([()] * 12 + [(1,), (1, 1), (2,), (0,)]))
    dtype = draw(st.sampled_from(["F32", "F32", "F16", "BF16", "F64", "I32"]))
    value = draw(st.one_of(st.sampled_from(SPECIAL), st.floats(-64, 64), st.integers(-8, 8).map(float)))
    return dtype, shape, encode(np.full(math.prod(shape), value), dtype)


@st.composite
def module(draw, stem: str) -> dict:
    # Each defect now and then (a whole file is refused for one), so that most files reach the arithmetic.
    kind = draw(st.sampled_from(["lora"] * 12 + ["loha", "loha", "lokr", "lokr"]))
    rank = draw(st.sampled_from([1, 2, 3] * 5 + [0]))
    other = draw(st.sampled_from([rank] * 15 + [rank + 1]))  # a rank that does not agree
    side = draw(st.sampled_from([8] * 15 + [9]))  # a side that does not
    entries = {}
    if kind == "lora":
        entries[f"{stem}.lora_down.weight"] = draw(tensor((rank, 8)))
        entries[f"{stem}.lora_up.weight"] = draw(tensor((side, other)))
    elif kind == "loha":
        for w in ("w1", "w2"):
            entries[f"{stem}.hada_{w}_a"] = draw(tensor((side, rank)))
            entries[f"{stem}.hada_{w}_b"] = draw(tensor((other, 8)))
    else:  # ΔW = kron(w1, w2): (2·4) x (2·4) = 8 x 8, or 9 x 8 when a side does not agree
        entries[f"{stem}.lokr_w1"] = draw(tensor((2, 2)))
        entries[f"{stem}.lokr_w2"] = draw(tensor((4 if side == 8 else 5, 4)))
    if draw(st.booleans()):
        entries[f"{stem}.alpha"] = draw(alpha())
    if draw(st.integers(0, 9)) == 0:
        extra = draw(st.sampled_from(["lora_mid.weight", "dora_scale", "diff_b", "unknown"]))
        entries[f"{stem}.{extra}"] = draw(tensor((8,) if extra == "diff_b" else (side, 1)))
    return entries


@st.composite
def lora_file(draw) -> dict:
    entries = {}
    for i in range(draw(st.integers(1, 2))):
        entries.update(draw(module(f"lora_unet_down_blocks_0_attentions_{i}_proj_in")))
    if draw(st.integers(0, 9)) == 0:
        entries["some_key_no_format_knows"] = draw(tensor((2,)))
    return entries


def _written_finite(path) -> None:
    """Every float tensor in every file the call wrote is finite."""
    path = Path(path)
    for f in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        with SafetensorsFile(f) as sf:
            for name in sf.keys():
                values = sf.numpy(name)
                if np.issubdtype(values.dtype, np.floating):
                    assert np.isfinite(values).all(), f"{f.name}: {name} holds NaN or Inf"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(entries=lora_file())
def test_any_file_gives_a_finite_result_or_the_error_root(tmp_path, entries):
    src = tmp_path / "case.safetensors"
    write_safetensors(src, [(name, *entry) for name, entry in entries.items()], META, overwrite=True)
    calls = {"inspect": lambda: loratools.inspect(src, stats=True, layers=True),
             **{f"convert {to}": lambda to=to: loratools.convert(src, to, tmp_path / f"out.{to}", family="sd1",
                                                               overwrite=True).output
                for to in ("kohya", "diffusers", "peft", "comfy")},
             "resize": lambda: loratools.save(loratools.resize(src, rank=1, lossy_rank=2)[0],
                                              tmp_path / "r.safetensors", family="sd1", overwrite=True).output,
             "merge": lambda: loratools.save(loratools.merge([src, (src, -0.5)], lossy_rank=2)[0],
                                             tmp_path / "m.safetensors", family="sd1", overwrite=True).output}
    for what, call in calls.items():
        try:
            with deadline(SECONDS_PER_CALL):
                result = call()
        except LoraToolsError:
            continue
        if what != "inspect":
            _written_finite(result)
