"""Compose tab: prompt, method and settings in, images (PNG with metadata) out.

Generation runs in a worker thread; the request thread passes on one progress line (image k/N,
step k/N, ETA), latent previews and each finished image. Stop keeps the images finished so far;
an error becomes a message beside the outputs, which keep the last good run.
"""

from __future__ import annotations

import html
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from PIL import Image

from composers import COMPOSERS
from studio.adapters.library import safe_name
from studio.errors import StudioError
from studio.metadata import save_png
from studio.prompts import format_tag, has_word, parse_prompt, untagged_trigger_warning, untagged_triggers
from studio.sampling import GenerationCancelled, latent_preview

from .common import ACK_TIMEOUT_S, as_int, error_text, jsonable, message, method_defaults, params_shown, parse_params
from .runs import Progress

# What each method does, what it costs (UNet calls per step, n adapters), and when to pick it.
METHOD_GUIDE = {
    "merge": ("All adapters active at once (their deltas summed).", "1 UNet call per step (×2 with CFG batched).",
              "The fast default; fine when the concepts do not fight. On the toy world it turns the second of two "
              "objects into the first."),
    "switch": ("One adapter active per step, switching every `tau` steps.", "1 call per step.",
               "Cheap and keeps each concept cleaner than merge; pick it when merge blends concepts."),
    "composite": ("One branch per adapter, the noise predictions averaged, CFG once.", "n calls per step.",
                  "Better concept fidelity than merge for n adapters, at n× the cost. It averages one prediction "
                  "per adapter, so each concept is guided at about CFG ÷ n: it wants a higher CFG than merge."),
    "cmlora": ("Composite with a dominant adapter per span, frequency-ordered rotation and a feature cache.",
               "≈ n calls per step, fewer with the cache on.",
               "Several adapters of different kinds (object + style + background) where composite loses detail. "
               "Like composite it averages the adapters, so it wants a higher CFG than merge."),
    "clora": ("Base branch + one per adapter; attention maps steer the latents apart and masks fuse the branches.",
              "n + 1 calls per step plus backward passes on the update steps: the slowest.",
              "Two objects that must both appear, separately (e.g. a crescent and a plus), and, with "
              "`background=auto`, an object on a background adapter. Its masks fuse the branches, so it too wants "
              "a higher CFG than merge."),
    "lego": ("A weight-space merge of the adapters (LoRA-LEGO) done once, then one adapter like merge.",
             "1 call per step plus a one-off merge.", "Many adapters at merge speed with less interference."),
}


def method_guide(method: str) -> str:
    """Markdown: what the method does, its cost, when to choose it."""
    what, cost, when = METHOD_GUIDE.get(method, ("", "", ""))
    if not what:
        return ""
    return f"**{method}**: {what}  \n**Cost:** {cost}  \n**Choose it when:** {when}"


def trigger_warnings(prompt: str, adapters, phrase_of) -> list[str]:
    """One line per adapter tagged in ``prompt`` whose trigger word is not in the prompt's text, and one
    per trigger word in the text whose adapter is not tagged."""
    text, tags = parse_prompt(prompt or "")
    out = []
    for tag in tags:
        if tag.name not in adapters:
            continue
        trigger = adapters.get(tag.name).trigger
        if trigger and not has_word(text, trigger):
            phrase = phrase_of(tag.name)
            out.append(f"the prompt lacks {trigger!r}, the trigger of {tag.name}"
                       + (f"; it was taught “{phrase}”" if phrase else ""))
    triggers = {a.name: a.trigger for a in adapters.list()}
    for trigger, names in untagged_triggers(text, {t.name for t in tags}, triggers).items():
        fix = f"{format_tag(names[0], adapters.get(names[0]).weight)} (its card's insert button under the prompt)"
        out.append(untagged_trigger_warning(trigger, names, fix))
    return out


