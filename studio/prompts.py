"""A1111 prompt syntax: ``<lora:NAME:TE[:UNET[:DYN]]>`` tags (also ``te=``, ``unet=``, ``dyn=``)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .errors import GenerationError

_TAG = re.compile(r"<lora:([^>]*)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split a prompt into the text the encoder sees and its ``<lora:…>`` tags."""
    tags = []
    for body in _TAG.findall(prompt):
        parts = body.split(":")
        name, rest = parts[0].strip(), parts[1:]
        if not name:
            raise GenerationError(f"empty adapter name in <lora:{body}>; write <lora:NAME:WEIGHT>")
        positional, named = [], {}
        for p in rest:
            if "=" in p:
                k, v = p.split("=", 1)
                named[k.strip()] = v
            else:
                positional.append(p)
        keys = ["te", "unet", "dyn"]
        values = dict(zip(keys, positional)) | named
        try:
            te = float(values.get("te", 1.0))
            unet = float(values.get("unet", te))
        except ValueError:
            raise GenerationError(f"bad weight in <lora:{body}>; weights are numbers, e.g. <lora:{name}:0.8>") from None
        if "dyn" in values:
            warnings.warn(f"<lora:{body}>: DYN (rank limit) is not supported and is ignored", stacklevel=2)
        tags.append(LoraTag(name, te, unet))
    text = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip(" ,")
    return text, tags


def format_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"
