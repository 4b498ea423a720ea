"""Adapter files: every format loads to the right ΔW, writes round-trip, bad input fails clearly."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.adapters.adapter import Adapter, KronDelta, LoraDelta
from studio.adapters.formats import (
    describe,
    detect_format,
    guess_arch,
    read_adapter,
    validate_adapter,
    write_adapter,
)
from studio.base import build_tiny_pipeline, module_shapes
from studio.errors import AdapterFileError, AdapterMismatchError

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
OUT = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "down_blocks.0.resnets.0.conv1"  # 3×3 conv, 32→32 in tiny SD1
SHORT = "down_blocks.2.resnets.0.conv_shortcut"  # 1×1 conv
TE_Q = "encoder.layers.0.self_attn.q_proj"
TE_FC1 = "encoder.layers.1.mlp.fc1"


@pytest.fixture(scope="module")
def sd1_shapes():
    return module_shapes(build_tiny_pipeline("sd1"))


@pytest.fixture(scope="module")
def sdxl_shapes():
    return module_shapes(build_tiny_pipeline("sdxl"))


def _rand(*shape, seed=[0]):  # noqa: B006 - a deterministic stream across calls
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g)


def _lora_delta(down, up, scale):
    """ΔW by hand (kohya / A1111 convention: conv up is (out, r, 1, 1))."""
    shape = (up.shape[0], *down.shape[1:])
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def _assert_delta(adapter, module, expected, atol=1e-6):
    got = adapter.layers[module].delta()
    assert got.shape == expected.shape, (module, got.shape, expected.shape)
    torch.testing.assert_close(got, expected.float(), atol=atol, rtol=1e-5)


def _randomise_lora_b(model):
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoraLayer):
                for b in mod.lora_B.values():
                    b.weight.copy_(_rand(*b.weight.shape) * 0.1)


def _peft_deltas(model, adapter_name="default"):
    """{module name in ``model``: ΔW} from PEFT's own get_delta_weight."""
    from peft.tuners.lora import LoraLayer

    return {name: mod.get_delta_weight(adapter_name).detach() for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A}


# ------------------------------------------------------------------ files made by peft / diffusers


def test_peft_save_pretrained_with_and_without_config(tmp_path, sd1_shapes):
    from peft import LoraConfig, get_peft_model

    unet = build_tiny_pipeline("sd1").unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "conv1"],
                     rank_pattern={"^" + Q: 2}, alpha_pattern={"attn2.to_k": 3})
    model = get_peft_model(unet, cfg)
    _randomise_lora_b(model)
    model.save_pretrained(tmp_path / "with_cfg")
    raw = load_file(tmp_path / "with_cfg" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in raw)
    (tmp_path / "bare").mkdir()
    save_file(raw, tmp_path / "bare" / "adapter_model.safetensors")

    merged = model.merge_and_unload().state_dict()
    a = read_adapter(tmp_path / "with_cfg", module_names=sd1_shapes)  # a PEFT folder
    assert a.format == "peft" and a.kind == "lora" and a.components() == {"unet"}
    assert len(a.layers) == len(raw) // 2
    validate_adapter(a, sd1_shapes, "sd1")
    for path in a.layers:
        rel = path.removeprefix("unet.")
        _assert_delta(a, path, merged[rel + ".weight"] - base[rel + ".weight"], atol=1e-5)
    assert a.layers["unet." + Q].rank == 2 and a.layers["unet." + Q].scale == 3.0
    assert a.layers["unet." + K2].scale == 0.75

    bare = read_adapter(tmp_path / "bare" / "adapter_model.safetensors")  # no config: alpha = r
    assert bare.format == "peft"
    for path in bare.layers:
        rel = path.removeprefix("unet.")
        down, up = raw[f"base_model.model.{rel}.lora_A.weight"], raw[f"base_model.model.{rel}.lora_B.weight"]
        _assert_delta(bare, path, _lora_delta(down, up, 1.0))


