"""The families people train today at their released sizes: real LoRA layouts (Wan 2.1/2.2, HunyuanVideo, LTX-2,
Qwen-Image) and LoRAs made for real checkpoint layouts (FLUX.2 Klein 9B, Z-Image Turbo) are synthesised at full
width, converted to every target and back exactly, and baked into original-layout checkpoint slices against a
float64 reference computed from the source file's own factors.

Layouts without shapes (names copied from issue logs) get the released widths (Wan 14B: 5120, ffn 13824, I2V image
keys 5120; HunyuanVideo: 3072, qkv 9216, mlp 12288, linear1 21504). Ranks are small, so full widths stay cheap;
bakes take a few modules per family (every fused kind among them), since a base weight is full size.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from synth import layout, synthesize
from test_bake import load, product, write_base

import loratools
from loratools.families import get_family
from loratools.formats.keys import parse_key
from loratools.io.checkpoints import open_base
from loratools.io.reader import read_header
from loratools.ops.placement import base_family

CHECKPOINTS = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
TARGETS = ("kohya", "diffusers", "peft", "comfy")
RANK = 4
STRENGTH = 0.7

# released module shapes (out, in) for layouts that give names only; a 1-tuple is a vector (norm weight)
WAN_14B = [(r"_attn\.(q|k|v|o|k_img|v_img)$", (5120, 5120)), (r"\.ffn\.0$", (13824, 5120)),
           (r"\.ffn\.2$", (5120, 13824)), (r"\.norm_k_img$", (5120,))]
HUNYUAN = [(r"_attn\.qkv$", (9216, 3072)), (r"_attn\.proj$", (3072, 3072)), (r"_mlp\.0$", (12288, 3072)),
           (r"_mlp\.2$", (3072, 12288)), (r"_mod\.lin$", (18432, 3072)), (r"^guidance_in\.in_layer$", (3072, 256)),
           (r"\.linear1$", (21504, 3072))]


@dataclass(frozen=True)
class Case:
    family: str
    layout: str  # fixtures/layouts/<name> (a LoRA), or fixtures/checkpoints/<name> for ``from_checkpoint``
    widths: list = field(default_factory=list)  # (regex on the module name, released shape) for shapeless layouts
    from_checkpoint: bool = False  # one LoRA module per 2-D weight of the checkpoint that the family's naming knows
    add: tuple = ()  # modules (name, (out, in)) added beside the layout's (a fused kind the fragment lacks)
    bake: tuple = ()  # modules baked in diffusers naming (as the source spells them, without its prefix)
    bake_whole: tuple = ()  # modules baked whole (LoRA and full differences) in the source's own naming
    keep: dict = field(default_factory=dict)  # untouched base tensors beside the adapted weights (name -> shape)
    prefix: str = ""  # base keys under this prefix (single-file checkpoints)
    bake_family: str | None = None  # --family for bake, where neither the base slice nor the LoRA decides it
    base_fits: tuple = ()  # the families whose checkpoint signature the base slice holds


WAN_BASE = {"head.modulation": (1, 2, 5120), "patch_embedding.weight": (5120, 16, 1, 2, 2)}  # the Wan 14B signature
WAN = ("wan21", "wan22")  # the 14B checkpoints have the same names and shapes
CASES = {
    "wan21_peft": Case("wan21", "wan21__diffusion_model_peft__issue-fragment.json", WAN_14B,
                       bake=("blocks.34.cross_attn.q",), keep=WAN_BASE, base_fits=WAN),
    "wan21_kohya_mixed": Case("wan21", "wan21__kohya_mixed__issue-fragment.json", WAN_14B),
    # I2V: LoRA on the image keys plus full differences (.diff of norm_k_img, .diff_b biases)
    "wan21_i2v": Case("wan21", "wan21__comfy_lora_diff__issue-fragment.json", WAN_14B,
                      bake=("blocks.28.cross_attn.v_img",),
                      bake_whole=("blocks.27.cross_attn.k_img", "blocks.27.cross_attn.norm_k_img"), keep=WAN_BASE,
                      base_fits=WAN),
    "wan22": Case("wan22", "wan22__comfy_lora__invokeai-lightx2v-fragment.json", WAN_14B,
                  bake=("blocks.1.self_attn.o",), keep=WAN_BASE, prefix="model.diffusion_model.", base_fits=WAN),
    # ComfyUI spellings (img_attn.qkv, txt_mod.lin, guidance_in.in_layer); single_blocks.linear1 added: q, k, v, mlp
    "hunyuan_video": Case("hunyuan_video", "hunyuan_video__comfy_lora_diff__issue-fragment.json", HUNYUAN,
                          add=(("single_blocks.0.linear1", (21504, 3072)),),
                          bake=("single_blocks.0.linear1", "guidance_in.in_layer"),
                          bake_whole=("double_blocks.9.txt_attn.proj",),
                          keep={"single_blocks.0.modulation.lin.bias": (9216,)}),
    "ltx2": Case("ltx2", "ltx2__diffusion_model_peft__invokeai-ltx25-distilled-fragment.json",
                 bake=("transformer_blocks.0.attn1.to_k", "transformer_blocks.0.audio_to_video_attn.to_gate_logits",
                       "patchify_proj", "audio_patchify_proj", "adaln_single.emb.timestep_embedder.linear_1",
                       "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1"),  # the last two: the signature
                 keep={"scale_shift_table": (2, 4096), "transformer_blocks.0.attn1.q_norm.weight": (4096,)},
                 base_fits=("ltx2",)),
    "qwen_image": Case("qwen_image", "qwen_image__diffusers__invokeai-fragment.json",
                       bake=("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_k"),
                       keep={"transformer_blocks.0.attn.norm_q.weight": (128,)}, bake_family="qwen_image"),
    "flux2": Case("flux2", "flux2__bfl__invokeai-klein9b-fragment.json", from_checkpoint=True,
                  bake=("double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1", "img_in",
                        "time_in.in_layer")),
    "z_image": Case("z_image", "z_image__comfy__invokeai-fragment.json", from_checkpoint=True,
                    bake=("context_refiner.0.attention.qkv", "layers.0.adaLN_modulation.0", "cap_embedder.1",
                          "x_embedder", "final_layer.adaLN_modulation.1", "t_embedder.mlp.0"), base_fits=("z_image",)),
    "krea2_kohya": Case("krea2", "krea2__kohya__invokeai-fragment.json"),  # a real sd-scripts file's layout
    # the released single file keeps the DiT and its LLM adapter under `net.`; diffusers names the adapter's modules
    # in a component of their own (`text_conditioner`)
    "anima": Case("anima", "anima__comfy__invokeai-fragment.json", from_checkpoint=True, prefix="net.",
                  bake=("blocks.0.self_attn.q_proj", "blocks.0.cross_attn.k_proj", "blocks.0.adaln_modulation_mlp.2",
                        "llm_adapter.blocks.0.self_attn.o_proj", "llm_adapter.blocks.0.mlp.0", "llm_adapter.out_proj",
                        "x_embedder.proj.1", "t_embedder.1.linear_2", "final_layer.adaln_modulation.2"),
                  base_fits=("anima",)),
}
# (case, fused native module, its diffusers parts, each part's rows)
FUSED = [
    ("flux2", "double_blocks.0.img_attn.qkv", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                "transformer_blocks.0.attn.to_v"], [4096] * 3),
    ("hunyuan_video", "single_blocks.0.linear1",
     ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
      "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"], [3072] * 3 + [12288]),
    ("z_image", "layers.0.attention.qkv", ["layers.0.attention.to_q", "layers.0.attention.to_k",
                                           "layers.0.attention.to_v"], [3840] * 3),
]


def checkpoint_layout(name: str) -> dict:
    return json.loads((CHECKPOINTS / name).read_text())


def _stem(key: str) -> str:
    """The module name as the file spells it, without its format prefix."""
    stem = parse_key(key).stem
    for head in ("diffusion_model.", "lora_unet_", "transformer."):
        if stem.startswith(head):
            return stem[len(head):]
    return stem


def _released(widths, name: str):
    for pattern, shape in widths:
        if re.search(pattern, name):
            return shape
    raise KeyError(f"no released shape for {name}")


def _module_keys(name: str, shape, style: str) -> dict:
    """Layout entries of one LoRA module ``name`` of weight ``shape`` (out, in)."""
    down, up = ("lora_A", "lora_B") if style == "peft" else ("lora_down", "lora_up")
    out = {f"diffusion_model.{name}.{down}.weight": {"shape": [RANK, shape[1]]},
           f"diffusion_model.{name}.{up}.weight": {"shape": [shape[0], RANK]}}
    if style != "peft":
        out[f"diffusion_model.{name}.alpha"] = {"shape": []}  # synthesised as 8: alpha ≠ rank
    return out


def lora_layout(case: Case) -> dict:
    """The layout to synthesise: shapes filled in, partial modules completed, modules added."""
    if case.from_checkpoint:
        naming = get_family(case.family).naming
        tensors = {}
        for key, t in checkpoint_layout(case.layout)["tensors"].items():
            name = key.removesuffix(".weight").removeprefix(case.prefix)
            canon = naming.resolve("model", name, False) if len(t["shape"]) == 2 and name != key else None
            if canon is not None and canon.naming == "native":
                tensors.update(_module_keys(name, t["shape"], "comfy"))
        return {"family": case.family, "format": "comfy_lora", "kind": "lora", "metadata": {}, "tensors": tensors}
    lay = copy.deepcopy(layout(case.layout))
    tensors = lay["tensors"]
    for key, t in list(tensors.items()):  # issue logs list some modules with one factor only: give it its partner
        for a, b in (("lora_down", "lora_up"), ("lora_up", "lora_down"), ("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if f".{a}." in key and key.replace(f".{a}.", f".{b}.") not in tensors:
                tensors[key.replace(f".{a}.", f".{b}.")] = dict(t)
    for name, shape in case.add:
        tensors.update(_module_keys(name, shape, "comfy"))
    for key, t in tensors.items():
        if t.get("shape") is None:
            kp = parse_key(key)
            w = _released(case.widths, _stem(key))
            t["shape"] = {"lora_down": [RANK, *w[1:]], "lora_up": [w[0], RANK], "alpha": [], "diff": list(w),
                          "diff_b": [w[0]]}[kp.role]
    return lay


def lora_only(lay: dict) -> dict:
    """The layout without its full-difference tensors (.diff, .diff_b), which no LoRA format can hold."""
    out = dict(lay)
    out["tensors"] = {k: t for k, t in lay["tensors"].items() if parse_key(k).role not in ("diff", "diff_b")}
    return out


def subset(lay: dict, modules) -> dict:
    out = dict(lay)
    out["tensors"] = {k: t for k, t in lay["tensors"].items() if _stem(k) in modules}
    assert {_stem(k) for k in out["tensors"]} == set(modules)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Synthesise a case's LoRA (float32, rank 4) once: case -> path."""
    folder, cache = tmp_path_factory.mktemp("family_layouts"), {}

    def make(case: str) -> Path:
        if case not in cache:
            lay = lora_only(lora_layout(CASES[case]))
            cache[case] = synthesize(case, folder / f"{case}.safetensors", layout_data=lay, dtype="F32",
                                     rank=RANK, seed=7)
        return cache[case]

    return make


