"""Family detection against real LoRA and checkpoint layouts (key names and shapes of real files)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from loratools.errors import UnknownFamily
from loratools.families import FAMILY_IDS, ModuleEvidence, detect_family, encoders, get_family, load_families

_HERE = Path(__file__).resolve()
LAYOUTS = next((p for p in (_HERE.parents[1] / "fixtures" / "layouts", _HERE.parents[2] / "shared" / "lora-layouts")
                if p.is_dir() and any(p.glob("*__*__*.json"))), None)

REQUIRED = {"sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "sd35_large", "flux1", "flux2", "chroma", "hunyuan_video",
            "wan21", "wan22", "ltxv", "mochi", "qwen_image", "hidream", "lumina2", "z_image", "anima", "krea2", "ltx2"}

# ----------------------------------------------------------------------------------------- layout -> evidence

_PREFIXES = [  # (prefix, component); the first that matches wins
    ("lora_unet_", "model"), ("lora_transformer_", "model"), ("lycoris_", "model"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("base_model.model.", "model"), ("model.diffusion_model.", "model"), ("diffusion_model.", "model"),
    ("transformer.", "model"), ("unet.", "model"), ("net.", "model"),
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"), ("cond_stage_model.transformer.", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.t5xxl.transformer.", "te3"),
]
_SKIP = ("first_stage_model.", "vae.", "conditioner.embedders.1.", "conditioner.embedders.0.model.",
         "cond_stage_model.model.", "text_encoders.clip_g.", "model_ema.")
_ROLE = re.compile(
    r"\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|lora_A|lora_B|lora\.down\.weight"
    r"|lora\.up\.weight|down\.weight|up\.weight|lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|alpha|dora_scale|diff|diff_b"
    r"|lora_B\.bias|scale)$")


def layout_evidence(layout: dict) -> list[ModuleEvidence]:
    """Turn a layout's key -> shape table into the evidence the format layer would produce."""
    checkpoint = layout["kind"] == "checkpoint"
    mods: dict[tuple[str, str], dict] = {}
    for key, info in layout["tensors"].items():
        if key.startswith(_SKIP):
            continue
        comp, rest = "model", key
        for prefix, c in _PREFIXES:
            if key.startswith(prefix):
                comp, rest = c, key[len(prefix):]
                break
        shape = info.get("shape")
        if checkpoint:
            if not rest.endswith(".weight") or (shape is not None and len(shape) < 2):
                continue
            name, role = rest[: -len(".weight")], "weight"
        else:
            m = _ROLE.search(rest)
            name, role = (rest[: m.start()], m["role"]) if m else (rest.rsplit(".", 1)[0], "other")
        name = re.sub(r"\.processor\.(to_(?:q|k|v|out))_lora$", r".\1", name)
        mods.setdefault((comp, name), {})[role] = shape
    out = []
    for (comp, name), roles in mods.items():
        out.append(ModuleEvidence(comp, name, *_dims(roles)))
    return out


def _dims(roles: dict) -> tuple[int | None, int | None]:
    def get(*names):
        return next((roles[n] for n in names if roles.get(n)), None)
    if "weight" in roles and roles["weight"]:
        return roles["weight"][1], roles["weight"][0]
    down = get("lora_down.weight", "lora_A.weight", "lora_A", "lora.down.weight", "down.weight")
    up = get("lora_up.weight", "lora_B.weight", "lora_B", "lora.up.weight", "up.weight")
    if down or up:
        return (down[1] if down else None), (up[0] if up else None)
    w1 = get("lokr_w1") or (lambda a, b: a and b and [a[0], b[1]])(get("lokr_w1_a"), get("lokr_w1_b"))
    w2 = get("lokr_w2") or (lambda a, b: a and b and [a[0], b[1]])(get("lokr_w2_a"), get("lokr_w2_b"))
    if w1 and w2:
        return w1[1] * w2[1], w1[0] * w2[0]
    return None, None


def _layouts(kind: str):
    if LAYOUTS is None:
        return []
    return sorted(p for p in LAYOUTS.glob("*__*__*.json") if json.loads(p.read_text())["kind"] == kind)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _find(name: str) -> Path | None:
    """A layout by file name: the project's fixtures first, then the shared collection beside the repository."""
    for folder in (_HERE.parents[1] / "fixtures" / "layouts", _HERE.parents[2] / "shared" / "lora-layouts"):
        if (folder / name).is_file():
            return folder / name
    return None


