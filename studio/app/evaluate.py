"""Evaluate tab: run a suite YAML (``studio.evaluation.run_suite``) into a new run folder."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import gradio as gr

from studio.errors import StudioError
from studio.resources import workflows_dir

from .common import as_int, optional


class EvaluationCancelled(StudioError):
    """Stop was pressed during an evaluation run."""


class EvaluateTab:
    """Evaluate actions; mixed into ``AppHandlers``."""

    def stop_evaluate(self, request: gr.Request | None = None) -> str:
        return self.runs.stop(request, "evaluate")

    def suites(self) -> list[str]:
        root = workflows_dir()
        return sorted(str(p) for p in root.glob("*.y*ml"))

    def evaluate(
        self, suite_choice: str | None, suite_file: str | None, limit=None, dry_run: bool = False,
        request: gr.Request | None = None, progress=gr.Progress(track_tqdm=True),
    ) -> Iterator[tuple]:
        """Run an evaluation suite (studio.evaluation.run_suite) into a new run folder.

        Yields (log, summary table, grids, run-folder zip). Stop ends it after the current job.
        """
        evaluation = optional("studio.evaluation")
        if evaluation is None or not hasattr(evaluation, "run_suite"):
            raise gr.Error("evaluation is not available yet (studio.evaluation is missing)")
        suite = suite_file or suite_choice
        if not suite:
            raise gr.Error("choose a suite YAML from the list or upload one")
        if not str(suite).lower().endswith((".yaml", ".yml", ".toml")):
            raise gr.Error(f"{Path(suite).name} is not a suite file; upload a .yaml, .yml or .toml")
        out = self.out_dir / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        lines: list[str] = []

        def on_job(job, row) -> None:
            if stop.is_set():
                raise EvaluationCancelled("evaluation stopped by the user")

        key, stop = self.runs.register(request, "evaluate")
        worker, box = self.runs.start_worker(lambda: evaluation.run_suite(
            suite, out, limit=as_int(limit, "limit") if limit not in (None, "", 0) else None,
            dry_run=bool(dry_run), on_job=on_job, log=lines.append))
        try:
            while worker.is_alive():
                worker.join(0.5)
                yield "\n".join(lines), gr.skip(), gr.skip(), gr.skip()
            if "error" in box:
                e = box["error"]
                if isinstance(e, EvaluationCancelled):
                    yield "\n".join(lines + ["stopped; run it again with the same folder to resume"]), gr.skip(), \
                        gr.skip(), None
                    return
                if isinstance(e, StudioError):
                    raise gr.Error(str(e)) from None
                raise e
            if dry_run:
                yield "\n".join(lines), [], [], None
                return
            rows = evaluation.read_rows(out / "results.jsonl") if (out / "results.jsonl").is_file() else []
            header, body = evaluation.summary_table(evaluation.summarize(rows)) if rows else ([], [])
            grids = [(str(p), p.stem) for p in sorted((out / "grids").glob("*.png"))]
            archive = shutil.make_archive(str(out), "zip", root_dir=out)
            import pandas as pd

            table = pd.DataFrame(body, columns=header) if header else pd.DataFrame()
            yield "\n".join(lines), table, grids, archive
        finally:
            stop.set()
            self.runs.unregister(key, stop)
