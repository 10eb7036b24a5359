"""The lookups remembered across the files of a collection (key layouts, family decisions, naming-table answers)
change no output: a batch with warm caches writes the same bytes as a fresh process per file, and files that
differ only in a shape or a metadata claim get their own family decision."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import loratools
from loratools import formats
from loratools.families import detect, detect_family, load_families
from synth import layout, synthesize

SDXL = "sdxl__kohya__invokeai-slider-keys-only.json"
SD15_PEFT = "sd15__peft__faithsang.json"
SD2 = "sd2__diffusers_lora_linear__justinjiang.json"
FLUX = "flux1__diffusers_lora_linear__invokeai-cctv.json"  # names and shapes fit Chroma as well: undecided
WAN22 = "wan22__comfy_lora__invokeai-lightx2v-fragment.json"  # Wan 2.1 or 2.2: undecided


def _cache_hits() -> tuple[int, int, int]:
    tables = [f.naming for f in load_families().values() if "naming" in vars(f)]  # the tables built so far
    return (formats._layout.cache_info().hits, detect._remembered.cache_info().hits,
            sum(t.resolve.cache_info().hits + t.rule.cache_info().hits for t in tables))


def _cross_attention_width(lay: dict, width: int) -> dict:
    """The layout with its cross-attention inputs (to_k/to_v of attn2) ``width`` wide: SD 2's 1024 -> SD 1's 768."""
    out = json.loads(json.dumps(lay))
    for key, t in out["tensors"].items():
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            if "down" in key:
                t["shape"] = [t["shape"][0], width]
    return out


@pytest.fixture
def collection(tmp_path):
    """Files of a few trainer configurations, each configuration more than once (other seeds, ranks, claims)."""
    src = tmp_path / "in"
    src.mkdir()
    specs = [(SDXL, 4, None), (SD15_PEFT, 4, None), (SDXL, 8, None), (SD15_PEFT, 2, {"ss_base_model_version": "sd_v1"}),
             (FLUX, 4, {}), (FLUX, 4, {"modelspec.architecture": "flux-1-dev"}), (WAN22, 4, None), (WAN22, 2, None),
             (SD2, 4, None)]
    files = []
    for i, (name, rank, metadata) in enumerate(specs):
        files.append(synthesize(name, src / f"f{i}.safetensors", seed=i, rank=rank, metadata=metadata))
    sd1 = _cross_attention_width(layout(SD2), 768)  # the same names as the SD 2 file, other shapes
    files.append(synthesize("x", src / "f_sd1.safetensors", layout_data=sd1, seed=11, rank=4))
    return files


def test_warm_batch_writes_what_a_fresh_process_writes(collection, tmp_path):
    before = _cache_hits()
    warm = tmp_path / "warm"
    results = [loratools.convert(p, "diffusers", f"{warm}/") for p in collection]
    after = _cache_hits()
    assert all(b > a for a, b in zip(before, after)), (before, after)  # every cache answered some lookups
    assert {r.family for r in results} >= {"sdxl", "sd1", "sd2", "flux1", "unknown"}
    fresh = tmp_path / "fresh"
    for p in collection:
        subprocess.run([sys.executable, "-m", "loratools", "convert", str(p), "--to", "diffusers", "-o", f"{fresh}/"],
                       check=True, capture_output=True)
    written = sorted(q.name for q in warm.iterdir())
    assert written == sorted(q.name for q in fresh.iterdir()) and len(written) == len(collection)
    for name in written:
        assert (warm / name).read_bytes() == (fresh / name).read_bytes(), name


def test_a_shape_or_a_claim_gives_another_decision(collection):
    by_name = {p.name: p for p in collection}
    first = loratools.load(by_name["f8.safetensors"])  # SD 2 widths
    other = loratools.load(by_name["f_sd1.safetensors"])  # the same names, SD 1 widths
    assert (first.family.id, other.family.id) == ("sd2", "sd1")
    unclaimed, claimed = loratools.load(by_name["f4.safetensors"]), loratools.load(by_name["f5.safetensors"])
    assert unclaimed.family.id == "unknown" and sorted(unclaimed.family.candidates) == ["chroma", "flux1"]
    assert (claimed.family.id, claimed.family.variant) == ("flux1", "dev")
    for lora in (first, other, unclaimed, claimed):
        lora.close()


def _evidence(lora) -> list:
    return [detect.ModuleEvidence(m.component, m.name, m.adapter.in_dim, m.adapter.out_dim) for m in lora.modules]


@pytest.mark.parametrize("metadata", [
    {}, {"modelspec.architecture": "flux-1-schnell"}, {"ss_base_model_version": "chroma"},
    {"ss_sd_model_name": "flux1-dev.safetensors"}, {"ss_base_model_version": "sdxl_base_v1-0"},
])
def test_remembered_decisions_equal_fresh_ones(collection, metadata):
    """Through the cache (default families) and without it (the families passed in), claims and all."""
    with loratools.load(collection[4]) as lora:
        evidence = _evidence(lora)
    for _ in range(2):
        assert detect_family(evidence, metadata) == detect_family(evidence, metadata, families=load_families())


def test_every_metadata_key_a_family_reads_is_part_of_the_key(collection):
    """A claim under each key the families name, and a variant's own key (SD 2's v-parameterisation), changes the
    remembered result."""
    with loratools.load(collection[8]) as lora:
        evidence = _evidence(lora)
    plain = detect_family(evidence, {})
    keys = {k for f in load_families().values() for k in f.metadata}
    for key in keys:
        claimed = detect_family(evidence, {key: "true" if key == "ss_v2" else "stable-diffusion-v2 sd_v2 sd21"})
        assert claimed.metadata_claims != plain.metadata_claims, key
    assert detect_family(evidence, {"ss_v_parameterization": "true"}).variant == "v"
    assert plain.variant != "v"


def test_results_are_copies(collection):
    with loratools.load(collection[0]) as lora:
        evidence = _evidence(lora)
    first = detect_family(evidence, {"ss_base_model_version": "sdxl_base_v1-0"})
    expected = detect_family(evidence, {"ss_base_model_version": "sdxl_base_v1-0"}, families=load_families())
    first.evidence.append("changed by a caller")
    first.metadata_claims[0]["value"] = "changed"
    first.alternatives.clear()
    assert detect_family(evidence, {"ss_base_model_version": "sdxl_base_v1-0"}) == expected


def test_naming_answers_depend_on_every_argument():
    """A flattened name is found only as flattened, a block index is the one asked for, and a native path is a
    model rule only in the model's space, whatever was asked before."""
    table = load_families()["sdxl"].naming
    flat = "input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert table.resolve("model", flat, True).native == "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    assert table.resolve("model", flat, False) is None
    assert table.resolve("model", flat.replace("blocks_0", "blocks_1"), True).native.endswith("blocks.1.attn2.to_k")
    native = "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert table.rule("model", native).diffusers == ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",)
    assert table.rule("clip_l", native).diffusers == (native,)


def test_key_layout_depends_on_the_embedding_claims(tmp_path):
    """Two files with the same keys: the one whose metadata marks ``<s1>``/``<s2>`` as embeddings (cloneofsimo PTI)
    keeps them as embeddings, the other reports them as unknown keys, in either order."""
    name = "sd15__cloneofsimo__disney-pti.json"
    claimed = synthesize(name, tmp_path / "claimed.safetensors", seed=1, rank=4)
    plain = synthesize(name, tmp_path / "plain.safetensors", seed=2, rank=4, metadata={})
    for first, second in ((claimed, plain), (plain, claimed)):
        for path in (first, second):
            with loratools.load(path) as lora:
                embeddings = lora.extras.get("embeddings", [])
                unknown = [k for k in lora.unknown_keys if k.startswith("<")]
            assert (embeddings, unknown) == ((["<s1>", "<s2>"], []) if path == claimed else ([], ["<s1>", "<s2>"]))