def _expected(layout_name: str) -> str:
    fam = layout_name.split("__", 1)[0]
    return {"sd15": "sd1"}.get(fam, fam)


def _top_ids(r) -> set[str]:
    """The families the evidence cannot separate: the candidates of an undecided result, else the winner and
    every alternative tied with it."""
    if not r.decided:
        assert r.candidates and r.reason, r
        return set(r.candidates)
    return {r.id} | {a["id"] for a in r.alternatives if a["confidence"] == r.confidence}


# No module names to read: positional keys (unet:0:down, the targets live in the metadata) and a broken conversion
# whose LoRA suffixes are glued to the module names.
NO_NAMES = {"sd15__cloneofsimo__analog-svd-rank4.json", "sd15__cloneofsimo__disney-pti.json",
            "sd15__malformed__timohavdk-bad-convert.json"}


# ------------------------------------------------------------------------------------------------ data files


def test_family_ids_and_data_files():
    assert REQUIRED <= set(FAMILY_IDS)
    families = load_families()
    assert set(families) == set(FAMILY_IDS)
    assert load_families() is families  # parsed once
    for fid, fam in families.items():
        assert fam.id == fid and fam.name and fam.tells
        assert fam.model_component in ("unet", "transformer")
        assert fam.modules, fid
        assert set(fam.data) <= {"id", "name", "model_component", "tells", "detect", "text_encoders", "naming",
                                 "checkpoint"}, fid
        assert "prior" not in fam.data and "prior" not in fam.data["detect"], fid  # evidence decides, never a prior
        assert all(e in encoders().by_id for ids in fam.text_encoders.values() for e in ids), fid


def test_get_family_and_unknown_id_suggestion():
    assert get_family("flux1").name == "FLUX.1"
    with pytest.raises(UnknownFamily) as err:
        get_family("sdxll")
    assert str(err.value) == "unknown family 'sdxll'; did you mean 'sdxl'?"
    with pytest.raises(UnknownFamily, match="did you mean 'wan21'"):
        get_family("wan2.1")


# ------------------------------------------------------------------------------------------ real LoRA layouts


@pytest.mark.skipif(LAYOUTS is None, reason="no layout files")
@pytest.mark.parametrize("path", _layouts("lora"), ids=lambda p: p.name)
def test_lora_layouts(path):
    layout = _load(path)
    result = detect_family(layout_evidence(layout), layout.get("metadata", {}))
    assert 0.0 <= result.confidence <= 1.0
    if path.name in NO_NAMES:
        assert result.id in ("unknown", "sd1")
        return
    want = _expected(path.name)
    if want == "sd3":  # the sd3 layouts hold SD3 Medium and SD3.5 Large files
        want = result.id if result.id in ("sd3", "sd35_large") else "sd3"
    if result.id != want:
        # only key names without the shapes that would separate the look-alikes: a tie, said to be one
        assert want in _top_ids(result), (result.id, result.alternatives)
        assert not result.decided or result.confidence <= 0.5
    assert result.model_component in ("unet", "transformer", "model")
    assert result.evidence


@pytest.mark.skipif(LAYOUTS is None, reason="no layout files")
def test_no_family_order_or_prior_decides():
    """The same answer, confidence and candidates for every real layout whether the families are examined in their
    usual order or reversed: ties are broken by evidence, never by which family comes first."""
    every = load_families()
    backwards = dict(reversed(list(every.items())))
    for path in _layouts("lora") + _layouts("checkpoint"):
        layout = _load(path)
        evidence, metadata = layout_evidence(layout), layout.get("metadata", {})
        a, b = detect_family(evidence, metadata), detect_family(evidence, metadata, families=backwards)
        assert (a.id, a.variant, a.confidence, sorted(a.candidates)) == (
            b.id, b.variant, b.confidence, sorted(b.candidates)), path.name


