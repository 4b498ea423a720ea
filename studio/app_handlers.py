"""What the Gradio app does, as plain functions over one shared ``Studio``.

``app.py`` holds layout and event wiring only; every action lives here and is a ``Studio`` call
(generate, adapter library, PNG recipes). Nothing here touches diffusers. Handlers are methods of
``AppHandlers`` so the app can be built around any ``Studio`` (the tests pass a tiny one).

Per-user values travel in ``gr.State`` and in the arguments of each request: a generation names
its adapters in its own prompt (``<lora:name:weight>``), so concurrent users never share adapter
settings; the Studio's lock serialises use of the UNet. Stop is a per-request flag that the
sampling loop checks before every step (``Studio.run(should_stop=...)``), so it really interrupts.
"""

from __future__ import annotations

import contextvars
import importlib
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from PIL import Image

from composers import COMPOSERS
from studio.adapters.library import safe_name
from studio.atomic import atomic_path
from studio.base import SAMPLERS as _SAMPLER_TABLE, resolve_sampler
from studio.resources import workflows_dir
from studio.errors import StudioError
from studio.metadata import RECIPE_KEY, parse_infotext, read_recipe, save_png
from studio.prompts import format_tag, parse_prompt
from studio.sampling import GenerationCancelled, latent_preview
from studio.studio import Studio

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAMPLERS = tuple(_SAMPLER_TABLE)
SAMPLER_CHOICES = [(label, key) for key, (label, _, _) in _SAMPLER_TABLE.items()]  # (A1111 label shown, value)
XY_AXES = ("Nothing", "Seed", "Steps", "CFG scale", "Method", "Prompt S/R")
XY_MAX_CELLS = 64
ACK_TIMEOUT_S = 30.0  # a step not passed on to the request within this long: the request is gone, stop
CONCEPT_KINDS = ("", "object", "style", "background", "character")
LIBRARY_HEADERS = ["name", "trigger", "concept", "kind", "weight", "arch", "format", "type",
                   "rank / factors", "params", "components", "hash"]


def optional(module: str, attr: str | None = None) -> Any:
    """A module (or one of its attributes) another feature provides, or None while it is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, attr, None) if attr else mod


def load_demo_adapters(studio: Studio, folder: str | os.PathLike) -> list[str]:
    """Load every ``*.safetensors`` in ``folder`` into the library; one message per file."""
    messages = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            adapter = studio.adapters.load(path)
            messages.append(f"loaded {adapter.name} from {path.name}")
        except StudioError as e:
            messages.append(f"skipped {path.name}: {e}")
    return messages


def method_defaults(method: str) -> str:
    """The method's parameters with their defaults, as editable JSON."""
    cls = COMPOSERS.get(method)
    return json.dumps(dict(cls.defaults) if cls else {}, indent=1, sort_keys=True)


def _parse_params(text: str | None) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise gr.Error(f"method parameters are not valid JSON ({e.msg}, line {e.lineno}); write e.g. {{\"tau\": 5}}") from None
    if not isinstance(params, dict):
        raise gr.Error("method parameters must be a JSON object, e.g. {\"tau\": 5}")
    return params


