"""Base-model checkpoints opened for reading: which file holds which tensor.

A base is a single safetensors file (original layouts: LDM ``model.diffusion_model.``/``cond_stage_model.``,
SGM ``conditioner.embedders.N.``, SAI SD3, BFL Flux with or without prefix, ComfyUI bundles with
``text_encoders.*``; or one diffusers component file) or a diffusers model folder (``unet/``,
``transformer/``, ``text_encoder*/``, shards with ``*.safetensors.index.json``, ``model_index.json``). Every tensor
gets a qualified key: its name in a single file, ``<component>/<name>`` in a folder. Where a LoRA module lands in a
base is the operations' business (``ops.placement``), from the family tables.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass

from loratools.errors import FormatError, LoraToolsError, UnsafeFileError
from loratools.io.jsonfile import read_json_object
from loratools.io.pickled import looks_pickled
from loratools.io.reader import Header, SafetensorsFile


@dataclass
class BaseFile:
    rel: str  # path relative to the base ('' for a single-file base)
    component: str
    sf: SafetensorsFile

    @property
    def header(self) -> Header:
        return self.sf.header


class Base:
    """A base checkpoint opened for reading: its files, and every tensor by qualified key."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.is_folder = os.path.isdir(self.path)
        self.files: list[BaseFile] = []
        self.indexes: dict[str, dict] = {}  # rel paths of *.safetensors.index.json -> their contents
        self.others: list[str] = []  # rel paths of files copied as they are (configs, tokenizers)
        if self.is_folder:
            self._scan()
        else:
            if looks_pickled(self.path):
                raise UnsafeFileError("a pickled checkpoint cannot be a base: loratools reads bases as safetensors "
                                      "only (convert it to .safetensors first)", self.path)
            self.files.append(BaseFile("", "", SafetensorsFile(self.path)))
        self.keys: dict[str, tuple[BaseFile, str]] = {}
        for f in self.files:
            for name in f.header.tensors:
                self.keys[f"{f.component}/{name}" if f.component else name] = (f, name)
        if not self.keys:
            raise FormatError("the base holds no tensors", self.path)

    def _scan(self) -> None:
        def unreadable(e: OSError):
            raise FormatError(f"cannot read folder {os.path.relpath(e.filename, self.path)} ({e.strerror})",
                              self.path)

        for root, dirs, names in os.walk(self.path, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, self.path)
                if name.endswith(".safetensors"):
                    component = os.path.relpath(root, self.path)
                    self.files.append(BaseFile(rel, "" if component == "." else component, SafetensorsFile(full)))
                elif name.startswith("."):
                    continue
                else:
                    _check_regular(full, rel, self.path)  # copied as it is: a device or a pipe would never end
                    if name.endswith(".safetensors.index.json"):
                        self.indexes[rel] = _read_index(full, rel, self.path)
                    else:
                        self.others.append(rel)
        if not self.files:
            raise FormatError("no .safetensors files in the base folder", self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        f, name = self.keys[key]
        return f.header.tensors[name].shape

    def model_index(self) -> dict | None:
        """A diffusers folder's ``model_index.json`` (its pipeline class), when it has a valid one."""
        if not self.is_folder:
            return None
        try:
            with open(os.path.join(self.path, "model_index.json"), encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError, RecursionError):
            return None
        return index if isinstance(index, dict) else None

    def close(self) -> None:
        for f in self.files:
            f.sf.close()

    def __enter__(self) -> Base:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_base(path) -> Base:
    """Open a base checkpoint (a safetensors file or a diffusers model folder) without reading tensors."""
    return Base(path)


MAX_INDEX_BYTES = 64 << 20  # a shard index lists tensor names: a few MB for the largest models


def _check_regular(full: str, rel: str, base: str) -> None:
    try:
        mode = os.stat(full).st_mode  # through symlinks: what would be read
    except OSError as e:
        raise FormatError(f"cannot read {rel} ({e.strerror})", base) from None
    if not stat.S_ISREG(mode):
        raise FormatError(f"{rel} is not a regular file (a device, pipe or socket is not copied)", base)


def _read_index(full: str, rel: str, base: str) -> dict:
    """A shard index's contents, checked before anything is written: a JSON object whose ``weight_map`` and
    ``metadata``, when present, are objects."""
    index = read_json_object(full, rel, MAX_INDEX_BYTES, base)
    if not all(isinstance(index.get(k, {}), dict) for k in ("weight_map", "metadata")):
        raise FormatError(f"{rel} is not a valid shard index (its weight_map and metadata must be objects)", base)
    return index


def rewrite_index(index: dict, dest: str, sizes: dict[str, int], dropped: set[str] = frozenset()) -> None:
    """A shard index with the same weight map (less the ``dropped`` tensors) and the total size of the rewritten
    shards."""
    index = {**index, "metadata": {**index.get("metadata", {}), "total_size": sum(sizes.values())}}
    if dropped and "weight_map" in index:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def copy_file(src: str, dest: str) -> None:
    """Copy a base folder's file as it is; a failure is one line naming the file."""
    try:
        shutil.copyfile(src, dest)
    except OSError as e:
        raise LoraToolsError(f"cannot copy {os.path.basename(src)} ({e.strerror or e})", src) from None
