"""The adapter library on disk, like A1111's ``models/Lora`` folder.

A folder (default ``outputs/library/``) holds every uploaded, trained or merged adapter as
``NAME.safetensors`` with a small JSON sidecar ``NAME.json`` (trigger, trigger phrase, concept,
kind, preferred weight, preview image, hash, source) and an optional preview ``NAME.png``. The
folder is scanned at start-up; edits rewrite the sidecar at once (atomically); deleting moves the
files to ``.trash/``. Read-only demo adapters (``assets/adapters``) are loaded from where they are;
edits to them are kept as sidecars in the library folder too, so they survive a restart.

The store holds no per-user state; its lock only serialises writes to the folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path, write_atomic
from ..errors import AdapterMismatchError, StudioError
from .adapter import Adapter
from .library import AdapterLibrary, safe_name

KINDS = ("object", "style", "background", "character")
TRASH = ".trash"


@dataclass
class Sidecar:
    """What the library remembers about an adapter beyond its tensors."""

    trigger: str | None = None
    trigger_phrase: str | None = None  # a phrase the adapter was taught, e.g. "on a wvu background"
    example_prompt: str | None = None  # a whole prompt that draws it, e.g. "a red circle on a wvu background"
    concept: str | None = None
    kind: str | None = None  # object / style / background / character
    weight: float = 1.0
    preview: str | None = None  # file name of the preview image, next to the sidecar
    sha256: str | None = None
    source: str = "upload"  # upload / trained / merged / demo
    file: str | None = None  # the adapter file when it lives outside the folder (demo adapters)
    hidden: bool = False  # a demo adapter the user deleted
    added: float = field(default_factory=time.time)

    @classmethod
    def read(cls, path: Path) -> "Sidecar | None":
        """The sidecar at ``path``, or None when missing or unreadable (never raises)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None


def derive_phrase(example_prompt: str | None, trigger: str | None) -> str | None:
    """The part of an example prompt that carries the trigger: ``on a wvu background``,
    ``with kpk pattern``, or the whole prompt for an object (``a red sks shape``)."""
    if not example_prompt:
        return None
    text = example_prompt.strip()
    if trigger and trigger in text:
        m = re.search(rf"\b(on|with|in)\b[^,]*?\b{re.escape(trigger)}\b.*$", text)
        if m:
            return m.group(0).strip()
    return text


