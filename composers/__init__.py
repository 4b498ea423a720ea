"""Composition methods: the registry. A new method is one file here and one line below."""

from __future__ import annotations

from studio.errors import GenerationError

from .base import Composer
from .merge import MergeComposer
from .switch import SwitchComposer
from .composite import CompositeComposer
from .cmlora import CMLoRAComposer
from .clora import CLoRAComposer
from .lego import LegoComposer

COMPOSERS: dict[str, type[Composer]] = {
    "merge": MergeComposer,
    "switch": SwitchComposer,
    "composite": CompositeComposer,
    "cmlora": CMLoRAComposer,
    "clora": CLoRAComposer,
    "lego": LegoComposer,
}


def make_composer(method: str, params: dict | None = None) -> Composer:
    """A fresh composer of this method; unknown methods and parameters raise with the valid ones."""
    if method not in COMPOSERS:
        raise GenerationError(f"unknown method {method!r}; choose one of {', '.join(COMPOSERS)}")
    return COMPOSERS[method](**(params or {}))
