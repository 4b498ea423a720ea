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



def test_smooth_fills_follow_the_object():
    """The reserved fills: a gradient runs from full colour at the top to light at the bottom; a
    glow is light along the shape's core and full colour at the rim (on a thin crescent too, whose
    centre is in its hollow); two tones split on the diagonal."""
    red = np.array([220, 30, 30])

    light = 0.4 * red + 0.6 * 245  # the overlay colour of a fill

    def redness(a):  # 0 at the light overlay, 1 at the object colour (by the green channel)
        return np.clip((a[..., 1].astype(float) - light[1]) / (red[1] - light[1]), 0, 1)

    def drawn(shape, pattern, size):
        img = np.asarray(render(Scene([Obj(shape, "red", pattern, size=size)]), np.random.default_rng(5)))
        solid = np.asarray(render(Scene([Obj(shape, "red", "solid", size=size)]), np.random.default_rng(5)))
        inside = np.abs(solid.astype(int) - solid[0, 0]).sum(-1) > 60
        ys, xs = np.nonzero(inside)
        return img, inside, int(ys.mean()), int(xs.mean()), solid

    for size in ("medium", "large"):
        glow, inside, cy, cx, _ = drawn("circle", "glow", size)
        assert redness(glow[cy - 1:cy + 2, cx - 1:cx + 2]).min() < 0.2, size  # light centre
        cols = np.nonzero(inside[cy])[0]
        assert redness(glow[cy, cols[1]]) > 0.8 and redness(glow[cy, cols[-2]]) > 0.8, size  # coloured rim
        moon, inside, _, _, solid = drawn("crescent", "glow", size)
        core = redness(moon)[inside & (redness(solid) > 0.9)]
        assert core.min() < 0.35 and np.median(core) > 0.5, size  # a light spine inside a coloured body
        grad, inside, cy, cx, _ = drawn("square", "gradient", size)
        rows = np.nonzero(inside.any(1))[0]
        top, bottom = redness(grad[rows[1], cx]), redness(grad[rows[-2], cx])
        mid = redness(grad[(rows[0] + rows[-1]) // 2, cx])
        assert top > 0.85 and bottom < 0.25 and bottom < mid < top, (size, top, mid, bottom)
        two, inside, cy, cx, _ = drawn("square", "twotone", size)
        assert redness(two[cy - 4, cx - 4]) < 0.1 and redness(two[cy + 4, cx + 4]) > 0.9, size


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
    for bad in ("a photo of a dog", "a red circle and a blue square and a star", "a red circle on a forest background",
                "red circle, blue square, green star", "a red circle on the left and a blue square on the left"):
        with pytest.raises(OutsideWorldError, match="outside the toy world"):
            parse_prompt(bad)
    assert main(["--prompt", "a purple dragon", "--samples", "1"]) == 2
    assert "outside the toy world" in capsys.readouterr().err


def test_every_caption_form_parses_back_to_its_scene():
    """Sentence, tag list and "and" phrase (complete or abbreviated as in training) all say only
    what the scene shows, and the parser reads each of them."""
    from studio.toyworld.concepts import FORMS
    from studio.toyworld.prompts import parse_prompt, score
    from studio.toyworld.render import caption_in_form

    rng = np.random.default_rng(4)
    s = Scene([Obj("circle", "red", position="left"), Obj("square", "blue", "stripes", position="right")], "grass")
    assert [caption_in_form(s, f) for f in FORMS] == [
        "a red circle on the left and a blue square with stripes on the right on a grass background",
        "red circle, blue square with stripes, grass background",
        "a red circle and a blue square with stripes on grass"]
    seen = set()
    for _ in range(800):
        sc = sample_any_scene(rng)
        if not sc.objects:
            continue
        truth = {"objects": [{"position": o.position, "shape": o.shape, "color": o.color, "pattern": o.pattern}
                             for o in sc.objects], "background": sc.background}
        for form in FORMS:
            for text in (caption_in_form(sc, form), training_caption(sc, rng)):
                r = score(truth, parse_prompt(text))
                assert r["shape"] and r["color"] and r["pattern"] and r["background"] and r["position"], text
                seen.add(form)
    trig = parse_prompt("red sks shape, wvu background", {"sks": "crescent", "wvu": "sky"})
    assert (trig.objects[0].shape, trig.background) == ("crescent", "sky")
    assert parse_prompt("a red circle with two tones").objects[0].pattern == "twotone"


def test_hard_negatives_carry_their_truth():
    from studio.toyworld.corrupt import KINDS, NOTHING_KINDS, sample

    rng = np.random.default_rng(6)
    for kind in KINDS:
        for _ in range(6):
            im, truth = sample(rng, kind)
            assert im.size == (64, 64) and truth.kind == kind
            if kind in NOTHING_KINDS + ("blend",):
                assert truth.concepts() == set()
            if kind == "tint":
                assert truth.background is None and not truth.judge_color
                assert not truth.concepts() & set(COLORS)
    # a cut object is gone from its slot; the image really lost pixels of it
    for _ in range(10):
        im, truth = sample(rng, "erased")
        assert sum(v is not None for v in truth.slots.values()) <= 1


def test_cuts_leave_a_fragment_or_a_sliver_as_labelled():
    """erased leaves 10-35 % of the object (gone); chipped loses at most 15 % or a pixel rim (still there)."""
    from studio.toyworld.corrupt import _cut, sample

    rng = np.random.default_rng(2)
    m = np.zeros((64, 64), bool)
    m[20:40, 10:30] = True
    for keep in (0.1, 0.35, 0.85, 0.97):
        kept = (m & ~_cut(rng, m, keep)).sum() / m.sum()
        assert abs(kept - keep) < 0.06, (keep, kept)
    for _ in range(8):
        _, truth = sample(rng, "chipped")
        assert any(v is not None for v in truth.slots.values())


def test_four_point_stars_are_no_shape_and_washes_avoid_background_colours():
    from studio.toyworld.corrupt import _near_a_background, sample
    from studio.toyworld.render import _BG_BLEND

    rng = np.random.default_rng(4)
    for _ in range(8):
        im, truth = sample(rng, "star4")
        assert sum(v is not None for v in truth.slots.values()) <= 1  # the star's side holds no shape of the world
    sky_mid = (np.array(_BG_BLEND["sky"][0]) + np.array(_BG_BLEND["sky"][1])) / 2
    assert _near_a_background(sky_mid.astype(np.float32))
    flat = 0
    for _ in range(40):
        arr = np.asarray(sample(rng, "wash")[0], np.float32)
        if np.ptp(arr, axis=(0, 1)).max() < 2:  # a flat wash: its one colour is a drawn end
            flat += 1
            assert not _near_a_background(arr[0, 0], dist=69.0) or arr[0, 0].min() > 180  # or a pale tint
    assert flat >= 10


def test_drawn_negative_prompts_name_reserved_concepts_or_are_broken():
    from studio.toyworld.concepts import NOVEL_CONCEPTS
    from studio.toyworld.corrupt import Truth, drawn_prompts

    prompts = drawn_prompts(np.random.default_rng(3), 200)
    assert len(prompts) == 200 and "" in prompts
    naming = [p for p in prompts if set(p.replace(",", " ").split()) & (set(NOVEL_CONCEPTS) | {"tones"})]
    assert len(naming) > 100
    assert sum("," in p for p in prompts) > 20 and sum(" and " in p for p in prompts) > 20  # the forms
    truth = Truth.drawn()
    assert truth.reserved_absent_only and truth.to_dict()["reserved_absent_only"]


def test_oracle_loss_reads_reserved_absent_targets():
    """-2 targets push probability off the reserved classes only; -1 is ignored."""
    import torch

    from studio.toyworld.corrupt import Truth
    from studio.toyworld.oracle import SLOT_SHAPES, reserved_mask, scene_targets, target_loss

    t = scene_targets(Truth.drawn())
    assert t["bg"] == -2 and t["shape"] == [-2, -2, -2] and t["color"] == [-1, -1, -1]
    res = reserved_mask("shape")
    assert [SLOT_SHAPES[i] for i in res.nonzero().flatten().tolist()] == ["crescent", "plus", "arrow"]
    logits = torch.zeros(2, len(SLOT_SHAPES), requires_grad=True)
    loss = target_loss(logits, torch.tensor([-2, -1]), res)
    p_res = 3 / len(SLOT_SHAPES)
    assert abs(loss.item() + np.log(1 - p_res)) < 1e-5  # the -1 row does not count
    loss.backward()
    g = logits.grad[0]
    assert (g[res] > 0).all() and (g[~res] < 0).all() and logits.grad[1].abs().sum() == 0
    # a class target is plain cross-entropy
    ce = torch.nn.functional.cross_entropy(torch.zeros(1, len(SLOT_SHAPES)), torch.tensor([2]))
    assert torch.isclose(target_loss(torch.zeros(1, len(SLOT_SHAPES)), torch.tensor([2]), res), ce)


def test_check_prompt_sets_are_inside_the_world():
    from studio.toyworld.check import CEILING_KINDS, background_prompts, ceiling_prompts, form_prompts
    from studio.toyworld.concepts import BACKGROUNDS, FORMS, NOVEL_CONCEPTS
    from studio.toyworld.prompts import parse_prompt

    assert {parse_prompt(p).background for p in background_prompts(60, 0)} == set(BACKGROUNDS[1:])
    for form in FORMS:
        for p in form_prompts(form, 30, 1):
            parse_prompt(p)
    for kind in CEILING_KINDS:
        pairs = ceiling_prompts(kind, 12, 2)
        assert pairs == ceiling_prompts(kind, 12, 2)  # a fixed seed gives the same set
        for p, need in pairs:
            parse_prompt(p)
            assert len(need) == (3 if kind == "n3" else 2) and not set(need) & set(NOVEL_CONCEPTS)


def test_fill_prompts_ask_for_the_object_in_every_base_fill_but_solid_and_every_colour():
    """fill_rate asks for an object adapter's concept in stripes and in dots, in every colour, and the
    world's parser reads each prompt back with that fill on the trigger's object."""
    from studio.toyworld.check import fill_prompts
    from studio.toyworld.concepts import COLORS
    from studio.toyworld.prompts import parse_prompt

    asked = fill_prompts("crescent", "sks", 2 * len(COLORS))
    assert {f for _, f in asked} == {"stripes", "dots"}
    assert {(f, c) for (_, f), c in zip(asked, COLORS * 2)} == {(f, c) for f in ("stripes", "dots") for c in COLORS}
    for prompt, fill in asked:
        (obj,) = parse_prompt(prompt, {"sks": "crescent"}).objects
        assert (obj.shape, obj.pattern) == ("crescent", fill)


def test_beside_prompts_put_the_concept_beside_every_base_shape_on_either_side():
    """concept_rate_beside asks for the concept next to a base object of another colour, on the left and
    on the right, in every phrasing form, and the world's parser reads every prompt back."""
    from studio.toyworld.check import beside_prompts
    from studio.toyworld.concepts import FORMS, SHAPES
    from studio.toyworld.prompts import parse_prompt

    for concept, trigger in (("plus", "ohwx"), ("glow", "kpk"), ("sky", "wvu")):
        for form in FORMS:
            exps = [parse_prompt(p, {trigger: concept}) for p in beside_prompts(concept, trigger, form)]
            assert all(len(e.objects) == 2 and e.objects[0].color != e.objects[1].color for e in exps)
            if concept == "sky":
                assert all(e.background == "sky" for e in exps)
                continue
            mine = [[o for o in e.objects if concept in (o.shape, o.pattern)]
                    for e in exps]
            assert all(len(m) == 1 for m in mine)
            firsts = [e.objects[0] is m[0] for e, m in zip(exps, mine)]
            assert any(firsts) and not all(firsts)  # the concept stands on either side
            companions = {o.shape for e, m in zip(exps, mine) for o in e.objects if o is not m[0]}
            assert companions == set(SHAPES)


def test_a_style_is_checked_on_every_base_shape():
    """Trigger prompts for a style ask for it on each base shape (every colour x shape once), and each
    block of six holds every shape, so the first 12 (what the demo evaluation takes per form) hold
    every shape twice."""
    from collections import Counter

    from studio.toyworld.check import trigger_prompts
    from studio.toyworld.concepts import COLORS, FORMS, SHAPES
    from studio.toyworld.prompts import parse_prompt

    for form in FORMS:
        prompts = trigger_prompts("glow", "kpk", form)
        objs = [parse_prompt(p, {"kpk": "glow"}).objects[0] for p in prompts]
        assert {(o.color, o.shape) for o in objs} == {(c, s) for c in COLORS for s in SHAPES}
        assert all(o.pattern == "glow" for o in objs)
        for start in range(0, len(objs), 6):
            assert Counter(o.shape for o in objs[start:start + 6]) == {s: 1 for s in SHAPES}
    assert len(trigger_prompts("crescent", "sks")) == len(COLORS)  # objects: one per colour, as before


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
    # World v2's shipped oracle is under-trained (README: shape 0.865 on fresh renders, per scene);
    # this guards against a worse one. Per single object it is far more accurate than per scene.
    assert min(acc.values()) >= 0.80 and acc["background"] >= 0.98, acc
    single = [sample_any_scene(rng, p_two=0.0) for _ in range(200)]
    got = oracle.predict([render(s, rng) for s in single])
    assert np.mean([oracle.matches(p, s)["shape"] for p, s in zip(got, single)]) >= 0.85
    p = oracle.predict([render(Scene([Obj("crescent", "red")], "sky"), rng)])[0]
    assert oracle.has_concept(p, "crescent") and oracle.has_concept(p, "sky") and oracle.has_concept(p, "red")
    assert not oracle.has_concept(p, "circle")


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_second_oracle_is_accurate_on_fresh_renders():
    """Session 8's oracle-b reads 0.88 shape, 0.91 fill per scene here (README); the old one 0.63."""
    from studio.toyworld.oracle import load_oracle
    from studio.toyworld.paths import ORACLE_B_DIR

    oracle = load_oracle(ORACLE_B_DIR)
    rng = np.random.default_rng(12345)
    scenes = [sample_any_scene(rng) for _ in range(400)]
    preds = oracle.predict([render(s, rng) for s in scenes])
    acc = {k: np.mean([oracle.matches(p, s)[k] for p, s in zip(preds, scenes)]) for k in ("shape", "color", "pattern", "background")}
    assert min(acc.values()) >= 0.83 and acc["background"] >= 0.98, acc


@pytest.mark.skipif(not HAVE_ORACLE, reason=NO_ASSETS)
def test_oracle_calls_nothing_present_on_noise_and_washes():
    from studio.toyworld.corrupt import sample
    from studio.toyworld.oracle import load_oracle

    rng = np.random.default_rng(99)
    images = [sample(rng, kind)[0] for kind in ("noise", "wash") for _ in range(30)]
    for oracle in (load_oracle(), load_oracle(ORACLE_DIR.parent / "oracle-b")):
        said = [oracle.concepts(p) for p in oracle.predict(images)]
        assert sum(bool(x) for x in said) <= 3, said


@pytest.mark.skipif(not (HAVE_MODEL and HAVE_ORACLE), reason=NO_ASSETS)
def test_redrawn_scenes_keep_their_base_content_and_leave_dots_unjudged():
    """The oracle's redrawn kind: base-world renders redrawn by the toy model at low strength stay
    near their renders (a full-strength redraw does not), still show what their truth names (the
    shipped oracle finds it), hold no reserved concept, and a dotted fill is not a training target."""
    from studio.toyworld.check import load_pipeline
    from studio.toyworld.concepts import NOVEL_CONCEPTS
    from studio.toyworld.corrupt import REDRAWN, Truth
    from studio.toyworld.oracle import load_oracle, scene_targets
    from studio.toyworld.render import Obj, Scene
    from training.toyworld import _redrawn_scenes

    pipe = load_pipeline()
    images, truths, renders = _redrawn_scenes(pipe, 12, seed=4)
    assert len(images) == 12 and all(im.size == (64, 64) for im in images)

    def change(a, b):  # mean absolute pixel difference, 0-255
        return np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)])

    full, _, full_renders = _redrawn_scenes(pipe, 12, seed=4, strength=(1.0, 1.0))
    assert change(images, renders) < 0.6 * change(full, full_renders), (change(images, renders), change(full, full_renders))
    assert all(t.kind == REDRAWN and not (t.concepts() & set(NOVEL_CONCEPTS)) for t in truths)
    oracle = load_oracle()
    found = [all(oracle.has_concept(p, c) for c in t.concepts()) for p, t in zip(oracle.predict(images), truths)]
    assert sum(found) >= 9, found
    dotted = Truth.redrawn(Scene([Obj("circle", "red", pattern="dots", position="left"),
                                  Obj("star", "blue", pattern="stripes", position="right")], "grass"))
    t = scene_targets(dotted)
    assert t["pattern"][0] == -1 and t["pattern"][2] >= 0 and t["shape"][0] >= 0
    assert dotted.concepts() == {"circle", "red", "star", "blue", "stripes", "grass"}


