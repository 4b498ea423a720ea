"""Batch evaluation: job expansion and seeds, bad input, a full run with metrics, resume after a
crash, disk full, and the 2-process accelerate run equal to the 1-process run."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import re
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from studio import Studio
from studio.adapters.formats import write_adapter
from studio.base import build_tiny_pipeline
from studio.errors import StudioError
from studio.evaluation import (
    DiskFullError, SuiteError, derive_seed, expand_jobs, load_suite, oracle_presence, read_rows, rejudge, run_suite, summarize,
)
from studio.metadata import read_recipe

from conftest import random_lora
from test_metrics import write_tiny_clip

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "workflows" / "smoke.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Two random LoRA files for the tiny SD1 pipeline, a reference image and a tiny open_clip model."""
    root = tmp_path_factory.mktemp("eval-assets")
    studio = Studio(build_tiny_pipeline("sd1"), "tiny-sd1")
    for i, name in enumerate(("obj", "sty")):
        write_adapter(random_lora(studio, name, seed=i + 1), root / f"{name}.safetensors")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "ref.png")
    write_tiny_clip(root / "clip")
    return root


def make_suite(folder: Path, assets: Path, name: str = "suite.yaml", **overrides) -> Path:
    """The smoke suite plus two adapters and the tiny scorer, with overrides."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(
        scorer=str(assets / "clip"),
        adapters=[
            {"name": "obj", "path": str(assets / "obj.safetensors"), "kind": "object", "trigger": "red sks",
             "concept": "crescent", "concept_prompt": "a crescent", "references": [str(assets / "ref.png")]},
            {"name": "sty", "path": str(assets / "sty.safetensors"), "kind": "style", "trigger": "zkq style",
             "concept": "glow"},
        ],
        adapter_sets=[["obj", "sty"]],
        methods=["merge", "composite"],
    )
    data.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def strip_timing(rows: list[dict]) -> list[dict]:
    rows = copy.deepcopy(rows)
    for r in rows:
        r["timing"].pop("seconds")
        r["timing"].pop("batch", None)
    return rows


# ---- expansion and seeds ----------------------------------------------------------------------
def test_seed_rule_is_the_specified_hash():
    digest = hashlib.sha256(b"7|obj+sty|p0|3").digest()
    assert derive_seed(7, "obj+sty", "p0", 3) == int.from_bytes(digest[:4], "big")
    assert 0 <= derive_seed(0, "a", "b", 0) < 2**32


def test_seeds_identical_across_methods_and_order(tmp_path, assets):
    suite = load_suite(make_suite(tmp_path, assets, methods=["merge", "composite", {"name": "switch", "params": {"tau": 1}}],
                                  adapter_sets=[["obj"], ["obj", "sty"]], samples=2))
    jobs = expand_jobs(suite)
    by_key: dict[tuple, set] = {}
    for j in jobs:
        by_key.setdefault((j.loraset_id, j.prompt_id, j.sample_idx), set()).add(j.seed)
    assert len(by_key) == 4 and all(len(s) == 1 for s in by_key.values())
    assert len({j.seed for j in jobs}) == 4
    assert len({j.job_id for j in jobs}) == len(jobs) == 12
    # reordering the methods changes neither seeds nor ids
    reordered = load_suite(make_suite(tmp_path, assets, name="b.yaml", adapter_sets=[["obj"], ["obj", "sty"]], samples=2,
                                      methods=[{"name": "switch", "params": {"tau": 1}}, "composite", "merge"]))
    assert {(j.job_id, j.seed) for j in expand_jobs(reordered)} == {(j.job_id, j.seed) for j in jobs}


def test_a_method_column_can_run_at_its_own_guidance(tmp_path, assets):
    """Averaging methods dilute each concept's guidance, so a suite may give one column its own CFG:
    it runs at that scale, on the same seeds, under its own label, and says so in every row."""
    path = make_suite(tmp_path, assets, scorer="none", metrics=[], samples=1,
                      methods=["merge", {"name": "merge", "guidance": 2.0}])
    jobs = expand_jobs(load_suite(path))
    assert [(j.method_label, j.guidance) for j in jobs] == [("merge", 7.5), ("merge cfg 2", 2.0)]
    assert jobs[0].seed == jobs[1].seed and jobs[0].job_id != jobs[1].job_id
    run_suite(path, tmp_path / "run", log=lambda s: None)
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    assert [(r["method_label"], r["cfg"]) for r in rows] == [("merge", 7.5), ("merge cfg 2", 2.0)]
    assert read_recipe(tmp_path / "run" / rows[1]["image"]).guidance == 2.0
    a, b = (np.asarray(Image.open(tmp_path / "run" / r["image"]), dtype=np.int16) for r in rows)
    assert np.abs(a - b).max() > 0  # the override reached the sampler
    for bad, said in (({"name": "merge", "guidance": -1}, "methods[0].guidance -1 is out of range"),
                      ({"name": "merge", "cfg": 3}, "unknown key(s) cfg; valid: name, params, guidance")):
        with pytest.raises(SuiteError, match=re.escape(said)):
            load_suite(make_suite(tmp_path, assets, name="bad.yaml", methods=[bad]))


def test_a_method_column_can_run_at_its_own_adapter_weights(tmp_path, assets):
    """A method's own weights replace the adapters' preferred weights for that column only, on the same
    seeds; an explicit weights axis still wins; unknown adapters and bad numbers are refused."""
    path = make_suite(tmp_path, assets, scorer="none", metrics=[], samples=1, adapter_sets=[["obj", "sty"]],
                      weights=[None], methods=["merge", {"name": "merge", "weights": {"obj": 0.75, "sty": 0.5}, "guidance": 5.0}])
    jobs = expand_jobs(load_suite(path))
    label = "merge[obj=0.75,sty=0.5] cfg 5"
    assert [j.method_label for j in jobs] == ["merge", label]
    assert [[a["weight"] for a in j.adapters] for j in jobs] == [[1.0, 1.0], [0.75, 0.5]]
    assert jobs[0].seed == jobs[1].seed and jobs[0].job_id != jobs[1].job_id
    run_suite(path, tmp_path / "run", log=lambda s: None)
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    assert [a["weight"] for a in rows[1]["loras"]] == [0.75, 0.5]
    assert [a.weight for a in read_recipe(tmp_path / "run" / rows[1]["image"]).adapters] == [0.75, 0.5]
    (grid,) = (tmp_path / "run" / "grids").glob("*.png")
    from PIL import ImageDraw

    with Image.open(grid) as g:  # the label column holds the whole label: cut short, it would read as other weights
        assert g.width >= 8 + ImageDraw.Draw(g).textlength(label) + 64 > 110 + 64
    axis = expand_jobs(load_suite(make_suite(tmp_path, assets, name="axis.yaml", adapter_sets=[["obj", "sty"]],
                                             samples=1, weights=[0.8, {"obj": 0.7}],
                                             methods=[{"name": "merge", "weights": {"sty": 0.5}}])))
    assert [[a["weight"] for a in j.adapters] for j in axis] == [[0.8, 0.8], [0.7, 0.5]]
    for bad, said in (({"name": "merge", "weights": {"nope": 1}}, "methods[0].weights names unknown adapter 'nope'"),
                      ({"name": "merge", "weights": {"sty": "x"}}, "methods[0].weights: sty"),
                      ({"name": "merge", "weights": [1.0]}, "methods[0].weights must be {adapter: weight}")):
        with pytest.raises(SuiteError, match=re.escape(said)):
            load_suite(make_suite(tmp_path, assets, name="bad.yaml", methods=[bad]))


def test_a_resumed_run_labels_reused_rows_as_the_suite_now_names_them(tmp_path, assets):
    """Weights for an adapter that a set does not hold leave its jobs (and ids) unchanged but rename the
    column; a resumed run reuses those images and shows them under the new name only. Rows of jobs the
    suite no longer holds leave results.jsonl and the reports for results.retired.jsonl, and come back
    (without a rerun) when the suite does."""
    path = make_suite(tmp_path, assets, scorer="none", metrics=[], samples=1, adapter_sets=[["obj"], ["obj", "sty"]],
                      weights=[None], methods=["merge"])
    run_suite(path, tmp_path / "run", log=lambda s: None)
    first = read_rows(tmp_path / "run" / "results.jsonl")
    path = make_suite(tmp_path, assets, scorer="none", metrics=[], samples=1, adapter_sets=[["obj"], ["obj", "sty"]],
                      weights=[None], methods=[{"name": "merge", "weights": {"sty": 0.5}}])
    lines = []
    run_suite(path, tmp_path / "run", resume=True, log=lines.append)
    assert any("1 already done, 1 to run" in line for line in lines)  # the obj-only job is reused
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    current = {j.job_id for j in expand_jobs(load_suite(path))}
    assert {r["job_id"] for r in rows} == current and {r["method_label"] for r in rows} == {"merge[sty=0.5]"}
    (retired,) = read_rows(tmp_path / "run" / "results.retired.jsonl")  # the obj+sty image at weight 1
    assert retired["loraset_id"] == "obj+sty" and retired["method_label"] == "merge" and retired["job_id"] not in current
    summary = (tmp_path / "run" / "summary.csv").read_text()
    assert "merge[sty=0.5]" in summary and "\nmerge," not in summary
    lines.clear()
    run_suite(make_suite(tmp_path, assets, scorer="none", metrics=[], samples=1, adapter_sets=[["obj"], ["obj", "sty"]],
                         weights=[None], methods=["merge"]), tmp_path / "run", resume=True, log=lines.append)
    assert any("2 already done, 0 to run" in line for line in lines)  # back to the first suite: nothing redrawn
    assert {r["job_id"] for r in read_rows(tmp_path / "run" / "results.jsonl")} == {f["job_id"] for f in first}


def test_dry_run_counts_and_limit(tmp_path, assets):
    path = make_suite(tmp_path, assets, weights=[0.5, 1.0], samples=3,
                      prompts=["a {triggers}", {"id": "q", "text": "two shapes, {triggers}"}])
    lines = []
    summary = run_suite(path, tmp_path / "run", dry_run=True, log=lines.append)
    assert summary.total == 1 * 2 * 2 * 3 * 2  # sets × weights × prompts × samples × methods
    assert lines[0].startswith("24 jobs: merge 12, composite 12")
    assert run_suite(path, tmp_path / "run", dry_run=True, limit=5, log=lines.append).total == 5
    assert not (tmp_path / "run").exists()


def test_prompts_restricted_to_adapter_sets(tmp_path, assets):
    path = make_suite(tmp_path, assets, adapter_sets=[["obj"], ["obj", "sty"]], samples=2, prompts=[
        {"id": "one", "text": "a red sks shape", "sets": ["obj"]},
        {"id": "two", "text": "a red sks shape with zkq pattern", "sets": ["obj+sty"]},
        {"id": "all", "text": "{triggers}"}])
    jobs = expand_jobs(load_suite(path))
    pairs = {(j.loraset_id, j.prompt_id) for j in jobs}
    assert pairs == {("obj", "one"), ("obj+sty", "two"), ("obj", "all"), ("obj+sty", "all")}
    assert len(jobs) == 4 * 2 * 2  # (set, prompt) pairs × samples × methods
    with pytest.raises(SuiteError, match="unknown adapter set.*nope"):
        load_suite(make_suite(tmp_path, assets, name="b.yaml", prompts=[{"text": "x", "sets": ["nope"]}]))
    with pytest.raises(SuiteError, match="'obj' has no prompt"):
        load_suite(make_suite(tmp_path, assets, name="c.yaml", adapter_sets=[["obj"], ["obj", "sty"]],
                              prompts=[{"text": "x", "sets": ["obj+sty"]}]))
    lego = load_suite(REPO / "workflows" / "toy-lego.yaml")
    cells: dict[tuple, int] = {}
    for j in expand_jobs(lego):
        key = (j.method_label, len(j.adapters))
        cells[key] = cells.get(key, 0) + 1
    assert {n for _, n in cells} == {2, 3} and min(cells.values()) >= 24
    assert {"merge", "lego", "lego(merge_method=svd)"} <= {m for m, _ in cells}


def test_combinations_follow_composlora(tmp_path, assets):
    path = make_suite(tmp_path, assets, adapter_sets=[], combinations={
        "categories": {"object": ["obj"], "style": ["sty"]}, "n": [1, 2], "require": ["object"]})
    assert [names for _, names in load_suite(path).sets] == [["obj"], ["obj", "sty"]]
    # the toy benchmark: one adapter per category, N = 2..4, each set with the object
    toy = load_suite(REPO / "workflows" / "toy-composlora.yaml")
    sizes = [len(names) for _, names in toy.sets]
    assert len(toy.sets) == 17 and {sizes.count(n) for n in (2, 3, 4)} == {5, 8, 4}
    assert all("crescent" in names for _, names in toy.sets)
    assert [m.name for m in toy.methods][:4] == ["merge", "switch", "composite", "cmlora"] and toy.samples >= 3


def test_combination_duplicate_set_ids_are_rejected(tmp_path, assets):
    path = make_suite(tmp_path, assets, adapter_sets=[], combinations={
        "categories": {"object": ["obj"], "style": ["sty"], "other": ["sty"]}, "n": [2], "require": ["object"]})
    with pytest.raises(SuiteError, match="used twice"):
        load_suite(path)


def test_summary_aggregates_each_convention_from_raw_cosines():
    def row(method, cos, present, seconds):
        return {"job_id": f"{method}{cos}", "method": method, "method_label": method, "n_adapters": 2,
                "timing": {"seconds": seconds, "unet_calls": 4},
                "metrics": {"clipscore": {"raw_cos": cos, "convention": "compat"},
                            "clipscore_hessel": {"raw_cos": cos, "convention": "hessel"},
                            "oracle": {"concept_rate": sum(present) / 2, "all_present": all(present)}}}

    rows = [row("merge", 0.3, [True, True], 1.0), row("merge", 0.2, [True, False], 2.0), row("merge", -0.4, [False, False], 3.0)]
    got = {r["metric"]: r for r in summarize(rows)}
    assert got["clipscore"]["mean"] == pytest.approx(100 * 0.1 / 3)  # clamp on the mean
    assert got["clipscore"]["min"] == 0.0 and got["clipscore"]["n"] == 3  # per-image 100*max(c, 0)
    assert got["clipscore_hessel"]["mean"] == pytest.approx(2.5 * 0.5 / 3)
    assert got["concept_rate"]["mean"] == pytest.approx(0.5) and got["all_present"]["mean"] == pytest.approx(1 / 3)
    assert got["seconds"]["std"] == pytest.approx(statistics.pstdev([1.0, 2.0, 3.0]))


def test_oracle_presence_per_adapter():
    class FakeOracle:
        def predict(self, images):
            return [{"objects": [{"position": "left", "shape": "crescent", "color": "red", "pattern": "solid"}],
                     "background": "plain"}]

        @staticmethod
        def has_concept(pred, word):
            from studio.toyworld.oracle import Oracle

            return Oracle.has_concept(pred, word)

    got = oracle_presence(FakeOracle(), None, {"obj": "crescent", "sty": "glow", "bg": "sky", "other": "sks", "none": None})
    assert got["present"] == {"obj": True, "sty": False, "bg": False, "other": None, "none": None}
    assert got["concept_rate"] == pytest.approx(1 / 3) and got["all_present"] is False
    assert "agree" not in got  # no second oracle given

    class SkyOracle(FakeOracle):  # a second oracle that sees a sky the first does not
        def predict(self, images):
            return [{"objects": [{"position": "left", "shape": "crescent", "color": "red", "pattern": "solid"}],
                     "background": "sky"}]

    concepts = {"obj": "crescent", "bg": "sky"}
    got = oracle_presence(FakeOracle(), None, concepts, second=SkyOracle())
    assert got["agree"] is False and got["all_present"] is False and got["all_present_b"] is True
    assert got["present_b"] == {"obj": True, "bg": True}
    assert oracle_presence(FakeOracle(), None, concepts, second=FakeOracle())["agree"] is True


# ---- bad input ---------------------------------------------------------------------------------
def test_unknown_method_lists_valid_names(tmp_path, assets):
    path = make_suite(tmp_path, assets, methods=["merge", "mergee"])
    with pytest.raises(SuiteError, match=r"unknown method 'mergee'; valid methods: merge, .*composite"):
        run_suite(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_adapter_and_missing_file(tmp_path, assets):
    with pytest.raises(SuiteError, match=r"unknown adapter 'nope'; valid: obj, sty"):
        load_suite(make_suite(tmp_path, assets, adapter_sets=[["obj", "nope"]]))
    bad = make_suite(tmp_path, assets, name="m.yaml")
    data = yaml.safe_load(bad.read_text())
    data["adapters"][1]["path"] = str(tmp_path / "missing.safetensors")
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SuiteError, match="missing.safetensors not found"):
        run_suite(bad, tmp_path / "run", dry_run=True)


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethods: [merge\nprompts: [a]\n")
    with pytest.raises(SuiteError, match=r"malformed YAML at line \d+, column \d+"):
        load_suite(path)
    path.write_text("name: x\nmethod: [merge]\nprompts: [a]\n")
    with pytest.raises(SuiteError, match="unknown key.*method.*valid keys"):
        load_suite(path)


def test_duplicate_jobs_are_rejected(tmp_path, assets):
    with pytest.raises(SuiteError, match="duplicate job"):
        expand_jobs(load_suite(make_suite(tmp_path, assets, methods=["merge", "merge"])))
    with pytest.raises(SuiteError, match="duplicate job"):
        expand_jobs(load_suite(make_suite(tmp_path, assets, name="w.yaml", weights=[1.0, 1])))


def test_cli_eval(tmp_path, assets, capsys):
    from studio.cli import main

    path = make_suite(tmp_path, assets)
    assert main(["eval", str(path), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "4 jobs" in capsys.readouterr().out
    bad = make_suite(tmp_path, assets, name="bad.yaml", methods=["nope"])
    assert main(["eval", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "valid methods: merge" in capsys.readouterr().err


# ---- running ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, assets):
    """An uninterrupted run of 4 jobs (2 methods × 2 samples, 2 steps)."""
    root = tmp_path_factory.mktemp("full")
    path = make_suite(root, assets)
    run_suite(path, root / "run", log=lambda s: None)
    return path, root / "run"


def test_full_run_writes_everything(full_run):
    _, out = full_run
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 4 and [r["method"] for r in rows] == ["merge", "composite", "merge", "composite"]
    assert rows[0]["seed"] == rows[1]["seed"] != rows[2]["seed"]
    r = rows[1]
    assert r["loras"][0]["sha256"] and len(r["loras"][0]["shorthash"]) == 12 and r["loras"][0]["weight"] == 1.0
    assert r["timing"]["unet_calls"] == 2 * 2  # composite: one call per adapter per step
    assert r["effective"] == {"te_mode": "reference", "preset": "none"} and r["from_preset"] == {}  # comparable runs
    m = r["metrics"]
    assert m["clipscore"]["text"] == "red sks, zkq style" and m["clipscore"]["convention"] == "compat"
    assert m["clipscore"]["value"] == pytest.approx(100 * max(m["clipscore"]["raw_cos"], 0), abs=1e-9)
    assert m["clipscore_hessel"]["text"] == "A photo depicts a red circle, red sks, zkq style"
    assert set(m["clip_t"]["per_concept"]) == {"obj", "sty"} and m["clip_t"]["min"] <= m["clip_t"]["value"]
    assert m["clip_t"]["per_concept"]["obj"]["text"] == "a crescent"
    assert set(m["clip_i"]["per_concept"]) == {"obj"}
    assert "oracle" not in m  # oracle: off in the smoke suite
    recipe = read_recipe(out / r["image"])  # the PNG keeps the studio metadata
    assert recipe.seed == r["seed"] and recipe.method == "composite"
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and "sha" in env["git"] and env["device"] == "cpu"
    cfg = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert cfg["jobs"] == 4 and cfg["adapters"]["obj"]["sha256"] == r["loras"][0]["sha256"]
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == "method,n_adapters,metric,mean,min,std,n"
    line = next(l for l in summary if l.startswith("merge,2,clipscore,"))
    cos = [x["metrics"]["clipscore"]["raw_cos"] for x in rows if x["method"] == "merge"]
    assert float(line.split(",")[3]) == pytest.approx(max(100 * sum(cos) / 2, 0), rel=1e-4)
    assert len(list((out / "grids").glob("*.png"))) == 1
    html = (out / "report.html").read_text()
    assert "grids/" in html and "composite" in html
    assert not list(out.glob("results.rank*.jsonl"))


def test_rejudge_restores_the_oracles_verdicts_from_the_saved_images(tmp_path, assets):
    """--rejudge runs the installed oracles on a run's own images and rewrites rows and reports."""
    path = make_suite(tmp_path, assets, oracle="on", scorer="none", metrics=["oracle"])
    run_suite(path, tmp_path / "run", log=lambda s: None)
    out = tmp_path / "run"
    want = read_rows(out / "results.jsonl")
    assert all("present_b" in r["metrics"]["oracle"] for r in want)  # both oracles judged
    judges = want[0]["metrics"]["oracle"]["judges"]  # which weights judged, by file hash
    assert set(judges) == {"oracle", "oracle_b"} and all(re.fullmatch(r"[0-9a-f]{12}", v) for v in judges.values())
    tampered = copy.deepcopy(want)
    for r in tampered:
        r["metrics"]["oracle"] = {"present": {"obj": True, "sty": True}, "all_present": True, "concept_rate": 1.0}
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tampered))
    (out / "composition.md").unlink()
    assert rejudge(path, out, log=lambda s: None) == 4
    got = read_rows(out / "results.jsonl")
    assert [r["metrics"]["oracle"] for r in got] == [r["metrics"]["oracle"] for r in want]
    assert (out / "composition.md").is_file()
    before = (out / "results.jsonl").read_bytes()
    (out / got[0]["image"]).unlink()
    with pytest.raises(StudioError, match="missing; rejudge needs every image"):
        rejudge(path, out, log=lambda s: None)
    assert (out / "results.jsonl").read_bytes() == before  # nothing rewritten


