"""Hostile input, as a hostile user would send it (issue 21): malformed PNG recipes, adapter files,
CLI arguments, suites and API calls, all made here by code (no committed binaries).

Every case must end in exit status 2 (or a StudioError from the API) with one line naming the
problem, leave no file behind, and run no code (pickle payloads touch a marker file if they run).
Most cases fail before any model work; the few that reach a model use the tiny random SD1 pipeline.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_lora
from studio.cli import main
from studio.errors import StudioError

MARKER = "PWNED"  # a pickle payload creates this file in the case's folder if it ever runs


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this writes the marker file: proof that a payload ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Payload(str(path.parent / MARKER))}, f)
    return path


def base_recipe(**changes) -> dict:
    recipe = dict(
        prompt="a red circle", negative_prompt="", steps=1, guidance=3.0, sampler="ddim", seed=1, width=64,
        height=64, model="tiny-random-sd1", arch="sd1", method="merge", method_params={}, effective={},
        from_preset={}, adapters=[], generator_device="cpu", version="0", packages={}, model_hash="", schema=1,
    )
    recipe.update(changes)
    return recipe


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(text: str | bytes | None = None, width: int = 2, height: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG written byte by byte: any size in its header, any recipe text (zipped iTXt) before IDAT."""
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if text is not None:
        body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        out += _chunk(b"iTXt", b"lora_studio\x00\x01\x00\x00\x00" + zlib.compress(body))
    raw = idat if idat is not None else zlib.compress(b"".join(b"\x00" + b"\x00" * 3 * width for _ in range(min(height, 4))))
    return out + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def recipe_png(tmp: Path, recipe) -> Path:
    text = recipe if isinstance(recipe, (str, bytes)) else json.dumps(recipe)
    path = tmp / "in.png"
    path.write_bytes(raw_png(text))
    return path


def safetensors_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def lora_file(path: Path, mutate=None, extra: dict | None = None, dtype=torch.float32, rank: int = 2) -> Path:
    """A valid-looking diffusers LoRA on one SD1 attention module, then ``mutate(tensors)``."""
    m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = {f"{m}.lora_A.weight": torch.randn(rank, 32).to(dtype), f"{m}.lora_B.weight": torch.randn(32, rank).to(dtype)}
    t.update(extra or {})
    if mutate:
        mutate(t, m)
    save_file(t, str(path))
    return path


def _set(key_tail: str, value):
    def mutate(t, m):
        t[f"{m}.{key_tail}"] = value
    return mutate


