"""Guards on the private diffusers helpers the studio relies on (formats.py): if an upgrade renames
or changes one, this file fails first, naming the helper, instead of adapter files mis-loading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")


def test_kohya_unet_key_converter():
    f = conv._convert_unet_lora_key
    assert f("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight") == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
    assert f("lora_unet_mid_block_resnets_0_conv1.lora_down.weight") == "mid_block.resnets.0.conv1.lora.down.weight"


def test_kohya_text_encoder_key_converter():
    f = conv._convert_text_encoder_lora_key
    assert f("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "lora_te_") == \
        "text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"
    assert f("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "lora_te2_") == \
        "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight"


def test_sgm_block_mapper():
    names = {"lora_unet_input_blocks_4_1_proj_in": 1, "lora_unet_middle_block_1_proj_in": 2,
             "lora_unet_output_blocks_2_1_conv": 3}
    got = conv._maybe_map_sgm_blocks_to_diffusers(names, SimpleNamespace(layers_per_block=2))
    assert got == {"lora_unet_input_blocks_1_attentions_0_proj_in": 1, "lora_unet_middle_block_attentions_0_proj_in": 2,
                   "lora_unet_output_blocks_0_attentions_2_conv": 3}


def test_old_attention_processor_spelling_is_still_converted():
    """The studio's diffusers writer relies on this (formats._build_diffusers)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    got = convert_unet_state_dict_to_peft({"a.attn1.processor.to_q_lora.down.weight": 1,
                                           "a.attn1.processor.to_out_lora.up.weight": 2, "b.proj_in.lora.down.weight": 3})
    assert got == {"a.attn1.to_q.lora_A.weight": 1, "a.attn1.to_out.0.lora_B.weight": 2, "b.proj_in.lora_A.weight": 3}