def test_save_lora_weights_new_and_old_spellings(tmp_path, sd1_shapes):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline("sd1")
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_out.0", "proj_in"],
                      rank_pattern={"^" + Q: 2}, alpha_pattern={"proj_in": 1})
    tcfg = LoraConfig(r=2, lora_alpha=5, init_lora_weights="gaussian", target_modules=["q_proj", "fc1"])
    pipe.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    _randomise_lora_b(pipe.unet)
    _randomise_lora_b(pipe.text_encoder)
    usd, tsd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    expected = {f"unet.{k}": v for k, v in _peft_deltas(pipe.unet).items()}
    expected.update({f"text_encoder.{k}": v for k, v in _peft_deltas(pipe.text_encoder).items()})

    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "new", unet_lora_layers=usd, text_encoder_lora_layers=tsd,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "old", unet_lora_layers=convert_state_dict_to_diffusers(usd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(tsd))
    save_file(usd, tmp_path / "unet_peft.safetensors")  # add_adapter + get_peft_model_state_dict: no prefix
    save_file(tsd, tmp_path / "te_peft.safetensors")
    for f, comp, sd in (("unet_peft", "unet", usd), ("te_peft", "text_encoder", tsd)):
        raw = read_adapter(tmp_path / f"{f}.safetensors")
        assert raw.format == "peft" and raw.components() == {comp}
        assert {p for p in expected if p.startswith(comp + ".")} == set(raw.layers)
        for path in raw.layers:
            rel = path.split(".", 1)[1]
            _assert_delta(raw, path, _lora_delta(sd[f"{rel}.lora_A.weight"], sd[f"{rel}.lora_B.weight"], 1.0))

    new = read_adapter(tmp_path / "new" / "pytorch_lora_weights.safetensors", module_names=sd1_shapes)
    assert new.format == "diffusers" and new.components() == {"unet", "text_encoder"}
    assert set(new.layers) == set(expected)
    for path, d in expected.items():
        _assert_delta(new, path, d, atol=1e-5)

    old = read_adapter(tmp_path / "old" / "pytorch_lora_weights.safetensors")  # .lora.down / lora_linear_layer
    assert old.format == "diffusers" and set(old.layers) == set(expected)
    raw = load_file(tmp_path / "old" / "pytorch_lora_weights.safetensors")
    assert any(".lora.down." in k for k in raw) and any("lora_linear_layer" in k for k in raw)
    validate_adapter(old, sd1_shapes, "sd1")
    for path in expected:  # no alphas stored: diffusers' convention is alpha = rank
        d = old.layers[path]
        assert d.scale == 1.0
        torch.testing.assert_close(d.delta(), (d.up.flatten(1) @ d.down.flatten(1)).reshape(d.weight_shape))


def test_attention_processor_era_keys(tmp_path, sd1_shapes):
    r = 2
    t = {
        f"unet.{Q.removesuffix('.to_q')}.processor.to_q_lora.down.weight": _rand(r, 32),
        f"unet.{Q.removesuffix('.to_q')}.processor.to_q_lora.up.weight": _rand(32, r),
        f"unet.{OUT.removesuffix('.to_out.0')}.processor.to_out_lora.down.weight": _rand(r, 64),
        f"unet.{OUT.removesuffix('.to_out.0')}.processor.to_out_lora.up.weight": _rand(64, r),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": _rand(r, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": _rand(32, r),
    }
    save_file(t, tmp_path / "old.safetensors")
    a = read_adapter(tmp_path / "old.safetensors")
    assert set(a.layers) == {"unet." + Q, "unet." + OUT, "text_encoder.encoder.layers.0.self_attn.k_proj"}
    validate_adapter(a, sd1_shapes, "sd1")
    key = f"unet.{OUT.removesuffix('.to_out.0')}.processor.to_out_lora"
    _assert_delta(a, "unet." + OUT, _lora_delta(t[key + ".down.weight"], t[key + ".up.weight"], 1.0))


# ------------------------------------------------------------------ kohya / A1111


def _kohya_lora(name, shape, rank, alpha, out):
    """Write one kohya LoRA module for a base weight ``shape`` into ``out``; returns the hand ΔW."""
    conv = len(shape) == 4
    down = _rand(rank, shape[1], *shape[2:]) if conv else _rand(rank, shape[1])
    up = _rand(shape[0], rank, 1, 1) if conv else _rand(shape[0], rank)
    out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return _lora_delta(down, up, (alpha if alpha is not None else rank) / rank)


def test_kohya_sd1_linear_conv_and_text_encoder(tmp_path, sd1_shapes):
    t, expected = {}, {}
    for module, rank, alpha in [(Q, 4, 2), (OUT, 2, 8), (CONV, 4, 1), (SHORT, 2, None),
                                ("down_blocks.1.attentions.0.proj_in", 3, 6)]:
        expected["unet." + module] = _kohya_lora("lora_unet_" + module.replace(".", "_"), sd1_shapes["unet." + module],
                                                 rank, alpha, t)
    for module, rank, alpha in [(TE_Q, 2, 1), (TE_FC1, 4, 16)]:
        expected["text_encoder." + module] = _kohya_lora("lora_te_text_model_" + module.replace(".", "_"),
                                                         sd1_shapes["text_encoder." + module], rank, alpha, t)
    save_file(t, tmp_path / "k.safetensors")
    for names in (None, sd1_shapes, sd1_shapes.keys()):
        a = read_adapter(tmp_path / "k.safetensors", module_names=names)
        assert a.format == "kohya" and set(a.layers) == set(expected)
        validate_adapter(a, sd1_shapes, "sd1")
        for path, d in expected.items():
            _assert_delta(a, path, d)
    assert a.ranks() == [2, 3, 4]


