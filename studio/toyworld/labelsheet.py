"""Blind contact sheets for labelling generated images by eye, and their labels into the judge check.

    python -m studio.toyworld.labelsheet sheets RUN [RUN …] --set object+style [--method merge …] --out DIR
    (write Y / N / ? for each concept in DIR/labels.txt, looking only at DIR/sheet-*.png)
    python -m studio.toyworld.labelsheet add DIR --group g --about "what these images are"

``sheets`` draws the chosen images of one or more ``studio eval`` run folders in a seeded shuffle, so
runs and methods are mixed, and tiles them with nothing but an index: no oracle verdict, method or
prompt to lean on. ``DIR/key.json`` keeps what each index is; ``DIR/labels.txt`` has one line per
index with a ``concept=?`` slot per concept of the set. ``add`` copies the images into
``assets/judge-check`` as ``<group>-NN.png`` and appends their labels as a new group, which
``python -m studio.toyworld.judgecheck --group G`` then scores the oracles against.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from ..atomic import atomic_path, write_atomic
from .concepts import concept_kind
from .judgecheck import LABELS, MARKS

TILE = 176  # px per image on a sheet: a 64 px toy image at 2.75x, enough to see a fill
PER_SHEET = 24
COLUMNS = 6


class LabelSheetError(ValueError):
    """A labelling request or a labels file that cannot be used as it stands."""


def run_concepts(run: Path) -> dict[str, str]:
    """Adapter name -> the concept it teaches, from the run's resolved suite (a name stands for itself without one)."""
    import yaml

    path = Path(run) / "config.resolved.yaml"
    if not path.is_file():
        return {}
    adapters = (yaml.safe_load(path.read_text()) or {}).get("adapters") or {}
    items = adapters.values() if isinstance(adapters, dict) else adapters
    return {a["name"]: a.get("concept") or a["name"] for a in items if isinstance(a, dict) and "name" in a}


def select_rows(runs: list[Path], set_id: str, methods: list[str] | None = None) -> list[dict]:
    """Every row of the runs' results.jsonl for ``set_id`` (and methods whose label contains one of ``methods``),
    each with ``run`` (its folder) and ``concepts`` (the concepts its adapters teach) added."""
    rows = []
    for run in runs:
        path = Path(run) / "results.jsonl"
        if not path.is_file():
            raise LabelSheetError(f"{run} has no results.jsonl; give a finished `studio eval` run folder")
        concepts = run_concepts(run)
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["loraset_id"] == set_id and (not methods or any(m in row["method_label"] for m in methods)):
                names = set_adapters(row)
                rows.append({**row, "run": str(Path(run).resolve()),
                             "concepts": sorted(concepts.get(n, n) for n in names)})
    if not rows:
        raise LabelSheetError(f"no images of set {set_id!r}" + (f" by a method matching {methods}" if methods else "")
                              + f" in {', '.join(map(str, runs))}")
    return rows


def set_adapters(row: dict) -> list[str]:
    """The adapters whose concepts a person labels on an image of this row: those its oracle verdict names."""
    present = (row.get("metrics", {}).get("oracle") or {}).get("present")
    if not present:
        raise LabelSheetError(f"row {row.get('job_id')} has no oracle verdict naming its concepts; run the suite "
                              "with `oracle: true`")
    return sorted(present)