def test_batched_jobs_equal_one_by_one(tmp_path, full_run):
    """Jobs differing only in their seed are drawn as one batch; each image equals its one-job twin."""
    path, ref_out = full_run
    s = run_suite(path, tmp_path / "serial", batch_size=1, log=lambda s: None)
    assert s.generated == 4
    want = {r["job_id"]: r for r in read_rows(ref_out / "results.jsonl")}
    got = {r["job_id"]: r for r in read_rows(tmp_path / "serial" / "results.jsonl")}
    assert set(got) == set(want) and all(r["timing"]["batch"] == 2 for r in want.values())
    for job_id, r in got.items():
        assert r["timing"]["batch"] == 1 and r["seed"] == want[job_id]["seed"]
        a = np.asarray(Image.open(tmp_path / "serial" / r["image"]), np.int16)
        b = np.asarray(Image.open(ref_out / r["image"]), np.int16)
        assert np.abs(a - b).max() <= 1


def test_rerun_without_resume_refuses(full_run):
    path, out = full_run
    with pytest.raises(StudioError, match="--resume"):
        run_suite(path, out, log=lambda s: None)
    before = (out / "results.jsonl").read_bytes()
    s = run_suite(path, out, resume=True, log=lambda s: None)
    assert s.generated == 0 and (out / "results.jsonl").read_bytes() == before  # finished rows byte-identical


