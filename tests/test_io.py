"""Round trips between our safetensors reader/writer (io.header, io.reader, io.writer, io.spans) and the reference library, and pickled checkpoints."""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from loratools.errors import HeaderError, LoraToolsError, UnsafeFileError
from loratools.io.pickled import REFUSED, is_pickle_path, load_pickled
from loratools.io import spans as spans_mod
from loratools.io import writer as writer_mod
from loratools.io.arrays import float32_to_bf16_bits, numpy_to_bf16_bytes
from loratools.io.reader import DTYPE_SIZES, TORCH_DTYPES, SafetensorsFile, read_header
from loratools.io.writer import write_safetensors

FLOAT8 = ("F8_E4M3", "F8_E5M2", "F8_E8M0")


def sample(dtype: str, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    """A tensor of the given safetensors dtype with varied values."""
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    gen = torch.Generator().manual_seed(0)
    if dtype == "BOOL":
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype[0] in "UI":
        low = 0 if dtype[0] == "U" else -100
        return torch.randint(low, 100, shape, generator=gen).to(torch_dtype)
    values = torch.randn(shape, generator=gen) * 4
    return (values.abs() if dtype == "F8_E8M0" else values).to(torch_dtype)


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def as_float_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype.is_floating_point and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
        return tensor.to(torch.float32).numpy()
    return tensor.numpy()


@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
def test_our_file_loads_in_reference_library(tmp_path, dtype):
    tensor = sample(dtype)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [("t", dtype, tuple(tensor.shape), tensor)])
    loaded = safetensors.torch.load_file(path)["t"]
    assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
    assert as_bytes(loaded) == as_bytes(tensor)
    with SafetensorsFile(path) as f:
        assert as_bytes(f.torch("t")) == as_bytes(tensor) and f.torch("t").dtype == tensor.dtype
        np.testing.assert_array_equal(f.numpy("t"), as_float_numpy(tensor))


def test_reference_file_reads_with_our_reader(tmp_path):
    tensors = {f"t_{dtype}": sample(dtype, (2, 3)) for dtype in DTYPE_SIZES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"ss_network_dim": "4", "name": "ünïcode"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"ss_network_dim": "4", "name": "ünïcode"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert f.info(name).shape == tuple(tensor.shape)
            assert f.torch(name).dtype == tensor.dtype
            assert as_bytes(f.torch(name)) == as_bytes(tensor)


def test_twin_reads_through_a_descriptor_of_its_own(tmp_path):
    a, b = torch.arange(12.0).reshape(3, 4), torch.ones(5, dtype=torch.float16)
    write_safetensors(tmp_path / "t.safetensors", [("a", "F32", (3, 4), a), ("b", "F16", (5,), b)], {"k": "v"})
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        twin = f.twin()
        assert twin.fileno() != f.fileno() and twin.header is f.header and twin.metadata == {"k": "v"}
        assert torch.equal(twin.torch("a"), a) and torch.equal(f.torch("b"), b)
        twin.close()
        assert torch.equal(f.torch("a"), a)  # closing the twin leaves the original open


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    metadata = {"format": "pt", "json": json.dumps({"a": [1, 2]}), "empty": ""}
    write_safetensors(path, [("a", "F32", (1,), np.ones(1, np.float32))], metadata)
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == metadata
    assert read_header(path).metadata == metadata


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(LoraToolsError) as err:
        write_safetensors(tmp_path / "m.safetensors", [], {"rank": 4})
    assert err.value.message == "metadata must map strings to strings"


@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_decodes_every_code(tmp_path, dtype):
    codes = np.arange(256, dtype=np.uint8)
    path = tmp_path / "f8.safetensors"
    write_safetensors(path, [("t", dtype, (16, 16), codes.tobytes())])
    expected = torch.from_numpy(codes).view(getattr(torch, TORCH_DTYPES[dtype])).to(torch.float32).numpy()
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.numpy("t").reshape(-1), expected)