def _as_int(value, label: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a whole number, got {value!r}") from None
    if f != int(f):
        raise gr.Error(f"{label} must be a whole number, got {value!r}")
    return int(f)


class AppHandlers:
    """The app's actions over one shared Studio; per-request state is passed in explicitly."""

    def __init__(self, studio: Studio, out_dir: str | os.PathLike | None = None, preview_every: int | None = None):
        self.studio = studio
        self._scorer = None  # the CLIP scorer, loaded on first use and reused
        self._scorer_error: str | None = None
        self._scorer_lock = threading.Lock()
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lora-studio-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.preview_every = preview_every
        self._stops: dict[tuple[str, str], set[threading.Event]] = {}  # (session, kind) -> running
        self._stops_lock = threading.Lock()

    # ---- compose -------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return list(COMPOSERS)

    def method_params(self, method: str) -> str:
        return method_defaults(method)

    def method_help(self, method: str) -> str:
        """The method's summary and presets (with their run settings; deviations named)."""
        from composers.base import method_help

        cls = COMPOSERS.get(method)
        if cls is None:
            return ""
        text = method_help(cls)
        if cls.presets:
            text += ("\n\nThe Steps, CFG and Sampler fields here are always explicit, so a preset sets only the "
                     "method's parameters; set those fields to the preset's run settings listed above.")
        return text

    def insert_tag(self, prompt: str, name: str) -> str:
        """Append ``<lora:name:preferred weight>`` and the adapter's trigger words to the prompt."""
        adapter = self.studio.adapters.get(name)
        tag = format_tag(adapter.name, adapter.weight)
        prompt = (prompt or "").rstrip(" ,")
        if tag in prompt:
            return prompt
        if adapter.trigger and not re.search(rf"(?<!\w){re.escape(adapter.trigger)}(?!\w)", prompt):
            prompt = f"{prompt}, {adapter.trigger}" if prompt else adapter.trigger
        return f"{prompt} {tag}".strip()

    def reuse_seed(self, last_seed) -> int:
        return -1 if last_seed is None else int(last_seed)

    def stop(self, request: gr.Request | None = None, kind: str = "generate") -> str:
        """Interrupt this user's running generations (or ``kind``: xy, train, evaluate) at the next step."""
        with self._stops_lock:
            events = list(self._stops.get((_session(request), kind), ()))
        for event in events:
            event.set()
        return "Stopping…" if events else "Nothing is running."

    def stop_xy(self, request: gr.Request | None = None) -> str:
        return self.stop(request, "xy")

    def stop_train(self, request: gr.Request | None = None) -> str:
        return self.stop(request, "train")

    def stop_evaluate(self, request: gr.Request | None = None) -> str:
        return self.stop(request, "evaluate")

    def _unregister(self, key: tuple, stop: threading.Event) -> None:
        with self._stops_lock:
            live = self._stops.get(key, set())
            live.discard(stop)
            if not live:
                self._stops.pop(key, None)

    def generate(
        self, prompt: str, negative_prompt: str = "", method: str = "merge", params_json: str = "",
        sampler: str = "ddim", seed=-1, steps=25, guidance=7.5, width=None, height=None, batch_count=1,
        request: gr.Request | None = None, progress=gr.Progress(track_tqdm=True),
    ) -> Iterator[tuple]:
        """Run ``Studio.run`` in a worker thread; yield step previews, then the saved PNGs.

        Yields (gallery, preview, info, report, extras, last_seed). The gallery holds paths of PNGs
        written with ``save_png`` so their ``parameters`` and ``lora_studio`` chunks survive.
        """
        if not (prompt or "").strip():
            raise gr.Error("the prompt is empty; describe the image, e.g. 'a red circle <lora:name:0.8>'")
        kwargs = dict(
            method=method, method_params=_parse_params(params_json), sampler=sampler,
            seed=_as_int(seed if seed not in (None, "") else -1, "seed"), steps=_as_int(steps, "steps"),
            guidance=float(guidance),
            width=_as_int(width, "width") if width else None, height=_as_int(height, "height") if height else None,
            num_images=_as_int(batch_count, "batch count"), negative_prompt=negative_prompt or "",
        )
        every = self.preview_every or max(1, kwargs["steps"] // 8)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        key = (_session(request), "generate")
        with self._stops_lock:
            self._stops.setdefault(key, set()).add(stop)

        acked = threading.Semaphore(0)
        pending = [0]

        def on_step(i: int, total: int, latents) -> None:
            # Hand every step to the request; run at most one step ahead of what it has passed on.
            # A request Gradio cancelled is never resumed, gets closed, and sets ``stop``: the loop
            # then ends within two steps (the one running and at most one more).
            if i + 1 >= total:
                return
            preview = latent_preview(latents) if (i + 1) % every == 0 else None
            events.put(("step", (i + 1, total, preview)))
            pending[0] += 1
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while pending[0] > 1:
                if acked.acquire(timeout=0.05):
                    pending[0] -= 1
                elif stop.is_set():
                    return
                elif time.monotonic() > deadline:  # nobody is listening any more
                    stop.set()
                    return

        def work() -> None:
            try:
                events.put(("done", self.studio.run(prompt, on_step=on_step, should_stop=stop.is_set, **kwargs)))
            except BaseException as e:  # handed to the request thread, raised there
                events.put(("error", e))

        started = time.perf_counter()
        # copy_context: gr.Progress(track_tqdm=True) follows the sampling loop's tqdm bar in the worker
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        try:
            worker.start()
            while True:
                try:
                    kind, payload = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "step":
                    i, total, preview = payload
                    yield gr.skip(), gr.skip() if preview is None else preview, f"step {i}/{total}", \
                        gr.skip(), gr.skip(), gr.skip()
                    acked.release()
                    continue
                if kind == "error":
                    if isinstance(payload, GenerationCancelled):
                        yield [], None, "**Stopped.** No image was kept from the interrupted run.", {}, [], gr.skip()
                        return
                    if isinstance(payload, StudioError):
                        raise gr.Error(str(payload)) from None
                    raise payload
                result = payload
                break
            yield self._finish(result, time.perf_counter() - started)
        finally:
            stop.set()  # a closed generator (Stop, client cancel) ends the worker at its next step
            self._unregister(key, stop)

    def _finish(self, result, wall: float) -> tuple:
        folder = self.out_dir / time.strftime("%Y-%m-%d")
        gallery = []
        for image, recipe in zip(result.images, result.recipes):
            path = save_png(image, folder / f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}-{recipe.seed}.png")
            gallery.append((str(path), f"seed {recipe.seed}"))
        report = result.report or {}
        extras = self._report_images(report, folder, result.images[0].size if result.images else None)
        seeds = ", ".join(str(r.seed) for r in result.recipes)
        info = (f"**{len(gallery)} image(s)** · seed {seeds} · {wall:.2f} s wall · "
                f"{report.get('seconds', 0):.2f} s sampling · {report.get('unet_calls', '?')} UNet calls · "
                f"method {report.get('method', '?')}")
        info += _cmlora_timeline(report)
        info += self._scores(result)
        return gallery, None, info, _jsonable(report), extras, result.recipes[0].seed if result.recipes else None

    def _start_worker(self, key, stop: threading.Event, fn) -> tuple[threading.Thread, dict]:
        """Run ``fn`` in a worker thread registered under this session's Stop; its result or error lands in the box.

        The context is copied so ``gr.Progress(track_tqdm=True)`` follows tqdm bars in the worker.
        """
        box: dict = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the request thread, raised there
                box["error"] = e

        with self._stops_lock:
            self._stops.setdefault(key, set()).add(stop)
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        worker.start()
        return worker, box

    def _scores(self, result) -> str:
        """CLIPScore (compat: the adapters' trigger phrases, else the prompt) and per-concept CLIP-T per image."""
        with self._scorer_lock:
            if self._scorer is None and self._scorer_error is None:
                try:
                    from studio.metrics import Scorer

                    self._scorer = Scorer.load("toy")
                except Exception as e:  # no toy CLIP: say so once, keep generating
                    self._scorer_error = f"CLIPScore unavailable ({str(e).splitlines()[0][:120]})"
        if self._scorer is None:
            return f" · {self._scorer_error}"
        from studio.metrics import compat_text

        lines = []
        for image, recipe in zip(result.images, result.recipes):
            used = [self.studio.adapters.get(a.name) for a in recipe.adapters if a.name in self.studio.adapters]
            text = compat_text([a.trigger for a in used]) or parse_prompt(recipe.prompt)[0]
            score = self._scorer.clipscore(image, text)
            line = f"seed {recipe.seed}: CLIPScore {score.value:.1f} on “{text}”"
            concepts = {a.name: a.concept or a.trigger for a in used if a.concept or a.trigger}
            if concepts:
                per = self._scorer.concept_scores(image, concepts)
                line += " · CLIP-T " + ", ".join(f"{n} {v['raw_cos']:.3f}" for n, v in per["per_concept"].items())
                line += f" (min {per['min']:.3f})"
            lines.append(line)
        return "\n\n" + "\n\n".join(lines) + "\n\n*(toy CLIP: a sanity number only)*"

    def _report_images(self, report: dict, folder: Path, size) -> list[tuple[str, str]]:
        """Masks and attention heatmaps a composer reports (CLoRA), saved as PNGs with captions."""
        found: list[tuple[str, Any]] = []

        def walk(value, label: str, depth: int = 0) -> None:
            if depth > 3:
                return
            if isinstance(value, Image.Image) or _is_map(value):
                found.append((label, value))
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{label} {k}".strip(), depth + 1)
            elif isinstance(value, (list, tuple)) and value and len(value) <= 64:
                for i, v in enumerate(value):
                    walk(v, f"{label} {i}", depth + 1)

        for key, value in report.items():
            if any(w in key.lower() for w in ("mask", "heatmap", "attention", "attn")):
                walk(value, key)
        out = []
        for label, value in found:
            image = value if isinstance(value, Image.Image) else _map_image(value, size)
            path = folder / f"{uuid.uuid4().hex[:10]}-{safe_name(label)}.png"
            out.append((str(save_png(image, path)), label))
        return out

    # ---- X/Y grid ------------------------------------------------------------------------
    def xy_grid(
        self, prompt: str, negative_prompt: str = "", method: str = "merge", params_json: str = "",
        sampler: str = "ddim", seed=-1, steps=25, guidance=7.5, width=None, height=None,
        x_type: str = "Seed", x_values: str = "", y_type: str = "Nothing", y_values: str = "",
        request: gr.Request | None = None, progress=gr.Progress(track_tqdm=True),
    ) -> tuple:
        """Sweep up to two axes (A1111 X/Y plot): one Studio.run per cell, then a labelled grid.

        Returns (grid PNG path, cell PNG paths with captions, info). ``Prompt S/R``: the first
        value is searched in the prompt and replaced by each value in turn (weight sweeps).
        """
        base = dict(prompt=prompt, negative_prompt=negative_prompt or "", method=method,
                    method_params=_parse_params(params_json), sampler=sampler,
                    seed=_as_int(seed if seed not in (None, "") else -1, "seed"), steps=_as_int(steps, "steps"),
                    guidance=float(guidance), width=_as_int(width, "width") if width else None,
                    height=_as_int(height, "height") if height else None)
        if base["seed"] < 0:  # one random seed for every cell, so cells differ only along the axes
            base["seed"] = int.from_bytes(os.urandom(4), "big")
        xs = _axis(x_type, x_values, base)
        ys = _axis(y_type, y_values, base)
        if len(xs) * len(ys) > XY_MAX_CELLS:
            raise gr.Error(f"{len(xs)}×{len(ys)} cells is more than {XY_MAX_CELLS}; use fewer values")
        stop = threading.Event()
        key = (_session(request), "xy")
        with self._stops_lock:
            self._stops.setdefault(key, set()).add(stop)
        started = time.perf_counter()
        folder = self.out_dir / time.strftime("%Y-%m-%d")
        cells, images = [], []
        try:
            for y_label, y_set in ys:
                for x_label, x_set in xs:
                    params = {**base, **y_set, **x_set}
                    text = params.pop("prompt")
                    try:
                        result = self.studio.run(text, should_stop=stop.is_set, **params)
                    except GenerationCancelled:
                        return None, cells, "**Stopped.** The grid is incomplete."
                    except StudioError as e:
                        raise gr.Error(f"cell {x_label} / {y_label}: {e}") from None
                    path = save_png(result.images[0], folder / f"xy-{uuid.uuid4().hex[:8]}-{result.recipes[0].seed}.png")
                    cells.append((str(path), " · ".join(l for l in (x_label, y_label) if l)))
                    images.append(result.images[0])
        finally:
            self._unregister(key, stop)
        grid = labelled_grid(images, [l for l, _ in xs], [l for l, _ in ys])
        grid_path = save_png(grid, folder / f"grid-{uuid.uuid4().hex[:8]}.png")
        info = f"**{len(cells)} cells** · seed {base['seed']} · {time.perf_counter() - started:.2f} s"
        return str(grid_path), cells, info

    # ---- train ---------------------------------------------------------------------------
    def train(
        self, files: list[str] | None, folder: str, trigger: str, class_word: str, concept_kind: str = "object",
        adapter_type: str = "lora", rank=4, factors: str = "krona-paper", steps=500, prior_preservation: bool = False,
        name: str = "", request: gr.Request | None = None, progress=gr.Progress(track_tqdm=True),
    ) -> Iterator[tuple]:
        """DreamBooth-train a LoRA or Kronecker adapter on the Studio's base; it lands in the library.

        Yields (loss table, samples, status) about twice a second while training runs in a worker.
        """
        dreambooth = optional("training.dreambooth")
        if dreambooth is None or not hasattr(dreambooth, "DreamBoothTrainer"):
            raise gr.Error("training is not available yet (training.dreambooth is missing)")
        trigger = (trigger or "").strip()
        if not trigger or not (class_word or "").strip():
            raise gr.Error("give a trigger word (e.g. sks) and a class word (e.g. dog)")
        name = safe_name(name.strip() if name and name.strip() else trigger)
        if name in self.studio.adapters:
            raise gr.Error(f"an adapter named {name!r} is already in the library; choose another name")
        run_dir = self.out_dir / "train" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        images = run_dir / "images"
        if files:
            images.mkdir(parents=True, exist_ok=True)
            for f in files:
                src = Path(f)
                if src.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt"):
                    shutil.copyfile(src, images / f"{safe_name(src.stem)}{src.suffix.lower()}")
        elif folder and folder.strip():
            images = Path(folder.strip()).expanduser()
            if not images.is_dir():
                raise gr.Error(f"instance image folder {str(images)!r} does not exist; upload images or give a folder")
        else:
            raise gr.Error("upload instance images or give a folder of them")
        try:
            cfg = dreambooth.TrainConfig(
                images=str(images), out=str(self.out_dir / "adapters" / f"{name}.safetensors"), trigger=trigger,
                class_word=class_word.strip(), concept_kind=concept_kind or "object", name=name,
                adapter=adapter_type, rank=_as_int(rank, "rank"), factors=factors or "krona-paper",
                steps=_as_int(steps, "steps"), prior_preservation=bool(prior_preservation),
                output_dir=str(run_dir / "run"), num_validation_images=2,
            )
            trainer = dreambooth.DreamBoothTrainer(self.studio, cfg)
        except StudioError as e:
            raise gr.Error(str(e)) from None
        stop = threading.Event()
        step_fn = trainer.train_step

        def train_step():  # Stop ends the run between optimizer steps; layers are stripped by run()
            if stop.is_set():
                raise TrainingCancelled(f"training stopped by the user at step {trainer.step}")
            return step_fn()

        trainer.train_step = train_step
        key = (_session(request), "train")
        worker, box = self._start_worker(key, stop, trainer.run)
        try:
            while worker.is_alive():
                worker.join(0.5)
                yield _loss_table(trainer.history), gr.skip(), f"training: step {trainer.step}/{cfg.steps}"
            if "error" in box:
                e = box["error"]
                if isinstance(e, TrainingCancelled):
                    yield _loss_table(trainer.history), [], f"**Stopped** at step {trainer.step}; nothing was added."
                    return
                if isinstance(e, StudioError):
                    raise gr.Error(str(e)) from None
                raise e
            adapter = box["result"]
            out = Path(cfg.out)
            try:
                added = self.studio.adapters.load(out, name=name, trigger=trigger, kind=concept_kind or None,
                                                  concept=class_word.strip()) if out.is_file() \
                    else self.studio.adapters.add(adapter)
            except StudioError as e:
                raise gr.Error(f"the trained adapter could not be added: {e}") from None
            samples = [(trainer.outputs["grid"], "final samples")] if trainer.outputs.get("grid") else []
            yield (_loss_table(trainer.history), samples,
                   f"Trained **{added.name}** ({adapter_type}, {trainer.step} steps) and added it to the library; "
                   f"file: `{out}`")
        finally:
            stop.set()
            self._unregister(key, stop)

    # ---- evaluate ------------------------------------------------------------------------
    def suites(self) -> list[str]:
        root = workflows_dir()
        return sorted(str(p) for p in root.glob("*.y*ml"))

    def evaluate(
        self, suite_choice: str | None, suite_file: str | None, limit=None, dry_run: bool = False,
        request: gr.Request | None = None, progress=gr.Progress(track_tqdm=True),
    ) -> Iterator[tuple]:
        """Run an evaluation suite (studio.evaluation.run_suite) into a new run folder.

        Yields (log, summary table, grids, run-folder zip). Stop ends it after the current job.
        """
        evaluation = optional("studio.evaluation")
        if evaluation is None or not hasattr(evaluation, "run_suite"):
            raise gr.Error("evaluation is not available yet (studio.evaluation is missing)")
        suite = suite_file or suite_choice
        if not suite:
            raise gr.Error("choose a suite YAML from the list or upload one")
        if not str(suite).lower().endswith((".yaml", ".yml", ".toml")):
            raise gr.Error(f"{Path(suite).name} is not a suite file; upload a .yaml, .yml or .toml")
        out = self.out_dir / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        lines: list[str] = []
        stop = threading.Event()

        def on_job(job, row) -> None:
            if stop.is_set():
                raise EvaluationCancelled("evaluation stopped by the user")

        key = (_session(request), "evaluate")
        worker, box = self._start_worker(key, stop, lambda: evaluation.run_suite(
            suite, out, limit=_as_int(limit, "limit") if limit not in (None, "", 0) else None,
            dry_run=bool(dry_run), on_job=on_job, log=lines.append))
        try:
            while worker.is_alive():
                worker.join(0.5)
                yield "\n".join(lines), gr.skip(), gr.skip(), gr.skip()
            if "error" in box:
                e = box["error"]
                if isinstance(e, EvaluationCancelled):
                    yield "\n".join(lines + ["stopped; run it again with the same folder to resume"]), gr.skip(), \
                        gr.skip(), None
                    return
                if isinstance(e, StudioError):
                    raise gr.Error(str(e)) from None
                raise e
            if dry_run:
                yield "\n".join(lines), [], [], None
                return
            rows = evaluation.read_rows(out / "results.jsonl") if (out / "results.jsonl").is_file() else []
            header, body = evaluation.summary_table(evaluation.summarize(rows)) if rows else ([], [])
            grids = [(str(p), p.stem) for p in sorted((out / "grids").glob("*.png"))]
            archive = shutil.make_archive(str(out), "zip", root_dir=out)
            import pandas as pd

            table = pd.DataFrame(body, columns=header) if header else pd.DataFrame()
            yield "\n".join(lines), table, grids, archive
        finally:
            stop.set()
            self._unregister(key, stop)

    # ---- library -------------------------------------------------------------------------
    def library_rows(self) -> list[list]:
        rows = []
        for a in self.studio.adapters.list():
            shape = ", ".join(f"r{r}" for r in a.ranks()) or ", ".join(f"{x}×{y}" for x, y in a.kron_factors())
            rows.append([a.name, a.trigger or "", a.concept or "", a.concept_kind or "", a.weight, a.arch or "",
                         a.format or "", a.kind, shape, a.num_params(), "/".join(sorted(a.components())),
                         a.shorthash or ""])
        return rows

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.studio.adapters.list()]

    def adapter_cards(self) -> list[dict]:
        """What a card shows: name, tag, trigger, kind, weight, arch, format, shape, preview path."""
        cards = []
        for a in self.studio.adapters.list():
            preview = Path(a.path).with_suffix(".png") if a.path else None
            cards.append(dict(
                name=a.name, tag=format_tag(a.name, a.weight), trigger=a.trigger or "", kind=a.concept_kind or a.kind,
                weight=a.weight, arch=a.arch or "?", format=a.format or "in memory",
                shape=", ".join(f"rank {r}" for r in a.ranks()) or ", ".join(f"{x}×{y}" for x, y in a.kron_factors()),
                preview=str(preview) if preview and preview.is_file() else None,
            ))
        return cards

    def upload(self, path: str | None, name: str = "") -> str:
        """Validate and add an uploaded ``.safetensors`` adapter; returns a one-line status."""
        if not path:
            return "Error: choose a .safetensors file first."
        src = Path(path)
        suffix = src.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            return f"Error: {src.name} is a pickle file ({suffix}), which can run code when loaded; convert it to .safetensors first."
        if suffix != ".safetensors":
            return f"Error: {src.name} is not a .safetensors file; upload a LoRA/LoKr adapter saved as .safetensors."
        target = safe_name(name.strip() if name and name.strip() else src.stem)
        if target in self.studio.adapters:
            return f"Error: an adapter named {target!r} is already in the library; delete it or give another name."
        dest = self.out_dir / "adapters" / f"{target}.safetensors"
        try:
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            adapter = self.studio.adapters.load(dest, name=target)
        except StudioError as e:
            dest.unlink(missing_ok=True)
            return f"Error: {e}"
        except Exception as e:  # never a traceback for a bad file
            dest.unlink(missing_ok=True)
            return f"Error: could not read {src.name} as an adapter ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the file."
        finally:
            tmp.unlink(missing_ok=True)
        return f"Loaded **{adapter.name}** ({adapter.format or 'adapter'}, {adapter.kind}, {len(adapter.layers)} modules)."

    def adapter_fields(self, name: str | None) -> tuple:
        """(trigger, concept, kind, weight) of one adapter, for the edit form."""
        if not name or name not in self.studio.adapters:
            return "", "", "", 1.0
        a = self.studio.adapters.get(name)
        return a.trigger or "", a.concept or "", a.concept_kind or "", a.weight

    def edit(self, name: str | None, trigger: str, concept: str, kind: str, weight) -> str:
        """Change an adapter's metadata in memory (the file is not rewritten)."""
        if not name:
            return "Error: pick an adapter to edit."
        try:
            adapter = self.studio.adapters.get(name)
        except StudioError as e:
            return f"Error: {e}"
        if kind and kind not in CONCEPT_KINDS:
            return f"Error: kind {kind!r} is not one of {', '.join(k for k in CONCEPT_KINDS if k)}."
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            return f"Error: weight {weight!r} is not a number; preferred weights are usually 0–2."
        adapter.trigger = trigger.strip() or None
        adapter.concept = concept.strip() or None
        adapter.concept_kind = kind or None
        adapter.weight = weight
        return f"Saved metadata of **{name}** (in memory)."

    def delete(self, name: str | None) -> str:
        if not name:
            return "Error: pick an adapter to delete."
        try:
            self.studio.adapters.remove(name)
        except StudioError as e:
            return f"Error: {e}"
        return f"Deleted **{name}** from the library."

    def merge_available(self) -> bool:
        return optional("studio.adapters.merge", "merge_adapters") is not None

    def merge_methods(self) -> list[str]:
        return list(optional("studio.adapters.merge", "METHODS") or ())

    def merge(self, names: list[str] | None, method: str, rank, new_name: str) -> str:
        """Merge library adapters at their preferred weights into a new library adapter."""
        merge_adapters = optional("studio.adapters.merge", "merge_adapters")
        if merge_adapters is None:
            return "Merging is not available yet (studio.adapters.merge is missing)."
        if not names or len(names) < 2:
            return "Error: pick at least two adapters to merge."
        new = safe_name(new_name.strip() if new_name and new_name.strip() else "+".join(names))
        if new in self.studio.adapters:
            return f"Error: an adapter named {new!r} already exists; choose another name."
        try:
            adapters = [self.studio.adapters.get(n) for n in names]
            rank = None if rank in (None, "", 0) else _as_int(rank, "rank")
            merged = merge_adapters(adapters, method=method, rank=rank, name=new)
            merged.name = new
            self.studio.adapters.add(merged)
        except (StudioError, gr.Error) as e:
            return f"Error: {getattr(e, 'message', e)}"
        return f"Merged {', '.join(names)} into **{merged.name}** ({method}, {len(merged.layers)} modules)."

    # ---- PNG info ------------------------------------------------------------------------
    def read_png(self, path: str | None) -> tuple:
        """(image path, infotext, recipe JSON, status, fields for Compose) of a dropped PNG."""
        if not path:
            return None, "", {}, "", {}
        try:
            image = Image.open(path)
            image.load()
        except Exception:
            return None, "", {}, f"Error: {Path(path).name} is not an image file.", {}
        text = image.info.get("parameters") or ""
        fields: dict = {}
        recipe_json: dict = {}
        if image.info.get(RECIPE_KEY):
            try:
                recipe = read_recipe(image)
            except (StudioError, ValueError, TypeError) as e:
                return path, text, {}, f"Error: the lora_studio chunk is damaged ({e}).", {}
            recipe_json = asdict(recipe)
            fields = dict(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, method=recipe.method,
                          params=recipe.method_params, sampler=recipe.sampler, seed=recipe.seed, steps=recipe.steps,
                          guidance=recipe.guidance, width=recipe.width, height=recipe.height)
            status = "Studio recipe found: everything needed to reproduce this image."
        elif text:
            p = parse_infotext(text)
            size = str(p.get("Size", "")).lower().split("x")
            fields = {k: v for k, v in dict(
                prompt=p.get("Prompt"), negative_prompt=p.get("Negative prompt", ""),
                method=p.get("Composition"), params=_try_json(p.get("Composition params")),
                sampler=_sampler_or_none(p.get("Sampler"), p.get("Schedule type")),
                seed=_int_or_none(p.get("Seed")), steps=_int_or_none(p.get("Steps")),
                guidance=_float_or_none(p.get("CFG scale")),
                width=_int_or_none(size[0]) if len(size) == 2 else None,
                height=_int_or_none(size[1]) if len(size) == 2 else None,
            ).items() if v is not None}
            status = "A1111 parameters found (no studio recipe)."
        else:
            return path, "", {}, "No generation parameters in this image (was it re-encoded, e.g. as WebP?).", {}
        missing = [t.name for t in parse_prompt(fields.get("prompt") or "")[1] if t.name not in self.studio.adapters]
        if missing:
            status += f" Not in the library: {', '.join(missing)}; load them before generating."
        return path, text, recipe_json, status, fields

    def send_to_compose(self, fields: dict | None) -> tuple:
        """Compose inputs from PNG fields: prompt, negative, method, params, sampler, seed, steps, guidance, w, h."""
        f = fields or {}
        method = f.get("method") if f.get("method") in COMPOSERS else None
        return (
            f.get("prompt", gr.skip()), f.get("negative_prompt", gr.skip()), method or gr.skip(),
            json.dumps(f["params"], indent=1, sort_keys=True) if isinstance(f.get("params"), dict) else gr.skip(),
            f.get("sampler") if f.get("sampler") in SAMPLERS else gr.skip(),
            f.get("seed", gr.skip()), f.get("steps", gr.skip()), f.get("guidance", gr.skip()),
            f.get("width", gr.skip()), f.get("height", gr.skip()),
        )

    # ---- features other modules provide --------------------------------------------------
    @staticmethod
    def available(module: str, attr: str) -> bool:
        return optional(module, attr) is not None

    @staticmethod
    def availability(module: str, what: str) -> str:
        if optional(module) is None:
            return f"**{what} is not available yet:** `{module}` is not installed in this build."
        return f"**{what}:** `{module}` is present, but its app tab is not wired yet; use the `studio` CLI meanwhile."


def _axis(kind: str, values: str, base: dict) -> list[tuple[str, dict]]:
    """(label, Studio.run overrides) per value of one X/Y axis."""
    if kind in (None, "", "Nothing"):
        return [("", {})]
    items = [v.strip() for v in (values or "").split(",") if v.strip()]
    if not items:
        raise gr.Error(f"the {kind} axis has no values; write them comma-separated, e.g. 1, 2, 3")
    if kind == "Seed":
        return [(f"seed {v}", {"seed": _as_int(v, "seed")}) for v in items]
    if kind == "Steps":
        return [(f"steps {v}", {"steps": _as_int(v, "steps")}) for v in items]
    if kind == "CFG scale":
        try:
            return [(f"CFG {float(v):g}", {"guidance": float(v)}) for v in items]
        except ValueError:
            raise gr.Error(f"CFG values must be numbers, got {values!r}") from None
    if kind == "Method":
        unknown = [v for v in items if v not in COMPOSERS]
        if unknown:
            raise gr.Error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(COMPOSERS)}")
        return [(v, {"method": v, "method_params": base["method_params"] if v == base["method"] else {}}) for v in items]
    if kind == "Prompt S/R":
        search = items[0]
        if search not in base["prompt"]:
            raise gr.Error(f"Prompt S/R: {search!r} (the first value) is not in the prompt; it is what gets replaced")
        return [(v, {"prompt": base["prompt"].replace(search, v)}) for v in items]
    raise gr.Error(f"unknown axis {kind!r}; choose one of {', '.join(XY_AXES)}")


