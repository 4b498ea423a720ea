"""Files the studio writes load in the real tools (LyCORIS, diffusers, PEFT, ComfyUI's key map), and
files LyCORIS makes load in the studio, with the same forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from studio.adapters.adapter import Adapter, KronDelta, LoraDelta
from studio.adapters.formats import _factorization, lycoris_layout_problem, read_adapter, write_adapter
from studio.base import build_tiny_pipeline, module_shapes

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is in the test extra: pip install -e '.[test]'")

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _rand(*shape, seed=[100]):  # noqa: B006 - a deterministic stream across calls
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd1")


def _lycoris_kron(shape, rank: int | None = None, scale: float = 1.0) -> KronDelta:
    """A LoKr layer in LyCORIS's own default layout (factor -1), w2 low-rank when ``rank``."""
    (a, b), (c, d) = _factorization(shape[0]), _factorization(shape[1])
    w1 = _rand(a, c) * 0.5
    if rank:
        return KronDelta(w1=w1, w2_a=_rand(b, rank) * 0.3, w2_b=_rand(rank, d, *shape[2:]) * 0.3, scale=scale)
    return KronDelta(w1=w1, w2=_rand(b, d, *shape[2:]) * 0.1, scale=scale)


# ---------------------------------------------------------------------------------- LyCORIS


def test_studio_lokr_loads_in_lycoris_with_the_same_forward(pipe, tmp_path, monkeypatch):
    from lycoris.kohya import LycorisNetworkKohya

    # lycoris-lora 4.1.3's default targets name time_embedding.linear_1 both by class (TimestepEmbedding)
    # and by name, so the throwaway default network it builds first asserts on any diffusers UNet
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])

    shapes = module_shapes(pipe)
    layers = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if path.startswith("unet.") and path.endswith(ATTN):
            # both factors full (as studio training writes them, scale folded) and w2 low-rank with alpha
            layers[path] = _lycoris_kron(shape, rank=None if i % 2 else 1, scale=0.7 if i % 3 else 1.0)
    assert all(lycoris_layout_problem(d) is None for d in layers.values())
    adapter = Adapter(name="kr", layers=layers, kind="kron", arch="sd1")
    file = write_adapter(adapter, tmp_path / "kr.safetensors", format="lokr")
    raw = load_file(file)
    modules = {k.split(".")[0] for k in raw}
    assert all(f"{m}.alpha" in raw for m in modules)  # LyCORIS calls float(alpha) on every module

    _lycoris_matches(pipe, file, layers)


def test_trained_conv_lokr_loads_in_lycoris_with_the_same_forward(pipe, tmp_path, monkeypatch):
    """Kronecker layers on ResNet convolutions, in the layout studio training writes (w1 a1×a2 over the
    channels, the kernel in w2), load in LyCORIS as LoKr conv modules with the same forward."""
    from lycoris.kohya import LycorisNetworkKohya

    from studio.adapters import kron as K

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # see the LoKr test above
    unet = copy.deepcopy(pipe.unet)
    trained = K.inject_kron(unet, (4, 4), ["to_k", "conv1", "conv2"], seed=2)
    with torch.no_grad():
        for layer in trained.values():
            layer.kron_B.normal_(0, 0.1)
    adapter = K.to_adapter(unet, "kc", arch="sd1")
    convs = [p for p, d in adapter.layers.items() if d.is_conv]
    assert convs and all(lycoris_layout_problem(d) is None for d in adapter.layers.values())
    file = write_adapter(adapter, tmp_path / "kc.safetensors", format="lokr")
    _lycoris_matches(pipe, file, adapter.layers)


def _lycoris_matches(pipe, file, layers) -> None:
    """LyCORIS builds a network from ``file`` with one module per studio layer, and each wrapped
    module's forward equals the base plus the studio layer's."""
    from lycoris.kohya import create_network_from_weights

    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    network, _ = create_network_from_weights(1.0, str(file), None, te, unet)
    assert len(network.unet_loras) == len(layers)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    by_name = dict(unet.named_modules())
    for path, d in layers.items():
        _same_forward(by_name[path[len("unet."):]], d)


def _same_forward(mod: torch.nn.Module, delta) -> None:
    """The (LyCORIS-wrapped) module's forward equals the base module plus the studio layer's forward."""
    with torch.no_grad():
        if isinstance(mod, torch.nn.Conv2d):
            x = _rand(1, mod.in_channels, 6, 6)
            base = F.conv2d(x, mod.weight, mod.bias, mod.stride, mod.padding)
        else:
            x = _rand(3, mod.in_features)
            base = F.linear(x, mod.weight, mod.bias)
        torch.testing.assert_close(mod(x), base + delta.forward(x, mod), atol=1e-5, rtol=1e-5)