def test_resume_after_crash_equals_uninterrupted(tmp_path, full_run):
    path, ref_out = full_run
    out = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash_after_two(job, row):
        if crash_after_two.n == 1:
            raise Crash
        crash_after_two.n += 1

    crash_after_two.n = 0
    with pytest.raises(Crash):
        run_suite(path, out, on_job=crash_after_two, log=lambda s: None)
    rank_file = out / "results.rank0.jsonl"
    assert len(read_rows(rank_file)) == 2
    with open(rank_file, "a") as f:  # a half-written row, as a kill mid-write leaves it
        f.write('{"job_id": "deadbeef0000", "method": "mer')
    s = run_suite(path, out, resume=True, log=lambda s: None)
    assert (s.done_before, s.generated) == (2, 2)
    got, want = read_rows(out / "results.jsonl"), read_rows(ref_out / "results.jsonl")
    assert strip_timing(got) == strip_timing(want)
    for r in got:
        assert (out / r["image"]).read_bytes() == (ref_out / r["image"]).read_bytes()


def test_disk_full_stops_cleanly_and_resumes(tmp_path, full_run, monkeypatch):
    import studio.metadata as metadata

    path, ref_out = full_run
    out = tmp_path / "run"
    real_save, calls = metadata.save_png, []

    def filling_disk(image, p):
        calls.append(p)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, p)

    monkeypatch.setattr(metadata, "save_png", filling_disk)
    with pytest.raises(DiskFullError, match="rerun with --resume"):
        run_suite(path, out, log=lambda s: None)
    monkeypatch.setattr(metadata, "save_png", real_save)
    s = run_suite(path, out, resume=True, log=lambda s: None)
    assert s.done_before == 2 and s.generated == 2
    assert strip_timing(read_rows(out / "results.jsonl")) == strip_timing(read_rows(ref_out / "results.jsonl"))


