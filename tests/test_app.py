"""The Gradio app: handler functions on a tiny SD1 studio, then the app launched in-process and
driven with gradio_client (metadata survives, parallel == serial, Stop/cancel interrupts, bad
uploads give a message)."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
from urllib.parse import quote
import socket
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from composers import COMPOSERS  # noqa: E402
from studio import Studio  # noqa: E402
from studio.adapters.formats import write_adapter  # noqa: E402
from studio.app import AppHandlers, card_label, load_demo_adapters, seed_axis_from  # noqa: E402
from studio.metadata import read_recipe  # noqa: E402

from conftest import random_lora  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Gradio and gradio_client leave event loops (and their self-pipe sockets) for the GC to close.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _load_app_module():
    spec = importlib.util.spec_from_file_location("studio_app", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _studio(pipe) -> Studio:
    studio = Studio.from_pipeline(pipe, "tiny-sd1")
    for i, name in enumerate(("a", "b")):
        adapter = random_lora(studio, name, seed=i + 1, scale=0.5)
        adapter.trigger = f"sks{name}"
        studio.adapters.add(adapter)
    return studio


class _UnetCalls:
    """Counts UNet forwards (with times) through a forward hook, removed at the end."""

    def __init__(self, pipe):
        self.times: list[float] = []
        self._handle = pipe.unet.register_forward_hook(lambda *a: self.times.append(time.perf_counter()))

    def __len__(self):
        return len(self.times)

    def close(self):
        self._handle.remove()


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def h(sd1_pipe, tmp_path) -> AppHandlers:
    return AppHandlers(_studio(sd1_pipe), tmp_path / "out")


GEN = dict(negative_prompt="", method="merge", params_json="{}", sampler="ddim", guidance=7.5, width=64, height=64)


# ---- handlers ------------------------------------------------------------------------------
def test_method_params_are_the_composer_defaults(h):
    assert "merge" in h.methods()
    for name, cls in COMPOSERS.items():
        assert json.loads(h.method_params(name)) == dict(cls.defaults)


def test_picking_a_method_sets_its_cfg_and_says_so(h):
    """The CFG slider follows the method (its default on this model), and the help says it did."""
    for name in COMPOSERS:
        assert h.method_guidance(name) == h.studio.default_guidance_for(name)
        assert f"sets CFG to {h.method_guidance(name):g}" in h.method_help(name)


def test_card_actions_name_a_known_adapter_or_nothing(h):
    assert h.parse_card_action("insert|a|1733400000000") == ("insert", "a")
    assert h.parse_card_action("open|b|1") == ("open", "b")
    assert h.parse_card_action("open|gone|1") == ("", "")  # deleted since the cards were drawn
    assert h.parse_card_action("drop|a|1") == ("", "")
    assert h.parse_card_action(None) == ("", "")


def test_insert_tag_adds_tag_and_trigger_once(h):
    out = h.insert_tag("a red circle", "a")
    assert out == "a red circle, sksa <lora:a:1>"
    assert h.insert_tag(out, "a") == out
    h.studio.adapters.get("b").weight = 0.7
    assert h.insert_tag("", "b") == "sksb <lora:b:0.7>"
    assert h.insert_tag("a green sksb shape", "b") == "a green sksb shape <lora:b:0.7>"  # trigger written: tag only


def test_insert_tag_continues_the_sentence_and_starts_from_the_example(h):
    """A background's phrase continues the sentence; an empty prompt starts from the example prompt, a whole
    prompt that draws the concept, not from a bare phrase with nothing to stand on."""
    h.store.update("a", trigger_phrase="a red sksa shape")
    h.store.update("b", trigger_phrase="on a sksb background", example_prompt="a red circle on a sksb background")
    first = h.insert_tag("", "a")
    assert first == "a red sksa shape <lora:a:1>"
    assert h.insert_tag(first, "b") == "a red sksa shape <lora:a:1> on a sksb background <lora:b:1>"
    from studio.prompts import parse_prompt

    assert parse_prompt(h.insert_tag(first, "b"))[0].split() == "a red sksa shape on a sksb background".split()
    assert h.insert_tag("", "b") == "a red circle on a sksb background <lora:b:1>"
    assert h.insert_tag("a blue star", "a") == "a blue star and a red sksa shape <lora:a:1>"  # another object


def test_generate_yields_previews_then_pngs_with_metadata(h):
    outs = list(h.generate("a red circle <lora:a:0.8>", **GEN, seed=5, steps=4, batch_count=2))
    previews = [o[1] for o in outs[:-1] if isinstance(o[1], Image.Image)]
    assert previews and all(isinstance(p, Image.Image) for p in previews)
    gallery, _, info, report, extras, last_seed, status = outs[-1]
    assert "Done" in status and any("image 2/2 · step" in str(o[6]) and "ETA" in str(o[6]) for o in outs)
    assert [c for _, c in gallery] == ["seed 5", "seed 6"] and last_seed == 5
    assert report["unet_calls"] == 8 and "8 UNet calls" in info and extras == []
    assert report["adapters"] == {"a": 0.8} and "adapters **a** 0.8" in info  # which adapters, at which weight
    expected = h.studio.run("a red circle <lora:a:0.8>", seed=5, steps=4, width=64, height=64, num_images=2,
                            progress=False).images
    for (path, _), image in zip(gallery, expected):
        with Image.open(path) as im:
            assert {"parameters", "lora_studio"} <= set(im.info)
            assert "<lora:a:0.8>" in im.info["parameters"]
        assert np.array_equal(_pixels(path), np.asarray(image.convert("RGB")))  # the handler is a Studio call
    assert read_recipe(gallery[0][0]).adapters[0].name == "a"
    # CLIPScore on the adapters' trigger phrase and per-concept CLIP-T, under each image
    from studio.metrics import Scorer

    scorer = Scorer.load("toy")
    for (path, _), seed in zip(gallery, (5, 6)):
        with Image.open(path) as im:
            value = scorer.clipscore(im.convert("RGB"), "sksa").value
        assert f"seed {seed}: CLIPScore {value:.1f} on “sksa”" in info
    assert "CLIP-T a " in info


def test_generate_errors_are_one_line_messages_beside_the_outputs(h):
    """An error leaves gallery, preview and report alone (gr.skip) and is an HTML-escaped status line."""
    *_, last = h.generate("a circle <lora:nope:1>", **GEN, seed=1, steps=2)
    status = last[6]
    assert "no adapter named 'nope'" in status and "\n" not in status and "Error" in status
    assert all(isinstance(o, type(gr.skip())) for o in last[:6])
    *_, last = h.generate("a circle <lora:nope:1>", **{**GEN, "params_json": "{bad"}, seed=1, steps=2)
    assert "JSON" in last[6]
    *_, last = h.generate("  ", **GEN, seed=1, steps=2)
    assert "empty" in last[6]
    *_, last = h.generate("a circle <lora:a:x>", **GEN, seed=1, steps=2)
    assert "&lt;lora:a:x&gt;" in last[6]  # the tag is escaped, not swallowed as HTML


def test_prompt_without_trigger_is_warned(h):
    *_, last = h.generate("a circle <lora:a:1>", **GEN, seed=1, steps=2)
    assert "lacks 'sksa'" in last[6]
    *_, last = h.generate("a sksa circle <lora:a:1>", **GEN, seed=1, steps=2)
    assert "lacks" not in last[6] and "trigger of" not in last[6]
    *_, last = h.generate("a sksa circle", **GEN, seed=1, steps=2)  # the trigger, but not its adapter
    assert "'sksa' is the trigger of a" in last[6] and "add &lt;lora:a:" in last[6], last[6]  # escaped, still visible


def test_stop_keeps_the_finished_images(h):
    h.preview_every = 1
    h.batch_size = 1  # one image at a time, so Stop lands between finished images
    gen = h.generate("a red circle <lora:a:1>", **GEN, seed=1, steps=6, batch_count=3)
    for out in gen:
        if isinstance(out[0], list) and out[0]:  # the first image is done
            break
    assert h.stop(None) == "Stopping…"
    *_, last = gen
    gallery, info, status = last[0], last[2], last[6]
    assert len(gallery) in (1, 2) and "Stopped" in status and "kept" in status
    # the info line describes the kept images, not the previous run; report and maps are cleared
    assert f"{len(gallery)} of 3 image(s) kept (stopped)" in info and "seed 1" in info, info
    assert last[3] == {} and last[4] == [] and "Stopping" not in status
    assert h.history.items()[0][0] == gallery[0][0]  # the run is in the history


def test_stop_interrupts_within_two_steps(h):
    h.preview_every = 1
    calls = _UnetCalls(h.studio.pipe)
    try:
        gen = h.generate("a red circle <lora:a:1>", **GEN, seed=1, steps=120, batch_count=1)
        first = next(gen)
        assert first[6].startswith("step ") and "ETA" in first[6]
        at_stop = len(calls)
        assert h.stop(None) == "Stopping…"
        rest = list(gen)
        assert len(calls) - at_stop <= 2, (at_stop, len(calls))
        assert len(calls) < 120
    finally:
        calls.close()
    status = rest[-1][6]
    assert "Stopped" in status and "no image was finished" in status
    assert h.stop(None) == "Nothing is running."
    assert h.studio._lock.acquire(timeout=5)  # the worker let go of the UNet
    h.studio._lock.release()


def test_upload_validates_and_sanitises(h, tmp_path):
    for bad, why in (("x.ckpt", "pickle"), ("x.txt", "not a .safetensors")):
        (tmp_path / bad).write_bytes(b"\x80\x04junk")
        msg = h.upload(str(tmp_path / bad))
        assert msg.startswith("Error:") and why in msg
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    msg = h.upload(str(corrupt))
    assert msg.startswith("Error:") and "Traceback" not in msg and "\n" not in msg
    assert "corrupt" not in h.adapter_names()

    good = tmp_path / "src.safetensors"
    write_adapter(random_lora(h.studio, "c", seed=9), good)
    msg = h.upload(str(good), name="../../evil name")
    assert msg.startswith("Loaded") and "evil_name" in h.adapter_names()
    assert (h.store.folder / "evil_name.safetensors").is_file() and (h.store.folder / "evil_name.json").is_file()
    assert not any(p.name.startswith(".") and p.is_file() for p in h.store.folder.iterdir())  # no temp files left
    assert h.upload(str(good), name="evil name").startswith("Error: an adapter named 'evil_name'")
    msg = h.upload(str(good), name="twin")
    assert msg.startswith("Loaded") and "Duplicate" in msg and "evil_name" in msg
    assert h.upload(None).startswith("Error:")


def test_edit_delete_and_cards(h):
    assert h.edit("a", "sks", "shape", "object", "0.6", "a red sks shape").startswith("Saved")
    assert h.adapter_fields("a")[:5] == ("sks", "a red sks shape", "shape", "object", 0.6)
    card = next(c for c in h.adapter_cards() if c["name"] == "a")
    assert (card["kind"], card["phrase"], card["weight"], card["type"], card["shape"]) == \
        ("object", "a red sks shape", 0.6, "lora", "rank 4")
    assert card_label(card) == "a\nobject · lora · w 0.6\n“a red sks shape”"
    assert [c["name"] for c in h.adapter_cards("red sks")] == ["a"]  # search: name, phrase, concept
    assert [c["name"] for c in h.adapter_cards("", "object")] == ["a"]  # kind filter
    assert h.library_summary(1) == "Showing 1 of 2 adapter(s)" and h.library_summary(2) == "2 adapter(s) in the library"
    assert h.adapter_details("a").startswith("### a\nlora · rank 4")
    assert h.insert_tag("", "a") == "a red sks shape <lora:a:0.6>"
    assert h.edit("a", "", "", "weird", 1).startswith("Error:")
    assert h.edit("a", "", "", "", "heavy").startswith("Error:")
    assert h.delete("a").startswith("Deleted") and h.adapter_names() == ["b"]
    assert h.delete("a").startswith("Error:")
    assert h.delete(None) == "Nothing deleted."  # the browser's confirm() was cancelled


def test_send_to_xy_sweeps_seeds_unless_the_axis_has_values():
    assert seed_axis_from({"seed": 7}, "Steps", "") == ("Seed", "7, 8, 9, 10")
    assert seed_axis_from({"seed": 7}, "Steps", "2, 4") == ("Steps", "2, 4")  # the artist's own axis stays
    assert seed_axis_from({}, "Seed", "") == ("Seed", "")


def test_merge_creates_a_library_adapter(h):
    assert h.merge_available()
    assert h.merge(["a"], "cat", None, "").startswith("Error: pick at least two")
    msg = h.merge(["a", "b"], "cat", None, "ab cat")
    assert msg.startswith("Merged"), msg
    merged = h.studio.adapters.get("ab_cat")
    assert merged.ranks() == [8]  # cat: ranks add up


def test_png_info_reads_recipe_and_infotext(h, tmp_path):
    gallery = list(h.generate("a circle <lora:b:0.5>", **{**GEN, "negative_prompt": "blur"}, seed=11, steps=3))[-1][0]
    path = gallery[0][0]
    shown, text, recipe, status, fields = h.read_png(path)
    assert shown == path and "Seed: 11" in text and recipe["seed"] == 11 and "recipe" in status
    compose = h.send_to_compose(fields)
    assert compose[:3] == ("a circle <lora:b:0.5>", "blur", "merge")
    assert compose[4:] == ("ddim", 11, 3, 7.5, 64, 64, 1)  # batch count 1: this image again

    # an A1111-only PNG: parameters text, no studio chunk
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat <lora:zzz:1>\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, CFG scale: 6, Seed: 42, Size: 64x128")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    _, _, recipe, status, fields = h.read_png(str(a1111))
    assert recipe == {} and "A1111" in status and "zzz" in status  # missing adapter is named
    assert fields == dict(prompt="a cat <lora:zzz:1>", negative_prompt="ugly", sampler="euler", seed=42, steps=20,
                          guidance=6.0, width=64, height=128)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "No generation parameters" in h.read_png(str(plain))[3]
    (tmp_path / "x.png").write_bytes(b"not an image")
    assert h.read_png(str(tmp_path / "x.png"))[3].startswith("Error:")


def test_load_demo_adapters(sd1_pipe, tmp_path):
    studio = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    write_adapter(random_lora(studio, "demo", seed=3), tmp_path / "demo.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    messages = load_demo_adapters(studio, tmp_path)
    assert any(m.startswith("skipped broken.safetensors:") for m in messages)
    assert "demo" in studio.adapters and len(studio.adapters) == 1
    assert load_demo_adapters(studio, tmp_path / "missing") == []


def test_report_masks_and_heatmaps_become_pngs(h, tmp_path):
    import torch

    report = {"unet_calls": 3, "masks": {"base": torch.zeros(8, 8), "a": torch.eye(8)},
              "heatmaps": {"a: a": torch.rand(8, 8)}, "history": {"masks": [torch.ones(8, 8)] * 5}}
    extras = h._report_images(report, tmp_path, (64, 64))
    assert [c for _, c in extras] == ["masks base", "masks a", "heatmaps a: a"]  # history is not shown
    with Image.open(extras[1][0]) as im:
        arr = np.asarray(im)
    assert im.size == (64, 64) and arr[0, 0] == 255 and arr[0, 8] == 0  # nearest-upsampled identity


def test_xy_grid_sweeps_axes_with_labelled_grid(h):
    outs = list(h.xy_grid("a red circle <lora:a:0.5>", **GEN, seed=4, steps=2,
                          x_type="Prompt S/R", x_values="<lora:a:0.5>, <lora:a:1>",
                          y_type="Seed", y_values="4, 9"))
    grid, cells, info = outs[-1]
    # the two seeds of a prompt are one batched run: cells 1-2, then 3-4
    assert "cell 1/4" in outs[0][2] and any("cell 3/4" in str(o[2]) and "ETA" in str(o[2]) for o in outs)
    assert [c for _, c in cells] == ["<lora:a:0.5> · seed 4", "<lora:a:1> · seed 4",
                                     "<lora:a:0.5> · seed 9", "<lora:a:1> · seed 9"]
    assert "4 cells" in info
    assert read_recipe(cells[1][0]).prompt == "a red circle <lora:a:1>" and read_recipe(cells[2][0]).seed == 9
    with Image.open(grid) as im:
        assert im.width > 2 * 64 and im.height > 2 * 64  # two columns, two rows, plus labels
    direct = h.studio.run("a red circle <lora:a:1>", seed=9, steps=2, width=64, height=64, progress=False).images[0]
    # batched with seed 4, yet the one-image run's twin within float rounding
    diff = np.abs(_pixels(cells[3][0]).astype(int) - np.asarray(direct.convert("RGB")).astype(int))
    assert diff.max() <= 1
    *_, (_, _, msg) = h.xy_grid("a circle", **GEN, seed=1, steps=2, x_type="Prompt S/R", x_values="<lora:z:1>, y")
    assert "not in the prompt" in msg and "&lt;lora:z:1&gt;" in msg  # shown, not swallowed as HTML
    *_, (_, _, msg) = h.xy_grid("a circle", **GEN, seed=1, steps=2, x_type="Method", x_values="merge, nope")
    assert "unknown method" in msg


def test_xy_method_axis_runs_each_other_method_at_its_own_cfg_unless_cfg_is_swept(h):
    """The form's method keeps the form's CFG; another method gets its default CFG on this model
    (labelled), as it gets its default parameters; a CFG axis on the other side wins."""
    gen = {**GEN, "guidance": 2.0}
    *_, (_, cells, _) = h.xy_grid("a red circle <lora:a:1> <lora:b:1>", **gen, seed=4, steps=2,
                                  x_type="Method", x_values="merge, composite")
    want = h.studio.default_guidance_for("composite")
    assert [c for _, c in cells] == ["merge", f"composite (CFG {want:g})"]
    assert [read_recipe(p).guidance for p, _ in cells] == [2.0, want]
    *_, (_, cells, _) = h.xy_grid("a red circle <lora:a:1> <lora:b:1>", **gen, seed=4, steps=2,
                                  x_type="Method", x_values="merge, composite", y_type="CFG scale", y_values="4")
    assert [read_recipe(p).guidance for p, _ in cells] == [4.0, 4.0]


def _instance_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def test_train_adds_the_adapter_to_the_library(h, tmp_path):
    files = _instance_images(tmp_path / "imgs")
    assert "upload instance images" in list(h.train(None, "", "sks", "shape"))[-1][2]
    outs = list(h.train(files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "my dog"))
    loss, samples, status = outs[-1]
    assert list(loss["step"]) == [1, 2] and "my_dog" in status
    trained = h.studio.adapters.get("my_dog")
    assert trained.trigger == "sks" and trained.ranks() == [2] and Path(trained.path).is_file()
    assert Path(trained.path).parent == h.store.folder and h.store.meta("my_dog").source == "trained"
    assert samples and Path(samples[0][0]).is_file()


def test_train_on_cross_attention_learns_the_trigger_embedding(h, tmp_path):
    files = _instance_images(tmp_path / "imgs")
    bad = list(h.train(files, "", "qwxzvbn", "shape", "object", "lora", 2, "", 2, False, "x", "cross"))[-1][2]
    assert "one token" in bad and "x" not in h.studio.adapters
    list(h.train(files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "ca", "cross"))
    trained = h.studio.adapters.get("ca")
    unet = [p for p in trained.layers if p.startswith("unet.")]
    assert unet and all(".attn2." in p for p in unet) and set(trained.embeddings) == {"sks"}


def test_train_on_attention_and_convolutions_reaches_the_resnets(h, tmp_path):
    """The Train tab's LoCon choice: LoRA on the attention projections and the ResNet convolutions,
    with the trigger's embedding learnt (the demo plus's recipe)."""
    files = _instance_images(tmp_path / "imgs")
    list(h.train(files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "lc", "attention+conv"))
    trained = h.studio.adapters.get("lc")
    unet = [p for p in trained.layers if p.startswith("unet.")]
    assert any(".conv1" in p or ".conv2" in p for p in unet) and any(".attn1." in p for p in unet)
    assert set(trained.embeddings) == {"sks"}


def test_train_tab_stand_in_prior_turns_prior_preservation_on(h, tmp_path):
    """The Train tab's "Stand-in prior" box asks for the demo adapters' count of stand-in prompts (the
    trainer's use of them: tests/test_training.py::test_stand_in_prior_draws_…)."""
    import training.dreambooth as dreambooth

    from studio.app.train import STAND_IN_PROMPTS

    files = _instance_images(tmp_path / "imgs")
    args = (dreambooth, files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "si", "attention")
    plain, _ = h._train_config(*args)
    ticked, _ = h._train_config(*args, True)
    assert plain.stand_in_prior == 0 and not plain.prior_preservation
    assert ticked.stand_in_prior == STAND_IN_PROMPTS == 36 and ticked.prior_preservation
    assert h.stand_in_prior_box(True)["value"] is True  # the UI ticks "Prior preservation" with it
    assert "value" not in h.stand_in_prior_box(False)  # unticking it leaves prior preservation alone


def test_train_tab_attention_loss_trains_on_uploaded_masks(h, tmp_path):
    """The Train tab's attention loss: uploaded masks land in the run's images/masks/ as PNGs under their
    image's name, and the run reports the attention term (the loss itself: tests/test_training.py)."""
    import training.dreambooth as dreambooth

    files = _instance_images(tmp_path / "imgs")
    (tmp_path / "masks").mkdir()
    masks = []
    for i in range(2):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        mask.save(tmp_path / "masks" / f"img{i}.jpg")  # any image format; stored as PNG
        masks.append(str(tmp_path / "masks" / f"img{i}.jpg"))
    args = (dreambooth, files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "al", "attention", False)
    cfg, _ = h._train_config(*args, "0.1", masks)
    stored = Path(cfg.images) / "masks" / "img0.png"
    assert cfg.attention_loss == 0.1 and stored.is_file() and Image.open(stored).getpixel((8, 8)) == 255
    assert h._train_config(*args)[0].attention_loss == 0.0  # off by default
    outs = list(h.train(files, "", "sks", "shape", "object", "lora", 2, "", 2, False, "al", "attention", False,
                        0.1, masks))
    assert "Trained" in outs[-1][2] and "al" in h.studio.adapters


@pytest.mark.parametrize("weight,masks,folder,expected", [
    (0.1, None, False, "needs a concept mask per instance image"),
    (-1, None, False, "must be a number ≥ 0"),
    ("abc", None, False, "must be a number ≥ 0"),
    (0.1, ["other.png"], False, "'other.png' matches no instance image (images: img0, img1)"),
    (0.1, ["img0.txt"], False, "is not an image"),
    (0.1, ["img1.png", "img0.bmp"], False, "'img0.bmp' is unreadable"),
    (float("nan"), None, False, "must be a number ≥ 0"),
    (0.1, ["img0.png"], True, "masks for a server folder are read from"),
])
def test_train_tab_attention_loss_refusals_name_the_fix(h, tmp_path, weight, masks, folder, expected):
    import training.dreambooth as dreambooth

    files = _instance_images(tmp_path / "imgs")
    (tmp_path / "m").mkdir()
    for m in masks or ():
        (Image.new("L", (64, 64), 255).save(tmp_path / "m" / m) if m.endswith(".png")
         else (tmp_path / "m" / m).write_text("x"))  # a .txt, or a .bmp that is not one
    paths = [str(tmp_path / "m" / m) for m in masks] if masks else None
    with pytest.raises(gr.Error, match=re.escape(expected)):
        h._train_config(dreambooth, None if folder else files, str(tmp_path / "imgs") if folder else "", "sks",
                        "shape", "object", "lora", 2, "", 2, False, "x", "attention", False, weight, paths)
    assert not (h.out_dir / "train").exists()  # nothing half-copied


def test_train_stop_ends_the_run_and_adds_nothing(h, tmp_path):
    gen = h.train(_instance_images(tmp_path / "imgs"), "", "sks", "shape", "object", "lora", 2, "", 500, False, "")
    next(gen)
    assert h.stop_train(None) == "Stopping…"
    *_, (loss, samples, status) = gen
    assert "Stopped" in status and len(loss) < 500 and "sks" not in h.studio.adapters
    assert h.studio._lock.acquire(timeout=5)  # the trainer let go of the UNet (its layers are stripped)
    h.studio._lock.release()


def test_evaluate_runs_a_suite_into_a_run_folder(h):
    smoke = REPO / "workflows" / "smoke.yaml"
    assert str(smoke) in h.suites()
    log, table, grids, archive = list(h.evaluate(str(smoke), None, 1, False))[-1]
    assert "results.jsonl" in log and list(table["method"]) == ["merge"]
    assert Path(archive).is_file() and archive.endswith(".zip")
    with pytest.raises(gr.Error, match="not a suite"):
        list(h.evaluate(None, str(smoke.with_suffix(".txt")), None, False))


# ---- the app, launched in-process ----------------------------------------------------------
class _TimedHandlers(AppHandlers):
    """Records when each generate starts and ends, to check the shared GPU queue."""

    intervals: list

    @functools.wraps(AppHandlers.generate)  # same signature, so Gradio still passes gr.Request
    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            self.intervals.append((start, time.perf_counter()))


@pytest.fixture(scope="module")
def served(sd1_pipe, tmp_path_factory):
    app = _load_app_module()
    studio = _studio(sd1_pipe)
    handlers = _TimedHandlers(studio, tmp_path_factory.mktemp("app-out"))
    handlers.intervals = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Gradio 5 arguments left: every deprecation would raise here
        demo = app.build_app(studio, handlers, ["loaded nothing (test)"])
        demo.queue(max_size=16, default_concurrency_limit=1)
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **app.launch_options(handlers, "2mb"))
    client = gradio_client.Client(demo.local_url, verbose=False)
    yield demo, handlers, client
    demo.close()


