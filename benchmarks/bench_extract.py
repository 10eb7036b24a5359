"""extract on a full-size SDXL pair: batched randomised SVD against the dense approach (a full SVD of every ΔW).

    python benchmarks/bench_extract.py [--rank 64] [--dense-modules 20] [--repeat 1] [--before REV]
                                       [--dir DIR] [--device cpu]

Inputs: two fp16 SDXL checkpoints with every tensor of the real SGM layout (fixtures/checkpoints, ~6.9 GB each).
The base holds random weights (std 0.02); the tuned one adds to each of the 754 UNet weights extract reads by
default a fine-tune-like ΔW, 64 terms with σᵢ = 0.05·e^(−i/12) (~0.5% of the weight's norm), and stores the sum in
fp16, whose rounding leaves a flat tail of noise under the terms; every other tensor is the base's. ``--dir`` keeps
the pair there (and reuses it); otherwise it is built in a temporary folder and deleted.

Each variant runs in its own process (peak RSS and CPU time from wait4), the order rotating each round:

  ours       ``loratools.extract(base, tuned, out, rank=R)`` (UNet; reads the pairs, batches, writes kohya)
  before     the same with an earlier revision (``--before REV``, exported with ``git archive``)
  dense      the same pairs read the same way, each ΔW by a full float32 ``torch.linalg.svd``
             (full_matrices=False) cut to R; no write. Its SVDs are timed on ``--dense-modules`` ΔW chosen in
             proportion to each shape and extrapolated per shape to all (said in the output); the reading of all
             pairs is measured.

Accuracy, on the same sampled ΔW: the top R singular values and the retained energy Σₖσ²/‖ΔW‖² of our method
(the batches extract forms) against the float64 dense SVD.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# Children import loratools from the tree they measure: common (which imports it from this checkout) is for the
# parent only.
ROOT = Path(__file__).resolve().parents[1]

LAYOUT = ROOT / "fixtures" / "checkpoints" / "sdxl__sgm__sdmecha.json"
TERMS, SIGMA0, DECAY = 64, 0.05, 12.0


# --- inputs -----------------------------------------------------------------------------------------------------

def changed_weights() -> dict[str, tuple[int, ...]]:
    """The weights extract reads from an SDXL checkpoint by default (UNet, no k×k convs), with their shapes."""
    sys.path.insert(0, str(ROOT))
    from loratools.families import get_family
    from loratools.ops.extract import candidates

    tensors = json.loads(LAYOUT.read_text())["tensors"]

    class Layout:  # what candidates() asks of a Base
        keys = dict.fromkeys(tensors)

        def shape(self, key):
            return tuple(tensors[key]["shape"])

    out = {}
    for key, _, rows, transposed in candidates(Layout(), get_family("sdxl"), False):
        shape = Layout().shape(key)
        if len(shape) >= 2 and rows is None and not transposed and (len(shape) == 2 or shape[2:] == (1, 1)):
            out[key] = shape
    return out


def write_checkpoint(path: Path, tuned: bool) -> Path:
    """The base (``tuned=False``) or the tuned checkpoint, one tensor at a time, both from the same seeds."""
    sys.path.insert(0, str(ROOT))
    from loratools.io.writer import write_safetensors

    tensors = json.loads(LAYOUT.read_text())["tensors"]
    changed = changed_weights() if tuned else {}
    items = []
    for i, (key, t) in enumerate(tensors.items()):
        dtype = "F16" if t["dtype"].startswith("F") else t["dtype"]
        shape = tuple(t["shape"])

        def make(i=i, key=key, shape=shape, dtype=dtype):
            if dtype != "F16":
                return np.zeros(shape, dtype=np.int64)
            w = (np.random.default_rng(i).standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            if key not in changed:
                return w
            rng = np.random.default_rng(100_000 + i)
            m, n = shape[0], math.prod(shape[1:])
            u = rng.standard_normal((m, TERMS), dtype=np.float32) / np.sqrt(m)
            v = rng.standard_normal((TERMS, n), dtype=np.float32) / np.sqrt(n)
            sigma = (SIGMA0 * np.exp(-np.arange(TERMS) / DECAY)).astype(np.float32)
            return (w.astype(np.float32) + ((u * sigma) @ v).reshape(shape)).astype(np.float16)

        items.append((key, dtype, shape, make))
    write_safetensors(path, items, {}, overwrite=True)
    return path


# --- child processes ------------------------------------------------------------------------------------------

def child_ours(base: str, tuned: str, out: str, rank: int, device: str) -> dict:
    import loratools

    t = time.perf_counter()
    r = loratools.extract(base, tuned, out, rank=rank, family="sdxl", device=device, overwrite=True)
    return {"tree": str(Path(loratools.__file__).parents[1]), "seconds": time.perf_counter() - t,
            "modules": len(r.modules),
            "retained": {m["key"]: m["retained_energy"] for m in r.modules}}


def _pairs(base: str, tuned: str):
    """(key, ΔW float32) of every changed weight extract reads, as extract reads them (loratools' readers)."""
    import torch

    from loratools.families import get_family
    from loratools.io.checkpoints import open_base
    from loratools.ops.extract import candidates

    with open_base(base) as b, open_base(tuned) as t:
        for key, _, rows, transposed in candidates(b, get_family("sdxl"), False):
            shape = b.shape(key)
            if len(shape) < 2 or (len(shape) == 4 and tuple(shape[2:]) != (1, 1)):
                continue
            (fb, nb), (ft, nt) = b.keys[key], t.keys[key]
            diff = ft.sf.torch(nt).to(torch.float32) - fb.sf.torch(nb).to(torch.float32)
            if torch.any(diff):
                yield key, diff.flatten(1)


def child_dense(base: str, tuned: str, rank: int, names: list[str]) -> dict:
    """Every pair read; the sampled ΔW by a full float32 SVD cut to ``rank`` (the dense approach)."""
    import torch

    from loratools.ops.lowrank import split_factors

    torch.set_num_threads(1)  # as ours: one intra-op thread per core busy (here one core: the SVDs run in turn)
    wanted, per_key, shapes = set(names), {}, {}
    t = time.perf_counter()
    for key, mat in _pairs(base, tuned):
        shapes[key] = list(mat.shape)
        if key in wanted:
            s0 = time.perf_counter()
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            split_factors(u, s, vh, rank)
            per_key[key] = time.perf_counter() - s0
    return {"seconds": time.perf_counter() - t, "per_key": per_key, "shapes": shapes}


def child_accuracy(base: str, tuned: str, rank: int, names: list[str], retained: dict) -> dict:
    """Our top-k values (batched as extract batches them) at k = rank and rank / 2, and the retained energies extract
    reported (k = rank), against the float64 dense SVD of the same ΔW."""
    import torch

    from loratools.ops.randomized import randomised, top_svd

    wanted, mats = set(names), {}
    for key, mat in _pairs(base, tuned):
        if key in wanted:
            mats[key] = mat
    groups = defaultdict(list)
    for key, mat in mats.items():
        groups[tuple(mat.shape)].append(key)
    exact = {key: torch.linalg.svdvals(mat.double()) for key, mat in mats.items()}
    rows = []
    for k_asked in (rank // 2, rank):
        for shape, keys in groups.items():
            k = min(k_asked, *shape)
            _, s, _ = top_svd(torch.stack([mats[key] for key in keys]), k)
            for i, key in enumerate(keys):
                ref, ours = exact[key], s[i].double()
                total = float(ref.pow(2).sum())
                rows.append({"k": k_asked, "shape": list(shape), "randomised": randomised((1, *shape), k),
                             "err_sigma1": float(((ours - ref[:k]).abs() / ref[0]).max()),
                             "err_sigma_k": float(abs(ours[k - 1] - ref[k - 1]) / ref[k - 1]),
                             "retained_best": float(ref[:k].pow(2).sum()) / total,
                             "retained_ours": float(ours.pow(2).sum()) / total,
                             "retained_reported": retained.get(key) if k_asked == rank else None,
                             "noise_floor": float(ref[TERMS + 10] / ref[0]) if ref.numel() > TERMS + 10 else 0.0,
                             "sigma_k": float(ref[k - 1] / ref[0])})
    return {"rows": rows}


def run_child() -> None:
    args = json.loads(sys.argv[2])
    sys.path.insert(0, args.get("tree") or str(ROOT))
    kind = args["kind"]
    if kind == "dense":
        result = child_dense(args["base"], args["tuned"], args["rank"], args["names"])
    elif kind == "accuracy":
        result = child_accuracy(args["base"], args["tuned"], args["rank"], args["names"], args["retained"])
    else:
        result = child_ours(args["base"], args["tuned"], args["out"], args["rank"], args["device"])
    print(json.dumps(result))


# --- the parent -------------------------------------------------------------------------------------------------

def sample_by_shape(shapes: dict[str, tuple], n: int) -> list[str]:
    groups = defaultdict(list)
    for key, shape in shapes.items():
        groups[(shape[0], math.prod(shape[1:]))].append(key)
    picks = []
    for keys in groups.values():
        count = max(1, round(n * len(keys) / len(shapes)))
        picks += [keys[int(i * len(keys) / count)] for i in range(count)]
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dense-modules", type=int, default=20, help="ΔW whose dense SVD is timed (and checked)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; every variant runs once per round")
    ap.add_argument("--before", default=None, help="also time extract of this git revision")
    ap.add_argument("--dir", default=None, help="keep (and reuse) the checkpoint pair in this folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from common import compile_bytecode, export, in_child, run_child

    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        folder = Path(args.dir) if args.dir else tmp
        folder.mkdir(parents=True, exist_ok=True)
        base, tuned = folder / "sdxl_base.safetensors", folder / "sdxl_tuned.safetensors"
        t = time.perf_counter()
        for path, is_tuned in ((base, False), (tuned, True)):
            if not path.exists():
                in_child(write_checkpoint, path, is_tuned)
        print(f"inputs: SDXL pair, {base.stat().st_size / 2**30:.2f} GB each, {len(changed_weights())} weights changed "
              f"(ready in {time.perf_counter() - t:.0f} s)", flush=True)
        names = sample_by_shape(changed_weights(), args.dense_modules)
        common = {"base": str(base), "tuned": str(tuned), "rank": args.rank}
        ours_child = {**common, "kind": "ours", "out": str(tmp / "x.safetensors"), "device": args.device}
        variants = [("ours: extract (batched, randomised)", ours_child)]
        if args.before:
            variants.append((f"before ({args.before}): extract",
                             {**common, "kind": "ours", "out": str(tmp / "b.safetensors"), "device": args.device,
                              "tree": str(export(args.before, tmp / "before"))}))
        variants.append(("dense: full SVD of every ΔW (no write)", {**common, "kind": "dense", "names": names}))
        runs = defaultdict(list)
        for round_ in range(args.repeat):
            shift = round_ % len(variants)
            for label, child in variants[shift:] + variants[:shift]:
                result = run_child(__file__, child)
                if "tree" in result:  # the tree measured is the one asked for
                    assert Path(result["tree"]) == Path(child.get("tree") or ROOT), (result["tree"], child.get("tree"))
                runs[label].append(result)
                print(f"  round {round_ + 1}: {label}: {result['wall']:.1f} s", flush=True)
        ours = runs[variants[0][0]][-1]
        accuracy = run_child(__file__, {**common, "kind": "accuracy", "names": names, "retained": ours["retained"]})
    _print(args, names, variants, runs, accuracy)


def _print(args, names, variants, runs, accuracy) -> None:
    from common import table

    dense_label = variants[-1][0]
    dense = runs.pop(dense_label)
    shapes = {k: tuple(v) for k, v in dense[0]["shapes"].items()}
    by_shape = defaultdict(list)
    for r in dense:
        for key, sec in r["per_key"].items():
            by_shape[shapes[key]].append(sec)
    counts = defaultdict(int)
    for shape in shapes.values():
        counts[shape] += 1
    svd_all = sum(statistics.mean(by_shape[s]) * counts[s] for s in counts if by_shape[s])
    missing = [s for s in counts if not by_shape[s]]
    read = statistics.median(r["wall"] - sum(r["per_key"].values()) for r in dense)
    dense_wall = read + svd_all
    print(f"dense: full SVDs timed on {len(names)} of {len(shapes)} ΔW (in proportion to each shape) and extrapolated "
          f"per shape: {statistics.median(sum(r['per_key'].values()) for r in dense):.0f} s -> {svd_all:.0f} s; "
          f"reading every pair {read:.0f} s" + (f"; shapes not sampled: {missing}" if missing else ""))
    rows = []
    for label, rs in runs.items():
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        rows.append([label, f"{min(r['wall'] for r in rs):.0f}", f"{med('wall'):.0f}", f"{med('cpu'):.0f}",
                     f"{max(r['rss_mb'] for r in rs):.0f}", f"{dense_wall / med('wall'):.1f}x"])
    rows.append([dense_label + " [extrapolated]", "", f"{dense_wall:.0f}", "",
                 f"{max(r['rss_mb'] for r in dense):.0f}", "1.0x"])
    print(f"rank {args.rank}, {args.repeat} round(s), the order rotating; medians (best wall beside)")
    print(table(rows, ["variant", "best s", "wall s", "CPU s", "peak RSS MB", "vs dense"]))
    acc = accuracy["rows"]
    print(f"\nour top k against the float64 dense SVD of the same ΔW ({len(acc) // 2} sampled); reported: the retained "
          f"energy extract wrote in its report (k = {args.rank})")
    groups = defaultdict(list)
    for row in acc:
        groups[(row["k"], "randomised" if row["randomised"] else "LAPACK SVD", tuple(row["shape"]))].append(row)
    out = []
    for (k, how, shape), rs in sorted(groups.items()):
        reported = [abs(r["retained_reported"] - r["retained_best"]) for r in rs if r["retained_reported"] is not None]
        out.append([k, f"{shape[0]}x{shape[1]}", how, len(rs), f"{max(r['err_sigma1'] for r in rs):.1e}",
                    f"{max(r['err_sigma_k'] for r in rs):.1e}",
                    f"{max(r['retained_best'] - r['retained_ours'] for r in rs):.1e}",
                    f"{max(reported):.1e}" if reported else "",
                    f"{statistics.mean(r['retained_best'] for r in rs):.4f}",
                    f"{max(r['sigma_k'] for r in rs):.1e} / {max(r['noise_floor'] for r in rs):.1e}"])
    print(table(out, ["k", "ΔW", "method", "n", "max |Δσᵢ|/σ₁", "max |Δσ_k|/σ_k", "energy kept short by",
                      "|reported − best|", "best retained", "σ_k/σ₁ / noise/σ₁"]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        run_child()
    else:
        main()
