"""bake a rank-64 SDXL kohya LoRA into an SDXL-shaped fp16 checkpoint (real SGM layout, ~6.9 GB with text
encoders), next to `cp` of the checkpoint and the load-everything-merge-save approach.

    python benchmarks/bench_bake.py [--fraction 1.0] [--rank 64] [--repeat 1]

``--fraction F`` keeps that share of the checkpoint's tensors (every k-th key) for quick runs; LoRA modules
whose weight is left out are skipped by both bakers. Each variant runs in its own process and peak RSS is
that child's ru_maxrss (os.wait4). ``--repeat N`` runs cp and bake N times each, alternating, and reports the
best and every time (the disk here is shared and noisy; the load-everything baseline runs once). Targets from
the issue: within 1.5x of cp, peak RSS < 1.5 GB at any size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, compile_bytecode, in_child, run, table, write_sdxl_kohya

from loratools.io.writer import write_safetensors

LAYOUT = ROOT / "fixtures" / "checkpoints" / "sdxl__sgm__sdmecha.json"

# The approach most merge scripts take: every tensor in memory, patch, save (mapping from loratools' planner,
# so only the memory/time behaviour differs).
BASELINE = """
import sys, torch
from safetensors.torch import load_file, save_file
import loratools
from loratools.io.checkpoints import open_base
from loratools.ops.bake import plan_patches
from loratools.ops.patch import apply_bias, apply_weight
from loratools.ops.convert import family_of
base_path, lora_path, out = sys.argv[1:4]
lora = loratools.load(lora_path)
with open_base(base_path) as base:
    patches, _, _ = plan_patches(base, [(lora, 1.0, family_of(lora, None))], True)
sd = load_file(base_path)
for key, todo in patches.items():
    w = sd[key].float()
    for p in todo:
        (apply_bias if p.bias else apply_weight)(w, p, torch.device("cpu"))
    sd[key] = w.to(sd[key].dtype)
save_file(sd, out)
"""

# The arithmetic floor on a CPU: only the products B @ A of the modules the base has, float32, no I/O.
MATMUL_FLOOR = """
import sys, time, torch
import loratools
from loratools.io.checkpoints import open_base
from loratools.ops.bake import plan_patches
from loratools.ops.convert import family_of
base_path, lora_path = sys.argv[1:3]
lora = loratools.load(lora_path)
with open_base(base_path) as base:
    patches, _, _ = plan_patches(base, [(lora, 1.0, family_of(lora, None))], True)
factors = [(p.module.adapter.up.torch().float().flatten(1), p.module.adapter.down.torch().float().flatten(1))
           for todo in patches.values() for p in todo if not p.bias]
start = time.perf_counter()
flops = 0
for up, down in factors:
    torch.mm(up, down)
    flops += 2 * up.shape[0] * up.shape[1] * down.shape[1]
seconds = time.perf_counter() - start
print(f"{seconds:.3f} {flops / seconds / 1e9:.1f}")
"""


def write_base(path: Path, fraction: float) -> int:
    """The SGM checkpoint in fp16 (ints stay ints), random values, one tensor at a time; returns its size."""
    tensors = json.loads(LAYOUT.read_text())["tensors"]
    step = max(1, round(1 / fraction))
    rng = np.random.default_rng(0)
    items = []
    for i, (key, t) in enumerate(tensors.items()):
        if i % step:
            continue
        dtype = "F16" if t["dtype"].startswith("F") else t["dtype"]
        shape = tuple(t["shape"])

        def make(shape=shape, dtype=dtype):
            if dtype != "F16":
                return np.zeros(shape, dtype=np.int64)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

        items.append((key, dtype, shape, make))
    write_safetensors(path, items, {}, overwrite=True)
    return path.stat().st_size


def main() -> None:
    compile_bytecode()
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the checkpoint's tensors to keep")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of cp and bake each, alternating")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        tmp = Path(tmp)
        size = in_child(write_base, tmp / "base.safetensors", args.fraction)
        in_child(write_sdxl_kohya, tmp / "lora.safetensors", rank=args.rank)
        rows = []
        variants = {
            "cp": ["cp", str(tmp / "base.safetensors"), str(tmp / "cp.safetensors")],
            "loratools bake": [sys.executable, "-m", "loratools", "bake", str(tmp / "base.safetensors"),
                               str(tmp / "lora.safetensors"), "-o", str(tmp / "baked.safetensors"), "--device", "cpu",
                               "--allow-unmatched"],
            "load all, merge, save": [sys.executable, "-c", BASELINE, str(tmp / "base.safetensors"),
                                      str(tmp / "lora.safetensors"), str(tmp / "naive.safetensors")],
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        order = [n for _ in range(args.repeat) for n in ("cp", "loratools bake")] + ["load all, merge, save"]
        for name in order:
            times[name].append(run(variants[name]))
            for f in tmp.glob("[cbn]*.safetensors"):
                if f.name != "base.safetensors":
                    f.unlink()  # keep the disk footprint at two checkpoints
        cp = min(w for w, _ in times["cp"])
        for name, runs in times.items():
            wall = min(w for w, _ in runs)
            every = ", ".join(f"{w:.2f}" for w, _ in runs) if len(runs) > 1 else "-"
            rows.append([name, f"{wall:.2f}", every, f"{max(r for _, r in runs):.0f}", f"{wall / cp:.2f}"])
        floor = subprocess.run([sys.executable, "-c", MATMUL_FLOOR, str(tmp / "base.safetensors"),
                                str(tmp / "lora.safetensors")], capture_output=True, text=True, check=True, cwd=ROOT)
        seconds, gflops = floor.stdout.split()
        rows.append([f"matmuls B@A alone ({gflops} GFLOP/s, in memory)", seconds, "-", "-",
                     f"{float(seconds) / cp:.2f}"])
        print(f"SDXL-shaped checkpoint {size / 1e9:.2f} GB (fraction {args.fraction}), kohya LoRA rank {args.rank}")
        print(table(rows, ["variant", "wall s (best)", "every run", "peak RSS MB", "x cp (best)"]))


if __name__ == "__main__":
    main()
