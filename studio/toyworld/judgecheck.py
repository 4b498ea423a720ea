"""Check the oracles against a person's eye on generated composed images.

    python -m studio.toyworld.judgecheck [--group a|b|c] [--labels FILE] [--oracle DIR] [--oracle-b DIR]

The audit knows its truth by construction (renders, round trips, corruptions); what the benchmark
judges are images the model drew, whose truth only a person can give. ``assets/judge-check`` holds
such images with a person's labels per concept (Y / N / ?). For each oracle and concept this
prints how often it says "present" on the images a person sees the concept in (recall) and on
those a person does not (false present), with 95 % Wilson intervals, and how often it says
"present" on the arguable ones. ``--group`` keeps one labelling round (the labels file says what each
is; "b" was labelled after the oracles it tests were trained). The last line pools every concept:

    recall_a=… false_present_a=… recall_b=… false_present_b=… labelled=…
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .paths import REPO_ROOT

LABELS = REPO_ROOT / "assets" / "judge-check" / "labels.json"
MARKS = ("Y", "N", "?")


@dataclass
class Tally:
    """Verdicts of one judge on one concept, split by the person's label."""

    said: dict = field(default_factory=lambda: {m: 0 for m in MARKS})  # judge said "present"
    of: dict = field(default_factory=lambda: {m: 0 for m in MARKS})  # images with that label

    def add(self, mark: str, present: bool) -> None:
        self.of[mark] += 1
        self.said[mark] += bool(present)

    def __iadd__(self, other: "Tally") -> "Tally":
        for m in MARKS:
            self.of[m] += other.of[m]
            self.said[m] += other.said[m]
        return self


def load_labels(path: str | Path = LABELS, group: str | None = None) -> tuple[Path, list[dict]]:
    """(image folder, items) of a labels file, optionally of one ``group``; refuses marks other than Y / N / ?."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no labels file at {path}; pass --labels with a file like {LABELS}")
    items = json.loads(path.read_text())["images"]
    if group is not None:
        groups = sorted({it.get("group") for it in items if it.get("group")})
        items = [it for it in items if it.get("group") == group]
        if not items:
            raise ValueError(f"{path} has no images in group {group!r}; its groups: {', '.join(groups) or 'none'}")
    for it in items:
        bad = {c: m for c, m in it["labels"].items() if m not in MARKS}
        if bad:
            raise ValueError(f"{path}: {it['file']} has marks {bad}; each label is one of Y, N, ?")
    return path.parent / "images", items


def tally(predictions: list[dict], items: list[dict], has_concept) -> dict[str, Tally]:
    """Per concept, the judge's "present" verdicts against the person's labels."""
    out: dict[str, Tally] = {}
    for pred, it in zip(predictions, items, strict=True):
        for concept, mark in it["labels"].items():
            out.setdefault(concept, Tally()).add(mark, has_concept(pred, concept))
    return out


def _rate(k: int, n: int) -> str:
    from studio.composition_report import wilson

    if not n:
        return "–"
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def report(name: str, tallies: dict[str, Tally], log=print) -> Tally:
    """Print one judge's table; return the pooled tally."""
    pooled = Tally()
    log(f"{name}: concept | recall (says present where a person sees it) | false present (where a person "
        f"does not) | says present on arguable images")
    for concept, t in sorted(tallies.items()):
        log(f"  {concept:9s} | {_rate(t.said['Y'], t.of['Y'])} | {_rate(t.said['N'], t.of['N'])} | "
            f"{t.said['?']}/{t.of['?']}")
        pooled += t
    return pooled


def main(argv=None) -> int:
    from PIL import Image

    from .oracle import Oracle, load_oracle
    from .paths import ORACLE_B_DIR

    ap = argparse.ArgumentParser(prog="python -m studio.toyworld.judgecheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(LABELS), help="labels file (default: the shipped set)")
    ap.add_argument("--group", default=None, help="only this labelling round (default: all)")
    ap.add_argument("--oracle", default=None, help="oracle folder (default: the shipped oracle)")
    ap.add_argument("--oracle-b", default=None, help="second oracle folder (default: the shipped oracle-b)")
    args = ap.parse_args(argv)
    folder, items = load_labels(args.labels, args.group)
    images = [Image.open(folder / it["file"]).convert("RGB") for it in items]
    fields, n = [], sum(m != "?" for it in items for m in it["labels"].values())
    for tag, path in (("a", args.oracle), ("b", args.oracle_b or ORACLE_B_DIR)):
        oracle = load_oracle(path)
        pooled = report(f"oracle {tag} ({oracle.sha})", tally(oracle.predict(images), items, Oracle.has_concept))
        fields += [f"recall_{tag}={pooled.said['Y'] / max(1, pooled.of['Y']):.3f}",
                   f"false_present_{tag}={pooled.said['N'] / max(1, pooled.of['N']):.3f}"]
    print(" ".join(fields + [f"labelled={n}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
