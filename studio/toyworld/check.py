"""Check the bundled toy model: generate held-out prompts, judge them with the oracle.

    python -m studio.toyworld.check --samples 72 --seed 0
    python -m studio.toyworld.check --samples 72 --seed 0 --adapter crescent.safetensors=crescent

``--samples N`` images for one-object prompts ("a red circle": every colour x shape) and N for
two-object prompts on named sides whose combination was held out of training. The last line is
``shape_acc=… color_acc=… both_acc=… two_object_acc=…`` (and ``concept_rate=…
base_concept_rate=…`` with adapters). ``--prompt`` checks your own prompts instead; prompts
outside the world are refused with a clear message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .concepts import ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, NOVEL_CONCEPTS, SHAPES, concept_kind
from .prompts import OutsideWorldError, parse_prompt, score
from .render import HELDOUT_PAIRS


def one_object_prompts() -> list[str]:
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for s in SHAPES for c in COLORS]


def two_object_prompts() -> list[str]:
    out = []
    for (s1, c1), (s2, c2) in HELDOUT_PAIRS:
        a1 = "an" if c1[0] in "aeiou" else "a"
        a2 = "an" if c2[0] in "aeiou" else "a"
        out.append(f"{a1} {c1} {s1} on the left and {a2} {c2} {s2} on the right")
    return out


def _cycle(prompts, n, seed):
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
    reps = (n + len(prompts) - 1) // len(prompts)
    return [prompts[order[i % len(prompts)]] for i in range(n)] if reps else []


def load_pipeline(model_dir=None):
    import torch
    from diffusers import StableDiffusionPipeline

    from .paths import require_toy_model

    folder = require_toy_model(model_dir)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                       local_files_only=True)
    except Exception as e:
        from .paths import _fail
        _fail(f"model ({type(e).__name__}: {e})", folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 12):
    """One image per prompt; image i uses seed + i, so results do not depend on batching."""
    import torch

    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        with torch.no_grad():
            out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       height=64, width=64)
        images.extend(out.images)
    return images


def _adapter_spec(spec: str):
    """'FILE' or 'FILE=CONCEPT'; the concept may also come from the file's metadata or name."""
    path, concept = spec, None
    if "=" in spec:
        left, right = spec.rsplit("=", 1)
        if right in ALL_SHAPES + ALL_PATTERNS + ALL_BACKGROUNDS:
            path, concept = left, right
    return Path(path), concept