def test_bf16_decodes_every_code(tmp_path):
    codes = np.arange(65536, dtype=np.uint32).astype("<u2")
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, [("t", "BF16", (256, 256), codes)])
    expected = torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.numpy("t").reshape(-1), expected)


def test_bf16_encoding_rounds_like_torch():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = np.concatenate([values[np.isfinite(values)], [0.0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8]])
    expected = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(float32_to_bf16_bits(values).view(np.int16), expected)
    nan = float32_to_bf16_bits(np.array([np.nan, -np.nan, np.float32(np.uint32(0x7FFFFFFF).view(np.float32))]))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()
    assert numpy_to_bf16_bytes(np.array([1.0, -2.0])) == b"\x80\x3f\x00\xc0"


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)])
def test_scalar_and_empty_tensors(tmp_path, shape):
    path = tmp_path / "e.safetensors"
    array = np.full(shape, 1.5, dtype=np.float32)
    write_safetensors(path, [("a", "F32", shape, array), ("b", "F16", shape, torch.full(shape, 2.0).half())])
    loaded = safetensors.torch.load_file(path)
    assert loaded["a"].shape == shape and loaded["b"].dtype == torch.float16
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.numpy("a"), array)
        assert f.torch("b").shape == shape


def test_callables_are_called_one_at_a_time_in_order(tmp_path):
    calls = []

    def producer(i):
        def make():
            calls.append(i)
            return np.full((2, 2), i, dtype=np.float32)

        return make

    path = tmp_path / "c.safetensors"
    write_safetensors(path, [(f"t{i}", "F32", (2, 2), producer(i)) for i in range(4)])
    assert calls == [0, 1, 2, 3]
    loaded = safetensors.torch.load_file(path)
    assert [float(loaded[f"t{i}"][0, 0]) for i in range(4)] == [0, 1, 2, 3]


def test_accepts_big_endian_arrays_memoryviews_and_noncontiguous_tensors(tmp_path):
    path = tmp_path / "d.safetensors"
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    items = [("big", "F32", (2, 3), big), ("mv", "U8", (3,), memoryview(b"abc")), ("t", "F32", (3, 2), transposed)]
    write_safetensors(path, items)
    loaded = safetensors.torch.load_file(path)
    assert loaded["big"].tolist() == big.tolist()
    assert bytes(loaded["mv"].numpy()) == b"abc"
    assert torch.equal(loaded["t"], transposed)


def test_data_region_is_8_aligned(tmp_path):
    for name in ("a", "ab", "abc" * 7):
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, [(name, "F64", (3,), np.arange(3.0))], {"k": "v" * len(name)})
        assert read_header(path).data_start % 8 == 0
        assert safetensors.torch.load_file(path)[name].tolist() == [0.0, 1.0, 2.0]