@pytest.mark.skipif(LAYOUTS is None, reason="no layout files")
def test_decisive_layouts_are_confident():
    for name, fid, variant in [
        ("flux1__kohya__invokeai-te1-te3.json", "flux1", None),
        ("flux1__diffusers__invokeai-hyper-norm-out.json", "flux1", None),
        ("flux1__bfl_control_lora__invokeai-depth.json", "flux1", "control"),
        ("flux1__xlabs__invokeai.json", "flux1", None),
        ("sd15__lycoris_lokr__lycoris-smartfalcon-f8.json", "sd1", None),
        ("sd2__diffusers_lora_linear__justinjiang.json", "sd2", None),
        ("sdxl__diffusers_attnproc__srikanth.json", "sdxl", None),
        ("sdxl__kohya__invokeai-slider-keys-only.json", "sdxl", None),
        ("ltx2__diffusion_model_peft__invokeai-ltx25-distilled-fragment.json", "ltx2", None),
        ("krea2__kohya__invokeai-fragment.json", "krea2", None),
        ("qwen_image__kohya_lokr__invokeai-fragment.json", "qwen_image", None),
        ("anima__kohya__invokeai-fragment.json", "anima", None),
        ("wan21__comfy_lora_diff__issue-fragment.json", "wan21", "i2v"),
    ]:
        path = _find(name)
        if path is None:
            continue
        layout = _load(path)
        r = detect_family(layout_evidence(layout), layout.get("metadata", {}))
        assert (r.id, r.variant) == (fid, variant), name
        assert r.confidence >= 0.55, (name, r.confidence)


@pytest.mark.skipif(LAYOUTS is None, reason="no layout files")
def test_keys_only_look_alikes_are_reported_as_ties():
    for name, tied in [
        ("hunyuan_video__comfy_lora_diff__issue-fragment.json", {"flux1", "hunyuan_video"}),
        ("wan22__comfy_lora__invokeai-lightx2v-fragment.json", {"wan21", "wan22"}),
        ("sd15__kohya__safetensorsutil-keys-only.json", {"sd1", "sd2"}),
        ("sd3__kohya_diffusers__issue-fragment.json", {"sd3", "sd35_large", "flux1"}),
    ]:
        path = _find(name)
        if path is None:
            continue
        r = detect_family(layout_evidence(_load(path)), {})
        assert r.id == "unknown" and tied <= set(r.candidates), (name, r.id, r.candidates)
        assert r.confidence == 0.0 and "do not separate them" in r.reason
        assert tied <= {a["id"] for a in r.alternatives}  # each candidate listed with what it matched


def test_cosmos_and_ltx_video_diffusers_names_tie_until_the_cross_attention_tells():
    """Anima's DiT in diffusers names (CosmosTransformer3DModel) and LTX-Video 2B share the names, the width (2048),
    the MLP (8192) and the block count (28): a LoRA on self-attention and MLP only is a tie, never a guess; the
    cross-attention keys and values tell them apart (LLM adapter 1024 wide, LTX-Video 2048)."""
    def lora(kv_in: int | None) -> list[ModuleEvidence]:
        ev = []
        for i in range(28):
            ev += [ModuleEvidence("model", f"transformer_blocks.{i}.attn1.{p}", 2048, 2048)
                   for p in ("to_q", "to_k", "to_v", "to_out.0")]
            ev += [ModuleEvidence("model", f"transformer_blocks.{i}.ff.net.0.proj", 2048, 8192),
                   ModuleEvidence("model", f"transformer_blocks.{i}.ff.net.2", 8192, 2048)]
            if kv_in:
                ev += [ModuleEvidence("model", f"transformer_blocks.{i}.attn2.{p}", kv_in, 2048) for p in ("to_k", "to_v")]
        return ev

    r = detect_family(lora(None), {})
    assert r.id == "unknown" and set(r.candidates) == {"anima", "ltxv"}, (r.id, r.candidates)
    assert detect_family(lora(2048), {}).id == "ltxv"
    assert detect_family(lora(1024), {}).id == "anima"


def test_malformed_layout_does_not_crash():
    path = _find("sd15__malformed__timohavdk-bad-convert.json")
    if path is None:
        pytest.skip("layout not available")
    r = detect_family(layout_evidence(_load(path)), {})
    assert r.id in ("unknown", "sd1")
    if r.id == "unknown":
        assert r.reason


