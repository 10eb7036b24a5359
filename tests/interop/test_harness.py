"""The interop harness itself, proven on files the libraries write themselves.

For every family: a diffusers-written file and PEFT-written folders load back through the user-facing loaders and
reproduce the writing library's own outputs; broken files are rejected loudly; LyCORIS-written kohya files load in
diffusers and match LyCORIS's own forward pass.
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from interop import harness as h  # noqa: E402

pytestmark = pytest.mark.interop

RTOL = 1e-5


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Diffusers-written sources, made once per module: written(family, mixed) -> Source."""
    cache = {}
    folder = tmp_path_factory.mktemp("diffusers")

    def make(family, mixed=False):
        if (family, mixed) not in cache:
            name = f"{family}{'_mixed' if mixed else ''}.safetensors"
            cache[family, mixed] = h.diffusers_file(family, folder / name, mixed=mixed)
        return cache[family, mixed]

    return make


@pytest.fixture(scope="module")
def base_outputs():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = h.run(h.build(family))
        return cache[family]

    return get


def assert_acts_like(got, reference, base):
    assert h.max_rel_diff(got, reference) <= RTOL
    for name in reference:
        # every output changes: the LoRA reaches every adapted component
        assert h.max_rel_diff({name: base[name]}, {name: reference[name]}) > 1e-2, name


# ---------------------------------------------------------------------------------------------------------------------
# the tiny models


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", h.FAMILIES)
def test_build_is_deterministic_and_seeded(family):
    a, b, c = h.build(family, seed=0), h.build(family, seed=0), h.build(family, seed=1)
    assert set(a.models) == set(a.spec.loadable)
    assert all(_same(a[name], b[name]) for name in a.models)
    assert not any(_same(a[name], c[name]) for name in a.models)
    assert all(not m.training and all(p.dtype == torch.float32 for p in m.parameters()) for m in a.models.values())
    outputs = h.run(a)
    encoders = {f"{name}{suffix}" for name in a.spec.text_encoders for suffix in ("", ".pooled")}
    assert set(outputs) == {a.spec.denoiser} | encoders
    assert all(t.isfinite().all() for t in outputs.values())


def test_sdxl_unet_has_the_real_block_structure():
    unet = h.build("sdxl")["unet"]
    names = {name for name, _ in unet.named_modules()}
    # two transformer layers in the deepest level, one above, no attention in the first; text_time conditioning
    assert "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in names
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q" not in names
    assert "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k" in names
    assert "mid_block.attentions.0.transformer_blocks.1.ff.net.2" in names
    assert "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_out.0" in names
    assert not any(n.startswith("down_blocks.0.attentions") for n in names)
    assert "add_embedding.linear_1" in names
    assert unet.config.addition_embed_type == "text_time"


# ---------------------------------------------------------------------------------------------------------------------
# (a) diffusers-written files through pipe.load_lora_weights


# uniform alpha/rank and rank_pattern/alpha_pattern files; SDXL and SD3 (the slow and the similar) only mixed
DIFFUSERS_CASES = [("sd1", False), ("sd1", True), ("sdxl", True), ("flux1", False), ("flux1", True), ("sd3", True)]


@pytest.mark.parametrize(
    ("family", "mixed"), DIFFUSERS_CASES, ids=[f"{f}-{'mixed' if m else 'uniform'}" for f, m in DIFFUSERS_CASES]
)
def test_diffusers_file_loads_and_matches(family, mixed, written, base_outputs):
    source = written(family, mixed)
    assert source.path.name.endswith(".safetensors")
    metadata = h.adapter_metadata(source.path)
    for name in source.expect:
        assert metadata[f"{name}.r"] == 4 and metadata[f"{name}.lora_alpha"] == 8
        assert bool(metadata[f"{name}.rank_pattern"]) == mixed

    fresh = h.build(family)
    report = h.load_with_diffusers(family, fresh, source.path, expect=source.expect)
    assert report.layers == source.modules
    assert_acts_like(h.run(fresh), h.reference_outputs(fresh, source), base_outputs(family))
    assert h.max_rel_delta_diff(h.deltas(fresh, "x"), h.reference_deltas(source)) <= RTOL