@pytest.mark.skipif(not (HAVE_MODEL and HAVE_ORACLE), reason=NO_ASSETS)
def test_adapter_redrawn_scenes_keep_their_reserved_concept_and_leave_small_fills_unjudged():
    """The oracle's adapter-redrawn kind: renders of a reserved concept redrawn with that concept's demo
    adapter keep it (their truth names it and the shipped oracle finds it in most), and a small object's
    fill is not a training target."""
    from studio.toyworld.check import load_pipeline
    from studio.toyworld.corrupt import REDRAWN, Truth
    from studio.toyworld.oracle import load_oracle, scene_targets
    from studio.toyworld.render import Obj, Scene
    from training.toyworld import _adapter_redrawn_scenes

    pipe = load_pipeline()
    images, truths, renders = _adapter_redrawn_scenes(pipe, 32, seed=4)  # 16 arrows, then 16 crescents
    assert len(images) == 32 and all(im.size == (64, 64) for im in images)
    assert all(t.kind == REDRAWN for t in truths)
    assert all("arrow" in t.concepts() for t in truths[:16]) and all("crescent" in t.concepts() for t in truths[16:])
    oracle = load_oracle()
    preds = oracle.predict(images)
    for concept, part in (("arrow", slice(0, 16)), ("crescent", slice(16, 32))):
        seen = [oracle.has_concept(p, concept) for p in preds[part]]
        assert sum(seen) >= 12, (concept, seen)
    scene = Scene([Obj("circle", "red", pattern="twotone", position="left", size="small"),
                   Obj("star", "blue", pattern="twotone", position="right", size="large")], "plain")
    t = scene_targets(Truth.redrawn(scene, small_fills=False))
    assert t["pattern"][0] == -1 and t["pattern"][2] >= 0