def write_sheets(rows: list[dict], out: Path, seed: int, limit: int | None = None) -> list[dict]:
    """Shuffle ``rows`` with ``seed``, keep ``limit``, write the sheets, the key and the labels template."""
    from PIL import Image, ImageDraw

    out = Path(out)
    if (out / "key.json").exists():
        raise LabelSheetError(f"{out} already holds a key.json; pick a new folder so no labels are overwritten")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    key = [{"index": i, "image": str(Path(r["run"]) / r["image"]), "run": r["run"], "job_id": r["job_id"],
            "set": r["loraset_id"], "method": r["method_label"], "prompt_id": r["prompt_id"],
            "concepts": r["concepts"]} for i, r in enumerate(rows)]
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(key), PER_SHEET):
        part = key[s:s + PER_SHEET]
        rows_n = (len(part) + COLUMNS - 1) // COLUMNS
        sheet = Image.new("RGB", (COLUMNS * (TILE + 4), rows_n * (TILE + 14)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, k in enumerate(part):
            x, y = (j % COLUMNS) * (TILE + 4), (j // COLUMNS) * (TILE + 14)
            with Image.open(k["image"]) as im:
                sheet.paste(im.convert("RGB").resize((TILE, TILE), Image.BICUBIC), (x, y))
            draw.text((x + 2, y + TILE + 1), str(k["index"]), fill="black")
        with atomic_path(out / f"sheet-{s // PER_SHEET}.png") as tmp:
            sheet.save(tmp, format="PNG")
    write_atomic(out / "key.json", json.dumps(key, indent=1))
    lines = ["# index concept=mark …: Y a person sees it, N does not, ? arguable; look only at the sheets"]
    lines += [f"{k['index']} " + " ".join(f"{c}=?" for c in k["concepts"]) for k in key]
    write_atomic(out / "labels.txt", "\n".join(lines) + "\n")
    return key


def read_labels(folder: Path) -> list[dict]:
    """The key's entries with the person's ``labels``; refuses a missing index, concept or unknown mark."""
    folder = Path(folder)
    key = json.loads((folder / "key.json").read_text())
    marks: dict[int, dict] = {}
    for n, line in enumerate((folder / "labels.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        idx, *pairs = line.split()
        if not idx.isdigit():
            raise LabelSheetError(f"labels.txt line {n} starts with {idx!r}; each line is an image index, then "
                                  "concept=mark pairs (e.g. 3 crescent=Y glow=N)")
        got = dict(p.partition("=")[::2] for p in pairs)
        bad = {c: m for c, m in got.items() if m not in MARKS}
        if bad:
            raise LabelSheetError(f"labels.txt line {n}: {bad}; write each concept as concept=Y, concept=N or concept=?")
        marks[int(idx)] = got
    for k in key:
        got = marks.get(k["index"])
        if got is None or set(got) != set(k["concepts"]):
            raise LabelSheetError(f"labels.txt has no complete line for image {k['index']} (concepts "
                                  f"{', '.join(k['concepts'])}); label every image before adding them")
        k["labels"] = got
    return key


def add_group(folder: Path, group: str, about: str, labels_path: Path = LABELS) -> int:
    """Copy the labelled images beside the judge check's and append them as ``group``; returns the count."""
    labels_path = Path(labels_path)
    entries = read_labels(folder)
    for k in entries:
        for concept in k["labels"]:
            try:
                concept_kind(concept)
            except KeyError:
                raise LabelSheetError(f"image {k['index']} is labelled for {concept!r}, which is not a toy-world concept "
                                      "the oracles judge; label runs whose suites name each adapter's concept") from None
    data = json.loads(labels_path.read_text())
    if group in data.get("groups", {}) or any(it.get("group") == group for it in data["images"]):
        raise LabelSheetError(f"{labels_path} already has a group {group!r}; pick an unused letter")
    if not about.strip():
        raise LabelSheetError("--about must say what the images are and how they were labelled")
    images = labels_path.parent / "images"
    width = len(str(len(entries) - 1))
    names = [f"{group}-{k['index']:0{width}d}.png" for k in entries]
    if taken := [n for n in names if (images / n).exists()]:
        raise LabelSheetError(f"{images / taken[0]} exists; pick an unused group letter")
    copied: list[Path] = []
    try:  # copied only once every name is known to be free; undone if anything fails, so a retry is not refused
        for k, name in zip(entries, names):
            with atomic_path(images / name) as tmp:
                shutil.copyfile(k["image"], tmp)
            copied.append(images / name)
            data["images"].append({"file": name, "set": k["set"], "method": k["method"], "prompt_id": k["prompt_id"],
                                   "labels": k["labels"], "group": group})
        data.setdefault("groups", {})[group] = about
        write_atomic(labels_path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise
    return len(entries)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studio.toyworld.labelsheet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("sheets", help="blind, shuffled contact sheets and a labels template")
    sh.add_argument("runs", nargs="+", help="`studio eval` run folders")
    sh.add_argument("--set", required=True, help="adapter set id, e.g. object+style")
    sh.add_argument("--method", action="append", default=None,
                    help="only methods whose label contains this, e.g. merge (repeat for several)")
    sh.add_argument("--limit", type=int, default=None, help="at most this many images (after the shuffle)")
    sh.add_argument("--seed", type=int, default=0, help="shuffle seed")
    sh.add_argument("--out", required=True, help="new folder for the sheets, key.json and labels.txt")
    ad = sub.add_parser("add", help="append a labelled folder to the judge check as a new group")
    ad.add_argument("folder")
    ad.add_argument("--group", required=True)
    ad.add_argument("--about", required=True, help="what the images are and how they were labelled")
    ad.add_argument("--labels", default=str(LABELS), help="labels file (default: the shipped judge check)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "sheets":
            key = write_sheets(select_rows([Path(r) for r in args.runs], args.set, args.method), Path(args.out),
                               args.seed, args.limit)
            pages = (len(key) + PER_SHEET - 1) // PER_SHEET
            print(f"{len(key)} images on {pages} sheet{'s' * (pages != 1)} in {args.out}; "
                  f"fill in {Path(args.out) / 'labels.txt'}")
        else:
            n = add_group(Path(args.folder), args.group, args.about, Path(args.labels))
            print(f"added {n} images as group {args.group}; score them: python -m studio.toyworld.judgecheck "
                  f"--group {args.group}")
    except (LabelSheetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
