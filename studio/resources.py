"""Where the bundled data lives: the toy model, demo adapters, workflows and the Gradio app file.

In a source checkout they sit beside the ``studio`` package (``assets/``, ``workflows/``,
``app.py``). An installed wheel carries the same tree as package data in ``studio/_data/``
(pyproject maps that package onto the repository root). ``STUDIO_DATA=/path`` overrides both.
Paths are looked up on each call, so a rebuilt ``assets/models`` is picked up as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_FIX = ("build it with `python -m training.toyworld --out assets/models` in a source checkout, "
                 "reinstall the package (`pip install .` ships it), or pass --model with a diffusers folder")


def data_root() -> Path:
    """The folder holding ``assets/``, ``workflows/`` and ``app.py`` (checkout first, then the wheel's copy)."""
    override = os.environ.get("STUDIO_DATA")
    if override:
        return Path(override)
    for root in (PACKAGE_DIR.parent, PACKAGE_DIR / "_data"):
        if (root / "assets").is_dir() or (root / "app.py").is_file():
            return root
    return PACKAGE_DIR.parent


def assets_dir() -> Path:
    return data_root() / "assets"


def toy_model_dir() -> Path:
    return assets_dir() / "models" / "toy-sd"


def demo_adapters_dir() -> Path:
    return assets_dir() / "adapters"


def workflows_dir() -> Path:
    return data_root() / "workflows"


def app_path() -> Path:
    return data_root() / "app.py"