def _gen_args(prompt, seed=3, steps=3):
    return (prompt, "", "merge", "{}", "ddim", seed, steps, 7.5, 64, 64, 1)


def test_app_serves_on_localhost_with_named_endpoints(served):
    demo, _, client = served
    assert demo.local_url.startswith("http://127.0.0.1:")
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/stop", "/upload_adapter", "/png_info", "/xy_grid"} <= set(endpoints)


def test_client_generate_returns_pngs_with_metadata(served):
    _, _, client = served
    gallery, _, info, report, _, _ = client.predict(*_gen_args("a red circle <lora:a:0.8>"), api_name="/generate")
    path = gallery[0]["image"]
    assert path.endswith(".png") and "3 UNet calls" in info and report["unet_calls"] == 3
    with Image.open(path) as im:  # downloaded through the client, bytes intact
        assert im.format == "PNG" and {"parameters", "lora_studio"} <= set(im.info)
    assert read_recipe(path).adapters[0].name == "a"


def test_parallel_requests_with_different_adapters_match_serial(served):
    _, handlers, client = served
    prompts = ["a red circle", "a red circle <lora:a:0.8>", "a red circle <lora:b:1>",
               "a red circle <lora:a:0.5> <lora:b:0.7>"]
    serial = [_pixels(client.predict(*_gen_args(p, seed=7), api_name="/generate")[0][0]["image"]) for p in prompts]
    handlers.intervals.clear()
    jobs = [client.submit(*_gen_args(p, seed=7), api_name="/generate") for p in prompts]
    parallel = [_pixels(job.result(timeout=120)[0][0]["image"]) for job in jobs]
    for s, p in zip(serial, parallel):
        assert np.array_equal(s, p)
    assert len({s.tobytes() for s in serial}) == 4  # the adapter sets really differ
    spans = sorted(handlers.intervals)
    assert len(spans) == 4
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))  # concurrency_id="gpu": never overlapping


