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

# Fills ("styles"). Every one is coarse or smooth enough that the factor-4 VAE keeps it on the
# smallest object (world v1's zigzag and checker were lost by its factor-8 encoder).
PATTERNS = ("solid", "stripes", "dots")
NOVEL_PATTERNS = ("gradient", "glow", "twotone")
ALL_PATTERNS = PATTERNS + NOVEL_PATTERNS

# Backgrounds: low-frequency scenes the base model draws, and reserved ones for adapters.
BACKGROUNDS = ("plain", "grass", "water", "night", "sand")
NOVEL_BACKGROUNDS = ("sky", "sunset")
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
    "gradient": "with a gradient",
    "glow": "with a glow",
    "twotone": "with two tones",
}
BACKGROUND_PHRASE = {b: "" if b == "plain" else f"on a {b} background" for b in ALL_BACKGROUNDS}

# The three phrasing forms every caption comes in: the sentence grammar, an artist's tag list,
# and an "and"-joined phrase (render.caption_in_form writes each).
FORMS = ("sentence", "tags", "and")

# Words that must never occur in a base-world caption (the reserved concepts and their phrasing).
RESERVED_WORDS = frozenset(
    list(NOVEL_SHAPES) + ["gradient", "glow", "twotone", "tones", "two-tone", "sky", "sunset"]
)

# Words a prompt inside the world may use (besides adapter trigger words).
WORLD_WORDS = frozenset(
    list(ALL_SHAPES) + list(COLORS) + list(SIZES)
    + list(ALL_BACKGROUNDS) + list(ALL_PATTERNS)
    + "a an the on in of with and left right centre center shape shapes object striped dotted "
    "two tones pattern background picture image photo".split()
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
