"""``studio`` command line: generate | info | merge | train | eval | serve.

Each subcommand is a thin face over ``Studio``. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import StudioError


def _lora_arg(text: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight); no weight: None (the preset's, else the adapter's preferred)."""
    path, _, weight = text.rpartition(":")
    return (path, float(weight)) if path and _is_float(weight) else (text, None)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH, e.g. 64x64") from None


def _method_params(items: list[str]) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise StudioError(f"{item!r} is not KEY=VALUE; write e.g. tau=3")
        k, v = item.split("=", 1)
        params[k] = v
    return params


def _output_paths(out: str, n: int, stem: str = "image") -> list[Path]:
    out_path = Path(out)
    if out_path.suffix.lower() == ".png" and n == 1:
        return [out_path]
    if out_path.suffix.lower() == ".png":
        return [out_path.with_name(f"{out_path.stem}-{i:02d}.png") for i in range(n)]
    return [out_path / f"{stem}-{i:02d}.png" for i in range(n)]


def cmd_generate(args) -> int:
    from .metadata import read_recipe, save_png
    from .studio import Studio

    if args.from_image:
        recipe = read_recipe(args.from_image)
        studio = Studio.load(None if recipe.model in ("toy-sd", "tiny-random-sd1") else (args.model or recipe.model))
        result = studio.reproduce(recipe)
    else:
        if not args.prompt:
            raise StudioError("--prompt is required (or --from-image X.png to reproduce an image)")
        studio = Studio.load(args.model)
        adapters = []
        for path, weight in map(_lora_arg, args.lora or []):
            name = studio.adapters.load(path, allow_pickle=args.allow_pickle).name
            adapters.append(name if weight is None else (name, weight))
        width, height = args.size or (None, None)
        result = studio.run(
            args.prompt, adapters, method=args.method, method_params=_method_params(args.method_param),
            steps=args.steps, guidance=args.guidance, width=width, height=height, seed=args.seed,
            negative_prompt=args.negative_prompt, num_images=args.num_images, sampler=args.sampler,
        )
    for image, path in zip(result.images, _output_paths(args.out, len(result.images))):
        save_png(image, path)
        print(path)
    if args.report:
        print(json.dumps(result.report, default=str))
    return 0


def cmd_info(args) -> int:
    from .adapters.formats import describe, read_adapter

    info = describe(read_adapter(args.file, allow_pickle=args.allow_pickle))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_merge(args) -> int:
    from .adapters.formats import read_adapter, write_adapter
    from .adapters.merge import merge_adapters

    sources = [read_adapter(p, allow_pickle=args.allow_pickle) for p in args.adapters]
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise StudioError(f"--weights {args.weights!r} is not a comma-separated list of numbers, e.g. 1,0.8") from None
    options = _method_params(args.option)
    for key, value in options.items():
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            pass
    merged = merge_adapters(sources, weights, args.method, args.rank, seed=args.seed,
                            name=Path(args.out).stem, **options)
    path = write_adapter(merged, args.out, format=args.format)
    print(f"{path}  ({args.method}, {len(merged.layers)} modules, ranks {merged.ranks()})")
    return 0


def cmd_serve(args) -> int:
    import runpy

    sys.argv = ["app.py", "--host", args.host, "--port", str(args.port)] + (["--share"] if args.share else [])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "app.py"), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images (any composition method)")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default=None, help="default: none, or the named preset's")
    g.add_argument("--model", default=None, help="diffusers folder or hub id (default: bundled toy model)")
    g.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="adapter file, repeatable")
    g.add_argument("--method", default="merge")
    g.add_argument("--method-param", action="append", metavar="KEY=VALUE")
    g.add_argument("--steps", type=int, default=None, help="default 25, or the named preset's")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5; 3 on the toy model; or the named preset's)")
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--size", type=_size_arg, default=None, metavar="WxH")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--sampler", default=None, help="ddim (default), dpm++2m or euler; or the named preset's")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin adapters (weights_only)")
    g.add_argument("--from-image", metavar="PNG", help="reproduce an image from its metadata")
    g.add_argument("--report", action="store_true", help="print the composer's report as one JSON line")
    g.add_argument("--out", required=True, help="a .png file or a folder")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe an adapter file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.add_argument("--allow-pickle", action="store_true")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("merge", help="merge adapters in weight space into one LoRA file")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER")
    m.add_argument("--method", default="lego", help="lego | cat | linear | svd | ties_svd | dare_ties_svd")
    m.add_argument("--rank", type=int, default=None, help="output rank k (default: largest source rank)")
    m.add_argument("--weights", default=None, metavar="W1,W2,…")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. quotas=\"equal\"")
    m.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"])
    m.add_argument("--allow-pickle", action="store_true")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("serve", help="start the Gradio studio")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true")
    s.set_defaults(func=cmd_serve)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live beside their feature (merge, train, eval), added when present."""
    import importlib

    for module, attr in (("training.dreambooth", "add_cli"), ("studio.evaluation", "add_cli")):
        try:
            yield getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue


def _quiet_loading() -> None:
    """Model-loading progress bars from diffusers/transformers would bury our one-line errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_loading()
    try:
        return args.func(args)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
