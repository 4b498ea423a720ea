"""Trained token embeddings (pivotal tuning) applied at generation: exact, trigger-only, on the TE switch."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from studio.adapters.activation import AdapterRig
from studio.adapters.adapter import Adapter, LoraDelta
from studio.errors import AdapterMismatchError
from studio.sampling import AdapterWeight, ComposeContext

from conftest import random_lora

SKS = 48136  # SD-1.5's id of "sks" (the tiny pipelines use that tokenizer)


def _with_embedding(studio, name: str, token: str = "sks", seed: int = 0) -> Adapter:
    """A random UNet LoRA that also carries a random embedding for ``token`` on every text encoder."""
    adapter = random_lora(studio, name, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    comps = [c for c in ("text_encoder", "text_encoder_2") if getattr(studio.pipe, c, None) is not None]
    adapter.embeddings = {token: {c: torch.randn(1, getattr(studio.pipe, c).config.hidden_size, generator=g)
                                  for c in comps}}
    return adapter


@contextlib.contextmanager
def _rows_set_by_hand(pipe, token_id: int, vectors: dict[str, torch.Tensor]):
    """The text encoders' embedding rows of ``token_id`` overwritten in place, restored afterwards."""
    saved = {}
    with torch.no_grad():
        for comp, vec in vectors.items():
            table = getattr(pipe, comp).get_input_embeddings().weight
            saved[comp] = table[token_id].clone()
            table[token_id] = vec.reshape(-1).to(table.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for comp, row in saved.items():
                getattr(pipe, comp).get_input_embeddings().weight[token_id] = row


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _hooks(pipe) -> int:
    """Hooks on the modules the rig may hook (transformers keeps its own output-capturing hooks on CLIP layers)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
               for m in getattr(pipe, c).modules() if isinstance(m, kinds))


def _encode(studio, adapters: list[AdapterWeight], prompt: str, te: dict[str, float]) -> torch.Tensor:
    with AdapterRig(studio.pipe, [a.adapter for a in adapters]) as rig:
        ctx = ComposeContext(pipe=studio.pipe, rig=rig, adapters=adapters, prompt=prompt, negative_prompt="",
                             guidance=3.0, steps=2, width=64, height=64, arch=studio.arch, device=studio.device,
                             dtype=studio.dtype)
        cond = ctx.encode(prompt, te)
    out = cond.embeds if cond.added is None else torch.cat([cond.embeds.flatten(), cond.added["text_embeds"].flatten()])
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_generation_equals_the_row_set_by_hand(arch, sd1, sdxl):
    studio = sd1 if arch == "sd1" else sdxl
    adapter = _with_embedding(studio, "pet")
    bare = dataclasses.replace(adapter, embeddings={}, sha256=None)
    before = _hooks(studio.pipe)
    got = studio.generate("a sks shape", [(adapter, 1.0)], steps=2, seed=3, progress=False)
    assert _hooks(studio.pipe) == before  # the embedding hooks left with the rig
    with _rows_set_by_hand(studio.pipe, SKS, adapter.embeddings["sks"]):
        want = studio.generate("a sks shape", [(bare, 1.0)], steps=2, seed=3, progress=False)
    assert np.array_equal(_pixels(got), _pixels(want))
    plain = studio.generate("a sks shape", [(bare, 1.0)], steps=2, seed=3, progress=False)
    assert not np.array_equal(_pixels(got), _pixels(plain))  # the embedding did something


def test_only_prompts_with_the_trigger_change_and_the_weight_is_a_switch(sd1):
    adapter = _with_embedding(sd1, "pet")
    use = [AdapterWeight(adapter, 1.0, 1.0)]
    base = _encode(sd1, [], "a red shape", {})
    assert torch.equal(_encode(sd1, use, "a red shape", {"pet": 1.0}), base)  # no trigger: bit-identical
    on = _encode(sd1, use, "a red sks shape", {"pet": 1.0})
    assert not torch.equal(on, _encode(sd1, [], "a red sks shape", {}))
    assert torch.equal(_encode(sd1, use, "a red sks shape", {"pet": 0.4}), on)  # not scaled by the weight
    assert torch.equal(_encode(sd1, use, "a red sks shape", {"pet": 0.0}), _encode(sd1, [], "a red sks shape", {}))
    # a text-encoder LoRA, by contrast, changes prompts without the trigger too
    te_path = next(p for p in sd1.adapters.shapes if p.startswith("text_encoder.") and p.endswith("q_proj"))
    h, w = sd1.adapters.shapes[te_path]
    te_lora = Adapter("te", {te_path: LoraDelta(torch.randn(2, w), torch.randn(h, 2), 2.0)})
    assert not torch.equal(_encode(sd1, [AdapterWeight(te_lora)], "a red shape", {"te": 1.0}), base)


def test_per_branch_encodes_use_each_adapters_own_embedding(sd1):
    from composers.composite import branch_conditioning

    a, b = _with_embedding(sd1, "a", seed=1), random_lora(sd1, "b", seed=2)  # b: UNet only, no embedding
    adapters = [AdapterWeight(a, 1.0, 1.0), AdapterWeight(b, 1.0, 1.0)]
    with AdapterRig(sd1.pipe, [a, b]) as rig:
        ctx = ComposeContext(pipe=sd1.pipe, rig=rig, adapters=adapters, prompt="a sks shape", negative_prompt="",
                             guidance=3.0, steps=2, width=64, height=64, arch=sd1.arch, device=sd1.device,
                             dtype=sd1.dtype)
        per_lora = branch_conditioning(ctx, "per_lora")
        reference = branch_conditioning(ctx, "reference")
    with _rows_set_by_hand(sd1.pipe, SKS, a.embeddings["sks"]):
        want_a = _encode(sd1, [], "a sks shape", {})
    plain = _encode(sd1, [], "a sks shape", {})
    assert torch.equal(per_lora[0].embeds, want_a) and torch.equal(per_lora[1].embeds, plain)
    assert torch.equal(reference[0].embeds, want_a) and torch.equal(reference[1].embeds, want_a)
    # and through a composer end to end: switch's per-LoRA branches
    before = _hooks(sd1.pipe)
    images = sd1.generate("a sks shape", [(a, 1.0), (b, 1.0)], method="switch", steps=2, seed=0, progress=False)
    assert images[0].size == (64, 64) and _hooks(sd1.pipe) == before


def test_a_trigger_of_several_tokens_is_an_error_naming_it(sd1):
    adapter = _with_embedding(sd1, "multi", token="qwxzvbn")
    before = _hooks(sd1.pipe)
    with pytest.raises(AdapterMismatchError, match=r"'qwxzvbn' tokenizes into \d+ tokens"):
        sd1.generate("a qwxzvbn shape", [(adapter, 1.0)], steps=1, seed=0, progress=False)
    assert _hooks(sd1.pipe) == before  # checked before any hook existed
    wide = dataclasses.replace(adapter, embeddings={"sks": {"text_encoder": torch.zeros(1, 7)}})
    with pytest.raises(AdapterMismatchError, match="7-wide embedding"):
        sd1.generate("a sks shape", [(wide, 1.0)], steps=1, seed=0, progress=False)
