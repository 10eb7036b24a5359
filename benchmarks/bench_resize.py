"""resize and SVD merge in factor space versus the dense-SVD baseline, on an SDXL-shaped kohya LoRA.

    python benchmarks/bench_resize.py [--rank-in 128] [--rank-out 32] [--full | --baseline-modules N]
                                      [--threads N]

Builds, in a temporary folder deleted at the end, two SDXL kohya LoRAs (UNet + both text encoders,
986 modules, real SGM names and shapes, float16, random factors) and times, each in its own child
process (so each peak RSS is that variant's own, from resource.getrusage):

  ours resize      load + ``resize(rank=N)`` + write the result (kohya keys)
  ours merge svd   load both + ``merge(method="svd", rank=N)`` + write
  baseline         what sd-scripts' resize_lora does: load the file, and per module form the dense ΔW in
                   float32, full ``torch.linalg.svd``, keep the top k (U·S, Vh); no write

The baseline is slow, so by default it runs on a sample of modules chosen in proportion to each shape
and its compute time is extrapolated per shape to all modules (said in the output); ``--full`` runs it
on every module. The top-k singular values of our written output are compared with the baseline's on
the sampled modules.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, sdxl_kohya_modules, table, write_sdxl_kohya

PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


# --- child processes ------------------------------------------------------------------------------------------

class ReadClock:
    """Wraps a source's tensor reads so that the time spent reading can be told from compute."""

    def __init__(self, source):
        self.seconds, self._read = 0.0, source.torch
        source.torch = self

    def __call__(self, key):
        t = time.perf_counter()
        try:
            return self._read(key)
        finally:
            self.seconds += time.perf_counter() - t


def write_output(lora, path: Path) -> None:
    import loratools.api

    if hasattr(loratools.api, "save"):
        loratools.api.save(lora, path, to="kohya")
        return
    from loratools.io.reader import dtype_name
    from loratools.io.writer import write_safetensors

    items = []
    for m in lora.modules:
        stem = PREFIX[m.component] + m.name
        for role, suffix in (("lora_down", "lora_down.weight"), ("lora_up", "lora_up.weight")):
            ref = m.adapter.t(role)
            items.append((f"{stem}.{suffix}", ref.dtype, ref.shape, ref.torch))
        import torch

        alpha = torch.tensor(m.alpha, dtype=torch.float32)
        items.append((f"{stem}.alpha", dtype_name(alpha.dtype), (), alpha))
    write_safetensors(path, items, lora.metadata, overwrite=True)


def child_ours(kind: str, paths: list[str], out: str, rank: int) -> dict:
    import loratools
    from loratools.ops.merge import merge
    from loratools.ops.resize import resize

    t0 = time.perf_counter()
    loras = [loratools.load(p) for p in paths]
    clocks = [ReadClock(lora.source) for lora in loras]
    header = time.perf_counter() - t0
    t1 = time.perf_counter()
    if kind == "resize":
        result, report = resize(loras[0], rank=rank, device="cpu")
    else:
        result, report = merge([(lora, 1.0) for lora in loras], method="svd", rank=rank, device="cpu")
    work = time.perf_counter() - t1
    t2 = time.perf_counter()
    write_output(result, Path(out))
    write = time.perf_counter() - t2
    read = header + sum(c.seconds for c in clocks)
    return {"read": read, "compute": work - sum(c.seconds for c in clocks), "write": write,
            "work": time.perf_counter() - t0, "retained_mean": report["summary"]["retained_mean"]}


def child_baseline(path: str, names: list[str] | None, rank: int, sigmas_out: str) -> dict:
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    sd = load_file(path)  # as sd-scripts does: the whole state dict
    read = time.perf_counter() - t0
    stems = sorted({k.split(".")[0] for k in sd}) if names is None else names
    per_stem, sigmas = {}, {}
    for stem in stems:
        t = time.perf_counter()
        up, down = sd[f"{stem}.lora_up.weight"].float(), sd[f"{stem}.lora_down.weight"].float()
        scale = float(sd[f"{stem}.alpha"]) / down.shape[0]
        mat = up.flatten(1) @ down.flatten(1) * scale
        u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, as resize_lora calls it
        new_up, new_down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
        per_stem[stem] = time.perf_counter() - t
        sigmas[stem] = (s[:rank] / scale).tolist()  # ΔW/s, to compare with the factors we write
        del mat, u, vh, new_up, new_down
    Path(sigmas_out).write_text(json.dumps(sigmas))
    return {"read": read, "compute": sum(per_stem.values()), "write": 0.0,
            "work": time.perf_counter() - t0, "per_stem": per_stem}


def run_child() -> None:
    args = json.loads(sys.argv[2])
    if args.get("threads"):
        import torch

        torch.set_num_threads(args["threads"])
    if args["kind"] == "baseline":
        result = child_baseline(args["path"], args["names"], args["rank"], args["sigmas"])
    else:
        result = child_ours(args["kind"], args["paths"], args["out"], args["rank"])
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# --- the parent -------------------------------------------------------------------------------------------------