def source_format(path) -> str:
    with loratools.load(path) as lora:
        return {"lycoris": "kohya", "onetrainer": "kohya", "diffusers_legacy": "diffusers"}.get(lora.format,
                                                                                              lora.format)


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_target_and_back_is_exact(case, to, source, tmp_path):
    fam, src = CASES[case].family, source(case)
    with loratools.load(src, family=fam) as lora:
        modules = len(lora.modules)
    out = loratools.convert(src, to, tmp_path / ("out" if to == "peft" else "out.safetensors"), family=fam).output
    there = loratools.verify(src, out, rtol=1e-6, family=fam)
    assert there.equal and there.compared == modules, there
    back = loratools.convert(out, source_format(src), tmp_path / "back.safetensors", family=fam).output
    again = loratools.verify(src, back, rtol=1e-6, family=fam)
    assert again.equal and again.compared == modules and not again.only_in_a and not again.only_in_b, again
    assert again.max_rel_error <= 1e-6


@pytest.mark.parametrize("case,native,parts,rows", FUSED, ids=[c for c, *_ in FUSED])
def test_diffusers_output_splits_fused_weights(case, native, parts, rows, source, tmp_path):
    """The fused native weight becomes its diffusers parts, each with its own rows of the source's ΔW."""
    src = source(case)
    out = loratools.convert(src, "diffusers", tmp_path / "d.safetensors", family=CASES[case].family).output
    tensors = load(out)
    with safe_open(str(out), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert not [k for k in tensors if native in k], native
    assert not meta["transformer.alpha_pattern"] and not meta["transformer.rank_pattern"]
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    f = _factors(src)[native]
    whole = float(f["alpha"]) / RANK * product(f["lora_up"], f["lora_down"])
    start = 0
    for part, n in zip(parts, rows):
        up, down = tensors[f"transformer.{part}.lora_B.weight"], tensors[f"transformer.{part}.lora_A.weight"]
        assert up.shape == (n, RANK)
        got = scale * product(up, down)
        assert float((got - whole[start:start + n]).abs().max()) <= 1e-6 * float(whole.abs().max()), part
        start += n
    assert start == whole.shape[0]


def _factors(path) -> dict:
    """Module name (as the source spells it) -> its tensors by role (lora_up/lora_down whatever the spelling),
    read from the file itself."""
    mods: dict[str, dict] = {}
    for key, t in load(path).items():
        mods.setdefault(_stem(key), {})[parse_key(key).role] = t.double()
    return mods


def reference_terms(paths, prefix: str) -> dict:
    """Base key -> the terms of its float64 reference W + Σ strength·s·ΔW, from the source files' factors under
    their native names: (factor, B, A) for a low-rank product, (factor, D, None) for a full difference."""
    terms: dict[str, list] = {}
    for path in paths:
        for name, f in _factors(path).items():
            weight, bias = f"{prefix}{name}.weight", f"{prefix}{name}.bias"
            if "lora_up" in f:
                scale = float(f["alpha"]) / f["lora_down"].shape[0] if "alpha" in f else 1.0
                terms.setdefault(weight, []).append((STRENGTH * scale, f["lora_up"].flatten(1),
                                                     f["lora_down"].flatten(1)))
            if "diff" in f:
                terms.setdefault(weight, []).append((STRENGTH, f["diff"], None))
            if "diff_b" in f:
                terms.setdefault(bias, []).append((STRENGTH, f["diff_b"], None))
    return terms


def assert_matches_reference(got, base, terms, key: str, rows: int = 2048) -> None:
    """``got`` equals W + Σ terms in float64 to float32 rounding; built a block of rows at a time in two reused
    buffers (full-size weights would need GBs in float64, and fresh allocations dominate the time)."""
    base, got = base.reshape(base.shape[0], -1), got.reshape(base.shape[0], -1)
    ref = torch.empty(min(rows, base.shape[0]), base.shape[1], dtype=torch.float64)
    out = torch.empty_like(ref)
    err = top = 0.0
    for r0 in range(0, base.shape[0], rows):
        n = min(rows, base.shape[0] - r0)
        r, o = ref[:n], out[:n]
        r.copy_(base[r0:r0 + n])
        for factor, left, right in terms:
            if right is None:
                r.add_(left[r0:r0 + n].reshape(r.shape), alpha=factor)
            else:
                r.addmm_(left[r0:r0 + n], right, alpha=factor)
        top = max(top, *(abs(float(v)) for v in r.aminmax()))
        o.copy_(got[r0:r0 + n])
        r.sub_(o)
        err = max(err, *(abs(float(v)) for v in r.aminmax()))
    assert err <= 1e-6 * top, (key, err, top)


def base_spec(case: Case, adapted: dict) -> dict:
    """The checkpoint slice: every weight (and bias) the LoRA adapts, at full size, and the untouched tensors."""
    if case.from_checkpoint:  # the checkpoint's own keys, its prefix included
        tensors = checkpoint_layout(case.layout)["tensors"]
        return {k: tuple(t["shape"]) for k, t in tensors.items()
                if len(t["shape"]) < 2 or k.removesuffix(".weight").removeprefix(case.prefix) in case.bake + case.bake_whole}
    else:
        spec, modules = {}, {}
        for key, t in adapted.items():
            modules.setdefault(_stem(key), {})[parse_key(key).role] = t["shape"]
        for name, shapes in modules.items():
            if "lora_up" in shapes:
                spec[f"{name}.weight"] = (shapes["lora_up"][0], *shapes["lora_down"][1:])
                spec[f"{name}.bias"] = (shapes["lora_up"][0],)
            if "diff" in shapes:
                spec[f"{name}.weight"] = tuple(shapes["diff"])
            if "diff_b" in shapes:
                spec[f"{name}.bias"] = tuple(shapes["diff_b"])
        spec.update(case.keep)
    return {case.prefix + k: v for k, v in spec.items()}


BAKED = [c for c in sorted(CASES) if CASES[c].bake or CASES[c].bake_whole]


@pytest.mark.parametrize("case", BAKED)
def test_bake_matches_a_float64_reference(case, tmp_path):
    """The LoRA in diffusers naming (fused parts are row slices of the base weight) baked at 0.7 into a float32
    original-layout slice: every patched weight is W + 0.7·s·B@A of the source's own factors, the rest is the base's
    bytes."""
    spec = CASES[case]
    lay = lora_layout(spec)
    sources, loras, adapted = [], [], {}
    for part, sub in (("lora", lora_only(subset(lay, spec.bake))), ("whole", subset(lay, spec.bake_whole))):
        if not sub["tensors"]:
            continue
        path = synthesize(case, tmp_path / f"{part}.safetensors", layout_data=sub, dtype="F32", rank=RANK,
                          seed=len(sources) + 11)
        sources.append(path)
        adapted.update(sub["tensors"])
        if part == "lora":  # in diffusers naming: fused native weights take their parts as row slices
            path = loratools.convert(path, "diffusers", tmp_path / "d.safetensors", family=spec.family).output
        loras.append((path, STRENGTH))  # full differences only exist in the source's (ComfyUI) naming
    base_path = tmp_path / "base.safetensors"
    base = write_base(base_path, base_spec(spec, adapted), dtype=torch.float32)
    with open_base(base_path) as opened:
        assert set(base_family(opened)[1]) == set(spec.base_fits)
    terms = reference_terms(sources, spec.prefix)
    result = loratools.bake(base_path, loras, tmp_path / "out.safetensors", dtype="fp32",
                            family=spec.bake_family)
    assert result.patched_tensors == len(terms) and not result.unmatched, result
    assert all(r["matched"] and not r["unmatched"] for r in result.loras), result.loras
    out = load(tmp_path / "out.safetensors")
    assert list(out) == list(base)
    for key, ts in terms.items():
        assert_matches_reference(out[key], base[key], ts, key)
    untouched = [k for k in base if k not in terms]
    assert untouched
    a, b = read_header(base_path), read_header(tmp_path / "out.safetensors")
    with open(base_path, "rb") as fa, open(tmp_path / "out.safetensors", "rb") as fb:
        for key in untouched:
            ia, ib = a.tensors[key], b.tensors[key]
            fa.seek(a.data_start + ia.begin)
            fb.seek(b.data_start + ib.begin)
            assert fa.read(ia.end - ia.begin) == fb.read(ib.end - ib.begin), key


def test_bake_takes_a_module_with_only_a_bias_difference(tmp_path):
    """HunyuanVideo's guidance_in.in_layer as a ComfyUI difference file can hold only .diff_b (the issue's log
    lists it beside a lone factor): the bias moves by 0.7·diff_b, the weight stays."""
    spec = {"guidance_in.in_layer.weight": (3072, 256), "guidance_in.in_layer.bias": (3072,)}
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float32)
    lay = {"family": "hunyuan_video", "tensors": {"diffusion_model.guidance_in.in_layer.diff_b": {"shape": [3072]}}}
    lora = synthesize("diff_b", tmp_path / "diff.safetensors", layout_data=lay, dtype="F32", seed=3)
    loratools.bake(tmp_path / "base.safetensors", [(lora, STRENGTH)], tmp_path / "out.safetensors", dtype="fp32",
                   family="hunyuan_video")
    out = load(tmp_path / "out.safetensors")
    assert torch.equal(out["guidance_in.in_layer.weight"], base["guidance_in.in_layer.weight"])
    assert_matches_reference(out["guidance_in.in_layer.bias"], base["guidance_in.in_layer.bias"],
                             [(STRENGTH, load(lora)["diffusion_model.guidance_in.in_layer.diff_b"].double(), None)],
                             "bias")


