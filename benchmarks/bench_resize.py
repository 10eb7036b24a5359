"""resize and SVD merge in factor space versus the dense-SVD baseline, on an SDXL-shaped kohya LoRA.

    python benchmarks/bench_resize.py [--rank-in 128] [--rank-out 32] [--full | --baseline-modules N]
                                      [--repeat N] [--before REV] [--profile] [--threads N]

Builds, in a temporary folder deleted at the end, two SDXL kohya LoRAs (UNet + both text encoders,
986 modules, real SGM names and shapes, float16, random factors) and times, each in its own child
process (peak RSS and CPU time are that process's own, from wait4):

  ours resize      import + load + ``resize(rank=N)`` + write the result (kohya keys)
  ours merge svd   import + load both + ``merge(method="svd", rank=N)`` + write
  baseline         what sd-scripts' resize_lora does: load the file, and per module form the dense ΔW in
                   float32, full ``torch.linalg.svd``, keep the top k (U·S, Vh); no write

``--repeat N`` runs every variant N times, the order rotating each round, so that the machine's load falls on
all alike; ``--before REV`` adds resize and merge of an earlier revision (exported with ``git archive``) to each
round. The baseline is slow, so by default it runs on a sample of modules chosen in proportion to each shape and
its compute time is extrapolated per shape to all modules (said in the output); ``--full`` runs it on every
module.

Singular values, on the sampled modules, against the float64 SVD of the dense ΔW (ΔW/s, the factors' product):
the spectrum our factor-space method computes in float32 (what the rank rules and the report use), the top k of
our output (float32 factors, and the float16 factors written by default), and the baseline's float32 dense SVD;
the same for the merge against the float64 dense weighted sum.

``--profile`` also runs resize and merge once in-process under cProfile on one core (so one batch at a time) and
prints the functions that take the time; with ``--before``, the earlier revision's too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# Children import loratools from the tree they measure: common (which imports it from this checkout) is for the
# parent only.
ROOT = Path(__file__).resolve().parents[1]

PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


# --- child processes ------------------------------------------------------------------------------------------

def child_ours(kind: str, paths: list[str], out: str, rank: int) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401 (timed on its own: every run pays it)

    import loratools
    from loratools.ops.merge import merge
    from loratools.ops.resize import resize

    t1 = time.perf_counter()
    loras = [loratools.load(p) for p in paths]
    t2 = time.perf_counter()
    if kind == "resize":
        result, report = resize(loras[0], rank=rank, device="cpu")
    else:
        result, report = merge([(lora, 1.0) for lora in loras], method="svd", rank=rank, device="cpu")
    t3 = time.perf_counter()
    loratools.save(result, out, to="kohya")
    t4 = time.perf_counter()
    return {"tree": str(Path(loratools.__file__).parents[1]), "import": t1 - t0, "load": t2 - t1,
            "compute": t3 - t2, "write": t4 - t3, "retained_mean": report["summary"]["retained_mean"]}


def child_baseline(path: str, names: list[str] | None, rank: int, sigmas_out: str) -> dict:
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    t1 = time.perf_counter()
    sd = load_file(path)  # as sd-scripts does: the whole state dict
    t2 = time.perf_counter()
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
    return {"import": t1 - t0, "load": t2 - t1, "compute": sum(per_stem.values()), "write": 0.0,
            "per_stem": per_stem}


def child_spectra(paths: list[str], outs: dict, names: list[str], rank: int, base_sigmas: str) -> dict:
    """Max relative differences of top-k singular values against the float64 dense SVD, on the sampled modules."""
    import torch

    import loratools
    from loratools.io.reader import SafetensorsFile
    from loratools.ops.lowrank import FactorSVD
    from loratools.ops.merge import merge
    from loratools.ops.resize import resize

    def factors(f, stem):
        return (f.torch(f"{stem}.lora_up.weight").flatten(1), f.torch(f"{stem}.lora_down.weight").flatten(1))

    def written(path, stems):
        with SafetensorsFile(path) as f:
            return {stem: torch.linalg.svdvals(up.double() @ down.double())[:rank] for stem in stems
                    for up, down in [factors(f, stem)]}

    def worst(got: dict, ref: dict) -> tuple[float, float]:
        """max |σᵢ − refᵢ| / ref₁ and max |σᵢ − refᵢ| / refᵢ over the top k of every module"""
        rel1 = max(float(((got[s][:rank].double() - ref[s][:rank]).abs() / ref[s][0]).max()) for s in ref)
        reli = max(float(((got[s][:rank].double() - ref[s][:rank]).abs() / ref[s][:rank]).max()) for s in ref)
        return rel1, reli

    a, b = (SafetensorsFile(p) for p in paths)
    ref = {stem: torch.linalg.svdvals(up.double() @ down.double()) for stem in names for up, down in [factors(a, stem)]}
    merged_ref = {}
    for stem in names:  # merge weights 1, 1: the sum of s·B·A, s = alpha / r
        total = 0
        for f in (a, b):
            up, down = factors(f, stem)
            total = total + float(f.torch(f"{stem}.alpha")) / down.shape[0] * (up.double() @ down.double())
        merged_ref[stem] = torch.linalg.svdvals(total)
    # our float32 spectrum: the stacked factors of the sampled modules of each shape, as resize decomposes them
    ours = {}
    by_shape = defaultdict(list)
    for stem in names:
        up, down = factors(a, stem)
        by_shape[(tuple(up.shape), tuple(down.shape))].append((stem, up, down))
    for group in by_shape.values():
        s = FactorSVD(torch.stack([u.float() for _, u, _ in group]), torch.stack([d.float() for _, _, d in group])).s
        ours.update({stem: s[i] for i, (stem, _, _) in enumerate(group)})
    base = {stem: torch.tensor(v, dtype=torch.float64) for stem, v in json.loads(Path(base_sigmas).read_text()).items()}
    with loratools.load(paths[0]) as la, loratools.load(paths[1]) as lb:
        wanted = set(names)
        for lora in (la, lb):
            lora.modules = [m for m in lora.modules if PREFIX[m.component] + m.name in wanted]
        r32, _ = resize(la, rank=rank, dtype="fp32", device="cpu")
        m32, _ = merge([(la, 1.0), (lb, 1.0)], method="svd", rank=rank, dtype="fp32", device="cpu")
        r32 = {PREFIX[m.component] + m.name: torch.linalg.svdvals(m.adapter.up.torch().double().flatten(1)
                                                                  @ m.adapter.down.torch().double().flatten(1))
               for m in r32.modules}
        m32 = {PREFIX[m.component] + m.name: torch.linalg.svdvals(m.adapter.up.torch().double().flatten(1)
                                                                  @ m.adapter.down.torch().double().flatten(1))
               for m in m32.modules}
    return {"resize: our float32 spectrum (factor space)": worst(ours, ref),
            "resize: our output, float32 factors": worst(r32, ref),
            "resize: our output as written (float16 factors)": worst(written(outs["resize"], names), ref),
            "resize: baseline, float32 dense SVD (sd-scripts)": worst(base, ref),
            "merge: our output, float32 factors": worst(m32, merged_ref),
            "merge: our output as written (float16 factors)": worst(written(outs["merge"], names), merged_ref)}


def child_profile(kind: str, paths: list[str], rank: int, top: int) -> dict:
    """cProfile of one resize or merge on one core: the functions with the most time of their own."""
    import cProfile
    import pstats

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    import loratools
    from loratools.ops.merge import merge
    from loratools.ops.resize import resize

    torch.set_num_threads(1)
    loras = [loratools.load(p) for p in paths]
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    if kind == "resize":
        resize(loras[0], rank=rank, device="cpu")
    else:
        merge([(lora, 1.0) for lora in loras], method="svd", rank=rank, device="cpu")
    prof.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, calls, f"{Path(fn[0]).name}:{fn[2]}" if fn[0] != "~" else fn[2])
                   for fn, (_, calls, tt, _, _) in stats.items()), reverse=True)
    return {"wall": wall, "total": sum(r[0] for r in rows), "rows": [list(r) for r in rows[:top]]}


def run_child() -> None:
    args = json.loads(sys.argv[2])
    sys.path.insert(0, args.get("tree") or str(ROOT))
    if args.get("threads"):
        import torch

        torch.set_num_threads(args["threads"])
    kind = args["kind"]
    if kind == "baseline":
        result = child_baseline(args["path"], args["names"], args["rank"], args["sigmas"])
    elif kind == "spectra":
        result = child_spectra(args["paths"], args["outs"], args["names"], args["rank"], args["sigmas"])
    elif kind == "profile":
        result = child_profile(args["op"], args["paths"], args["rank"], args["top"])
    else:
        result = child_ours(kind, args["paths"], args["out"], args["rank"])
    print(json.dumps(result))


# --- the parent -------------------------------------------------------------------------------------------------

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank-in", type=int, default=128)
    ap.add_argument("--rank-out", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="run the baseline on every module")
    ap.add_argument("--baseline-modules", type=int, default=None, help="time the baseline on N modules")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; every variant runs once per round")
    ap.add_argument("--before", default=None, help="also time resize and merge of this git revision")
    ap.add_argument("--profile", action="store_true", help="print a one-core cProfile of resize and merge")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from common import compile_bytecode, export, in_child, run_child, sdxl_kohya_modules, write_sdxl_kohya

    compile_bytecode()
    modules = sdxl_kohya_modules()
    n_base = None if args.full and args.baseline_modules is None else (args.baseline_modules or 40)
    names = sample_by_shape(modules, n_base) if n_base is not None and n_base < len(modules) else None
    checked = names or sample_by_shape(modules, 40)
    with tempfile.TemporaryDirectory(prefix="bench_resize_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        a = in_child(write_sdxl_kohya, tmp / "a.safetensors", rank=args.rank_in, seed=0)
        b = in_child(write_sdxl_kohya, tmp / "b.safetensors", rank=args.rank_in, seed=1)
        size = a.stat().st_size / 2**20
        print(f"inputs: 2 × SDXL kohya LoRA, {len(modules)} modules, rank {args.rank_in}, fp16, {size:.0f} MiB each "
              f"(built in {time.perf_counter() - t:.0f} s)", flush=True)
        trees = {"ours": None}
        if args.before:
            trees[f"before ({args.before})"] = str(export(args.before, tmp / "before"))
        common = {"rank": args.rank_out, "threads": args.threads}
        outs = {"resize": str(tmp / "resized.safetensors"), "merge": str(tmp / "merged.safetensors")}
        variants = []
        for label, tree in trees.items():
            variants.append((f"{label}: resize {args.rank_in}->{args.rank_out}", "resize",
                             {**common, "kind": "resize", "paths": [str(a)], "out": outs["resize"], "tree": tree}))
            variants.append((f"{label}: merge svd of 2 -> {args.rank_out}", "merge",
                             {**common, "kind": "merge", "paths": [str(a), str(b)], "out": outs["merge"],
                              "tree": tree}))
        variants.append(("baseline: dense ΔW + full SVD (no write)", "baseline",
                         {**common, "kind": "baseline", "path": str(a), "names": names,
                          "sigmas": str(tmp / "s.json")}))
        runs: dict[str, list[dict]] = defaultdict(list)
        for round_ in range(args.repeat):
            shift = round_ % len(variants)
            for label, op, child in variants[shift:] + variants[:shift]:
                if op in outs:  # a new output every run: replacing one would time its fsync and the old file's freeing
                    child = {**child, "out": str(tmp / f"out-{len(runs[label])}-{variants.index((label, op, child))}"
                                                       ".safetensors")}
                result = run_child(__file__, child)
                if "tree" in result:  # the tree measured is the one asked for
                    assert Path(result["tree"]) == Path(child.get("tree") or ROOT), (result["tree"], child.get("tree"))
                runs[label].append(result)
                print(f"  round {round_ + 1}: {label}: {result['wall']:.1f} s", flush=True)
                if op in outs:
                    if child.get("tree") is None:
                        os.replace(child["out"], outs[op])  # ours: kept for the spectra
                    else:
                        os.unlink(child["out"])
        base_names = names if names is not None else [stem for stem, _ in modules]
        spectra = run_child(__file__, {"kind": "spectra", "paths": [str(a), str(b)], "outs": outs,
                                  "names": [n for n in checked if n in set(base_names)], "rank": args.rank_out,
                                  "sigmas": str(tmp / "s.json")})
        profiles = {}
        if args.profile:
            for label, tree in trees.items():
                for op, paths in (("resize", [str(a)]), ("merge", [str(a), str(b)])):
                    profiles[f"{label}: {op}"] = run_child(__file__, {"kind": "profile", "op": op, "paths": paths,
                                                                 "rank": args.rank_out, "top": 12, "tree": tree})
    _print(args, modules, names, runs, spectra, profiles)


def _print(args, modules, names, runs, spectra, profiles) -> None:
    from common import table

    sampled = names is not None
    base_runs = runs.pop("baseline: dense ΔW + full SVD (no write)")
    base_compute = statistics.median(extrapolate(r["per_stem"], modules) if sampled else r["compute"]
                                     for r in base_runs)
    base_other = statistics.median(r["wall"] - r["compute"] for r in base_runs)
    base_wall = base_other + base_compute
    if sampled:
        print(f"baseline: timed on {len(names)} of {len(modules)} modules (sampled in proportion to each shape); its "
              f"compute time is extrapolated per shape to all modules: "
              f"{statistics.median(r['compute'] for r in base_runs):.1f} s -> {base_compute:.0f} s")
    rows = []
    for label, rs in runs.items():
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        rows.append([label, f"{min(r['wall'] for r in rs):.1f}", f"{med('wall'):.1f}", f"{med('cpu'):.1f}",
                     f"{med('import'):.1f}", f"{med('load'):.2f}", f"{med('compute'):.1f}", f"{med('write'):.1f}",
                     f"{max(r['rss_mb'] for r in rs):.0f}", f"{base_wall / med('wall'):.0f}x"])
    rows.append(["baseline: dense ΔW + full SVD, no write" + (" [extrapolated]" if sampled else ""), "",
                 f"{base_wall:.0f}", "", f"{statistics.median(r['import'] for r in base_runs):.1f}",
                 f"{statistics.median(r['load'] for r in base_runs):.2f}", f"{base_compute:.0f}", "0",
                 f"{max(r['rss_mb'] for r in base_runs):.0f}", "1x"])
    print(f"{args.repeat} round(s), the variants' order rotating; medians (best wall beside them)")
    print(table(rows, ["variant", "best s", "wall s", "CPU s", "import s", "load s", "compute s", "write s",
                       "peak RSS MB", "vs baseline"]))
    print(f"\ntop-{args.rank_out} singular values of ΔW/s against the float64 SVD of the dense ΔW/s, "
          f"{len(base_runs[0]['per_stem'])} sampled modules (relative to σ₁, and to each σᵢ):")
    print(table([[k, f"{v[0]:.1e}", f"{v[1]:.1e}"] for k, v in spectra.items() if k not in ("wall", "cpu", "rss_mb")],
                ["what", "max |Δσᵢ|/σ₁", "max |Δσᵢ|/σᵢ"]))
    for label, prof in profiles.items():
        print(f"\nprofile, one core: {label}: {prof['wall']:.1f} s in the call ({prof['total']:.1f} s profiled)")
        rows = [[name, f"{tt:.2f}", f"{100 * tt / prof['total']:.0f}%", calls] for tt, calls, name in prof["rows"]]
        print(table(rows, ["function", "own s", "share", "calls"]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        run_child()
    else:
        main()