def test_linear_layout_lora_on_a_1x1_conv_follows_the_base_shape(tmp_path, sd1_shapes):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1×1 Conv2d in SD1, Linear in SD2/SDXL
    down, up = _rand(2, 32), _rand(32, 2)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, tmp_path / "p.safetensors")
    a = read_adapter(tmp_path / "p.safetensors", module_names=sd1_shapes)
    validate_adapter(a, sd1_shapes, "sd1")
    _assert_delta(a, "unet.down_blocks.0.attentions.0.proj_in", (up @ down).reshape(32, 32, 1, 1))
    with pytest.raises(AdapterMismatchError, match=r"\(32, 32, 1, 1\) but the adapter's delta is \(32, 32\)"):
        validate_adapter(read_adapter(tmp_path / "p.safetensors"), sd1_shapes, "sd1")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_rules_cover_every_module(tmp_path, arch, sd1_shapes, sdxl_shapes):
    """Without module names, diffusers' kohya rules (+ ours) give back every module path of both UNets."""
    shapes = sd1_shapes if arch == "sd1" else sdxl_shapes
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if arch == "sdxl" else "lora_te_",
              "text_encoder_2": "lora_te2_"}
    t = {}
    for path, shape in shapes.items():
        comp, rel = path.split(".", 1)
        if comp != "unet" and rel.startswith("encoder."):
            rel = "text_model." + rel  # how kohya spells CLIP text encoder modules
        _kohya_lora(prefix[comp] + rel.replace(".", "_"), shape, 1, None, t)
    save_file(t, tmp_path / "all.safetensors")
    a = read_adapter(tmp_path / "all.safetensors")
    assert set(a.layers) == set(shapes)
    validate_adapter(a, shapes, arch)


def test_kohya_sdxl_sgm_block_names(tmp_path, sdxl_shapes, sd1_shapes):
    # tiny SDXL has layers_per_block=1, so SGM input block i is down block (i-1)//2, layer (i-1)%2
    cases = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2": "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
        "lora_unet_output_blocks_1_1_proj_in": "up_blocks.0.attentions.1.proj_in",
        "lora_unet_input_blocks_3_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
        "lora_unet_output_blocks_2_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "lora_unet_time_embed_0": "time_embedding.linear_1",
    }
    t, expected = {}, {}
    for i, (name, module) in enumerate(cases.items()):
        expected["unet." + module] = _kohya_lora(name, sdxl_shapes["unet." + module], 2 + i % 3, 1 + i, t)
    expected["text_encoder." + TE_Q] = _kohya_lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                                   (32, 32), 2, 4, t)
    expected["text_encoder_2.text_model.encoder.layers.1.mlp.fc2"] = _kohya_lora(
        "lora_te2_text_model_encoder_layers_1_mlp_fc2", (32, 64), 4, 2, t)
    save_file(t, tmp_path / "xl.safetensors")

    a = read_adapter(tmp_path / "xl.safetensors", module_names=sdxl_shapes)
    assert a.format == "kohya" and set(a.layers) == set(expected)
    assert a.arch == "sdxl" and guess_arch(a) == "sdxl"
    validate_adapter(a, sdxl_shapes, "sdxl")
    for path, d in expected.items():
        _assert_delta(a, path, d)
    with pytest.raises(AdapterMismatchError) as e:  # an SDXL adapter on an SD1.5 base names both
        validate_adapter(a, sd1_shapes, "sd1")
    msg = str(e.value)
    assert "sdxl" in msg and "sd1" in msg and "\n" not in msg


# ------------------------------------------------------------------ LyCORIS LoKr


