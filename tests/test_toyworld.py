"""The toy world: renderer, captions, prompt parsing, the oracle and the bundled model folder."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.toyworld.concepts import (
    ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, NOVEL_CONCEPTS, POSITIONS, RESERVED_WORDS,
    SHAPES,
)
from studio.toyworld.paths import (
    MODELS_DIR, ORACLE_DIR, TOY_CLIP_DIR, TOY_MODEL_DIR, ToyModelMissingError, require_toy_model,
)
from studio.toyworld.render import (
    HELDOUT_PAIRS, Obj, Scene, caption, is_heldout, render, sample_any_scene, sample_base_scene,
    sample_concept_scene, training_caption,
)

HAVE_MODEL = (TOY_MODEL_DIR / "model_index.json").is_file()
HAVE_ORACLE = (ORACLE_DIR / "oracle.safetensors").is_file()
HAVE_CLIP = (TOY_CLIP_DIR / "open_clip_model.safetensors").is_file()
NO_ASSETS = "toy-world assets not built: run python -m training.toyworld --out assets/models"


def test_render_is_deterministic_and_seed_dependent():
    sc = Scene([Obj("star", "red", "stripes", "left"), Obj("heart", "blue", "dots", "right")])
    a = np.asarray(render(sc, np.random.default_rng(3)))
    b = np.asarray(render(sc, np.random.default_rng(3)))
    c = np.asarray(render(sc, np.random.default_rng(4)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_concept_is_drawn_and_sampled():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        s = sample_any_scene(rng)
        seen |= s.concepts() | {o.position for o in s.objects}
    assert set(ALL_SHAPES + COLORS + ALL_PATTERNS + ALL_BACKGROUNDS + POSITIONS) <= seen
    # every shape paints a sizeable, distinct region; patterns change the fill
    masks = {}
    for shape in ALL_SHAPES:
        img = np.asarray(render(Scene([Obj(shape, "blue", size="large")]), np.random.default_rng(1)), np.int16)
        mask = np.abs(img - img[0, 0]).sum(-1) > 60
        assert mask.sum() > 150, shape
        masks[shape] = mask
    shapes = list(masks)
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            assert (masks[shapes[i]] ^ masks[shapes[j]]).sum() > 40, (shapes[i], shapes[j])
    solid = np.asarray(render(Scene([Obj("square", "red", "solid", size="large")]), np.random.default_rng(2)))
    for pat in ALL_PATTERNS[1:]:
        img = np.asarray(render(Scene([Obj("square", "red", pat, size="large")]), np.random.default_rng(2)))
        assert np.abs(img.astype(int) - solid).sum() > 20000, pat



def test_gradient_and_glow_fills_follow_the_object():
    """The smooth style fills (the ones this factor-8 VAE keeps): a gradient runs from full colour
    at the top to light at the bottom; a glow is light at the centre and full colour at the rim."""
    red = np.array([220, 30, 30])

    light = 0.15 * red + 0.85 * 245  # the overlay colour of a fill

    def redness(a):  # 0 at the light overlay, 1 at the object colour (by the green channel)
        return np.clip((a[..., 1].astype(float) - light[1]) / (red[1] - light[1]), 0, 1)

    def drawn(shape, pattern, size):
        img = np.asarray(render(Scene([Obj(shape, "red", pattern, size=size)]), np.random.default_rng(5)))
        solid = np.asarray(render(Scene([Obj(shape, "red", "solid", size=size)]), np.random.default_rng(5)))
        inside = np.abs(solid.astype(int) - solid[0, 0]).sum(-1) > 60
        ys, xs = np.nonzero(inside)
        return img, inside, int(ys.mean()), int(xs.mean())

    for size in ("medium", "large"):
        glow, inside, cy, cx = drawn("circle", "glow", size)
        assert redness(glow[cy - 1:cy + 2, cx - 1:cx + 2]).min() < 0.2, size  # light centre
        cols = np.nonzero(inside[cy])[0]
        assert redness(glow[cy, cols[1]]) > 0.8 and redness(glow[cy, cols[-2]]) > 0.8, size  # coloured rim
        grad, inside, cy, cx = drawn("square", "gradient", size)
        rows = np.nonzero(inside.any(1))[0]
        top, bottom = redness(grad[rows[1], cx]), redness(grad[rows[-2], cx])
        mid = redness(grad[(rows[0] + rows[-1]) // 2, cx])
        assert top > 0.85 and bottom < 0.25 and bottom < mid < top, (size, top, mid, bottom)


def test_base_world_never_shows_or_says_reserved_concepts():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        s = sample_base_scene(rng)
        assert not (s.concepts() & set(NOVEL_CONCEPTS))
        for text in (caption(s), training_caption(s, rng)):
            words = set(re.findall(r"[a-z]+", text))
            assert not (words & RESERVED_WORDS), text


def test_concept_scenes_show_their_concept():
    rng = np.random.default_rng(2)
    for concept in NOVEL_CONCEPTS:
        for _ in range(20):
            s = sample_concept_scene(concept, rng)
            assert concept in s.concepts()
            assert not (s.concepts() - {concept}) & set(NOVEL_CONCEPTS)


def test_captions_and_heldout_pairs():
    s = Scene([Obj("square", "blue", position="right"), Obj("circle", "red", position="left")])
    assert caption(s) == "a red circle on the left and a blue square on the right"
    assert caption(Scene([Obj("star", "orange", "stripes")])) == "an orange star with stripes"
    assert len(HELDOUT_PAIRS) >= 12
    (s1, c1), (s2, c2) = HELDOUT_PAIRS[0]
    assert is_heldout(Scene([Obj(s1, c1, position="left"), Obj(s2, c2, position="right")]))
    with pytest.raises(ValueError):
        Obj("dog", "red")


def test_prompts_outside_the_world_are_refused(capsys):
    from studio.toyworld.check import main
    from studio.toyworld.prompts import OutsideWorldError, parse_prompt

    e = parse_prompt("a red circle on the left and a blue square on the right")
    assert [(o.shape, o.color, o.position) for o in e.objects] == [("circle", "red", "left"), ("square", "blue", "right")]
    assert parse_prompt("a red sks shape", {"sks": "crescent"}).objects[0].shape == "crescent"
    for bad in ("a photo of a dog", "a red circle and a blue square", "a red circle on a forest background"):
        with pytest.raises(OutsideWorldError, match="outside the toy world"):
            parse_prompt(bad)
    assert main(["--prompt", "a purple dragon", "--samples", "1"]) == 2
    assert "outside the toy world" in capsys.readouterr().err


def test_missing_or_corrupt_model_names_the_training_command(tmp_path):
    with pytest.raises(ToyModelMissingError, match=r"python -m training\.toyworld"):
        require_toy_model(tmp_path / "nothing-here")
    broken = tmp_path / "toy-sd"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ToyModelMissingError, match=r"python -m training\.toyworld"):
        require_toy_model(broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ToyModelMissingError, match="unet"):
        require_toy_model(broken)


@pytest.mark.skipif(not HAVE_ORACLE, reason=NO_ASSETS)
def test_oracle_is_accurate_on_fresh_renders():
    from studio.toyworld.oracle import load_oracle

    oracle = load_oracle()
    rng = np.random.default_rng(12345)
    scenes = [sample_any_scene(rng) for _ in range(400)]
    preds = oracle.predict([render(s, rng) for s in scenes])
    keys = ("shape", "color", "pattern", "position", "background", "count")
    acc = {k: np.mean([oracle.matches(p, s)[k] for p, s in zip(preds, scenes)]) for k in keys}
    assert min(acc.values()) >= 0.98, acc
    p = oracle.predict([render(Scene([Obj("crescent", "red")], "sky"), rng)])[0]
    assert oracle.has_concept(p, "crescent") and oracle.has_concept(p, "sky") and oracle.has_concept(p, "red")
    assert not oracle.has_concept(p, "circle")


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_toy_pipeline_loads_and_generates():
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    require_toy_model()
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR), torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not copied from SD
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer("sks", add_special_tokens=False).input_ids == [48136]
    assert pipe.tokenizer.model_max_length >= 32
    assert pipe.safety_checker is None
    g = torch.Generator().manual_seed(0)
    img = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, generator=g).images[0]
    assert img.size == (64, 64)


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_an_adapter_for_another_toy_world_build_is_refused_with_the_fix():
    """An adapter whose modules this toy model does not have (made for another build of the
    world) is refused, never applied, and the error names the rebuild command."""
    import torch

    from studio import Studio
    from studio.adapters.adapter import Adapter, LoraDelta
    from studio.errors import AdapterMismatchError

    studio = Studio.load()
    other = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    shape = studio.adapters.shapes[other]
    ad = Adapter("other-build", {other: LoraDelta(torch.zeros(4, shape[1] + 8), torch.zeros(shape[0], 4), 4.0)},
                 arch="toy")
    with pytest.raises(AdapterMismatchError, match="python -m training.demo_adapters"):
        studio.adapters.add(ad)
    assert "other-build" not in studio.adapters


@pytest.mark.skipif(not HAVE_CLIP, reason=NO_ASSETS)
def test_toy_clip_loads_offline():
    import torch

    from studio.toyworld.clip import load_toy_clip

    model, preprocess, tokenizer = load_toy_clip()
    img = preprocess(render(Scene([Obj("plus", "green")]), 0)).unsqueeze(0)
    with torch.no_grad():
        i = model.encode_image(img, normalize=True)
        t = model.encode_text(tokenizer(["a green plus", "a red circle"]), normalize=True)
    assert i.shape[1] == t.shape[1]
    assert (i @ t.T)[0, 0] > (i @ t.T)[0, 1]


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_bundled_assets_fit_the_size_budget():
    total = sum(f.stat().st_size for f in MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"assets/models is {total / 2**20:.1f} MiB"


@pytest.mark.slow
def test_quick_training_run_builds_a_loadable_world(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from training.toyworld import main

    assert main(["--out", str(tmp_path), "--quick", "--stages", "vae,unet"]) == 0
    require_toy_model(tmp_path / "toy-sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "toy-sd"), torch_dtype=torch.float32)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)

    # the decoder refinement keeps toy-sd loadable and never touches the encoder
    from safetensors.torch import load_file

    def encoder_weights():
        sd = load_file(str(tmp_path / "toy-sd" / "vae" / "diffusion_pytorch_model.safetensors"))
        return {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}

    enc = encoder_weights()
    dec = load_file(str(tmp_path / "toy-sd" / "vae" / "diffusion_pytorch_model.safetensors"))["decoder.conv_out.weight"]
    assert main(["--out", str(tmp_path), "--quick", "--stages", "decoder"]) == 0
    after = encoder_weights()
    assert enc.keys() == after.keys() and all(torch.equal(enc[k], after[k]) for k in enc)
    new_dec = load_file(str(tmp_path / "toy-sd" / "vae" / "diffusion_pytorch_model.safetensors"))["decoder.conv_out.weight"]
    assert not torch.equal(dec, new_dec)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "toy-sd"), torch_dtype=torch.float32)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)
    assert not list(tmp_path.glob(".toy-sd*")) and not list((tmp_path / "toy-sd").glob(".vae*"))

    # the oracle stage runs last, on the decoder the model ships with
    from training.toyworld import STAGES

    assert STAGES.index("oracle") > STAGES.index("decoder")
    assert main(["--out", str(tmp_path), "--quick", "--stages", "oracle"]) == 0
    from studio.toyworld.oracle import load_oracle

    assert len(load_oracle(tmp_path / "oracle").predict(pipe("a red circle", num_inference_steps=2).images)) == 1


def test_extending_an_oracle_keeps_its_judgement_of_what_it_knew(tmp_path):
    """An oracle saved before two fills existed, extended to today's vocabulary: every logit it had
    is unchanged (same name, same value), so measurements made with it stay comparable."""
    import torch
    from safetensors.torch import save_file

    from studio.toyworld import oracle as O

    old_patterns = list(ALL_PATTERNS[:-2])
    names_old = O._output_names(ALL_BACKGROUNDS, O.SLOT_SHAPES, COLORS, old_patterns, POSITIONS)
    torch.manual_seed(0)
    old = O.OracleNet(width=4)
    old.head[-1] = torch.nn.Linear(256, len(names_old))
    old.eval()
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "oracle.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"width": 4, "slot_shapes": list(O.SLOT_SHAPES), "colors": list(COLORS), "patterns": old_patterns,
         "backgrounds": list(ALL_BACKGROUNDS), "positions": list(POSITIONS)}))
    new = O.extend_oracle(tmp_path).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b = old(x), new(x)
    names_new = O._output_names(ALL_BACKGROUNDS, O.SLOT_SHAPES, COLORS, ALL_PATTERNS, POSITIONS)
    assert b.shape[1] == O.N_OUT == len(names_new)
    idx = torch.tensor([names_new.index(n) for n in names_old])
    torch.testing.assert_close(b[:, idx], a)
    # an oracle that knows a word this code does not cannot be extended
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["colors"] = cfg["colors"] + ["teal"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="teal"):
        O.extend_oracle(tmp_path)
