"""`scan` on a generated collection of 500+ small LoRAs of mixed families and formats (real module names and
dimensions), with duplicates, broken files and metadata contradictions planted: every record matches what
`inspect` says of the file, every planted problem is found, and reruns re-read only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth import layout, synthesize

import loratools
from loratools.catalogue import RECORD_VERSION, walk

# (layout, how many tensors of it to keep): small files, real names and shapes
TEMPLATES = [
    ("sdxl__kohya__invokeai-slider-keys-only.json", 60),
    ("flux1__kohya__invokeai-pokemon.json", 60),
    ("flux1__diffusers__invokeai-hands.json", 60),
    ("sd15__diffusers_peft__faithsang.json", 60),
    ("sd15__lycoris_lokr__lycoris-smartfalcon-f8.json", 60),
    ("wan21__diffusion_model_peft__issue-fragment.json", 60),
    ("qwen_image__diffusers__invokeai-fragment.json", 60),
    ("sd3__kohya_diffusers__issue-fragment.json", 60),
]
COPIES = 64  # per template: 8 × 64 = 512 distinct files


def _subset(name: str, keep: int) -> dict:
    lay = dict(layout(name))
    keys = sorted(lay["tensors"])[:keep]
    lay["tensors"] = {k: lay["tensors"][k] for k in keys}
    return lay


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    planted = {"duplicates": [], "broken": [], "contradictions": []}
    expected: dict[str, tuple] = {}
    for t, (name, keep) in enumerate(TEMPLATES):
        lay = _subset(name, keep)
        folder = root / name.split("__", 1)[0] / f"t{t}"
        folder.mkdir(parents=True)
        first = synthesize(name, folder / "c000.safetensors", seed=0, layout_data=lay)
        info = loratools.inspect(first)
        want = (info["format"], info["family"]["id"], info["modules"])
        for i in range(COPIES):
            path = folder / f"c{i:03d}.safetensors"
            if i:
                synthesize(name, path, seed=i, layout_data=lay)
            expected[str(path)] = want
    # duplicates: a re-saved copy with other metadata has the same tensor bytes (AutoV3)
    src = root / "sdxl" / "t0" / "c001.safetensors"
    dup = root / "dups" / "renamed.safetensors"
    dup.parent.mkdir()
    synthesize(TEMPLATES[0][0], dup, seed=1, layout_data=_subset(*TEMPLATES[0]), metadata={"ss_output_name": "x"})
    expected[str(dup)] = expected[str(src)]
    planted["duplicates"].append(sorted([str(src), str(dup)]))
    # broken files
    for n, content in enumerate([b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
                                 (root / "sdxl" / "t0" / "c002.safetensors").read_bytes()[:5000]]):
        bad = root / "broken" / f"bad{n}.safetensors"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(content)
        planted["broken"].append(str(bad))
    # metadata that contradicts the tensors
    liar = root / "liars" / "dim.safetensors"
    liar.parent.mkdir()
    synthesize(TEMPLATES[0][0], liar, seed=99, layout_data=_subset(*TEMPLATES[0]),
               metadata={"ss_network_dim": "128", "ss_network_alpha": "64", "ss_base_model_version": "sd_v1"})
    planted["contradictions"].append(str(liar))
    # a symlink loop and a second link to the same folder: walked once
    os.symlink(root, root / "dups" / "loop")
    os.symlink(root / "sdxl", root / "also_sdxl")
    return root, expected, planted


def test_every_record_is_right_and_every_planted_problem_found(collection, tmp_path):
    root, expected, planted = collection
    cat = tmp_path / "catalogue.jsonl"
    records = loratools.scan([root], cat, hashes=True)
    by_path = {r["path"]: r for r in records}
    assert len(records) == len(set(os.path.realpath(r["path"]) for r in records))  # each file once
    loras = [r for r in records if r["kind"] == "lora"]
    assert len(loras) >= 500
    for path, (fmt, family, modules) in expected.items():
        r = by_path.get(path) or by_path[next(p for p in by_path if os.path.realpath(p) == os.path.realpath(path))]
        info = r["info"]
        assert (info["format"], info["family"]["id"], info["modules"]) == (fmt, family, modules), path
        assert r["size"] == os.path.getsize(path) and r["hashes"]["sha256"]
    summary = loratools.summarize_catalogue(records)
    real = [sorted(map(os.path.realpath, group)) for group in summary["duplicates"]]
    assert sorted(map(os.path.realpath, planted["duplicates"][0])) in real
    assert all(len(set(group)) == len(group) for group in summary["duplicates"])
    assert {os.path.realpath(b["path"]) for b in summary["broken"]} == set(planted["broken"])
    assert all(b["error"] for b in summary["broken"])
    liars = {os.path.realpath(x["path"]): x["problems"] for x in summary["contradictions"]}
    assert planted["contradictions"][0] in liars
    problems = " ".join(liars[planted["contradictions"][0]])
    assert "ss_network_dim 128" in problems and "ss_network_alpha 64" in problems and "claims sd1" in problems
    # the catalogue on disk holds the same records
    lines = [json.loads(line) for line in cat.read_text().splitlines()]
    assert [x["path"] for x in lines] == [r["path"] for r in records]
    assert all(x["version"] == RECORD_VERSION for x in lines)


def test_a_rerun_reads_only_what_changed(collection, tmp_path):
    root, _, _ = collection
    work = tmp_path / "c"
    shutil.copytree(root / "flux1", work)
    cat = tmp_path / "catalogue.jsonl"
    first = loratools.scan([work], cat)
    assert not any(r.get("reused") for r in first)
    again = loratools.scan([work], cat)
    assert all(r.get("reused") for r in again) and [r["path"] for r in again] == [r["path"] for r in first]
    victim = Path(first[3]["path"])
    victim.write_bytes(b"\x00" * 16)  # now broken: size changed
    (work / "t1" / "c005.safetensors").unlink()
    third = loratools.scan([work], cat)
    changed = [r for r in third if not r.get("reused")]
    assert [r["path"] for r in changed] == [str(victim)] and changed[0]["kind"] == "broken"
    assert len(third) == len(first) - 1
    # asking for hashes now re-reads the records that have none
    assert not any(r.get("reused") for r in loratools.scan([work], cat, hashes=True) if r["kind"] == "lora")


def test_every_lora_record_is_what_inspect_says(collection):
    """Without --hash, records of files that share a structure come from the memo (in each worker with jobs=2)."""
    root, expected, _ = collection
    records = loratools.scan([root], jobs=2)
    loras = [r for r in records if r["kind"] == "lora"]
    assert len(loras) >= 500
    for r in loras:
        assert r["info"] == loratools.inspect(r["path"]), r["path"]


def test_parallel_scan_gives_the_same_records(collection):
    root, _, _ = collection
    one = loratools.scan([root / "wan21", root / "broken"])
    two = loratools.scan([root / "wan21", root / "broken"], jobs=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "mtime_ns"} for r in rs]  # noqa: E731
    assert strip(one) == strip(two)


def test_checkpoints_and_pickles_are_recorded_without_torch(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
               np.zeros((640, 2048), np.float16)}, str(tmp_path / "sdxl_base.safetensors"))
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    code = ("import sys, loratools; rs = loratools.scan([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted((r['kind'], r.get('family')) for r in rs))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('checkpoint', 'sdxl'), ('pickle', None)]"


def test_walk_skips_loops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.safetensors").write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert list(walk([tmp_path])) == [str(tmp_path / "a" / "x.safetensors")]


def test_cli_summary(collection, tmp_path):
    root, _, planted = collection
    out = subprocess.run([sys.executable, "-c", "from loratools.cli import main; main()", "scan", str(root / "broken"),
                          str(root / "liars"), "-o", str(tmp_path / "c.jsonl"), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == 4 and len(summary["broken"]) == 3 and summary["contradictions"]


# --- records of files that share a structure (the memo in loratools/record_memo.py) ---------------------------

KOHYA_METADATA = Path(__file__).resolve().parents[1] / "fixtures" / "layouts" / "metadata"


def _set_alphas(path: Path, value: float) -> None:
    """Rewrite every .alpha tensor of a file in place (same structure, other values)."""
    import numpy as np

    from loratools.io.reader import read_header

    header = read_header(path)
    with open(path, "r+b") as f:
        for t in header.tensors.values():
            if t.name.endswith(".alpha"):
                f.seek(header.data_start + t.begin)
                f.write(np.full(t.numel, value, {"F16": np.float16, "F32": np.float32}[t.dtype]).tobytes())


def _edit_header(src: Path, dest: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of ``src`` whose header text has ``old`` replaced (the data region unchanged)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode("utf-8")
    assert old in text, old
    raw = text.replace(old, new, count).encode("utf-8")
    dest.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return dest


def _expected(path: Path) -> tuple[str, object]:
    try:
        return "lora", loratools.inspect(path)
    except loratools.errors.LoraToolsError as exc:
        return "broken", exc.message


def test_files_sharing_a_structure_get_inspects_own_records(tmp_path):
    """Same tensors, other alphas, other metadata (decisive or not), and headers that differ from a valid one in
    ways only the strict reader judges: every record is what inspect says."""
    from loratools import catalogue

    name, keep = TEMPLATES[0]
    lay = _subset(name, keep)
    kohya = json.loads((KOHYA_METADATA / "kohya_sdxl_lora_metadata__civitai-seed.json").read_text())["metadata"]
    base = synthesize(name, tmp_path / "a000.safetensors", seed=0, layout_data=lay, metadata=kohya)
    one = synthesize(name, tmp_path / "one.safetensors", seed=0, rank=1, layout_data=lay, metadata={"a": "b"})
    made = [base]
    for i, meta in enumerate([{**kohya, "ss_output_name": "other", "modelspec.date": "2023-01-02"},  # irrelevant
                              {**kohya, "ss_base_model_version": "sd_v1"},  # a claim the keys contradict
                              {**kohya, "modelspec.architecture": "flux-1-dev/lora"},
                              {"<s1>": "<embed>"}, {}, {"x": "\\ud800 escaped text"}], start=1):
        made.append(synthesize(name, tmp_path / f"a{i:03d}.safetensors", seed=i, layout_data=lay, metadata=meta))
    for i in range(len(made), len(made) + 6):  # what a trainer writes: other names, dates, tags
        made.append(synthesize(name, tmp_path / f"a{i:03d}.safetensors", seed=i, layout_data=lay,
                               metadata={**kohya, "ss_output_name": f"n{i}", "ss_session_id": str(i)}))
    for i, alpha in enumerate([16.0, 1.0], start=len(made)):
        p = synthesize(name, tmp_path / f"a{i:03d}.safetensors", seed=i, layout_data=lay, metadata=kohya)
        _set_alphas(p, alpha)
        made.append(p)
    hostile = tmp_path / "b"
    hostile.mkdir()
    first_offsets = '"data_offsets":[0,'
    for label, src, old, new in [
        ("minus-zero", base, first_offsets, '"data_offsets":[-0,'),
        ("float", base, first_offsets, '"data_offsets":[0.0,'),
        ("boolean", one, '"shape":[1,', '"shape":[true,'),
        ("space", base, '{"__metadata__":', '{ "__metadata__":'),
        ("repeated-key", base, '{"__metadata__":{', '{"__metadata__":{"ss_clip_skip":"1",'),
        ("number", base, '{"__metadata__":{', '{"__metadata__":{"n":1,'),
        ("surrogate", base, '{"__metadata__":{', '{"__metadata__":{"s":"\\ud800",'),
        ("not-object", one, '{"__metadata__":{"a":"b"}', '{"__metadata__":[["a","b"]]'),
        ("null", one, '{"__metadata__":{"a":"b"}', '{"__metadata__":null'),
    ]:
        made.append(_edit_header(src, hostile / f"{label}.safetensors", old, new))
    cut = hostile / "truncated.safetensors"
    cut.write_bytes(base.read_bytes()[:-2])
    made.append(cut)

    hits = catalogue._MEMO.hits
    records = {r["path"]: r for r in loratools.scan([tmp_path])}
    assert catalogue._MEMO.hits - hits >= 6  # the shared structure was reused, not inspected again
    kinds = {}
    for path in made:
        kind, want = _expected(path)
        r = records[str(path)]
        kinds[path.stem] = r["kind"]
        assert r["kind"] == kind, (path, r.get("error"))
        assert (r["info"] if kind == "lora" else r["error"]) == want, path
    assert kinds["a002"] == "lora" and "claims sd1" in " ".join(records[str(made[2])]["problems"])
    assert {kinds[k] for k in ("minus-zero", "float", "boolean", "repeated-key", "number", "surrogate",
                               "not-object", "truncated")} == {"broken"}
    assert kinds["space"] == kinds["null"] == "lora"
    alphas = {records[str(p)]["info"]["alpha"]["common"] for p in made[-12:-10]}
    assert alphas == {16.0, 1.0}
    # every record handed out is its own object
    again = loratools.scan([tmp_path])
    again[0]["info"]["family"]["id"] = "changed"
    assert loratools.scan([tmp_path])[0]["info"]["family"]["id"] != "changed"


def test_only_decisive_metadata_changes_a_record(tmp_path):
    """The memo keys records by the metadata keys families and formats read (record_memo.decisive_metadata_keys):
    realistic metadata without those keys must leave inspect's record unchanged beyond the metadata field."""
    from loratools.record_memo import PER_FILE, decisive_metadata_keys

    decisive = set(decisive_metadata_keys())
    assert {"ss_base_model_version", "modelspec.architecture", "lora_adapter_metadata"} <= decisive
    kohya = json.loads((KOHYA_METADATA / "kohya_sdxl_lora_metadata__civitai-seed.json").read_text())["metadata"]
    templates = json.loads((KOHYA_METADATA / "modelspec_templates__onetrainer.json").read_text())["templates"]
    samples = [kohya, templates["flux_dev_1.0-lora.json"], templates["sd_xl_base_1.0-lora.json"]]
    strip = lambda info: {k: v for k, v in info.items() if k not in PER_FILE}  # noqa: E731
    for t, (name, keep) in enumerate(TEMPLATES):
        lay = _subset(name, keep)
        bare = strip(loratools.inspect(synthesize(name, tmp_path / f"{t}.safetensors", layout_data=lay, metadata={})))
        for s, sample in enumerate(samples):
            meta = {k: v for k, v in sample.items() if k not in decisive}
            path = synthesize(name, tmp_path / f"{t}-{s}.safetensors", layout_data=lay, metadata=meta)
            assert strip(loratools.inspect(path)) == bare, (name, sorted(meta))