def test_lokr_files(tmp_path, sd1_shapes):
    w = {n: _rand(*s) for n, s in {
        "q1": (4, 4), "q2a": (8, 2), "q2b": (2, 8),          # low-rank w2: scale = alpha / 2
        "o1": (2, 2), "o2": (32, 32),                       # both full: alpha ignored, scale 1
        "k1a": (4, 1), "k1b": (1, 4), "k2": (8, 8),         # low-rank w1: scale = alpha / 1
        "c1": (2, 2), "c2a": (16, 2), "c2b": (2, 16 * 9),   # conv, LyCORIS-flattened w2_b
        "s1": (2, 4), "s2": (32, 8, 1, 1),                  # 1×1 conv, full 4-D w2
        "t1": (2, 2), "t2a": (16, 3), "t2b": (3, 16),       # text encoder, no alpha
    }.items()}
    n = lambda m: "lora_unet_" + m.replace(".", "_")  # noqa: E731
    te = "lora_te_text_model_" + TE_Q.replace(".", "_")
    t = {
        f"{n(Q)}.lokr_w1": w["q1"], f"{n(Q)}.lokr_w2_a": w["q2a"], f"{n(Q)}.lokr_w2_b": w["q2b"],
        f"{n(Q)}.alpha": torch.tensor(1.0),
        f"{n(OUT)}.lokr_w1": w["o1"], f"{n(OUT)}.lokr_w2": w["o2"], f"{n(OUT)}.alpha": torch.tensor(7.0),
        f"{n(K2)}.lokr_w1_a": w["k1a"], f"{n(K2)}.lokr_w1_b": w["k1b"], f"{n(K2)}.lokr_w2": w["k2"],
        f"{n(K2)}.alpha": torch.tensor(0.5),
        f"{n(CONV)}.lokr_w1": w["c1"], f"{n(CONV)}.lokr_w2_a": w["c2a"], f"{n(CONV)}.lokr_w2_b": w["c2b"],
        f"{n(CONV)}.alpha": torch.tensor(4.0),
        f"{n(SHORT)}.lokr_w1": w["s1"], f"{n(SHORT)}.lokr_w2": w["s2"],
        f"{te}.lokr_w1": w["t1"], f"{te}.lokr_w2_a": w["t2a"], f"{te}.lokr_w2_b": w["t2b"],
    }
    save_file(t, tmp_path / "lokr.safetensors")

    def a1111(w1, w2, scale, shape):  # A1111 network_lokr.make_kron
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * scale).reshape(shape)

    expected = {
        "unet." + Q: a1111(w["q1"], w["q2a"] @ w["q2b"], 0.5, (32, 32)),
        "unet." + OUT: a1111(w["o1"], w["o2"], 1.0, (64, 64)),
        "unet." + K2: a1111(w["k1a"] @ w["k1b"], w["k2"], 0.5, (32, 32)),
        "unet." + CONV: a1111(w["c1"], w["c2a"] @ w["c2b"], 2.0, (32, 32, 3, 3)),
        "unet." + SHORT: a1111(w["s1"], w["s2"], 1.0, (64, 32, 1, 1)),
        "text_encoder." + TE_Q: a1111(w["t1"], w["t2a"] @ w["t2b"], 1.0, (32, 32)),
    }
    for names in (None, sd1_shapes):
        a = read_adapter(tmp_path / "lokr.safetensors", module_names=names)
        assert a.format == "lokr" and a.kind == "kron" and set(a.layers) == set(expected)
        validate_adapter(a, sd1_shapes, "sd1")
        for path, d in expected.items():
            _assert_delta(a, path, d, atol=1e-5)
    info = describe(a)
    assert info["type"].startswith("LoKr") and [2, 2] in info["kron_factors"]


# ------------------------------------------------------------------ writing


def _sample_lora_adapter(shapes, comps=("unet", "text_encoder")):
    layers = {}
    specs = [("unet." + Q, 4, 2.0), ("unet." + OUT, 2, None), ("unet." + CONV, 3, 6.0), ("unet." + SHORT, 2, 8.0),
             ("text_encoder." + TE_Q, 2, 1.0), ("text_encoder." + TE_FC1, 4, 4.0)]
    for path, rank, alpha in specs:
        if path.split(".")[0] not in comps:
            continue
        shape = shapes[path]
        if len(shape) == 4:
            layers[path] = LoraDelta(_rand(rank, shape[1], *shape[2:]), _rand(shape[0], rank, 1, 1), alpha)
        else:
            layers[path] = LoraDelta(_rand(rank, shape[1]), _rand(shape[0], rank), alpha)
    return Adapter(name="rt", layers=layers, trigger="sks", concept="shape", concept_kind="object", weight=0.8,
                   arch="sd1", metadata={"ss_training_comment": "kept"})


def _assert_same(a, b, exact=True):
    assert set(a.layers) == set(b.layers)
    for path, d in a.layers.items():
        e = b.layers[path]
        assert type(d) is type(e)
        if exact:
            assert torch.equal(d.delta(), e.delta()), path
        else:
            torch.testing.assert_close(d.delta(), e.delta(), rtol=1e-6, atol=1e-7)
        if isinstance(d, LoraDelta) and exact:
            assert torch.equal(d.down, e.down) and torch.equal(d.up, e.up) and d.scale == e.scale
    for field in ("trigger", "concept", "concept_kind", "weight", "arch", "kind"):
        assert getattr(a, field) == getattr(b, field), field


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "lokr"])
def test_lora_round_trips(tmp_path, sd1_shapes, fmt):
    a = _sample_lora_adapter(sd1_shapes)
    out = write_adapter(a, tmp_path / f"a_{fmt}.safetensors", format=fmt, metadata={"note": "hi"})
    assert os.listdir(tmp_path) == [out.name]  # atomic: no temp files left behind
    b = read_adapter(out)
    assert b.format == ("kohya" if fmt == "lokr" else fmt)  # LoRA layers in a LyCORIS file are kohya LoRA
    assert b.name == "rt" and b.metadata["note"] == "hi" and b.metadata["ss_training_comment"] == "kept"
    assert b.metadata["ss_output_name"] == "rt" and b.metadata["studio_kind"] == "lora"
    _assert_same(a, b, exact=fmt != "diffusers")  # diffusers files carry alpha folded into the up weights
    validate_adapter(b, sd1_shapes, "sd1")


