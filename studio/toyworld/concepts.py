"""The toy world's vocabulary: one place for every word the world knows.

Base concepts appear in the base model's training images and captions. Reserved ("novel")
concepts never do: DreamBooth adapters teach them later, while the oracle, the VAE and the toy
CLIP know them so that adapters can be judged.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star", "diamond", "heart")
NOVEL_SHAPES = ("crescent", "plus", "arrow")
ALL_SHAPES = SHAPES + NOVEL_SHAPES

# name -> base RGB (rendered with +-15 jitter per channel)
COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 125, 15),
}
COLORS = tuple(COLOR_RGB)
COLOR_JITTER = 15

PATTERNS = ("solid", "stripes", "dots")
NOVEL_PATTERNS = ("zigzag", "checker", "gradient", "glow")
ALL_PATTERNS = PATTERNS + NOVEL_PATTERNS

BACKGROUNDS = ("plain",)
NOVEL_BACKGROUNDS = ("sky", "grid")
ALL_BACKGROUNDS = BACKGROUNDS + NOVEL_BACKGROUNDS

POSITIONS = ("left", "centre", "right")
SIZES = ("small", "medium", "large")

NOVEL_CONCEPTS = NOVEL_SHAPES + NOVEL_PATTERNS + NOVEL_BACKGROUNDS

# Caption phrases.
POSITION_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
PATTERN_PHRASE = {
    "solid": "",
    "stripes": "with stripes",
    "dots": "with dots",
    "zigzag": "with zigzags",
    "checker": "with a checker pattern",
    "gradient": "with a gradient",
    "glow": "with a glow",
}
BACKGROUND_PHRASE = {"plain": "", "sky": "on a sky background", "grid": "on a grid background"}

# Words that must never occur in a base-world caption (the reserved concepts and their phrasing).
RESERVED_WORDS = frozenset(
    list(NOVEL_SHAPES) + ["zigzag", "zigzags", "checker", "checkered", "gradient", "glow", "sky", "grid"]
)

# Words a prompt inside the world may use (besides adapter trigger words).
WORLD_WORDS = frozenset(
    list(ALL_SHAPES) + list(COLORS) + list(SIZES)
    + "a an the on in of with and left right centre center shape shapes object stripes "
    "striped dots dotted zigzag zigzags checker checkered gradient glow pattern sky grid "
    "background plain solid picture image photo".split()
)

def concept_kind(word: str) -> str:
    """'shape' | 'pattern' | 'background' | 'color' for a concept word, else raise KeyError."""
    if word in ALL_SHAPES:
        return "shape"
    if word in ALL_PATTERNS:
        return "pattern"
    if word in ALL_BACKGROUNDS:
        return "background"
    if word in COLORS:
        return "color"
    raise KeyError(f"{word!r} is not a toy-world concept")