@pytest.mark.parametrize("name, fid, variant", [
    ("flux1__bfl__sdmecha-dev-transformer.json", "flux1", None),
    ("flux1__diffusers__dwcqwcqw-transformer-keys-only.json", "flux1", None),
    ("flux2__bfl__invokeai-klein9b-fragment.json", "flux2", "klein-9b"),
    ("flux2__bfl_fp8__invokeai-klein4b-fragment.json", "flux2", "klein-4b"),
    ("flux2__comfy_fp8mixed__invokeai-dev-fragment.json", "flux2", "dev"),
    ("sd15__ldm__sdmecha.json", "sd1", None),
    ("sdxl__sgm__sdmecha.json", "sdxl", None),
    ("sdxl__diffusers__sdmecha-unet.json", "sdxl", None),
    ("sdxl_refiner__ldm__aitoolkit-keys-derived.json", "sdxl_refiner", None),
    ("ssd1b__ldm__aitoolkit-keys-derived.json", "sdxl", None),
    ("sd3__comfy_bundle__sdmecha-medium.json", "sd3", None),
    ("sd3__sai__invokeai-sd35-large.json", "sd35_large", None),
    ("sd3__diffusers__revl-sd35-large-transformer-keys-only.json", "sd35_large", None),
    ("mochi__diffusers__tixell-transformer-keys-only.json", "mochi", None),
    ("z_image__comfy__invokeai-fragment.json", "z_image", None),
    ("anima__comfy__invokeai-fragment.json", "anima", None),
])
def test_checkpoint_module_names(name, fid, variant):
    path = _find(name)
    if path is None:
        pytest.skip("layout not available")
    r = detect_family(layout_evidence(_load(path)), {})
    assert (r.id, r.variant) == (fid, variant)
    assert r.confidence > 0.5


# ------------------------------------------------------------------------------------------- hand-made files


def _flux_bfl(hidden=3072, double=19, single=38, mod=True):
    h, ev = hidden, []
    for i in range(double):
        for s in ("img", "txt"):
            ev += [ModuleEvidence("model", f"double_blocks_{i}_{s}_attn_qkv", h, 3 * h),
                   ModuleEvidence("model", f"double_blocks_{i}_{s}_attn_proj", h, h),
                   ModuleEvidence("model", f"double_blocks_{i}_{s}_mlp_0", h, 4 * h),
                   ModuleEvidence("model", f"double_blocks_{i}_{s}_mlp_2", 4 * h, h)]
            if mod:
                ev.append(ModuleEvidence("model", f"double_blocks_{i}_{s}_mod_lin", h, 6 * h))
    for i in range(single):
        ev += [ModuleEvidence("model", f"single_blocks.{i}.linear1", h, 7 * h),
               ModuleEvidence("model", f"single_blocks.{i}.linear2", 5 * h, h)]
        if mod:
            ev.append(ModuleEvidence("model", f"single_blocks.{i}.modulation.lin", h, 3 * h))
    return ev


def _clip_l(component="te1", width=768, layers=12):
    return [ModuleEvidence(component, f"text_model.encoder.layers.{i}.{m}", width, width)
            for i in range(layers) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]


def _sd_unet(context=768, widths=(320, 640, 1280), cross=True, first_block=0):
    ev = []
    for b, w in enumerate(widths, start=first_block):
        for a in (0, 1):
            base = f"down_blocks.{b}.attentions.{a}.transformer_blocks.0"
            ev += [ModuleEvidence("model", f"{base}.attn1.to_{p}", w, w) for p in "qkv"]
            if cross:
                ev += [ModuleEvidence("model", f"{base}.attn2.to_q", w, w),
                       ModuleEvidence("model", f"{base}.attn2.to_k", context, w),
                       ModuleEvidence("model", f"{base}.attn2.to_v", context, w)]
    return ev


def test_flux_at_released_width_is_flux1():
    r = detect_family(_flux_bfl() + _clip_l(), {})
    assert r.id == "flux1" and r.confidence > 0.9 and not r.mismatches
    assert "19 double blocks (FLUX.1 layout)" in r.evidence
    assert r.alternatives[0]["id"] == "hunyuan_video"