def test_peft_round_trip(tmp_path, sd1_shapes):
    a = _sample_lora_adapter(sd1_shapes, comps=("unet",))
    out = write_adapter(a, tmp_path / "peft_dir", format="peft")
    assert out.name == "adapter_model.safetensors" and (tmp_path / "peft_dir" / "adapter_config.json").is_file()
    b = read_adapter(tmp_path / "peft_dir")
    assert b.format == "peft"
    _assert_same(a, b)
    raw = load_file(out)
    assert all(k.startswith("base_model.model.") for k in raw)
    with pytest.raises(AdapterFileError, match="format='diffusers'"):
        write_adapter(_sample_lora_adapter(sd1_shapes), tmp_path / "two.safetensors", format="peft")


def test_lokr_round_trip(tmp_path, sd1_shapes):
    layers = {
        "unet." + Q: KronDelta(w1=_rand(4, 4), w2_a=_rand(8, 2), w2_b=_rand(2, 8), scale=0.25),
        "unet." + K2: KronDelta(w1_a=_rand(4, 2), w1_b=_rand(2, 4), w2_a=_rand(8, 2), w2_b=_rand(2, 8), scale=1.5),
        "unet." + CONV: KronDelta(w1=_rand(2, 2), w2_a=_rand(16, 3), w2_b=_rand(3, 16, 3, 3), scale=2.0),
        "unet." + SHORT: KronDelta(w1=_rand(2, 4), w2=_rand(32, 8, 1, 1), scale=1.0),
        "text_encoder." + TE_Q: KronDelta(w1=_rand(2, 2), w2_a=_rand(16, 1), w2_b=_rand(1, 16), scale=0.5),
    }
    a = Adapter(name="kr", layers=layers, kind="kron", trigger="zkz", arch="sd1")
    out = write_adapter(a, tmp_path / "kr.safetensors", format="lokr")
    raw = load_file(out)
    assert raw[f"lora_unet_{CONV.replace('.', '_')}.lokr_w2_b"].dim() == 2  # LyCORIS layout
    b = read_adapter(out)
    assert b.format == "lokr"
    _assert_same(a, b)
    for path, d in layers.items():
        assert b.layers[path].scale == d.scale

    full = Adapter(name="full", layers={"unet." + OUT: KronDelta(w1=_rand(2, 2), w2=_rand(32, 32), scale=0.3)},
                   kind="kron")
    c = read_adapter(write_adapter(full, tmp_path / "full.safetensors", format="lokr"))
    assert c.layers["unet." + OUT].scale == 1.0  # both factors full: LyCORIS has no alpha, the scale is folded in
    _assert_same(full, c, exact=False)
    with pytest.raises(AdapterFileError, match="format='lokr'"):
        write_adapter(a, tmp_path / "nope.safetensors", format="kohya")
    assert not (tmp_path / "nope.safetensors").exists()


def test_sdxl_kohya_write_uses_te1_te2(tmp_path, sdxl_shapes):
    layers = {
        "text_encoder." + TE_Q: LoraDelta(_rand(2, 32), _rand(32, 2), 1.0),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": LoraDelta(_rand(2, 32), _rand(32, 2), 3.0),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraDelta(_rand(2, 64), _rand(64, 2), 4.0),
    }
    out = write_adapter(Adapter(name="xl", layers=layers, arch="sdxl"), tmp_path / "xl.safetensors", format="kohya")
    keys = set(load_file(out))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    b = read_adapter(out, module_names=sdxl_shapes)
    assert set(b.layers) == set(layers) and b.arch == "sdxl"
    assert b.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_written_files_load_in_diffusers_with_the_same_delta(tmp_path, sd1_shapes):
    """diffusers' own load_lora_weights reads our diffusers and kohya files with the right alphas."""
    a = _sample_lora_adapter(sd1_shapes)
    # diffusers 0.42 only recognises kohya text-encoder attention LoRA when out_proj is among them
    a.layers["text_encoder.encoder.layers.0.self_attn.out_proj"] = LoraDelta(_rand(3, 32), _rand(32, 3), 1.5)
    for fmt in ("diffusers", "kohya"):
        pipe = build_tiny_pipeline("sd1")
        f = write_adapter(a, tmp_path / f"{fmt}.safetensors", format=fmt)
        pipe.load_lora_weights(str(f), adapter_name="x")
        got = {f"unet.{k}": v for k, v in _peft_deltas(pipe.unet, "x").items()}
        got.update({f"text_encoder.{k}": v for k, v in _peft_deltas(pipe.text_encoder, "x").items()})
        assert set(got) == set(a.layers), fmt
        for path, d in got.items():
            if fmt == "kohya" and path.startswith("text_encoder."):
                continue  # diffusers 0.42 maps per-module kohya text-encoder alphas onto the wrong modules
            torch.testing.assert_close(d, a.layers[path].delta(), atol=1e-5, rtol=1e-5, msg=f"{fmt} {path}")


