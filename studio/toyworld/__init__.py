"""The toy world: a procedural 64x64 world of coloured shapes, its captions, the oracle that
judges images of it, and the bundled base model trained on it (assets/models).

Light names (vocabulary, renderer, paths) import eagerly; the oracle and the toy CLIP (torch,
open_clip) load on first use.
"""

from .concepts import (
    ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, BACKGROUNDS, COLORS, NOVEL_BACKGROUNDS,
    NOVEL_CONCEPTS, NOVEL_PATTERNS, NOVEL_SHAPES, PATTERNS, POSITIONS, RESERVED_WORDS, SHAPES,
    SIZES, concept_kind,
)
from .paths import (
    ORACLE_DIR, TOY_CLIP_DIR, TOY_MODEL_DIR, TRAIN_COMMAND, ToyModelMissingError, require_toy_model,
)
from .render import (
    HELDOUT_PAIRS, Obj, Scene, caption, render, sample_any_scene, sample_base_scene,
    sample_concept_scene, sample_scene, training_caption,
)

_LAZY = {
    "Oracle": "oracle", "load_oracle": "oracle", "load_toy_clip": "clip",
    "parse_prompt": "prompts", "OutsideWorldError": "prompts",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHAPES", "NOVEL_SHAPES", "ALL_SHAPES", "COLORS", "PATTERNS", "NOVEL_PATTERNS", "ALL_PATTERNS",
    "BACKGROUNDS", "NOVEL_BACKGROUNDS", "ALL_BACKGROUNDS", "POSITIONS", "SIZES", "NOVEL_CONCEPTS",
    "RESERVED_WORDS", "concept_kind", "TOY_MODEL_DIR", "TOY_CLIP_DIR", "ORACLE_DIR", "TRAIN_COMMAND",
    "ToyModelMissingError", "require_toy_model", "Obj", "Scene", "render", "caption",
    "training_caption", "sample_scene", "sample_base_scene", "sample_any_scene",
    "sample_concept_scene", "HELDOUT_PAIRS", *_LAZY,
]