def test_size_mismatch_names_the_tensor_and_leaves_nothing(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(LoraToolsError) as err:
        write_safetensors(path, [("ok", "U8", (1,), b"x"), ("bad", "F32", (2, 2), np.zeros(3, np.float32))])
    assert err.value.message == "cannot write tensor 'bad': got 12 bytes, F32 [2, 2] needs 16"
    assert err.value.path == str(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_file(tmp_path, error):
    def fail():
        raise error

    items = [("a", "F32", (2,), np.zeros(2, np.float32)), ("b", "F32", (2,), fail)]
    with pytest.raises(type(error)):
        write_safetensors(tmp_path / "x.safetensors", items)
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_without_overwrite(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(LoraToolsError) as err:
        write_safetensors(path, [("a", "U8", (1,), b"z")])
    assert err.value.message == "output exists; pass --overwrite to replace it"
    assert path.read_bytes() == b"keep me"
    write_safetensors(path, [("a", "U8", (1,), b"z")], overwrite=True)
    assert read_header(path).tensors["a"].shape == (1,)
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def test_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(LoraToolsError) as err:
        write_safetensors(tmp_path, [], overwrite=True)
    assert err.value.message == "output is a directory"


def test_output_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "p.safetensors"
    write_safetensors(path, [])
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def _source_file(tmp_path) -> tuple[SafetensorsFile, dict[str, bytes]]:
    tensors = {"a": sample("F16", (64, 48)), "b": sample("BF16", (3, 5)), "c": sample("F32", (7,))}
    path = tmp_path / "src.safetensors"
    safetensors.torch.save_file(tensors, path)
    return SafetensorsFile(path), {k: as_bytes(v) for k, v in tensors.items()}


@pytest.mark.parametrize("kernel_copy", ["used", "refused", "missing"])
def test_spans_are_copied_file_to_file(tmp_path, monkeypatch, kernel_copy):
    monkeypatch.setattr(writer_mod, "_WHOLE", 0)  # the streaming writer, as for files over 32 MiB
    calls = []

    def refuse(*_args):
        raise OSError(errno.EXDEV, "cross-device")

    def counted(*args):
        calls.append(args[2])
        return os.copy_file_range(*args)

    monkeypatch.setattr(spans_mod, "_copy_file_range", {"refused": refuse, "missing": None}.get(kernel_copy, counted))
    monkeypatch.setattr(spans_mod.mmap, "PAGESIZE", 2)  # every even offset pair counts as aligned: the kernel path
    src, raw = _source_file(tmp_path)
    row = 48 * 2
    items = [
        ("whole", "F16", (64, 48), src.spans("a", [(0, 64 * row)])),
        ("alpha", "F32", (), struct.pack("<f", 8.0)),  # small pieces are gathered between copies
        ("rows", "F16", (10, 48), lambda: src.spans("a", [(5 * row, 15 * row)])),
        ("next", "F16", (5, 48), lambda: src.spans("a", [(15 * row, 20 * row)])),  # continues "rows"
        ("swapped", "F16", (4, 48), src.spans("a", [(2 * row, 4 * row), (0, 2 * row)])),
        ("b", "BF16", (3, 5), src.spans("b", [(0, 30)])),
        ("c", "F32", (7,), raw["c"]),
    ]
    out = tmp_path / "out.safetensors"
    write_safetensors(out, items)
    got = safetensors.torch.load_file(out)
    a = torch.frombuffer(bytearray(raw["a"]), dtype=torch.float16).reshape(64, 48)
    assert torch.equal(got["whole"], a)
    assert torch.equal(got["rows"], a[5:15]) and torch.equal(got["next"], a[15:20])
    assert torch.equal(got["swapped"], torch.cat([a[2:4], a[0:2]]))
    assert as_bytes(got["b"]) == raw["b"] and as_bytes(got["c"]) == raw["c"]
    assert got["alpha"].item() == 8.0
    if kernel_copy == "used":  # spans that continue each other in the source are copied in one call
        assert sorted(calls) == sorted([64 * row, 15 * row, 2 * row, 2 * row, 30])
    else:
        assert calls == []
    src.close()


def test_copies_follow_their_source_order_and_page(tmp_path, monkeypatch):
    """Spans given in any order are laid out in source order behind the other tensors, copied in one piece,
    at the same place within a page as in the source; the header keeps the names in the given order."""
    monkeypatch.setattr(writer_mod, "_WHOLE", 0)  # the streaming writer, as for files over 32 MiB
    calls = []
    monkeypatch.setattr(spans_mod, "_copy_file_range", lambda *a: (calls.append(a), os.copy_file_range(*a))[1])
    src, raw = _source_file(tmp_path)
    infos = src.header.tensors
    items = [("alpha", "F64", (), struct.pack("<d", 4.0))]  # 8 bytes: the data region stays 8-aligned
    items += [(f"out.{n}", infos[n].dtype, infos[n].shape, src.spans(n, [(0, infos[n].nbytes)]))
              for n in reversed(list(infos))]
    out = tmp_path / "out.safetensors"
    write_safetensors(out, items, group_copies=True)
    header = read_header(out)
    assert list(header.tensors) == [name for name, *_ in items]
    assert len(calls) == 1 and calls[0][2] == sum(i.nbytes for i in infos.values())
    first = min(infos.values(), key=lambda i: i.begin)
    assert (header.data_start + header.tensors["out." + first.name].begin) % mmap.PAGESIZE == \
        (src.header.data_start + first.begin) % mmap.PAGESIZE
    assert header.data_start % 8 == 0
    got = safetensors.torch.load_file(out)
    assert all(as_bytes(got["out." + n]) == raw[n] for n in raw) and got["alpha"].item() == 4.0
    src.close()


def test_large_files_place_copies_like_their_source_within_the_copy_unit(tmp_path, monkeypatch):
    """In a large output the first copied span sits at the same offset modulo the copy unit as in its source (the
    kernel copies such ranges fastest); the copy is then one call."""
    monkeypatch.setattr(writer_mod, "_WHOLE", 0)  # the streaming writer, as for files over 32 MiB
    calls = []
    monkeypatch.setattr(spans_mod, "_copy_file_range", lambda *a: (calls.append(a), os.copy_file_range(*a))[1])
    monkeypatch.setattr(writer_mod, "_COPY_UNIT", 8192)
    monkeypatch.setattr(writer_mod, "_LARGE_FILE", 1)
    values = torch.arange(30_000, dtype=torch.float32)
    safetensors.torch.save_file({"x": values}, tmp_path / "src.safetensors")
    src = SafetensorsFile(tmp_path / "src.safetensors")
    out = tmp_path / "out.safetensors"
    items = [("alpha", "F64", (), struct.pack("<d", 1.0)), ("x", "F32", (30_000,), src.spans("x", [(0, 120_000)]))]
    write_safetensors(out, items, group_copies=True)
    header = read_header(out)
    assert (header.data_start + header.tensors["x"].begin) % 8192 == src.header.data_start % 8192
    assert [c[2] for c in calls] == [120_000]
    assert torch.equal(safetensors.torch.load_file(out)["x"], values)
    src.close()


@pytest.mark.parametrize("group_copies", [False, True])
def test_small_files_assembled_in_memory_match_the_streaming_writer(tmp_path, monkeypatch, group_copies):
    """Spans (whole, rows, continuing, swapped, of two tensors), bytes, arrays and producers, in any order: a file
    assembled in memory is byte for byte the file the streaming writer makes."""
    src, raw = _source_file(tmp_path)
    row = 48 * 2
    items = [
        ("alpha", "F32", (), struct.pack("<f", 8.0)),
        ("rows", "F16", (10, 48), lambda: src.spans("a", [(5 * row, 15 * row)])),
        ("next", "F16", (5, 48), src.spans("a", [(15 * row, 20 * row)])),
        ("computed", "F32", (3,), lambda: np.arange(3, dtype=np.float32)),
        ("swapped", "F16", (4, 48), src.spans("a", [(2 * row, 4 * row), (0, 2 * row)])),
        ("b", "BF16", (3, 5), src.spans("b", [(0, 30)])),
        ("whole", "F16", (64, 48), src.spans("a", [(0, 64 * row)])),
        ("c", "F32", (7,), raw["c"]),
    ]
    files = {}
    for name, whole in (("assembled", 32 << 20), ("streamed", 0)):
        monkeypatch.setattr(writer_mod, "_WHOLE", whole)
        files[name] = tmp_path / f"{name}.safetensors"
        write_safetensors(files[name], items, {"k": "v"}, group_copies=group_copies, finite=True)
    assert files["assembled"].read_bytes() == files["streamed"].read_bytes()
    got = safetensors.torch.load_file(files["assembled"])
    a = torch.frombuffer(bytearray(raw["a"]), dtype=torch.float16).reshape(64, 48)
    assert torch.equal(got["rows"], a[5:15]) and torch.equal(got["swapped"], torch.cat([a[2:4], a[0:2]]))
    src.close()


@pytest.mark.parametrize("path", ["kernel copy", "copy through memory", "assembled"])
def test_source_cut_short_while_copying_is_a_clean_error(tmp_path, monkeypatch, path):
    monkeypatch.setattr(spans_mod.mmap, "PAGESIZE", 2)
    if path != "assembled":
        monkeypatch.setattr(writer_mod, "_WHOLE", 0)
    if path == "copy through memory":
        monkeypatch.setattr(spans_mod, "_copy_file_range", None)
    src, _ = _source_file(tmp_path)
    os.truncate(src.path, src.header.file_size - 100)  # after its header was read
    with pytest.raises(HeaderError) as err:
        write_safetensors(tmp_path / "out.safetensors", [("a", "F16", (64, 48), src.spans("a", [(0, 6144)]))])
    assert err.value.message == "file changed after its header was read" and err.value.path == src.path
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]
    src.close()


@pytest.mark.parametrize("order", ["copies first", "computed first", "interleaved"])
def test_copies_beside_computed_tensors(tmp_path, order):
    """Copied tensors and computed ones, in any order: every tensor lands at its place in the given layout."""
    src, raw = _source_file(tmp_path)
    copies = [(k, dtype, shape, src.spans(k, [(0, len(raw[k]))]))
              for k, dtype, shape in (("a", "F16", (64, 48)), ("b", "BF16", (3, 5)), ("c", "F32", (7,)))]
    computed = [(f"new{i}", "U8", (300_000,), lambda i=i: bytes([i]) * 300_000) for i in range(3)]
    items = {"copies first": copies + computed, "computed first": computed + copies,
             "interleaved": [x for pair in zip(copies, computed) for x in pair]}[order]
    out = tmp_path / "out.safetensors"
    write_safetensors(out, items)
    with SafetensorsFile(out) as f:
        assert [k for k in f.keys()] == [it[0] for it in items]
        for k in raw:
            assert bytes(f.raw(k)) == raw[k]
        for i in range(3):
            assert bytes(f.raw(f"new{i}")) == bytes([i]) * 300_000
    src.close()


@pytest.mark.parametrize("failing", ["copy", "computed"])
def test_a_failure_in_a_copy_or_a_computed_tensor_leaves_nothing(tmp_path, failing):
    src, raw = _source_file(tmp_path)
    copies = [("a", "F16", (64, 48), src.spans("a", [(0, len(raw["a"]))]))]

    def broken():
        raise LoraToolsError("no such factor")

    computed = [("x", "U8", (10,), broken if failing == "computed" else b"0123456789")]
    if failing == "copy":
        os.truncate(src.path, src.header.file_size - 100)
    with pytest.raises(LoraToolsError) as err:
        write_safetensors(tmp_path / "out.safetensors", copies + computed)
    want = "file changed after its header was read" if failing == "copy" else "no such factor"
    assert err.value.message == want
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]
    src.close()


def test_spans_outside_the_tensor_or_of_the_wrong_size_are_refused(tmp_path):
    src, _ = _source_file(tmp_path)
    with pytest.raises(ValueError, match="outside tensor"):
        src.spans("b", [(0, 31)])
    with pytest.raises(LoraToolsError, match="got 30 bytes, F16 \\[16\\] needs 32"):
        write_safetensors(tmp_path / "x.safetensors", [("x", "F16", (16,), src.spans("b", [(0, 30)]))])
    assert not (tmp_path / "x.safetensors").exists()
    src.close()


def test_only_replacing_a_file_syncs_it_by_default(tmp_path, monkeypatch):
    from loratools.io import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [("a", "U8", (1,), b"z")])
    assert synced == []  # a new file: nothing to lose if the machine crashes
    write_safetensors(path, [("a", "U8", (1,), b"y")], overwrite=True)
    assert len(synced) == 2  # the file, then its folder (the rename)
    write_safetensors(tmp_path / "y.safetensors", [("a", "U8", (1,), b"z")], sync=True)
    assert len(synced) == 4
    assert safetensors.torch.load_file(path)["a"].tolist() == [ord("y")]


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("k", [0.5, 2.0, 2.0**-12, 2.0**14, 2.0**-40])
def test_power_of_two_scaling_rounds_like_a_float_multiply(dtype, k):
    """Every bit pattern class (normal, subnormal, zero, inf, NaN, values that leave the range) is scaled to
    exactly what a correctly rounded multiply gives."""
    from loratools.io.arrays import scale_by_power_of_two

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    width = torch.int16 if DTYPE_SIZES[dtype] == 2 else torch.int32
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2 ** (8 * DTYPE_SIZES[dtype]), 100_000, dtype=np.uint64)
    if DTYPE_SIZES[dtype] == 2:
        bits[:65536] = np.arange(65536)  # every 16-bit pattern
    buf = bytearray(bits.astype(f"<u{DTYPE_SIZES[dtype]}").tobytes())
    original = torch.frombuffer(bytearray(buf), dtype=torch_dtype)
    assert scale_by_power_of_two(buf, dtype, k)
    got = torch.frombuffer(buf, dtype=torch_dtype)
    want = (original.double() * k).to(torch_dtype)
    same = got.view(width) == want.view(width)
    assert bool((same | (got.isnan() & want.isnan())).all())


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("k", [0.5, 0.25, 4.0])
def test_power_of_two_scaling_of_typical_factors(dtype, k):
    """Factor-like values all stay normal (the bits-only path); one zero among them takes the careful path.
    Both give what a correctly rounded multiply gives."""
    from loratools.io.arrays import scale_by_power_of_two

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    width = torch.int16 if DTYPE_SIZES[dtype] == 2 else torch.int32
    values = torch.randn(64, 320, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.02
    for zero in (False, True):
        original = values.to(torch_dtype).flatten()
        if zero:
            original[17] = 0.0
        buf = bytearray(original.view(width).numpy().tobytes())
        assert scale_by_power_of_two(buf, dtype, k)
        got = torch.frombuffer(buf, dtype=torch_dtype)
        want = (original.double() * k).to(torch_dtype)
        assert torch.equal(got.view(width), want.view(width))


def test_other_scales_and_dtypes_are_left_alone():
    from loratools.io.arrays import scale_by_power_of_two

    buf = bytearray(struct.pack("<4e", 1, 2, 3, 4))
    assert not scale_by_power_of_two(buf, "F16", 0.3)
    assert not scale_by_power_of_two(buf, "I16", 0.5)
    assert not scale_by_power_of_two(buf, "F16", 0.0)
    assert buf == bytearray(struct.pack("<4e", 1, 2, 3, 4))


def test_read_header_does_not_read_data(tmp_path):
    huge = [1024, 1024, 1024]  # 4 GiB of F32 per tensor, never written: the file is sparse
    header = {"a": {"dtype": "F32", "shape": huge, "data_offsets": [0, 4 * 2**30]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [4 * 2**30, 4 * 2**30 + 4]}}  # fmt: skip
    body = json.dumps(header).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + 4 * 2**30 + 4)
    tracemalloc.start()
    parsed = read_header(path)
    with SafetensorsFile(path) as f:
        tail = f.numpy("b")
        assert tail.tolist() == [0, 0, 0, 0] and not tail.flags.writeable
        del tail
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000
    assert parsed.tensors["a"].nbytes == 4 * 2**30 and parsed.data_start == 8 + len(body)


