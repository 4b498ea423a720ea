"""Shared pieces of the app's tabs: constants, argument parsing, message formatting."""

from __future__ import annotations

import html
import importlib
import json
from typing import Any

import gradio as gr
from PIL import Image

from composers import COMPOSERS
from studio.base import SAMPLERS as _SAMPLER_TABLE

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAMPLERS = tuple(_SAMPLER_TABLE)
SAMPLER_CHOICES = [(label, key) for key, (label, _, _) in _SAMPLER_TABLE.items()]  # (A1111 label shown, value)
XY_AXES = ("Nothing", "Seed", "Steps", "CFG scale", "Method", "Prompt S/R")
XY_MAX_CELLS = 64
ACK_TIMEOUT_S = 30.0  # a step not passed on to the request within this long: the request is gone, stop
CONCEPT_KINDS = ("", "object", "style", "background", "character")


def optional(module: str, attr: str | None = None) -> Any:
    """A module (or one of its attributes) another feature provides, or None while it is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, attr, None) if attr else mod


def method_defaults(method: str, overrides: dict | None = None) -> str:
    """The method's parameters with their defaults (``overrides`` on top), as editable JSON."""
    cls = COMPOSERS.get(method)
    return json.dumps({**(cls.defaults if cls else {}), **(overrides or {})}, indent=1, sort_keys=True)


def params_shown(text: str | None) -> dict:
    """The JSON object in the parameters box, or {} when it holds none (for display; Generate's
    ``parse_params`` names the error)."""
    try:
        params = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return params if isinstance(params, dict) else {}


def parse_params(text: str | None) -> dict:
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


def as_int(value, label: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a whole number, got {value!r}") from None
    if f != int(f):
        raise gr.Error(f"{label} must be a whole number, got {value!r}")
    return int(f)



def session_id(request) -> str:
    return getattr(request, "session_hash", None) or "local"



def jsonable(value, depth: int = 0):
    """The report for display: tensors and images summarised, the rest kept."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value[:200]]
    if isinstance(value, Image.Image):
        return f"<image {value.size[0]}×{value.size[1]}>"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<array {tuple(value.shape)}>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)



def try_json(text):
    if not text:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def int_or_none(text):
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def float_or_none(text):
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return None


def message(text: str, level: str = "error") -> str:
    """A status line for a Markdown output: HTML-escaped, so ``<lora:a:1>`` in it stays visible."""
    icon = {"error": "⚠ **Error:**", "warning": "⚠", "info": ""}[level]
    return f"{icon} {html.escape(str(text), quote=False)}".strip()


def error_text(e: BaseException) -> str:
    """The one-line text of a studio or Gradio error."""
    return str(getattr(e, "message", None) or e).splitlines()[0] if str(e) else type(e).__name__
