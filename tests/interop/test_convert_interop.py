"""Files we convert load in the real libraries and act like the original.

Sources are written by diffusers, PEFT and LyCORIS themselves (tiny models, random weights). Each is converted
to every target; diffusers/PEFT targets (and kohya SD1/SDXL files, which diffusers reads) are loaded with
`load_lora_weights` / `PeftModel.from_pretrained` into fresh models and must give the source library's own
outputs; every output is also checked with `verify` against the source, module by module. The last part is the
loader matrix of docs/convert.md: kohya files applied by LyCORIS (`create_network_from_weights`) on the diffusers
models of every family, diffusers' kohya/comfy FLUX.1 reader on the released widths it assumes, and the files
diffusers has no reader for.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from interop import harness as h  # noqa: E402

import loratools  # noqa: E402

pytestmark = pytest.mark.interop
RTOL = 1e-5
TARGETS = ("kohya", "diffusers", "peft", "comfy")
DIFFUSERS_READS_KOHYA = ("sd1", "sdxl")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache, folder = {}, tmp_path_factory.mktemp("sources")

    def make(family, mixed=False):
        if (family, mixed) not in cache:
            cache[family, mixed] = h.diffusers_file(family, folder / f"{family}{int(mixed)}.safetensors", mixed=mixed)
        return cache[family, mixed]

    return make


def _load_all(family, source, out: Path, to: str):
    """Fresh components with the converted file loaded the way a user would; their outputs."""
    fresh = h.build(family)
    if to == "peft":
        folders = sorted(p for p in out.iterdir() if p.is_dir())
        assert {p.name for p in folders} == set(source.expect)
        for folder in folders:
            h.load_with_peft(fresh, folder.name, folder)
    else:
        h.load_with_diffusers(family, fresh, out, expect=source.expect)
    return fresh


def _check(family, source, out, to, src_path, mixed=False):
    assert loratools.verify(src_path, out, rtol=1e-6, family=family).equal
    # diffusers' kohya reader loses per-module alphas of attention layers when they differ (its alpha_pattern
    # keys name `processor.to_q_lora.down.weight`, which matches nothing), so mixed files are checked by verify
    if to in ("diffusers", "peft") or (to == "kohya" and family in DIFFUSERS_READS_KOHYA and not mixed):
        fresh = _load_all(family, source, Path(out), to)
        assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= RTOL


@pytest.mark.parametrize("names", [None, "diffusers"])
@pytest.mark.parametrize("family", DIFFUSERS_READS_KOHYA)
def test_uniform_kohya_file_loads_in_diffusers(family, names, written, tmp_path):
    """diffusers reads SD 1.x and SDXL kohya files in both spellings (SGM and diffusers names for SDXL)."""
    source = written(family, mixed=False)
    out = loratools.convert(source.path, "kohya", f"{tmp_path}/out/", family=family, kohya_names=names)
    _check(family, source, out.output, "kohya", source.path)


@pytest.mark.parametrize("family", h.FAMILIES)
@pytest.mark.parametrize("to", TARGETS)
def test_diffusers_written_file_converts(family, to, written, tmp_path):
    mixed = family in ("sd1", "flux1")
    source = written(family, mixed=mixed)
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    _check(family, source, out.output, to, source.path, mixed)
    # and back to the format diffusers writes: still loads and acts the same
    back = loratools.convert(out.output, "diffusers", f"{tmp_path}/back/", family=family)
    fresh = _load_all(family, source, Path(back.output), "diffusers")
    assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= RTOL


# A bare PEFT folder of a text encoder does not say which encoder it is, so only denoiser folders are converted.
@pytest.mark.parametrize("family,component", [("sd1", "unet"), ("flux1", "transformer"), ("sd3", "transformer")])
@pytest.mark.parametrize("to", ("kohya", "diffusers", "peft"))
def test_peft_folder_converts(family, component, to, tmp_path):
    source = h.peft_folder(family, component, tmp_path / "adapter", mixed=True)
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    assert loratools.verify(source.path, out.output, rtol=1e-6, family=family).equal
    if to in ("diffusers", "peft"):  # these sources have mixed alphas: see _check about diffusers' kohya reader
        fresh = h.build(family)
        if to == "peft":
            h.load_with_peft(fresh, component, Path(out.output) / component)
        else:
            h.load_with_diffusers(family, fresh, out.output, expect=(component,))
        got, ref = h.run(fresh), h.reference_outputs(fresh, source)
        assert h.max_rel_diff({k: got[k] for k in ref if k.startswith(component)},
                              {k: ref[k] for k in ref if k.startswith(component)}) <= RTOL


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("family", ("sd1", "sdxl"))
@pytest.mark.parametrize("to", TARGETS)
def test_lycoris_written_file_converts(family, to, tmp_path):
    source = h.lycoris_file(family, tmp_path / "locon.safetensors", algo="locon")
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    _check(family, source, out.output, to, source.path)


@pytest.mark.parametrize("kind", ["peft", "diffusers"])
@pytest.mark.parametrize("family", DIFFUSERS_READS_KOHYA)
def test_mixed_alpha_kohya_file_with_uniform_alpha_loads_right_in_diffusers(family, kind, tmp_path):
    """diffusers' kohya reader applies one alpha to every module: a PEFT UNet adapter with rank/alpha patterns (or
    a diffusers file with them on the UNet and every text encoder), written as kohya with --uniform-alpha (every
    alpha the same, each ratio folded into lora_up), acts as the original there; written plainly, diffusers
    misreads it and convert says so."""
    if kind == "peft":
        source = h.peft_folder(family, "unet", tmp_path / "adapter", mixed=True)
    else:
        source = h.diffusers_file(family, tmp_path / "src.safetensors", mixed=True)
    ref = h.reference_outputs(h.build(family), source)
    plain = loratools.convert(source.path, "kohya", tmp_path / "plain.safetensors", family=family)
    assert any("--uniform-alpha" in w for w in plain.warnings)
    with pytest.raises(AssertionError):  # the alpha bug, seen by the loader check or in the outputs
        fresh = h.build(family)
        h.load_with_diffusers(family, fresh, plain.output, expect=source.expect)
        assert h.max_rel_diff(h.run(fresh), ref) <= RTOL
    r = loratools.convert(source.path, "kohya", tmp_path / "uniform.safetensors", family=family, uniform_alpha=True)
    assert not any("--uniform-alpha" in w for w in r.warnings)
    meta = h.file_metadata(r.output)
    alphas = {float(v) for k, v in load_file(r.output).items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and meta["loratools.uniform_alpha"] == f"{alphas.pop():g}"
    assert loratools.verify(source.path, r.output, rtol=1e-6, family=family).equal
    fresh = h.build(family)
    h.load_with_diffusers(family, fresh, r.output, expect=source.expect)
    assert h.max_rel_diff(h.run(fresh), ref) <= RTOL


def test_uniform_alpha_is_refused_where_files_carry_scales(tmp_path, written):
    from loratools.errors import UsageError

    source = written("sd1")
    with pytest.raises(UsageError, match="--uniform-alpha applies to kohya and comfy"):
        loratools.convert(source.path, "diffusers", tmp_path / "x.safetensors", family="sd1", uniform_alpha=True)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("kind", ["lycoris", "diffusers"])
def test_sd1_kohya_file_loads_in_lycoris(kind, tmp_path):
    """SD 1.x kohya names are diffusers names flattened: a LyCORIS network on a diffusers UNet reads them all."""
    import torch

    if kind == "lycoris":
        source = h.lycoris_file("sd1", tmp_path / "src.safetensors", algo="locon")
    else:
        source = h.diffusers_file("sd1", tmp_path / "src.safetensors")
    out = loratools.convert(source.path, "kohya", tmp_path / "k.safetensors", family="sd1")
    target = h.lycoris_file("sd1", tmp_path / "net.safetensors", algo="locon")
    with torch.no_grad():
        for p in target.network.parameters():
            p.zero_()
    assert not target.network.load_weights(str(out.output)).get("unexpected keys")
    assert h.max_rel_diff(h.reference_outputs(target.adapted, target),
                          h.reference_outputs(source.adapted, source)) <= RTOL


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("kind", ["lycoris", "diffusers"])
def test_sdxl_kohya_file_with_diffusers_names_loads_in_lycoris(kind, tmp_path):
    """LyCORIS matches kohya names against the module names of the model it is given. Our SDXL kohya files
    flatten the SGM names sd-scripts uses (its SDXL UNet is built that way; ComfyUI, A1111 and diffusers read them
    too), which a LyCORIS network on a diffusers UNet does not know. --kohya-names diffusers writes the names it
    knows, and the network then acts as the original, UNet and both text encoders."""
    import torch

    if kind == "lycoris":
        source = h.lycoris_file("sdxl", tmp_path / "src.safetensors", algo="locon")
    else:
        source = h.diffusers_file("sdxl", tmp_path / "src.safetensors")
    want = h.reference_outputs(source.adapted, source)
    for names in (None, "diffusers"):
        out = loratools.convert(source.path, "kohya", tmp_path / f"{names}.safetensors", family="sdxl",
                                kohya_names=names)
        assert loratools.verify(source.path, out.output, rtol=1e-6, family="sdxl").equal
        # a LyCORIS network on fresh models of the same base, built as a kohya trainer builds it, every factor
        # zeroed, then loaded from our file: only what it reads from the file acts
        target = h.lycoris_file("sdxl", tmp_path / f"net_{names}.safetensors", algo="locon")
        with torch.no_grad():
            for p in target.network.parameters():
                p.zero_()
        unexpected = target.network.load_weights(str(out.output)).get("unexpected keys", [])
        got = h.reference_outputs(target.adapted, target)
        if names is None:  # SGM names: the UNet's modules are not read, its output stays the base's
            assert unexpected and all(k.startswith("lora_unet_") for k in unexpected)
            assert h.max_rel_diff({"unet": got["unet"]}, {"unet": want["unet"]}) > 1e-3
            # both text encoders (lora_te1_, lora_te2_) are read and act as the original
            encoders = [k for k in want if k.startswith("text_encoder")]
            assert h.max_rel_diff({k: got[k] for k in encoders}, {k: want[k] for k in encoders}) <= RTOL
        else:
            assert not unexpected
            assert h.max_rel_diff(got, want) <= RTOL


# --------------------------------------------------------------------------------------------------------------------
# The loader matrix (docs/convert.md): which loader reads which of our files, and with what effect


def _lycoris_from_weights(family, path):
    """LyCORIS's own way to apply a kohya-style file (`create_network_from_weights`, per-module ranks and alphas
    from the file) on fresh diffusers/transformers models: the models, and the file's modules it found no layer
    for (LyCORIS skips those silently)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # its constructor first builds a network from the class preset, whose default wraps diffusers' time embedding
    # twice ("duplicated lora name"); the harness's explicit preset avoids that. The modules applied come from the
    # file alone.
    LycorisNetworkKohya.apply_preset(h.LYCORIS_PRESETS["locon"])
    fresh = h.build(family)
    encoders = [fresh[name] for name in fresh.spec.text_encoders]
    text_encoder = encoders if len(encoders) > 1 or family != "sd1" else encoders[0]  # lora_te_ only for SD 1.x
    denoiser = fresh[fresh.spec.denoiser]
    with h.capture_messages():
        network, weights = create_network_from_weights(1.0, str(path), None, text_encoder, denoiser)
        network.apply_to(text_encoder, denoiser, apply_text_encoder=True, apply_unet=True)
    found = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras}
    return fresh, sorted({k.split(".")[0] for k in weights if "." in k} - found)


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("family,kind", [*((f, "diffusers") for f in h.FAMILIES), ("sd1", "lycoris"),
                                         ("sdxl", "lycoris")])
