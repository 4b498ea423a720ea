"""The on-disk adapter library: sidecars survive a restart, duplicates are named, delete goes to trash."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from studio import Studio
from studio.adapters.formats import write_adapter
from studio.adapters.store import AdapterStore, derive_phrase, read_index

from conftest import random_lora

REPO = Path(__file__).resolve().parent.parent


def test_derive_phrase_keeps_the_clause_with_the_trigger():
    assert derive_phrase("a red sks shape", "sks") == "a red sks shape"
    assert derive_phrase("a red circle on a wvu background", "wvu") == "on a wvu background"
    assert derive_phrase("a red circle with kpk pattern", "kpk") == "with kpk pattern"
    assert derive_phrase(None, "x") is None


def test_upload_edit_restart_trash(sd1_pipe, tmp_path):
    studio = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    src = write_adapter(random_lora(studio, "c", seed=3), tmp_path / "c.safetensors")
    store = AdapterStore(studio.adapters, tmp_path / "lib")
    adapter, dup = store.import_file(src, "mine")
    assert dup is None and adapter.name == "mine"
    _, dup = store.import_file(src, "again")
    assert dup == "mine"  # same hash, reported
    store.update("mine", trigger="zzq", trigger_phrase="a zzq shape", kind="object", weight=0.6, concept="shape")
    img = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "red").save(img)
    store.set_preview("mine", img)
    assert not [p for p in (tmp_path / "lib").iterdir() if p.name.startswith(".") and p.is_file()]  # no temp files

    # a restart: a fresh studio and store over the same folder
    fresh = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    store2 = AdapterStore(fresh.adapters, tmp_path / "lib")
    store2.scan()
    a = fresh.adapters.get("mine")
    assert (a.trigger, a.concept, a.concept_kind, a.weight) == ("zzq", "shape", "object", 0.6)
    assert store2.meta("mine").trigger_phrase == "a zzq shape" and store2.preview_path("mine")

    msg = store2.trash("again")
    assert "again" not in fresh.adapters and "trash" in msg
    assert list((tmp_path / "lib" / ".trash").rglob("again.safetensors"))


def test_demo_adapters_get_phrase_and_sample_preview(sd1_pipe, tmp_path):
    studio = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    demo = tmp_path / "demo"
    (demo / "samples").mkdir(parents=True)
    write_adapter(random_lora(studio, "bg", seed=4), demo / "bg-lora.safetensors")
    Image.new("RGB", (64, 64), "blue").save(demo / "samples" / "bg-lora.png")
    (demo / "index.json").write_text(json.dumps({"bg-lora": {
        "example_prompt": "a red circle on a wvu background", "trigger": "wvu", "kind": "background"}}))
    store = AdapterStore(studio.adapters, tmp_path / "lib")
    store.load_demos(demo)
    assert store.meta("bg-lora").trigger_phrase == "on a wvu background"
    assert store.meta("bg-lora").example_prompt == "a red circle on a wvu background"  # what an empty prompt gets
    assert store.preview_path("bg-lora").endswith("bg-lora.png")
    store.update("bg-lora", weight=0.8)
    assert "hidden" in store.trash("bg-lora")
    fresh = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    AdapterStore(fresh.adapters, tmp_path / "lib").load_demos(demo)
    assert "bg-lora" not in fresh.adapters  # deleting a demo adapter survives a restart too


def test_bundled_index_phrases_contain_their_triggers():
    for name, entry in read_index(REPO / "assets" / "adapters").items():
        phrase = entry.get("trigger_phrase") or derive_phrase(entry.get("example_prompt"), entry.get("trigger"))
        assert phrase and (not entry.get("trigger") or entry["trigger"] in phrase), name
