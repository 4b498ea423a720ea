"""``AppHandlers``: every tab's actions over one shared ``Studio``, with the shared run plumbing.

Per-user values travel in ``gr.State`` and in each request's arguments: a generation names its
adapters in its own prompt (``<lora:name:weight>``), so concurrent users never share adapter
settings; the Studio's lock serialises use of the UNet. Stop is a per-request flag the sampling
loop checks before every step. The adapter library is shared by everyone and kept on disk.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from studio.adapters.store import AdapterStore
from studio.errors import StudioError
from studio.studio import Studio

from .common import optional
from .compose import ComposeTab
from .evaluate import EvaluateTab
from .library import LibraryTab
from .pnginfo import PngInfoTab
from .runs import RunControl, RunHistory
from .train import TrainTab, train_defaults
from .xy import XYTab


def load_demo_adapters(studio: Studio, folder: str | os.PathLike) -> list[str]:
    """Load every ``*.safetensors`` in ``folder`` into the library (no store); one message per file."""
    messages = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            adapter = studio.adapters.load(path)
            messages.append(f"loaded {adapter.name} from {path.name}")
        except StudioError as e:
            messages.append(f"skipped {path.name}: {e}")
    return messages


class AppHandlers(ComposeTab, LibraryTab, PngInfoTab, XYTab, TrainTab, EvaluateTab):
    """The app's actions over one shared Studio; per-request state is passed in explicitly."""

    def __init__(self, studio: Studio, out_dir: str | os.PathLike | None = None, preview_every: int | None = None,
                 library_dir: str | os.PathLike | None = None, demo_dir: str | os.PathLike | None = None,
                 batch_size: int | None = None):
        self.studio = studio
        # images of one request drawn together (None: the studio's auto size); 1 shows each image
        # as it finishes and lets Stop keep every finished one
        self.batch_size = batch_size
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lora-studio-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.store = AdapterStore(studio.adapters, library_dir or self.out_dir / "library")
        self.demo_dir = Path(demo_dir) if demo_dir else None
        self.preview_every = preview_every
        self.runs = RunControl()
        self.history = RunHistory(self.out_dir)
        self._scorer = None  # the CLIP scorer, loaded on first use and reused
        self._scorer_error: str | None = None
        self._scorer_lock = threading.Lock()

    def open_library(self) -> list[str]:
        """Scan the library folder, then load the demo adapters; the start-up messages."""
        return self.store.scan() + (self.store.load_demos(self.demo_dir) if self.demo_dir else [])

    def train_defaults(self) -> dict:
        return train_defaults(self.studio.arch, self.demo_dir)

    @staticmethod
    def available(module: str, attr: str) -> bool:
        return optional(module, attr) is not None

    @staticmethod
    def availability(module: str, what: str) -> str:
        if optional(module) is None:
            return f"**{what} is not available yet:** `{module}` is not installed in this build."
        return f"**{what}:** `{module}` is present, but its app tab is not wired yet; use the `studio` CLI meanwhile."