class ComposeTab:
    """Compose actions; mixed into ``AppHandlers`` (needs ``studio``, ``runs``, ``history``, ``out_dir``)."""

    def methods(self) -> list[str]:
        return list(COMPOSERS)

    def method_params(self, method: str) -> str:
        return method_defaults(method)

    def method_guidance(self, method: str) -> float:
        """The CFG scale the slider takes when the user picks ``method``."""
        return self.studio.default_guidance_for(method)

    def method_help(self, method: str) -> str:
        """What the method does, its cost and when to choose it, then its summary and presets."""
        from composers.base import method_help

        cls = COMPOSERS.get(method)
        if cls is None:
            return ""
        text = method_guide(method) + "\n\n" + method_help(cls)
        text += (f"\n\n**CFG:** choosing {method} sets CFG to {self.method_guidance(method):g}, its default on "
                 "this model (picked per method on selection seeds, docs/benchmark.md); change it freely.")
        if cls.presets:
            text += ("\n\nThe Steps, CFG and Sampler fields here are always explicit, so a preset sets only the "
                     "method's parameters; set those fields to the preset's run settings listed above.")
        return text.strip()

    def method_hint(self, prompt: str, method: str, params_json: str) -> tuple[str, Any]:
        """The line under the method picker: the method measured best for the kinds of adapters tagged
        in the prompt (``Studio.suggest_method``), and its "use" button while another method is picked."""
        try:
            pick = self.studio.suggest_method(prompt or "")
        except StudioError:
            pick = None  # a malformed tag; Generate names it
        hidden = gr.Button(visible=False)
        if pick is None:
            return "", hidden
        if pick.method is None:
            return pick.markdown(), hidden
        if pick.same_as(method, params_shown(params_json)):
            return pick.in_use_markdown(), hidden
        return pick.markdown(), gr.Button(f"Use {pick.label}", visible=True)

    def use_suggested_method(self, prompt: str) -> tuple:
        """Method, parameters (its defaults with the pick's), CFG and help for the suggested method."""
        pick = self.studio.suggest_method(prompt or "")
        if pick is None or pick.method is None:
            raise gr.Error("no method is suggested for the adapters in this prompt")
        return pick.method, method_defaults(pick.method, pick.params), self.method_guidance(pick.method), self.method_help(pick.method)

    def parse_card_action(self, action: str | None) -> tuple[str, str]:
        """("insert" | "open", adapter name) from a card's "verb|name|nonce"; ("", "") when it names
        no known adapter (the adapter was deleted since the cards were drawn)."""
        verb, _, rest = (action or "").partition("|")
        name = rest.rpartition("|")[0]
        if verb not in ("insert", "open") or name not in self.studio.adapters:
            return "", ""
        return verb, name

    def insert_tag(self, prompt: str, name: str) -> str:
        """Add the adapter's usable trigger phrase (else its trigger word) and ``<lora:name:weight>``.

        Into an empty prompt goes the adapter's example prompt when known, a whole prompt that draws the
        concept ("a red circle on a wvu background"): a bare phrase ("on a wvu background") has nothing to
        put the background behind. A phrase that starts with a preposition continues the prompt's sentence
        ("a red sks shape on a wvu background"), another object joins with "and" ("a red sks shape and a red ohwx
        shape": on the toy model a comma list with articles drew the plus 2 times in 8, "and" 4, session 25);
        any other phrase is added as a comma-separated item."""
        adapter = self.studio.adapters.get(name)
        tag = format_tag(adapter.name, adapter.weight)
        prompt = (prompt or "").rstrip(" ,")
        if f"<lora:{adapter.name}:" in prompt:
            return prompt
        phrase = self.phrase_of(name) or adapter.trigger
        if adapter.trigger and has_word(prompt, adapter.trigger):  # the user wrote the trigger already
            phrase = None
        if phrase and phrase not in prompt:
            first = phrase.split()[0].lower()
            if not prompt:
                prompt = self.example_of(name) or phrase
            elif first in ("on", "with", "in"):
                prompt = f"{prompt} {phrase}"
            elif first in ("a", "an"):  # another object: the world's "and" form
                prompt = f"{prompt} and {phrase}"
            else:
                prompt = f"{prompt}, {phrase}"
        return f"{prompt} {tag}".strip()

    def reuse_seed(self, last_seed) -> int:
        return -1 if last_seed is None else int(last_seed)

    def stop(self, request: gr.Request | None = None) -> str:
        """Interrupt this user's running generations at the next step."""
        return self.runs.stop(request, "generate")

    def generate(
        self, prompt: str, negative_prompt: str = "", method: str = "merge", params_json: str = "",
        sampler: str = "ddim", seed=-1, steps=25, guidance=7.5, width=None, height=None, batch_count=1,
        request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """Run ``Studio.run`` in a worker thread; yield progress, previews and finished images.

        Yields (gallery, preview, info, report, extras, last_seed, status). The gallery holds PNGs
        written with ``save_png`` so their ``parameters`` and ``lora_studio`` chunks survive. Stop
        keeps the finished images; an error leaves the outputs as they were and says why in status.
        """
        keep = (gr.skip(),) * 6
        try:
            if not (prompt or "").strip():
                raise gr.Error("the prompt is empty; describe the image, e.g. 'a red circle <lora:name:0.8>'")
            kwargs = dict(
                method=method, method_params=parse_params(params_json), sampler=sampler,
                seed=as_int(seed if seed not in (None, "") else -1, "seed"), steps=as_int(steps, "steps"),
                guidance=float(guidance),
                width=as_int(width, "width") if width else None, height=as_int(height, "height") if height else None,
                num_images=as_int(batch_count, "batch count"), negative_prompt=negative_prompt or "",
                batch_size=self.batch_size,
            )
            from studio.schema import check_request

            size = self.studio.default_size  # over the bounds: refused here, never handed to a worker
            check_request(self.studio.limits.for_model(size), prompt=prompt, negative_prompt=kwargs["negative_prompt"],
                          steps=kwargs["steps"], guidance=kwargs["guidance"], width=kwargs["width"] or size,
                          height=kwargs["height"] or size, seed=kwargs["seed"], num_images=kwargs["num_images"],
                          sampler=sampler, method=method)
            warned = "".join(f"  \n{message(w, 'warning')}" for w in
                             trigger_warnings(prompt, self.studio.adapters, self.phrase_of))
        except (gr.Error, StudioError, ValueError) as e:
            yield *keep, message(error_text(e))
            return
        every = self.preview_every or max(1, kwargs["steps"] // 8)
        progress = Progress(kwargs["num_images"], kwargs["steps"])
        events: queue.Queue = queue.Queue()
        key, stop = self.runs.register(request, "generate")
        acked = threading.Semaphore(0)
        pending = [0]
        done = [0]

        def on_step(i: int, total: int, latents) -> None:
            # Hand every step to the request; run at most one step ahead of what it has passed on.
            # A request Gradio cancelled is never resumed, gets closed, and sets ``stop``: the loop
            # then ends within two steps (the one running and at most one more).
            if i + 1 >= total:
                return
            preview = latent_preview(latents) if (i + 1) % every == 0 else None
            events.put(("step", (done[0], i + 1, preview)))
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

        def on_image(i: int, image, recipe) -> None:
            done[0] = i + 1
            events.put(("image", (image, recipe)))

        def work():
            return self.studio.run(prompt, on_step=on_step, on_image=on_image, should_stop=stop.is_set,
                                   progress=False, **kwargs)

        started = time.perf_counter()
        folder = self.out_dir / time.strftime("%Y-%m-%d")
        gallery: list[tuple[str, str]] = []
        seeds: list[int] = []
        worker, box = self.runs.start_worker(work)
        stopping_shown = False
        try:
            while True:
                if stop.is_set() and not stopping_shown and worker.is_alive():
                    # the only writer of the status line is this run, so "Stopping…" never outlives it
                    stopping_shown = True
                    yield (*(gr.skip(),) * 6, message("Stopping… (the images finished so far are kept)", "info"))
                try:
                    kind, payload = events.get(timeout=0.1)
                except queue.Empty:
                    if worker.is_alive():
                        continue
                    kind, payload = "end", None
                if kind == "step":
                    image_index, step, preview = payload
                    yield (gr.skip(), gr.skip() if preview is None else preview, gr.skip(), gr.skip(), gr.skip(),
                           gr.skip(), gr.skip() if stopping_shown else progress.line(image_index, step) + warned)
                    acked.release()
                    continue
                if kind == "image":
                    image, recipe = payload
                    path = save_png(image, folder / f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}-{recipe.seed}.png")
                    gallery.append((str(path), f"seed {recipe.seed}"))
                    seeds.append(recipe.seed)
                    # the info line describes the images shown: the last run's report and maps go
                    info = _partial_info(len(gallery), kwargs["num_images"], seeds, started, "so far")
                    first = len(gallery) == 1
                    yield (list(gallery), gr.skip(), info, {} if first else gr.skip(), [] if first else gr.skip(),
                           gr.skip(), gr.skip() if stopping_shown else
                           progress.line(len(gallery) - 1, kwargs["steps"]) + warned)
                    continue
                break  # the worker has ended: its result or error is in the box
            error = box.get("error")
            if isinstance(error, GenerationCancelled):
                kept = f"{len(gallery)} of {kwargs['num_images']} image(s) kept" if gallery else "no image was finished"
                self._remember(gallery, f"{method} · stopped · {prompt[:60]}")
                if gallery:
                    info = _partial_info(len(gallery), kwargs["num_images"], seeds, started, "kept (stopped)")
                    yield (list(gallery), None, info, {}, [], seeds[0], message(f"Stopped: {kept}.", "info"))
                else:  # the outputs still show the last good run, and its info
                    yield (gr.skip(), None, gr.skip(), gr.skip(), gr.skip(), gr.skip(), message(f"Stopped: {kept}.", "info"))
                return
            if error is not None:
                if not isinstance(error, (StudioError, gr.Error)):  # a bug: one line here, the traceback in a log
                    from studio.cli import log_bug

                    error = StudioError(f"internal error (a bug, please report it): {type(error).__name__}: "
                                        f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}; "
                                        f"traceback in {log_bug(error)}")
                partial = f" ({len(gallery)} image(s) finished before it are shown)" if gallery else ""
                yield (list(gallery) if gallery else gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                       message(error_text(error) + partial))
                return
            result = box["result"]
            outs = self._finish(result, gallery, folder, started)
            self._remember(gallery, f"{method} · {prompt[:60]}")
            yield *outs, message(f"Done: {len(gallery)} image(s).", "info") + warned
        finally:
            stop.set()  # a closed generator (client cancel) ends the worker at its next step
            self.runs.unregister(key, stop)

    def _remember(self, gallery: list[tuple[str, str]], summary: str) -> None:
        self.history.add("compose", [p for p, _ in gallery], summary)

    def _finish(self, result, gallery: list[tuple[str, str]], folder: Path, started: float) -> tuple:
        """(gallery, preview, info, report, extras, last seed) of a finished run."""
        report = result.report or {}
        extras = self._report_images(report, folder, result.images[0].size if result.images else None)
        seeds = ", ".join(str(r.seed) for r in result.recipes)
        scores = self._scores(result)
        used = {a.name: a.weight for a in result.recipes[0].adapters} if result.recipes else {}
        info = (f"**{len(gallery)} image(s)** · seed {seeds} · {time.perf_counter() - started:.2f} s in all "
                f"({report.get('seconds', 0):.2f} s sampling) · {report.get('unet_calls', '?')} UNet calls · "
                f"method {report.get('method', '?')} · adapters "
                + (", ".join(f"**{html.escape(n)}** {w:g}" for n, w in used.items()) or "none"))
        info += _cmlora_timeline(report) + scores
        shown = {"adapters": used, **jsonable(report)}  # which adapters at which weights, then the composer's own
        return list(gallery), None, info, shown, extras, result.recipes[0].seed if result.recipes else None

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



def _partial_info(done: int, total: int, seeds: list[int], started: float, state: str) -> str:
    """The info line of a run still going or stopped: ``**2 of 4 image(s) kept (stopped)** · seed 7, 8 · 3.1 s``."""
    return (f"**{done} of {total} image(s) {state}** · seed {', '.join(str(s) for s in seeds)} · "
            f"{time.perf_counter() - started:.2f} s")


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