def test_mixed_file_really_has_mixed_ranks(written):
    source = written("sd1", mixed=True)
    with safe_open(str(source.path), "pt") as f:
        shapes = {k.removesuffix(".lora_A.weight"): f.get_slice(k).get_shape() for k in f.keys() if ".lora_A." in k}
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    assert shapes[f"{attn}.attn1.to_q"][0] == 6  # ^-anchored full path
    assert shapes[f"{attn}.attn2.to_k"][0] == 2  # suffix pattern
    assert shapes["text_encoder.text_model.encoder.layers.1.self_attn.k_proj"][0] == 2
    assert shapes["unet.down_blocks.0.resnets.0.conv1"] == [4, 32, 3, 3]  # conv LoRA keeps the kernel on A
    assert h.adapter_metadata(source.path)["unet.alpha_pattern"][f"^{attn[5:]}.attn1.to_q"] == 2


def test_denoiser_only_file_needs_expect(tmp_path, base_outputs):
    source = h.diffusers_file("sd1", tmp_path, with_text_encoders=False)
    assert source.expect == ("unet",)
    assert source.path.name == "pytorch_lora_weights.safetensors"
    with pytest.raises(AssertionError, match="No LoRA keys associated to CLIPTextModel"):
        h.load_with_diffusers("sd1", h.build("sd1"), tmp_path)
    fresh = h.build("sd1")
    report = h.load_with_diffusers("sd1", fresh, tmp_path, expect=("unet",))
    assert report.layers == {"unet": source.modules["unet"], "text_encoder": 0}
    got, ref = h.run(fresh), h.reference_outputs(fresh, source)
    assert h.max_rel_diff(got, ref) <= RTOL
    assert torch.equal(got["text_encoder"], base_outputs("sd1")["text_encoder"])  # untouched


# ---------------------------------------------------------------------------------------------------------------------
# (b) PEFT-written adapter folders through PeftModel.from_pretrained

# every model class once (the SDXL UNet is the SD1 class; SD3's first text encoder repeats its second's class)
PEFT_CASES = [
    ("sd1", "unet"), ("sd1", "text_encoder"),
    ("sdxl", "text_encoder_2"),
    ("flux1", "transformer"), ("flux1", "text_encoder"),
    ("sd3", "transformer"), ("sd3", "text_encoder_2"),
]


