"""`loratools scan` over many LoRA files versus the floor (a bare Python loop reading each header) and a
torch-based inventory (safetensors.torch.load_file per file), in one run.

    python benchmarks/bench_scan.py [--files 10000] [--jobs 1]

Files: small LoRAs cut from eight real layouts (real module names and dimensions, 20-60 tensors each), distinct
contents. Each variant runs in a fresh process over a warm page cache; the table gives files per second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

sys.path.insert(0, str(ROOT / "tests"))

from synth import layout, synthesize  # noqa: E402

PY = sys.executable
LAYOUTS = ["sdxl__kohya__invokeai-slider-keys-only.json", "flux1__kohya__invokeai-pokemon.json",
           "flux1__diffusers__invokeai-hands.json", "sd15__diffusers_peft__faithsang.json",
           "sd15__lycoris_lokr__lycoris-smartfalcon-f8.json", "wan21__diffusion_model_peft__issue-fragment.json",
           "qwen_image__diffusers__invokeai-fragment.json", "sd3__kohya_diffusers__issue-fragment.json"]

FLOOR = """
import json, os, struct, sys
for folder, _, files in os.walk(sys.argv[1]):
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            json.loads(f.read(n))
"""
TORCH = """
import os, sys
from safetensors.torch import load_file
for folder, _, files in os.walk(sys.argv[1]):
    for name in files:
        load_file(os.path.join(folder, name))
"""


def make(folder: Path, count: int) -> None:
    for i in range(count):
        name = LAYOUTS[i % len(LAYOUTS)]
        lay = dict(layout(name))
        keys = sorted(lay["tensors"])[: 20 + 5 * (i % 9)]
        lay["tensors"] = {k: lay["tensors"][k] for k in keys}
        sub = folder / f"{i // 500:03d}"
        sub.mkdir(exist_ok=True)
        synthesize(name, sub / f"l{i:05d}.safetensors", seed=i, layout_data=lay)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "loras"
        folder.mkdir()
        make(folder, args.files)
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**20
        timed([PY, "-c", FLOOR, str(folder)])  # warm the page cache
        rows = []
        variants = [("floor: read each header (python loop)", [PY, "-c", FLOOR, str(folder)]),
                    ("loratools scan", [PY, "-m", "loratools", "scan", str(folder), "--json", "-j", str(args.jobs)]),
                    ("loratools scan -o catalogue (first run)", [PY, "-m", "loratools", "scan", str(folder), "--json",
                                                                 "-o", f"{tmp}/c.jsonl", "-j", str(args.jobs)]),
                    ("loratools scan -o catalogue (rerun)", [PY, "-m", "loratools", "scan", str(folder), "--json",
                                                             "-o", f"{tmp}/c.jsonl"]),
                    ("safetensors.torch.load_file per file", [PY, "-c", TORCH, str(folder)])]
        floor = None
        for label, cmd in variants:
            seconds = timed(cmd)
            rate = args.files / seconds
            floor = floor or rate
            rows.append([label, f"{seconds:.2f}", f"{rate:.0f}", f"{rate / floor:.0%}"])
        print(f"{args.files} LoRA files ({size:.0f} MB), jobs {args.jobs}")
        print(table(rows, ["variant", "seconds", "files/s", "of floor"]))


if __name__ == "__main__":
    main()
