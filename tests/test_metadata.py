"""PNG metadata: A1111 infotext and the lora_studio recipe survive saving and reproduce images."""

from __future__ import annotations

import numpy as np
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
