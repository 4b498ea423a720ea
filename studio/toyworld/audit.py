"""Audit the oracles on images whose truth is known by construction.

    python -m studio.toyworld.audit --out runs/audit

Builds an audit set (exact renders, VAE round trips of single and composed scenes, and corrupted
scenes: noised, blended, tinted, cut to a fragment, chipped, blobs, four-point stars, pure noise
and colour washes; see corrupt.py), writes it to ``--out`` (``images/*.png`` and ``truth.jsonl``), and prints, for each
oracle, per-concept precision and recall of "present" and the false-present rate on noise and
washes. Then it draws composed images with the toy model and reports how often the two oracles
agree, image by image. The last line is

    min_precision=… min_recall=… noise_false_present=… drawn_false_reserved=… agreement=… roundtrip_min_recall=…

for the shipped oracle (the worst concept's precision and recall over the whole set, the share of
noise / wash images where anything is called present, the share of base-model drawings of
prompts naming reserved concepts where one is called present, the two oracles' agreement on generated
composed images, and the worst concept's recall on clean renders and their round trips). Seeds
(5151 and up) are disjoint from the oracles' training seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.atomic import atomic_path, write_atomic

from .concepts import ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS

CONCEPTS = ALL_SHAPES + COLORS + ALL_PATTERNS + ALL_BACKGROUNDS


def build_set(per_kind: int, seed: int, vae=None, pipe=None) -> list[tuple[str, object, object]]:
    """[(name, image, Truth)]: ``per_kind`` images of every corrupt.KINDS kind, plus VAE round
    trips of clean and composed scenes when ``vae`` is given, plus base-model drawings of prompts
    that name reserved concepts (kind "drawn": no reserved concept there) when ``pipe`` is given."""
    import numpy as np

    from .corrupt import KINDS, Truth, sample
    from .render import render, sample_any_scene

    rng = np.random.default_rng(seed)
    out = []
    for kind in KINDS:
        for i in range(per_kind):
            im, truth = sample(rng, kind)
            out.append((f"{kind}-{i:03d}", im, truth))
    if vae is not None:
        for kind, p_two in (("roundtrip", 0.4), ("roundtrip_composed", 1.0)):
            scenes = [sample_any_scene(rng, p_two=p_two) for _ in range(per_kind)]
            images = roundtrip(vae, [render(s, rng) for s in scenes])
            out += [(f"{kind}-{i:03d}", im, Truth.of_scene(s, kind)) for i, (im, s) in enumerate(zip(images, scenes))]
    if pipe is not None:
        from .check import generate
        from .corrupt import drawn_prompts

        images = generate(pipe, drawn_prompts(rng, per_kind), seed + 200, 25, 3.0)
        out += [(f"drawn-{i:03d}", im, Truth.drawn()) for i, im in enumerate(images)]
    return out


def roundtrip(vae, images):
    """Encode and decode PIL images with a diffusers VAE (posterior mean)."""
    import numpy as np
    import torch
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    arr = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def tally(oracle, items) -> dict:
    """Per-concept precision / recall of "present", overall and on clean renders and round
    trips, and the false-present rate on images that hold nothing."""
    from .corrupt import NOTHING_KINDS

    from .concepts import NOVEL_CONCEPTS

    preds = oracle.predict([im for _, im, _ in items])
    counts = {c: {"tp": 0, "fp": 0, "fn": 0, "tp_clean": 0, "fn_clean": 0} for c in CONCEPTS}
    nothing, nothing_hit, drawn, drawn_hit = 0, 0, 0, 0
    for (_, _, truth), pred in zip(items, preds):
        said = oracle.concepts(pred, judge_color=truth.judge_color)
        if truth.reserved_absent_only:
            drawn += 1
            drawn_hit += bool(said & set(NOVEL_CONCEPTS))
            continue
        true = truth.concepts()
        clean = truth.kind in ("clean", "roundtrip", "roundtrip_composed")
        for c in CONCEPTS:
            if c in COLORS and not truth.judge_color:
                continue
            t, p = c in true, c in said
            counts[c]["tp"] += t and p
            counts[c]["fp"] += p and not t
            counts[c]["fn"] += t and not p
            if clean:
                counts[c]["tp_clean"] += t and p
                counts[c]["fn_clean"] += t and not p
        if truth.kind in NOTHING_KINDS:
            nothing += 1
            nothing_hit += bool(said)
    def ratio(a, b):  # None where nothing was called / nothing was there
        return a / b if b else None

    rows = {}
    for c, k in counts.items():
        rows[c] = {"precision": ratio(k["tp"], k["tp"] + k["fp"]), "recall": ratio(k["tp"], k["tp"] + k["fn"]),
                   "clean_recall": ratio(k["tp_clean"], k["tp_clean"] + k["fn_clean"]),
                   "support": k["tp"] + k["fn"]}
    return {"concepts": rows, "noise_false_present": nothing_hit / max(1, nothing),
            "drawn_false_reserved": drawn_hit / drawn if drawn else None, "preds": preds}


def composed_prompts(n: int, seed: int) -> list[str]:
    """Composed base-world prompts (object + object, + background, + fill) in the three forms."""
    from .check import CEILING_KINDS, ceiling_prompts

    per = (n + len(CEILING_KINDS) - 1) // len(CEILING_KINDS)
    prompts = [p for k, kind in enumerate(CEILING_KINDS) for p, _ in ceiling_prompts(kind, per, seed + k)]
    return prompts[:n]


def agreement(a, b, images) -> float:
    """Share of images on which two oracles call exactly the same concepts present."""
    return a.same_concepts(a.predict(images), b.predict(images)) / max(1, len(images))


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _worst(rows, key: str) -> str:
    vals = [r[key] for r in rows if r[key] is not None]
    return _f(min(vals) if vals else None)


def _write_set(out: Path, items) -> None:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, im, _ in items:
        with atomic_path(img_dir / f"{name}.png") as tmp:
            im.save(tmp, format="PNG")
    write_atomic(out / "truth.jsonl",
                 "".join(json.dumps({"image": f"images/{n}.png", **t.to_dict()}) + "\n" for n, _, t in items))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the audit set and its report")
    ap.add_argument("--per-kind", type=int, default=48,
                    help="images per kind (11 kinds: default 48 -> 528 images)")
    ap.add_argument("--generated", type=int, default=96,
                    help="composed images drawn by the toy model for the oracles' agreement (default 96)")
    ap.add_argument("--seed", type=int, default=5151, help="audit seed (default 5151; training used others)")
    ap.add_argument("--prompt", action="append", default=[],
                    help="draw these prompts for the agreement instead of the built-in composed set")
    ap.add_argument("--model", default=None, help="toy pipeline folder (default assets/models/toy-sd)")
    ap.add_argument("--oracle", default=None, help="oracle folder (default assets/models/oracle)")
    ap.add_argument("--oracle-b", default=None, help="second oracle folder (default assets/models/oracle-b)")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance for the generated images (default 3)")
    args = ap.parse_args(argv)
    if args.per_kind <= 0 or args.generated < 0:
        ap.error("--per-kind must be positive and --generated not negative")

    from .check import generate, load_pipeline
    from .oracle import load_oracle
    from .paths import ORACLE_B_DIR, ToyModelMissingError
    from .prompts import OutsideWorldError, parse_prompt

    try:
        for p in args.prompt:
            parse_prompt(p)
        pipe = load_pipeline(args.model)
        oracle = load_oracle(args.oracle)
        oracle_b = load_oracle(args.oracle_b or ORACLE_B_DIR)
    except (OutsideWorldError, ToyModelMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    pipe.vae.float()
    items = build_set(args.per_kind, args.seed, pipe.vae, pipe)
    _write_set(out, items)
    print(f"audit set: {len(items)} images in {out}")
    results = {}
    for name, orc in (("oracle", oracle), ("oracle-b", oracle_b)):
        r = tally(orc, items)
        results[name] = r
        print(f"\n{name}: concept precision / recall / recall on clean renders and round trips (support)")
        for c, row in r["concepts"].items():
            print(f"  {c:10s} {_f(row['precision'])} / {_f(row['recall'])} / {_f(row['clean_recall'])} ({row['support']})")
        print(f"  false present on noise and washes: {r['noise_false_present']:.3f}")
        print(f"  a reserved concept called present on base-model drawings of reserved words: "
              f"{_f(r['drawn_false_reserved'])}")
    same = oracle.same_concepts(results["oracle"]["preds"], results["oracle-b"]["preds"]) / len(items)
    print(f"\noracles agree on {same:.3f} of the audit set")
    prompts = args.prompt or composed_prompts(args.generated, args.seed + 1)
    agree = None
    if prompts:
        gen = generate(pipe, prompts, args.seed + 100, 25, args.guidance)
        agree = agreement(oracle, oracle_b, gen)
        print(f"oracles agree on {agree:.3f} of {len(gen)} generated composed images (guidance {args.guidance:g})")
    rows = results["oracle"]["concepts"].values()
    report = {k: {c: v for c, v in r["concepts"].items()} | {"noise_false_present": r["noise_false_present"],
                                                              "drawn_false_reserved": r["drawn_false_reserved"]}
              for k, r in results.items()}
    report["agreement_generated"] = agree
    report["agreement_audit_set"] = same
    write_atomic(out / "audit.json", json.dumps(report, indent=2))
    line = (f"min_precision={_worst(rows, 'precision')} min_recall={_worst(rows, 'recall')} "
            f"noise_false_present={results['oracle']['noise_false_present']:.3f} "
            f"drawn_false_reserved={_f(results['oracle']['drawn_false_reserved'])} agreement={_f(agree)} "
            f"roundtrip_min_recall={_worst(rows, 'clean_recall')}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
