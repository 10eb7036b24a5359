"""`loratools scan` over many LoRA files versus the floor (a bare Python loop reading each header) and a
torch-based inventory (safetensors.torch.load_file per file), in one run.

    python benchmarks/bench_scan.py [--files 10000] [--keep DIR] [--repeat 3]

The collection: files cut from eight real layouts (real module names and dimensions), each written by one of 80
"trainer configurations" (layout × tensor count × rank, or a whole layout at rank 2), with metadata as kohya
sd-scripts writes it (dates, session ids, names, tag frequencies: different in every file) on the kohya-named
layouts and as diffusers/PEFT write it on the others. Sizes run from tens of kB to several MB. Every variant runs
in a fresh process over a warm page cache; the table gives files per second, best of --repeat runs (load_file:
one run).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compile_bytecode, table

sys.path.insert(0, str(ROOT / "tests"))

from synth import layout, synthesize  # noqa: E402

PY = sys.executable
LAYOUTS = {  # layout -> what kohya's ss_base_model_version says (None: not a kohya file)
    "sdxl__kohya__invokeai-slider-keys-only.json": "sdxl_base_v1-0",
    "flux1__kohya__invokeai-pokemon.json": "flux1",
    "flux1__diffusers__invokeai-hands.json": None,
    "sd15__diffusers_peft__faithsang.json": None,
    "sd15__lycoris_lokr__lycoris-smartfalcon-f8.json": "sd_v1",
    "wan21__diffusion_model_peft__issue-fragment.json": None,
    "qwen_image__diffusers__invokeai-fragment.json": None,
    "sd3__kohya_diffusers__issue-fragment.json": "sd3",
}
KOHYA_METADATA = ROOT / "fixtures" / "layouts" / "metadata" / "kohya_sdxl_lora_metadata__civitai-seed.json"
CONFIGS = [(name, keep, rank) for name in LAYOUTS for keep in (20, 40, 60) for rank in (2, 4, 8)]
CONFIGS += [(name, None, 2) for name in LAYOUTS]  # whole layouts: the large files
TAGS = ["1girl", "solo", "smile", "outdoors", "looking at viewer", "long hair", "blue sky", "portrait", "red dress",
        "masterpiece", "city", "night", "rain", "flowers", "cat", "sitting", "from side", "upper body"]

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


def _metadata(name: str, i: int, rank: int, rng: random.Random, lay: dict) -> dict:
    base = LAYOUTS[name]
    if base is None:
        return dict(lay.get("metadata") or {})
    meta = dict(json.loads(KOHYA_METADATA.read_text())["metadata"])
    started = 1_700_000_000 + rng.random() * 5e7
    tags = {t: rng.randint(1, 200) for t in rng.sample(TAGS, rng.randint(4, len(TAGS)))}
    meta.update({"ss_output_name": f"lora_{i:05d}", "modelspec.title": f"lora_{i:05d}",
                 "ss_session_id": str(rng.randint(10**9, 10**10)), "ss_training_started_at": f"{started}",
                 "ss_training_finished_at": f"{started + rng.random() * 1e4}",
                 "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
                 "sshs_model_hash": f"{rng.getrandbits(256):064x}", "ss_base_model_version": base,
                 "ss_network_dim": str(rank), "ss_network_alpha": "8",  # what the files hold (synth's alpha is 8)
                 "ss_tag_frequency": json.dumps({f"{rng.randint(1, 20)}_subject": tags})})
    meta.pop("modelspec.architecture", None)  # the sample is an SDXL file's
    return meta


def make(folder: Path, count: int) -> None:
    rng = random.Random(0)
    layouts = {name: layout(name) for name in LAYOUTS}
    # the large whole-layout files are 2% of the collection
    small = sum(keep is not None for _, keep, _ in CONFIGS)
    weights = [1.0 if keep is not None else 0.02 / 0.98 * small / len(LAYOUTS) for _, keep, _ in CONFIGS]
    for i in range(count):
        name, keep, rank = rng.choices(CONFIGS, weights)[0]
        lay = dict(layouts[name])
        if keep is not None:
            keys = sorted(lay["tensors"])[:keep]
            lay["tensors"] = {k: lay["tensors"][k] for k in keys}
        sub = folder / f"{i // 500:03d}"
        sub.mkdir(exist_ok=True)
        synthesize(name, sub / f"l{i:05d}.safetensors", seed=i, rank=rank, layout_data=lay,
                   metadata=_metadata(name, i, rank, rng, lay))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--keep", default=None, help="Build the collection here once and reuse it on later runs.")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="Skip the load_file baseline (slow).")
    args = ap.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / f"loras-{args.files}"
        built = folder.with_name(folder.name + ".built")
        if not built.exists():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder, args.files)
            built.write_text("")
        files = list(folder.rglob("*.safetensors"))
        size = sum(p.stat().st_size for p in files) / 2**20
        timed([PY, "-c", FLOOR, str(folder)])  # warm the page cache
        cat = f"{tmp}/c.jsonl"
        scan = [PY, "-m", "loratools", "scan", str(folder), "--json"]
        variants = [("floor: read each header (python loop)", [PY, "-c", FLOOR, str(folder)]),
                    ("loratools scan", scan),
                    ("loratools scan -j 2", scan + ["-j", "2"]),
                    ("loratools scan -o catalogue (first run)", scan + ["-o", cat]),
                    ("loratools scan -o catalogue (rerun)", scan + ["-o", cat])]
        best = {label: float("inf") for label, _ in variants}
        for _ in range(args.repeat):
            for label, cmd in variants:
                if "first run" in label:
                    Path(cat).unlink(missing_ok=True)
                best[label] = min(best[label], timed(cmd))
        if not args.no_torch:
            best["safetensors.torch.load_file per file"] = timed([PY, "-c", TORCH, str(folder)])
        floor = len(files) / best[variants[0][0]]
        rows = [[label, f"{s:.2f}", f"{len(files) / s:.0f}", f"{len(files) / s / floor:.0%}"] for label, s in best.items()]
        print(f"{len(files)} LoRA files ({size:.0f} MB), best of {args.repeat}")
        print(table(rows, ["variant", "seconds", "files/s", "of floor"]))


if __name__ == "__main__":
    main()
