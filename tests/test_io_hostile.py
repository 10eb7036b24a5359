"""Hostile and malformed safetensors files: each gets one exact HeaderError message, and nothing else escapes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools.errors import HeaderError
from loratools.io.reader import SafetensorsFile, read_header


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def build(header, data: bytes = b"", length: int | None = None) -> bytes:
    """File bytes: a dict/list is dumped as JSON, a str or bytes is used verbatim; ``length`` overrides N."""
    body = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    body = body.encode("utf-8") if isinstance(body, str) else body
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def header_error(tmp_path, content: bytes) -> HeaderError:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(HeaderError) as err:
        read_header(path)
    assert err.value.path == str(path)
    return err.value


def message(tmp_path, header, data: bytes = b"", length: int | None = None) -> str:
    return header_error(tmp_path, build(header, data, length)).message


def test_empty_file(tmp_path):
    assert header_error(tmp_path, b"").message == "empty file"


def test_five_byte_file(tmp_path):
    assert header_error(tmp_path, b"\x01\x00\x00\x00\x00").message == (
        "file too short for a safetensors header (5 bytes)"
    )


def test_header_length_past_end_of_file(tmp_path):
    assert message(tmp_path, "{}", length=1000) == "header length 1000 runs past the end of the file (10 bytes)"


def test_header_length_zero(tmp_path):
    assert message(tmp_path, "{}", length=0) == "header length is zero"


def test_header_too_large(tmp_path):
    assert message(tmp_path, "{}", length=100_000_001) == "header too large (100000001 bytes; the limit is 100000000)"


def test_header_length_with_top_bit_set(tmp_path):
    assert message(tmp_path, "{}", length=2**64 - 1) == (
        f"header too large ({2**64 - 1} bytes; the limit is 100000000)"
    )


def test_invalid_utf8(tmp_path):
    assert message(tmp_path, b'{"\xff": 1}') == "header is not valid utf-8 (byte 2)"


def test_invalid_json(tmp_path):
    assert message(tmp_path, '{"a": ') == "header is not valid json (line 1, column 7)"


def test_json_padding_with_nul_bytes(tmp_path):
    assert message(tmp_path, "{}\x00\x00") == "header is not valid json (line 1, column 3)"


def test_integer_too_long_for_python(tmp_path):
    header = '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 0]}}'
    assert message(tmp_path, header) == "header is not valid json"


def test_deeply_nested_json(tmp_path):
    assert message(tmp_path, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}") == "header is not valid json"


def test_json_array_instead_of_object(tmp_path):
    assert message(tmp_path, [1, 2]) == "header is not a json object"


def test_duplicate_keys(tmp_path):
    header = '{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}'
    assert message(tmp_path, header, b"x") == "duplicate key 'a' in header"


def test_duplicate_keys_inside_an_entry(tmp_path):
    header = '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    assert message(tmp_path, header, b"x") == "duplicate key 'dtype' in header"


def test_metadata_with_non_string_value(tmp_path):
    assert message(tmp_path, {"__metadata__": {"rank": 4}}) == "__metadata__ value for 'rank' is not a string"


def test_metadata_not_an_object(tmp_path):
    assert message(tmp_path, {"__metadata__": ["x"]}) == "__metadata__ is not an object"


def test_lone_surrogate_in_name(tmp_path):
    header = '{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    assert message(tmp_path, header, b"x") == "header has a tensor name that is not valid text"


def test_control_characters_in_a_name_are_escaped(tmp_path):
    assert message(tmp_path, {"a\nb": 1}) == "tensor 'a\\nb': entry is not an object"


def test_entry_not_an_object(tmp_path):
    assert message(tmp_path, {"a": [0, 1]}) == "tensor 'a': entry is not an object"


def test_missing_field(tmp_path):
    assert message(tmp_path, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)) == "tensor 'a': missing 'data_offsets'"


def test_unknown_dtype(tmp_path):
    assert message(tmp_path, {"a": entry(dtype="F7")}, bytes(8)) == "tensor 'a': unknown dtype 'F7'"


def test_dtype_not_a_string(tmp_path):
    assert message(tmp_path, {"a": entry(dtype=4)}, bytes(8)) == "tensor 'a': unknown dtype of the wrong type"


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], ["2"], None, 2, [0, 2**64]])
def test_bad_shape_entries(tmp_path, shape):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    assert message(tmp_path, header, bytes(8)) == "tensor 'a': shape is not a list of non-negative integers"


@pytest.mark.parametrize("offsets", [[0], [0, 8, 8], [-1, 7], [0, 8.0], [False, 8], "0,8"])
def test_malformed_data_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}
    assert message(tmp_path, header, bytes(8)) == "tensor 'a': data_offsets is not a pair of non-negative integers"


def test_negative_zero_offset(tmp_path):
    header = '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}'
    assert message(tmp_path, header, bytes(8)) == "tensor 'a': data_offsets is not a pair of non-negative integers"


def test_data_offsets_out_of_range(tmp_path):
    assert message(tmp_path, {"a": entry(offsets=(4, 12))}, bytes(8)) == (
        "tensor 'a': data_offsets end 12 is past the data region (8 bytes)"
    )


def test_data_offsets_begin_after_end(tmp_path):
    assert message(tmp_path, {"a": entry(offsets=(8, 0))}, bytes(8)) == (
        "tensor 'a': data_offsets begin 8 is after end 0"
    )


def test_span_differs_from_shape_and_dtype(tmp_path):
    assert message(tmp_path, {"a": entry(shape=(3,), offsets=(0, 8))}, bytes(8)) == (
        "tensor 'a': data_offsets span 8 bytes but F32 [3] needs 12"
    )


def test_astronomical_shape(tmp_path):
    assert message(tmp_path, {"a": entry(shape=(2**40, 2**40))}, bytes(8)) == (
        f"tensor 'a': data_offsets span 8 bytes but F32 [{2**40}, {2**40}] needs more than 2**64"
    )


def test_overlapping_tensors(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    assert message(tmp_path, header, bytes(12)) == "tensors 'a' and 'b' overlap"


def test_empty_tensor_inside_another(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(shape=(0,), offsets=(4, 4))}
    assert message(tmp_path, header, bytes(8)) == "tensors 'a' and 'b' overlap"


def test_hole_between_tensors(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}
    assert message(tmp_path, header, bytes(20)) == "data region has a hole at bytes 8-12"


def test_hole_at_the_start(tmp_path):
    assert message(tmp_path, {"a": entry(offsets=(4, 12))}, bytes(12)) == "data region has a hole at bytes 0-4"


def test_trailing_bytes(tmp_path):
    assert message(tmp_path, {"a": entry()}, bytes(12)) == "data region has 4 trailing bytes after the last tensor"


def test_a_directory(tmp_path):
    with pytest.raises(HeaderError) as err:
        read_header(tmp_path)
    assert err.value.message == "is a directory, not a file"


def test_a_missing_file(tmp_path):
    with pytest.raises(HeaderError) as err:
        read_header(tmp_path / "nope.safetensors")
    assert err.value.message == "file not found"


def test_file_cut_short_after_opening(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(build({"a": entry()}, bytes(8)))
    with SafetensorsFile(path) as f:
        with open(path, "r+b") as handle:
            handle.truncate(10)
        with pytest.raises(HeaderError) as err:
            f.numpy("a")
    assert err.value.message == "file changed after its header was read"


def test_valid_edge_cases_are_accepted(tmp_path):
    """What the reference reader accepts, we accept: null metadata, extra fields, leading spaces, no tensors."""
    for header, data in [
        ({"__metadata__": None, "a": {**entry(shape=(), offsets=(0, 4)), "extra": 1}}, bytes(4)),
        (" " + json.dumps({"a": entry(shape=(0, 3), offsets=(0, 0))}) + "   ", b""),
        ({}, b""),
    ]:
        path = tmp_path / "ok.safetensors"
        path.write_bytes(build(header, data))
        read_header(path)


# --- property tests: whatever the bytes, read_header returns a Header or raises HeaderError ---------------------

VALID = {
    "__metadata__": {"format": "pt", "ss_network_dim": "4"},
    "w.lora_down.weight": entry("F16", (4, 8), (0, 64)),
    "w.lora_up.weight": entry("BF16", (8, 4), (64, 128)),
    "w.alpha": entry("F32", (), (128, 132)),
}
VALID_BODY = json.dumps(VALID).encode()
VALID_DATA = bytes(range(132))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def only_header_errors(tmp_path, content: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    try:
        header = read_header(path)
    except HeaderError as e:
        assert "\n" not in e.message and e.message
        return
    covered = sum(t.end - t.begin for t in header.tensors.values())
    assert covered == header.file_size - header.data_start


@HYPOTHESIS
@given(content=st.binary(max_size=300))
def test_random_bytes(tmp_path, content):
    only_header_errors(tmp_path, content)


@HYPOTHESIS
@given(body=st.binary(max_size=200), data=st.binary(max_size=40))
def test_random_header_with_correct_length(tmp_path, body, data):
    only_header_errors(tmp_path, build(body, data))


@HYPOTHESIS
@given(edits=st.lists(st.tuples(st.sampled_from("flip insert delete"), st.integers(0, 10**6), st.integers(0, 255)),
                      min_size=1, max_size=4), data_cut=st.integers(0, 8))  # fmt: skip
def test_mutated_valid_header(tmp_path, edits, data_cut):
    body = bytearray(VALID_BODY)
    for op, where, value in edits:
        where %= len(body) + (op == "insert")
        if op == "flip" and body:
            body[where % len(body)] ^= value or 1
        elif op == "insert":
            body.insert(where, value)
        elif body:
            del body[where % len(body)]
    only_header_errors(tmp_path, build(bytes(body), VALID_DATA[: len(VALID_DATA) - data_cut]))


FIELDS = [("w.alpha",), ("w.alpha", "dtype"), ("w.alpha", "shape"), ("w.alpha", "data_offsets"),
          ("w.lora_up.weight", "data_offsets"), ("__metadata__",), ("__metadata__", "format")]  # fmt: skip


@HYPOTHESIS
@given(field=st.sampled_from(FIELDS), value=json_values | st.integers() | st.lists(st.integers(), max_size=3))
def test_random_json_values_in_each_field(tmp_path, field, value):
    header = json.loads(VALID_BODY)
    target = header
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    only_header_errors(tmp_path, build(header, VALID_DATA))
