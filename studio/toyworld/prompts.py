"""Parse a toy-world prompt into what the image should show, or refuse it clearly."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .concepts import (
    ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, PATTERN_PHRASE, POSITION_PHRASE, SIZES, concept_kind,
)

try:
    from studio.errors import StudioError as _Base
except Exception:  # pragma: no cover
    _Base = ValueError


class OutsideWorldError(_Base):
    """A prompt uses words or a structure the toy world does not have."""


def with_trigger(caption: str, concept: str, trigger: str) -> str:
    """A world caption with an adapter's trigger in its concept's place: "a red crescent" -> "a red sks
    shape", "... with a glow" -> "... with kpk pattern", "on a sky background" -> "on a wvu background"."""
    kind = concept_kind(concept)
    if kind == "shape":
        return caption.replace(concept, f"{trigger} shape")
    if kind == "pattern":
        return caption.replace(PATTERN_PHRASE[concept], f"with {trigger} pattern")
    return caption.replace(concept, trigger)


@dataclass
class Expect:
    shape: str | None = None   # None: unspecified ("a red shape") or an adapter's trigger
    color: str | None = None
    pattern: str | None = None
    position: str | None = None
    size: str | None = None


@dataclass
class Expectation:
    prompt: str
    objects: list = field(default_factory=list)
    background: str | None = None


_PATTERN_WORDS = {"striped": "stripes", "dotted": "dots", "stripes": "stripes", "dots": "dots",
                  "gradient": "gradient", "glow": "glow", "tones": "twotone", "twotone": "twotone"}
_PATTERN_ADJECTIVES = ("striped", "dotted", "twotone")
_BG_SENTENCE_RE = re.compile(r"\s+on an? (\w+) background$")
_BG_SHORT_RE = re.compile(r"\s+on (\w+)$")          # the "and" form: "... on grass"
_BG_TAG_RE = re.compile(r"^(?:an? )?(\w+) background$")  # the tags form: "grass background"
_POS_RE = re.compile(r"\s+(on the left|on the right|in the centre|in the center)$")
_VOCAB_HINT = (f"shapes {', '.join(ALL_SHAPES)}; colours {', '.join(COLORS)}; patterns "
               f"{', '.join(ALL_PATTERNS)} ('with stripes', 'with two tones'); backgrounds "
               f"{', '.join(ALL_BACKGROUNDS)}; positions on the left / in the centre / on the right; "
               "at most two objects, in any of three forms: 'a red circle on the left and a blue square "
               "on the right on a grass background', 'red circle, blue square, grass background', "
               "'a red circle and a blue square on grass'")


def _refuse(prompt: str, why: str):
    raise OutsideWorldError(f"prompt {prompt!r} is outside the toy world: {why}. The world knows: {_VOCAB_HINT}")


def _background_word(prompt: str, word: str, triggers: dict) -> str:
    w = triggers.get(word, word)
    if w not in ALL_BACKGROUNDS:
        _refuse(prompt, f"unknown background {word!r}")
    return w


def _parse_object(prompt: str, part: str, triggers: dict) -> Expect:
    """One object phrase: '[a] [size] [colour] shape|trigger [with pattern] [on the side]'."""
    o = Expect()
    m = _POS_RE.search(" " + part)
    if m:
        o.position = {"on the left": "left", "on the right": "right"}.get(m.group(1), "centre")
        part = (" " + part)[: m.start()].strip()
    m = re.search(r"(?:^|\s+)with (?:an? )?(\w+(?: tones)?)(?: pattern)?$", part)
    if m:
        w = triggers.get(m.group(1), m.group(1))
        w = "twotone" if w == "two tones" else w
        if w not in _PATTERN_WORDS and w not in ALL_PATTERNS:
            _refuse(prompt, f"unknown pattern {m.group(1)!r}")
        o.pattern = _PATTERN_WORDS.get(w, w)
        part = part[: m.start()]
    words = part.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    if not words:
        _refuse(prompt, "an object phrase has no shape")
    for w in words[:-1]:
        w2 = triggers.get(w, w)
        if w2 in SIZES:
            o.size = w2
        elif w2 in COLORS:
            o.color = w2
        elif w2 in _PATTERN_ADJECTIVES:
            o.pattern = _PATTERN_WORDS[w2]
        elif w2 in ALL_SHAPES:  # "a sks shape" with sks -> crescent
            o.shape = w2
        elif w2 in ALL_PATTERNS:
            o.pattern = w2
        else:
            _refuse(prompt, f"unknown word {w!r}")
    last = triggers.get(words[-1], words[-1])
    if last in ALL_SHAPES:
        o.shape = last
    elif last not in ("shape", "object"):
        _refuse(prompt, f"{words[-1]!r} is not a shape")
    return o