def _submit_and_wait_for_steps(client, calls, prompt: str, steps: int = 3):
    """Start a long generation and return its job once the UNet has run ``steps`` times."""
    job = client.submit(*_gen_args(prompt, steps=150), api_name="/generate")
    deadline = time.time() + 60
    while len(calls) < steps and time.time() < deadline:
        time.sleep(0.005)
    return job


def test_client_cancel_stops_the_run_within_two_steps(served):
    _, handlers, client = served
    calls = _UnetCalls(handlers.studio.pipe)
    try:
        job = _submit_and_wait_for_steps(client, calls, "a red circle <lora:a:1>")
        job.cancel()
        at_cancel = len(calls)
        time.sleep(1.0)
        assert len(calls) - at_cancel <= 2, (at_cancel, len(calls))
        assert len(calls) < 150
    finally:
        calls.close()
    assert handlers.studio._lock.acquire(timeout=5)
    handlers.studio._lock.release()


def test_stop_endpoint_interrupts_this_sessions_run(served):
    _, handlers, client = served
    calls = _UnetCalls(handlers.studio.pipe)
    try:
        job = _submit_and_wait_for_steps(client, calls, "a red circle")
        assert client.predict(api_name="/stop") == "Stopping…"  # same client, same session
        at_stop = len(calls)
        *_, status = job.result(timeout=60)
        assert "Stopped" in status
        assert len(calls) - at_stop <= 2, (at_stop, len(calls))
    finally:
        calls.close()
    other = gradio_client.Client(served[0].local_url, verbose=False)  # another session has nothing running
    assert other.predict(api_name="/stop") == "Nothing is running."