def test_kohya_file_in_lycoris_from_weights(family, kind, tmp_path):
    """Our kohya files applied by LyCORIS on diffusers models (mixed ranks and alphas read per module). Text
    encoders are read in both spellings; the denoiser only where the names are its diffusers module names: SD 1.x
    always, SDXL, FLUX.1 and SD3 with --kohya-names diffusers (their usual kohya names are the original
    checkpoint's, which a diffusers model has no modules for)."""
    if kind == "lycoris":
        source = h.lycoris_file(family, tmp_path / "src.safetensors", algo="locon")
    else:
        source = h.diffusers_file(family, tmp_path / "src.safetensors", mixed=True)
    denoiser = h.spec(family).denoiser
    for names in (None, "diffusers"):
        out = loratools.convert(source.path, "kohya", tmp_path / f"{names}.safetensors", family=family,
                                kohya_names=names)
        fresh, unread = _lycoris_from_weights(family, out.output)
        got, want = h.run(fresh), h.reference_outputs(fresh, source)
        encoders = [k for k in want if k.startswith("text_encoder")]
        assert h.max_rel_diff({k: got[k] for k in encoders}, {k: want[k] for k in encoders}) <= RTOL
        if names == "diffusers" or family == "sd1":
            assert unread == [] and h.max_rel_diff(got, want) <= RTOL, unread[:3]
        else:
            assert unread and all(k.startswith("lora_unet_") for k in unread)
            assert h.max_rel_diff({denoiser: got[denoiser]}, {denoiser: want[denoiser]}) > 1e-3


