"""PNG metadata: A1111's ``parameters`` infotext plus a JSON ``lora_studio`` recipe chunk."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from .atomic import atomic_path
from .errors import StudioError

SCHEMA = 1
RECIPE_KEY = "lora_studio"


@dataclass
class AdapterUse:
    name: str
    weight: float
    te_weight: float
    sha256: str | None
    path: str | None
    type: str = "lora"


@dataclass
class Recipe:
    """Everything needed to reproduce one image."""

    prompt: str  # as typed, with <lora:…> tags
    negative_prompt: str
    steps: int
    guidance: float
    sampler: str
    seed: int
    width: int
    height: int
    model: str
    arch: str
    method: str
    method_params: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)  # the composer's effective settings (te_mode, preset, schedule)
    from_preset: dict = field(default_factory=dict)  # run settings that came from a named preset
    adapters: list[AdapterUse] = field(default_factory=list)
    generator_device: str = "cpu"
    version: str = ""
    packages: dict = field(default_factory=dict)
    model_hash: str = ""  # A1111's 10-hex "Model hash" (see base.model_hash)
    schema: int = SCHEMA

    def to_json(self) -> str:
        text = json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a non-UTF-8 file name (surrogate escapes): JSON escapes keep it exactly
            text = json.dumps(asdict(self), ensure_ascii=True, sort_keys=True)
        return text

    @classmethod
    def from_json(cls, text: str, where: str = "the recipe") -> "Recipe":
        """Parse and validate (``schema.RecipeModel``): a RecipeError names the bad field."""
        from .schema import parse_recipe_json

        data = parse_recipe_json(text, where, SCHEMA)
        data["adapters"] = [AdapterUse(**a) for a in data.get("adapters", [])]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


def infotext(recipe: Recipe, sampler_label: str) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt:`` line, a line of ``Key: value`` pairs.

    The ``Negative prompt:`` line is written even when empty: ComfyUI's A1111 importer builds
    nothing from an infotext without it.
    """
    pairs = [
        ("Steps", recipe.steps),
        ("Sampler", sampler_label),
        ("CFG scale", f"{recipe.guidance:g}"),
        ("Seed", recipe.seed),
        ("Size", f"{recipe.width}x{recipe.height}"),
    ]
    if recipe.model_hash:
        pairs.append(("Model hash", recipe.model_hash))
    pairs.append(("Model", recipe.model))
    if recipe.adapters:
        pairs.append(("Lora hashes", ", ".join(f"{a.name}: {(a.sha256 or '')[:12]}" for a in recipe.adapters)))
    pairs.append(("Composition", recipe.method))
    if recipe.method_params:
        pairs.append(("Composition params", json.dumps(recipe.method_params, sort_keys=True)))
    if recipe.effective:
        pairs.append(("Composition effective", json.dumps(recipe.effective, sort_keys=True)))
    if recipe.from_preset:
        pairs.append(("From preset", json.dumps(recipe.from_preset, sort_keys=True)))
    pairs.append(("Version", f"lora-studio {recipe.version}"))
    lines = [recipe.prompt, f"Negative prompt: {recipe.negative_prompt}"]  # "Negative prompt: " even when empty
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """Read an A1111 infotext back into {"Prompt", "Negative prompt", key: value…}."""
    lines = text.strip().split("\n")
    last = lines.pop()
    result: dict = {}
    pos, n = 0, len(last)
    while pos < n:
        colon = last.find(":", pos)
        if colon < 0:
            break
        key = last[pos:colon].strip()
        pos = colon + 1
        while pos < n and last[pos] == " ":
            pos += 1
        if pos < n and last[pos] == '"':
            value, end = json.JSONDecoder().raw_decode(last, pos)
            pos = end
        else:
            end = last.find(",", pos)
            end = n if end < 0 else end
            value, pos = last[pos:end].strip(), end
        result[key] = value
        pos = last.find(",", pos)
        pos = n if pos < 0 else pos + 1
    negative = [l for l in lines if l.startswith("Negative prompt:")]
    result["Prompt"] = "\n".join(l for l in lines if not l.startswith("Negative prompt:"))
    result["Negative prompt"] = negative[0][len("Negative prompt:"):].strip() if negative else ""
    return result


def png_info(recipe: Recipe, sampler_label: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(recipe, sampler_label))
    info.add_itxt(RECIPE_KEY, recipe.to_json(), zip=True)
    return info


def attach(image: Image.Image, recipe: Recipe, sampler_label: str) -> Image.Image:
    """Keep the recipe on a PIL image so ``save_png`` (and Gradio paths) carry it."""
    image.info["parameters"] = infotext(recipe, sampler_label)
    image.info[RECIPE_KEY] = recipe.to_json()
    image.info["_sampler_label"] = sampler_label
    return image


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write the PNG with its metadata atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    if RECIPE_KEY in image.info:
        info.add_itxt(RECIPE_KEY, image.info[RECIPE_KEY], zip=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_recipe(path_or_image) -> Recipe:
    """The recipe stored in a PNG written by the studio, validated.

    A missing or non-PNG file, text chunks over ``max_recipe_bytes``, an image over
    ``max_png_pixels`` (decompression bombs) and a malformed recipe raise a one-line RecipeError;
    the pixels are never decoded.
    """
    from .schema import Limits, RecipeError

    limits = Limits.from_env()
    if isinstance(path_or_image, Image.Image):
        image, where = path_or_image, getattr(path_or_image, "filename", "") or "the image"
        text = image.info.get(RECIPE_KEY) or getattr(image, "text", {}).get(RECIPE_KEY)
    else:
        where = os.fsdecode(path_or_image)
        path = Path(where)
        if not path.is_file():
            raise RecipeError(f"{where} not found (or not a file); check the path to the PNG")
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise RecipeError(f"{where} is not a PNG file; only PNGs saved by the studio carry a recipe")
        text = _png_recipe_text(path, limits, where)
    if not text:
        raise RecipeError(f"{where} has no lora_studio recipe; only PNGs saved by the studio can be reproduced")
    return Recipe.from_json(text, where)


def _png_recipe_text(path: Path, limits, where: str) -> str | None:
    """The ``lora_studio`` chunk, read with PIL's chunk limits set from ``limits`` (no pixel decode)."""
    import warnings
    import zlib

    from .schema import RecipeError, env_name

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
                if w * h > limits.max_png_pixels:
                    raise RecipeError(f"{where} is {w}×{h} pixels, over the bound of {limits.max_png_pixels} "
                                      f"({env_name('max_png_pixels')}); it is not an image the studio wrote")
                text = image.info.get(RECIPE_KEY)  # chunks before IDAT, where save_png writes them
    except RecipeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RecipeError(f"{where} is a decompression bomb (too many pixels); it is not an image the studio wrote") from None
    except ValueError as e:
        if "too large" not in str(e):
            raise RecipeError(f"{where} is not a readable PNG ({str(e).splitlines()[0][:100]}); pass a PNG saved by the studio") from None
        raise RecipeError(f"{where}: its text chunks are over the size bound (about {limits.max_recipe_bytes} bytes, "
                          f"{env_name('max_recipe_bytes')}); it is not an image the studio wrote") from None
    except (OSError, SyntaxError, zlib.error, EOFError) as e:
        raise RecipeError(f"{where} is not a readable PNG ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); "
                          "pass a PNG saved by the studio") from None
    return text
