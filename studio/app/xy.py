"""X/Y grid tab: sweep up to two axes over the Compose settings (A1111's X/Y plot)."""

from __future__ import annotations

import os
import time
import uuid
from typing import Callable, Iterator

import gradio as gr
from PIL import Image

from composers import COMPOSERS
from studio.errors import StudioError
from studio.metadata import save_png
from studio.sampling import GenerationCancelled

from .common import XY_AXES, XY_MAX_CELLS, as_int, error_text, message, parse_params
from .runs import Progress


class XYTab:
    """X/Y actions; mixed into ``AppHandlers``."""

    def stop_xy(self, request: gr.Request | None = None) -> str:
        return self.runs.stop(request, "xy")

    def xy_grid(
        self, prompt: str, negative_prompt: str = "", method: str = "merge", params_json: str = "",
        sampler: str = "ddim", seed=-1, steps=25, guidance=7.5, width=None, height=None,
        x_type: str = "Seed", x_values: str = "", y_type: str = "Nothing", y_values: str = "",
        request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """The cells' images, then a labelled grid; yields (grid, cells, info) as cells finish.

        Cells that differ only in their seed are drawn in one batched ``Studio.run`` (each image
        keeps its seed; equal to a one-image run within float rounding).

        ``Prompt S/R``: the first value is searched in the prompt and replaced by each value in
        turn (weight sweeps). Stop keeps the cells done; errors are messages in ``info``.
        """
        try:
            base = dict(prompt=prompt, negative_prompt=negative_prompt or "", method=method,
                        method_params=parse_params(params_json), sampler=sampler,
                        seed=as_int(seed if seed not in (None, "") else -1, "seed"), steps=as_int(steps, "steps"),
                        guidance=float(guidance), width=as_int(width, "width") if width else None,
                        height=as_int(height, "height") if height else None)
            if base["seed"] < 0:  # one random seed for every cell, so cells differ only along the axes
                base["seed"] = int.from_bytes(os.urandom(4), "big")
            xs = _axis(x_type, x_values, base, self.studio.default_guidance_for)
            ys = _axis(y_type, y_values, base, self.studio.default_guidance_for)
            if len(xs) * len(ys) > XY_MAX_CELLS:
                raise gr.Error(f"{len(xs)}×{len(ys)} cells is more than {XY_MAX_CELLS}; use fewer values")
        except (gr.Error, StudioError, ValueError) as e:
            yield gr.skip(), gr.skip(), message(error_text(e))
            return
        key, stop = self.runs.register(request, "xy")
        jobs = [(" · ".join(l for l in (x_label, y_label) if l), _cell(base, x_type, x_set, y_type, y_set))
                for y_label, y_set in ys for x_label, x_set in xs]
        progress = Progress(len(jobs), 1, unit="cell")
        folder = self.out_dir / time.strftime("%Y-%m-%d")
        done: dict[int, tuple[str, Image.Image]] = {}  # cell index -> (PNG path, image)

        def finished() -> list[tuple[str, str]]:
            return [(done[i][0], jobs[i][0]) for i in sorted(done)]

        try:
            for group in _seed_batches(jobs):  # cells that differ only in their seed share every UNet call
                yield gr.skip(), gr.skip(), progress.line(len(done), 0).replace(" · step 0/1", "")
                params = {k: v for k, v in jobs[group[0]][1].items() if k != "seed"}
                text = params.pop("prompt")
                try:
                    result = self.studio.run(text, seeds=[jobs[i][1]["seed"] for i in group],
                                             should_stop=stop.is_set, progress=False, **params)
                except GenerationCancelled:
                    self.history.add("xy", [p for p, _ in finished()], f"X/Y stopped · {prompt[:60]}")
                    yield gr.skip(), finished(), message(f"Stopped: the grid is incomplete; {len(done)} cell(s) kept.", "info")
                    return
                except StudioError as e:
                    yield gr.skip(), finished(), message(f"cell {jobs[group[0]][0]}: {error_text(e)}")
                    return
                for i, image, recipe in zip(group, result.images, result.recipes):
                    path = save_png(image, folder / f"xy-{uuid.uuid4().hex[:8]}-{recipe.seed}.png")
                    done[i] = (str(path), image)
                yield gr.skip(), finished(), gr.skip()
        finally:
            self.runs.unregister(key, stop)
        images = [done[i][1] for i in range(len(jobs))]
        cells = finished()
        grid = labelled_grid(images, [l for l, _ in xs], [l for l, _ in ys])
        grid_path = save_png(grid, folder / f"grid-{uuid.uuid4().hex[:8]}.png")
        self.history.add("xy", [str(grid_path)], f"X/Y {x_type} × {y_type} · {prompt[:60]}")
        elapsed = time.perf_counter() - progress.started
        yield str(grid_path), cells, f"**{len(cells)} cells** · seed {base['seed']} · {elapsed:.2f} s"


def _cell(base: dict, x_type: str, x_set: dict, y_type: str, y_set: dict) -> dict:
    """One cell's Studio.run arguments; a CFG axis beats the CFG a Method axis brings along."""
    cell = {**base, **y_set, **x_set}
    for kind, chosen in ((x_type, x_set), (y_type, y_set)):
        if kind == "CFG scale":
            cell["guidance"] = chosen["guidance"]
    return cell


def _seed_batches(jobs: list[tuple[str, dict]]) -> list[list[int]]:
    """Indices of the cells, grouped by everything but the seed (first-seen order)."""
    groups: dict[str, list[int]] = {}
    for i, (_, params) in enumerate(jobs):
        groups.setdefault(repr(sorted((k, v) for k, v in params.items() if k != "seed")), []).append(i)
    return list(groups.values())


def _axis(kind: str, values: str, base: dict, method_cfg: Callable[[str], float]) -> list[tuple[str, dict]]:
    """(label, Studio.run overrides) per value of one X/Y axis. On a Method axis the base method
    keeps the form's parameters and CFG; another method runs at its defaults and at
    ``method_cfg(method)``, its default CFG on this model (so a comparison is fair unless the
    other axis sweeps CFG, which then wins)."""
    if kind in (None, "", "Nothing"):
        return [("", {})]
    items = [v.strip() for v in (values or "").split(",") if v.strip()]
    if not items:
        raise gr.Error(f"the {kind} axis has no values; write them comma-separated, e.g. 1, 2, 3")
    if kind == "Seed":
        return [(f"seed {v}", {"seed": as_int(v, "seed")}) for v in items]
    if kind == "Steps":
        return [(f"steps {v}", {"steps": as_int(v, "steps")}) for v in items]
    if kind == "CFG scale":
        try:
            return [(f"CFG {float(v):g}", {"guidance": float(v)}) for v in items]
        except ValueError:
            raise gr.Error(f"CFG values must be numbers, got {values!r}") from None
    if kind == "Method":
        unknown = [v for v in items if v not in COMPOSERS]
        if unknown:
            raise gr.Error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(COMPOSERS)}")

        def cell(v: str) -> tuple[str, dict]:
            if v == base["method"]:
                return v, {"method": v, "method_params": base["method_params"]}
            cfg = method_cfg(v)
            return f"{v} (CFG {cfg:g})", {"method": v, "method_params": {}, "guidance": cfg}

        return [cell(v) for v in items]
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


def seed_axis_from(fields: dict | None, x_type: str, x_values: str) -> tuple[str, str]:
    """The X axis after "Send to X/Y": the user's axis when it has values, else four seeds from the image's."""
    seed = (fields or {}).get("seed")
    if (x_values or "").strip() or not isinstance(seed, int) or seed < 0:
        return x_type, x_values
    return "Seed", ", ".join(str(seed + i) for i in range(4))
