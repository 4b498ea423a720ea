"""The studio CLI: generate reproduces from metadata; user errors exit 2 without writing."""

from __future__ import annotations

import pytest
from PIL import Image

from studio.cli import main
from studio.metadata import read_recipe


def test_generate_and_reproduce_exactly(tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--seed", "3", "--out", str(out)]) == 0
    again = tmp_path / "b.png"
    assert main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps"),
        (["--size", "63x64"], "multiple of 8"),
        (["--guidance", "-2"], "guidance"),
        (["--lora", "/nonexistent/x.safetensors"], "x.safetensors"),
        (["--lora", "no-such-demo"], "crescent-lora"),  # a bare name lists the demo adapters
        (["--method", "nope"], "choose one of"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "o.png"
    code = main(["generate", "--prompt", "a red circle", "--steps", "2", "--out", str(out)] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_info_describes_an_adapter(tmp_path, capsys, sd1):
    from conftest import random_lora
    from studio.adapters.formats import write_adapter

    path = write_adapter(random_lora(sd1, "ink", rank=2), tmp_path / "ink.safetensors", format="kohya")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for field in ("format", "kohya", "ranks", "[2]", "sd1", "ink"):
        assert field in out


def test_generate_with_a_model_folder_and_a_lora_file(tmp_path, capsys, sd1, sd1_pipe):
    from conftest import random_lora
    from studio.adapters.formats import write_adapter
    from studio.metadata import read_recipe

    sd1_pipe.save_pretrained(tmp_path / "model")
    path = write_adapter(random_lora(sd1, "ink", rank=2), tmp_path / "ink.safetensors")
    out = tmp_path / "o.png"
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle", "--steps", "2", "--seed", "1"]
    assert main(args + ["--lora", f"{path}:0.5", "--out", str(out), "--report"]) == 0
    recipe = read_recipe(out)
    assert [(a.name, a.weight) for a in recipe.adapters] == [("ink", 0.5)] and recipe.adapters[0].sha256
    assert '"unet_calls": 2' in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()

    pickle = tmp_path / "ink.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    assert main(args + ["--lora", str(pickle), "--out", str(tmp_path / "p.png")]) == 2
    assert "allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


# ---- Python CLI conventions: --version, python -m studio, help, one-line user errors ---------


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    import studio

    assert main(["--version"]) == 0
    assert studio.__version__ in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "studio", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and studio.__version__ in done.stdout


def test_every_option_has_help_with_defaults_and_choices(capsys):
    import argparse

    from studio.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions if not a.help]
    assert not missing
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: -1)" in text and "(default: merge;" in text and "{merge,switch,composite,cmlora,clora,lego}" in text
    assert "DPM++ 2M Karras" in text and "Euler a" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "99999999"], "1 to 65535"),
        (["generate", "--prompt", "x", "--sampler", "DPM++ 9M", "--out", "o.png"], "DPM++ 2M Karras"),
        (["generate", "--prompt", "x", "--num-images", "0", "--out", "o.png"], "≥ 1"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unwritable_out_exits_2_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(blocker / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and len(err.strip().splitlines()) == 1


def test_a1111_sampler_and_image_counter(tmp_path, capsys):
    out = tmp_path / "many"
    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "--seed", "1", "--num-images", "2",
                 "--sampler", "DPM++ 2M Karras", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["image-00.png", "image-01.png"]
    assert "images" in captured.err and "2/2" in captured.err  # the tqdm counter (with its ETA)
    assert "Sampler: DPM++ 2M Karras" in Image.open(out / "image-00.png").text["parameters"]
    first = (out / "image-00.png").read_bytes()
    assert main(["generate", "--prompt", "a blue square", "--steps", "1", "--seed", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image-00.png", "image-01.png", "image-02.png"]  # numbered on
    assert (out / "image-00.png").read_bytes() == first  # the first run's images are kept


def test_a_demo_trigger_without_its_adapter_is_warned(tmp_path, capsys):
    """"ohwx" without --lora plus-lora draws an unknown word; the CLI says so and names the fix."""
    args = ["generate", "--prompt", "a blue ohwx shape", "--steps", "1", "--out", str(tmp_path / "o.png")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "'ohwx' is the trigger of plus-lora" in err and "add --lora plus-lora" in err
    assert main([*args[:-2], "--lora", "plus-lora", "--out", str(tmp_path / "p.png")]) == 0
    assert "trigger of" not in capsys.readouterr().err  # with it: no warning


def test_a_demo_adapter_by_its_bare_name(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", "a red sks shape", "--steps", "2", "--lora", "crescent-lora:0.8",
                 "--out", str(out)]) == 0
    from studio.metadata import read_recipe
    from studio.resources import demo_adapters_dir

    (use,) = read_recipe(out).adapters
    assert (use.name, use.weight) == ("crescent-lora", 0.8)
    assert use.path == str(demo_adapters_dir() / "crescent-lora.safetensors")


def test_generate_without_method_names_the_measured_pick_for_two_demo_objects(tmp_path, capsys):
    """Two demo objects with no --method run merge, with a note naming step-5 CLoRA; an explicit
    --method is taken as chosen (no note), and one adapter gets none."""
    base = ["generate", "--prompt", "a red sks shape and a blue ohwx shape", "--steps", "2", "--seed", "1",
            "--lora", "crescent-lora", "--lora", "plus-lora"]
    assert main(base + ["--out", str(tmp_path / "m.png")]) == 0
    err = capsys.readouterr().err
    assert "note: running merge (the default); for object + object the toy world's measured pick is " \
           "--method clora --method-param step_size=5.0" in err, err
    assert read_recipe(tmp_path / "m.png").method == "merge"
    assert main(base + ["--method", "merge", "--out", str(tmp_path / "m2.png")]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["generate", "--prompt", "a red sks shape", "--steps", "2", "--lora", "crescent-lora",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert "note:" not in capsys.readouterr().err