def test_studio_kohya_lora_and_locon_load_in_lycoris_with_the_same_forward(pipe, tmp_path, monkeypatch):
    from lycoris.kohya import LycorisNetworkKohya

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # see the LoKr test above
    shapes = module_shapes(pipe)
    layers = {}
    for path, shape in shapes.items():
        if path.startswith("unet.") and (path.endswith(ATTN) or path.endswith(("conv1", "proj_in"))):
            down = _rand(2, *shape[1:]) * 0.3
            up = _rand(shape[0], 2, *([1, 1] if len(shape) == 4 else [])) * 0.3
            layers[path] = LoraDelta(down, up, alpha=1.5)
    assert any(len(shapes[p]) == 4 and shapes[p][-1] == 3 for p in layers)  # LoCon: 3×3 convs too
    file = write_adapter(Adapter(name="lc", layers=layers, arch="sd1"), tmp_path / "lc.safetensors", format="kohya")
    _lycoris_matches(pipe, file, layers)


def test_krona_paper_is_lycoris_rebuildable_at_sd_widths_and_the_old_ibm_layout_is_not():
    from lycoris.modules.lokr import LokrModule

    from studio.adapters import kron as K

    sd_shapes = [(320, 320), (320, 768), (640, 640), (640, 2048), (1280, 1280), (1280, 2048), (768, 768)]
    a1, a2 = K.parse_factors("krona-paper")
    for out_dim, in_dim in sd_shapes:
        d = KronDelta(w1=_rand(a1, a2), w2=_rand(out_dim // a1, in_dim // a2))
        assert lycoris_layout_problem(d) is None, (out_dim, in_dim)
        with torch.no_grad():
            m = LokrModule.make_module_from_state_dict("lora_unet_x", torch.nn.Linear(in_dim, out_dim, bias=False),
                                                   d.w1, None, None, d.w2, None, None, None, None,
                                                   torch.tensor(1.0), None)
        torch.testing.assert_close(m.get_weight(m.shape), d.delta())  # the weight its forward adds
    b1, b2 = K.parse_factors("krona-64x8")
    for out_dim, in_dim in sd_shapes:
        d = KronDelta(w1=_rand(b1, b2), w2=_rand(out_dim // b1, in_dim // b2))
        assert "LyCORIS would rebuild" in lycoris_layout_problem(d)
    with pytest.warns(DeprecationWarning, match="krona-64x8"):
        assert K.parse_factors("krona-ibm") == (64, 8)


@pytest.mark.parametrize(
    "algo, extra, kind",
    [
        ("lokr", {}, "LoKr (Kronecker)"),
        ("locon", {}, "LoRA"),
        ("lora", {}, "LoRA"),
        ("loha", {}, "LoHa (Hadamard)"),
        ("loha", {"use_tucker": True}, "LoHa (Hadamard) with Tucker factors"),
        ("lokr", {"use_tucker": True}, "LoKr (Kronecker) with Tucker factors"),
        ("locon", {"dora_wd": True}, "DoRA (LoRA)"),
        ("locon", {"dora_wd": True, "wd_on_output": False}, "DoRA (LoRA)"),
        ("loha", {"dora_wd": True}, "DoRA (LoHa (Hadamard))"),
        ("lokr", {"dora_wd": True}, "DoRA (LoKr (Kronecker))"),
    ],
)
def test_lycoris_files_load_in_the_studio_with_the_same_forward(pipe, tmp_path, algo, extra, kind):
    from lycoris import create_lycoris

    from studio.adapters.formats import describe

    unet = copy.deepcopy(pipe.unet)
    kw = {"algo": algo, "conv_dim": 2, "conv_alpha": 1.5, **extra}
    if algo == "lokr":
        kw["factor"] = 4
    network = create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1.0, **kw)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(_rand(*p.shape) * 0.2)
    file = tmp_path / f"{algo}.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(file))
    adapter = read_adapter(file, module_names=module_shapes(pipe))
    mods = network.loras
    assert len(adapter.layers) == len(mods)
    by_name = dict(unet.named_modules())
    convs = 0
    for m in mods:  # LyCORIS's own forward pass (get_diff_weight squares the LoKr scale in 4.1.3)
        rel = _dotted(m.lora_name, adapter)
        _same_forward(by_name[rel], adapter.layers["unet." + rel])
        convs += isinstance(by_name[rel], torch.nn.Conv2d) and by_name[rel].kernel_size == (3, 3)
    assert convs > 0  # 3×3 convs (LoCon / conv LoKr) are among them
    assert describe(adapter)["type"] == kind


def _dotted(lora_name: str, adapter: Adapter) -> str:
    flat = lora_name[len("lycoris_"):]
    matches = [p[len("unet."):] for p in adapter.layers if p[len("unet."):].replace(".", "_") == flat]
    assert len(matches) == 1, lora_name
    return matches[0]


# ---------------------------------------------------------------------------------- diffusers format


def _comfy_unet_key_map(unet) -> dict[str, str]:
    """ComfyUI's diffusers-LoRA names for a UNet (comfy/lora.py ``model_lora_keys_unet``): each weight's
    diffusers module name, with attention known only as ``….processor.to_q`` / ``….processor.to_out``."""
    out = {}
    for name, _ in unet.named_parameters():
        if not name.endswith(".weight"):
            continue
        for prefix in ("", "unet."):
            key = prefix + name[: -len(".weight")].replace(".to_", ".processor.to_")
            if key.endswith(".to_out.0"):
                key = key[:-2]
            out[key] = name[: -len(".weight")]
    return out


_COMFY_LORA_NAMES = ("{}.lora_up.weight", "{}_lora.up.weight", "{}.lora_B.weight", "{}.lora.up.weight",
                     "{}.lora_linear_layer.up.weight")  # comfy/weight_adapter/lora.py LoRAAdapter.load


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_files_map_in_full_in_comfyui_with_alpha_folded(tmp_path, arch):
    pipe = build_tiny_pipeline(arch)
    shapes = module_shapes(pipe)
    layers = {}
    for path, shape in shapes.items():
        if path.startswith("unet.") and (path.endswith(ATTN) or path.endswith(("proj_in", "ff.net.2", "conv1"))):
            r = 2
            down = _rand(r, *shape[1:]) if len(shape) == 4 else _rand(r, shape[1])
            up = _rand(shape[0], r, 1, 1) if len(shape) == 4 else _rand(shape[0], r)
            layers[path] = LoraDelta(down, up, alpha=1.0)  # scale 0.5, which ComfyUI cannot read from metadata
    te_q = next(p for p in shapes if p.startswith("text_encoder.") and p.endswith("layers.0.self_attn.q_proj"))
    layers[te_q] = LoraDelta(_rand(2, 32), _rand(32, 2), alpha=4.0)
    file = write_adapter(Adapter(name="d", layers=layers, arch=arch), tmp_path / "d.safetensors")
    raw = load_file(file)
    assert not any(k.endswith(".alpha") for k in raw)

    key_map = _comfy_unet_key_map(pipe.unet)
    clip_map = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
    te_names = {f"{c}.text_model.encoder.layers.{b}.{m}": f"{c}.{'text_model.' * _nested(pipe, c)}encoder.layers.{b}.{m}"
                for c in ("text_encoder", "text_encoder_2") for b in range(32) for m in clip_map}  # comfy/lora.py
    key_map.update({k: v for k, v in te_names.items()})
    loaded = {}
    for x in key_map:
        for pattern in _COMFY_LORA_NAMES:
            up_key = pattern.format(x)
            if up_key in raw:
                down_key = up_key.replace("lora_up", "lora_down").replace("lora_B", "lora_A").replace(".up.", ".down.")
                target = key_map[x] if x in te_names else "unet." + key_map[x]
                up, down = raw[up_key], raw[down_key]
                loaded[target] = (up.flatten(1) @ down.flatten(1)).reshape(layers_shape(layers, target))
    assert set(loaded) == set(layers)  # every module is mapped (SD1.5: 136 of 136)
    for path, delta in loaded.items():
        torch.testing.assert_close(delta, layers[path].delta(), atol=1e-6, rtol=1e-5)  # ComfyUI: alpha absent = 1


def layers_shape(layers, path):
    return layers[path].weight_shape


def _nested(pipe, comp: str) -> bool:
    """Whether this transformers' CLIP text model keeps its layers under ``text_model``."""
    return hasattr(getattr(pipe, comp, None), "text_model")


# ---------------------------------------------------------------------------------- PEFT format


def test_peft_files_load_with_peftmodel_from_pretrained(pipe, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    shapes = module_shapes(pipe)
    layers = {p: LoraDelta(_rand(r, s[1]), _rand(s[0], r), alpha=a)
              for (p, s), (r, a) in zip(sorted((p, s) for p, s in shapes.items() if p.startswith("unet.") and
                                               p.endswith(ATTN)), [(2, 1.0), (4, 8.0), (2, 2.0)] * 100)}
    folder = tmp_path / "peft"
    write_adapter(Adapter(name="p", layers=layers, arch="sd1"), folder, format="peft")
    model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(folder))
    got = {"unet." + n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
           for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(got) == set(layers)
    for path, delta in got.items():
        torch.testing.assert_close(delta, layers[path].delta(), atol=1e-6, rtol=1e-5)


def test_peft_dora_files_load_with_the_same_forward(pipe, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from studio.adapters.formats import describe

    model = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(r=2, lora_alpha=4, target_modules=list(ATTN),
                                                              use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.copy_(p + _rand(*p.shape) * 0.3)
    model.save_pretrained(str(tmp_path / "dora"))
    adapter = read_adapter(tmp_path / "dora", module_names=module_shapes(pipe))
    assert describe(adapter)["type"] == "DoRA (LoRA)"
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {f"unet.{n}" for n in peft_layers} == set(adapter.layers)
    for name, layer in peft_layers.items():
        base = layer.get_base_layer()
        x = _rand(3, base.in_features)
        with torch.no_grad():
            want = layer(x)
            got = base(x) + adapter.layers[f"unet.{name}"].forward(x, base)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_loha_and_dora_compose_and_merges_say_what_they_cannot(pipe, tmp_path):
    """A LoHa adapter works with every composer's path (it is applied through its forward) and in
    weight-space merges; a DoRA one is refused by merges with a message naming what works."""
    from studio import Studio
    from studio.adapters.adapter import DoraDelta, HadaDelta
    from studio.adapters.merge import merge_adapters
    from studio.errors import StudioError

    studio = Studio.from_pipeline(copy.deepcopy(pipe), "tiny-sd1")
    shapes = {p: s for p, s in studio.adapters.shapes.items() if p.startswith("unet.") and p.endswith(ATTN)}
    hada = Adapter(name="ha", arch="sd1", trigger="ha", concept="shape", layers={
        p: HadaDelta(_rand(s[0], 2) * 0.3, _rand(2, s[1]) * 0.3, _rand(s[0], 2) * 0.3, _rand(2, s[1]) * 0.3, s, 0.5)
        for p, s in shapes.items()})
    dora = Adapter(name="do", arch="sd1", trigger="do", concept="shape", layers={
        p: DoraDelta(LoraDelta(_rand(2, s[1]) * 0.3, _rand(s[0], 2) * 0.3), _rand(s[0]).abs() + 0.5)
        for p, s in shapes.items()})
    studio.adapters.add(hada)
    studio.adapters.add(dora)
    fast = dict(steps=2, seed=1, width=64, height=64, progress=False)
    plain = studio.generate("a red circle", **fast)[0]
    for method in ("merge", "composite", "switch"):
        image = studio.generate("a red circle", [("ha", 1.0), ("do", 1.0)], method=method, **fast)[0]
        assert image.tobytes() != plain.tobytes(), method
    merged = merge_adapters([hada], None, "svd", rank=4)
    assert set(merged.layers) == set(hada.layers)
    with pytest.raises(StudioError, match="DoRA.*base model's weights.*merge, switch, composite"):
        merge_adapters([dora], None, "svd", rank=4)


def test_diffusers_files_load_in_sdxl_pipelines_with_the_same_delta(tmp_path):
    from peft.tuners.lora import LoraLayer

    pipe = build_tiny_pipeline("sdxl")
    shapes = module_shapes(pipe)
    layers = {p: LoraDelta(_rand(2, *s[1:]), _rand(s[0], 2, *([1, 1] if len(s) == 4 else [])), alpha=1.0)
              for p, s in shapes.items() if p.startswith("unet.") and p.endswith(ATTN + ("proj_in",))}
    te2 = next(p for p in shapes if p.startswith("text_encoder_2.") and p.endswith("layers.0.self_attn.out_proj"))
    layers[te2] = LoraDelta(_rand(2, 32), _rand(32, 2), alpha=3.0)
    file = write_adapter(Adapter(name="xl", layers=layers, arch="sdxl"), tmp_path / "xl.safetensors")
    pipe.load_lora_weights(str(file), adapter_name="x")
    got = {}
    for comp in ("unet", "text_encoder_2"):
        for n, m in getattr(pipe, comp).named_modules():
            if isinstance(m, LoraLayer) and "x" in m.lora_A:
                got[f"{comp}.{n}"] = m.get_delta_weight("x").detach()
    assert set(got) == set(layers)
    for path, delta in got.items():
        torch.testing.assert_close(delta, layers[path].delta(), atol=1e-5, rtol=1e-5)


def test_shipped_kronecker_demos_carry_an_alpha_on_every_module():
    """LyCORIS calls float(alpha) on every LoKr module; the demo files were re-exported with it."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "assets" / "adapters"
    files = sorted(folder.glob("*-kron.safetensors"))
    assert files
    for file in files:
        raw = load_file(file)
        modules = {k.rsplit(".", 1)[0] for k in raw if ".lokr_" in k}
        assert modules and all(f"{m}.alpha" in raw for m in modules), file.name