def test_bake_into_a_scaled_fp8_checkpoint_moves_the_effective_weight(tmp_path):
    """The official FLUX.2 Klein 4B fp8 layout stores W as fp8 numbers times a per-tensor weight_scale (F32): the
    weight a loader uses is weight·weight_scale, and that is what a LoRA must move."""
    from loratools.io.writer import write_safetensors

    layout_fp8 = checkpoint_layout("flux2__bfl_fp8__invokeai-klein4b-fragment.json")["tensors"]
    name = "double_blocks.0.img_attn.proj"
    shape = tuple(layout_fp8[f"{name}.weight"]["shape"])
    assert (layout_fp8[f"{name}.weight"]["dtype"], layout_fp8[f"{name}.weight_scale"]["dtype"]) == ("F8_E4M3", "F32")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(shape, generator=g) * 0.02
    scale = float(w.abs().max()) / 448  # the fp8 range, as the quantiser sets it
    stored = (w / scale).to(torch.float8_e4m3fn)
    items = [(f"{name}.weight", "F8_E4M3", shape, stored.view(torch.uint8).numpy().tobytes()),
             (f"{name}.weight_scale", "F32", (), torch.tensor(scale)),
             (f"{name}.input_scale", "F32", (), torch.tensor(1.0))]
    write_safetensors(tmp_path / "base.safetensors", items, {})
    up, down = torch.randn(shape[0], RANK, generator=g) * 0.1, torch.randn(RANK, shape[1], generator=g) * 0.1
    lora = tmp_path / "lora.safetensors"
    write_safetensors(lora, [(f"diffusion_model.{name}.lora_up.weight", "F32", tuple(up.shape), up),
                             (f"diffusion_model.{name}.lora_down.weight", "F32", tuple(down.shape), down)], {})
    loratools.bake(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "out.safetensors", family="flux2")
    out = load(tmp_path / "out.safetensors")
    moved = out[f"{name}.weight"].double() * float(out[f"{name}.weight_scale"]) - stored.double() * scale
    want = product(up, down)
    # fp8 keeps 3 mantissa bits: the move, projected on the intended ΔW, must be ΔW (to the rounding noise)
    assert abs(float((moved * want).sum() / (want * want).sum()) - 1.0) < 0.05


