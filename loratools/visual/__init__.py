"""Visual reports: where a LoRA acts, its spectra and what a resize would keep, as one self-contained HTML page
(``report``), or the per-block strength map alone as a PNG (``plot``).

``blocks`` places modules in the base model's block structure, ``groups`` summarises spectra and predicts resize,
``data`` assembles the JSON-ready data, ``render`` draws the figures with matplotlib, ``html`` writes the page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import UsageError
from loratools.io.atomic import atomic_file

__all__ = ["ReportResult", "collect", "plot", "report"]


@dataclass
class ReportResult:
    output: str | None  # the page written (None when nothing was written)
    data: dict  # what the page embeds (``data.report_data``)


def _specs(paths) -> list[tuple[str, float]]:
    """(path, strength) of every LoRA named; a plain folder stands for the LoRA files in it (as for inspect)."""
    from loratools.api_checkpoints import lora_spec
    from loratools.io.sources import expand_paths

    items = [paths] if isinstance(paths, (str, os.PathLike, tuple)) else list(paths)
    if not items:
        raise UsageError("no LoRA files given")
    return [(found, strength) for path, strength in map(lora_spec, items) for found in expand_paths([path])]


def collect(paths, *, ranks=None, dynamic=None, family: str | None = None, allow_pickle: bool = False,
            hashes: bool = True) -> dict:
    """The report's data for ``paths`` (each a path, ``"path:strength"`` or ``(path, strength)``); files are read
    one after the other, each closed before the next is opened."""
    from loratools.api import load
    from loratools.visual.data import lora_data, report_data

    loras, labels = [], set()
    for path, strength in _specs(paths):
        label = os.path.basename(os.path.normpath(path)) + (f" ×{strength:g}" if strength != 1 else "")
        while label in labels:
            label += "′"
        labels.add(label)
        with load(path, allow_pickle=allow_pickle, family=family) as lora:
            loras.append(lora_data(lora, strength=strength, ranks=ranks, dynamic=dynamic, hashes=hashes,
                                   label=label))
    return report_data(loras)


def _first(paths: list) -> str:
    """The first path as given (a folder names the page after itself)."""
    if not paths:
        raise UsageError("no LoRA files given")
    from loratools.api_checkpoints import lora_spec

    return lora_spec(paths[0])[0]


def _destination(first: str, output, suffix: str, inputs: list[str]) -> Path:
    """``-o`` as every command reads it (a folder when it exists or ends with '/'); beside the first input
    without it. Never one of the inputs."""
    name = Path(os.path.normpath(first)).name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    if output is None:
        dest = Path(os.path.normpath(first)).parent / f"{stem}{suffix}"
    else:
        text = os.fspath(output)
        dest = Path(text) / f"{stem}{suffix}" if text.endswith(("/", os.sep)) or os.path.isdir(text) else Path(text)
    if any(os.path.realpath(dest) == os.path.realpath(p) for p in inputs):
        raise UsageError("the output would replace an input", dest)
    return dest


def _write(dest: Path, payload: bytes, overwrite: bool, sync: bool) -> None:
    with atomic_file(dest, overwrite=overwrite, sync=sync) as fd:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]


def _report(paths, output=None, *, ranks=None, dynamic=None, family: str | None = None, allow_pickle: bool = False,
            overwrite: bool = False, hashes: bool = True, title: str | None = None, sync: bool = False
            ) -> ReportResult:
    """Write one self-contained HTML page showing where each LoRA acts (‖ΔW‖ per block of the base model),
    its singular-value spectra and effective ranks per module group, what ``resize --rank K`` /
    ``--dynamic`` would keep, the inspect summary (format, family evidence, training metadata, tags, hashes) and
    its flags (NaN/Inf or all-zero modules, metadata the tensors contradict). Several files give a comparison page
    on shared axes. The page embeds its data as JSON (``<script type="application/json"
    id="loratools-report-data">``), which is also returned.

    Args:
        paths: one path or several; each may carry a strength (``"a.safetensors:0.8"`` or ``(path, 0.8)``).
        output: the page (default: beside the first input, ``<stem>.report.html``); a folder puts it there.
        ranks: the ``resize --rank`` values to predict (default: r/2, r/4, r/8 of the largest rank).
        dynamic: the ``resize --dynamic`` rules to predict (default: sv_fro:0.99, sv_fro:0.9, sv_ratio:10).
        hashes: compute sha256/AutoV2/AutoV3 (reads each file once more).

    Example:
        >>> r = loratools.report(["style.safetensors", "style.r32.safetensors"], "style.html")
        >>> r.data["loras"][1]["stats"]["total_norm"]
    """
    from loratools.visual import html

    paths = [paths] if isinstance(paths, (str, os.PathLike, tuple)) else list(paths)
    specs = _specs(paths)
    dest = _destination(_first(paths), output, ".report.html", [p for p, _ in specs])
    if os.path.lexists(dest) and not overwrite:  # before the work, not only when writing
        raise UsageError("output exists; pass --overwrite to replace it", dest)
    data = collect(specs, ranks=ranks, dynamic=dynamic, family=family, allow_pickle=allow_pickle, hashes=hashes)
    _write(dest, html.page(data, title).encode("utf-8"), overwrite, sync)
    return ReportResult(str(dest), data)


def plot(paths, output, *, family: str | None = None, allow_pickle: bool = False, overwrite: bool = False,
         title: str | None = None, sync: bool = False) -> str:
    """The per-block strength map of one or several LoRAs (shared axes) as a PNG; returns its path.

    Example:
        >>> loratools.visual.plot("style.safetensors", "style.png")
    """
    from loratools.visual import render

    paths = [paths] if isinstance(paths, (str, os.PathLike, tuple)) else list(paths)
    specs = _specs(paths)
    dest = _destination(_first(paths), output, ".blocks.png", [p for p, _ in specs])
    if os.path.lexists(dest) and not overwrite:
        raise UsageError("output exists; pass --overwrite to replace it", dest)
    data = collect(specs, ranks=[], dynamic=[], family=family, allow_pickle=allow_pickle, hashes=False)
    labels = ", ".join(d["label"] for d in data["loras"])
    fig = render.block_map(data["loras"], data["axis"], title=title or f"‖ΔW‖ per block: {labels}")
    _write(dest, render.png(fig), overwrite, sync)
    return str(dest)


report = _report
