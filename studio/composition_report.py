"""Composition tables from an evaluation run: which method keeps every concept of a set.

    python -m studio.composition_report runs/toy-compose [--markdown docs/part.md]

Reads ``results.jsonl`` (rows with ``metrics.oracle``) and prints, per adapter set (pair type)
and method: the all-present rate with its 95 % Wilson interval, the same by the second oracle,
how often the two oracles agree, each concept's rate, median seconds per image and UNet calls;
then per phrasing form (prompt ids ending in ``-sentence``, ``-tags``, ``-and``), and for each set
which methods' intervals overlap the best one's (those the run cannot tell apart).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

FORMS = ("sentence", "tags", "and")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k / n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]" if n else "–"


def judged(rows: list[dict]) -> list[dict]:
    """The rows the oracle gave a verdict on."""
    return [r for r in rows if r.get("metrics", {}).get("oracle", {}).get("all_present") is not None]


def _all_present(rows: list[dict]) -> int:
    return sum(bool(r["metrics"]["oracle"]["all_present"]) for r in rows)


def read_rows(run: Path) -> list[dict]:
    path = run / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the folder of a finished `studio eval` run")
    return judged([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def cells(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(loraset_id, method_label) -> rows, in first-seen order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["loraset_id"], r["method_label"]), []).append(r)
    return out


def form_of(prompt_id: str) -> str | None:
    tail = prompt_id.rsplit("-", 1)[-1]
    return tail if tail in FORMS else None


def summarize_cell(rows: list[dict]) -> dict:
    o = [r["metrics"]["oracle"] for r in rows]
    n = len(o)
    k = _all_present(rows)
    b = [x for x in o if x.get("agree") is not None]
    concepts: dict[str, list[bool]] = {}
    for x in o:
        for name, v in x["present"].items():
            if v is not None:
                concepts.setdefault(name, []).append(bool(v))
    return {
        "n": n, "k": k, "interval": wilson(k, n),
        "k_b": sum(bool(x["all_present_b"]) for x in b), "n_b": len(b),
        "agree": sum(bool(x["agree"]) for x in b) / len(b) if b else None,
        "concepts": {c: sum(v) / len(v) for c, v in concepts.items()},
        "seconds": statistics.median(r["timing"]["seconds"] for r in rows),
        "unet_calls": statistics.median(r["timing"].get("unet_calls") or 0 for r in rows),
    }


def overlap_note(per_method: dict[str, dict]) -> str:
    """Which methods' intervals overlap the best method's interval."""
    best = max(per_method, key=lambda m: (per_method[m]["k"] / max(1, per_method[m]["n"])))
    lo_b, hi_b = per_method[best]["interval"]
    tied = [m for m in per_method if m != best and per_method[m]["interval"][1] >= lo_b]
    behind = [m for m in per_method if m != best and m not in tied]
    text = f"best: **{best}**"
    text += f"; not separable from it (intervals overlap): {', '.join(tied)}" if tied else "; every other method is separated"
    if behind and tied:
        text += f"; below it: {', '.join(behind)}"
    return text


def markdown(rows: list[dict]) -> str:
    by_cell = cells(rows)
    sets = list(dict.fromkeys(s for s, _ in by_cell))
    lines = []
    for s in sets:
        methods = [m for (ss, m) in by_cell if ss == s]
        summ = {m: summarize_cell(by_cell[(s, m)]) for m in methods}
        names = list(dict.fromkeys(c for m in methods for c in summ[m]["concepts"]))
        lines += [f"### {s}", "",
                  "| method | images | all present [95 % CI] | oracle B | oracles agree | "
                  + " | ".join(names) + " | s / image | UNet calls |",
                  "|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
        for m in methods:
            c = summ[m]
            b = _rate(c["k_b"], c["n_b"])
            agree = f"{c['agree']:.2f}" if c["agree"] is not None else "–"
            per = " | ".join(f"{c['concepts'].get(x, float('nan')):.2f}" for x in names)
            lines.append(f"| {m} | {c['n']} | {_rate(c['k'], c['n'])} | {b} | {agree} | {per} | "
                         f"{c['seconds']:.3f} | {c['unet_calls']:.0f} |")
        forms = [f for f in FORMS if any(form_of(r["prompt_id"]) == f for m in methods for r in by_cell[(s, m)])]
        if forms:
            lines += ["", "| method | " + " | ".join(f"all present, {f} form" for f in forms) + " |",
                      "|---|" + "---|" * len(forms)]
            for m in methods:
                parts = []
                for f in forms:
                    rr = [r for r in by_cell[(s, m)] if form_of(r["prompt_id"]) == f]
                    parts.append(_rate(_all_present(rr), len(rr)))
                lines.append(f"| {m} | " + " | ".join(parts) + " |")
        lines += ["", overlap_note(summ), ""]
    return "\n".join(lines)


def _wrap(text: str, width_of, width: float) -> list[str]:
    """``text`` in lines no wider than ``width``, broken before "[", "(" and spaces (a word wider than
    the line gets a line of its own)."""
    lines: list[str] = []
    for piece in re.split(r"(?=[\[( ])", text):
        if lines and width_of(lines[-1] + piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece.lstrip())
    return lines or [""]


def picture_grid(run: Path, rows: list[dict], form: str = "sentence", sample: int = 0, cell: int = 128):
    """One image per (set, method): sets down, methods across, the ``form`` prompt's ``sample``-th
    seed (the same seed for every method of a set). Returns a PIL image."""
    from PIL import Image, ImageDraw

    pick = {}
    for r in rows:
        if form_of(r["prompt_id"]) in (form, None) and r.get("sample_idx", 0) == sample:
            pick.setdefault((r["loraset_id"], r["method_label"]), r)
    sets = list(dict.fromkeys(s for s, _ in pick))
    methods = list(dict.fromkeys(m for _, m in pick))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = [_wrap(m, measure.textlength, cell - 8) for m in methods]  # long labels, e.g. "clora[plus=1.25] cfg 5"
    label_w, head_h = 150, 8 + 12 * max(len(h) for h in heads)
    grid = Image.new("RGB", (label_w + cell * len(methods), head_h + cell * len(sets)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(heads):
        draw.multiline_text((label_w + j * cell + 4, 4), "\n".join(lines), fill="black", spacing=2)
    for i, s in enumerate(sets):
        draw.text((4, head_h + i * cell + cell // 2 - 6), s[:24], fill="black")
        for j, m in enumerate(methods):
            r = pick.get((s, m))
            if r is None:
                continue
            with Image.open(run / r["image"]) as im:
                grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + j * cell, head_h + i * cell))
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder of `studio eval` (holds results.jsonl)")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file (atomically)")
    ap.add_argument("--grid", default=None, metavar="PNG",
                    help="also write a picture grid: sets down, methods across, one seed, sentence form")
    args = ap.parse_args(argv)
    try:
        rows = read_rows(Path(args.run))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no rows with oracle verdicts in {args.run}/results.jsonl (run the suite with metrics: [oracle])",
              file=sys.stderr)
        return 2
    text = markdown(rows)
    print(text)
    from .atomic import write_atomic

    if args.markdown:
        write_atomic(Path(args.markdown), text + "\n")
    if args.grid:
        import io

        buf = io.BytesIO()
        picture_grid(Path(args.run), rows).save(buf, format="PNG")
        write_atomic(Path(args.grid), buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
