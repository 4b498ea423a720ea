"""What a perfect composition would score on a toy-world suite: exact renders, through the VAE, judged.

    python -m studio.toyworld.ceiling [SUITE] [--per-prompt 16] [--seed 9090] [--model DIR]

For every (prompt, adapter set) of a suite (default ``workflows/toy-compose.yaml``) it renders scenes
that show exactly what the prompt asks, with each trigger read as its adapter's concept ("a red sks
shape with kpk pattern" -> a red crescent with a glow fill; unnamed sizes, colours and sides drawn at
random), encodes and decodes them with the toy VAE (posterior mean), and asks both oracles whether
every concept of the set is there, as the benchmark does. A method cannot beat this number by
drawing the concepts well: where it is low, the latent loses the concept or the judge misses it, and
the benchmark's cell says more about the world than about the method. The last line is
``min_ceiling=… worst=<set> ceiling_<set>=…`` (``oracle``'s all-present rate per set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_SUITE = Path(__file__).resolve().parents[2] / "workflows" / "toy-compose.yaml"


def trigger_concepts(suite) -> dict[str, str]:
    """{"sks": "crescent", ...}: each adapter's trigger word (its phrase without "a", "shape", …)."""
    generic = {"a", "an", "shape", "pattern", "background", "with", "on"}
    out = {}
    for entry in suite.adapters.values():
        words = [w for w in (entry.trigger or "").lower().split() if w not in generic]
        if entry.concept and len(words) == 1:
            out[words[0]] = entry.concept
    return out


def perfect_scene(exp, rng):
    """A Scene showing exactly what an Expectation asks; what it leaves open is drawn at random."""
    from .concepts import COLORS, SHAPES, SIZES
    from .render import Obj, Scene

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    objs = []
    for o in exp.objects:
        position = o.position or ("centre" if len(exp.objects) == 1 else pick(("left", "right")))
        size = o.size or pick(SIZES if len(exp.objects) == 1 else SIZES[:2])
        objs.append(Obj(o.shape or pick(SHAPES), o.color or pick(COLORS), pattern=o.pattern or "solid",
                        position=position, size=size))
    return Scene(objs, exp.background or "plain")


def suite_ceiling(suite, vae, oracles: dict, per_prompt: int = 16, seed: int = 9090) -> dict[str, dict]:
    """{set_id: {"n": images, judge: images with every concept of the set present}} for each judge."""
    import numpy as np

    from .audit import roundtrip
    from .prompts import parse_prompt
    from .render import render

    triggers = trigger_concepts(suite)
    sets = dict(suite.sets)
    out: dict[str, dict] = {}
    rng = np.random.default_rng(seed)
    for prompt_id, text in suite.prompts:
        exp = parse_prompt(text, triggers)
        for set_id in suite.prompt_sets.get(prompt_id, list(sets)):
            concepts = [suite.adapters[n].concept for n in sets[set_id] if suite.adapters[n].concept]
            scenes = [perfect_scene(exp, rng) for _ in range(per_prompt)]
            images = roundtrip(vae, [render(s, rng) for s in scenes])
            row = out.setdefault(set_id, {"n": 0, **{name: 0 for name in oracles}})
            row["n"] += len(images)
            for name, oracle in oracles.items():
                preds = oracle.predict(images)
                row[name] += sum(all(oracle.has_concept(p, c) for c in concepts) for p in preds)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="?", default=str(DEFAULT_SUITE), help="a toy-world suite YAML")
    ap.add_argument("--per-prompt", type=int, default=16, help="renders per (prompt, adapter set)")
    ap.add_argument("--seed", type=int, default=9090)
    ap.add_argument("--model", default=None, help="toy model folder (default: the bundled one)")
    args = ap.parse_args(argv)
    if args.per_prompt < 1:
        ap.error("--per-prompt must be at least 1")
    from diffusers import AutoencoderKL

    from studio.composition_report import wilson
    from studio.evaluation import _load_oracle, load_suite

    from .paths import require_toy_model

    suite = load_suite(args.suite)
    vae = AutoencoderKL.from_pretrained(str(require_toy_model(args.model)), subfolder="vae").float().eval()
    oracles = {"oracle": _load_oracle("on"), "oracle-b": _load_oracle("auto", second=True)}
    oracles = {name: o for name, o in oracles.items() if o is not None}
    table = suite_ceiling(suite, vae, oracles, args.per_prompt, args.seed)
    print(f"{'set':28s} {'n':>4s}  " + "  ".join(f"{name:>22s}" for name in oracles))
    for set_id, row in table.items():
        cells = []
        for name in oracles:
            lo, hi = wilson(row[name], row["n"])
            cells.append(f"{row[name] / row['n']:.2f} [{lo:.2f}, {hi:.2f}]".rjust(22))
        print(f"{set_id:28s} {row['n']:4d}  " + "  ".join(cells))
    rates = {s: r["oracle"] / r["n"] for s, r in table.items()}
    worst = min(rates, key=rates.get)
    print(f"min_ceiling={rates[worst]:.3f} worst={worst} "
          + " ".join(f"ceiling_{s.replace('+', '_')}={v:.3f}" for s, v in rates.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
