"""PNG info tab: read a dropped image's recipe or A1111 parameters; send them to Compose."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import gradio as gr
from PIL import Image

from composers import COMPOSERS
from studio.base import resolve_sampler
from studio.errors import StudioError
from studio.metadata import RECIPE_KEY, parse_infotext, read_recipe
from studio.prompts import parse_prompt

from .common import SAMPLERS, float_or_none, int_or_none, try_json


class PngInfoTab:
    """PNG info actions; mixed into ``AppHandlers``."""

    def read_png(self, path: str | None) -> tuple:
        """(image path, infotext, recipe JSON, status, fields for Compose) of a dropped PNG."""
        if not path:
            return None, "", {}, "", {}
        from studio.schema import Limits

        try:
            image = Image.open(path)
            if image.size[0] * image.size[1] > Limits.from_env().max_png_pixels:  # a decompression bomb: never decoded
                return None, "", {}, f"Error: {Path(path).name} has too many pixels (bound: STUDIO_MAX_PNG_PIXELS).", {}
            image.load()  # text chunks after IDAT (A1111 writes some there) are read with the pixels
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
                method=p.get("Composition"), params=try_json(p.get("Composition params")),
                sampler=_sampler_or_none(p.get("Sampler"), p.get("Schedule type")),
                seed=int_or_none(p.get("Seed")), steps=int_or_none(p.get("Steps")),
                guidance=float_or_none(p.get("CFG scale")),
                width=int_or_none(size[0]) if len(size) == 2 else None,
                height=int_or_none(size[1]) if len(size) == 2 else None,
            ).items() if v is not None}
            status = "A1111 parameters found (no studio recipe)."
        else:
            return path, "", {}, "No generation parameters in this image (was it re-encoded, e.g. as WebP?).", {}
        missing = [t.name for t in parse_prompt(fields.get("prompt") or "")[1] if t.name not in self.studio.adapters]
        if missing:
            status += f" Not in the library: {', '.join(missing)}; load them before generating."
        return path, text, recipe_json, status, fields

    def send_to_compose(self, fields: dict | None) -> tuple:
        """Compose inputs from PNG fields: prompt, negative, method, params, sampler, seed, steps, guidance, w, h, batch."""
        f = fields or {}
        method = f.get("method") if f.get("method") in COMPOSERS else None
        return (
            f.get("prompt", gr.skip()), f.get("negative_prompt", gr.skip()), method or gr.skip(),
            json.dumps(f["params"], indent=1, sort_keys=True) if isinstance(f.get("params"), dict) else gr.skip(),
            f.get("sampler") if f.get("sampler") in SAMPLERS else gr.skip(),
            f.get("seed", gr.skip()), f.get("steps", gr.skip()), f.get("guidance", gr.skip()),
            f.get("width", gr.skip()), f.get("height", gr.skip()), 1,  # batch count 1: this image again
        )


def _sampler_or_none(label, schedule) -> str | None:
    """Our sampler name for an A1111 ``Sampler`` (+ ``Schedule type``), None when unknown."""
    try:
        return resolve_sampler(label, schedule) if label else None
    except StudioError:
        return None
