"""The Kronecker adapter layer: exact deltas, the vec trick, init, factor errors, counts, LoKr parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from studio.adapters import kron as K
from studio.adapters.adapter import KronDelta, LoraDelta
from studio.base import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_unet():
    return build_tiny_pipeline("sd1").unet.requires_grad_(False).eval()


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ehs, return_dict=False)[0]


def _randomise(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.kron_A.copy_(torch.randn(layer.kron_A.shape, generator=g))
            layer.kron_B.copy_(torch.randn(layer.kron_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("d_out,d_in,a1,a2", [(32, 64, 4, 8), (64, 32, 8, 4), (48, 40, 6, 5), (64, 64, 1, 64)])
@pytest.mark.parametrize("mode", ["vec", "dense"])
def test_kron_linear_equals_materialised_kron(d_out, d_in, a1, a2, mode):
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out)
    layer = K.KronLinear(base, a1, a2, mode=mode)
    with torch.no_grad():
        layer.kron_B.normal_()
    x = torch.randn(3, 5, d_in)
    w = base.weight + torch.kron(layer.kron_A, layer.kron_B)
    torch.testing.assert_close(layer(x), F.linear(x, w, base.bias), rtol=1e-5, atol=1e-5)
    delta = layer.to_delta()
    assert delta.weight_shape == (d_out, d_in)
    torch.testing.assert_close(delta.delta(), torch.kron(layer.kron_A, layer.kron_B).detach())


@pytest.mark.parametrize("kernel,padding,stride", [(3, 1, 1), (1, 0, 1), (3, 1, 2)])
def test_kron_conv_equals_the_conv_with_kron_folded_into_its_kernel(kernel, padding, stride):
    torch.manual_seed(0)
    base = torch.nn.Conv2d(16, 32, kernel, padding=padding, stride=stride)
    layer = K.KronConv2d(base, 4, 2)
    assert layer.kron_B.shape == (8, 8, kernel, kernel) and layer.kron_B.abs().max() == 0
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: nothing changes at step 0
    with torch.no_grad():
        layer.kron_B.normal_()
    w = base.weight + torch.kron(layer.kron_A[:, :, None, None], layer.kron_B)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, base.bias, stride, padding), rtol=1e-5, atol=1e-5)
    delta = layer.to_delta()  # the exported layer is LoKr's conv layout and applies the same ΔW
    assert delta.is_conv and delta.weight_shape == (32, 16, kernel, kernel)
    torch.testing.assert_close(base(x) + delta.forward(x, base), layer(x), rtol=1e-5, atol=1e-5)
    layer.enabled = False
    torch.testing.assert_close(layer(x), base(x))


def test_kron_on_resnet_convs_is_injected_checked_and_removed(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    before = _unet_out(unet)
    layers = K.inject_kron(unet, (4, 4), ["to_q", "conv1", "conv2"], seed=1)
    convs = {n for n, m in layers.items() if isinstance(m, K.KronConv2d)}
    want = {n for n, m in tiny_unet.named_modules() if isinstance(m, torch.nn.Conv2d) and n.endswith(("conv1", "conv2"))}
    assert convs == want and len(layers) > len(convs)
    assert torch.equal(_unet_out(unet), before)
    _randomise(layers)
    assert not torch.equal(_unet_out(unet), before)
    assert K.remove_kron(unet) == len(layers) and torch.equal(_unet_out(unet), before)
    with pytest.raises(K.KronFactorError, match="conv1"):  # factors are checked on channels, naming the layer
        K.inject_kron(copy.deepcopy(tiny_unet), (3, 3), ["conv1"])
    grouped = torch.nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(K.KronFactorError, match="groups=2"):
        K.KronConv2d(grouped, 2, 2, name="g")


SD_SHAPES = [(320, 320), (320, 768), (640, 640), (640, 2048), (1280, 1280), (1280, 2048), (768, 768)]


@pytest.mark.parametrize("d_out,d_in", SD_SHAPES)
@pytest.mark.parametrize("factors", ["krona-paper", "krona-64x8"])
def test_vec_trick_matches_dense_on_sd_shapes(d_out, d_in, factors):
    a1, a2 = K.parse_factors(factors)
    g = torch.Generator().manual_seed(d_out + d_in)
    a = torch.randn(a1, a2, generator=g)
    b = torch.randn(d_out // a1, d_in // a2, generator=g)
    x = torch.randn(2, 7, d_in, generator=g)
    got = KronDelta(w1=a, w2=b).forward(x, None, vec=True)
    want = F.linear(x, torch.kron(a, b))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_init_is_zero_delta_and_output_is_bit_identical(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    before = _unet_out(unet)
    layers = K.inject_kron(unet, (4, 8), seed=3)
    n_blocks = sum(1 for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["transformer_blocks"])
    assert len(layers) == 8 * n_blocks  # q,k,v,out × attn1/attn2 per transformer block
    a = torch.cat([l.kron_A.flatten() for l in layers.values()])
    assert all(l.kron_B.abs().max() == 0 for l in layers.values())
    assert abs(a.std().item() - 1 / 4) < 0.05  # A ~ N(0, 1/a1²)
    assert torch.equal(_unet_out(unet), before)
    assert K.remove_kron(unet) == len(layers)
    assert not K.kron_layers(unet)


def test_bad_factors_name_the_layer_and_valid_factors(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    with pytest.raises(K.KronFactorError) as e:
        K.inject_kron(unet, "3x5")
    msg = str(e.value)
    assert "to_q" in msg and "3x5" in msg and "[1, 2, 4, 8, 16, 32]" in msg and "\n" not in msg
    assert not K.kron_layers(unet)  # nothing was replaced
    with pytest.raises(K.KronFactorError):
        K.parse_factors("sixteen")
    assert K.parse_factors("krona-64x8") == (64, 8) and K.parse_factors("16x8") == (16, 8)


def _meta_unet(**cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return {f"unet.{n}": tuple(m.weight.shape) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}


def test_parameter_counts_match_the_spec():
    sd15 = _meta_unet(cross_attention_dim=768, attention_head_dim=8)
    sdxl = _meta_unet(
        block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
    )
    assert K.param_count(sdxl, "krona-paper") == 3_874_560
    assert K.param_count(sdxl, "krona-64x8") == 2_152_320
    assert K.param_count(sdxl, "8x8") == 14_960_640
    assert K.param_count(sdxl, rank=4) == 5_806_080
    assert K.param_count(sd15, "krona-paper") == 398_048
    assert K.param_count(sd15, "krona-64x8") == 248_176
    assert K.param_count(sd15, rank=4) == 797_184


def test_lycoris_export_import_round_trip_is_exact(tiny_unet, tmp_path):
    from studio.adapters.formats import read_adapter, write_adapter
    from studio.base import module_shapes

    pipe = build_tiny_pipeline("sd1")
    unet = pipe.unet.requires_grad_(False)
    layers = K.inject_kron(unet, (8, 4))
    _randomise(layers)
    trained = _unet_out(unet)
    adapter = K.to_adapter(unet, "krontest", trigger="sks")
    path = write_adapter(adapter, tmp_path / "k.safetensors", format="lokr")
    back = read_adapter(path, module_names=module_shapes(pipe))
    assert back.kind == "kron" and set(back.layers) == set(adapter.layers)
    for key, d in adapter.layers.items():
        assert torch.equal(back.layers[key].delta(), d.delta())  # lokr_w1 = A, lokr_w2 = B, scale 1
    K.remove_kron(unet)
    from studio.adapters.activation import AdapterRig

    with AdapterRig(pipe, [back]) as rig:
        rig.set(unet={back.name: 1.0})
        via_file = _unet_out(unet)
    torch.testing.assert_close(via_file, trained, rtol=1e-5, atol=1e-6)


def test_peft_lokr_with_equal_factors_gives_the_same_delta(tiny_unet):
    from peft import LoKrConfig

    ours_unet = copy.deepcopy(tiny_unet)
    peft_unet = copy.deepcopy(tiny_unet)
    f = 4
    layers = K.inject_kron(ours_unet, (f, f))
    _randomise(layers)
    cfg = LoKrConfig(r=64, alpha=64, decompose_factor=f, decompose_both=False, init_weights="lycoris",
                     target_modules=list(K.TARGETS))
    peft_unet.add_adapter(cfg)
    from peft.tuners.lokr import LoKrLayer

    n_peft = 0
    for name, mod in peft_unet.named_modules():
        if isinstance(mod, LoKrLayer):
            ours = layers[name]
            assert tuple(mod.lokr_w1["default"].shape) == tuple(ours.kron_A.shape)
            assert tuple(mod.lokr_w2["default"].shape) == tuple(ours.kron_B.shape)
            with torch.no_grad():
                mod.lokr_w1["default"].copy_(ours.kron_A)
                mod.lokr_w2["default"].copy_(ours.kron_B)
            torch.testing.assert_close(mod.get_delta_weight("default"), ours.to_delta().delta())
            n_peft += 1
    assert n_peft == len(layers)
    n_params = sum(p.numel() for n, p in peft_unet.named_parameters() if "lokr_" in n)
    assert n_params == sum(l.kron_A.numel() + l.kron_B.numel() for l in layers.values())
    torch.testing.assert_close(_unet_out(peft_unet), _unet_out(ours_unet), rtol=1e-5, atol=1e-5)


def test_svd_conversion_to_lora_is_optimal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    from studio.adapters.adapter import Adapter

    adapter = Adapter("k", {"unet.x.to_q": KronDelta(w1=a, w2=b, scale=0.5)}, kind="kron", trigger="sks")
    full = K.kron_to_lora(adapter, rank=32)
    d = full.layers["unet.x.to_q"]
    assert isinstance(d, LoraDelta) and full.kind == "lora" and full.trigger == "sks"
    torch.testing.assert_close(d.delta(), adapter.layers["unet.x.to_q"].delta(), rtol=1e-4, atol=1e-4)
    for r in (1, 5, 12):  # Eckart–Young: same error as the truncated SVD of the materialised ΔW
        w = adapter.layers["unet.x.to_q"].delta()
        s = torch.linalg.svdvals(w)
        err = torch.linalg.norm(K.kron_to_lora(adapter, r).layers["unet.x.to_q"].delta() - w)
        assert abs(err.item() - s[r:].norm().item()) < 1e-3 * s.norm().item()
