"""Hard negatives: toy-world images that are broken in known ways, with their true labels.

The oracle trains on them (so a blend, a tint, a cut shape or a blob is not confidently called a
concept) and the audit measures on them. Every maker returns ``(image, truth)`` where ``truth`` is
a ``Truth``: the background (or ``None``: no background of the world), one entry per position slot
(``None`` = nothing there) and whether colours are judged at all (a tint changes every colour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from .concepts import COLOR_RGB, COLORS, POSITIONS
from .render import SIZE, Scene, render, sample_any_scene

# Images drawn by the base model, which never learnt a reserved concept: whatever it draws for a
# prompt that names one (or for a broken prompt), no reserved concept is there. Only that is known.
DRAWN = "drawn"
# kinds whose every concept is absent by construction (the audit's false-present rate)
NOTHING_KINDS = ("noise", "wash")


@dataclass
class Truth:
    """What an image shows: ``background`` (None: none of the world's), ``slots`` (position ->
    {"shape", "color", "pattern"} or None) and ``judge_color`` (False after a tint)."""

    kind: str
    background: str | None
    slots: dict = field(default_factory=dict)
    judge_color: bool = True
    reserved_absent_only: bool = False  # only "no reserved concept" is known (kind DRAWN)

    @classmethod
    def of_scene(cls, scene: Scene, kind: str = "clean") -> "Truth":
        slots = {p: None for p in POSITIONS}
        for o in scene.objects:
            slots[o.position] = {"shape": o.shape, "color": o.color, "pattern": o.pattern}
        return cls(kind, scene.background, slots)

    def concepts(self) -> set:
        """Concept words present (colours only where judged)."""
        out = {self.background} if self.background else set()
        for s in self.slots.values():
            if s:
                out |= {s["shape"], s["pattern"]} | ({s["color"]} if self.judge_color else set())
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "background": self.background, "slots": self.slots,
                "judge_color": self.judge_color, "reserved_absent_only": self.reserved_absent_only}

    @classmethod
    def empty(cls, kind: str, **fields) -> "Truth":
        """No object and none of the world's backgrounds."""
        return cls(kind, None, {p: None for p in POSITIONS}, **fields)

    @classmethod
    def drawn(cls) -> "Truth":
        return cls.empty(DRAWN, judge_color=False, reserved_absent_only=True)


def _u8(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def noised(rng: np.random.Generator):
    """A scene with mild pixel noise: every concept still there."""
    sc = sample_any_scene(rng)
    arr = _u8(render(sc, rng)) + rng.normal(0, rng.uniform(6, 20), (SIZE, SIZE, 3))
    return _img(arr), Truth.of_scene(sc, "noised")


def blend(rng: np.random.Generator):
    """Two scenes cross-faded: ghosts of both, none of them a concept."""
    a = _u8(render(sample_any_scene(rng), rng))
    b = _u8(render(sample_any_scene(rng), rng))
    t = rng.uniform(0.4, 0.6)
    return _img(a * t + b * (1 - t)), Truth.empty("blend")


def tint(rng: np.random.Generator):
    """A scene washed with one colour: shapes and fills stay, the colours and background do not."""
    sc = sample_any_scene(rng, p_two=0.4)
    col = rng.integers(0, 256, 3).astype(np.float32)
    t = rng.uniform(0.4, 0.6)
    tr = Truth.of_scene(sc, "tint")
    tr.background, tr.judge_color = None, False
    return _img(_u8(render(sc, rng)) * (1 - t) + col * t), tr


def _object_mask(full: np.ndarray, empty: np.ndarray, position: str) -> np.ndarray:
    """Pixels of the object in a slot: where the scene differs from its background alone."""
    m = np.abs(full - empty).sum(-1) > 24
    cols = {"left": (0, 26), "centre": (13, 51), "right": (38, 64)}[position]
    keep = np.zeros_like(m)
    keep[:, cols[0]:cols[1]] = True
    return m & keep


def erased(rng: np.random.Generator):
    """A scene with one object cut in half along a random line: that object is no longer there."""
    sc = sample_any_scene(rng, p_two=0.5)
    while not sc.objects:
        sc = sample_any_scene(rng, p_two=0.5)
    seed = int(rng.integers(2**31))
    full = _u8(render(sc, seed))
    empty = _u8(render(Scene([], sc.background), seed))  # the same background: drawn first
    victim = sc.objects[int(rng.integers(len(sc.objects)))]
    m = _object_mask(full, empty, victim.position)
    tr = Truth.of_scene(sc, "erased")
    if m.sum() == 0:
        return _img(full), tr
    yy, xx = np.nonzero(m)
    cy, cx = yy.mean(), xx.mean()
    a = rng.uniform(0, 2 * np.pi)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE]
    side = ((gx - cx) * np.cos(a) + (gy - cy) * np.sin(a)) > rng.uniform(-1.5, 1.5)
    cut = m & side
    out = np.where(cut[..., None], empty, full)
    tr.slots[victim.position] = None
    return _img(out), tr


