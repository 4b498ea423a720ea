"""The Studio API: loading bases, plain generation with 0-2 adapters, prompts, bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from conftest import random_lora
from studio import Studio
from studio.errors import GenerationError, ModelLoadError, StudioError
from studio.prompts import parse_prompt

FAST = dict(steps=3, seed=7, progress=False)


def arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def unet_digest(studio: Studio) -> str:
    h = hashlib.sha256()
    for t in studio.pipe.unet.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_generation_with_zero_one_two_adapters(sd1):
    a, b = sd1.adapters.add(random_lora(sd1, "a", seed=1)), sd1.adapters.add(random_lora(sd1, "b", seed=2))
    plain = sd1.generate("a red circle", **FAST)[0]
    one = sd1.generate("a red circle", ["a"], **FAST)[0]
    two = sd1.generate("a red circle", [("a", 1.0), ("b", 0.7)], **FAST)[0]
    assert plain.size == one.size == two.size == (64, 64)
    assert np.abs(arr(plain) - arr(one)).mean() > 1.0
    assert np.abs(arr(one) - arr(two)).mean() > 1.0
    again = sd1.generate("a red circle", **FAST)[0]
    assert np.array_equal(arr(plain), arr(again)), "no adapter may stay active after a call"


def test_prompt_tags_select_adapters_and_are_removed(sd1):
    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    tagged = sd1.generate("a red circle <lora:a:0.6>", **FAST)[0]
    listed = sd1.generate("a red circle", [("a", 0.6)], **FAST)[0]
    assert np.array_equal(arr(tagged), arr(listed))
    assert parse_prompt("a red circle <lora:a:0.6>")[0] == "a red circle"


def test_a1111_tag_forms():
    _, tags = parse_prompt("x <lora:a:0.8> <lora:b:0.5:1.0> <lora:c:unet=0.3>")
    assert [(t.name, t.te, t.unet) for t in tags] == [("a", 0.8, 0.8), ("b", 0.5, 1.0), ("c", 1.0, 0.3)]


def test_trigger_words_whose_adapters_are_left_out_are_found():
    """A trigger in the text counts only as a whole word, and only when no adapter that has it is used."""
    from studio.prompts import untagged_triggers

    triggers = {"crescent-lora": "sks", "crescent-kron": "sks", "plus-lora": "ohwx", "plain": None}
    assert untagged_triggers("a red sks shape", set(), triggers) == {"sks": ["crescent-kron", "crescent-lora"]}
    assert untagged_triggers("a red sks shape", {"crescent-kron"}, triggers) == {}
    assert untagged_triggers("she asks for an ohwx, please", set(), triggers) == {"ohwx": ["plus-lora"]}
    assert untagged_triggers("a red circle", set(), triggers) == {}


def test_num_images_use_consecutive_seeds_and_fresh_generators(sd1):
    result = sd1.run("a blue star", num_images=2, **FAST)  # one batch: equal within float rounding
    assert [r.seed for r in result.recipes] == [7, 8]
    second = sd1.generate("a blue star", steps=3, seed=8, progress=False)[0]
    assert np.abs(arr(result.images[1]) - arr(second)).max() <= 1
    serial = sd1.run("a blue star", num_images=2, batch_size=1, **FAST)  # one at a time: bit-identical
    assert np.array_equal(arr(serial.images[1]), arr(second))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler"])
def test_samplers_run_on_sdxl(sdxl, sampler):
    sdxl.adapters.add(random_lora(sdxl, "a", seed=3))
    image = sdxl.generate("a red circle", ["a"], sampler=sampler, **FAST)[0]
    assert image.size == (64, 64) and np.isfinite(arr(image)).all()


def test_from_pipeline_does_not_copy_weights(sd1_pipe):
    studio = Studio.from_pipeline(sd1_pipe)
    assert studio.pipe.unet is sd1_pipe.unet
    with pytest.raises(ModelLoadError, match="StableDiffusionPipeline"):
        Studio.from_pipeline(object())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_load_local_folder(tmp_path, request, arch):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    pipe.save_pretrained(tmp_path / arch)
    studio = Studio.load(str(tmp_path / arch))
    assert studio.arch == arch
    ref = Studio.from_pipeline(pipe).generate("a red circle", **FAST)[0]
    assert np.allclose(arr(studio.generate("a red circle", **FAST)[0]), arr(ref), atol=1)


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Studio.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        Studio.load(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="local diffusers folder"):
        Studio.load("some-org/some-model-that-is-not-here")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(width=63), "multiple of 8"),
        (dict(height=100), "multiple of 8"),
        (dict(guidance=-1.0), "guidance"),
        (dict(method="nope"), "merge"),
        (dict(method_params={"bogus": 1}), "no parameter"),
        (dict(sampler="plms"), "ddim"),
        (dict(prompt="x <lora:nope:1>"), "no adapter named 'nope'"),
        (dict(prompt="x <lora:a:1>", adapters=["a"]), "one or the other"),
    ],
)
def test_bad_generation_input_is_refused_and_changes_nothing(sd1, kwargs, match):
    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    before = unet_digest(sd1)
    params = dict(prompt="a red circle", steps=2, progress=False) | kwargs
    with pytest.raises(StudioError, match=match):
        sd1.run(**params)
    assert unet_digest(sd1) == before
    assert len(sd1.pipe.unet._forward_hooks) == 0
    assert all(not m._forward_hooks for m in sd1.pipe.unet.modules())


def test_adapter_with_nan_is_refused(sd1):
    bad = random_lora(sd1, "bad")
    next(iter(bad.layers.values())).up[0, 0] = float("nan")
    with pytest.raises(StudioError, match="NaN"):
        sd1.adapters.add(bad)
    assert "bad" not in sd1.adapters


def test_library_get_remove(sd1):
    sd1.adapters.add(random_lora(sd1, "a"))
    assert [a.name for a in sd1.adapters.list()] == ["a"]
    sd1.adapters.remove("a")
    with pytest.raises(GenerationError.__mro__[1], match="no adapter named"):
        sd1.adapters.get("a")
