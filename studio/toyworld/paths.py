"""Where the bundled toy-world assets live, and a clear error when they are missing."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "assets" / "models"
TOY_MODEL_DIR = MODELS_DIR / "toy-sd"
TOY_CLIP_DIR = MODELS_DIR / "toy-clip"
ORACLE_DIR = MODELS_DIR / "oracle"
ORACLE_B_DIR = MODELS_DIR / "oracle-b"  # the second, independently trained oracle
TRAIN_COMMAND = "python -m training.toyworld --out assets/models"

_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

try:  # the studio's user-facing error type, when the package provides it
    from studio.errors import ModelLoadError as _Base
except Exception:  # pragma: no cover - studio/errors.py absent
    _Base = ValueError


class ToyModelMissingError(_Base, FileNotFoundError):
    """The bundled toy-world assets are missing or corrupt; the message names the fix."""


def _fail(what: str, path: Path) -> None:
    raise ToyModelMissingError(
        f"toy-world {what} at {path} is missing or corrupt; rebuild it with "
        f"`{TRAIN_COMMAND}` (about 25 min on 2 CPU cores)"
    )


WORLD_MARKER = "toyworld.json"  # in a toy pipeline folder: which world it is (written by training.toyworld)


def is_toy_world(folder: str | Path) -> bool:
    """Whether ``folder`` is a toy-world pipeline (a build of training.toyworld), so that loading it by
    path gets the toy model's defaults and adapter checks, not a real SD1 model's."""
    return (Path(folder) / WORLD_MARKER).is_file()


def require_toy_model(path: str | Path | None = None) -> Path:
    """Return the toy pipeline folder, or raise ToyModelMissingError naming the training command."""
    p = Path(path) if path is not None else TOY_MODEL_DIR
    index = p / "model_index.json"
    if not index.is_file():
        _fail("model", p)
    try:
        json.loads(index.read_text())
    except Exception:
        _fail("model (unreadable model_index.json)", p)
    for part in _PIPELINE_PARTS:
        sub = p / part
        if not sub.is_dir() or not any(sub.iterdir()):
            _fail(f"model part '{part}'", p)
    for part in ("unet", "vae", "text_encoder"):
        if not list((p / part).glob("*.safetensors")):
            _fail(f"model weights of '{part}'", p)
    return p


def require_toy_clip(path: str | Path | None = None) -> Path:
    p = Path(path) if path is not None else TOY_CLIP_DIR
    if not (p / "open_clip_config.json").is_file() or not (p / "open_clip_model.safetensors").is_file():
        _fail("CLIP", p)
    return p


def require_oracle(path: str | Path | None = None) -> Path:
    p = Path(path) if path is not None else ORACLE_DIR
    if not (p / "oracle.safetensors").is_file() or not (p / "config.json").is_file():
        _fail("oracle", p)
    return p
