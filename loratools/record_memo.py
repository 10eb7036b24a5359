"""Catalogue records without a full ``inspect`` of every file.

The files of one trainer share their structure: the same tensor names, dtypes, shapes and offsets in the same
order, often the same alphas, and metadata that differs only in what a record copies verbatim (dates, names,
tags). Reading the modules, deciding the format and scoring every family depend on that structure alone, so
``RecordMemo`` does them once per structure:

- A header is split into its metadata, which is parsed, and the text of its tensor entries, which is compared: a
  file whose tensor entries are written exactly as those of a header ``read_header`` accepted, with as many data
  bytes, validates the same way, so the strict reader runs only on the first file of each structure. A header
  the split cannot vouch for (metadata not first or not an object of strings, a repeated key, an escape that may
  hide invalid text) and every broken file take ``inspect``'s own path, which says what is wrong.
- The record is then keyed by what the rest of ``inspect`` reads from the file: the bytes of every tensor small
  enough to be read as a value (alphas, IA3's ``on_input``: ``TensorRef.scalar`` reads up to ``SMALL`` values),
  and the metadata that decides something (keys that families claim or pick variants by, the PEFT config
  diffusers stores, textual-inversion tokens). Path, size and metadata are filled in per file.

tests/test_scan.py checks the records against ``inspect`` for files that share a structure and differ in alphas,
metadata and validity.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import struct
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

from loratools.errors import LoraToolsError
from loratools.io.reader import MAX_HEADER_SIZE, read_header

SMALL = 64  # the largest tensor (in values) that TensorRef.scalar reads as a value
PER_FILE = ("path", "size_bytes", "metadata")  # record fields that come from the file, not from its structure
# \\u escapes of surrogates: lone ones are not valid text, which the strict reader refuses in metadata
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


@lru_cache(maxsize=1)
def decisive_metadata_keys() -> tuple[str, ...]:
    """Metadata keys whose values can change a record beyond its metadata field."""
    from loratools.families import load_families
    from loratools.families.detect import CLAIM_KEYS

    families = load_families().values()
    keys = set(CLAIM_KEYS) | {k for f in families for k in f.metadata}
    keys |= {k for f in families for _, rules, _ in f.variants for k in rules}
    keys.add("lora_adapter_metadata")
    return tuple(sorted(keys))


class _Structure:
    """Where the small tensors of a validated header lie, and the records of files with that header's tensors."""

    __slots__ = ("spans", "records")

    def __init__(self, small: list[tuple[int, int]]):
        self.spans = _spans(small)  # the reads that cover every small tensor ((begin, end) in the data region)
        self.records: dict[tuple, bytes] = {}


class _Parsed(NamedTuple):
    header_size: int
    file_size: int
    tensors_text: str  # the header after its metadata: the tensor entries, exactly as written
    metadata: dict


_METADATA_FIRST = '{"__metadata__":'
_JSON_SPACE = " \t\n\r"
_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=tuple)  # pairs, so that a repeated key is seen


def _parse(fd: int) -> _Parsed | None:
    """The header of the open file split into its metadata (parsed) and the text of its tensor entries, or None
    when only the strict reader can say what the file is."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < 10:
        return None
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if not 0 < n <= MAX_HEADER_SIZE or 8 + n > st.st_size:
        return None
    raw = os.pread(fd, n, 8)
    if len(raw) != n or raw[:1] != b"{":
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.startswith(_METADATA_FIRST):  # no metadata (or written elsewhere: the text says it all)
        return _Parsed(n, st.st_size, text.rstrip(_JSON_SPACE), {}) if '"__metadata__"' not in text else None
    try:
        pairs, end = _METADATA_DECODER.raw_decode(text, len(_METADATA_FIRST))
    except (ValueError, RecursionError, MemoryError):
        return None
    if pairs is None:
        return _Parsed(n, st.st_size, text[end:].rstrip(_JSON_SPACE), {})
    if type(pairs) is not tuple:
        return None
    metadata = dict(pairs)
    try:
        "".join(metadata.values())  # every value is text (join refuses anything else)
    except TypeError:
        return None
    if len(metadata) != len(pairs) or (text.find("\\u", 0, end) >= 0 and _SURROGATE.search(text, 0, end)):
        return None  # a repeated key, or a lone surrogate (not valid text)
    # writers pad the header with spaces to align the data, so the padding follows the metadata's length
    return _Parsed(n, st.st_size, text[end:].rstrip(_JSON_SPACE), metadata)


@lru_cache(maxsize=4096)
def _folder_name(folder: str) -> str:
    return str(Path(folder))


def _path_name(path: str) -> str:
    """``str(Path(path))``, the name ``api.load`` gives a file, with the folder's part computed once per folder."""
    folder, name = os.path.split(path)
    if not folder or not name or name in (".", ".."):
        return str(Path(path))
    named = _folder_name(folder)
    return name if named == "." else os.path.join(named, name)


