"""bench/gpu.sh cannot rot: its ``--smoke`` run (tiny models, CPU) writes every section of gpu.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import main  # noqa: E402


def test_gpu_bench_smoke_writes_every_section(tmp_path, capsys):
    assert main([str(tmp_path), "--smoke", "--n", "2", "--batches", "2"]) == 0
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["smoke"] and set(data["models"]) == {"sd15", "sdxl"}
    for r in data["models"].values():
        assert set(r["methods"]) == {"plain@0", "single@1", "merge@2", "composite@2", "cmlora@2",
                                     "clora-fast@2", "clora-spec@2"}
        assert set(r["batch"]) == {"merge@b2", "composite@b2"} and set(r["train"]) == {"lora", "kron"}
        assert all("error" not in m for part in ("methods", "batch", "train") for m in r[part].values())
    assert "merge@b2 throughput" in capsys.readouterr().out
