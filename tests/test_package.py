"""The package installs like one: a wheel holds the toy model, demo adapters, workflows and the app,
and a missing toy model is a clear error, never a random model in its place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_missing_toy_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_DATA", str(tmp_path))
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "toy model is missing" in err and "training.toyworld" in err and "--model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "assets" / "models" / "toy-sd" / "model_index.json").is_file(),
                    reason="the toy model is not built (python -m training.toyworld)")
def test_wheel_installs_a_working_generate_and_app(tmp_path):
    wheels, target, elsewhere, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd", tmp_path / "src"
    elsewhere.mkdir()
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "outputs", "runs",
                                                             "__pycache__", ".pytest_cache", ".toyworld-work"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, timeout=600, cwd=tmp_path)
    wheel = next(wheels.glob("*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any("assets/models/toy-sd/unet/" in n for n in names)
    assert not any("assets/models/stages/" in n for n in names)  # a world being rebuilt is not shipped
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env.pop("STUDIO_DATA", None)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=600)

    where = run("-c", "import studio, studio.resources as r; print(studio.__file__); print(r.app_path())")
    studio_file, app = where.stdout.split()
    assert studio_file.startswith(str(target)) and Path(app).is_file() and app.startswith(str(target))
    done = run("-m", "studio", "generate", "--prompt", "a red circle", "--steps", "2", "--seed", "1", "--out", "a.png")
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert "Model: toy-sd" in Image.open(elsewhere / "a.png").text["parameters"]  # the toy model, not random weights
    assert run(app, "--help").returncode == 0  # what `studio serve` runs