_GAP = 1 << 14  # small tensors closer than this are read in one go (one read beats two syscalls)


def _spans(small: list[tuple[int, int]]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Reads covering the small tensors: (begin, end, [(offset in the read, length)...]) in file order."""
    spans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for begin, end in sorted(small):
        if spans and begin - spans[-1][1] <= _GAP:
            first, _, parts = spans[-1]
            spans[-1] = (first, max(end, spans[-1][1]), parts)
        else:
            first, parts = begin, []
            spans.append((begin, end, parts))
        parts.append((begin - first, end - begin))
    return spans


def _memo_key(s: _Structure, parsed: _Parsed, fd: int) -> tuple:
    values = []
    start = 8 + parsed.header_size
    for begin, end, parts in s.spans:
        data = os.pread(fd, end - begin, start + begin)
        values += [data[at:at + length] for at, length in parts]
    meta = parsed.metadata
    decisive = tuple(map(meta.get, decisive_metadata_keys()))
    embeds = tuple(k for k, v in meta.items() if v == "<embed>") if "<embed>" in meta.values() else ()
    return tuple(values), decisive, embeds


class RecordMemo:
    """``inspect`` records by structure and what else they read, kept as pickles so that every record handed
    out is a new object."""

    def __init__(self, limit: int = 1024):
        self._structures: dict[tuple[str, int], _Structure] = {}
        self._limit = limit  # structures kept; a collection has far fewer trainers than this
        self.hits = 0
        self.misses = 0

    def inspect(self, path: str, inspect_fn: Callable[[str], dict]) -> dict:
        """What ``inspect_fn(path)`` (``inspect`` of a .safetensors file) returns, from the memo when a file of
        the same structure was seen."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return inspect_fn(path)
        try:
            parsed = _parse(fd)
            s = None if parsed is None else self._structure(parsed, path)
            key = None if s is None else _memo_key(s, parsed, fd)
        except OSError:
            key = None
        finally:
            os.close(fd)
        if key is None:
            return inspect_fn(path)
        stored = s.records.get(key)
        if stored is None:
            self.misses += 1
            info = inspect_fn(path)
            # the file may have changed since it was parsed: keep only a record of what was parsed
            if info.get("size_bytes") == parsed.file_size and info.get("metadata") == parsed.metadata:
                s.records[key] = pickle.dumps({k: (None if k in PER_FILE else v) for k, v in info.items()},
                                              protocol=pickle.HIGHEST_PROTOCOL)
            return info
        self.hits += 1
        info = pickle.loads(stored)
        info["path"] = _path_name(path)
        info["size_bytes"] = parsed.file_size
        info["metadata"] = parsed.metadata
        return info

    def _structure(self, parsed: _Parsed, path: str) -> _Structure | None:
        """The structure of a file whose tensor entries are written exactly as those of a header the strict reader
        accepted, with as many data bytes: they validate the same way. A new one is read strictly first."""
        key = (parsed.tensors_text, parsed.file_size - 8 - parsed.header_size)
        s = self._structures.get(key)
        if s is not None:
            return s
        try:
            header = read_header(path)
        except LoraToolsError:
            return None
        if (header.header_size, header.file_size, header.metadata) != (parsed.header_size, parsed.file_size,
                                                                        parsed.metadata):
            return None  # changed meanwhile
        if len(self._structures) >= self._limit:
            self._structures.pop(next(iter(self._structures)))
        s = self._structures[key] = _Structure([(t.begin, t.end) for t in header.tensors.values()
                                                if t.numel <= SMALL])
        return s
