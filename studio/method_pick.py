"""Which composition method to suggest for a set of adapters, by their concept kinds.

Merge is the default everywhere (fast, no setup), but on the toy world it is the wrong method for
two objects: the merged crescent turns the plus into a second crescent. The picks below were measured
on selection seeds and wordings only (base_seed 777, a green crescent, "on sand"; session 25's selection
suites, docs/benchmark.md "Session 25"), never on the benchmark's evaluation seeds, with the demo
adapters, each method at its default CFG scale and its benchmark adapter weights. The benchmark's rate
(evaluation seeds) is what a user can expect. Nothing was measured on real models, so there is no suggestion there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

# Every method's all-present count on the selection suites, in this order. The pick is the top one (a tie is broken
# by the second oracle and the eye, named in the pick), unless the benchmark's evaluation seeds contradicted it
# (object + style). CLoRA's background deviation is a no-op on sets without a background adapter, so there its count
# is step-5 CLoRA's.
SELECTION_ORDER = ("merge", "switch", "composite", "cmlora", "clora", "lego", "clora step 5",
                   "clora step 5 background auto")


@dataclass(frozen=True)
class MethodPick:
    """A suggested method (``None``: none composes this kind of set here) and why."""

    pair_type: str  # "object + object"
    method: str | None
    params: dict = field(default_factory=dict)
    label: str = ""  # "clora, step_size 5"
    selection: tuple[int, ...] = ()  # all-present counts per SELECTION_ORDER method (selection seeds)
    images: int = 0  # images per method in those counts
    expect: str = ""  # the benchmark's rate (evaluation seeds)
    selection_note: str = ""  # the selection evidence in words, where it is not one count per SELECTION_ORDER method
    tie_break: str = ""  # why the pick, where another method has the same selection count

    def same_as(self, method: str, params: dict | None) -> bool:
        """Whether ``method`` with ``params`` is already this pick."""
        params = params or {}
        return method == self.method and all(params.get(k) == v for k, v in self.params.items())

    def in_use_markdown(self) -> str:
        """The line once the pick is the method in use."""
        return f"✓ {self.label}: the suggested method for {self.pair_type}. Expect: {self.expect}."

    def markdown(self) -> str:
        if self.method is None:
            return f"**{self.pair_type}:** {self.expect}"
        evidence = selection_text(self.selection, self.images) if self.selection else self.selection_note
        if self.tie_break:
            evidence += f"; {self.tie_break}"
        return (f"**Suggested for {self.pair_type}: {self.label}.** With the demo LoRAs, on selection seeds "
                f"{evidence}. "
                f"On the benchmark's evaluation seeds: {self.expect} (docs/benchmark.md).")


def selection_text(counts: Sequence[int], of: int) -> str:
    """"clora step 5 43, clora 35, … of 48 images held every concept"."""
    ranked = sorted(zip(SELECTION_ORDER, counts), key=lambda mc: -mc[1])
    return ", ".join(f"{m} {c}" for m, c in ranked) + f" of {of} images held every concept"


TOY_PICKS = {
    "object + object": MethodPick(
        "object + object", "clora", {"step_size": 5.0}, "clora, step_size 5",
        (6, 0, 16, 8, 35, 0, 43, 43), 48,
        "step-5 CLoRA 0.77 [0.63, 0.87] (the plus at weight 1.25; by eye 0.58, the rest five-point stars for the "
        "plus), CLoRA 0.65; Merge, Composite and CMLoRA 0.00; "
        "in two other colourings (workflows/toy-compose-colours.yaml) step-5 CLoRA 1.00 [0.93, 1.00]"),
    # Session 33: the background deviation's background_in_objects (auto: the sky adapter in the object's branch)
    # tied CMLoRA by `oracle` and won by `oracle-b` and by eye; it was CMLoRA before.
    "object + background": MethodPick(
        "object + background", "clora", {"step_size": 5.0, "background": "auto"}, "clora, step_size 5, background auto",
        (14, 0, 19, 23, 8, 1, 13, 23), 24,
        "step-5 CLoRA with background auto 0.92 [0.80, 0.97] (`oracle-b` 0.81; by eye 42 of 48 show a clear crescent "
        "on a sky, 0.88 [0.75, 0.94], a few with a faint pale box), CMLoRA 0.79 [0.66, 0.88] (by eye 0.69), Merge 0.65; "
        "with a yellow or an orange crescent only 0.56 (by eye 0.52: the crescent grows a piece in its hollow) against "
        "CMLoRA's 0.88 (a clean crescent on a pale blue)",
        tie_break="on those images `oracle-b` saw both in 20 against CMLoRA's 4, and by eye 22 showed a clear crescent "
                  "on a clear sky against none of CMLoRA's (a flat pale blue)"),
    # The glow's and the twotone's cells pooled (24 images each). Step-5 CLoRA led on selection (15 of 48) but
    # held both in 1 of 96 evaluation images, so no method is suggested.
    "object + style": MethodPick(
        "object + style", None, selection=(4, 1, 9, 9, 10, 1, 15, 15), images=48,
        expect="no method holds both reliably here: on the benchmark the best was Merge, 0.15 [0.07, 0.27] with "
               "the glow (by eye 4 of 48), and CMLoRA, 0.08 with the twotone, every method's interval overlapping. "
               "A heavier style breaks the object's outline. Generate "
               "several seeds and keep the good ones."),
}
UNMEASURED = ("no pick measured for this mix of kinds; an object, a background and a style reached 0.00 with every "
              "method (docs/benchmark.md).")
# Two objects and a background: the object + object pick with CLoRA's background deviation (session 29). On
# workflows/toy-background-select.yaml (selection seeds, 48 images) step-5 CLoRA held all three in 5 images with it
# against 4 without (`oracle-b` 7 against 1); the benchmark's evaluation seeds then gave 0.69 against 0.21.
TWO_OBJECTS_AND_BACKGROUND = MethodPick(
    "two objects and a background", "clora", {"step_size": 5.0, "background": "auto"},
    "clora, step_size 5, background auto",
    expect="step-5 CLoRA with the background's branch on the free cells 0.69 [0.55, 0.80] on crescent + plus + sky "
    "(`oracle-b` 0.35; without it 0.21), every other method 0.15 or less; 0.65 [0.50, 0.77] in two other colourings",
    selection_note="it held all three in 5 of 48 images against 4 for step-5 CLoRA without it (`oracle-b`: 7 "
                   "against 1); the other methods were not run there")


def pair_type(kinds: Sequence[str | None]) -> str | None:
    """"object + object", "object + background", "object + style", "mixed", or None (under two
    adapters, or one without a kind). Characters count as objects; two or more objects rule."""
    if len(kinds) < 2 or any(k is None for k in kinds):
        return None
    n = Counter("object" if k == "character" else k for k in kinds)
    if n["object"] >= 2:
        return "object + object"
    if n["object"] == 1 and len(kinds) == 2:
        other = next(k for k in n if k != "object")
        return f"object + {other}" if other in ("background", "style") else "mixed"
    return "mixed"


def suggest_method(arch: str, kinds: Sequence[str | None]) -> MethodPick | None:
    """The toy world's pick for adapters of these kinds; None on real models, for a single adapter
    or an adapter without a kind."""
    kind = pair_type(kinds)
    if arch != "toy" or kind is None:
        return None
    if kind == "object + object" and len(kinds) == 3 and "background" in kinds:
        return TWO_OBJECTS_AND_BACKGROUND
    if kind == "object + object" and len(kinds) > 2:
        return replace(TOY_PICKS[kind], pair_type=f"{len(kinds)} adapters with two objects (picked on object + object)",
                       expect="measured only for two objects and a background (0.69 with CLoRA's background deviation)")
    return TOY_PICKS.get(kind) or MethodPick("these adapters", None, expect=UNMEASURED)