def test_a_parquet_catalogue_holds_the_same_records_and_reruns_incrementally(collection, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root, _, _ = collection
    work = tmp_path / "c"
    shutil.copytree(root / "flux1", work)
    first = loratools.scan([work], tmp_path / "catalogue.jsonl", hashes=True)
    table = loratools.scan([work], tmp_path / "catalogue.parquet", hashes=True)
    assert [json.dumps(r, sort_keys=True) for r in table] == [json.dumps(r, sort_keys=True) for r in first]
    rows = pq.read_table(tmp_path / "catalogue.parquet").to_pylist()
    assert [r["path"] for r in rows] == [r["path"] for r in first]
    for row, rec in zip(rows, first):  # the query columns say what the record says
        info = rec.get("info") or {}
        assert (row["kind"], row["family"], row["format"], row["modules"]) == (
            rec["kind"], (info.get("family") or {}).get("id"), info.get("format"), info.get("modules"))
        assert row["sha256"] == (rec.get("hashes") or {}).get("sha256") and json.loads(row["record"]) == rec
    again = loratools.scan([work], tmp_path / "catalogue.parquet", hashes=True)
    assert all(r.get("reused") for r in again)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(loratools.errors.LoraToolsError, match="not a loratools scan catalogue"):
        loratools.scan([work], tmp_path / "bad.parquet")


def test_a_diffusers_pipeline_folder_is_one_checkpoint_told_by_its_model_index(tmp_path):
    """A folder with model_index.json (shards, an index, a VAE) is one checkpoint record, its family from the
    pipeline class and its weights, not one record per file; a LoRA beside it keeps its own record; with --hash
    each weights file is hashed, and a rerun reuses the record."""
    from test_bake import _diffusers_folder

    _diffusers_folder(tmp_path / "models", 32)
    pipeline = tmp_path / "models" / "base"
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    synthesize("sd15__peft__faithsang.json", tmp_path / "models" / "style.safetensors", seed=1)
    cat = tmp_path / "catalogue.jsonl"
    records = {Path(r["path"]).name: r for r in loratools.scan([tmp_path / "models"], cat, hashes=True)}
    assert set(records) == {"base", "style.safetensors"}
    ckpt = records["base"]
    assert ckpt["kind"] == "checkpoint" and ckpt["family"] == "flux1" and ckpt["error"] is None
    assert "model_index.json (FluxPipeline)" in ckpt["told_by"] and ckpt["tensors"] == 6
    files = ckpt["hashes"]["files"]
    assert sorted(files) == sorted(str(p.relative_to(pipeline)) for p in pipeline.rglob("*.safetensors"))
    assert all(len(h["sha256"]) == 64 for h in files.values())
    assert records["style.safetensors"]["kind"] == "lora"
    again = loratools.scan([tmp_path / "models"], cat, hashes=True)
    assert all(r.get("reused") for r in again)
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 8)
    broken = {Path(r["path"]).name: r for r in loratools.scan([tmp_path / "models"], cat)}["base"]
    assert broken["kind"] == "broken" and "\n" not in broken["error"] and not broken.get("reused")


