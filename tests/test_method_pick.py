"""The method suggested for the adapters in a prompt: by their kinds, from the toy world's selection
counts, nothing on real models; and the app's line and button that offer it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from composers import COMPOSERS
from studio import Studio
from studio.method_pick import SELECTION_ORDER, TOY_PICKS, pair_type, suggest_method

REPO = Path(__file__).resolve().parent.parent
CRESCENT_PLUS = "a red sks shape and a blue ohwx shape <lora:crescent-lora:1> <lora:plus-lora:1>"


@pytest.mark.parametrize("kinds, expected", [
    (["object", "object"], "object + object"),
    (["object", "character"], "object + object"),
    (["object", "background"], "object + background"),
    (["style", "object"], "object + style"),
    (["object", "object", "background"], "object + object"),
    (["object", "background", "style"], "mixed"),
    (["background", "style"], "mixed"),
    (["object"], None),
    (["object", None], None),
])
def test_pair_type_from_kinds(kinds, expected):
    assert pair_type(kinds) == expected


def test_each_pick_is_its_selection_winner_unless_it_names_no_method():
    """The table cannot drift from its evidence: a pick is the method with the most all-present images on
    the selection seeds (a tie broken in words); object + style names none (the evaluation seeds contradicted
    its winner)."""
    as_label = {"clora": {(): "clora", (("step_size", 5.0),): "clora step 5",
                          (("background", "auto"), ("step_size", 5.0)): "clora step 5 background auto"}}
    for kind, pick in TOY_PICKS.items():
        assert len(pick.selection) == len(SELECTION_ORDER) and max(pick.selection) <= pick.images
        if pick.method is None:
            assert kind == "object + style" and "no method" in pick.expect
            continue
        winners = [m for m, c in zip(SELECTION_ORDER, pick.selection) if c == max(pick.selection)]
        label = as_label.get(pick.method, {}).get(tuple(sorted(pick.params.items())), pick.method)
        assert label in winners, kind
        assert label == winners[0] or pick.tie_break, kind
        assert set(pick.params) <= set(COMPOSERS[pick.method].defaults)


def test_no_suggestion_on_real_models_or_for_one_adapter():
    assert suggest_method("sd1", ["object", "object"]) is None
    assert suggest_method("sdxl", ["object", "background"]) is None
    assert suggest_method("toy", ["object"]) is None
    mixed = suggest_method("toy", ["object", "background", "style"])
    assert mixed.method is None and "no pick measured" in mixed.markdown()


@pytest.fixture(scope="module")
def toy() -> Studio:
    from studio.app import load_demo_adapters
    from studio.resources import demo_adapters_dir

    studio = Studio.load()
    load_demo_adapters(studio, demo_adapters_dir())
    return studio


def test_studio_suggests_by_the_kinds_of_the_tagged_adapters(toy):
    pick = toy.suggest_method(CRESCENT_PLUS)
    assert (pick.method, pick.params) == ("clora", {"step_size": 5.0})
    assert "clora step 5 43" in pick.markdown() and "merge 6" in pick.markdown()
    sky = toy.suggest_method("a red sks shape on a wvu background <lora:crescent-lora:1> <lora:sky-lora:1>")
    assert (sky.method, sky.params) == ("clora", {"step_size": 5.0, "background": "auto"})
    assert "cmlora 23, clora step 5 background auto 23" in sky.markdown() and "`oracle-b` saw both in 20" in sky.markdown()
    assert toy.suggest_method("a red sks shape with kpk pattern <lora:crescent-lora:1> <lora:glow-lora:1>") \
        .method is None
    three = toy.suggest_method(CRESCENT_PLUS + " on a wvu background <lora:sky-lora:1>")
    assert (three.method, three.params) == ("clora", {"step_size": 5.0, "background": "auto"})
    assert set(three.params) <= set(COMPOSERS["clora"].defaults)
    assert "5 of 48 images against 4" in three.markdown() and "0.69 [0.55, 0.80]" in three.markdown()
    assert toy.suggest_method("a red sks shape <lora:crescent-lora:1>") is None
    assert toy.suggest_method("a red circle <lora:crescent-lora:1> <lora:nothing:1>") is None  # unknown tag


def test_app_offers_the_pick_until_it_is_used(toy, tmp_path):
    """Merge with two objects: the line suggests step-5 CLoRA with a button; the button sets the method, its
    full parameters with step_size 5, its CFG and help; then the line confirms and the button hides."""
    from studio.app import AppHandlers

    h = AppHandlers(toy, tmp_path / "out")
    line, button = h.method_hint(CRESCENT_PLUS, "merge", h.method_params("merge"))
    assert line.startswith("**Suggested for object + object: clora, step_size 5.**")
    assert button.visible and button.value == "Use clora, step_size 5"
    method, params, guidance, help_text = h.use_suggested_method(CRESCENT_PLUS)
    assert method == "clora" and guidance == toy.default_guidance_for("clora")
    assert json.loads(params) == {**COMPOSERS["clora"].defaults, "step_size": 5.0}
    assert help_text == h.method_help("clora")
    line, button = h.method_hint(CRESCENT_PLUS, method, params)
    assert line.startswith("✓ clora, step_size 5: the suggested method") and not button.visible
    # the published step size is CLoRA too, but not the pick
    assert h.method_hint(CRESCENT_PLUS, "clora", h.method_params("clora"))[1].visible
    line, button = h.method_hint("a red shape <lora::1> <lora:crescent-lora:1>", "merge", "{}")
    assert line == "" and not button.visible  # a malformed tag: Generate names it
    line, button = h.method_hint("a red sks shape with kpk pattern <lora:crescent-lora:1> <lora:glow-lora:1>",
                                 "merge", "{}")
    assert line.startswith("**object + style:** no method holds both reliably") and not button.visible


def test_parameter_fields_show_the_json_values_that_fit_their_type():
    spec = importlib.util.spec_from_file_location("studio_app_pick", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    defaults = {"step_size": 20.0, "latent_update": True, "style": "", "prompts": None}
    given = json.dumps({"step_size": 5.0, "latent_update": "yes", "style": "glow", "extra": 1})
    assert app.field_values(given, defaults) == {"step_size": 5.0, "latent_update": True, "style": "glow",
                                                 "prompts": None}
    assert app.field_values("{not json", defaults) == defaults
    assert app.field_values("[1, 2]", defaults) == defaults