# ------------------------------------------------------------------ metadata, hash, describe, arch


def test_metadata_card_hash_and_describe(tmp_path):
    t = {}
    _kohya_lora("lora_unet_" + Q.replace(".", "_"), (32, 32), 2, 1, t)
    meta = {"ss_output_name": "inkstyle", "ss_base_model_version": "sdxl_base_v1-0",
            "ss_tag_frequency": json.dumps({"10_ink style": {"ink style": 10, "brush": 3}})}
    f = tmp_path / "ink.safetensors"
    save_file(t, f, metadata=meta)
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    addnet = hashlib.sha256(data[8 + n:]).hexdigest()

    a = read_adapter(f)
    assert a.name == "inkstyle" and a.trigger == "ink style" and a.arch == "sdxl"
    assert a.sha256 == addnet and a.shorthash == addnet[:12] and a.weight == 1.0

    (tmp_path / "ink.json").write_text(json.dumps({"activation text": "inkwash", "preferred weight": 0.7,
                                                    "sd version": "SD1", "description": "ink wash"}))
    b = read_adapter(f, name="mine")
    assert b.name == "mine" and b.trigger == "inkwash" and b.weight == 0.7 and b.arch == "sd1"
    info = describe(b)
    for key in ("format", "type", "ranks", "modules_per_component", "params", "arch_guess", "trigger",
                "sha256", "shorthash", "metadata"):
        assert key in info
    assert info["format"] == "kohya" and info["ranks"] == [2] and info["modules_per_component"] == {"unet": 1}
    assert info["metadata"]["card.description"] == "ink wash" and info["top_tags"][0] == "ink style"

    save_file(t, tmp_path / "h.safetensors", metadata={"sshs_model_hash": "ABCDEF0123456789", "ss_v2": "True"})
    c = read_adapter(tmp_path / "h.safetensors")
    assert c.sha256 == "abcdef0123456789" and c.shorthash == "abcdef012345" and c.arch == "sd2"
    save_file(t, tmp_path / "m.safetensors", metadata={"modelspec.architecture": "stable-diffusion-v1/lora",
                                                       "studio_trigger": "sks", "studio_weight": "0.6"})
    d = read_adapter(tmp_path / "m.safetensors")
    assert d.arch == "sd1" and d.trigger == "sks" and d.weight == 0.6


def test_guess_arch_from_shapes():
    def ad(layers, metadata=None):
        return Adapter(name="g", layers=layers, metadata=metadata or {})

    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert guess_arch(ad({to_k: LoraDelta(torch.zeros(1, 2048), torch.zeros(640, 1))})) == "sdxl"
    assert guess_arch(ad({to_k: LoraDelta(torch.zeros(1, 1024), torch.zeros(640, 1))})) == "sd2"
    assert guess_arch(ad({to_k: LoraDelta(torch.zeros(1, 768), torch.zeros(640, 1))})) == "sd1"
    assert guess_arch(ad({to_k: LoraDelta(torch.zeros(1, 768), torch.zeros(640, 1))},
                         {"ss_base_model_version": "sdxl_base_v1-0"})) == "sdxl"  # metadata wins
    assert guess_arch(ad({"text_encoder_2.text_projection": LoraDelta(torch.zeros(1, 4), torch.zeros(4, 1))})) == "sdxl"
    assert guess_arch(ad({"unet.conv_in": LoraDelta(torch.zeros(1, 4, 3, 3), torch.zeros(4, 1, 1, 1))})) is None


def test_validate_adapter_errors(sd1_shapes):
    good = _sample_lora_adapter(sd1_shapes)
    validate_adapter(good, sd1_shapes, "sd1")
    wrong = Adapter(name="w", layers={"unet." + Q: LoraDelta(torch.zeros(2, 64), torch.zeros(64, 2))})
    with pytest.raises(AdapterMismatchError, match=r"to_q has weight shape \(32, 32\) but the adapter's delta is \(64, 64\)"):
        validate_adapter(wrong, sd1_shapes, "sd1")
    missing = Adapter(name="m", layers={"unet.nothing.here": LoraDelta(torch.zeros(2, 4), torch.zeros(4, 2))})
    with pytest.raises(AdapterMismatchError, match="unet.nothing.here, which the sd1 base model does not have"):
        validate_adapter(missing, sd1_shapes, "sd1")
    wrong.arch = "sd2"
    with pytest.raises(AdapterMismatchError, match="made for sd2 but the base model is sd1: load an sd2 base model"):
        validate_adapter(wrong, sd1_shapes, "sd1")


# ------------------------------------------------------------------ bad input