def test_records_with_hashes_of_folders_and_embedded_hashes_are_reused(tmp_path):
    """--hash records whose hashes hold more than hex text (a PEFT folder's per-file hashes, a kohya file's
    embedded sshs_model_hash and whether it matches) are valid records: a rerun reuses them."""
    from loratools.io.reader import SafetensorsFile
    from loratools.io.writer import write_safetensors

    synthesize("sdxl__kohya__invokeai-slider-keys-only.json", tmp_path / "k.safetensors", seed=2)
    with SafetensorsFile(tmp_path / "k.safetensors") as src:
        items = [(k, i.dtype, i.shape, src.read_bytes(k)) for k, i in src.header.tensors.items()]
        write_safetensors(tmp_path / "embedded.safetensors", items, {**src.metadata, "sshs_model_hash": "0x1234"})
    loratools.convert(tmp_path / "k.safetensors", "peft", tmp_path / "peft")
    (tmp_path / "k.safetensors").unlink()
    cat = tmp_path / "catalogue.jsonl"
    first = {Path(r["path"]).name: r for r in loratools.scan([tmp_path], cat, hashes=True)}
    assert first["embedded.safetensors"]["hashes"]["embedded_matches"] is False
    assert "files" in first["peft"]["hashes"]
    assert all(r.get("reused") for r in loratools.scan([tmp_path], cat, hashes=True))
