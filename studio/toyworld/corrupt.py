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
# Base-world renders redrawn by the base model at low strength (training.toyworld._redrawn_scenes):
# their content is known, except a dotted fill, which the model often smooths away.
REDRAWN = "redrawn"
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

    @classmethod
    def redrawn(cls, scene: Scene, small_fills: bool = True) -> "Truth":
        """A redrawn scene's truth: the scene's, with dotted fills unjudged (pattern None), and with
        ``small_fills=False`` every small object's fill too (redrawn with a style's adapter, a small
        twotone or gradient object often comes back solid)."""
        truth = cls.of_scene(scene, REDRAWN)
        small = {o.position for o in scene.objects if o.size == "small"}
        for pos, s in truth.slots.items():
            if s and (s["pattern"] == "dots" or (not small_fills and pos in small)):
                s["pattern"] = None
        return truth

    def concepts(self) -> set:
        """Concept words present (colours only where judged)."""
        out = {self.background} if self.background else set()
        for s in self.slots.values():
            if s:
                out |= {s["shape"], s["pattern"]} | ({s["color"]} if self.judge_color else set())
        return out - {None}

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


def _cut(rng: np.random.Generator, m: np.ndarray, keep: float) -> np.ndarray:
    """The pixels of mask ``m`` that a straight cut at a random angle removes, leaving ``keep`` of them."""
    yy, xx = np.nonzero(m)
    a = rng.uniform(0, 2 * np.pi)
    proj = xx * np.cos(a) + yy * np.sin(a)
    cut = np.zeros_like(m)
    removed = proj > np.quantile(proj, keep)
    cut[yy[removed], xx[removed]] = True
    return cut


def _victim(rng: np.random.Generator, kind: str):
    """A scene, one of its objects, the scene's pixels, its background's pixels and the object's mask."""
    while True:
        sc = sample_any_scene(rng, p_two=0.5)
        if not sc.objects:
            continue
        seed = int(rng.integers(2**31))
        full = _u8(render(sc, seed))
        empty = _u8(render(Scene([], sc.background), seed))  # the same background: drawn first
        victim = sc.objects[int(rng.integers(len(sc.objects)))]
        m = _object_mask(full, empty, victim.position)
        if m.sum() >= 8:
            return sc, victim, full, empty, m, Truth.of_scene(sc, kind)


def erased(rng: np.random.Generator):
    """A scene with most of one object cut away (a fragment of 10-35 % is left): that object is no
    longer there. (Until session 10 the cut went through the middle; half a crescent is still a
    crescent-like arc, which taught both oracles to miss thin generated crescents.)"""
    sc, victim, full, empty, m, tr = _victim(rng, "erased")
    cut = _cut(rng, m, rng.uniform(0.10, 0.35))
    tr.slots[victim.position] = None
    return _img(np.where(cut[..., None], empty, full)), tr


def chipped(rng: np.random.Generator):
    """A scene with one object imperfect as generated shapes are: a sliver (up to 15 %) cut off, or
    thinned or swollen by a pixel. The object is still there."""
    sc, victim, full, empty, m, tr = _victim(rng, "chipped")
    u = rng.random()
    if u < 0.4:
        out = np.where(_cut(rng, m, rng.uniform(0.85, 0.97))[..., None], empty, full)
    else:
        mi = Image.fromarray((m * 255).astype(np.uint8))
        grown = mi.filter(ImageFilter.MaxFilter(3)) if u < 0.7 else mi.filter(ImageFilter.MinFilter(3))
        g = np.asarray(grown) > 127
        if g.sum() < 8:
            return _img(full), tr
        if u < 0.7:  # swollen: the new rim takes the object's mean colour
            colour = full[m].mean(0)
            out = np.where((g & ~m)[..., None], colour, full)
        else:  # thinned: the lost rim shows the background
            out = np.where((m & ~g)[..., None], empty, full)
    return _img(out), tr