def _small_kohya(tmp_path, name="k.safetensors", **extra):
    t = {}
    _kohya_lora("lora_unet_" + Q.replace(".", "_"), (32, 32), 2, 1, t)
    t.update(extra)
    save_file(t, tmp_path / name)
    return tmp_path / name, t


def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFileError, match="not found") as e:
        read_adapter(tmp_path / "nope.safetensors")
    _one_line(e)


def test_pickle_refused_then_weights_only(tmp_path):
    _, t = _small_kohya(tmp_path)
    torch.save(t, tmp_path / "k.ckpt")
    for suffix in (".ckpt", ".pt", ".bin", ".pth"):
        (tmp_path / f"k{suffix}").write_bytes((tmp_path / "k.ckpt").read_bytes())
        with pytest.raises(AdapterFileError, match="allow_pickle=True.*--allow-pickle") as e:
            read_adapter(tmp_path / f"k{suffix}")
        _one_line(e)
    a = read_adapter(tmp_path / "k.pt", allow_pickle=True)
    assert a.format == "kohya" and len(a.layers) == 1

    torch.save({"x": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(AdapterFileError, match="weights_only") as e:
        read_adapter(tmp_path / "evil.pt", allow_pickle=True)
    _one_line(e)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_truncated_and_corrupt(tmp_path):
    f, _ = _small_kohya(tmp_path)
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "huge.safetensors").write_bytes(b"\xff" * 64)
    for name, word in [("cut", "truncated"), ("tiny", "truncated"), ("junk", "corrupt"), ("huge", "truncated")]:
        with pytest.raises(AdapterFileError, match=word) as e:
            read_adapter(tmp_path / f"{name}.safetensors")
        _one_line(e)


def test_unknown_format_lists_a_few_keys(tmp_path):
    t = {f"model.diffusion_model.block{i}.weight": torch.zeros(2) for i in range(7)}
    save_file(t, tmp_path / "ckpt.safetensors")
    with pytest.raises(AdapterFileError, match="not an adapter of a known format") as e:
        read_adapter(tmp_path / "ckpt.safetensors")
    msg = _one_line(e)
    assert msg.count("model.diffusion_model.") == 5
    assert detect_format(t) is None
    assert detect_format(["unet.a.lora_A.weight", "unet.a.lora_B.weight"]) == "diffusers"
    assert detect_format(["text_encoder.a.lora_linear_layer.up.weight"]) == "diffusers"
    assert detect_format(["base_model.model.a.lora_A.weight"]) == "peft"
    assert detect_format(["a.lora_A.weight", "a.lora_B.weight"]) == "peft"
    assert detect_format(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]) == "kohya"
    assert detect_format(["lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2"]) == "lokr"
    f, _ = _small_kohya(tmp_path, "mixed.safetensors", **{"something.else": torch.zeros(1)})
    with pytest.raises(AdapterFileError, match="something.else"):
        read_adapter(f)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf(tmp_path, bad):
    t = {}
    _kohya_lora("lora_unet_" + Q.replace(".", "_"), (32, 32), 2, 1, t)
    t[next(iter(t))][0, 0] = bad
    save_file(t, tmp_path / "bad.safetensors")
    with pytest.raises(AdapterFileError, match="NaN or infinite") as e:
        read_adapter(tmp_path / "bad.safetensors")
    _one_line(e)


def test_loha_rank_mismatch_and_incomplete(tmp_path):
    name = "lora_unet_" + Q.replace(".", "_")
    save_file({f"{name}.hada_w1_a": torch.zeros(32, 2), f"{name}.hada_w1_b": torch.zeros(2, 32),
               f"{name}.hada_w2_a": torch.zeros(32, 2), f"{name}.hada_w2_b": torch.zeros(2, 32)},
              tmp_path / "loha.safetensors")
    assert describe(read_adapter(tmp_path / "loha.safetensors"))["type"] == "LoHa (Hadamard)"  # read since issue 19
    save_file({f"{name}.hada_w1_a": torch.zeros(32, 2), f"{name}.hada_w1_b": torch.zeros(2, 32),
               f"{name}.hada_w2_a": torch.zeros(32, 2)}, tmp_path / "loha_half.safetensors")
    with pytest.raises(AdapterFileError, match="lacks hada_w2_b"):
        read_adapter(tmp_path / "loha_half.safetensors")
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "rank.safetensors")
    with pytest.raises(AdapterFileError, match="inconsistent LoRA ranks"):
        read_adapter(tmp_path / "rank.safetensors")
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(AdapterFileError, match="no lora_up"):
        read_adapter(tmp_path / "half.safetensors")


