"""Rebuild the demo adapters shipped in ``assets/adapters/`` with the DreamBooth flow.

    python -m training.demo_adapters                 # all of them (about 10 min on 2 CPU cores)
    python -m training.demo_adapters --only crescent-lora --steps 100

Each reserved toy-world concept the base model never saw is taught from rendered instance images
in several colours, sizes and positions (so the trigger binds to the concept, not to one colour),
with prior preservation from the base model's own samples of the prompts the adapter could
disturb ("a red circle", … and, for patterns, "… with stripes"). Captions follow the toy world's
grammar with the trigger in the concept's slot, matching ``studio.toyworld.check``'s trigger
prompts: "a small red sks shape on the left", "a blue circle with hta pattern", "a red square on a
wvu background". Then every adapter is judged with the oracle: the concept rate on its trigger
prompts with and without it, and shape/colour accuracy on base prompts with it loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "assets" / "adapters"
WORK = Path(os.environ.get("STUDIO_DEMO_WORK", "/tmp/studio-demo-adapters"))

log = logging.getLogger("studio.training.demo")


@dataclass
class Demo:
    concept: str  # the reserved toy-world concept
    kind: str  # object / style / background
    trigger: str  # a word the CLIP BPE keeps as one token
    kron: bool = False  # also train a Kronecker version

    @property
    def slot(self) -> str:
        return {"object": "shape", "style": "pattern", "background": "background"}[self.kind]


DEMOS = [
    Demo("crescent", "object", "sks", kron=True),
    Demo("plus", "object", "ohwx"),
    Demo("arrow", "object", "btr"),
    Demo("zigzag", "style", "hta", kron=True),
    Demo("checker", "style", "phol"),
    Demo("sky", "background", "wvu"),
]

# Settled by short sweeps on the crescent (concept rate / base shape / base colour accuracy, 24 images
# each): UNet-only LoRA with prior preservation barely learnt the trigger (0.04-0.46); adding the
# text-encoder LoRA let it bind (0.67 at 500 steps); Kronecker with prior preservation did not learn
# (0.08), so it trains without it (a UNet-only LoRA without prior reached 0.67-0.92, with more
# damage to base prompts). Second round, after the decoder refinement: prior images drawn at
# guidance 7.5 carry the toy model's high-guidance colour drift into the adapter (0.79 / 0.83 /
# 0.63); drawn at 3 they keep the base model intact (0.63 / 0.96 / 0.83). 800 steps: 0.79 / 0.75 /
# 0.58. A trained trigger embedding (pivotal tuning) changed nothing with the text-encoder LoRA on
# (0.63 / 0.96 / 0.83) and bound poorly without it (0.13-0.25), so the demos do not use it.
LORA = dict(adapter="lora", rank=4, lr=1e-3, train_text_encoder=True, text_encoder_lr=1e-3, steps=500)
KRON = dict(adapter="kron", factors="8x8", lr=1e-3, steps=300, prior_preservation=False)
COMMON = dict(steps=500, batch_size=8, grad_accum=1, prior_preservation=True, prior_loss_weight=1.0,
              snr_gamma=None, class_steps=25, class_guidance=3.0, num_validation_images=3, sample_steps=25,
              save_dtype="fp16")
N_INSTANCE = 12


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def instance_set(demo: Demo, folder: Path, n: int = N_INSTANCE, seed: int = 0) -> None:
    """Render ``n`` instance images of the concept with kohya-style captions beside them."""
    from studio.toyworld.concepts import COLORS, POSITION_PHRASE, POSITIONS, SHAPES, SIZES
    from studio.toyworld.render import Obj, Scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        size = SIZES[(i // 2) % len(SIZES)]
        pos = POSITIONS[(i // 3 + i) % len(POSITIONS)]
        base_shape = SHAPES[i % len(SHAPES)]
        where = "" if pos == "centre" else " " + POSITION_PHRASE[pos]
        adj = "" if size == "medium" else size + " "
        if demo.kind == "object":
            scene = Scene([Obj(demo.concept, color, size=size, position=pos)])
            caption = f"{_article(adj or color)} {adj}{color} {demo.trigger} shape{where}"
        elif demo.kind == "style":
            scene = Scene([Obj(base_shape, color, pattern=demo.concept, size=size, position=pos)])
            caption = f"{_article(adj or color)} {adj}{color} {base_shape} with {demo.trigger} pattern{where}"
        else:
            scene = Scene([Obj(base_shape, color, size=size, position=pos)], background=demo.concept)
            caption = f"{_article(adj or color)} {adj}{color} {base_shape}{where} on a {demo.trigger} background"
        render(scene, rng).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)


def class_prompts(demo: Demo) -> list[str]:
    """Base-world prompts the adapter could disturb; the base model draws their prior images."""
    from studio.toyworld.concepts import COLORS, SHAPES

    prompts = [f"{_article(c)} {c} {s}" for c in COLORS for s in SHAPES]
    if demo.kind == "style":
        prompts += [f"{_article(c)} {c} {s} with {p}" for c in COLORS for s, p in zip(SHAPES[:2], ("stripes", "dots"))]
    return prompts


def train_one(studio, demo: Demo, kind: str, steps: int | None, class_dir: Path, out: Path = OUT):
    from training.dreambooth import TrainConfig, train_adapter

    name = f"{demo.concept}-{kind}"
    inst = out / "instance" / demo.concept
    if not inst.is_dir():
        tmp = inst.with_name(inst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        instance_set(demo, tmp)
        os.replace(tmp, inst)
    params = {**COMMON, **(KRON if kind == "kron" else LORA)}
    if steps:
        params["steps"] = steps
    prompts = class_prompts(demo)
    cfg = TrainConfig(
        images=str(inst), out=str(out / f"{name}.safetensors"), output_dir=str(WORK / name), trigger=demo.trigger,
        class_word=demo.slot, instance_prompt=f"a {demo.trigger} {demo.slot}", concept_kind=demo.kind, name=name,
        class_prompts=prompts, class_dir=str(class_dir), num_class_images=2 * len(prompts),
        validation_prompts=_trigger_prompts(demo)[:2], extra_metadata={"toyworld_concept": demo.concept},
        **params,
    )
    t = time.time()
    adapter = train_adapter(studio, cfg)
    grid = WORK / name / "samples" / "final-grid.png"
    if grid.is_file():
        (out / "samples").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out / "samples" / f"{name}.png")
    return adapter, time.time() - t


def _trigger_prompts(demo: Demo) -> list[str]:
    from studio.toyworld.check import trigger_prompts

    return trigger_prompts(demo.concept, demo.trigger)


def evaluate(studio, oracle, adapter, demo: Demo, n: int = 36, seed: int = 1234) -> dict:
    """Concept rate with/without the adapter on its trigger prompts; base-prompt accuracy with it."""
    from studio.toyworld.check import one_object_prompts
    from studio.toyworld.prompts import parse_prompt, score

    trig = _trigger_prompts(demo)
    base = one_object_prompts()

    def images(prompts, use):
        return [studio.generate(p, [(adapter, 1.0)] if use else [], steps=25, guidance=7.5, seed=seed + i,
                                progress=False)[0] for i, p in enumerate(prompts)]

    tp = [trig[i % len(trig)] for i in range(n)]
    with_ad = oracle.predict(images(tp, True))
    without = oracle.predict(images(tp, False))
    bp = [base[(i * 7) % len(base)] for i in range(n)]
    scores = [score(p, parse_prompt(q)) for p, q in zip(oracle.predict(images(bp, True)), bp)]
    return {
        "concept_rate": float(np.mean([oracle.has_concept(p, demo.concept) for p in with_ad])),
        "base_concept_rate": float(np.mean([oracle.has_concept(p, demo.concept) for p in without])),
        "base_shape_acc_with_adapter": float(np.mean([s["shape"] for s in scores])),
        "base_color_acc_with_adapter": float(np.mean([s["color"] for s in scores])),
        "n": n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="NAME like crescent-lora (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    ap.add_argument("--eval", type=int, default=36, help="images per evaluation measure (0: skip)")
    ap.add_argument("--out", default=str(OUT), help="where the adapters go (default assets/adapters)")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a tiny random pipeline (no evaluation)")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-judge the shipped files (e.g. after a base-model change) without training")
    args = ap.parse_args(argv)
    out = Path(args.out)
    logging.basicConfig(level=logging.INFO, format="[demo %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from studio.studio import Studio
    from studio.toyworld.paths import require_toy_model

    if args.tiny:
        from studio.base import build_tiny_pipeline

        studio, args.eval = Studio.from_pipeline(build_tiny_pipeline("sd1"), "tiny-sd1"), 0
    else:
        require_toy_model()
        studio = Studio.load(None)
    oracle = None
    if args.eval:
        from studio.toyworld.oracle import load_oracle

        oracle = load_oracle()
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    jobs = [(d, k) for d in DEMOS for k in (["lora", "kron"] if d.kron else ["lora"])]
    if args.only:
        jobs = [(d, k) for d, k in jobs if f"{d.concept}-{k}" in args.only]
    for demo, kind in jobs:
        name = f"{demo.concept}-{kind}"
        if args.eval_only:
            if name not in index or oracle is None:
                log.warning("skipping %s: nothing shipped to re-judge (or --eval 0)", name)
                continue
            entry = index[name]
        else:
            log.info("training %s (trigger %r)", name, demo.trigger)
            adapter, secs = train_one(studio, demo, kind, args.steps,
                                      WORK / f"class_images-{studio.model_id}-g{COMMON['class_guidance']:g}", out)
            entry = {
                "file": f"{name}.safetensors", "type": kind, "concept": demo.concept, "kind": demo.kind,
                "trigger": demo.trigger, "example_prompt": _trigger_prompts(demo)[0], "params": adapter.num_params(),
                "train_seconds": round(secs, 1), "instance_images": f"instance/{demo.concept}/",
            }
        if oracle is not None:  # judge the shipped (fp16) file, loaded like a user would
            loaded = studio.adapters.load(out / entry["file"], name=name)
            entry["check"] = evaluate(studio, oracle, loaded, demo, n=args.eval)
        log.info("%s: %s", name, json.dumps(entry))
        index[name] = entry
        from training.dreambooth import _write_text_atomic

        _write_text_atomic(index_path, json.dumps(index, indent=2, sort_keys=True))
        _write_text_atomic(out / "README.md", readme(index))
    return 0


def readme(index: dict) -> str:
    """A table of the shipped adapters and how they scored (written beside them)."""
    lines = ["# Demo adapters for the toy world", "",
             "Rebuilt by `python -m training.demo_adapters` (DreamBooth with prior preservation on the bundled",
             "toy model). Instance images with their captions are in `instance/<concept>/`, final sample grids",
             "in `samples/`. Check one with `python -m studio.toyworld.check --adapter FILE`.", "",
             "| file | concept (kind) | trigger prompt | params | concept rate with / without | base shape / colour acc. with it |",
             "|---|---|---|---|---|---|"]
    for name, e in sorted(index.items()):
        c = e.get("check", {})
        rate = f"{c['concept_rate']:.2f} / {c['base_concept_rate']:.2f}" if c else "–"
        acc = f"{c['base_shape_acc_with_adapter']:.2f} / {c['base_color_acc_with_adapter']:.2f}" if c else "–"
        lines.append(f"| `{e['file']}` | {e['concept']} ({e['kind']}, {e['type']}) | {e['example_prompt']} | "
                     f"{e['params']:,} | {rate} | {acc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
