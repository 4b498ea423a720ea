"""The toy CLIP: a small open_clip model trained on the toy world (reserved concepts included),
so CLIPScore works offline."""

from __future__ import annotations

import json
from pathlib import Path

_LOADED: dict = {}


def register_toy_clip(path: str | Path | None = None) -> str:
    """Register the toy CLIP's model config with open_clip; return its model name."""
    import open_clip

    from .paths import require_toy_clip

    folder = require_toy_clip(path)
    meta = json.loads((folder / "open_clip_config.json").read_text())
    name = meta.get("model_name", "ToyCLIP-ViT-8")
    if name not in open_clip.list_models():
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def load_toy_clip(path: str | Path | None = None, device: str = "cpu"):
    """-> (model, preprocess, tokenizer) in open_clip's conventions, weights from assets/models/toy-clip."""
    import open_clip

    from .paths import require_toy_clip

    folder = require_toy_clip(path)
    key = (str(folder.resolve()), str(device))
    if key in _LOADED:
        return _LOADED[key]
    name = register_toy_clip(folder)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(folder / "open_clip_model.safetensors"), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    _LOADED[key] = (model, preprocess, tokenizer)
    return _LOADED[key]