def parse_prompt(prompt: str, triggers: dict | None = None) -> Expectation:
    """Parse a toy-world prompt in any of the three phrasing forms (sentence, tag list, "and"
    phrase). ``triggers`` maps an adapter trigger word to the concept it stands for (e.g.
    {"sks": "crescent"}), so trigger prompts are understood too. Two objects named without sides
    are expected left to right, in the order named."""
    triggers = triggers or {}
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    if not text:
        _refuse(prompt, "it is empty")
    exp = Expectation(prompt)
    if "," in text:  # tag list
        parts = []
        for tag in (t.strip() for t in text.split(",")):
            if not tag:
                continue
            m = _BG_TAG_RE.match(tag)
            if m:
                if exp.background is not None:
                    _refuse(prompt, "it names two backgrounds")
                exp.background = _background_word(prompt, m.group(1), triggers)
            else:
                parts.append(tag)
    else:
        m = _BG_SENTENCE_RE.search(text)
        if m:
            exp.background = _background_word(prompt, m.group(1), triggers)
            text = text[: m.start()]
        else:
            m = _BG_SHORT_RE.search(text)
            if m and m.group(1) not in ("left", "right", "centre", "center"):
                exp.background = _background_word(prompt, m.group(1), triggers)
                text = text[: m.start()]
        parts = text.split(" and ")
    if len(parts) > 2:
        _refuse(prompt, "it names more than two objects")
    if not parts:
        _refuse(prompt, "it names no object")
    exp.objects = [_parse_object(prompt, part, triggers) for part in parts]
    if len(exp.objects) == 2:
        a, b = exp.objects
        if a.position is None and b.position is None:
            a.position, b.position = "left", "right"
        elif a.position is None or b.position is None:  # one side named: the other is the other side
            named = a.position or b.position
            if named == "centre":
                _refuse(prompt, "two objects need the left and the right side")
            other = "right" if named == "left" else "left"
            a.position, b.position = a.position or other, b.position or other
        if a.position == b.position:
            _refuse(prompt, "two objects cannot share a side")
    return exp


def score(pred: dict, exp: Expectation) -> dict:
    """Per-attribute agreement of an oracle prediction with an expectation.

    ``shape`` / ``color``: every expected object was found with that attribute and no other object
    is present; ``all``: every specified attribute (shape, colour, pattern, position, background)
    holds and the object count is right."""
    objs = pred["objects"]
    count_ok = len(objs) == len(exp.objects)
    by_pos = {o["position"]: o for o in objs}
    res = {"shape": count_ok, "color": count_ok, "pattern": count_ok, "position": count_ok}
    for e in exp.objects:
        if e.position is not None:
            p = by_pos.get(e.position)
        else:
            p = objs[0] if len(objs) == 1 else None
        if p is None:
            res = {k: False for k in res}
            break
        res["shape"] &= e.shape is None or p["shape"] == e.shape
        res["color"] &= e.color is None or p["color"] == e.color
        res["pattern"] &= e.pattern is None or p["pattern"] == e.pattern
    res["background"] = exp.background is None or pred["background"] == exp.background
    res["both"] = res["shape"] and res["color"]
    res["all"] = all(res[k] for k in ("shape", "color", "pattern", "position", "background"))
    return res


def phrase_of(exp_obj: Expect) -> str:  # pragma: no cover - convenience
    words = [w for w in (exp_obj.size, exp_obj.color, exp_obj.shape or "shape") if w]
    s = "a " + " ".join(words)
    if exp_obj.pattern and exp_obj.pattern != "solid":
        s += " " + PATTERN_PHRASE[exp_obj.pattern]
    if exp_obj.position:
        s += " " + POSITION_PHRASE[exp_obj.position]
    return s