def _adapter_info(path: Path, concept: str | None) -> tuple[str, str]:
    """-> (concept, trigger) from the CLI, the safetensors metadata or the file name."""
    meta = {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        pass
    if concept is None:
        for key in ("toyworld_concept", "concept", "studio.concept"):
            if meta.get(key) in NOVEL_CONCEPTS + SHAPES:
                concept = meta[key]
                break
    if concept is None:
        hits = [c for c in NOVEL_CONCEPTS if c in path.stem.lower()]
        if len(hits) == 1:
            concept = hits[0]
    if concept is None:
        raise OutsideWorldError(
            f"cannot tell which toy-world concept adapter {path} teaches; pass it as "
            f"--adapter {path}=CONCEPT (one of {', '.join(NOVEL_CONCEPTS)})")
    trigger = meta.get("trigger") or meta.get("studio.trigger") or "sks"
    return concept, trigger.split(",")[0].strip()


def trigger_prompts(concept: str, trigger: str) -> list[str]:
    kind = concept_kind(concept)
    if kind == "shape":
        return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {trigger} shape" for c in COLORS]
    if kind == "pattern":
        return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} with {trigger} pattern" for c in COLORS for s in SHAPES[:2]]
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} on a {trigger} background" for c in COLORS for s in SHAPES[:2]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=72, help="images per prompt category (default 72)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--adapter", action="append", default=[], metavar="FILE[=CONCEPT]",
                    help="also measure an adapter's concept on its trigger prompt (repeatable)")
    ap.add_argument("--prompt", action="append", default=[], help="check these prompts instead of the held-out set")
    ap.add_argument("--model", default=None, help="toy pipeline folder (default assets/models/toy-sd)")
    ap.add_argument("--oracle", default=None, help="oracle folder (default assets/models/oracle)")
    ap.add_argument("--save", default=None, help="write the generated images into this folder")
    ap.add_argument("--batch", type=int, default=12)
    args = ap.parse_args(argv)
    if args.samples <= 0:
        ap.error("--samples must be positive")

    try:
        custom = [parse_prompt(p) for p in args.prompt]  # refuse bad prompts before loading anything
        adapters = [(_adapter_spec(a)) for a in args.adapter]
        for path, _ in adapters:
            if not path.is_file():
                raise OutsideWorldError(f"adapter file {path} does not exist")
        adapters = [(path, *_adapter_info(path, c)) for path, c in adapters]
    except OutsideWorldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .oracle import load_oracle
    from .paths import ToyModelMissingError

    try:
        pipe = load_pipeline(args.model)
        oracle = load_oracle(args.oracle)
    except ToyModelMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    def run(prompts, seed, tag, triggers=None, gen=None):
        exps = [parse_prompt(p, triggers) for p in prompts]
        imgs = (gen or (lambda ps, s: generate(pipe, ps, s, args.steps, args.guidance, args.batch)))(prompts, seed)
        preds = oracle.predict(imgs)
        if save:
            for i, (im, p) in enumerate(zip(imgs, prompts)):
                im.save(save / f"{tag}-{i:03d}-{p.replace(' ', '_')[:60]}.png")
        return [score(pr, e) for pr, e in zip(preds, exps)], preds

    def mean(xs):
        return sum(xs) / max(1, len(xs))

    if custom:
        prompts = _cycle(args.prompt, args.samples, args.seed)
        res, _ = run(prompts, args.seed, "custom")
        for p in args.prompt:
            r = [x for x, q in zip(res, prompts) if q == p]
            print(f"{p!r}: all_attributes={mean([x['all'] for x in r]):.3f} shape={mean([x['shape'] for x in r]):.3f} "
                  f"color={mean([x['color'] for x in r]):.3f} (n={len(r)})")
        print(f"all_acc={mean([x['all'] for x in res]):.3f} shape_acc={mean([x['shape'] for x in res]):.3f} "
              f"color_acc={mean([x['color'] for x in res]):.3f}")
        return 0

    one = _cycle(one_object_prompts(), args.samples, args.seed)
    two = _cycle(two_object_prompts(), args.samples, args.seed + 1)
    r1, _ = run(one, args.seed * 1000003, "one")
    r2, _ = run(two, args.seed * 1000003 + 500000, "two")
    shape_acc, color_acc, both_acc = (mean([x[k] for x in r1]) for k in ("shape", "color", "both"))
    two_acc = mean([x["all"] for x in r2])
    print(f"one object ({len(one)} images, {len(set(one))} prompts): shape {shape_acc:.3f} colour {color_acc:.3f} both {both_acc:.3f}")
    print(f"two objects on named sides ({len(two)} images, {len(set(two))} held-out prompts): {two_acc:.3f}")
    line = f"shape_acc={shape_acc:.3f} color_acc={color_acc:.3f} both_acc={both_acc:.3f} two_object_acc={two_acc:.3f}"

    if adapters:
        try:
            from studio import Studio
        except Exception as e:  # pragma: no cover - depends on the studio package
            print(f"error: adapters need studio.Studio, which failed to import: {e}", file=sys.stderr)
            return 2
        studio = Studio.load(args.model) if args.model else Studio.load()
        rates, base_rates = [], []
        for path, concept, trigger in adapters:
            ad = studio.adapters.load(str(path))
            prompts = _cycle(trigger_prompts(concept, trigger), args.samples, args.seed)
            trig = {trigger: concept}

            def gen_with(ps, s, name=ad.name):
                return [studio.generate(p, adapters=[name], steps=args.steps, guidance=args.guidance,
                                        seed=s + i, num_images=1, progress=False)[0] for i, p in enumerate(ps)]

            _, preds = run(prompts, args.seed, f"adapter-{ad.name}", trig, gen_with)
            rate = mean([oracle.has_concept(p, concept) for p in preds])
            _, bpreds = run(prompts, args.seed, f"base-{ad.name}", trig)
            base_rate = mean([oracle.has_concept(p, concept) for p in bpreds])
            print(f"adapter {ad.name} ({concept}, trigger {trigger!r}): concept_rate {rate:.3f}, without it {base_rate:.3f}")
            rates.append(rate)
            base_rates.append(base_rate)
        line += f" concept_rate={mean(rates):.3f} base_concept_rate={mean(base_rates):.3f}"
    print(f"({time.time() - t0:.0f} s, {args.steps} steps, guidance {args.guidance})")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