def _blob_mask(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    noise = Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(2.5, 4.5)))
    n = np.asarray(noise, np.float32)
    n = (n - n.mean()) / (n.std() + 1e-6)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE]
    d = np.hypot(gx - cx, gy - cy) / r
    return (n * 0.6 + (1.0 - d) * 2.5) > 0.4


def blob(rng: np.random.Generator):
    """A scene where one side holds a formless blob of a world colour instead of a shape."""
    sc = sample_any_scene(rng, p_two=0.0)
    for o in sc.objects:  # one object at most, moved to a side so the blob has the other
        if o.position == "centre":
            o.position, o.size = ("left", "right")[int(rng.integers(2))], "medium"
    taken = {o.position for o in sc.objects}
    free = [p for p in ("left", "right") if p not in taken]
    pos = free[int(rng.integers(len(free)))]
    img = _u8(render(sc, rng))
    cx = {"left": 16, "right": 48}[pos] + rng.uniform(-3, 3)
    m = _blob_mask(rng, cx, rng.uniform(26, 38), rng.uniform(7, 12))
    img[m] = np.array(COLOR_RGB[COLORS[int(rng.integers(len(COLORS)))]], np.float32)
    return _img(img), Truth.of_scene(sc, "blob")


def noise(rng: np.random.Generator):
    """Pure noise, per pixel or smoothed: nothing of the world."""
    arr = rng.random((SIZE, SIZE, 3)) * 255
    img = _img(arr)
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 4.0)))
        a = _u8(img)
        a = (a - a.mean()) / (a.std() + 1e-6) * rng.uniform(20, 70) + rng.uniform(60, 200, 3)
        img = _img(a)
    return img, Truth.empty("noise")


def wash(rng: np.random.Generator):
    """A flat colour or a two-colour ramp (pale tints included): no background of the world."""
    a = rng.integers(0, 256, 3).astype(np.float32)
    if rng.random() < 0.4:  # a pale tint, the kind v1's oracle called "sky"
        a = 255 - rng.uniform(10, 70, 3)
    b = a if rng.random() < 0.5 else rng.integers(0, 256, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = np.clip((gx - 0.5) * np.cos(ang) + (gy - 0.5) * np.sin(ang) + 0.5, 0, 1)[..., None]
    return _img(a * (1 - t) + b * t), Truth.empty("wash")


def clean(rng: np.random.Generator):
    sc = sample_any_scene(rng)
    return render(sc, rng), Truth.of_scene(sc)


MAKERS = {"clean": clean, "noised": noised, "blend": blend, "tint": tint, "erased": erased,
          "blob": blob, "noise": noise, "wash": wash}
KINDS = tuple(MAKERS)


def sample(rng: np.random.Generator, kind: str):
    """(image, Truth) of one kind."""
    return MAKERS[kind](rng)


def drawn_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """Prompts for base-model drawings that hold no reserved concept: prompts naming a reserved
    shape, fill or background in any phrasing form (the base model never learnt them), word salad
    from the world's vocabulary, and the empty prompt."""
    from .concepts import (BACKGROUND_PHRASE, NOVEL_BACKGROUNDS, NOVEL_PATTERNS, NOVEL_SHAPES,
                           PATTERN_PHRASE, PATTERNS, SHAPES, WORLD_WORDS)

    words = sorted(WORLD_WORDS)
    out = []
    for _ in range(n):
        u = rng.random()
        col = COLORS[int(rng.integers(len(COLORS)))]
        if u < 0.05:
            out.append("")
        elif u < 0.25:
            out.append(" ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(2, 9)))))
        else:  # a scene that names reserved concepts
            shape = (NOVEL_SHAPES + SHAPES)[int(rng.integers(len(NOVEL_SHAPES) + len(SHAPES)))]
            fill = (NOVEL_PATTERNS + PATTERNS)[int(rng.integers(len(NOVEL_PATTERNS) + len(PATTERNS)))]
            bg = NOVEL_BACKGROUNDS[int(rng.integers(len(NOVEL_BACKGROUNDS)))] if rng.random() < 0.4 else None
            if shape in SHAPES and fill in PATTERNS and bg is None:
                shape = NOVEL_SHAPES[int(rng.integers(len(NOVEL_SHAPES)))]
            form = int(rng.integers(3))
            if form == 0:
                text = f"a {col} {shape} {PATTERN_PHRASE[fill]}".strip() + (f" {BACKGROUND_PHRASE[bg]}" if bg else "")
            elif form == 1:
                text = ", ".join([f"{col} {shape}"] + ([fill] if fill != "solid" else []) + ([f"{bg} background"] if bg else []))
            else:
                text = f"a {col} {shape} and a {fill} shape" + (f" on {bg}" if bg else "")
            out.append(" ".join(text.split()))
    return out