def test_tiny_flux_keeps_the_family_and_reports_the_dimensions():
    full = detect_family(_flux_bfl(), {})
    tiny = detect_family(_flux_bfl(hidden=64), {})
    assert tiny.id == "flux1"
    assert tiny.mismatches and any("found in 64" in m for m in tiny.mismatches)
    assert tiny.confidence < full.confidence
    # two blocks of each kind at a toy width: HunyuanVideo's names fit as well, so nothing is decided
    shallow = detect_family(_flux_bfl(hidden=64, double=2, single=2), {})
    assert shallow.id == "unknown" and shallow.candidates == ["flux1", "hunyuan_video"] and shallow.mismatches
    assert "equally well" in shallow.reason


def test_text_encoder_only_file_is_not_confidently_sd1():
    r = detect_family(_clip_l(), {})
    assert not (r.id == "sd1" and r.confidence > 0.5)
    if r.id == "unknown":
        assert "text-encoder" in r.reason
        assert {"sd1", "sdxl", "flux1"} <= {a["id"] for a in r.alternatives} | {r.id}


def test_metadata_that_contradicts_the_keys_loses():
    md = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
          "ss_v2": "False"}
    r = detect_family(_sd_unet() + _clip_l(), md)
    assert r.id == "sd1"
    claims = {c["key"]: c for c in r.metadata_claims}
    assert claims["ss_base_model_version"]["family"] == "sdxl"
    assert claims["ss_base_model_version"]["agrees"] is False
    assert claims["modelspec.architecture"]["agrees"] is False
    assert claims["ss_v2"]["family"] is None and claims["ss_v2"]["agrees"] is None
    assert any("claims sdxl" in m for m in r.mismatches)


def test_metadata_that_agrees_is_recorded():
    r = detect_family(_sd_unet(), {"ss_base_model_version": "sd_v1"})
    assert r.id == "sd1" and r.metadata_claims[0]["agrees"] is True


def test_cross_attention_width_separates_sd1_sd2_sdxl():
    assert detect_family(_sd_unet(768), {}).id == "sd1"
    assert detect_family(_sd_unet(1024), {}).id == "sd2"
    assert detect_family(_sd_unet(2048, widths=(640, 1280), first_block=1), {}).id == "sdxl"
    # SDXL has no attention in its first down block: such a file is not confidently anything
    odd = detect_family(_sd_unet(2048, widths=(640, 1280), first_block=0), {})
    assert odd.confidence < 0.5 and any("down_blocks_0" in m for m in odd.mismatches)


def test_sd1_sd2_self_attention_only_tie_is_broken_by_metadata():
    ev = _sd_unet(cross=False)
    plain = detect_family(ev, {})
    assert plain.id == "unknown" and plain.candidates == ["sd1", "sd2"] and "equally well" in plain.reason
    v2 = detect_family(ev, {"ss_v2": "True"})
    assert v2.id == "sd2" and v2.confidence <= 0.7
    assert detect_family(ev + _clip_l(width=1024, layers=23), {}).id == "sd2"


def test_wan_i2v_variant():
    ev = []
    for i in range(40):
        ev += [ModuleEvidence("model", f"blocks.{i}.{a}.{p}", 5120, 5120)
               for a in ("self_attn", "cross_attn") for p in "qkvo"]
        ev += [ModuleEvidence("model", f"blocks.{i}.cross_attn.{p}", 5120, 5120) for p in ("k_img", "v_img")]
        ev += [ModuleEvidence("model", f"blocks.{i}.ffn.0", 5120, 13824),
               ModuleEvidence("model", f"blocks.{i}.ffn.2", 13824, 5120)]
    r = detect_family(ev, {})
    assert r.id == "wan21" and "i2v" in r.variant and "14b" in r.variant
    small = [ModuleEvidence("model", f"blocks_{i}_self_attn_q", 1536, 1536) for i in range(30)]
    assert detect_family(small, {}).variant == "1.3b"
    ti2v = [ModuleEvidence("model", f"blocks.{i}.attn1.to_q", 3072, 3072) for i in range(30)]
    r = detect_family(ti2v, {})
    assert (r.id, r.variant) == ("wan22", "5b")