@pytest.mark.slow
def test_two_process_accelerate_run_equals_one_process(tmp_path, full_run):
    path, ref_out = full_run
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate launcher is not installed; pip install accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    start = time.time()
    proc = subprocess.run(
        # accelerate 1.15's --cpu launcher starts ONE process unless given an MPI hostfile; --multi_gpu
        # starts torchrun, and on a machine without CUDA the ranks form a gloo CPU group
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", "-m", "studio.cli", "eval", str(path), "--out", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_rows(tmp_path / "run" / "results.jsonl")
    assert strip_timing(got) == strip_timing(read_rows(ref_out / "results.jsonl"))
    env_json = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env_json["num_processes"] == 2
    print(f"2-process run: {time.time() - start:.1f}s")


def test_every_shipped_workflow_loads_and_selection_seeds_stay_apart_from_the_benchmark():
    """The shipped suites load and expand; the suites that picked the benchmark's CFG scales and adapter
    weights draw from other seeds than the benchmark, so no pick was made on an image it reports."""
    suites = {p.name: load_suite(p) for p in sorted((REPO / "workflows").glob("*.yaml"))}
    weight_pickers = ["toy-weights-select.yaml", "toy-weights-select-glow.yaml"]
    pickers = ["toy-guidance-select.yaml", *weight_pickers, "toy-background-select.yaml", "toy-style-select.yaml"]
    assert {"toy-compose.yaml", *pickers} <= set(suites)
    seeds = {name: {j.seed for j in expand_jobs(s)} for name, s in suites.items()}
    texts = {name: {t for _, t in s.prompts} for name, s in suites.items()}  # and on other wordings
    for picker in pickers:
        assert seeds[picker] and not seeds[picker] & seeds["toy-compose.yaml"]
        assert texts[picker] and not texts[picker] & texts["toy-compose.yaml"]
    # every column of the benchmark was measured on the selection suites at its own scale (the suite's default
    # where it names none), and each of its adapter weights on a weights suite beside the weight-1 twin, with the
    # column's other weights as they stood there (a suite whose sets lack an adapter cannot weigh it)
    def key(m, suite, weights=None):
        w = m.weights if weights is None else weights
        return m.name, repr(m.params), m.guidance or suite.guidance, repr(sorted(w.items()))

    picked = {name: {key(m, suites[name]) for m in suites[name].methods} for name in pickers}
    bench = suites["toy-compose.yaml"]
    background = suites["toy-background-select.yaml"]
    for m in bench.methods:
        if "background" in m.params:
            # the background deviation was picked on its own suite, beside its twin without it; it keeps that
            # twin's scale and weights, which were picked as below
            twin = next(t for t in bench.methods if t.name == m.name and t.params == {
                k: v for k, v in m.params.items() if k != "background"})
            assert (m.guidance, m.weights) == (twin.guidance, twin.weights)
            own = {a: w for a, w in m.weights.items() if a in background.adapters}
            for variant in (m, twin):
                assert key(variant, bench, own) in picked["toy-background-select.yaml"], variant
            continue
        assert key(m, bench, {}) in picked["toy-guidance-select.yaml"], m
        for adapter, weight in m.weights.items():
            measured = [name for name in weight_pickers if adapter in suites[name].adapters]
            assert measured, (m, adapter)
            held = [name for name in measured
                    for others in [{a: w for a, w in m.weights.items() if a != adapter and a in suites[name].adapters}]
                    if {key(m, bench, {**others, adapter: weight}), key(m, bench, others)} <= picked[name]]
            assert held, (m, adapter)