def labelled_grid(images: list[Image.Image], x_labels: list[str], y_labels: list[str]) -> Image.Image:
    """Images in rows (y) and columns (x) with the axis values written above and to the left."""
    from PIL import ImageDraw

    w, h = images[0].size
    cols = len(x_labels)
    top = 24 if any(x_labels) else 0
    left = max((8 + 7 * len(l) for l in y_labels if l), default=0)
    grid = Image.new("RGB", (left + cols * w, top + len(y_labels) * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (left + (i % cols) * w, top + (i // cols) * h))
    for c, label in enumerate(x_labels):
        draw.text((left + c * w + 4, 6), label, fill="black")
    for r, label in enumerate(y_labels):
        draw.text((4, top + r * h + h // 2 - 6), label, fill="black")
    return grid


class TrainingCancelled(StudioError):
    """Stop was pressed during training."""


class EvaluationCancelled(StudioError):
    """Stop was pressed during an evaluation run."""


def _loss_table(history: list[dict]):
    import pandas as pd

    rows = [{"step": h["step"], "loss": h["loss"]} for h in list(history) if "loss" in h]
    return pd.DataFrame(rows, columns=["step", "loss"])


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _is_map(value) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and hasattr(value, "dtype") and len(shape) in (2, 3) and min(shape[-2:]) > 1


def _map_image(value, size) -> Image.Image:
    """A 2-D map (or a stack, averaged) as a grey image, normalised to 0–255, nearest-upsampled."""
    import numpy as np

    arr = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, dtype=float)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    image = Image.fromarray((arr * 255).astype("uint8"), mode="L")
    return image.resize(size, Image.NEAREST) if size else image


def _cmlora_timeline(report: dict) -> str:
    """CMLoRA's dominant adapter per step span and which cache slot each refresh event filled."""
    events = report.get("events") if report.get("method") == "cmlora" else None
    if not events:
        return ""
    parts = []
    for step, dominant, refreshed in events:
        what = "all caches filled" if step == 0 and report.get("caching") else (
            f"refresh {refreshed}" if refreshed else "no refresh")
        parts.append(f"step {step}: **{dominant}** dominant ({what})")
    low = ", ".join(report.get("low_frequency") or []) or "none"
    return (f"\n\n**CMLoRA timeline** (order {', '.join(report.get('order', []))}; low-frequency: {low}; "
            f"late start at step {report.get('late_start')}; {report.get('cache_hits', 0)} cache hits): "
            + " → ".join(parts))


def _jsonable(value, depth: int = 0):
    """The report for display: tensors and images summarised, the rest kept."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value[:200]]
    if isinstance(value, Image.Image):
        return f"<image {value.size[0]}×{value.size[1]}>"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<array {tuple(value.shape)}>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _sampler_or_none(label, schedule) -> str | None:
    """Our sampler name for an A1111 ``Sampler`` (+ ``Schedule type``), None when unknown."""
    try:
        return resolve_sampler(label, schedule) if label else None
    except StudioError:
        return None


def _try_json(text):
    if not text:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def _int_or_none(text):
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def _float_or_none(text):
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return None