def test_reader_interface(tmp_path):
    path = tmp_path / "r.safetensors"
    write_safetensors(path, [("w", "F32", (2, 2), np.eye(2, dtype=np.float32))])
    f = SafetensorsFile(path)
    info = f.info("w")
    assert (info.dtype, info.shape, info.begin, info.end, info.numel, info.nbytes) == ("F32", (2, 2), 0, 16, 4, 16)
    assert bytes(f.raw("w")) == np.eye(2, dtype=np.float32).tobytes()
    view = f.numpy("w")  # still alive while the file closes
    copy = f.torch("w")
    f.close()
    assert copy.sum().item() == 2.0 and view.sum() == 2.0
    with pytest.raises(LoraToolsError) as err:
        f.info("missing")
    assert err.value.message == "tensor 'missing' not found" and err.value.path == str(path)


def test_module_does_not_import_torch():
    code = ("import loratools.io.header, loratools.io.reader, loratools.io.writer, loratools.io.spans, loratools.io.atomic, "
            "loratools.io.pickled, sys; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- pickled checkpoints ---------------------------------------------------------------------------------------


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_is_pickle_path():
    assert [is_pickle_path(p) for p in ("a.ckpt", "b.PT", "c.pth", "d.bin", "e.safetensors", "f")] == [
        True, True, True, True, False, False]  # fmt: skip


def test_pickle_refused_without_permission(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_pickled(path, allow_pickle=False)
    assert err.value.message == REFUSED == (
        "pickled checkpoint: loading it could run arbitrary code; pass --allow-pickle to load it with "
        "torch.load(weights_only=True), or convert it to .safetensors"
    )


def test_pickle_loaded_with_permission(tmp_path):
    path = tmp_path / "x.ckpt"
    weights = {"down": torch.randn(4, 8), "alpha": torch.tensor(4.0), "up": torch.randn(8, 4).bfloat16()}
    torch.save({"state_dict": {**weights, "epoch": 3, "note": "hi"}}, path)
    with load_pickled(path, allow_pickle=True) as source:
        assert source.metadata == {} and source.keys() == ["down", "alpha", "up"]
        assert sorted(source.skipped) == ["epoch", "note"]
        info = source.info("up")
        assert (info.dtype, info.shape, info.begin, info.end, info.nbytes) == ("BF16", (8, 4), 0, 0, 64)
        np.testing.assert_array_equal(source.numpy("up"), weights["up"].float().numpy())
        assert not source.numpy("down").flags.writeable
        assert bytes(source.raw("alpha")) == struct.pack("<f", 4.0)
        assert torch.equal(source.torch("down"), weights["down"])
        with pytest.raises(LoraToolsError, match="tensor 'nope' not found"):
            source.info("nope")


def test_legacy_pickle_format(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    with load_pickled(path, allow_pickle=True) as source:
        assert source.numpy("a").tolist() == [0.0, 1.0, 2.0]


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1), "b": Exploit(marker)}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_pickled(path, allow_pickle=True)
    assert err.value.message == "pickled checkpoint needs 'posix.system', which weights-only loading refuses"
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused_and_not_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    for protocol, message in [
        (2, "pickled checkpoint needs 'posix.system', which weights-only loading refuses"),
        (4, "pickled checkpoint is damaged or uses pickle features weights-only loading refuses"),
    ]:
        path.write_bytes(pickle.dumps({"a": Exploit(marker)}, protocol=protocol))
        with pytest.raises(UnsafeFileError) as err:
            load_pickled(path, allow_pickle=True)
        assert err.value.message == message
        assert not marker.exists()


@pytest.mark.parametrize(
    "content, error, message",
    [
        (b"", HeaderError, "empty file"),
        (b"\x80\x02garbage", UnsafeFileError,
         "pickled checkpoint is damaged or uses pickle features weights-only loading refuses"),
        ("truncated", HeaderError, "cannot read pickled checkpoint: damaged or not a torch file (RuntimeError)"),
        ("list", HeaderError, "pickled checkpoint is not a dict of tensors"),
    ],
)  # fmt: skip
def test_damaged_pickles(tmp_path, content, error, message):
    path = tmp_path / "x.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "truncated":
        torch.save({"a": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(error) as err:
        load_pickled(path, allow_pickle=True)
    assert err.value.message == message