def test_bake_into_comfyuis_fp8_anima_release(tmp_path):
    """ComfyUI's fp8 Anima file (net. prefix, per-layer weight_scale, input_scale and comfy_quant marker, layout in
    fixtures/checkpoints): the base alone tells the family, the kohya LoRA moves the effective weight, and the wider
    output drops the layer's quantisation tensors."""
    from loratools.io.writer import write_safetensors

    layout_fp8 = checkpoint_layout("anima__comfy_fp8_mixed__invokeai-fragment.json")["tensors"]
    name = "net.blocks.24.self_attn.q_proj"
    shape = tuple(layout_fp8[f"{name}.weight"]["shape"])
    assert [layout_fp8[f"{name}.{s}"]["dtype"] for s in ("weight", "weight_scale", "comfy_quant")] == \
        ["F8_E4M3", "F32", "U8"]
    g = torch.Generator().manual_seed(6)
    w = torch.randn(shape, generator=g) * 0.02
    scale = float(w.abs().max()) / 448
    stored = (w / scale).to(torch.float8_e4m3fn)
    marker = b'{"format": "float8_e4m3fn"}'.ljust(layout_fp8[f"{name}.comfy_quant"]["shape"][0], b" ")
    items = [(f"{name}.weight", "F8_E4M3", shape, stored.view(torch.uint8).numpy().tobytes()),
             (f"{name}.weight_scale", "F32", (), torch.tensor(scale)),
             (f"{name}.input_scale", "F32", (), torch.tensor(1.0)),
             (f"{name}.comfy_quant", "U8", (len(marker),), marker)]
    for key in ("net.llm_adapter.out_proj.weight", "net.x_embedder.proj.1.weight"):  # the signature, kept as it is
        items.append((key, "BF16", tuple(layout_fp8[key]["shape"]), torch.zeros(layout_fp8[key]["shape"],
                                                                             dtype=torch.bfloat16)))
    write_safetensors(tmp_path / "base.safetensors", items, {})
    with open_base(tmp_path / "base.safetensors") as opened:
        assert base_family(opened)[:2] == ("anima", ["anima"])
    up, down = torch.randn(shape[0], RANK, generator=g) * 0.1, torch.randn(RANK, shape[1], generator=g) * 0.1
    lora = tmp_path / "lora.safetensors"
    write_safetensors(lora, [("lora_unet_blocks_24_self_attn_q_proj.lora_up.weight", "F32", tuple(up.shape), up),
                             ("lora_unet_blocks_24_self_attn_q_proj.lora_down.weight", "F32", tuple(down.shape), down),
                             ("lora_unet_blocks_24_self_attn_q_proj.alpha", "F32", (), torch.tensor(float(RANK)))], {})
    result = loratools.bake(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "out.safetensors", dtype="bf16")
    assert result.patched_tensors == 1 and not result.unmatched
    out = load(tmp_path / "out.safetensors")
    assert not [k for k in out if k.startswith(name) and not k.endswith(".weight")]  # sidecars dropped when widened
    moved = out[f"{name}.weight"].double() - stored.double() * scale
    want = product(up, down)
    assert abs(float((moved * want).sum() / (want * want).sum()) - 1.0) < 0.05


