"""Named adapters loaded for one base model, validated before they can touch it."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from ..errors import AdapterFileError, AdapterMismatchError
from .adapter import Adapter

_NAME_RE = re.compile(r"[^A-Za-z0-9_.\-]+")


def safe_name(name: str) -> str:
    """A library name usable in ``<lora:name>`` tags and as a file stem (no paths, no spaces)."""
    cleaned = _NAME_RE.sub("_", os.path.basename(name)).strip("._") or "adapter"
    return cleaned[:80]


class AdapterLibrary:
    """Adapters by name for one base model. Thread-safe; validates shapes and architecture on load."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], arch: str):
        self._shapes = shapes
        self._arch = arch
        self._items: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shapes of the base model's adaptable modules (what adapters are checked against)."""
        return self._shapes

    def load(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        weight: float | None = None,
        trigger: str | None = None,
        kind: str | None = None,
        concept: str | None = None,
        allow_pickle: bool = False,
    ) -> Adapter:
        """Read an adapter file in any supported format, check it against the base, and add it."""
        from .formats import read_adapter

        adapter = read_adapter(path, name=name, allow_pickle=allow_pickle, module_names=self._shapes)
        adapter.name = safe_name(name or adapter.name or Path(path).stem)
        if weight is not None:
            adapter.weight = float(weight)
        adapter.trigger = trigger or adapter.trigger
        adapter.concept_kind = kind or adapter.concept_kind
        adapter.concept = concept or adapter.concept
        return self.add(adapter)

    def add(self, adapter: Adapter) -> Adapter:
        """Add an in-memory adapter (trained or merged) after validating it."""
        from .formats import validate_adapter

        if not adapter.layers and not adapter.embeddings:
            raise AdapterFileError(f"adapter {adapter.name!r} has no layers; check the file was written completely")
        if not adapter.is_finite():
            raise AdapterFileError(f"adapter {adapter.name!r} contains NaN or inf values; retrain or re-export it")
        validate_adapter(adapter, self._shapes, self._arch)
        adapter.name = safe_name(adapter.name)
        with self._lock:
            self._items[adapter.name] = adapter
        return adapter

    def get(self, name: str) -> Adapter:
        with self._lock:
            if name not in self._items:
                known = ", ".join(sorted(self._items)) or "none loaded"
                raise AdapterMismatchError(
                    f"no adapter named {name!r} in the library (known: {known}); load it with studio.adapters.load(path)"
                )
            return self._items[name]

    def remove(self, name: str) -> None:
        with self._lock:
            if self._items.pop(name, None) is None:
                raise AdapterMismatchError(f"no adapter named {name!r} to remove; see studio.adapters.list()")

    def list(self) -> list[Adapter]:
        with self._lock:
            return list(self._items.values())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