# ---------------------------------------------------------------------------------------------
# 1. PNG recipes: ``studio generate --from-image``
# ---------------------------------------------------------------------------------------------
RECIPES = {
    "not-json": "{not json",
    "array": "[1, 2, 3]",
    "string": '"hello"',
    "number": "42",
    "null": "null",
    "empty-object": "{}",
    "nested-deep": "[" * 5000 + "]" * 5000,
    "prompt-number": base_recipe(prompt=5),
    "prompt-huge": base_recipe(prompt="x" * 20_000),
    "negative-list": base_recipe(negative_prompt=["a"]),
    "steps-string": base_recipe(steps="10"),
    "steps-huge": base_recipe(steps=10**9),
    "steps-zero": base_recipe(steps=0),
    "steps-negative": base_recipe(steps=-3),
    "steps-bool": base_recipe(steps=True),
    "steps-float": base_recipe(steps=2.5),
    "guidance-nan": json.dumps(base_recipe()).replace('"guidance": 3.0', '"guidance": NaN'),
    "guidance-inf": json.dumps(base_recipe()).replace('"guidance": 3.0', '"guidance": Infinity'),
    "guidance-text": base_recipe(guidance="high"),
    "width-huge": base_recipe(width=10**6),
    "height-huge": base_recipe(height=10**6),
    "width-odd": base_recipe(width=63),
    "height-zero": base_recipe(height=0),
    "seed-negative": base_recipe(seed=-5),
    "seed-huge": base_recipe(seed=2**70),
    "method-params-list": base_recipe(method_params=[1, 2]),
    "method-params-nan": json.dumps(base_recipe(method_params={"tau": 1})).replace('"tau": 1', '"tau": NaN'),
    "method-params-deep": base_recipe(method_params={"a": {"b": {"c": [1]}}}),
    "method-params-badkey": base_recipe(method_params={"bad key!": 1}),
    "adapters-dict": base_recipe(adapters={"a": 1}),
    "adapter-unknown-key": base_recipe(adapters=[dict(name="a", weight=1.0, te_weight=1.0, sha256=None, path=None,
                                                      type="lora", evil=1)]),
    "adapter-missing-name": base_recipe(adapters=[dict(weight=1.0, te_weight=1.0)]),
    "adapter-weight-inf": json.dumps(base_recipe(adapters=[dict(name="a", weight=7.0, te_weight=1.0)])).replace(
        '"weight": 7.0', '"weight": Infinity'),
    "adapter-many": base_recipe(adapters=[dict(name=f"a{i}", weight=1.0, te_weight=1.0) for i in range(100)]),
    "unknown-top-key": base_recipe(exec="import os"),
    "schema-future": base_recipe(schema=99),
    "model-odd": base_recipe(model="evil repo!!/x"),
    "model-control": base_recipe(model="tiny\x00sd1"),
    "recipe-huge": base_recipe(notes="x" * 2_000_000),
    "method-unknown": base_recipe(method="nope"),  # passes the schema; refused by Studio.run (tiny model)
    "sampler-unknown": base_recipe(sampler="plms9000"),
    "adapter-not-loaded": base_recipe(adapters=[dict(name="ghost", weight=1.0, te_weight=1.0, path="/nope.safetensors")]),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_hostile_recipe(tmp_path, capsys, case):
    png = recipe_png(tmp_path, RECIPES[case])
    _refused(tmp_path, capsys, ["generate", "--from-image", str(png), "--out", str(tmp_path / "out" / "o.png")])


def _pickle_recipe(tmp):
    bad = write_pickle(tmp / "a.ckpt")
    return recipe_png(tmp, base_recipe(adapters=[dict(name="a", weight=1.0, te_weight=1.0, path=str(bad))]))


def _bomb(tmp, side):
    path = tmp / "in.png"
    path.write_bytes(raw_png(json.dumps(base_recipe()), width=side, height=side))
    return path


PNG_FILES = {
    "missing": lambda tmp: tmp / "nope.png",
    "empty": lambda tmp: (tmp / "e.png").write_bytes(b"") and tmp / "e.png" or tmp / "e.png",
    "jpeg-named-png": lambda tmp: _write(tmp / "j.png", b"\xff\xd8\xff\xe0" + b"\x00" * 100),
    "text-named-png": lambda tmp: _write(tmp / "t.png", b"hello world"),
    "truncated": lambda tmp: _write(tmp / "t.png", raw_png(json.dumps(base_recipe()))[:30]),
    "folder-named-png": lambda tmp: (tmp / "d.png").mkdir() or tmp / "d.png",
    "no-recipe": lambda tmp: _write(tmp / "n.png", raw_png(None)),
    "bomb-64mp": lambda tmp: _bomb(tmp, 10_000),
    "bomb-huge": lambda tmp: _bomb(tmp, 60_000),
    "recipe-not-utf8": lambda tmp: _write(tmp / "u.png", raw_png(b"\xff\xfe{\x00")),
    "recipe-bad-zlib": lambda tmp: _write(tmp / "z.png", raw_png(None)[:33] + _chunk(b"iTXt", b"lora_studio\x00\x01\x00\x00\x00garbage")
                                          + raw_png(None)[33:]),
    "pickle-adapter-path": _pickle_recipe,
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(PNG_FILES))
def test_hostile_png_file(tmp_path, capsys, case):
    png = PNG_FILES[case](tmp_path)
    _refused(tmp_path, capsys, ["generate", "--from-image", str(png), "--out", str(tmp_path / "out" / "o.png")])


# ---------------------------------------------------------------------------------------------
# 2. Adapter files: ``studio info`` reads them as ``generate --lora`` and ``merge`` do
# ---------------------------------------------------------------------------------------------
def _peft_folder(tmp, config):
    folder = tmp / "peft"
    folder.mkdir()
    m = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{m}.lora_A.weight": torch.randn(2, 32), f"{m}.lora_B.weight": torch.randn(32, 2)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def _lokr(tmp, **pieces):
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {f"{m}.lokr_w1": torch.randn(4, 4), f"{m}.lokr_w2": torch.randn(8, 8)}
    for k, v in pieces.items():
        if v is None:
            t.pop(f"{m}.lokr_{k}", None)
        else:
            t[f"{m}.lokr_{k}"] = v
    save_file(t, str(tmp / "k.safetensors"))
    return tmp / "k.safetensors"


def _loha(tmp):
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{m}.hada_w1_a": torch.randn(32), f"{m}.hada_w1_b": torch.randn(2, 32),
               f"{m}.hada_w2_a": torch.randn(32, 2), f"{m}.hada_w2_b": torch.randn(2, 32)}, str(tmp / "h.safetensors"))
    return tmp / "h.safetensors"


