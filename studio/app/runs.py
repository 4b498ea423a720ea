"""Run plumbing every tab shares: per-session Stop flags, worker threads, one progress line with
an ETA, and the run history kept in the outputs folder.

State here is keyed by (session, kind) and guarded by locks, so concurrent users never see each
other's runs; nothing is module-global.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradio as gr

from studio.atomic import write_atomic

from .common import session_id

HISTORY_FILE = "history.jsonl"


class RunControl:
    """Which runs each session has going, so its Stop button reaches them (and only them)."""

    def __init__(self) -> None:
        self._stops: dict[tuple[str, str], set[threading.Event]] = {}
        self._lock = threading.Lock()

    def register(self, request: gr.Request | None, kind: str) -> tuple[tuple[str, str], threading.Event]:
        """A fresh Stop flag for this session's run of ``kind`` (generate, xy, train, evaluate)."""
        key, stop = (session_id(request), kind), threading.Event()
        with self._lock:
            self._stops.setdefault(key, set()).add(stop)
        return key, stop

    def unregister(self, key: tuple[str, str], stop: threading.Event) -> None:
        with self._lock:
            live = self._stops.get(key, set())
            live.discard(stop)
            if not live:
                self._stops.pop(key, None)

    def stop(self, request: gr.Request | None, kind: str) -> str:
        """Set the flags of this session's runs of ``kind``; the runs end at their next step."""
        with self._lock:
            events = list(self._stops.get((session_id(request), kind), ()))
        for event in events:
            event.set()
        return "Stopping…" if events else "Nothing is running."

    @staticmethod
    def start_worker(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
        """Run ``fn`` in a thread; its result or error lands in the returned box.

        The context is copied so ``gr.Progress(track_tqdm=True)`` follows tqdm bars in the worker.
        """
        box: dict = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the request thread, raised or shown there
                box["error"] = e

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        worker.start()
        return worker, box


@dataclass
class Progress:
    """One progress line: unit k/N (image or cell), step k/N and an ETA from the pace so far."""

    units: int
    steps: int
    unit: str = "image"
    started: float = field(default_factory=time.perf_counter)
    done_steps: int = 0

    def line(self, unit_index: int, step: int) -> str:
        """``image 2/4 · step 13/25 · 3.1 s elapsed · ETA 6 s`` (unit_index from 0, step from 1)."""
        self.done_steps = unit_index * self.steps + step
        total = self.units * self.steps
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done_steps * (total - self.done_steps) if self.done_steps else None
        parts = [f"{self.unit} {unit_index + 1}/{self.units}"] if self.units > 1 or self.unit != "image" else []
        parts.append(f"step {step}/{self.steps}")
        parts.append(f"{elapsed:.1f} s elapsed")
        if eta is not None:
            parts.append(f"ETA {eta:.0f} s")
        return " · ".join(parts)


class RunHistory:
    """Earlier runs, one JSON line each in ``out_dir/history.jsonl`` (images stay where they were saved)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / HISTORY_FILE
        self._lock = threading.Lock()

    def add(self, kind: str, images: list[str], summary: str) -> None:
        """Append a run (its image paths and a one-line summary); written atomically."""
        if not images:
            return
        line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": kind, "images": images,
                           "summary": summary})
        with self._lock:
            old = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
            write_atomic(self.path, old + line + "\n")

    def items(self, limit: int = 60) -> list[tuple[str, str]]:
        """(image path, caption), newest first, for images that still exist."""
        if not self.path.is_file():
            return []
        out: list[tuple[str, str]] = []
        for raw in reversed(self.path.read_text(encoding="utf-8").splitlines()):
            try:
                run = json.loads(raw)
            except ValueError:
                continue
            for path in run.get("images", []):
                if Path(path).is_file():
                    out.append((path, f"{run.get('time', '')} · {run.get('summary', '')}"))
            if len(out) >= limit:
                break
        return out[:limit]