@pytest.fixture(scope="module")
def flux_released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_released")
    return folder, *_flux_released_source(folder)


def _flux_released_source(folder):
    """A diffusers FLUX.1 LoRA for the released transformer configuration (built on the meta device; LoRA on the
    first double and single block and every embedder and output layer, rank/alpha patterns) plus a tiny CLIP text
    encoder: the file FluxPipeline.save_lora_weights writes, and each module's reference factors (scale·B, A)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    with init_empty_weights(include_buffers=True):
        transformer = FluxTransformer2DModel(in_channels=64, guidance_embeds=True)
    keep = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")) or "blocks" not in n)]
    patterns = {"rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_v": 3, "proj_mlp": 16}}
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=keep, **patterns))
    text_encoder = h.build("flux1")["text_encoder"]
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(h.TEXT_ENCODER_TARGETS)))
    gen, reference, saved = torch.Generator().manual_seed(5), {}, {}
    for prefix, model in (("transformer", transformer), ("text_encoder", text_encoder)):
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                a, b = layer.lora_A["default"], layer.lora_B["default"]
                a.to_empty(device="cpu"), b.to_empty(device="cpu")
                with torch.no_grad():
                    a.weight.copy_(torch.randn(a.weight.shape, generator=gen) * a.weight.shape[1] ** -0.5)
                    b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.05)
                reference[f"{prefix}.{name}"] = (layer.scaling["default"] * b.weight.detach().double(),
                                                  a.weight.detach().double())
        saved[f"{prefix}_lora_layers"] = get_peft_model_state_dict(model)
        saved[f"{prefix}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(str(folder), weight_name="src.safetensors", **saved)
    return folder / "src.safetensors", reference


def _low_rank_rel_error(got_b, got_a, want_b, want_a) -> float:
    """‖B₁A₁ − B₂A₂‖ / ‖B₂A₂‖ from the factors alone (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)), with no dense ΔW."""
    import torch

    def sq(b, a):
        return float(((b.T @ b) * (a @ a.T)).sum())

    diff = sq(torch.cat([got_b.double(), -want_b], 1), torch.cat([got_a.double(), want_a], 0))
    return (max(diff, 0.0) / sq(want_b, want_a)) ** 0.5


@pytest.mark.parametrize("to", ["kohya", "comfy"])
def test_flux_kohya_and_comfy_files_in_diffusers_reader_at_released_widths(to, flux_released):
    """diffusers' reader of kohya/comfy FLUX.1 files splits the fused BFL weights at the released widths (3072,
    12288), so it is checked on the released configuration: FluxPipeline.lora_state_dict turns our file into the
    same ΔW per module of the blocks, mixed ranks and alphas included, CLIP too. It names the embedder and output
    layers without the `transformer.` prefix (and drops the output layer's alpha), so load_lora_weights leaves
    them out: a limit of diffusers 0.39, not of the file (docs/convert.md says so)."""
    from diffusers import FluxPipeline

    folder, source, reference = flux_released
    out = loratools.convert(source, to, folder / f"ours.{to}.safetensors", family="flux1")
    assert loratools.verify(source, out.output, rtol=1e-6, family="flux1").equal
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    read = FluxPipeline.lora_state_dict(str(folder), weight_name=Path(out.output).name)
    # the text encoder comes out in diffusers' older naming, which its loader renames as here before injecting
    encoder = {k: v for k, v in read.items() if k.startswith("text_encoder.")}
    read = {**{k: v for k, v in read.items() if k not in encoder},
            **convert_state_dict_to_peft(convert_state_dict_to_diffusers(encoder))}
    outside = {n for n in reference if n.startswith("transformer.") and "blocks" not in n}
    for name, (want_b, want_a) in reference.items():
        if name in outside:
            continue
        got_a, got_b = read[f"{name}.lora_A.weight"], read[f"{name}.lora_B.weight"]
        assert _low_rank_rel_error(got_b, got_a, want_b, want_a) <= 1e-6, name
    loaded = {k.rsplit(".lora_", 1)[0] for k in read if k.startswith(("transformer.", "text_encoder."))}
    assert loaded == set(reference) - outside
    assert {k.rsplit(".lora_", 1)[0] for k in read} - loaded == {n.split(".", 1)[1] for n in outside}


@pytest.mark.parametrize("family,to,names", [
    ("sd1", "comfy", None), ("sdxl", "comfy", None), ("sd3", "kohya", None), ("sd3", "kohya", "diffusers"),
    ("sd3", "comfy", None), ("flux1", "kohya", "diffusers"),
    ("flux1", "kohya", None),  # tiny widths: the reader splits fused weights at the released ones
])
def test_files_diffusers_does_not_read(family, to, names, written, tmp_path):
    """The matrix's "no" cells for diffusers: it has no reader for these files (they load elsewhere)."""
    source = written(family)
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family, kohya_names=names)
    with pytest.raises(AssertionError, match="could not load|No LoRA keys"):
        h.load_with_diffusers(family, h.build(family), out.output, expect=source.expect)