def _two_spellings(tmp):
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return lora_file(tmp / "d.safetensors", extra={f"{k}.lora_down.weight": torch.randn(2, 32),
                                                    f"{k}.lora_up.weight": torch.randn(32, 2)})


ADAPTERS = {
    "f64": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.float64),
    "int8": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.int8),
    "int32": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.int32),
    "bool": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.bool),
    "uint8": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.uint8),
    "fp8-e4m3": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.float8_e4m3fn),
    "fp8-e5m2": lambda tmp: lora_file(tmp / "a.safetensors", dtype=torch.float8_e5m2),
    "nan": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_A.weight", torch.full((2, 32), math.nan))),
    "inf": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_B.weight", torch.full((32, 2), math.inf))),
    "neg-inf": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_B.weight", torch.full((32, 2), -math.inf))),
    "huge-values": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_A.weight", torch.full((2, 32), 1e6))),
    "alpha-huge": lambda tmp: lora_file(tmp / "a.safetensors", _set("alpha", torch.tensor(1e9))),
    "alpha-nan": lambda tmp: lora_file(tmp / "a.safetensors", _set("alpha", torch.tensor(math.nan))),
    "rank-0": lambda tmp: lora_file(tmp / "a.safetensors", rank=0),
    "rank-mismatch": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_B.weight", torch.randn(32, 3))),
    "down-1d": lambda tmp: lora_file(tmp / "a.safetensors", _set("lora_A.weight", torch.randn(32))),
    "down-without-up": lambda tmp: lora_file(tmp / "a.safetensors", lambda t, m: t.pop(f"{m}.lora_B.weight")),
    "unknown-keys": lambda tmp: lora_file(tmp / "a.safetensors", extra={"model.diffusion.weight": torch.randn(2)}),
    "only-alpha": lambda tmp: _save(tmp / "a.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)}),
    "no-tensors": lambda tmp: _save(tmp / "a.safetensors", {}),
    "two-spellings": _two_spellings,
    "lokr-1d-w1": lambda tmp: _lokr(tmp, w1=torch.randn(4)),
    "lokr-empty-w2": lambda tmp: _lokr(tmp, w2=torch.randn(0, 8)),
    "lokr-missing-w2": lambda tmp: _lokr(tmp, w2=None),
    "loha-1d": _loha,
    "header-not-json": lambda tmp: safetensors_raw(tmp / "a.safetensors", b"{nope"),
    "header-array": lambda tmp: safetensors_raw(tmp / "a.safetensors", b"[1,2]"),
    "header-deep": lambda tmp: safetensors_raw(tmp / "a.safetensors", b"[" * 100_000 + b"]" * 100_000),
    "header-not-utf8": lambda tmp: safetensors_raw(tmp / "a.safetensors", b'{"\xff": 1}'),
    "header-length-huge": lambda tmp: safetensors_raw(tmp / "a.safetensors", b"{}", length=2**62),
    "header-offsets-past-end": lambda tmp: safetensors_raw(
        tmp / "a.safetensors", {"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 10**9]}}),
    "header-offsets-text": lambda tmp: safetensors_raw(
        tmp / "a.safetensors", {"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": "abc"}}),
    "header-dtype-odd": lambda tmp: safetensors_raw(
        tmp / "a.safetensors", {"x.lora_A.weight": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "header-shape-lies": lambda tmp: safetensors_raw(
        tmp / "a.safetensors", {"x.lora_A.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 8]}}, b"\0" * 8),
    "empty-file": lambda tmp: _write(tmp / "a.safetensors", b""),
    "four-bytes": lambda tmp: _write(tmp / "a.safetensors", b"\0\0\0\0"),
    "truncated": lambda tmp: _write(tmp / "a.safetensors", lora_file(tmp / "b.safetensors").read_bytes()[:-20]),
    "zip-named-safetensors": lambda tmp: _write(tmp / "a.safetensors", b"PK\x03\x04" + b"\0" * 200),
    "pickle-ckpt": lambda tmp: write_pickle(tmp / "a.ckpt"),
    "pickle-bin": lambda tmp: write_pickle(tmp / "a.bin"),
    "pickle-as-pt": lambda tmp: write_pickle(tmp / "a.pt"),
    "peft-config-list": lambda tmp: _peft_folder(tmp, [1, 2]),
    "peft-config-r-text": lambda tmp: _peft_folder(tmp, {"r": "eight", "lora_alpha": 8}),
    "peft-config-alpha-nan": lambda tmp: _peft_folder(tmp, '{"r": 2, "lora_alpha": NaN}'),
    "peft-config-pattern-list": lambda tmp: _peft_folder(tmp, {"r": 2, "lora_alpha": 2, "rank_pattern": [1]}),
    "peft-config-not-json": lambda tmp: _peft_folder(tmp, "{oops"),
    "folder-without-adapter": lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
    "missing": lambda tmp: tmp / "nope.safetensors",
}


def _save(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_hostile_adapter_file(tmp_path, capsys, case):
    path = ADAPTERS[case](tmp_path)
    _refused(tmp_path, capsys, ["info", str(path)])


def test_pickle_payload_never_runs_even_with_allow_pickle(tmp_path, capsys):
    path = write_pickle(tmp_path / "a.ckpt")
    _refused(tmp_path, capsys, ["info", "--allow-pickle", str(path)])


def test_too_many_tensors_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_MAX_ADAPTER_TENSORS", "1")
    _refused(tmp_path, capsys, ["info", str(lora_file(tmp_path / "a.safetensors"))], "STUDIO_MAX_ADAPTER_TENSORS")


# ---------------------------------------------------------------------------------------------
# 3. CLI arguments (generate, merge, train)
# ---------------------------------------------------------------------------------------------
GEN = ["generate", "--model", "tiny-random-sd1", "--prompt", "a red circle", "--steps", "1"]
ARGS = {
    "size-zero": GEN + ["--size", "0x64"],
    "size-negative": GEN + ["--size", "-64x64"],
    "size-odd": GEN + ["--size", "65x64"],
    "size-text": GEN + ["--size", "bigxbig"],
    "size-huge": GEN + ["--size", "1000000x64"],
    "size-over-model": GEN + ["--size", "2048x2048"],
    "steps-huge": GEN[:-2] + ["--steps", "1000000000"],
    "steps-text": GEN[:-2] + ["--steps", "ten"],
    "images-huge": GEN + ["--num-images", "1000000"],
    "guidance-nan": GEN + ["--guidance", "nan"],
    "guidance-inf": GEN + ["--guidance", "inf"],
    "guidance-negative": GEN + ["--guidance", "-1"],
    "guidance-huge": GEN + ["--guidance", "1e9"],
    "seed-text": GEN + ["--seed", "abc"],
    "lora-nan": GEN + ["--lora", "f.safetensors:nan"],
    "lora-inf": GEN + ["--lora", "f.safetensors:inf"],
    "lora-huge": GEN + ["--lora", "f.safetensors:1e6"],
    "lora-missing": GEN + ["--lora", "missing.safetensors:0.5"],
    "method-param-nan": GEN + ["--method-param", "tau=nan"],
    "method-param-no-value": GEN + ["--method-param", "tau"],
    "method-param-bad-key": GEN + ["--method-param", "bad key=1"],
    "method-unknown": GEN + ["--method", "evil"],
    "tag-inf": ["generate", "--model", "tiny-random-sd1", "--prompt", "x <lora:a:inf>", "--steps", "1"],
    "tag-nan": ["generate", "--model", "tiny-random-sd1", "--prompt", "x <lora:a:nan>", "--steps", "1"],
    "tag-text": ["generate", "--model", "tiny-random-sd1", "--prompt", "x <lora:a:big>", "--steps", "1"],
    "prompt-huge": ["generate", "--model", "tiny-random-sd1", "--prompt", "x" * 20_000, "--steps", "1"],
}


@pytest.mark.parametrize("case", list(ARGS))
def test_hostile_generate_arguments(tmp_path, capsys, case):
    _refused(tmp_path, capsys, ARGS[case] + ["--out", str(tmp_path / "out" / "o.png")])


def _merge_args(tmp, *extra, out="m.safetensors"):
    a = lora_file(tmp / "a.safetensors")
    return ["merge", str(a), str(a), "--out", str(tmp / "out" / out), *extra]


MERGES = {
    "dtype-int8": lambda tmp: _merge_args(tmp, "--option", "dtype=int8"),
    "dtype-unknown": lambda tmp: _merge_args(tmp, "--option", "dtype=complex"),
    "dtype-bool": lambda tmp: _merge_args(tmp, "--option", "dtype=bool"),
    "option-nan": lambda tmp: _merge_args(tmp, "--option", "quotas=NaN"),
    "option-unknown": lambda tmp: _merge_args(tmp, "--option", "evil=1"),
    "weights-nan": lambda tmp: _merge_args(tmp, "--weights", "nan,1"),
    "weights-text": lambda tmp: _merge_args(tmp, "--weights", "1,x"),
    "weights-huge": lambda tmp: _merge_args(tmp, "--weights", "1e9,1"),
    "rank-zero": lambda tmp: _merge_args(tmp, "--rank", "0"),
    "out-bin": lambda tmp: _merge_args(tmp, out="m.bin"),
    "out-is-folder": lambda tmp: (tmp / "out" / "m.safetensors").mkdir(parents=True) or _merge_args(tmp),
    "out-parent-is-file": lambda tmp: _write_parent_file(tmp) or _merge_args(tmp, out="f/m.safetensors"),
    "source-pickle": lambda tmp: ["merge", str(write_pickle(tmp / "p.ckpt")), "--out", str(tmp / "out" / "m.safetensors")],
}


def _write_parent_file(tmp):
    (tmp / "out").mkdir(exist_ok=True)
    (tmp / "out" / "f").write_text("a file")


@pytest.mark.parametrize("case", list(MERGES))
def test_hostile_merge(tmp_path, capsys, case):
    _refused(tmp_path, capsys, MERGES[case](tmp_path), keep={"f"})


OUTS = {
    "png-is-folder": lambda tmp: (tmp / "out" / "o.png").mkdir(parents=True) or str(tmp / "out" / "o.png"),
    "parent-is-file": lambda tmp: _write_parent_file(tmp) or str(tmp / "out" / "f" / "o.png"),
    "folder-is-file": lambda tmp: _write_parent_file(tmp) or str(tmp / "out" / "f"),
}


@pytest.mark.parametrize("case", list(OUTS))
def test_hostile_generate_output(tmp_path, capsys, case):
    _refused(tmp_path, capsys, GEN + ["--out", OUTS[case](tmp_path)], keep={"f"})


def test_train_refuses_a_bad_out_before_training(tmp_path, capsys):
    pytest.importorskip("training.dreambooth")
    (tmp_path / "imgs").mkdir()
    _refused(tmp_path, capsys, ["train", "--images", str(tmp_path / "imgs"), "--trigger", "sks", "--model",
                                "tiny-random-sd1", "--out", str(tmp_path / "out" / "t.bin")], ".safetensors")


# ---------------------------------------------------------------------------------------------
# 4. Evaluation suites: ``studio eval``
# ---------------------------------------------------------------------------------------------
SUITE_OK = "model: tiny-sd1\nscorer: none\nmetrics: []\nsteps: 1\nprompts: [a red circle]\n"
SUITES = {
    "steps-text": "steps: ten\nprompts: [x]\n",
    "steps-huge": "steps: 1000000000\nprompts: [x]\n",
    "steps-zero": "steps: 0\nprompts: [x]\n",
    "guidance-nan": "guidance: .nan\nprompts: [x]\n",
    "guidance-inf": "guidance: .inf\nprompts: [x]\n",
    "guidance-text": "guidance: lots\nprompts: [x]\n",
    "size-odd": "size: 63\nprompts: [x]\n",
    "size-one": "size: [64]\nprompts: [x]\n",
    "size-text": "size: big\nprompts: [x]\n",
    "size-zero": "size: [0, 64]\nprompts: [x]\n",
    "samples-1e8-text": "samples: 1e8\nprompts: [x]\n",
    "samples-1e8": "samples: 100000000\nprompts: [x]\n",
    "samples-zero": "samples: 0\nprompts: [x]\n",
    "base-seed-negative": "base_seed: -1\nprompts: [x]\n",
    "prompts-number": "prompts: 5\n",
    "prompts-numbers": "prompts: [1, 2]\n",
    "prompts-none": "prompts: []\n",
    "prompt-dict-no-text": "prompts: [{id: a}]\n",
    "prompt-huge": "prompts: [" + "x" * 20_000 + "]\n",
    "not-mapping": "- a\n- b\n",
    "scalar": "42\n",
    "unknown-key": "prompts: [x]\nexec: 1\n",
    "methods-number": "prompts: [x]\nmethods: 5\n",
    "methods-params-list": "prompts: [x]\nmethods: [{name: merge, params: [1]}]\n",
    "methods-params-nan": "prompts: [x]\nmethods: [{name: switch, params: {tau: .nan}}]\n",
    "method-unknown": "prompts: [x]\nmethods: [evil]\n",
    "metrics-number": "prompts: [x]\nmetrics: [1]\n",
    "weights-nan": "prompts: [x]\nweights: [.nan]\n",
    "weights-text": "prompts: [x]\nweights: [heavy]\n",
    "adapters-dict": "prompts: [x]\nadapters: {a: 1}\n",
    "adapter-name-space": "prompts: [x]\nadapters: [{name: my crescent, path: a.safetensors}]\nadapter_sets: [[my crescent]]\n",
    "adapter-weight-inf": "prompts: [x]\nadapters: [{name: a, path: a.safetensors, weight: .inf}]\n",
    "adapter-path-number": "prompts: [x]\nadapters: [{name: a, path: 5}]\n",
    "adapter-corrupt": "prompts: [x]\nadapters: [{name: a, path: bad.safetensors}]\nadapter_sets: [[a]]\n",
    "adapter-missing": "prompts: [x]\nadapters: [{name: a, path: nope.safetensors}]\nadapter_sets: [[a]]\n",
    "combinations-n-huge": "prompts: [x]\nadapters: [{name: a, path: a.safetensors}]\ncombinations: {categories: {c: [a]}, n: 99}\n",
    "oracle-number": "prompts: [x]\noracle: 5\n",
    "alias-bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)) + "x" * 0,
    "yaml-syntax": "prompts: [x\n",
    "not-utf8": b"prompts: [\xff\xfe]\n",
    "python-tag": "prompts: !!python/object/apply:os.system [touch PWNED]\n",
}


@pytest.mark.parametrize("case", list(SUITES))
def test_hostile_suite(tmp_path, capsys, case):
    body = SUITES[case]
    if case == "alias-bomb":
        body = body + "prompts: [x]\n"
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")
    lora_file(tmp_path / "a.safetensors")
    suite = tmp_path / "s.yaml"
    suite.write_bytes(body if isinstance(body, bytes) else (SUITE_OK.replace("prompts: [a red circle]\n", "") + body).encode())
    run = tmp_path / "run"
    _refused(tmp_path, capsys, ["eval", str(suite), "--out", str(run)], keep={"bad.safetensors", "a.safetensors", "s.yaml"})
    assert not run.exists() or not any(run.rglob("*"))


# ---------------------------------------------------------------------------------------------
# 5. The Python API: ``Studio.run`` / ``generate`` refuse before touching the UNet
# ---------------------------------------------------------------------------------------------
API = {
    "steps-text": dict(steps="10"),
    "steps-float": dict(steps=1.5),
    "steps-huge": dict(steps=10**9),
    "guidance-nan": dict(guidance=math.nan),
    "guidance-inf": dict(guidance=math.inf),
    "guidance-text": dict(guidance="high"),
    "width-huge": dict(width=10**6),
    "height-text": dict(height="64"),
    "images-huge": dict(num_images=10**6),
    "images-float": dict(num_images=2.5),
    "work-over": dict(width=256, height=256, steps=300),
    "seed-text": dict(seed="x"),
    "seed-huge": dict(seed=2**80),
    "prompt-number": dict(prompt=5),
    "prompt-huge": dict(prompt="x" * 20_000),
    "negative-number": dict(negative_prompt=3),
    "adapters-string": dict(adapters="a"),
    "adapter-weight-nan": dict(adapters=[("a", math.nan)]),
    "adapter-weight-huge": dict(adapters=[("a", 1e6)]),
    "adapter-weight-text": dict(adapters=[("a", "x")]),
    "adapter-spec-number": dict(adapters=[5]),
    "tag-inf": dict(prompt="x <lora:a:inf>"),
    "tag-nan-te": dict(prompt="x <lora:a:1:nan>"),
    "method-number": dict(method=5),
    "method-params-list": dict(method_params=[1]),
    "method-params-nan": dict(method="switch", method_params={"tau": math.nan}),
    "method-params-object": dict(method_params={"tau": object()}),
    "sampler-number": dict(sampler=3),
}


@pytest.mark.parametrize("case", list(API))
def test_hostile_api_call(sd1, case):
    from conftest import ATTN  # noqa: F401  (the tiny model's attention projections)

    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    params = dict(prompt="a red circle", steps=1, progress=False) | API[case]
    with pytest.raises(StudioError) as info:
        sd1.run(**params)
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 500
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd1.pipe.unet.modules())


def test_reproduce_refuses_a_pickle_named_in_a_recipe(sd1, tmp_path):
    png = _pickle_recipe(tmp_path)
    with pytest.raises(StudioError, match="safetensors"):
        sd1.reproduce(png)
    assert not (tmp_path / MARKER).exists()


def test_bounds_name_their_override(sd1, monkeypatch):
    with pytest.raises(StudioError, match="STUDIO_MAX_SIDE"):
        sd1.run("x", width=4096, steps=1, progress=False)
    monkeypatch.setenv("STUDIO_MAX_STEPS", "2")
    from studio.studio import Studio

    small = Studio.from_pipeline(sd1.pipe, "tiny")
    with pytest.raises(StudioError, match="STUDIO_MAX_STEPS"):
        small.run("x", steps=3, progress=False)


# ---------------------------------------------------------------------------------------------
# the common assertion
# ---------------------------------------------------------------------------------------------
def _refused(tmp: Path, capsys, argv: list[str], message: str | None = None, keep: set[str] = frozenset()) -> None:
    """Exit 2, one line on stderr (no traceback), no file written under out/, no payload run."""
    before = {p for p in tmp.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    if message:
        assert message in err
    after = {p for p in tmp.rglob("*") if p.is_file()}
    assert after <= before | {p for p in after if p.name in keep}, sorted(map(str, after - before))
    assert not list(tmp.rglob(MARKER)) and not Path(MARKER).exists()


# ---------------------------------------------------------------------------------------------
# 6. The app: a request over the bounds is refused in its handler, before any worker starts
# ---------------------------------------------------------------------------------------------
APP = {
    "steps-huge": dict(steps=10**6),
    "size-huge": dict(width=100_000, height=64),
    "batch-huge": dict(batch_count=10**6),
    "guidance-nan": dict(guidance=math.nan),
    "sliders-maxima": dict(steps=500, width=2048, height=2048, batch_count=64),
}


@pytest.mark.parametrize("case", list(APP))
def test_app_refuses_over_bounds_before_the_queue(sd1_pipe, tmp_path, monkeypatch, case):
    pytest.importorskip("gradio")
    from studio.app import AppHandlers
    from studio.studio import Studio

    h = AppHandlers(Studio.from_pipeline(sd1_pipe, "tiny"), tmp_path / "out")
    started = []
    monkeypatch.setattr(h.runs, "start_worker", lambda fn: started.append(fn))
    args = dict(prompt="a red circle", negative_prompt="", method="merge", params_json="{}", sampler="ddim",
                guidance=7.5, width=64, height=64, steps=2) | APP[case]
    outputs = list(h.generate(**args))
    assert not started and len(outputs) == 1
    status = str(outputs[0][-1])
    assert "error" in status.lower(), status
    assert case == "guidance-nan" or "STUDIO_MAX_" in status, status  # the bound and its override are named
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))


def test_a_non_utf8_file_name_is_a_legal_adapter(tmp_path, capsys):
    """Not hostile, but it used to be refused: a file name that is not UTF-8 loads, generates and reproduces."""
    import os

    name = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xffink.safetensors"))
    lora_file(name)
    out, again = tmp_path / "o.png", tmp_path / "again.png"
    assert main(GEN + ["--lora", f"{name}:0.5", "--out", str(out)]) == 0
    assert main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert out.read_bytes() == again.read_bytes()