def test_wan14b_tie_is_broken_only_by_metadata():
    ev = [ModuleEvidence("model", f"blocks.{i}.self_attn.{p}", 5120, 5120) for i in range(40) for p in "qkvo"]
    r = detect_family(ev, {})
    assert {"wan21", "wan22"} <= _top_ids(r) and r.confidence <= 0.5
    r = detect_family(ev, {"ss_base_model_version": "wan2.2_a14b"})
    assert r.id == "wan22" and r.variant == "a14b"


def test_flux1_chroma_tie_is_broken_by_modelspec_architecture():
    ev = _flux_bfl(mod=False)
    plain = detect_family(ev, {})
    assert plain.id == "unknown" and plain.candidates == ["chroma", "flux1"] and plain.confidence == 0.0
    r = detect_family(ev, {"modelspec.architecture": "chroma/lora"})
    assert r.id == "chroma" and 0.5 < r.confidence <= 0.7
    assert r.metadata_claims[0]["agrees"] is True
    assert any("decides" in e for e in r.evidence)
    # with modulation layers the keys rule Chroma out, whatever the metadata says
    r = detect_family(_flux_bfl(), {"modelspec.architecture": "Chroma1/lora"})
    assert r.id == "flux1" and r.metadata_claims[0]["agrees"] is False


def test_flux1_variant_only_from_metadata():
    assert detect_family(_flux_bfl(), {}).variant is None
    assert detect_family(_flux_bfl(), {"modelspec.architecture": "flux-1-dev/lora"}).variant == "dev"
    assert detect_family(_flux_bfl(), {"modelspec.architecture": "flux-1-schnell/lora"}).variant == "schnell"


def test_flux2_dimensions():
    ev = [ModuleEvidence("model", f"double_blocks.{i}.img_attn.qkv", 6144, 18432) for i in range(8)]
    ev += [ModuleEvidence("model", f"single_blocks.{i}.linear1", 6144, 55296) for i in range(48)]
    r = detect_family(ev, {})
    assert (r.id, r.variant) == ("flux2", "dev")


def test_lumina2_and_z_image_share_names_but_not_width():
    def layers(dim, qkv):
        return [ModuleEvidence("model", f"layers.{i}.attention.qkv", dim, qkv) for i in range(26)]
    assert detect_family(layers(2304, 3840), {}).id == "lumina2"
    assert detect_family(layers(3840, 11520), {}).id == "z_image"
    kohya = [ModuleEvidence("model", f"_layers_{i}_attention_to_q", 3840, 3840) for i in range(30)]
    assert detect_family(kohya, {}).id == "z_image"


def test_qwen_image_is_not_diffusers_flux():
    ev = [ModuleEvidence("model", f"transformer_blocks.{i}.{m}", 3072, o)
          for i in range(60) for m, o in (("attn.to_q", 3072), ("img_mlp.net.0.proj", 12288), ("txt_mod.1", 18432))]
    r = detect_family(ev, {})
    assert r.id == "qwen_image" and r.confidence > 0.9
    assert "60 transformer blocks (Qwen-Image layout)" in r.evidence


def test_nothing_matches():
    r = detect_family([ModuleEvidence("model", "foo.bar", 3, 4), ModuleEvidence("unknown", "baz", None, None)], {})
    assert r.id == "unknown" and r.reason == "no family rule matched any module name" and r.model_component == "model"
    assert detect_family([], {}).id == "unknown"