def spawn(args: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t
    return result


def sample_by_shape(modules: list[tuple[str, list[int]]], n: int) -> list[str]:
    """About ``n`` module stems, each shape in proportion to its count (at least one per shape)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for stem, shape in modules:
        groups[tuple(shape)].append(stem)
    total = len(modules)
    picks = []
    for stems in groups.values():
        count = max(1, round(n * len(stems) / total))
        step = len(stems) / count
        picks += [stems[int(i * step)] for i in range(count)]
    return picks


def extrapolate(per_stem: dict[str, float], modules: list[tuple[str, list[int]]]) -> float:
    """Compute time for every module: each shape's mean sampled time times its module count."""
    shape_of = {stem: tuple(shape) for stem, shape in modules}
    times: dict[tuple, list[float]] = defaultdict(list)
    for stem, t in per_stem.items():
        times[shape_of[stem]].append(t)
    counts: dict[tuple, int] = defaultdict(int)
    for _, shape in modules:
        counts[tuple(shape)] += 1
    return sum(sum(ts) / len(ts) * counts[shape] for shape, ts in times.items())


def our_sigmas(path: Path, names: list[str]) -> dict[str, list[float]]:
    """Singular values of the written modules' up @ down (float64, factor space)."""
    from loratools.io.reader import SafetensorsFile
    from loratools.ops.lowrank import factor_svd

    out = {}
    with SafetensorsFile(path) as f:
        for stem in names:
            up = f.torch(f"{stem}.lora_up.weight").double().flatten(1)
            down = f.torch(f"{stem}.lora_down.weight").double().flatten(1)
            out[stem] = factor_svd(up, down, compute_uv=False).tolist()
    return out


def max_rel_diff(ours: dict, base: dict) -> float:
    worst = 0.0
    for stem, ref in base.items():
        got = ours[stem]
        worst = max(worst, max(abs(a - b) / ref[0] for a, b in zip(got, ref)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank-in", type=int, default=128)
    ap.add_argument("--rank-out", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="run the baseline on every module")
    ap.add_argument("--baseline-modules", type=int, default=None, help="time the baseline on N modules")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    modules = sdxl_kohya_modules()
    n_base = None if args.full and args.baseline_modules is None else (args.baseline_modules or 40)
    names = None if n_base is None or n_base >= len(modules) else sample_by_shape(modules, n_base)
    with tempfile.TemporaryDirectory(prefix="bench_resize_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        a = write_sdxl_kohya(tmp / "a.safetensors", rank=args.rank_in, seed=0)
        b = write_sdxl_kohya(tmp / "b.safetensors", rank=args.rank_in, seed=1)
        size = a.stat().st_size / 2**20
        print(f"inputs: 2 × SDXL kohya LoRA, {len(modules)} modules, rank {args.rank_in}, fp16, {size:.0f} MiB each "
              f"(built in {time.perf_counter() - t:.0f} s)", flush=True)
        common = {"rank": args.rank_out, "threads": args.threads}
        ours = spawn({**common, "kind": "resize", "paths": [str(a)], "out": str(tmp / "resized.safetensors")})
        merged = spawn({**common, "kind": "merge", "paths": [str(a), str(b)], "out": str(tmp / "merged.safetensors")})
        base = spawn({**common, "kind": "baseline", "path": str(a), "names": names, "sigmas": str(tmp / "s.json")})
        base_sigmas = json.loads((tmp / "s.json").read_text())
        diff = max_rel_diff(our_sigmas(tmp / "resized.safetensors", list(base_sigmas)), base_sigmas)
        exact_diff = _float32_check(a, list(base_sigmas), args.rank_out, base_sigmas)
    _print(args, modules, names, ours, merged, base, diff, exact_diff)


def _float32_check(path: Path, names: list[str], rank: int, base_sigmas: dict) -> float:
    """The same comparison before the output is cast to fp16: resize the sampled modules with dtype fp32."""
    import loratools
    from loratools.ops.lowrank import factor_svd
    from loratools.ops.resize import resize

    with loratools.load(path) as lora:
        wanted = set(names)
        lora.modules = [m for m in lora.modules if PREFIX[m.component] + m.name in wanted]
        out, _ = resize(lora, rank=rank, dtype="fp32", device="cpu")
        ours = {PREFIX[m.component] + m.name: factor_svd(m.adapter.up.torch().double().flatten(1),
                                                         m.adapter.down.torch().double().flatten(1),
                                                         compute_uv=False).tolist() for m in out.modules}
    return max_rel_diff(ours, base_sigmas)


def _print(args, modules, names, ours, merged, base, diff, exact_diff) -> None:
    sampled = names is not None
    base_compute = extrapolate(base["per_stem"], modules) if sampled else base["compute"]
    base_wall = base["wall"] - base["compute"] + base_compute
    if sampled:
        print(f"baseline: timed on {len(names)} of {len(modules)} modules (sampled in proportion to each shape); "
              f"its compute time is extrapolated per shape to all modules: {base['compute']:.1f} s -> "
              f"{base_compute:.0f} s")
    rows = []
    for label, r, wall, compute in [
        (f"ours: resize {args.rank_in}->{args.rank_out} (load+resize+write)", ours, ours["wall"], ours["compute"]),
        (f"ours: merge svd of 2 files -> {args.rank_out} (load+merge+write)", merged, merged["wall"],
         merged["compute"]),
        ("baseline: dense ΔW + full SVD (load+compute, no write)" + (" [extrapolated]" if sampled else ""),
         base, base_wall, base_compute),
    ]:
        io = r["read"] + r["write"]
        rows.append([label, f"{wall:.1f}", f"{r['read']:.1f}", f"{compute:.1f}", f"{r['write']:.1f}",
                     f"{100 * io / (io + compute):.0f}%", f"{r['rss_mb']:.0f}", f"{base_wall / wall:.1f}x"])
    print(table(rows, ["variant", "wall s", "read s", "compute s", "write s", "I/O share", "peak RSS MB",
                       "faster than baseline"]))
    print(f"top-{args.rank_out} singular values vs the baseline on {len(base['per_stem'])} "
          f"modules: max relative difference {diff:.1e} as written (fp16 factors), {exact_diff:.1e} before the "
          f"fp16 cast (float32 compute)")
    print(f"mean retained energy (Σσ² kept / Σσ²): resize {ours['retained_mean']:.4f}, "
          f"merge {merged['retained_mean']:.4f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        run_child()
    else:
        main()