@pytest.mark.parametrize(("family", "component"), PEFT_CASES, ids=[f"{f}-{c}" for f, c in PEFT_CASES])
def test_peft_folder_loads_and_matches(family, component, tmp_path, base_outputs):
    source = h.peft_folder(family, component, tmp_path / "adapter", mixed=True)
    config = json.loads((source.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] and config["alpha_pattern"]

    fresh = h.build(family)
    report = h.load_with_peft(fresh, component, source.path)
    assert report.layers == source.modules
    assert h.max_rel_delta_diff(h.deltas(fresh, "default"), h.reference_deltas(source)) <= RTOL
    got, ref, base = h.run(fresh), h.reference_outputs(fresh, source), base_outputs(family)
    assert h.max_rel_diff(got, ref) <= RTOL
    changed = {name for name in ref if h.max_rel_diff({name: base[name]}, {name: ref[name]}) > 1e-2}
    assert changed == {name for name in ref if name.split(".")[0] == component}


# ---------------------------------------------------------------------------------------------------------------------
# (c) broken files are rejected loudly

# name: (key pattern, replacement, keep the metadata, what the error must say)
BREAKAGES = {
    # every key under a component prefix diffusers does not know
    "prefix": (r"^[a-z_0-9]+\.", "nonsense.", True, "No LoRA keys associated to"),
    # one module kind renamed, metadata kept: PEFT warns that config and state dict disagree
    "module": (r"\.to_k\.", ".to_kk.", True, "inconsistency was discovered"),
    # the same without metadata: diffusers says nothing, the file-against-model module check catches it
    "module-silent": (r"\.to_k\.", ".to_kk.", False, "got no LoRA layer"),
    # block indices that do not exist in the model
    "block": (r"\.0\.attn", ".7.attn", False, "got no LoRA layer"),
    # a text-encoder module renamed: transformers reports the keys, then loading fails
    "text-encoder": (r"\.self_attn\.q_proj\.", ".self_attn.qq_proj.", True, "unexpected keys"),
}


# Cases that keep the metadata break the mixed files; the others break the uniform ones (with mixed ranks and no
# metadata, diffusers derives a rank_pattern from the keys and PEFT warns about it, which is not the silent case).
BROKEN_CASES = [("sd1", breakage) for breakage in BREAKAGES] + [
    ("flux1", "prefix"), ("flux1", "module-silent"), ("flux1", "block"),
    ("sd3", "prefix"), ("sd3", "module"), ("sd3", "text-encoder"),
]


@pytest.mark.parametrize(("family", "breakage"), BROKEN_CASES, ids=[f"{f}-{b}" for f, b in BROKEN_CASES])
def test_broken_diffusers_file_raises(family, breakage, written, tmp_path):
    pattern, replacement, keep_metadata, says = BREAKAGES[breakage]
    broken = tmp_path / "broken.safetensors"
    source = written(family, mixed=keep_metadata)
    assert h.rename_keys(source.path, broken, pattern, replacement, keep_metadata) > 0
    with pytest.raises(AssertionError, match=says):
        h.load_with_diffusers(family, h.build(family), broken)


def test_broken_file_error_names_the_problem(written, tmp_path):
    broken = tmp_path / "broken.safetensors"
    h.rename_keys(written("sd1").path, broken, r"\.to_k\.", ".to_kk.", keep_metadata=False)  # uniform: no warning
    with pytest.raises(AssertionError, match=r"got no LoRA layer: \['down_blocks\.0\.attentions\.0\..*attn1\.to_kk'"):
        h.load_with_diffusers("sd1", h.build("sd1"), broken)


def test_broken_peft_folder_raises(tmp_path):
    source = h.peft_folder("sd1", "unet", tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((source.path / "adapter_config.json").read_text())
    h.rename_keys(source.path / "adapter_model.safetensors", bad / "adapter_model.safetensors", r"\.to_k\.", ".to_kk.")
    with pytest.raises(AssertionError, match="missing adapter keys"):
        h.load_with_peft(h.build("sd1"), "unet", bad)


def test_capture_sees_library_warnings():
    import logging
    import warnings

    with h.capture_messages() as messages:
        logging.getLogger("diffusers.loaders.peft").warning("No LoRA keys associated to X")
        logging.getLogger("diffusers.loaders.peft").info("just info")
        warnings.warn("Found missing adapter keys while loading the checkpoint: [a]")
    assert len(messages) == 2
    assert len(h.fatal_messages(messages)) == 2


# ---------------------------------------------------------------------------------------------------------------------
# (d) LyCORIS-written kohya files through diffusers' kohya conversion

lycoris = pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora is not installed")


LYCORIS_CASES = [("sd1", "lora"), ("sd1", "locon"), ("sdxl", "locon")]


@lycoris
@pytest.mark.parametrize(("family", "algo"), LYCORIS_CASES, ids=[f"{f}-{a}" for f, a in LYCORIS_CASES])
def test_lycoris_file_loads_in_diffusers_and_matches(family, algo, tmp_path, base_outputs):
    source = h.lycoris_file(family, tmp_path / f"{algo}.safetensors", algo=algo)
    with safe_open(str(source.path), "pt") as f:
        keys = list(f.keys())
        conv_down = [f.get_slice(k).get_shape() for k in keys if "resnets_0_conv1.lora_down" in k]
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    if algo == "locon":
        assert conv_down and all(shape[2:] == [3, 3] for shape in conv_down)  # kernel kept on lora_down
    else:
        assert not conv_down

    fresh = h.build(family)
    report = h.load_with_diffusers(family, fresh, source.path, expect=source.expect)
    assert report.layers == source.modules
    assert_acts_like(h.run(fresh), h.reference_outputs(fresh, source), base_outputs(family))
    assert h.max_rel_delta_diff(h.deltas(fresh, "x"), h.reference_deltas(source)) <= RTOL


@lycoris
def test_broken_lycoris_file_raises(tmp_path):
    source = h.lycoris_file("sd1", tmp_path / "good.safetensors", algo="lora")
    broken = tmp_path / "bad.safetensors"
    h.rename_keys(source.path, broken, r"_to_k\.", "_to_kk.")
    with pytest.raises(AssertionError, match="got no LoRA layer"):
        h.load_with_diffusers("sd1", h.build("sd1"), broken)
