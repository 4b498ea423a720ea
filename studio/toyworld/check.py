"""Check the bundled toy model: generate held-out prompts, judge them with the oracle.

    python -m studio.toyworld.check --samples 72 --seed 0
    python -m studio.toyworld.check --samples 72 --seed 0 --adapter crescent.safetensors=crescent

``--samples N`` images for one-object prompts ("a red circle": every colour x shape) and N for
two-object prompts on named sides whose combination was held out of training. The last line is
``shape_acc=… color_acc=… both_acc=… two_object_acc=… background_acc=… form_acc_sentence=…
form_acc_tags=… form_acc_and=… ceiling_object_object=… ceiling_object_background=…
ceiling_object_style=… ceiling_n3=…``. With ``--adapter`` it adds ``concept_rate_sentence=…
concept_rate_tags=… concept_rate_and=… concept_rate=… base_concept_rate=… concept_rate_beside=… leak=…
leak_pixels=…`` (``concept_rate_beside``: the concept beside a base object, as a composed prompt asks for it;
for an object adapter ``fill_rate``: the concept drawn in the base fill the prompt asks for, which a style needs)
and, with ``--with F2 [F3 …]``, ``survival=…`` and ``survival_beside=…`` (one-object prompts, and the
concept beside a base object; over several adapters: the worst of each). When the
second oracle (assets/models/oracle-b) is there, ``oracle_agreement=…`` ends the line: the share of
all generated images on which the two oracles call exactly the same concepts present.
Every prompt set has its own fixed seed, disjoint from the training and selection seeds.
``--prompt`` checks your own prompts instead; prompts outside the world are refused with the list
of words the world knows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .concepts import (
    ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, FORMS, NOVEL_CONCEPTS, PATTERNS, SHAPES, concept_kind,
)
from .prompts import OutsideWorldError, parse_prompt, score
from .render import HELDOUT_PAIRS, _article


def one_object_prompts() -> list[str]:
    return [f"{_article(c)} {c} {s}" for s in SHAPES for c in COLORS]


def two_object_prompts() -> list[str]:
    out = []
    for (s1, c1), (s2, c2) in HELDOUT_PAIRS:
        a1, a2 = _article(c1), _article(c2)
        out.append(f"{a1} {c1} {s1} on the left and {a2} {c2} {s2} on the right")
    return out


def _scene_prompts(seed: int, n: int, make) -> list:
    """n items ``make(rng, i)`` from a fixed seed (disjoint from training's)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [make(rng, i) for i in range(n)]


def background_prompts(n: int, seed: int) -> list[str]:
    """One object on each base background, in the sentence form."""
    from .concepts import BACKGROUNDS

    def make(rng, i):
        s, c, b = (x[int(rng.integers(len(x)))] for x in (SHAPES, COLORS, BACKGROUNDS[1:]))
        return f"{_article(c)} {c} {s} on a {b} background"
    return _scene_prompts(seed, n, make)


def form_prompts(form: str, n: int, seed: int) -> list[str]:
    """Complete captions of random base-world scenes (one or two objects, fills, backgrounds) in
    one phrasing form."""
    from .render import caption_in_form, sample_base_scene

    return _scene_prompts(seed, n, lambda rng, i: caption_in_form(sample_base_scene(rng), form))


# Base-concept analogues of the composition pair types: what an adapter pair asks for, with base
# concepts the model already knows. Their all-present rate is the ceiling a composition can hope for.
def ceiling_prompts(kind: str, n: int, seed: int) -> list[tuple[str, list[str]]]:
    """n (prompt, concepts that must be present) for a pair type, cycling the three forms."""
    from .concepts import BACKGROUNDS, PATTERNS
    from .render import Obj, Scene, caption_in_form

    def make(rng, i):
        form = FORMS[i % 3]
        s1, s2 = (SHAPES[int(j)] for j in rng.choice(len(SHAPES), 2, replace=False))
        c1, c2 = (COLORS[int(j)] for j in rng.choice(len(COLORS), 2, replace=False))
        bg = BACKGROUNDS[1 + int(rng.integers(len(BACKGROUNDS) - 1))]
        pat = PATTERNS[1 + int(rng.integers(len(PATTERNS) - 1))]
        k = kind if kind != "n3" else ("object_background_style", "object_object_background")[int(rng.integers(2))]
        if k == "object_object":
            sc, need = Scene([Obj(s1, c1, position="left"), Obj(s2, c2, position="right")]), [s1, s2]
        elif k == "object_background":
            sc, need = Scene([Obj(s1, c1)], bg), [s1, bg]
        elif k == "object_style":
            sc, need = Scene([Obj(s1, c1, pat)]), [s1, pat]
        elif k == "object_background_style":
            sc, need = Scene([Obj(s1, c1, pat)], bg), [s1, pat, bg]
        else:
            sc, need = Scene([Obj(s1, c1, position="left"), Obj(s2, c2, position="right")], bg), [s1, s2, bg]
        return caption_in_form(sc, form), need
    return _scene_prompts(seed, n, make)


def _load_once(studio, path, names: dict) -> str:
    """Load ``path`` into the studio's library under a name no other file of this run holds
    (its stem, or its stem with a number); the same file twice keeps one name."""
    from studio.adapters.library import safe_name

    key = str(Path(path).resolve())
    if key not in names:
        stem = name = safe_name(Path(path).stem)
        k = 2
        while name in names.values():
            name, k = f"{stem}-{k}", k + 1
        names[key] = studio.adapters.load(str(path), name=name).name
    return names[key]


CEILING_KINDS = ("object_object", "object_background", "object_style", "n3")


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


def trigger_prompts(concept: str, trigger: str, form: str = "sentence") -> list[str]:
    """Prompts that ask for an adapter's concept through its trigger, in one phrasing form.

    A style is asked for on every base shape (each colour with each shape once, in blocks of six
    that each hold every shape): on circles and squares alone a glow read 1.00
    where it reached 0.58-0.83 on stars, triangles, diamonds and hearts (session 18)."""
    kind = concept_kind(concept)
    base_bg = ("grass", "water", "sand", "night")
    if kind == "pattern":
        pairs = [(COLORS[i % len(COLORS)], SHAPES[(i + i // len(COLORS)) % len(SHAPES)])
                 for i in range(len(COLORS) * len(SHAPES))]
    else:
        pairs = [(c, s) for c in COLORS for s in (SHAPES[:2] if kind != "shape" else SHAPES[:1])]
    out = []
    for i, (c, s) in enumerate(pairs):
        a = _article(c)
        subject = f"{c} {trigger} shape" if kind == "shape" else f"{c} {s}"
        if kind == "pattern":
            subject += f" with {trigger} pattern"
        if kind == "background":
            out.append({"sentence": f"{a} {subject} on a {trigger} background", "tags": f"{subject}, {trigger} background",
                        "and": f"{a} {subject} on {trigger}"}[form])
        else:  # the "and" form puts the concept on a base background ("... on grass")
            out.append({"sentence": f"{a} {subject}", "tags": subject,
                        "and": f"{a} {subject} on {base_bg[i % len(base_bg)]}"}[form])
    return out


def beside_prompts(concept: str, trigger: str, form: str = "sentence") -> list[str]:
    """Prompts that ask for an adapter's concept beside a base object, in one phrasing form: every
    base shape as the companion, in another colour, the concept on the left and on the right
    ("a red circle on the left and a blue sks shape on the right"), as composed prompts ask for it."""
    from .prompts import with_trigger
    from .render import Obj, Scene, caption_in_form

    kind = concept_kind(concept)
    base_bg = ("grass", "water", "sand", "night")
    out = []
    for i in range(2 * len(COLORS)):
        color, other_color = COLORS[i % len(COLORS)], COLORS[(i + 1 + i // len(COLORS)) % len(COLORS)]
        sides = ("left", "right") if i % 2 == 0 else ("right", "left")
        main = Obj(concept if kind == "shape" else SHAPES[i % len(SHAPES)], color,
                   pattern=concept if kind == "pattern" else "solid", position=sides[0])
        companion = Obj(SHAPES[(i + 2 + i // len(SHAPES)) % len(SHAPES)], other_color, position=sides[1])
        objs = [main, companion] if i % 2 == 0 else [companion, main]  # named left to right
        bg = concept if kind == "background" else (base_bg[i % len(base_bg)] if form == "and" else "plain")
        out.append(with_trigger(caption_in_form(Scene(objs, bg), form), concept, trigger))
    return out


def fill_prompts(concept: str, trigger: str, n: int) -> list[tuple[str, str]]:
    """(prompt, fill) pairs that ask for an object adapter's concept in a base fill, in every colour
    ("a red sks shape with stripes"). An object adapter that draws these solid will also paint over a
    style adapter's fill: composed with a style, the object keeps its own fill (session 31)."""
    from .prompts import with_trigger
    from .render import Obj, Scene, caption_in_form

    fills = [f for f in PATTERNS if f != "solid"]
    out = []
    for i in range(n):
        color, fill = COLORS[i % len(COLORS)], fills[(i // len(COLORS)) % len(fills)]
        caption = caption_in_form(Scene([Obj(concept, color, pattern=fill)], "plain"), "sentence")
        out.append((with_trigger(caption, concept, trigger), fill))
    return out


def beside_prompts_in_turn(concept: str, trigger: str, n: int) -> list[str]:
    """``n`` beside-prompts, the three phrasing forms in turn."""
    per_form = [beside_prompts(concept, trigger, form) for form in FORMS]
    return [per_form[i % len(FORMS)][(i // len(FORMS)) % len(per_form[0])] for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=72, help="images per prompt category (default 72)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0, help="default 3, the toy model's shipped guidance")
    ap.add_argument("--adapter", action="append", default=[], metavar="FILE[=CONCEPT]",
                    help="also measure an adapter: its concept rate in each phrasing form, its leak into prompts "
                         "without its trigger, and (with --with) its survival beside other adapters (repeatable)")
    ap.add_argument("--with", dest="with_", nargs="+", default=[], metavar="FILE",
                    help="other adapters loaded beside each --adapter for survival= and survival_beside= (merge, "
                         "only the first's trigger in the prompt)")
    ap.add_argument("--skip-base", action="store_true", help="with --adapter: skip the base model's own measures")
    ap.add_argument("--prompt", action="append", default=[], help="check these prompts instead of the held-out set")
    ap.add_argument("--model", default=None, help="toy pipeline folder (default assets/models/toy-sd)")
    ap.add_argument("--oracle", default=None, help="oracle folder (default assets/models/oracle)")
    ap.add_argument("--oracle-b", default=None,
                    help="second oracle for the agreement (default assets/models/oracle-b with the shipped oracle)")
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
        missing = [f for f in args.with_ if not Path(f).is_file()]
        if missing:
            raise OutsideWorldError(f"adapter file {missing[0]} (--with) does not exist")
        if args.with_ and not adapters:
            raise OutsideWorldError("--with needs at least one --adapter to measure")
    except OutsideWorldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .oracle import load_oracle
    from .paths import ToyModelMissingError

    try:
        pipe = load_pipeline(args.model)
        oracle = load_oracle(args.oracle)
        from .paths import ORACLE_B_DIR

        second = args.oracle_b or (ORACLE_B_DIR if not args.oracle and ORACLE_B_DIR.is_dir() else None)
        oracle_b = load_oracle(second) if second else None
    except ToyModelMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    agreement = [0, 0]  # images on which the two oracles call the same concepts present, images judged

    def run(prompts, seed, tag, triggers=None, gen=None):
        exps = [parse_prompt(p, triggers) for p in prompts]
        imgs = (gen or (lambda ps, s: generate(pipe, ps, s, args.steps, args.guidance, args.batch)))(prompts, seed)
        preds = oracle.predict(imgs)
        if oracle_b is not None:
            agreement[0] += oracle.same_concepts(preds, oracle_b.predict(imgs))
            agreement[1] += len(imgs)
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

    base = args.seed * 1000003
    line = ""
    if not args.skip_base:
        one = _cycle(one_object_prompts(), args.samples, args.seed)
        two = _cycle(two_object_prompts(), args.samples, args.seed + 1)
        r1, _ = run(one, base, "one")
        r2, _ = run(two, base + 500000, "two")
        shape_acc, color_acc, both_acc = (mean([x[k] for x in r1]) for k in ("shape", "color", "both"))
        two_acc = mean([x["all"] for x in r2])
        print(f"one object ({len(one)} images, {len(set(one))} prompts): shape {shape_acc:.3f} colour {color_acc:.3f} both {both_acc:.3f}")
        print(f"two objects on named sides ({len(two)} images, {len(set(two))} held-out prompts): {two_acc:.3f}")
        line += f"shape_acc={shape_acc:.3f} color_acc={color_acc:.3f} both_acc={both_acc:.3f} two_object_acc={two_acc:.3f}"
        rb, _ = run(background_prompts(args.samples, 9100 + args.seed), base + 100000, "bg")
        bg_acc = mean([x["background"] for x in rb])
        print(f"one object on a base background ({len(rb)} images): background {bg_acc:.3f}")
        line += f" background_acc={bg_acc:.3f}"
        for k, form in enumerate(FORMS):
            rf, _ = run(form_prompts(form, args.samples, 9200 + 10 * k + args.seed), base + 200000 + 10000 * k, f"form-{form}")
            acc = mean([x["all"] for x in rf])
            print(f"complete captions in the {form} form ({len(rf)} images): every attribute {acc:.3f}")
            line += f" form_acc_{form}={acc:.3f}"
        for k, kind in enumerate(CEILING_KINDS):
            pairs = ceiling_prompts(kind, args.samples, 9300 + 10 * k + args.seed)
            _, preds = run([p for p, _ in pairs], base + 300000 + 10000 * k, f"ceiling-{kind}")
            rate = mean([all(oracle.has_concept(pr, c) for c in need) for pr, (_, need) in zip(preds, pairs)])
            print(f"base analogue of {kind} ({len(pairs)} images, three forms): all present {rate:.3f}")
            line += f" ceiling_{kind}={rate:.3f}"

    if adapters:
        try:
            from studio import Studio
        except Exception as e:  # pragma: no cover - depends on the studio package
            print(f"error: adapters need studio.Studio, which failed to import: {e}", file=sys.stderr)
            return 2
        studio = Studio.load(args.model) if args.model else Studio.load()
        names: dict = {}  # one library name per file: two files that carry the same name must not replace each other
        loaded = [(_load_once(studio, path, names), concept, trigger) for path, concept, trigger in adapters]
        others = [_load_once(studio, path, names) for path in args.with_]
        worst: dict = {}

        def keep(key, value, lowest=True):
            worst[key] = value if key not in worst else (min if lowest else max)(worst[key], value)

        def gen_with(names):
            return lambda ps, s: [studio.generate(p, adapters=list(names), steps=args.steps, guidance=args.guidance,
                                                  seed=s + i, num_images=1, progress=False)[0] for i, p in enumerate(ps)]

        import numpy as np

        # leak: base prompts without any trigger, drawn once by the base model, then with each adapter
        plain_prompts = _cycle(one_object_prompts() + two_object_prompts(), args.samples, args.seed + 7)
        exps = [parse_prompt(p) for p in plain_prompts]
        leak_seed = base + 500000

        def acc(imgs):
            return mean([score(pr, e)["all"] for pr, e in zip(oracle.predict(imgs), exps)])

        ref_imgs = generate(pipe, plain_prompts, leak_seed, args.steps, args.guidance, args.batch)
        ref_acc = acc(ref_imgs)
        for name, concept, trigger in loaded:
            trig = {trigger: concept}

            def rate_of(prompts, seed, tag, names=(name,)):
                """Share of images (drawn with ``names`` loaded; none: the base model) showing the concept."""
                _, preds = run(prompts, seed, tag, trig, gen_with(names) if names else None)
                return mean([oracle.has_concept(p, concept) for p in preds])

            sentence_prompts = []
            for form in FORMS:
                prompts = _cycle(trigger_prompts(concept, trigger, form), args.samples, args.seed)
                rate = rate_of(prompts, base + 400000, f"adapter-{name}-{form}")
                print(f"adapter {name} ({concept}, trigger {trigger!r}), {form} form: concept rate {rate:.3f}")
                keep(f"concept_rate_{form}", rate)
                if form == "sentence":
                    sentence_prompts = prompts
                    keep("concept_rate", rate)
                    keep("base_concept_rate", rate_of(prompts, base + 400000, f"base-{name}", ()), lowest=False)
            beside = beside_prompts_in_turn(concept, trigger, args.samples)
            rate = rate_of(beside, base + 450000, f"adapter-{name}-beside")
            print(f"adapter {name} beside a base object (the three forms in turn): concept rate {rate:.3f}")
            keep("concept_rate_beside", rate)
            if concept_kind(concept) == "shape":
                asked = fill_prompts(concept, trigger, args.samples)
                _, preds = run([p for p, _ in asked], base + 470000, f"adapter-{name}-fill", trig, gen_with([name]))
                rate = mean([oracle.has_concept(p, concept) and oracle.has_concept(p, fill)
                             for p, (_, fill) in zip(preds, asked)])
                print(f"adapter {name} in a base fill (stripes or dots): concept and fill {rate:.3f}")
                keep("fill_rate", rate)
            ad_imgs = gen_with([name])(plain_prompts, leak_seed)
            drop = ref_acc - acc(ad_imgs)
            pix = mean([float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
                        for a, b in zip(ref_imgs, ad_imgs)])
            print(f"adapter {name}: base accuracy drop {drop:+.3f} with it loaded, mean pixel change {pix:.1f}/255")
            keep("leak", drop, lowest=False)
            keep("leak_pixels", pix, lowest=False)
            # survival: each other adapter loaded too (merge), only this adapter's trigger in the prompt
            for other in others:
                if other == name:
                    continue
                rate = rate_of(sentence_prompts, base + 400000, f"survival-{name}-{other}", (name, other))
                print(f"adapter {name} with {other} also loaded: concept rate {rate:.3f}")
                keep("survival", rate)
                rate = rate_of(beside, base + 450000, f"survival-beside-{name}-{other}", (name, other))
                print(f"adapter {name} with {other} also loaded, beside a base object: concept rate {rate:.3f}")
                keep("survival_beside", rate)
        line += " " + " ".join(f"{k}={v:.3f}" if k != "leak_pixels" else f"{k}={v:.1f}" for k, v in worst.items())
    if agreement[1]:
        print(f"the two oracles call the same concepts present on {agreement[0]} of {agreement[1]} images")
        line += f" oracle_agreement={agreement[0] / agreement[1]:.3f}"
    print(f"({time.time() - t0:.0f} s, {args.steps} steps, guidance {args.guidance})")
    print(line.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