def test_write_refuses_bad_targets(tmp_path, sd1_shapes):
    a = _sample_lora_adapter(sd1_shapes)
    with pytest.raises(AdapterFileError, match=".safetensors"):
        write_adapter(a, tmp_path / "a.ckpt", format="kohya")
    with pytest.raises(AdapterFileError, match="unknown adapter format"):
        write_adapter(a, tmp_path / "a.safetensors", format="ckpt")
    a.layers["unet." + Q].down[0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="NaN"):
        write_adapter(a, tmp_path / "a.safetensors", format="kohya")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ bundled token embeddings (pivotal tuning)


def test_bundle_emb_round_trips_in_kohya_and_lokr(tmp_path, sd1_shapes, sdxl_shapes):
    a = _sample_lora_adapter(sd1_shapes)
    plain_hash, plain_params = a.fingerprint(), a.num_params()
    a.sha256 = None
    a.embeddings = {"sks": {"text_encoder": _rand(1, 32)}}
    assert a.num_params() == plain_params + 32 and a.fingerprint() != plain_hash
    raw = load_file(write_adapter(a, tmp_path / "sd1.safetensors", format="kohya"))
    assert [k for k in raw if k.startswith("bundle_emb.")] == ["bundle_emb.sks.string_to_param.*"]  # A1111 layout
    b = read_adapter(tmp_path / "sd1.safetensors", module_names=sd1_shapes)
    assert b.format == "kohya" and set(b.embeddings) == {"sks"} and set(b.embeddings["sks"]) == {"text_encoder"}
    assert torch.equal(b.embeddings["sks"]["text_encoder"], a.embeddings["sks"]["text_encoder"])
    _assert_same(a, b)
    assert describe(b)["token_embeddings"] == {"sks": {"text_encoder": [1, 32]}}
    validate_adapter(b, sd1_shapes, "sd1")

    xl = Adapter(name="xl", layers={"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                                    LoraDelta(_rand(2, 64), _rand(64, 2), 4.0)}, arch="sdxl",
                 embeddings={"ohwx": {"text_encoder": _rand(1, 32), "text_encoder_2": _rand(1, 32)}})
    raw = load_file(write_adapter(xl, tmp_path / "xl.safetensors", format="kohya"))
    assert {k for k in raw if k.startswith("bundle_emb.")} == {"bundle_emb.ohwx.clip_l", "bundle_emb.ohwx.clip_g"}
    c = read_adapter(tmp_path / "xl.safetensors", module_names=sdxl_shapes)
    for comp in ("text_encoder", "text_encoder_2"):
        assert torch.equal(c.embeddings["ohwx"][comp], xl.embeddings["ohwx"][comp])

    kr = Adapter(name="kr", layers={"unet." + Q: KronDelta(w1=_rand(4, 4), w2=_rand(8, 8), scale=1.0)}, kind="kron",
                 arch="sd1", embeddings={"sks": {"text_encoder": _rand(1, 32)}})
    d = read_adapter(write_adapter(kr, tmp_path / "kr.safetensors", format="lokr"))
    assert d.format == "lokr" and torch.equal(d.embeddings["sks"]["text_encoder"], kr.embeddings["sks"]["text_encoder"])


def test_embedding_only_file_reads_and_formats_without_room_refuse(tmp_path, sd1_shapes):
    from studio.adapters.library import AdapterLibrary

    vec = _rand(32)
    save_file({"bundle_emb.sks.string_to_param.*": vec.clone()}, tmp_path / "emb.safetensors")
    a = read_adapter(tmp_path / "emb.safetensors", module_names=sd1_shapes)
    assert a.layers == {} and a.embeddings["sks"]["text_encoder"].shape == (1, 32)
    assert torch.equal(a.embeddings["sks"]["text_encoder"][0], vec) and a.components() == {"text_encoder"}
    lib = AdapterLibrary(sd1_shapes, "sd1")
    assert lib.add(a) is a and "emb" in lib
    again = read_adapter(write_adapter(a, tmp_path / "again.safetensors", format="kohya"))
    assert again.layers == {} and torch.equal(again.embeddings["sks"]["text_encoder"], a.embeddings["sks"]["text_encoder"])

    wide = Adapter(name="wide", layers={}, embeddings={"sks": {"text_encoder": _rand(1, 768)}})
    with pytest.raises(AdapterMismatchError, match="768-wide token embedding for 'sks'"):
        lib.add(wide)
    xl_only = Adapter(name="xlonly", layers={}, embeddings={"sks": {"text_encoder_2": _rand(1, 32)}})
    with pytest.raises(AdapterMismatchError, match="text_encoder_2"):
        lib.add(xl_only)

    b = _sample_lora_adapter(sd1_shapes, comps=("unet",))
    b.embeddings = {"sks": {"text_encoder": _rand(1, 32)}}
    for fmt in ("diffusers", "peft"):
        with pytest.raises(AdapterFileError, match=r"token embedding for 'sks'.*format='kohya'"):
            write_adapter(b, tmp_path / f"{fmt}.safetensors", format=fmt)
        assert not (tmp_path / f"{fmt}.safetensors").exists()