def read_index(folder: str | os.PathLike) -> dict[str, dict]:
    """``index.json`` of a demo adapter folder (name -> entry), or {} when absent."""
    path = Path(folder) / "index.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class AdapterStore:
    """An ``AdapterLibrary`` kept in step with a folder of adapter files and JSON sidecars."""

    def __init__(self, library: AdapterLibrary, folder: str | os.PathLike):
        self.library = library
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._meta: dict[str, Sidecar] = {}
        self._lock = threading.RLock()

    # ---- start-up -------------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Load every ``*.safetensors`` of the folder with its sidecar; one message per file."""
        messages = []
        for path in sorted(self.folder.glob("*.safetensors")):
            side = Sidecar.read(path.with_suffix(".json")) or Sidecar(source="upload")
            try:
                adapter = self.library.load(path, name=path.stem)
            except StudioError as e:
                messages.append(f"skipped {path.name}: {e}")
                continue
            self._apply(adapter, side)
            messages.append(f"library: {adapter.name}")
        return messages

    def load_demos(self, folder: str | os.PathLike) -> list[str]:
        """Load the demo adapters of ``folder`` in place (read-only), with ``index.json``'s trigger
        phrase and the sample in ``samples/`` as preview; edits kept in this store's sidecars win."""
        folder = Path(folder)
        index = read_index(folder)
        messages = []
        for path in sorted(folder.glob("*.safetensors")):
            if (self.folder / path.name).exists() or path.stem in self.library:
                messages.append(f"skipped {path.name}: the library already has {path.stem!r}")
                continue
            saved = Sidecar.read(self.folder / f"{path.stem}.json")
            if saved is not None and saved.hidden:
                messages.append(f"hidden {path.stem} (deleted in the app; remove {self.folder / path.stem}.json to restore)")
                continue
            try:
                adapter = self.library.load(path, name=path.stem)
            except StudioError as e:
                messages.append(f"skipped {path.name}: {e}")
                continue
            entry = index.get(adapter.name) or index.get(path.stem) or {}
            sample = folder / "samples" / f"{path.stem}.png"
            side = saved or Sidecar(
                trigger=entry.get("trigger") or adapter.trigger, concept=entry.get("concept") or adapter.concept,
                kind=entry.get("kind") or adapter.concept_kind, weight=adapter.weight,
                trigger_phrase=entry.get("trigger_phrase") or derive_phrase(entry.get("example_prompt"),
                                                                            entry.get("trigger") or adapter.trigger),
                example_prompt=entry.get("example_prompt"), source="demo",
            )
            side.file = str(path)
            if side.preview is None and sample.is_file():
                side.preview = str(sample)
            self._apply(adapter, side)
            messages.append(f"loaded {adapter.name} from {path.name}")
        return messages

    # ---- adding ---------------------------------------------------------------------------
    def duplicate_of(self, sha256: str | None) -> str | None:
        """The name of a library adapter with this hash, if any."""
        if not sha256:
            return None
        return next((a.name for a in self.library.list() if a.sha256 == sha256), None)

    def import_file(self, src: str | os.PathLike, name: str) -> tuple[Adapter, str | None]:
        """Copy an adapter file into the folder, load and validate it, write its sidecar.

        Returns (adapter, name of an existing adapter with the same hash, or None). A name already
        in use raises; a file that does not load is removed again.
        """
        name = safe_name(name)
        with self._lock:
            if name in self.library:
                raise AdapterMismatchError(f"an adapter named {name!r} is already in the library; delete it or give another name")
            dest = self.folder / f"{name}.safetensors"
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            try:
                adapter = self.library.load(dest, name=name)
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
            duplicate = next((a.name for a in self.library.list()
                              if a.name != adapter.name and a.sha256 and a.sha256 == adapter.sha256), None)
            self._apply(adapter, Sidecar(trigger=adapter.trigger, concept=adapter.concept, kind=adapter.concept_kind,
                                         weight=adapter.weight, source="upload"))
            self._write(adapter.name)
            return adapter, duplicate

    def save_new(self, adapter: Adapter, source: str, file: str | os.PathLike | None = None,
                 trigger_phrase: str | None = None) -> Adapter:
        """Put a trained or merged adapter into the folder (moving ``file`` in, or writing it) and the library."""
        from .formats import write_adapter

        with self._lock:
            name = safe_name(adapter.name)
            if name in self.library:
                raise AdapterMismatchError(f"an adapter named {name!r} is already in the library; choose another name")
            dest = self.folder / f"{name}.safetensors"
            if file is not None and Path(file).is_file():
                if Path(file).resolve() != dest.resolve():
                    shutil.copyfile(file, dest)
            else:
                write_adapter(adapter, dest, "lokr" if adapter.kind == "kron" else "diffusers")
            loaded = self.library.load(dest, name=name, trigger=adapter.trigger, kind=adapter.concept_kind,
                                       concept=adapter.concept)
            self._apply(loaded, Sidecar(trigger=loaded.trigger, concept=loaded.concept, kind=loaded.concept_kind,
                                        weight=loaded.weight, source=source, trigger_phrase=trigger_phrase))
            self._write(loaded.name)
            return loaded

    # ---- editing --------------------------------------------------------------------------
    def meta(self, name: str) -> Sidecar:
        """The sidecar of a library adapter (an in-memory default for adapters added elsewhere)."""
        with self._lock:
            side = self._meta.get(name)
            if side is None:
                a = self.library.get(name)
                side = Sidecar(trigger=a.trigger, concept=a.concept, kind=a.concept_kind, weight=a.weight,
                               sha256=a.sha256, source="memory")
            return side

    def update(self, name: str, **fields) -> Sidecar:
        """Change metadata (trigger, trigger_phrase, example_prompt, concept, kind, weight) and write the sidecar now."""
        with self._lock:
            adapter = self.library.get(name)
            side = self._meta.setdefault(name, self.meta(name))
            for key, value in fields.items():
                if key not in ("trigger", "trigger_phrase", "example_prompt", "concept", "kind", "weight"):
                    raise ValueError(f"unknown adapter field {key!r}")
                setattr(side, key, value)
            adapter.trigger, adapter.concept, adapter.concept_kind = side.trigger, side.concept, side.kind
            adapter.weight = float(side.weight)
            self._write(name)
            return side

    def set_preview(self, name: str, image_path: str | os.PathLike) -> str:
        """Copy an image as the adapter's preview (``NAME.png`` in the folder); returns its path."""
        from PIL import Image

        with self._lock:
            self.library.get(name)
            dest = self.folder / f"{name}.png"
            with Image.open(image_path) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((256, 256))
                with atomic_path(dest) as tmp:
                    thumb.save(tmp, format="PNG")
            side = self._meta.setdefault(name, self.meta(name))
            side.preview = dest.name
            self._write(name)
            return str(dest)

    def preview_path(self, name: str) -> str | None:
        """The preview image of an adapter, if it has one on disk."""
        side = self._meta.get(name)
        if side is None or not side.preview:
            return None
        path = Path(side.preview)
        path = path if path.is_absolute() else self.folder / path
        return str(path) if path.is_file() else None

    def trash(self, name: str) -> str:
        """Remove an adapter from the library; its files go to ``.trash/`` (a demo adapter is hidden)."""
        with self._lock:
            self.library.get(name)
            side = self._meta.get(name)
            if side is not None and side.source == "demo":
                side.hidden = True
                self._write(name)
                self.library.remove(name)
                self._meta.pop(name, None)
                return f"{name} is a bundled demo adapter: hidden (its file stays in assets/)"
            trash = self.folder / TRASH / time.strftime("%Y%m%d-%H%M%S")
            moved = []
            for suffix in (".safetensors", ".json", ".png"):
                path = self.folder / f"{name}{suffix}"
                if path.is_file():
                    trash.mkdir(parents=True, exist_ok=True)
                    os.replace(path, trash / path.name)
                    moved.append(path.name)
            self.library.remove(name)
            self._meta.pop(name, None)
            return f"moved {', '.join(moved)} to {trash}" if moved else "it had no file in the library folder"

    # ---- internals ------------------------------------------------------------------------
    def _apply(self, adapter: Adapter, side: Sidecar) -> None:
        """Sidecar values onto the in-memory adapter (sidecar wins; its blanks keep the file's)."""
        adapter.trigger = side.trigger if side.trigger is not None else adapter.trigger
        adapter.concept = side.concept if side.concept is not None else adapter.concept
        adapter.concept_kind = side.kind if side.kind is not None else adapter.concept_kind
        adapter.weight = float(side.weight) if side.weight is not None else adapter.weight
        side.sha256 = adapter.sha256 or side.sha256
        with self._lock:
            self._meta[adapter.name] = side

    def _write(self, name: str) -> None:
        side = self._meta[name]
        write_atomic(self.folder / f"{name}.json", json.dumps(asdict(side), indent=1, sort_keys=True) + "\n")