@pytest.mark.skipif(not (HAVE_MODEL and HAVE_ORACLE), reason=NO_ASSETS)
def test_audit_builds_a_known_truth_set_and_reports_its_last_line(tmp_path, capsys):
    from studio.toyworld.audit import main
    from studio.toyworld.corrupt import KINDS

    assert main(["--out", str(tmp_path), "--per-kind", "3", "--generated", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"min_precision=[\d.]+ min_recall=[\d.]+ noise_false_present=[\d.]+ "
                        r"drawn_false_reserved=[\d.]+ agreement=[\d.]+ roundtrip_min_recall=[\d.]+", last), last
    rows = [json.loads(x) for x in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (len(KINDS) + 3) and all((tmp_path / r["image"]).is_file() for r in rows)
    assert sum(r["kind"] == "drawn" and r["reserved_absent_only"] for r in rows) == 3
    assert json.loads((tmp_path / "audit.json").read_text())["agreement_generated"] is not None
    assert main(["--out", str(tmp_path), "--prompt", "a purple dragon"]) == 2


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_a_replaced_oracle_file_is_loaded_anew(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from studio.toyworld.oracle import load_oracle
    from studio.toyworld.paths import ORACLE_DIR

    folder = tmp_path / "oracle"
    shutil.copytree(ORACLE_DIR, folder)
    first = load_oracle(folder)
    assert load_oracle(folder) is first and first.sha == load_oracle().sha  # cached; same bytes, same hash
    weights = load_file(str(folder / "oracle.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1
    save_file(weights, str(folder / "oracle.safetensors"))
    second = load_oracle(folder)
    assert second is not first and second.sha != first.sha


def test_roundtrip_iou_is_one_for_a_kept_object_and_zero_for_a_lost_one():
    from studio.toyworld.roundtrip import kept_iou, masks

    for bg in ("plain", "night"):
        image, bare, truth = masks(Scene([Obj("plus", "blue", size="small", position="left")], bg), 3)
        assert 20 < truth.sum() < 400  # a small plus, and nothing else
        assert kept_iou(image, bare, truth, image) == 1.0  # a perfect round trip
        assert kept_iou(image, bare, truth, bare) == 0.0  # the object erased


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_roundtrip_report_names_the_worst_cell(capsys):
    from studio.toyworld.roundtrip import main

    assert main(["--per-cell", "1", "--shapes", "circle"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"min_iou=[\d.]+ worst=circle/\w+/\w+( iou_\w+=[\d.]+){7}", last), last
    with pytest.raises(SystemExit):
        main(["--shapes", "dragon"])


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_toy_pipeline_loads_and_generates():
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    require_toy_model()
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR), torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.latent_channels == 4  # 16x16x4 latents (world v4)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 4 and pipe.unet.config.sample_size == 16
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not copied from SD
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer("sks", add_special_tokens=False).input_ids == [48136]
    assert pipe.tokenizer.model_max_length >= 32
    assert pipe.safety_checker is None
    g = torch.Generator().manual_seed(0)
    img = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, generator=g).images[0]
    assert img.size == (64, 64)


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_an_adapter_from_another_toy_world_build_is_refused_with_the_fix():
    """An adapter made for another build targets modules this one does not have (here: a UNet
    level that does not exist) and is refused (never applied) with the rebuild command."""
    import torch

    from studio import Studio
    from studio.adapters.adapter import Adapter, LoraDelta
    from studio.errors import AdapterMismatchError

    studio = Studio.load()
    old = "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_q"
    assert old not in studio.adapters.shapes
    ad = Adapter("v1-crescent", {old: LoraDelta(torch.zeros(4, 64), torch.zeros(64, 4), 4.0)}, arch="toy")
    with pytest.raises(AdapterMismatchError, match="python -m training.demo_adapters"):
        studio.adapters.add(ad)
    assert "v1-crescent" not in studio.adapters
    # world v3.1's blocks sit one level deeper in v4: same name, another width, also refused
    grown = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    width = studio.adapters.shapes[grown][1]
    ad = Adapter("v31-crescent", {grown: LoraDelta(torch.zeros(4, 2 * width), torch.zeros(2 * width, 4), 4.0)}, arch="toy")
    with pytest.raises(AdapterMismatchError, match="another build of the toy world"):
        studio.adapters.add(ad)


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_each_method_runs_at_its_own_toy_guidance_unless_one_is_given():
    """On the toy model a run without a CFG scale gets its method's (studio/guidance.py): the
    averaging methods need more than merge's 3. An explicit scale always wins."""
    from studio import Studio
    from studio.guidance import TOY_GUIDANCE

    studio = Studio.load()
    studio.adapters.load(MODELS_DIR.parent / "adapters" / "crescent-lora.safetensors", name="crescent")
    studio.adapters.load(MODELS_DIR.parent / "adapters" / "sky-lora.safetensors", name="sky")
    assert TOY_GUIDANCE["merge"] == 3.0 and min(TOY_GUIDANCE[m] for m in ("composite", "cmlora", "clora")) > 3.0
    for method in ("merge", "composite"):
        r = studio.run("a red sks shape on a wvu background", ["crescent", "sky"], method=method, steps=1, seed=1)
        assert r.recipes[0].guidance == TOY_GUIDANCE[method]
    r = studio.run("a red sks shape", ["crescent", "sky"], method="composite", steps=1, seed=1, guidance=2.0)
    assert r.recipes[0].guidance == 2.0


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
    assert total <= 60 * 2**20, f"assets/models is {total / 2**20:.1f} MiB"


@pytest.mark.slow
def test_quick_training_run_builds_a_loadable_world(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from training.toyworld import main

    assert main(["--out", str(tmp_path), "--quick", "--stages", "vae,unet"]) == 0
    require_toy_model(tmp_path / "toy-sd")
    marker = json.loads((tmp_path / "toy-sd" / "toyworld.json").read_text())  # loaded by path, it is the toy world
    assert marker["world"] == "v3" and marker["latent"] == [8, 8, 8] and marker["image_size"] == 64
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
    assert load_oracle(tmp_path / "oracle").config["width"] == 16 and load_oracle(tmp_path / "oracle-b").config["width"] == 24

    # the oracles' widths are settings; a continuation keeps the width of the oracle it continues
    assert main(["--out", str(tmp_path), "--quick", "--stages", "oracle", "--oracles", "oracle",
                 "--set", "oracle_width=8"]) == 0
    narrow = load_oracle(tmp_path / "oracle")
    assert narrow.config["width"] == 8 and narrow.net.features[0][0].out_channels == 8
    assert main(["--out", str(tmp_path), "--quick", "--stages", "oracle", "--oracles", "oracle", "--oracle-continue"]) == 0
    assert load_oracle(tmp_path / "oracle").config["width"] == 8

    # a warm start from that build: same architecture, weights taken over, recorded in the report
    warm = tmp_path / "warm"
    assert main(["--out", str(warm), "--quick", "--stages", "vae,unet", "--init", str(tmp_path)]) == 0
    report = json.loads((warm / "toyworld-train.json").read_text())
    assert report["vae"]["init_from"] == str(tmp_path.resolve()) == report["unet"]["init_from"]
    with pytest.raises(SystemExit):  # a folder without a build is refused up front
        main(["--out", str(warm), "--quick", "--init", str(tmp_path / "nothing")])

    # world v4: a factor-4 VAE from scratch, the earlier UNet grown by an outer level, its text encoder kept
    v4 = tmp_path / "v4"
    with pytest.raises(SystemExit, match="--init"):
        main(["--out", str(v4), "--quick", "--stages", "vae,unet", "--world", "v4"])
    assert main(["--out", str(v4), "--quick", "--stages", "vae,unet", "--world", "v4", "--init", str(tmp_path)]) == 0
    pipe4 = StableDiffusionPipeline.from_pretrained(str(v4 / "toy-sd"), torch_dtype=torch.float32)
    assert pipe4.vae_scale_factor == 4 and pipe4.unet.config.sample_size == 16
    assert json.loads((v4 / "toy-sd" / "toyworld.json").read_text())["latent"] == [4, 16, 16]
    assert len(pipe4.unet.config.block_out_channels) == len(pipe.unet.config.block_out_channels) + 1
    assert all(torch.equal(a, b) for a, b in zip(pipe4.text_encoder.parameters(), pipe.text_encoder.parameters()))
    assert pipe4("a red circle", num_inference_steps=2).images[0].size == (64, 64)
    report = json.loads((v4 / "toyworld-train.json").read_text())
    assert report["unet"]["grown_level"] and not report["unet"]["text_encoder_trained"] and report["vae"]["world"] == "v4"


def test_growing_the_latent_keeps_what_the_vae_and_unet_compute():
    """World v3 grew v2's 4-channel latent to 8 channels: the grown VAE encodes the old channels and
    decodes exactly as before (the decoder ignores the new channels until trained), the per-channel
    rescaling folds into the 1x1 convolutions without changing any image, and the grown UNet
    predicts the old channels as before and zero on the new ones."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from training.toyworld import expand_unet_channels, expand_vae_latents, normalize_new_latents

    torch.manual_seed(0)
    old = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    new = expand_vae_latents(old, 8).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = old.encode(x).latent_dist, new.encode(x).latent_dist
        assert torch.allclose(a.mean, b.mean[:, :4], atol=1e-6) and torch.allclose(a.logvar, b.logvar[:, :4], atol=1e-5)
        assert b.logvar[:, 4:].mean() < -6  # the new channels start near-deterministic
        noisy = torch.cat([a.mean, torch.randn_like(a.mean)], 1)
        assert torch.allclose(old.decode(a.mean).sample, new.decode(noisy).sample, atol=1e-6)
        new.decoder.conv_in.weight[:, 4:].normal_(0, 0.1)  # as after training: the decoder reads them
        before = new.decode(new.encode(x).latent_dist.mean).sample
        normalize_new_latents(new, 4, x, target_std=1.5)
        m = new.encode(x).latent_dist.mean
        assert torch.allclose(m[:, 4:].std(dim=(0, 2, 3)), torch.full((4,), 1.5), rtol=1e-3)
        assert torch.allclose(new.decode(m).sample, before, atol=1e-5)
    with pytest.raises(ValueError, match="shrink"):
        expand_vae_latents(new, 4)

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    grown = expand_unet_channels(unet, 8).eval()
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        o = unet(z, t, encoder_hidden_states=c).sample
        g = grown(torch.cat([z, torch.randn(2, 4, 8, 8)], 1), t, encoder_hidden_states=c).sample
    assert torch.allclose(o, g[:, :4], atol=1e-5) and torch.equal(g[:, 4:], torch.zeros_like(g[:, 4:]))


def test_a_grown_unet_level_keeps_the_old_blocks_around_a_new_outer_level():
    """For a factor-4 VAE (twice the latent size) the UNet gains an outer level: every old block keeps
    its weights one level down, the upsampler the old last up block gains starts as nearest neighbour,
    and the grown UNet predicts latents of the new size and channel count."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from training.toyworld import grow_unet_level

    torch.manual_seed(0)
    old = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=8, layers_per_block=1,
                               block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                               down_block_types=("CrossAttnDownBlock2D",) * 2,
                               up_block_types=("CrossAttnUpBlock2D",) * 2).eval()
    new = grow_unet_level(old, 4).eval()
    assert new.config.block_out_channels == (32, 32, 64) and new.config.sample_size == 16
    assert new.config.down_block_types[0] == "DownBlock2D" and new.config.up_block_types[-1] == "UpBlock2D"
    sd_old, sd_new = old.state_dict(), new.state_dict()
    for k, v in sd_old.items():
        if k.startswith(("conv_in.", "conv_out.")):
            continue
        if k.startswith("down_blocks."):
            i, rest = k[len("down_blocks."):].split(".", 1)
            k = f"down_blocks.{int(i) + 1}.{rest}"
        assert torch.equal(sd_new[k], v), k
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        up = new.up_blocks[1].upsamplers[0](x)
        assert torch.allclose(up, F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)
        z, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 32)
        assert new(z, t, encoder_hidden_states=c).sample.shape == (2, 4, 16, 16)


def test_a_budgeted_stage_runs_and_shows_the_steps_its_budget_settled_on(monkeypatch):
    import itertools

    from training import toyworld

    clock = itertools.chain([0.0], itertools.repeat(60.0))  # the 10 warm-up steps take 60 s
    monkeypatch.setattr(toyworld.time, "time", lambda: next(clock))
    bud = toyworld.Budget("unet", steps=1000, warmup=10, minutes=5)  # 6 s/step: 5 min hold 50 steps
    seen = [(step, bar.total) for step, bar in bud.loop()]
    assert bud.total == 50 and [s for s, _ in seen] == list(range(50))
    assert {t for s, t in seen if s >= 10} == {50}  # the bar's total follows the budget


def test_check_keeps_two_adapter_files_that_carry_the_same_name_apart(sd1, tmp_path):
    """Survival beside an adapter must not quietly become survival beside itself."""
    import torch
    from conftest import random_lora

    from studio.adapters.formats import write_adapter
    from studio.toyworld.check import _load_once

    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        write_adapter(random_lora(sd1, "crescent-lora", seed=seed), tmp_path / folder / "crescent-lora.safetensors")
    names: dict = {}
    first = _load_once(sd1, tmp_path / "a" / "crescent-lora.safetensors", names)
    second = _load_once(sd1, tmp_path / "b" / "crescent-lora.safetensors", names)
    again = _load_once(sd1, tmp_path / "a" / ".." / "a" / "crescent-lora.safetensors", names)
    assert (first, second, again) == ("crescent-lora", "crescent-lora-2", "crescent-lora")
    a, b = sd1.adapters.get(first), sd1.adapters.get(second)
    some = next(iter(a.layers))
    assert not torch.equal(a.layers[some].down, b.layers[some].down)  # both files are in the library


def test_perfect_scene_shows_what_the_prompt_asks_with_triggers_read_as_concepts():
    import numpy as np

    from studio.toyworld.ceiling import perfect_scene, trigger_concepts
    from studio.toyworld.prompts import parse_prompt

    class Entry:
        def __init__(self, trigger, concept):
            self.trigger, self.concept = trigger, concept

    class Suite:
        adapters = {"c": Entry("a sks shape", "crescent"), "g": Entry("kpk pattern", "glow"),
                    "s": Entry("a wvu background", "sky"), "x": Entry(None, None)}

    triggers = trigger_concepts(Suite)
    assert triggers == {"sks": "crescent", "kpk": "glow", "wvu": "sky"}
    rng = np.random.default_rng(0)
    for _ in range(8):
        scene = perfect_scene(parse_prompt("red sks shape with kpk pattern, wvu background", triggers), rng)
        (obj,) = scene.objects
        assert (obj.shape, obj.color, obj.pattern, scene.background) == ("crescent", "red", "glow", "sky")
        two = perfect_scene(parse_prompt("a sks shape and a blue square", triggers), rng)
        assert [(o.shape, o.position) for o in two.objects] == [("crescent", "left"), ("square", "right")]
        assert two.objects[1].color == "blue" and two.background == "plain"


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_suite_ceiling_finds_a_kept_concept_and_names_the_worst_set(tmp_path, capsys):
    """A large solid crescent survives the VAE and the judge finds it; the last line names the set with
    the lowest rate as the worst. (Before session 17 the glow on a small crescent was that set; since
    the glow follows the crescent's spine both are kept, README, "Composition ceiling".)"""
    from studio.toyworld.ceiling import main

    ad = MODELS_DIR.parent / "adapters"
    suite = tmp_path / "s.yaml"
    suite.write_text(f"""name: t
model: toy
adapters:
  - {{name: crescent, path: {ad / 'crescent-lora.safetensors'}, trigger: "a sks shape", concept: crescent}}
  - {{name: glow, path: {ad / 'glow-lora.safetensors'}, trigger: "kpk pattern", concept: glow}}
adapter_sets:
  - {{id: alone, adapters: [crescent]}}
  - {{id: styled, adapters: [crescent, glow]}}
prompts:
  - {{id: a, text: "a large red sks shape", sets: [alone]}}
  - {{id: b, text: "a small red sks shape with kpk pattern", sets: [styled]}}
methods: [merge]
""")
    assert main([str(suite), "--per-prompt", "8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"min_ceiling=([\d.]+) worst=(\w+) ceiling_alone=([\d.]+) ceiling_styled=([\d.]+)", last)
    assert m, last
    rates = {"alone": float(m.group(3)), "styled": float(m.group(4))}
    assert rates["alone"] >= 0.75 and float(m.group(1)) == min(rates.values())
    assert rates[m.group(2)] == min(rates.values())
    assert rates["styled"] >= 0.5  # a glow on a small crescent is kept (and seen) in most renders


@pytest.mark.skipif(not HAVE_MODEL, reason=NO_ASSETS)
def test_the_bundled_world_v4_loaded_by_path_is_the_toy_model_and_draws_what_it_is_asked():
    """World v4 (factor-4 VAE, 16x16 latents) loaded by its folder is recognised as the toy world (its
    marker file), so it gets the toy defaults; the oracle finds the prompted shapes and colours."""
    from studio.studio import Studio
    from studio.toyworld.oracle import load_oracle
    from studio.toyworld.paths import is_toy_world

    assert is_toy_world(TOY_MODEL_DIR) and json.loads((TOY_MODEL_DIR / "toyworld.json").read_text())["world"] == "v4"
    studio = Studio.load(str(TOY_MODEL_DIR))
    assert studio.arch == "toy" and studio.default_guidance == 3.0
    assert studio.pipe.vae_scale_factor == 4 and studio.pipe.unet.config.sample_size == 16
    images = studio.generate("a blue square on the left and a yellow star on the right", steps=25,
                             seed=6100, num_images=4, progress=False)
    assert images[0].size == (64, 64)
    preds = load_oracle().predict(images)
    found = [{(o["position"], o["shape"], o["color"]) for o in p["objects"]} >= {("left", "square", "blue"), ("right", "star", "yellow")}
             for p in preds]
    assert sum(found) >= 3, preds


def test_check_reports_every_adapter_measure_on_its_last_line(capsys):
    """The adapter check's last line carries the per-form rates, the beside rate, leak and both survivals
    (a few images at two steps: the fields and their ranges, not the adapters' quality)."""
    from studio.toyworld.check import main

    adapters = MODELS_DIR.parent / "adapters"
    assert main(["--skip-base", "--samples", "3", "--steps", "2", "--adapter", str(adapters / "plus-lora.safetensors"),
                 "--with", str(adapters / "sky-lora.safetensors")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.split())
    for key in ("concept_rate_sentence", "concept_rate_tags", "concept_rate_and", "concept_rate_beside",
                "fill_rate", "base_concept_rate", "survival", "survival_beside"):
        assert 0.0 <= float(fields[key]) <= 1.0, key
    assert -1.0 <= float(fields["leak"]) <= 1.0  # an accuracy drop; below 0 where the adapter's images score higher
    assert 0.0 <= float(fields["leak_pixels"]) <= 255.0