def _sdxl_locon() -> list[ModuleEvidence]:
    """A full SDXL LoCon: every attention and resnet layer of the UNet plus both text encoders (~1900 modules)."""
    ev = []
    attn = [("down_blocks.1", 2, 2, 640), ("down_blocks.2", 2, 10, 1280), ("up_blocks.0", 3, 10, 1280),
            ("up_blocks.1", 3, 2, 640)]
    for block, n_attn, depth, w in attn + [("mid_block", 1, 10, 1280)]:
        for a in range(n_attn):
            base = f"{block}.attentions.{a}"
            ev += [ModuleEvidence("model", f"{base}.{p}", w, w) for p in ("proj_in", "proj_out")]
            for t in range(depth):
                tb = f"{base}.transformer_blocks.{t}"
                ev += [ModuleEvidence("model", f"{tb}.attn{k}.{p}", 2048 if k == 2 and p in ("to_k", "to_v") else w, w)
                       for k in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
                ev += [ModuleEvidence("model", f"{tb}.ff.net.0.proj", w, 8 * w),
                       ModuleEvidence("model", f"{tb}.ff.net.2", 4 * w, w)]
    for block, n_res, w in (("down_blocks.0", 2, 320), ("down_blocks.1", 2, 640), ("down_blocks.2", 2, 1280),
                            ("mid_block", 2, 1280), ("up_blocks.0", 3, 1280), ("up_blocks.1", 3, 640),
                            ("up_blocks.2", 3, 320)):
        for r in range(n_res):
            ev += [ModuleEvidence("model", f"{block}.resnets.{r}.{p}", w, w)
                   for p in ("conv1", "conv2", "time_emb_proj", "conv_shortcut")]
    for te, width, layers in (("te1", 768, 12), ("te2", 1280, 32)):
        ev += [ModuleEvidence(te, f"text_model.encoder.layers.{i}.{m}", width, width)
               for i in range(layers) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.out_proj")]
        ev += [ModuleEvidence(te, f"text_model.encoder.layers.{i}.mlp.fc1", width, 4 * width) for i in range(layers)]
        ev += [ModuleEvidence(te, f"text_model.encoder.layers.{i}.mlp.fc2", 4 * width, width) for i in range(layers)]
    return ev


def test_full_sdxl_locon():
    r = detect_family(_sdxl_locon(), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert r.id == "sdxl" and r.confidence > 0.9 and not r.mismatches
    assert "10 transformer blocks per attention (SDXL depth)" in r.evidence
    assert "te2: OpenCLIP-G (width 1280)" in r.evidence


def test_large_files_are_fast():
    sdxl = _sdxl_locon()
    many = []
    for i in range(60):
        many += [ModuleEvidence("model", f"transformer_blocks.{i}.{m}", 3072, 3072)
                 for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                           "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                           "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1")]
    many += sdxl + _flux_bfl()  # a mixture no real file has: it makes every family do its full work
    many += [ModuleEvidence("model", f"blocks.{i}.{a}.{p}", 5120, 5120)
             for i in range(40) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    many += [ModuleEvidence("model", f"layers.{i}.attention.qkv", 3840, 11520) for i in range(3000 - len(many))]
    assert len(many) == 3000
    for ev in (sdxl, many):
        detect_family(ev, {})
        start = time.perf_counter()
        detect_family(ev, {})
        assert time.perf_counter() - start < 0.5


def _build(spec: list[tuple[str, int, int | None, int | None]]) -> list[ModuleEvidence]:
    """Modules from (name with {i} for the block index, number of blocks, in, out) rows."""
    return [ModuleEvidence("model", name.format(i=i), d_in, d_out)
            for name, n, d_in, d_out in spec for i in range(n)]


FINGERPRINTS = [  # (family, variant, [(name with {i} for the block index, number of blocks, in, out), ...])
    ("hunyuan_video", None, [("double_blocks.{i}.img_attn.qkv", 20, 3072, 9216),
                             ("double_blocks.{i}.img_mlp.fc1", 20, 3072, 12288),
                             ("single_blocks.{i}.linear1", 40, 3072, 21504)]),
    ("sd3", "3.5-medium", [("joint_blocks_{i}_x_block_attn_qkv", 24, 1536, 4608),
                           ("joint_blocks_{i}_context_block_attn_proj", 23, 1536, 1536),
                           ("joint_blocks_{i}_x_block_attn2_qkv", 13, 1536, 4608)]),
    ("sd3", None, [("transformer_blocks.{i}.attn.to_q", 24, 1536, 1536),
                   ("transformer_blocks.{i}.attn.add_q_proj", 23, 1536, 1536)]),
    ("sd35_large", None, [("joint_blocks_{i}_x_block_attn_qkv", 38, 2432, 7296),
                          ("joint_blocks_{i}_x_block_mlp_fc1", 38, 2432, 9728)]),
    ("ltxv", "2b", [("transformer_blocks.{i}.attn1.to_q", 28, 2048, 2048),
                    ("transformer_blocks.{i}.attn2.to_k", 28, 2048, 2048),
                    ("transformer_blocks.{i}.ff.net.0.proj", 28, 2048, 8192)]),
    ("mochi", None, [("blocks.{i}.attn.qkv_x", 48, 3072, 9216), ("blocks.{i}.attn.qkv_y", 48, 1536, 9216),
                     ("blocks.{i}.mlp_x.w1", 48, None, None)]),
    ("hidream", None, [("double_stream_blocks.{i}.block.attn1.to_q", 16, 2560, 2560),
                       ("single_stream_blocks.{i}.block.attn1.to_q", 32, 2560, 2560)]),
    ("auraflow", None, [("double_layers.{i}.attn.w1q", 4, 3072, 3072), ("single_layers.{i}.attn.w1q", 32, 3072, 3072)]),
    ("pixart", None, [("transformer_blocks.{i}.attn1.to_q", 28, 1152, 1152),
                      ("transformer_blocks.{i}.attn2.to_k", 28, 1152, 1152)]),
    ("hunyuan_dit", None, [("blocks.{i}.attn1.Wqkv", 40, 1408, 4224), ("blocks.{i}.attn2.kv_proj", 40, 1024, 2816)]),
    ("cogvideox", "5b", [("transformer_blocks.{i}.attn1.to_q", 42, 3072, 3072),
                         ("transformer_blocks.{i}.norm2.linear", 42, 512, 18432)]),
    ("ltx2", None, [("transformer_blocks.{i}.attn1.to_q", 48, 4096, 4096),
                    ("transformer_blocks.{i}.audio_attn1.to_q", 48, 2048, 2048)]),
    ("anima", None, [("blocks.{i}.self_attn.q_proj", 28, 2048, 2048), ("blocks.{i}.cross_attn.k_proj", 28, 1024, 2048),
                     ("blocks.{i}.mlp.layer1", 28, 2048, 8192)]),
    ("krea2", None, [("blocks_{i}_attn_wq", 28, 6144, 6144), ("blocks_{i}_attn_gate", 28, 6144, 6144)]),
    ("chroma", None, [("double_blocks.{i}.img_attn.qkv", 19, 3072, 9216),
                      ("distilled_guidance_layer.layers.{i}.in_layer", 5, 64, 5120)]),
    ("sdxl_refiner", None, [("down_blocks.1.attentions.0.transformer_blocks.{i}.attn2.to_k", 4, 1280, 768),
                            ("up_blocks.2.attentions.1.transformer_blocks.{i}.attn1.to_q", 4, 768, 768)]),
]


@pytest.mark.parametrize("fid, variant, spec", FINGERPRINTS, ids=[f"{f}-{v}" for f, v, _ in FINGERPRINTS])
def test_family_fingerprints(fid, variant, spec):
    r = detect_family(_build(spec), {})
    assert (r.id, r.variant) == (fid, variant), (r.id, r.variant, r.mismatches, r.alternatives[:2])
    assert r.confidence > 0.5 and not r.mismatches


def test_a_block_count_complete_for_one_family_decides_cogvideox_over_mochi():
    """CogVideoX 5B has 42 blocks at width 3072, Mochi 48: a LoRA on all 42 is CogVideoX (its count is complete);
    on 20 blocks nothing separates them, and the answer stays open."""
    def attn(n: int, width: int):
        return [ModuleEvidence("model", f"transformer_blocks.{i}.attn1.{p}", width, width)
                for i in range(n) for p in ("to_q", "to_k", "to_v", "to_out.0")]

    five = detect_family(attn(42, 3072), {})
    assert (five.id, five.variant) == ("cogvideox", "5b") and five.confidence >= 0.5
    assert "42 transformer blocks (CogVideoX 2B/5B layout)" in five.evidence
    assert (detect_family(attn(30, 1920), {}).id, detect_family(attn(48, 3072), {}).id) == ("cogvideox", "mochi")
    part = detect_family(attn(20, 3072), {})
    assert part.id == "unknown" and part.candidates == ["cogvideox", "mochi"]
