"""Key parsing: every suffix spelling maps to one role, every prefix to one component."""

import pytest

from loratools.formats.keys import parse_key, split_stem

CASES = [
    # key, stem, role, spelling
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
     "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down", "kohya"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
     "alpha", "kohya"),
    ("x.lora_mid.weight", "x", "lora_mid", "kohya"),
    ("transformer.a.b.lora_A.weight", "transformer.a.b", "lora_down", "peft"),
    ("base_model.model.a.lora_B.default.weight", "base_model.model.a", "lora_up", "peft"),
    ("img_in.lora_B.bias", "img_in", "lora_up_bias", "peft"),
    ("blocks.0.attn.qkv_x.lora_A", "blocks.0.attn.qkv_x", "lora_down", "peft"),
    ("unet.a.to_q.lora.down.weight", "unet.a.to_q", "lora_down", "legacy"),
    ("unet.a.attn1.processor.to_out_lora.up.weight", "unet.a.attn1.to_out.0", "lora_up", "legacy"),
    ("text_encoder.t.q_proj.lora_linear_layer.up.weight", "text_encoder.t.q_proj", "lora_up", "legacy"),
    ("double_blocks.3.processor.qkv_lora2.down.weight", "double_blocks.3.txt_attn.qkv", "lora_down", "xlabs"),
    ("text_encoder:7:up", "text_encoder:7", "lora_up", "cloneofsimo"),
    ("x.hada_w1_a", "x", "hada_w1_a", "lycoris"),
    ("x.lokr_w2_b", "x", "lokr_w2_b", "lycoris"),
    ("x.dora_scale", "x", "dora_scale", "kohya"),
    ("x.lora_magnitude_vector", "x", "dora_scale", "peft"),
    ("x.diff_b", "x", "diff_b", "lycoris"),
    ("x.a1.weight", "x", "glora_a1", "lycoris"),
    ("x.norm.key_norm.scale", "x.norm.key_norm", "plain_scale", "plain"),
]


@pytest.mark.parametrize("key,stem,role,spelling", CASES)
def test_parse_key(key, stem, role, spelling):
    p = parse_key(key)
    assert (p.stem, p.role, p.spelling) == (stem, role, spelling)


@pytest.mark.parametrize("stem,component,name,naming", [
    ("lora_unet_input_blocks_4_1_proj_in", "model", "input_blocks_4_1_proj_in", "kohya"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "te1", "text_model_encoder_layers_0_mlp_fc1", "kohya"),
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "te3", "encoder_block_0_layer_0_SelfAttention_q", "kohya"),
    ("lora_transformer_single_transformer_blocks_0_attn_to_k", "model", "single_transformer_blocks_0_attn_to_k",
     "onetrainer"),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "te2", "text_model.encoder.layers.0.mlp.fc1", "diffusers"),
    ("diffusion_model.double_blocks.0.img_attn.qkv", "model", "double_blocks.0.img_attn.qkv", "comfy"),
    ("transformer.base_model.model.proj_out", "model", "proj_out", "peft"),
    ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", "te1",
     "text_model.encoder.layers.0.self_attn.q_proj", "peft"),
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", "te3",
     "encoder.block.0.layer.0.SelfAttention.q", "comfy"),
    ("down_blocks.0.attentions.0.proj_in", "model", "down_blocks.0.attentions.0.proj_in", "plain"),
])
def test_split_stem(stem, component, name, naming):
    s = split_stem(stem)
    assert (s.component, s.name, s.naming) == (component, name, naming)
