"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

from loratools._version import __version__
from loratools.api import (bake, convert, extract, inspect, load, merge, resize, save, scan, summarize_catalogue,
                           verify)
from loratools.visual import report  # the HTML report (loratools/terminal.py renders for the terminal)
from loratools.batch import run_batch  # jobs from a manifest, resumable (docs/batch.md)

__all__ = ["load", "inspect", "convert", "verify", "save", "resize", "merge", "bake", "extract", "scan",
           "summarize_catalogue", "report", "run_batch", "__version__"]