def test_bad_upload_through_client_is_a_message(served, tmp_path):
    _, _, client = served
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    msg = client.predict(gradio_client.handle_file(str(corrupt)), "", api_name="/upload_adapter")
    assert msg.startswith("Error:") and "Traceback" not in msg
    pickle = tmp_path / "bad.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    try:
        msg = client.predict(gradio_client.handle_file(str(pickle)), "", api_name="/upload_adapter")
    except Exception as e:  # Gradio's own file-type check may refuse it first
        msg = str(e)
    assert "Traceback" not in msg and ("pickle" in msg or "Invalid file type" in msg or "not allowed" in msg), msg


def test_screenshots_of_every_tab(served):
    """Headless Chromium screenshots of each tab, kept in test-output/screenshots/."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'); no headless screenshots taken")
    demo, _, _ = served
    out = Path(__file__).resolve().parent.parent / "test-output" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for tab in ("Compose", "Library", "PNG info", "X/Y grid", "Train", "Evaluate"):
        shot = out / f"{tab.lower().replace(' ', '-').replace('/', '')}.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--screenshot={shot}",
                        "--window-size=1400,1400", "--virtual-time-budget=10000",
                        f"{demo.local_url}?tab={quote(tab)}"],
                       check=True, timeout=120, capture_output=True)
        with Image.open(shot) as im:
            assert im.size == (1400, 1400) and np.asarray(im.convert("L")).std() > 1  # not a blank page
            shots.append(np.asarray(im.convert("L"), dtype=np.int16))
    assert all(np.abs(shots[0] - s).mean() > 0.5 for s in shots[1:]), "every tab should look different"


def test_cmlora_timeline_is_shown(h):
    *_, last = h.generate("a red circle <lora:a:1> <lora:b:1>", **(GEN | {"method": "cmlora"}), seed=1, steps=10,
                          batch_count=1)
    info, report = last[2], last[3]
    assert "**CMLoRA timeline**" in info
    for step, dominant, _ in report["events"]:
        assert f"step {step}: **{dominant}** dominant" in info


def test_loss_table_is_numeric_even_before_the_first_step():
    from studio.app.train import _loss_table

    # an empty first table of object columns made the plot read every later loss as a category
    assert [str(t) for t in _loss_table([]).dtypes] == ["int64", "float64"]
    assert _loss_table([{"step": 1, "loss": 0.5}, {"step": 2}]).to_dict("records") == [{"step": 1, "loss": 0.5}]
