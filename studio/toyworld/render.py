"""Procedural 64x64 renderer of toy-world scenes, their captions, and scene samplers.

Images are drawn with PIL at 2x supersampling and box-downsampled. Everything random is drawn
from the ``numpy.random.Generator`` passed in, so a seed gives the same image on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import numpy as np
from PIL import Image, ImageDraw

from .concepts import (
    ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, BACKGROUND_PHRASE, BACKGROUNDS, COLOR_JITTER,
    COLOR_RGB, COLORS, FORMS, NOVEL_BACKGROUNDS, NOVEL_PATTERNS, NOVEL_SHAPES, PATTERN_PHRASE,
    PATTERNS, POSITION_PHRASE, POSITIONS, SHAPES, SIZES,
)

SIZE = 64
SS = 2  # supersampling factor
_X_RANGE = {"left": (12.0, 20.0), "centre": (29.0, 35.0), "right": (44.0, 52.0)}
_R_RANGE = {"small": (7.0, 9.5), "medium": (10.5, 13.5), "large": (16.0, 20.0)}
# A free outline: an irregular smooth shape that is none of the world's concepts, named only "shape" in
# captions. Style and background adapters see it as their object, so they are not bound to the base shapes
# they were shown with (training/demo_adapters.py, Demo.outlines); base training and the oracle never see it.
OUTLINE = "outline"


@dataclass
class Obj:
    shape: str
    color: str
    pattern: str = "solid"
    position: str = "centre"
    size: str = "medium"

    def __post_init__(self):
        if self.shape not in ALL_SHAPES and self.shape != OUTLINE:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(ALL_SHAPES)}")
        if self.color not in COLOR_RGB:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLORS)}")
        if self.pattern not in ALL_PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(ALL_PATTERNS)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; known: {', '.join(POSITIONS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {', '.join(SIZES)}")


@dataclass
class Scene:
    objects: list = field(default_factory=list)
    background: str = "plain"

    def __post_init__(self):
        if self.background not in ALL_BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if len({o.position for o in self.objects}) != len(self.objects):
            raise ValueError("two objects cannot share a position")
        self.objects = sorted(self.objects, key=lambda o: POSITIONS.index(o.position))

    def concepts(self) -> set:
        """Every concept word the scene shows (shapes, colours, patterns, background)."""
        out = {self.background}
        for o in self.objects:
            out |= {o.shape, o.color, o.pattern}
        return out

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background}


# --------------------------------------------------------------------------- drawing
def _outline_radii(rng: np.random.Generator, n: int = 72) -> list[tuple[float, float]]:
    """The unit-radius points of a free outline: a star-convex closed curve with low harmonics (lobes,
    dents) and a random elongation, so some outlines are thin, drawn from ``rng``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 4):
        rad += rng.uniform(0.0, 0.24) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.35, None)
    stretch = rng.uniform(1.0, 1.7)
    x, y = rad * np.cos(t) * stretch, rad * np.sin(t) / stretch
    scale = 1.0 / np.hypot(x, y).max()
    return [(float(a * scale), float(b * scale)) for a, b in zip(x, y)]


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot: float,
                outline: list[tuple[float, float]] | None = None) -> Image.Image:
    """An 'L' mask at supersampled resolution; cx, cy, r already scaled (``outline``: a free outline's
    unit points)."""
    n = SIZE * SS
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)

    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=255)

    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.82 * r
        poly([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "triangle":
        poly([(r * math.cos(a), r * math.sin(a) + 0.12 * r)
              for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.42 * r
            pts.append((rr * math.cos(a), rr * math.sin(a) + 0.08 * r))
        poly(pts)
    elif shape == "diamond":
        poly([(0, -r), (0.68 * r, 0), (0, r), (-0.68 * r, 0)])
    elif shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 16.5, -y * r / 16.5 + 0.1 * r))
        poly(pts)
    elif shape == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, rr = 0.5 * r, 0.86 * r
        c, s = math.cos(rot), math.sin(rot)
        ex, ey = cx + ox * c, cy + ox * s
        d.ellipse([ex - rr, ey - rr, ex + rr, ey + rr], fill=0)
    elif shape == "plus":
        w = 0.3 * r
        poly([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
              (-w, w), (-r, w), (-r, -w), (-w, -w)])
    elif shape == "arrow":
        sh, hh, hx = 0.24 * r, 0.68 * r, 0.05 * r
        poly([(-r, -sh), (hx, -sh), (hx, -hh), (r, 0), (hx, hh), (hx, sh), (-r, sh)])
    elif shape == OUTLINE:
        poly([(x * r, y * r) for x, y in outline])
    else:  # pragma: no cover - validated in Obj
        raise ValueError(shape)
    return m


def _inner_distance(mask: Image.Image) -> np.ndarray:
    """Each inside pixel's Euclidean distance to the nearest outside pixel (0 outside)."""
    m = np.asarray(mask) > 127
    out = np.zeros(m.shape, np.float32)
    pad = np.pad(m, 1)
    edge = ~m & (pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:])
    inside, rim = np.argwhere(m).astype(np.float32), np.argwhere(edge).astype(np.float32)
    if not len(inside) or not len(rim):
        return out
    for k in range(0, len(inside), 2048):
        part = inside[k:k + 2048]
        dist = np.sqrt(((part[:, None, :] - rim[None, :, :]) ** 2).sum(-1)).min(1)
        out[part[:, 0].astype(int), part[:, 1].astype(int)] = dist
    return out


def _pattern_mask(pattern: str, rng: np.random.Generator,
                  geometry: tuple[float, float, float], shape_mask: Image.Image) -> Image.Image | None:
    """Where the light overlay of a fill pattern goes (supersampled 'L' mask, 255 = fully light),
    or None. ``geometry`` (cx, cy, r, supersampled) places the object-relative fills: "gradient" fades
    to light towards the bottom; "glow" is light along the shape's core (its points farthest from the
    edge, ``shape_mask``) and full colour at the rim, so a thin crescent glows along its spine where a
    light centre would fall in its hollow (world v4, session 17). Both are smooth, so the VAE keeps them."""
    if pattern == "solid":
        return None
    n = SIZE * SS
    cx, cy, r = geometry
    if pattern == "gradient":  # full colour at the top, light at the bottom
        t = np.clip((np.arange(n, dtype=np.float32) - (cy - r)) / (2 * r), 0.0, 1.0) * 255
        return Image.fromarray(np.broadcast_to(t[:, None], (n, n)).round().astype(np.uint8).copy())
    if pattern == "glow":  # light along the core, fading to full colour towards the rim
        d = _inner_distance(shape_mask)
        peak = max(float(d.max()), 1.0)
        t = np.clip((d - 0.15 * peak) / (0.7 * peak), 0.0, 1.0) * 255
        return Image.fromarray(t.round().astype(np.uint8))
    if pattern == "twotone":  # split on the diagonal: upper-left half light, lower-right full colour
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        return Image.fromarray(((xx - cx) + (yy - cy) < 0).astype(np.uint8) * 255)
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    ph = float(rng.uniform(0, 1))
    if pattern == "stripes":  # diagonal stripes, period 12 px, 6 px wide (finer ones die in a factor-8 VAE)
        p, w = 12 * SS, 6 * SS
        off = ph * p
        for k in range(-2 * n // p - 2, 2 * n // p + 2):
            x0 = k * p + off
            d.polygon([(x0, 0), (x0 + w, 0), (x0 + w - n, n), (x0 - n, n)], fill=255)
    elif pattern == "dots":  # dot grid, period 11 px, radius 3 px
        p, rr = 11 * SS, 3.0 * SS
        off = ph * p
        for i in range(-1, n // p + 2):
            for j in range(-1, n // p + 2):
                x, y = i * p + off + (p / 2 if j % 2 else 0), j * p + off
                d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)
    else:  # pragma: no cover
        raise ValueError(pattern)
    return m


# Background colours: (top, bottom) RGB of a vertical blend (each jittered by +-10 per channel).
_BG_BLEND = {
    "grass": ((200, 228, 160), (120, 185, 90)),
    "night": ((22, 26, 58), (52, 50, 96)),
    "sand": ((236, 214, 168), (208, 176, 120)),
    "sky": ((70, 130, 220), (200, 225, 250)),
    "sunset": ((252, 188, 110), (196, 104, 150)),
    "water": ((96, 178, 188), (28, 86, 140)),
}


def _background(bg: str, rng: np.random.Generator) -> Image.Image:
    """A smooth background: every one is low-frequency, so the VAE keeps it."""
    n = SIZE * SS
    if bg == "plain":
        g = int(rng.integers(222, 251))
        col = tuple(int(v) for v in np.clip(g + rng.integers(-8, 9, 3), 0, 255))
        return Image.new("RGB", (n, n), col)
    t = np.linspace(0, 1, n)[:, None, None]
    top, bot = (np.array(c) + rng.integers(-10, 11, 3) for c in _BG_BLEND[bg])
    arr = np.broadcast_to(top[None, None, :] * (1 - t) + bot[None, None, :] * t, (n, n, 3))
    if bg == "water":  # one broad swell: waves finer than the VAE's 8-px cells cost shapes their outline
        ph = float(rng.uniform(0, 2 * np.pi))
        arr = arr + 10 * np.sin(2 * np.pi * np.arange(n) / (n / 1.5) + ph)[:, None, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def object_geometry(o: Obj, rng: np.random.Generator) -> tuple[float, float, float]:
    """(cx, cy, r) in 64-px units for an object, drawn from rng."""
    r = float(rng.uniform(*_R_RANGE[o.size]))
    if o.position != "centre":
        r = min(r, 13.5)
    lo, hi = _X_RANGE[o.position]
    cx = float(rng.uniform(lo, hi))
    cx = min(max(cx, r + 1.0), SIZE - 1.0 - r)
    cy = float(rng.uniform(max(24.0, r + 1.0), min(40.0, SIZE - 1.0 - r)))
    return cx, cy, r


def render(scene: Scene, rng: np.random.Generator | int | None = None) -> Image.Image:
    """Draw ``scene`` as a 64x64 RGB image. ``rng`` (Generator or seed) fixes every jitter."""
    return render_with_masks(scene, rng)[0]


def render_with_masks(scene: Scene, rng: np.random.Generator | int | None = None) -> tuple[Image.Image, list[Image.Image]]:
    """``render`` plus each object's 64x64 'L' mask (255 = the object), in ``scene.objects`` order; the
    same rng draws, so the image is ``render``'s."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    img = _background(scene.background, rng)
    masks = []
    for o in scene.objects:
        cx, cy, r = object_geometry(o, rng)
        rot, outline = 0.0, None
        if o.shape in ("crescent", "arrow"):
            rot = float(rng.uniform(-0.35, 0.35))
        elif o.shape == OUTLINE:
            rot, outline = float(rng.uniform(0, 2 * math.pi)), _outline_radii(rng)
        elif o.shape not in ("circle",):
            rot = float(rng.uniform(-0.12, 0.12))
        mask = _shape_mask(o.shape, cx * SS, cy * SS, r * SS, rot, outline)
        masks.append(mask.resize((SIZE, SIZE), Image.BOX))
        base = np.array(COLOR_RGB[o.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
        col = tuple(int(v) for v in np.clip(base, 0, 255))
        img.paste(col, (0, 0), mask)
        pm = _pattern_mask(o.pattern, rng, (cx * SS, cy * SS, r * SS), mask)
        if pm is not None:
            light = tuple(int(v) for v in np.clip(np.array(col) * 0.4 + 245 * 0.6, 0, 255))
            both = Image.fromarray((np.asarray(pm, np.uint16) * np.asarray(mask, np.uint16) // 255).astype(np.uint8))
            img.paste(light, (0, 0), both)
    return img.resize((SIZE, SIZE), Image.BOX), masks


# --------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: Obj, *, color=True, shape=True, size=None, pattern=True, position=None,
                  article=True) -> str:
    """'a small red circle with stripes on the left' with parts switched off on demand."""
    words = []
    if size is None:
        size = o.size != "medium"
    if size and o.size != "medium":
        words.append(o.size)
    if color:
        words.append(o.color)
    words.append(o.shape if shape and o.shape != OUTLINE else "shape")
    if pattern and o.pattern != "solid":
        words.append(PATTERN_PHRASE[o.pattern])
    if position:
        words.append(POSITION_PHRASE[o.position])
    return (_article(words[0]) + " " if article else "") + " ".join(words)


def background_phrase(background: str, form: str = "sentence") -> str:
    """How a caption names a background in each phrasing form ("" for plain)."""
    if background == "plain":
        return ""
    return {"sentence": f"on a {background} background", "tags": f"{background} background",
            "and": f"on {background}"}[form]


def caption_in_form(scene: Scene, form: str = "sentence", *, rng: np.random.Generator | None = None) -> str:
    """The scene's caption in one phrasing form (concepts.FORMS):

    - sentence: "a red circle on the left and a blue square on the right on a grass background"
    - tags:     "red circle, blue square, grass background"
    - and:      "a red circle and a blue square on grass"

    Objects are named left to right (the tags and "and" forms carry position by that order).
    With ``rng`` the caption is randomly abbreviated as base training sees it (never wrong)."""
    objs = list(scene.objects)
    r = rng.random if rng is not None else (lambda: 0.0)
    bg = background_phrase(scene.background, form)
    if not objs:
        text = {"sentence": "an empty picture", "tags": "empty", "and": "nothing"}[form]
        return f"{text} {bg}".strip() if form != "tags" else ", ".join(x for x in (text, bg) if x)
    if form == "sentence":
        if len(objs) == 1:
            o = objs[0]
            text = object_phrase(o, size=None if rng is None else r() < 0.6,
                                 pattern=rng is None or r() < 0.85,
                                 position=o.position != "centre" and (rng is None or r() < 0.8))
        else:
            if rng is not None and r() < 0.25:
                objs = objs[::-1]
            text = " and ".join(object_phrase(o, size=None if rng is None else r() < 0.4,
                                              pattern=rng is None or r() < 0.85, position=True) for o in objs)
        return f"{text} {bg}".strip()
    if form == "tags":
        sides = rng is not None and len(objs) == 2 and r() < 0.3
        tags = [object_phrase(o, size=None if rng is None else r() < 0.4, pattern=rng is None or r() < 0.85,
                              position=sides, article=False) for o in objs]
        return ", ".join(tags + ([bg] if bg else []))
    text = " and ".join(object_phrase(o, size=None if rng is None else r() < 0.4,
                                      pattern=rng is None or r() < 0.85) for o in objs)
    return f"{text} {bg}".strip()


def caption(scene: Scene) -> str:
    """The canonical, complete caption of a scene (the sentence form)."""
    return caption_in_form(scene, "sentence")


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random phrasing form, randomly abbreviated: what base-model training sees; never wrong,
    maybe partial (a few captions name only the shape or only the colour of one object)."""
    form = FORMS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    if len(scene.objects) == 1 and rng.random() < 0.1:
        o = scene.objects[0]
        text = object_phrase(o, color=rng.random() < 0.5, shape=True, size=False, pattern=False)
        if rng.random() < 0.5:
            text = object_phrase(o, shape=False, pattern=False, size=False)
        bg = background_phrase(scene.background, form)
        return f"{text}, {bg}" if form == "tags" and bg else f"{text} {bg}".strip()
    return caption_in_form(scene, form, rng=rng)


# --------------------------------------------------------------------------- samplers
def _pick(rng, seq, p=None):
    return seq[int(rng.choice(len(seq), p=p))]


def _sample_obj(rng, position, shapes, colors, patterns, two: bool, p_pattern=0.3) -> Obj:
    pat = "solid" if rng.random() > p_pattern else _pick(rng, patterns[1:] if patterns[0] == "solid" else patterns)
    if two or position != "centre":
        size = _pick(rng, ("small", "medium"), [0.3, 0.7])
    else:
        size = _pick(rng, SIZES, [0.2, 0.55, 0.25])
    return Obj(_pick(rng, shapes), _pick(rng, colors), pat, position, size)


def sample_scene(rng: np.random.Generator, *, p_two=0.4, shapes=SHAPES, colors=COLORS,
                 patterns=PATTERNS, backgrounds=BACKGROUNDS, p_pattern=0.3,
                 p_background=0.0, p_empty=0.0) -> Scene:
    """A random scene over the given vocabulary (default: the base world)."""
    bg = "plain"
    if p_background and rng.random() < p_background:
        bg = _pick(rng, [b for b in backgrounds if b != "plain"] or list(backgrounds))
    elif "plain" not in backgrounds:
        bg = _pick(rng, backgrounds)
    if p_empty and rng.random() < p_empty:
        return Scene([], bg)
    if rng.random() < p_two:
        objs = [_sample_obj(rng, pos, shapes, colors, patterns, True, p_pattern) for pos in ("left", "right")]
    else:
        pos = _pick(rng, POSITIONS, [0.25, 0.5, 0.25])
        objs = [_sample_obj(rng, pos, shapes, colors, patterns, False, p_pattern)]
    return Scene(objs, bg)


def sample_base_scene(rng: np.random.Generator, p_two=0.4) -> Scene:
    """A scene from the base world only (what the base model is trained on)."""
    return sample_scene(rng, p_two=p_two, p_background=0.6)


def sample_any_scene(rng: np.random.Generator, p_two=0.4) -> Scene:
    """A scene over the whole vocabulary, reserved concepts included (oracle / CLIP training)."""
    return sample_scene(rng, p_two=p_two, shapes=ALL_SHAPES, patterns=ALL_PATTERNS,
                        backgrounds=ALL_BACKGROUNDS, p_pattern=0.45, p_background=0.6,
                        p_empty=0.03)


def sample_concept_scene(concept: str, rng: np.random.Generator, *, color: str | None = None,
                         p_two=0.0) -> Scene:
    """A scene that shows the concept ``concept`` (a reserved or base shape/pattern/background);
    all other attributes come from the base world."""
    if concept in ALL_BACKGROUNDS:
        sc = sample_scene(rng, p_two=p_two, backgrounds=(concept,))
        return sc
    sc = sample_scene(rng, p_two=p_two, p_pattern=0.0 if concept in ALL_SHAPES else 1.0)
    o = sc.objects[int(rng.integers(len(sc.objects)))]
    if concept in ALL_SHAPES:
        o.shape = concept
    elif concept in ALL_PATTERNS:
        o.pattern = concept
    elif concept in COLOR_RGB:
        o.color = concept
    else:
        raise ValueError(f"unknown concept {concept!r}")
    if color is not None:
        o.color = color
    return sc


__all__ = [
    "Obj", "Scene", "render", "caption", "training_caption", "object_phrase", "sample_scene",
    "sample_base_scene", "sample_any_scene", "sample_concept_scene", "object_geometry",
    "NOVEL_SHAPES", "NOVEL_PATTERNS", "NOVEL_BACKGROUNDS",
]


# --------------------------------------------------------------------------- held-out prompts
def _heldout_pairs(n: int = 24) -> tuple:
    """Two-object combinations ((shape, colour) left, (shape, colour) right) that the base model
    never sees in training, so the check's two-object prompts are truly held out."""
    rng = np.random.default_rng(20240603)
    out = []
    while len(out) < n:
        s1, s2 = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), 2, replace=False))
        c1, c2 = (COLORS[int(i)] for i in rng.choice(len(COLORS), 2, replace=False))
        pair = ((s1, c1), (s2, c2))
        if pair not in out:
            out.append(pair)
    return tuple(out)


HELDOUT_PAIRS = _heldout_pairs()


def is_heldout(scene: Scene) -> bool:
    """True for two-object scenes whose shape/colour combination is held out of training."""
    if len(scene.objects) != 2:
        return False
    a, b = scene.objects
    return ((a.shape, a.color), (b.shape, b.color)) in HELDOUT_PAIRS


__all__ += ["HELDOUT_PAIRS", "is_heldout"]
