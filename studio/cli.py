"""``studio`` command line: generate | info | merge | train | eval | serve.

Each subcommand is a thin face over ``Studio``. User errors (bad options, unwritable outputs,
bad ports) print one line and exit with status 2; ``studio --version`` and ``python -m studio``
work as for any Python tool, and every option's help shows its default and choices.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import __version__
from .errors import StudioError
from .guidance import toy_guidance_text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each option's help, except where there is nothing to say (None,
    False, "") or the help already describes its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text or action.required:
            return text
        return super()._get_help_string(action)


class StudioParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and subcommands share its formatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _choice(options, what: str, lead: str = "choose one of"):
    """An argparse type that accepts one of ``options`` and names them all when it does not."""
    def check(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; {lead} {', '.join(options)}")
        return text
    check.__name__ = what
    return check


def _sampler_arg(text: str) -> str:
    from .base import resolve_sampler

    try:
        return resolve_sampler(text)
    except StudioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number from 1 to 65535, e.g. 7860")
    return port


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return value


def check_writable(out: str | os.PathLike, folder: bool = False) -> None:
    """Fail before any work when an output cannot be written: its folder cannot be made or written to,
    a parent is a file, or a file output is an existing folder. A probe file is made and removed,
    so the check holds for root and on read-only mounts too."""
    import tempfile

    path = Path(out)
    folder = folder or path.suffix == ""
    parent = path if folder else path.parent
    parent = parent if str(parent) else Path(".")
    if not folder and path.is_dir():
        raise StudioError(f"--out {path} is an existing folder, not a file; give a file path such as {path / 'out'}{path.suffix}")
    if folder and path.exists() and not path.is_dir():
        raise StudioError(f"--out {path} is an existing file, not a folder; choose a folder path")
    for above in [parent, *parent.parents]:
        if above.exists() and not above.is_dir():
            raise StudioError(f"cannot create the output folder {parent} ({above} is a file); choose a writable --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StudioError(f"cannot create the output folder {parent} ({e.strerror}); choose a writable --out") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not path.is_dir() and not os.access(path, os.W_OK)):
        raise StudioError(f"cannot write to {path if path.exists() else parent} (permission denied); choose a writable --out")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".studio-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StudioError(f"cannot write to {parent} ({e.strerror}); choose a writable --out") from None


def _lora_arg(text: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight); no weight: None (the preset's, else the adapter's preferred).
    A weight that is not finite or over ``max_weight`` is refused here, before any model is loaded."""
    from .schema import Limits, finite

    path, _, weight = text.rpartition(":")
    if not (path and _is_float(weight)):
        return text, None
    limit = Limits.from_env().max_weight
    return path, finite(f"--lora {text}: weight", float(weight), -limit, limit, "weights between -2 and 2 are typical")


def resolve_adapter_path(text: str) -> str:
    """An adapter file, or the bare name of a shipped demo adapter ("crescent-lora")."""
    from .resources import demo_adapters_dir

    if Path(text).exists() or os.sep in text or "/" in text:
        return text
    demo = demo_adapters_dir() / (text if text.endswith(".safetensors") else f"{text}.safetensors")
    if demo.is_file():
        return str(demo)
    names = sorted(p.stem for p in demo_adapters_dir().glob("*.safetensors"))
    raise StudioError(f"--lora {text}: no such file, and no demo adapter of that name; give a file path"
                      + (f", or one of the demo adapters: {', '.join(names)}" if names else ""))


