"""PNG metadata: A1111 infotext and the lora_studio recipe survive saving and reproduce images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import random_lora
from studio.metadata import parse_infotext, read_recipe, save_png


def test_infotext_round_trip_and_reproduction(sd1, tmp_path):
    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    result = sd1.run("a red, circle <lora:a:0.7>", negative_prompt="blurry", steps=3, seed=11,
                     width=64, height=48, progress=False)
    path = save_png(result.images[0], tmp_path / "x.png")
    reopened = Image.open(path)
    fields = parse_infotext(reopened.text["parameters"])
    assert fields["Prompt"] == "a red, circle <lora:a:0.7>"
    assert fields["Negative prompt"] == "blurry"
    assert fields["Steps"] == "3" and fields["Seed"] == "11" and fields["Size"] == "64x48"
    assert fields["Sampler"] == "DDIM" and fields["Composition"] == "merge"
    assert fields["Lora hashes"].startswith("a:")
    assert len(reopened.text["parameters"].splitlines()[-1].split(": ")) > 3  # >= 3 pairs on the last line

    recipe = read_recipe(path)
    assert recipe.seed == 11 and recipe.adapters[0].name == "a" and recipe.adapters[0].weight == 0.7
    again = sd1.reproduce(path).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(reopened.convert("RGB")))


def test_recipe_keeps_non_latin1_prompts(sd1, tmp_path):
    image = sd1.generate("a red circle, 赤い円 ☀", steps=2, seed=1, progress=False)[0]
    path = save_png(image, tmp_path / "u.png")
    assert read_recipe(path).prompt == "a red circle, 赤い円 ☀"


def test_save_png_is_atomic(sd1, tmp_path):
    image = sd1.generate("a red circle", steps=2, seed=1, progress=False)[0]
    save_png(image, tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# ---- A1111 dialect: <lyco:…> tags, sampler names, Model hash, the Negative prompt line -------


def test_lyco_tags_read_as_lora_tags():
    from studio.prompts import parse_prompt

    text, tags = parse_prompt("a cat <lyco:ink:0.6>, <LoRA:sky:0.5:1.0> outside")
    assert text == "a cat , outside"  # tags removed, the rest of the text untouched
    assert [(t.name, t.te, t.unet) for t in tags] == [("ink", 0.6, 0.6), ("sky", 0.5, 1.0)]


def test_a1111_sampler_names_map_to_schedulers(sd1):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from studio.base import make_scheduler, resolve_sampler, sampler_label
    from studio.errors import StudioError

    assert resolve_sampler("DPM++ 2M Karras") == "dpm++2m_karras"
    assert resolve_sampler("DPM++ 2M", schedule="Karras") == "dpm++2m_karras"  # A1111 1.6+ "Schedule type"
    assert resolve_sampler("euler a") == "euler_a" and resolve_sampler("DDIM") == "ddim"
    karras = make_scheduler(sd1.pipe, "DPM++ 2M Karras")
    assert isinstance(karras, DPMSolverMultistepScheduler) and karras.config.use_karras_sigmas
    assert karras.config.algorithm_type == "dpmsolver++"
    assert not make_scheduler(sd1.pipe, "DPM++ 2M").config.use_karras_sigmas
    assert isinstance(make_scheduler(sd1.pipe, "Euler a"), EulerAncestralDiscreteScheduler)
    assert isinstance(make_scheduler(sd1.pipe, "DDIM"), DDIMScheduler)
    assert sampler_label("dpm++2m_karras") == "DPM++ 2M Karras"
    with pytest.raises(StudioError, match=r"choose one of .*Euler a.*DPM\+\+ 2M Karras"):
        resolve_sampler("DPM++ 9M")


def test_ancestral_sampler_is_reproducible_and_labelled(sd1):
    kw = dict(steps=3, seed=5, width=64, height=64, progress=False, sampler="Euler a")
    first, second = sd1.run("a red circle", **kw), sd1.run("a red circle", **kw)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert first.recipes[0].sampler == "euler_a"
    assert "Sampler: Euler a," in first.images[0].info["parameters"]


def test_infotext_has_model_hash_and_always_a_negative_prompt_line(sd1, tmp_path):
    image = sd1.generate("a red circle", steps=2, seed=1, progress=False)[0]
    lines = Image.open(save_png(image, tmp_path / "n.png")).text["parameters"].splitlines()
    assert lines[1].startswith("Negative prompt:")
    fields = parse_infotext("\n".join(lines))
    assert fields["Negative prompt"] == "" and fields["Prompt"] == "a red circle"
    assert len(fields["Model hash"]) == 10 and int(fields["Model hash"], 16) >= 0
    assert fields["Model hash"] == sd1.model_hash == read_recipe(tmp_path / "n.png").model_hash