def test_krea2_kohya_file_bakes_into_the_reference_names(tmp_path):
    """A real Krea 2 kohya layout (flattened reference names, GQA keys 6144->1536, the 12-layer text projector)
    baked at 0.7 into a slice with the reference checkpoint's dotted names, which the base alone tells apart."""
    modules = ("blocks_27_attn_wk", "blocks_0_mlp_down", "txtfusion_refiner_blocks_1_attn_gate", "txtfusion_projector",
               "tproj_1", "first")
    lay = subset(layout("krea2__kohya__invokeai-fragment.json"), modules)
    kohya = synthesize("krea2", tmp_path / "k.safetensors", layout_data=lay, dtype="F32", rank=RANK, seed=3)
    comfy = loratools.convert(kohya, "comfy", tmp_path / "c.safetensors", family="krea2").output  # dotted names
    terms = reference_terms([comfy], "")
    spec = {}
    for key, ts in terms.items():
        _, up, down = ts[0]
        spec[key] = (up.shape[0], down.shape[1])
    assert set(spec) == {"blocks.27.attn.wk.weight", "blocks.0.mlp.down.weight", "tproj.1.weight", "first.weight",
                         "txtfusion.refiner_blocks.1.attn.gate.weight", "txtfusion.projector.weight"}
    base = write_base(tmp_path / "base.safetensors", {**spec, "blocks.0.attn.q_norm.weight": (128,)},
                      dtype=torch.float32)
    with open_base(tmp_path / "base.safetensors") as opened:
        assert base_family(opened)[:2] == ("krea2", ["krea2"])
    result = loratools.bake(tmp_path / "base.safetensors", [(kohya, STRENGTH)], tmp_path / "out.safetensors",
                            dtype="fp32")
    assert result.patched_tensors == len(terms) and not result.unmatched, result
    out = load(tmp_path / "out.safetensors")
    for key, ts in terms.items():
        assert_matches_reference(out[key], base[key], ts, key)  # the terms carry the strength
    assert torch.equal(out["blocks.0.attn.q_norm.weight"], base["blocks.0.attn.q_norm.weight"])