def _star4_mask(cx: float, cy: float, r: float, inner: float, rot: float) -> np.ndarray:
    from PIL import ImageDraw

    pts = []
    for k in range(8):
        ang = rot + k * np.pi / 4
        rad = r if k % 2 == 0 else r * inner
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    im = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(im).polygon(pts, fill=255)
    return np.asarray(im) > 127


def _blob_mask(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    noise = Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(2.5, 4.5)))
    n = np.asarray(noise, np.float32)
    n = (n - n.mean()) / (n.std() + 1e-6)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE]
    d = np.hypot(gx - cx, gy - cy) / r
    return (n * 0.6 + (1.0 - d) * 2.5) > 0.4


def _beside(rng: np.random.Generator, kind: str, mask_at):
    """A scene of at most one object, moved to a side, and on the other side a world-coloured patch
    ``mask_at(cx)`` (a boolean mask centred near x = cx) that is no shape of the world."""
    sc = sample_any_scene(rng, p_two=0.0)
    for o in sc.objects:  # one object at most, moved to a side so the patch has the other
        if o.position == "centre":
            o.position, o.size = ("left", "right")[int(rng.integers(2))], "medium"
    taken = {o.position for o in sc.objects}
    free = [p for p in ("left", "right") if p not in taken]
    pos = free[int(rng.integers(len(free)))]
    img = _u8(render(sc, rng))
    m = mask_at({"left": 16, "right": 48}[pos] + rng.uniform(-3, 3))
    img[m] = np.array(COLOR_RGB[COLORS[int(rng.integers(len(COLORS)))]], np.float32)
    return _img(img), Truth.of_scene(sc, kind)


def blob(rng: np.random.Generator):
    """A scene where one side holds a formless blob of a world colour instead of a shape."""
    return _beside(rng, "blob", lambda cx: _blob_mask(rng, cx, rng.uniform(26, 38), rng.uniform(7, 12)))


def star4(rng: np.random.Generator):
    """A scene where one side holds a pointed four-point star of a world colour: no shape of the
    world (what the plus adapter tends to draw, and what both oracles used to call a plus)."""
    return _beside(rng, "star4", lambda cx: _star4_mask(cx, rng.uniform(26, 38), rng.uniform(6, 12),
                                                        rng.uniform(0.2, 0.45), rng.uniform(0, np.pi / 2)))


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


def _near_a_background(c: np.ndarray, dist: float = 70.0) -> bool:
    """Whether colour ``c`` lies near an end or the middle of a world background's blend."""
    from .render import _BG_BLEND

    for top, bot in _BG_BLEND.values():
        top, bot = np.asarray(top, np.float32), np.asarray(bot, np.float32)
        if min(np.linalg.norm(c - x) for x in (top, bot, (top + bot) / 2)) < dist:
            return True
    return False


def wash(rng: np.random.Generator):
    """A flat colour or a two-colour ramp (pale tints included): no background of the world. Colours
    near a world background's own are not drawn: a flat sky blue is what generated skies look like,
    and a person would call it a sky (until session 10 such washes taught the oracles otherwise)."""
    def colour():
        while True:
            c = rng.integers(0, 256, 3).astype(np.float32)
            if not _near_a_background(c):
                return c

    a = colour()
    if rng.random() < 0.4:  # a pale tint, the kind v1's oracle called "sky"
        a = 255 - rng.uniform(10, 70, 3)
    b = a if rng.random() < 0.5 else colour()
    ang = rng.uniform(0, 2 * np.pi)
    gy, gx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = np.clip((gx - 0.5) * np.cos(ang) + (gy - 0.5) * np.sin(ang) + 0.5, 0, 1)[..., None]
    return _img(a * (1 - t) + b * t), Truth.empty("wash")


def clean(rng: np.random.Generator):
    sc = sample_any_scene(rng)
    return render(sc, rng), Truth.of_scene(sc)


MAKERS = {"clean": clean, "noised": noised, "blend": blend, "tint": tint, "erased": erased,
          "chipped": chipped, "blob": blob, "star4": star4, "noise": noise, "wash": wash}
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