def _finite_arg(text: str) -> float:
    """An argparse type: a finite number (NaN and inf are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number, e.g. 7.5")
    return value


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH, e.g. 64x64") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must each be a positive multiple of 8, e.g. 64x64")
    return w, h


def _method_params(items: list[str]) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise StudioError(f"{item!r} is not KEY=VALUE; write e.g. tau=3")
        k, v = item.split("=", 1)
        params[k] = v
    from .schema import check_method_params

    return check_method_params(params, "--method-param")


def _output_paths(out: str, n: int, stem: str = "image") -> list[Path]:
    """Where ``n`` images go: a named .png (numbered when several), or a folder, numbered on after the
    images already there so that a second run into it keeps the first run's images."""
    out_path = Path(out)
    if out_path.suffix.lower() == ".png" and n == 1:
        return [out_path]
    if out_path.suffix.lower() == ".png":
        return [out_path.with_name(f"{out_path.stem}-{i:02d}.png") for i in range(n)]
    taken = [int(m.group(1)) for p in out_path.glob(f"{stem}-*.png")
             if (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.png", p.name))]
    start = max(taken, default=-1) + 1
    return [out_path / f"{stem}-{start + i:02d}.png" for i in range(n)]


def _untagged_trigger_warnings(prompt: str, used: set[str]) -> list[str]:
    """Lines for demo adapters' trigger words in the prompt whose adapter this run does not use: without
    it the word is drawn as nothing in particular, silently."""
    from .adapters.store import read_index
    from .prompts import parse_prompt, untagged_trigger_warning, untagged_triggers
    from .resources import demo_adapters_dir

    text, tags = parse_prompt(prompt)
    triggers = {name: e.get("trigger") for name, e in read_index(demo_adapters_dir()).items()}
    return [untagged_trigger_warning(trigger, names, f"--lora {names[0]}")
            for trigger, names in untagged_triggers(text, used | {t.name for t in tags}, triggers).items()]


def _suggest_method(studio, prompt: str, names: list[str]) -> None:
    """With no --method: a note on stderr when the adapters' kinds have a measured better method than merge."""
    pick = studio.suggest_method(prompt, names)
    if pick is None or pick.same_as("merge", {}):
        return
    if pick.method is None:
        print(f"note: {pick.pair_type}: {pick.expect}", file=sys.stderr)
        return
    flags = " ".join([f"--method {pick.method}", *(f"--method-param {k}={v}" for k, v in pick.params.items())])
    print(f"note: running merge (the default); for {pick.pair_type} the toy world's measured pick is {flags} "
          f"(benchmark: {pick.expect}; docs/benchmark.md)", file=sys.stderr)


def cmd_generate(args) -> int:
    from .metadata import read_recipe, save_png
    from .studio import Studio

    from .schema import recipe_model_problem

    check_writable(args.out, folder=Path(args.out).suffix.lower() != ".png")
    method_params = _method_params(args.method_param)
    loras = list(map(_lora_arg, args.lora or []))
    if args.from_image:
        recipe = read_recipe(args.from_image)
        problem = recipe_model_problem(recipe.model) if args.model is None else None
        if problem:  # a PNG never makes us load an odd model name
            raise StudioError(f"{args.from_image}: {problem}; pass --model with the model to reproduce it on")
        studio = Studio.load(None if recipe.model == "toy-sd" and args.model is None else (args.model or recipe.model))
        result = studio.reproduce(recipe)
    else:
        if not args.prompt:
            raise StudioError("--prompt is required (or --from-image X.png to reproduce an image)")
        studio = Studio.load(args.model)
        adapters = []
        for path, weight in loras:
            name = studio.adapters.load(resolve_adapter_path(path), allow_pickle=args.allow_pickle).name
            adapters.append(name if weight is None else (name, weight))
        names = [a if isinstance(a, str) else a[0] for a in adapters]
        if args.model is None:  # the demo adapters are the toy model's
            for line in _untagged_trigger_warnings(args.prompt, set(names)):
                print(f"warning: {line}", file=sys.stderr)
        if args.method is None:
            _suggest_method(studio, args.prompt, names)
        width, height = args.size or (None, None)
        result = studio.run(
            args.prompt, adapters, method=args.method or "merge", method_params=method_params,
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
        except (json.JSONDecodeError, RecursionError):
            pass
    from .schema import check_method_params, finite

    check_method_params(options, "--option")
    if "dtype" in options and options["dtype"] not in MERGE_DTYPES:
        raise StudioError(f"--option dtype={options['dtype']} is not a dtype adapters are written in; "
                          f"choose one of {', '.join(MERGE_DTYPES)}")
    for w in weights or []:
        finite("--weights: weight", w, -100, 100, "weights between -2 and 2 are typical")
    if Path(args.out).suffix.lower() != ".safetensors":
        raise StudioError(f"--out {args.out} must end in .safetensors; e.g. --out {Path(args.out).with_suffix('.safetensors')}")
    check_writable(args.out)
    sources = [read_adapter(p, allow_pickle=args.allow_pickle) for p in args.adapters]
    merged = merge_adapters(sources, weights, args.method, args.rank, seed=args.seed,
                            name=Path(args.out).stem, **options)
    path = write_adapter(merged, args.out, format=args.format)
    print(f"{path}  ({args.method}, {len(merged.layers)} modules, ranks {merged.ranks()})")
    return 0


MERGE_DTYPES = ("float16", "bfloat16", "float32")


def cmd_serve(args) -> int:
    import runpy

    from .resources import app_path

    app = app_path()
    if not app.is_file():
        raise StudioError(f"the Gradio app ({app}) is missing from this installation; reinstall with "
                          "`pip install '.[app]'` or run from a source checkout")
    sys.argv = [str(app), "--host", args.host, "--port", str(args.port)] + (["--share"] if args.share else [])
    runpy.run_path(str(app), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from composers import COMPOSERS

    from .adapters.merge import METHODS as MERGE_METHODS
    from .base import SAMPLERS

    parser = StudioParser(prog="studio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s (lora-composition-studio) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images (any composition method)",
                       description="Generate images with any composition method; each PNG carries its recipe.")
    g.add_argument("--prompt", help="the prompt; <lora:NAME:WEIGHT> / <lyco:…> tags pick adapters loaded with --lora")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none, or the named preset's)")
    g.add_argument("--model", default=None, help="diffusers folder, .safetensors checkpoint or hub id (default: bundled toy model)")
    g.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="adapter file (or a demo adapter's name, e.g. crescent-lora) and its weight (default: the preset's, else the adapter's preferred weight), repeatable")
    g.add_argument("--method", default=None, type=_choice(list(COMPOSERS), "method"), choices=list(COMPOSERS),
                   help="composition method (default: merge; on the toy model, a note names the method measured best "
                        "for the adapters' kinds)")
    g.add_argument("--method-param", action="append", metavar="KEY=VALUE", help="method parameter, repeatable, e.g. tau=3")
    g.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: 25, or the named preset's)")
    g.add_argument("--guidance", type=_finite_arg, default=None, help=f"CFG scale (default: 7.5; on the toy model per method: {toy_guidance_text()}; or the named preset's)")
    g.add_argument("--seed", type=int, default=-1, help="seed of the first image (the next get seed+1, …); -1 = random")
    g.add_argument("--size", type=_size_arg, default=None, metavar="WxH", help="image size (default: the model's native size)")
    g.add_argument("--num-images", type=_positive_int, default=1, help="how many images (shows a counter and ETA)")
    g.add_argument("--sampler", default=None, type=_sampler_arg, choices=list(SAMPLERS), metavar="SAMPLER",
                   help="sampler, by short name or A1111 label (default: ddim, or the named preset's): "
                   + ", ".join(f"{k} ({v[0]})" for k, v in SAMPLERS.items()))
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin adapters (weights_only)")
    g.add_argument("--from-image", metavar="PNG", help="reproduce an image from its metadata")
    g.add_argument("--report", action="store_true", help="print the composer's report as one JSON line")
    g.add_argument("--out", required=True, help="a .png file or a folder (created if missing)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe an adapter file", description="Describe an adapter file: format, type, "
                       "ranks, modules, base model, trigger, hash.")
    i.add_argument("file", help="adapter .safetensors (or a PEFT/diffusers folder)")
    i.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    i.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin adapters (weights_only)")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("merge", help="merge adapters in weight space into one LoRA file",
                       description="Merge adapters in weight space into one LoRA file.")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter files")
    m.add_argument("--method", default="lego", type=_choice(list(MERGE_METHODS), "merge method", "valid methods:"),
                   choices=list(MERGE_METHODS), help="merge method")
    m.add_argument("--rank", type=_positive_int, default=None, help="output rank k (default: largest source rank)")
    m.add_argument("--weights", default=None, metavar="W1,W2,…", help="one weight per adapter (default: each 1)")
    m.add_argument("--seed", type=int, default=0, help="seed of randomised methods (dare_ties_svd)")
    m.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. quotas=\"equal\"")
    m.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"], help="file format to write")
    m.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin adapters (weights_only)")
    m.add_argument("--out", required=True, help="the .safetensors file to write")
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("serve", help="start the Gradio studio", description="Start the Gradio studio in a browser.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=_port_arg, default=7860, help="port to listen on (1-65535)")
    s.add_argument("--share", action="store_true", help="also open a public gradio.live link")
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (already reported on one line)
        return e.code if isinstance(e.code, int) else 2
    _quiet_loading()
    try:
        return args.func(args)
    except StudioError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except OSError as e:  # the disk or the network refused: the user's to fix, not a bug
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or _first_line(e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line here, the traceback in a log file
        print(f"error: internal error (a bug, please report it): {type(e).__name__}: {_first_line(e)}; "
              f"traceback in {log_bug(e)}", file=sys.stderr)
        return 1


def log_bug(e: BaseException) -> str:
    """Write ``e``'s traceback to a log file (``$STUDIO_LOG_DIR`` or the temp folder); its path."""
    import tempfile
    import time
    import traceback

    folder = Path(os.environ.get("STUDIO_LOG_DIR") or Path(tempfile.gettempdir()) / "lora-studio-logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(e)), encoding="utf-8")
        return str(path)
    except OSError:
        return "(no log: the log folder is not writable; set STUDIO_LOG_DIR)"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
