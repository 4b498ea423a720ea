"""DreamBooth training: loss maths, learning, exact resume, SDXL, outputs, bad input, CLI, accelerate."""

from __future__ import annotations

import json
import math
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.base import build_tiny_pipeline
from studio.studio import Studio
from studio.toyworld.render import Obj, Scene, render
from training.dreambooth import (
    DreamBoothTrainer, TrainConfig, TrainingError, dreambooth_loss, snr_weights, train_adapter,
)

REPO = Path(__file__).resolve().parent.parent
FAST = dict(steps=3, grad_accum=1, batch_size=2, lr=1e-3, sample_steps=2, num_validation_images=1,
            final_grid=False, progress=False, factors="4x8")


@pytest.fixture
def images(tmp_path) -> Path:
    """Three toy-world crescents in different colours, sizes and positions."""
    folder = tmp_path / "inst"
    folder.mkdir()
    for i, (c, s, p) in enumerate([("red", "large", "centre"), ("blue", "medium", "left"), ("green", "small", "right")]):
        render(Scene([Obj("crescent", c, size=s, position=p)]), i).save(folder / f"{i}.png")
    return folder


def _studio(arch="sd1") -> Studio:
    return Studio.from_pipeline(build_tiny_pipeline(arch))


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 10, encoder_hidden_states=ehs, return_dict=False)[0]


# ---- loss maths ----------------------------------------------------------------------------------

def test_loss_without_and_with_prior_preservation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, _ = dreambooth_loss(pred[:2], target[:2], n_instance=2)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred[:2], target[:2]))
    loss, parts = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=0.7)
    inst = torch.nn.functional.mse_loss(pred[:2], target[:2])
    cls = torch.nn.functional.mse_loss(pred[2:], target[2:])
    torch.testing.assert_close(loss, inst + 0.7 * cls)
    assert parts["prior"] == pytest.approx(cls.item(), rel=1e-6)


def test_min_snr_weights_for_both_prediction_types():
    ac = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    snr = ac[t] / (1 - ac[t])
    sched = SimpleNamespace(alphas_cumprod=ac)  # diffusers' compute_snr reads only this
    torch.testing.assert_close(snr_weights(sched, t, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(snr_weights(sched, t, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1))


def test_warmup_uses_diffusers_get_scheduler_and_resumes_mid_warmup():
    """lr = base·s/W during warm-up (diffusers' constant_with_warmup), continued from the current step."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    fake = SimpleNamespace(optimizer=opt, base_lrs=[1e-3], cfg=SimpleNamespace(warmup_steps=4), lr_scheduler=None, step=0)
    sched = DreamBoothTrainer._lr_schedule(fake)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    resumed = SimpleNamespace(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), base_lrs=[1e-3],
                              cfg=SimpleNamespace(warmup_steps=4), lr_scheduler=None, step=2)
    DreamBoothTrainer._lr_schedule(resumed)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


# ---- training runs -------------------------------------------------------------------------------

def test_loss_falls_on_toy_data(images):
    studio = _studio()
    cfg = TrainConfig(images=str(images), **{**FAST, "steps": 40, "lr": 1e-2, "batch_size": 3})
    trainer = DreamBoothTrainer(studio, cfg)
    trainer.setup()
    with torch.no_grad():  # a fixed set of noisy batches, before and after
        before = sum(trainer.compute_loss(10_000 + i)[0].item() for i in range(4))
    for _ in range(cfg.steps):
        trainer.train_step()
    with torch.no_grad():
        after = sum(trainer.compute_loss(10_000 + i)[0].item() for i in range(4))
    trainer._strip()
    assert after < 0.8 * before, (before, after)


def _with_masks(images: Path) -> Path:
    """The fixture's crescents again, each with its concept mask in ``masks/`` (what the attention loss reads)."""
    from studio.toyworld.render import render_with_masks

    (images / "masks").mkdir()
    for i, (c, s, p) in enumerate([("red", "large", "centre"), ("blue", "medium", "left"), ("green", "small", "right")]):
        image, masks = render_with_masks(Scene([Obj("crescent", c, size=s, position=p)]), i)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(images / f"{i}.png")))  # render's own pixels
        masks[0].save(images / "masks" / f"{i}.png")
    return images


def test_attention_loss_pulls_the_trigger_maps_onto_the_concept_masks(images):
    """Break-A-Scene's cross-attention loss: the max-normalised maps of the trigger and the word after it
    ("sks", "object") move towards each image's concept mask, and the loss is reported beside the others."""
    _with_masks(images)
    studio = _studio()
    cfg = TrainConfig(images=str(images), **{**FAST, "steps": 30, "lr": 1e-2, "batch_size": 3},
                      unet_targets="cross", attention_loss=1.0)
    trainer = DreamBoothTrainer(studio, cfg)
    trainer.setup()
    assert trainer._concept_tokens("a sks object") == [2, 3]  # BOS, "a", then the trigger and its word
    assert trainer._concept_tokens("a red circle") == []
    trainer.cfg.attention_words = "trigger"
    assert trainer._find_concept_tokens("a sks object") == [2]
    trainer.cfg.attention_words = "trigger+word"
    with torch.no_grad():
        before = [trainer.compute_loss(10_000 + i)[1]["attention"] for i in range(4)]
    for _ in range(cfg.steps):
        parts = trainer.train_step()
    assert "attention" in parts and "instance" in parts
    with torch.no_grad():
        after = [trainer.compute_loss(10_000 + i)[1]["attention"] for i in range(4)]
    trainer._strip()
    assert sum(after) < 0.8 * sum(before), (before, after)
    plain = DreamBoothTrainer(_studio(), TrainConfig(images=str(images), **FAST))
    plain.setup()
    assert "attention" not in plain.compute_loss(0)[1]  # off by default: no capture, no term
    plain._strip()


def test_attention_loss_needs_masks_of_the_images_size(images):
    with pytest.raises(TrainingError, match="masks"):  # none at all: names the folder to fill
        DreamBoothTrainer(_studio(), TrainConfig(images=str(images), **FAST, attention_loss=0.1)).setup()
    (images / "masks").mkdir()
    Image.new("L", (32, 32), 255).save(images / "masks" / "0.png")
    with pytest.raises(TrainingError, match="32x32 but its image is 64x64"):
        DreamBoothTrainer(_studio(), TrainConfig(images=str(images), **FAST, attention_loss=0.1)).setup()
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(TrainingError, match="attention_loss"):
            TrainConfig(images=str(images), attention_loss=bad)
    with pytest.raises(TrainingError, match="gradient checkpointing"):
        TrainConfig(images=str(images), attention_loss=0.1, gradient_checkpointing=True)
    with pytest.raises(TrainingError, match="attention_words 'word' is unknown; use trigger"):
        TrainConfig(images=str(images), attention_loss=0.1, attention_words="word")


@pytest.mark.parametrize("kind,emb,te", [("lora", False, False), ("kron", False, False), ("lora", True, False),
                                         ("kron", False, True)])
def test_resume_equals_an_uninterrupted_run(images, tmp_path, kind, emb, te):
    common = dict(images=str(images), adapter=kind, checkpoint_every=2, train_token_embedding=emb,
                  train_text_encoder=te, text_encoder_lr=1e-3, **{**FAST, "grad_accum": 2})
    full = DreamBoothTrainer(_studio(), TrainConfig(**{**common, "steps": 4}, output_dir=str(tmp_path / "a")))
    a = full.run()
    part_dir = str(tmp_path / "b")
    DreamBoothTrainer(_studio(), TrainConfig(**{**common, "steps": 2}, output_dir=part_dir)).run()
    resumed = DreamBoothTrainer(_studio(), TrainConfig(**{**common, "steps": 4}, output_dir=part_dir, resume=True))
    b = resumed.run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert any(k.startswith("text_encoder.") for k in a.layers) == te and set(a.layers) == set(b.layers)
    for key, d in a.layers.items():
        assert torch.equal(d.delta(), b.layers[key].delta()), key
    assert set(a.embeddings) == set(b.embeddings) == ({"sks"} if emb else set())
    for token, per in a.embeddings.items():
        assert torch.equal(per["text_encoder"], b.embeddings[token]["text_encoder"])
    if te:  # a checkpoint with text-encoder layers does not resume into a run without them
        with pytest.raises(TrainingError, match="train_text_encoder=True"):
            DreamBoothTrainer(_studio(), TrainConfig(**{**common, "steps": 5, "train_text_encoder": False},
                                                     output_dir=part_dir, resume=True)).run()


@pytest.mark.parametrize("scope", ["all", "prior"])
def test_caption_dropout_empties_captions_and_keeps_the_random_stream(images, tmp_path, scope):
    common = dict(images=str(images), prior_preservation=True, num_class_images=2, class_steps=2,
                  class_dir=str(tmp_path / "cls"), **{**FAST, "batch_size": 4})
    plain = DreamBoothTrainer(_studio(), TrainConfig(**common))
    plain.setup()
    drop = DreamBoothTrainer(_studio(), TrainConfig(**common, caption_dropout=0.5, caption_dropout_scope=scope))
    drop.setup()
    emptied = {"inst": 0, "prior": 0}
    for micro in range(20):
        picks, caps, x0, noise, t = plain._micro_batch(micro)
        _, dcaps, dx0, dnoise, dt = drop._micro_batch(micro)
        # the same images, latents, noise and timesteps: only captions differ
        assert torch.equal(x0, dx0) and torch.equal(noise, dnoise) and torch.equal(t, dt)
        assert caps == [e.caption for e in picks]
        for i, (c, d) in enumerate(zip(caps, dcaps)):
            assert d in (c, "")
            emptied["inst" if i < 4 else "prior"] += d == "" != c
    assert 0.2 < emptied["prior"] / 80 < 0.8
    assert (emptied["inst"] == 0) == (scope == "prior") and (scope == "prior" or 0.2 < emptied["inst"] / 80 < 0.8)
    assert "" in drop._emb_cache  # the empty caption is encoded once, like the others
    loss, _ = drop.compute_loss(0)
    assert torch.isfinite(loss)
    plain._strip(), drop._strip()
    with pytest.raises(TrainingError, match="caption_dropout"):
        TrainConfig(images=str(images), caption_dropout=1.0)
    with pytest.raises(TrainingError, match="scope"):
        TrainConfig(images=str(images), caption_dropout_scope="instance")



def test_instance_max_timestep_keeps_instance_images_at_low_noise_and_prior_images_everywhere(images, tmp_path):
    """``instance_max_timestep``: instance images are noised only below it (a fill learnt on an outline
    already drawn), prior images over the whole schedule; nothing else of the batch changes."""
    common = dict(images=str(images), prior_preservation=True, num_class_images=2, class_steps=2,
                  class_dir=str(tmp_path / "cls"), **{**FAST, "batch_size": 4})
    plain = DreamBoothTrainer(_studio(), TrainConfig(**common))
    plain.setup()
    low = DreamBoothTrainer(_studio(), TrainConfig(**common, instance_max_timestep=300))
    low.setup()
    high = DreamBoothTrainer(_studio(), TrainConfig(**common, instance_min_timestep=700))  # the object's side
    high.setup()
    inst, prior, inst_high = [], [], []
    for micro in range(40):
        picks, caps, x0, noise, t = plain._micro_batch(micro)
        _, lcaps, lx0, lnoise, lt = low._micro_batch(micro)
        assert torch.equal(x0, lx0) and torch.equal(noise, lnoise) and caps == lcaps
        assert torch.equal(lt[4:], t[4:])  # prior images keep their timesteps
        inst += lt[:4].tolist()
        prior += lt[4:].tolist()
        ht = high._micro_batch(micro)[4]
        assert torch.equal(ht[4:], t[4:])
        inst_high += ht[:4].tolist()
    assert max(inst) < 300 and min(inst) >= 0 and max(inst) > 200  # spread over [0, 300)
    assert min(inst_high) >= 700 and max(inst_high) < 1000 and min(inst_high) < 800  # spread over [700, 1000)
    assert max(prior) > 600
    plain._strip(), low._strip(), high._strip()
    for bad in (0, 1001):
        with pytest.raises(TrainingError, match="instance_max_timestep"):
            TrainConfig(images=str(images), instance_max_timestep=bad)
    for bad in (-1, 1000):
        with pytest.raises(TrainingError, match="instance_min_timestep"):
            TrainConfig(images=str(images), instance_min_timestep=bad)
    with pytest.raises(TrainingError, match="must be below instance_max_timestep"):
        TrainConfig(images=str(images), instance_min_timestep=500, instance_max_timestep=400)

@pytest.mark.parametrize("kind", ["lora", "kron"])
def test_tiny_sdxl_trains_with_both_types_and_writes_clean_files(images, tmp_path, kind):
    from safetensors import safe_open

    studio = _studio("sdxl")
    before = _unet_out_sdxl(studio.pipe)
    out = tmp_path / f"sdxl-{kind}.safetensors"
    adapter = train_adapter(studio, TrainConfig(images=str(images), adapter=kind, out=str(out), snr_gamma=5.0,
                                                prior_preservation=True, num_class_images=2, class_steps=2,
                                                **{**FAST, "final_grid": True}))
    assert adapter.kind == kind and adapter.arch == "sdxl" and adapter.num_params() > 0
    assert any(d.delta().abs().max() > 0 for d in adapter.layers.values())  # it learnt something
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and not any(k.startswith(("module.", "base_model.model.")) for k in keys)
    assert all(("lokr_w" in k) == (kind == "kron") for k in keys if not k.endswith(".alpha"))
    assert meta["ss_output_name"] == "sdxl-" + kind and meta["trigger"] == "sks"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl-v1-base/")
    assert meta["ss_num_reg_images"] == "2" and json.loads(meta["training_params"])["adapter"] == kind
    assert (tmp_path / f"sdxl-{kind}-train" / "samples" / "final-grid.png").is_file()
    # the shared UNet is back to exactly its old self, and the file loads into the library
    assert torch.equal(_unet_out_sdxl(studio.pipe), before)
    loaded = studio.adapters.load(out)
    assert loaded.kind == kind and loaded.trigger == "sks"
    assert studio.generate("a sks object", [(loaded.name, 1.0)], steps=2, seed=1)[0].size == (64, 64)


def _unet_out_sdxl(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return pipe.unet(x, 10, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]


def test_text_encoder_lora_and_validation_images(images, tmp_path):
    studio = _studio()
    cfg = TrainConfig(images=str(images), train_text_encoder=True, validate_every=2, output_dir=str(tmp_path / "o"),
                      **{**FAST, "steps": 2})
    adapter = train_adapter(studio, cfg)
    assert {"unet", "text_encoder"} <= adapter.components()
    assert list((tmp_path / "o" / "samples").glob("step-000002-*.png")) == []  # not at the last step
    cfg = TrainConfig(images=str(images), validate_every=1, output_dir=str(tmp_path / "v"), **{**FAST, "steps": 2})
    train_adapter(studio, cfg)
    assert len(list((tmp_path / "v" / "samples").glob("step-000001-*.png"))) == 1


def test_kron_text_encoder_trains_writes_te_lokr_and_applies_at_inference(images, tmp_path):
    from safetensors import safe_open
    from studio.adapters.activation import AdapterRig
    from studio.adapters.adapter import KronDelta
    from studio.adapters.formats import read_adapter, write_adapter

    studio = _studio()
    pipe = studio.pipe
    prompt = "a sks object"

    def embed():
        with torch.no_grad():
            return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]

    base = embed()
    trainer = DreamBoothTrainer(studio, TrainConfig(images=str(images), adapter="kron", train_text_encoder=True,
                                                    text_encoder_lr=3e-3, **FAST))
    trainer.setup()
    te_params = {id(p) for n, p in zip(trainer.param_names, trainer.params) if n.startswith("text_encoder.")}
    assert te_params and all("kron_" in n for n in trainer.param_names if n.startswith("text_encoder."))
    te_group = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} == te_params]
    assert len(te_group) == 1 and te_group[0]["lr"] == 3e-3  # the text side trains at text_encoder_lr
    for _ in range(trainer.cfg.steps):
        trainer.train_step()
    trained = embed()  # the text encoder with its training layers in
    adapter = trainer.current_adapter()
    trainer._strip()
    torch.testing.assert_close(embed(), base, rtol=0, atol=0)  # stripped: the shared encoder is untouched
    assert not any("Kron" in type(m).__name__ for m in pipe.text_encoder.modules())
    te_layers = {k: d for k, d in adapter.layers.items() if k.startswith("text_encoder.")}
    assert len(te_layers) == 4 * pipe.text_encoder.config.num_hidden_layers
    assert all(isinstance(d, KronDelta) and d.w1.shape == (4, 8) for d in te_layers.values())
    assert not torch.allclose(trained, base)  # 3 steps moved the trigger prompt's encoding

    out = write_adapter(adapter, tmp_path / "kte.safetensors", format="lokr")
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    te_keys = [k for k in keys if k.startswith("lora_te_")]
    assert len(te_keys) == 3 * len(te_layers) and all(k.endswith((".lokr_w1", ".lokr_w2", ".alpha")) for k in te_keys)
    loaded = read_adapter(out)
    assert loaded.kind == "kron" and set(loaded.layers) == set(adapter.layers)
    for k, d in te_layers.items():
        torch.testing.assert_close(loaded.layers[k].delta(), d.delta())
    with AdapterRig(pipe, [loaded]) as rig:  # the inference rig applies the text-encoder side
        rig.set(text={loaded.name: 1.0})
        on = embed()
        rig.set(text={})
        off = embed()
    torch.testing.assert_close(on, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(off, base, rtol=0, atol=0)


def test_kron_text_encoder_factors_are_checked_before_anything_is_injected(images):
    from studio.adapters.kron import KronFactorError

    studio = _studio()
    attn = studio.pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")
    attn.q_proj = torch.nn.Linear(36, 32)  # an in-width 8 does not divide
    with pytest.raises(KronFactorError, match=r"text_encoder\.encoder\.layers\.0\.self_attn\.q_proj.*one of"):
        train_adapter(studio, TrainConfig(images=str(images), adapter="kron", train_text_encoder=True, **FAST))
    assert not any("Kron" in type(m).__name__ for c in ("unet", "text_encoder")
                   for m in getattr(studio.pipe, c).modules())


@pytest.mark.parametrize("kind,te", [("lora", False), ("kron", False), ("lora", True)])
def test_token_embedding_learns_only_the_trigger_row(images, tmp_path, kind, te):
    from safetensors.torch import load_file

    studio = _studio()
    table = studio.pipe.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    sks = studio.pipe.tokenizer.convert_tokens_to_ids("sks</w>")
    out = tmp_path / f"{kind}.safetensors"
    trainer = DreamBoothTrainer(studio, TrainConfig(images=str(images), adapter=kind, train_text_encoder=te,
                                                    train_token_embedding=True, out=str(out), **FAST))
    adapter = trainer.run()
    assert torch.equal(studio.pipe.text_encoder.get_input_embeddings().weight, before)  # the table is untouched
    assert not studio.pipe.text_encoder.get_input_embeddings()._forward_hooks  # training hook removed
    assert set(adapter.embeddings) == {"sks"} and set(adapter.embeddings["sks"]) == {"text_encoder"}
    vec = adapter.embeddings["sks"]["text_encoder"]
    assert vec.shape == (1, before.shape[1]) and not torch.equal(vec[0], before[sks])  # it learnt, from sks' row
    assert (vec[0] - before[sks]).abs().max() < 0.1  # 3 Adam steps at 5e-3 move each entry ≤ 1.5e-2
    assert ("text_encoder" in {p.split(".")[0] for p in adapter.layers}) == te
    assert "unet" in adapter.components() and adapter.kind == kind
    raw = load_file(str(out))
    assert torch.equal(raw["bundle_emb.sks.string_to_param.*"], vec.half())
    loaded = studio.adapters.load(out)
    assert torch.equal(loaded.embeddings["sks"]["text_encoder"], vec.half().float())


@pytest.mark.parametrize("kind", ["lora", "kron"])
def test_cross_kv_targets_only_the_cross_attention_keys_and_values(images, tmp_path, kind):
    """Custom Diffusion's layers: the adapter sits on attn2.to_k / attn2.to_v and nowhere else."""
    studio = _studio()
    adapter = train_adapter(studio, TrainConfig(images=str(images), adapter=kind, unet_targets="cross-kv",
                                                train_token_embedding=True, **FAST))
    unet_layers = [p for p in adapter.layers if p.startswith("unet.")]
    assert unet_layers and all(p.endswith(("attn2.to_k", "attn2.to_v")) for p in unet_layers)
    n_cross = sum(1 for n, _ in studio.pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    assert len(unet_layers) == n_cross
    with pytest.raises(TrainingError, match="cross-kv"):
        TrainConfig(images=str(images), unet_targets="keys")


@pytest.mark.parametrize("kind", ["lora", "kron"])
def test_attention_plus_conv_trains_the_resnet_convolutions_and_round_trips(images, tmp_path, kind):
    """LoCon's reach (LoKr's for kron): conv layers on every ResNet conv1/conv2 beside the attention
    projections; they learn, and the written file loads back with the same layers and deltas."""
    studio = _studio()  # validation samples are drawn while PEFT / KronConv2d still wrap the convolutions
    before = _unet_out(studio.pipe)
    adapter = train_adapter(studio, TrainConfig(images=str(images), adapter=kind, unet_targets="attention+conv",
                                                validation_prompts=["a sks object"], **{**FAST, "validate_every": 2}))
    assert adapter.kind == kind and torch.equal(_unet_out(studio.pipe), before)  # the pipeline is as it was
    convs = [p for p in adapter.layers if p.startswith("unet.") and p.endswith(("conv1", "conv2"))]
    n_convs = sum(1 for n, _ in studio.pipe.unet.named_modules() if n.endswith(("resnets.0.conv1", "resnets.0.conv2",
                                                                                 "resnets.1.conv1", "resnets.1.conv2",
                                                                                 "resnets.2.conv1", "resnets.2.conv2")))
    assert len(convs) == n_convs > 0 and all(adapter.layers[p].is_conv for p in convs)
    assert all(adapter.layers[p].delta().abs().max() > 0 for p in convs)  # the convolutions learnt
    assert any(p.endswith("attn1.to_q") for p in adapter.layers)
    from studio.adapters.formats import write_adapter

    fmt = {"kron": "lokr", "lora": "diffusers"}[kind]
    loaded = studio.adapters.load(write_adapter(adapter, tmp_path / f"conv-{kind}.safetensors", format=fmt), name="conv")
    assert sorted(loaded.layers) == sorted(adapter.layers)
    for p in convs:
        assert torch.allclose(loaded.layers[p].delta(), adapter.layers[p].delta(), atol=1e-2)


def test_token_embedding_needs_a_one_token_trigger(images):
    studio = _studio()
    with pytest.raises(TrainingError, match=r"'qwxzvbn' tokenizes into \d+ tokens.*--train-token-embedding"):
        train_adapter(studio, TrainConfig(images=str(images), trigger="qwxzvbn", train_token_embedding=True,
                                          **{**FAST, "steps": 1}))
    assert not any("lora" in type(m).__name__.lower() for m in studio.pipe.unet.modules())  # nothing injected


def test_ctrl_c_saves_a_checkpoint(images, tmp_path, monkeypatch):
    trainer = DreamBoothTrainer(_studio(), TrainConfig(images=str(images), output_dir=str(tmp_path), **{**FAST, "steps": 5}))
    real = DreamBoothTrainer.train_step

    def step_then_interrupt(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(DreamBoothTrainer, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 2
    assert not list(tmp_path.glob("**/*.tmp"))  # nothing half-written


# ---- bad input -----------------------------------------------------------------------------------

def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    studio = _studio()
    with pytest.raises(TrainingError, match="does not exist"):
        train_adapter(studio, TrainConfig(images=str(tmp_path / "nope"), **FAST))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="has no images"):
        train_adapter(studio, TrainConfig(images=str(tmp_path / "empty"), **FAST))


def test_corrupt_images_skipped_or_fatal_and_mixed_sizes_resized(images, tmp_path, caplog):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (100, 80), "red").save(images / "big.jpg")
    (images / "big.txt").write_text("a sks object on red")
    studio = _studio()
    with caplog.at_level(logging.INFO, logger="studio.training"):
        trainer = DreamBoothTrainer(studio, TrainConfig(images=str(images), output_dir=str(tmp_path / "o"), **FAST))
        trainer.run()
    assert "broken.png" in caplog.text and "100x80" in caplog.text
    assert len(trainer.instance) == 4 and all(e.image.size == (64, 64) for e in trainer.instance)
    assert "a sks object on red" in {e.caption for e in trainer.instance}
    with pytest.raises(TrainingError, match="broken.png"):
        train_adapter(studio, TrainConfig(images=str(images), skip_bad_images=False, **FAST))


def test_split_trigger_warns_and_bad_factors_fail_before_training(images):
    studio = _studio()
    trainer = DreamBoothTrainer(studio, TrainConfig(images=str(images), trigger="qwxzvbn", **{**FAST, "steps": 1}))
    trainer.run()
    assert any("qwxzvbn" in w and "split" in w for w in trainer.warnings)
    from studio.adapters.kron import KronFactorError

    with pytest.raises(KronFactorError, match="valid|one of"):
        train_adapter(studio, TrainConfig(images=str(images), adapter="kron", **{**FAST, "factors": "5x3"}))
    assert not any("Kron" in type(m).__name__ for m in studio.pipe.unet.modules())


# ---- CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-sd1"
    build_tiny_pipeline("sd1").save_pretrained(path)
    return path


def test_cli_train(images, tmp_path, tiny_model_dir):
    from studio.cli import main

    _with_masks(images)

    out = tmp_path / "cli.safetensors"
    rc = main(["train", "--images", str(images), "--trigger", "sks", "--class-word", "shape", "--adapter", "kron",
               "--factors", "4x8", "--steps", "2", "--grad-accum", "1", "--model", str(tiny_model_dir),
               "--num-validation-images", "1", "--sample-steps", "2", "--svd-lora-rank", "8", "--train-token-embedding",
               "--caption-dropout", "0.2", "--train-text-encoder", "--text-encoder-lr", "2e-3", "--out", str(out),
               "--instance-max-timestep", "500", "--instance-min-timestep", "100", "--attention-loss", "0.05",
               "--attention-words", "trigger"])
    assert rc == 0 and out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        params = json.loads(f.metadata()["training_params"])
    assert params["caption_dropout"] == 0.2 and params["caption_dropout_scope"] == "all"
    assert params["instance_max_timestep"] == 500 and params["attention_loss"] == 0.05
    assert params["instance_min_timestep"] == 100 and params["attention_words"] == "trigger"
    assert params["train_text_encoder"] is True and params["text_encoder_lr"] == 2e-3
    from studio.adapters.formats import read_adapter

    kron, lora = read_adapter(out), read_adapter(tmp_path / "cli-lora8.safetensors")
    assert kron.kind == "kron" and lora.kind == "lora" and lora.ranks() == [8] and set(lora.layers) == set(kron.layers)
    assert {p.split(".")[0] for p in kron.layers} == {"unet", "text_encoder"}
    assert torch.equal(kron.embeddings["sks"]["text_encoder"], lora.embeddings["sks"]["text_encoder"])  # both carry it
    assert main(["train", "--images", str(tmp_path / "missing"), "--model", str(tiny_model_dir), "--out", str(out)]) == 2


@pytest.mark.slow
def test_accelerate_two_cpu_processes(images, tmp_path, tiny_model_dir):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # accelerate 1.15 runs `launch --cpu --num_processes 2` as ONE process (its simple launcher); on a
    # CPU-only host `--multi_gpu` starts torchrun workers that accelerate then runs as MULTI_CPU (gloo).
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli", "train", "--images", str(images),
           "--steps", "2", "--grad-accum", "2", "--model", str(tiny_model_dir), "--num-validation-images", "1",
           "--sample-steps", "2", "--checkpoint-every", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from studio.adapters.formats import read_adapter
    from safetensors.torch import load_file

    adapter = read_adapter(out)
    assert adapter.kind == "lora" and adapter.metadata["ss_steps"] == "2"
    # rank 0 wrote the unwrapped model's tensors: the file equals the last checkpoint's parameters
    ckpt = load_file(str(tmp_path / "ddp-train" / "checkpoints" / "step-000002" / "state.safetensors"))
    params = {k: v for k, v in ckpt.items() if k.startswith("param.")}
    assert params and not any(".module." in k for k in params)
    for path, d in adapter.layers.items():
        down = ckpt[f"param.{path}.lora_A.studio_train.weight"]
        torch.testing.assert_close(d.down.float(), down.half().float())
    assert proc.stdout.count("ddp.safetensors") == 1 and "(2 processes)" in proc.stdout  # only rank 0 prints


def test_bf16_and_gradient_checkpointing(images):
    studio = _studio()
    trainer = DreamBoothTrainer(studio, TrainConfig(images=str(images), mixed_precision="bf16", gradient_checkpointing=True,
                                                    adapter="kron", **{**FAST, "steps": 2}))
    adapter = trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.params)  # trainable weights stay fp32
    assert len(trainer.history) == 2 and all(math.isfinite(h["loss"]) for h in trainer.history)
    assert adapter.is_finite() and not studio.pipe.unet.is_gradient_checkpointing
    assert next(studio.pipe.unet.parameters()).dtype == torch.float32  # the base model was not cast


def test_demo_prior_images_are_cached_per_base_model():
    """A continued UNet keeps its folder's name; its prior images must not be another UNet's."""
    from studio.base import build_tiny_pipeline
    from training.demo_adapters import class_images_dir

    a, b = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1")
    assert class_images_dir(Studio.from_pipeline(a, "toy-sd")) == class_images_dir(Studio.from_pipeline(b, "toy-sd"))
    with torch.no_grad():
        next(b.unet.parameters()).add_(0.01)
    assert class_images_dir(Studio.from_pipeline(a, "toy-sd")) != class_images_dir(Studio.from_pipeline(b, "toy-sd"))
    by_path = class_images_dir(Studio.from_pipeline(a, "/work/worlds/v4/toy-sd"))  # --model FOLDER: one folder, named
    assert by_path.parent == class_images_dir(Studio.from_pipeline(a, "toy-sd")).parent
    assert by_path.name.startswith("class_images-toy-sd-")


def test_demo_instance_sets_keep_to_their_sizes_and_say_so(tmp_path):
    """An object taught only at the sizes the VAE keeps shows no small one, and its set is redrawn when that changes."""
    import dataclasses

    from training.demo_adapters import DEMOS, instance_recipe, instance_set, instance_sizes

    arrow = next(d for d in DEMOS if d.concept == "arrow")
    medium_large = dataclasses.replace(arrow, sizes=tuple(instance_sizes("medium,large")))
    instance_set(medium_large, tmp_path / "ml", n=12)
    instance_set(arrow, tmp_path / "all", n=18)
    captions = [p.read_text() for p in sorted((tmp_path / "ml").glob("*.txt"))]
    assert len(captions) == 12 and not any("small" in c for c in captions) and any("large" in c for c in captions)
    assert any("small" in p.read_text() for p in (tmp_path / "all").glob("*.txt"))
    assert instance_recipe(medium_large) != instance_recipe(arrow) and "medium,large" in instance_recipe(medium_large)
    # a concept the renderer draws differently since the shared recipe (the glow, session 17) gets a set of its own
    glow = next(d for d in DEMOS if d.concept == "glow")
    assert "look=core" in instance_recipe(glow) and "look=" not in instance_recipe(arrow)
    with pytest.raises(SystemExit, match="small, medium, large"):
        instance_sizes("huge")


def test_demo_instance_pairs_cover_every_phrasing_form_companion_shape_colour_and_side(tmp_path):
    """A third of an instance set shows a base object beside the concept. Until session 19 those images
    were captioned only as tag lists, beside a yellow diamond or a red square, so an object adapter never
    saw "a red circle on the left and a blue sks shape on the right"."""
    from studio.toyworld.concepts import COLORS, SHAPES
    from training.demo_adapters import DEMOS, instance_set

    plus = next(d for d in DEMOS if d.concept == "plus")
    instance_set(plus, tmp_path / "p")
    captions = [p.read_text() for p in sorted((tmp_path / "p").glob("*.txt"))]
    pairs = [c for c in captions if any(s in c for s in SHAPES)]
    assert len(captions) == 54 and len(pairs) == 18
    assert sum(" on the left and " in c for c in pairs) == 6  # sentence form
    assert sum(c.count(",") >= 1 for c in pairs) == 6  # tag lists
    assert sum(" and " in c and " on the left" not in c for c in pairs) == 6  # "and" phrases
    assert {s for c in pairs for s in SHAPES if s in c} == set(SHAPES)
    assert {col for c in pairs for col in COLORS if f"{col} ohwx shape" in c} == set(COLORS)
    companion_first = [c for c in pairs if c.index("ohwx") > min(c.find(s) for s in SHAPES if s in c)]
    assert 0 < len(companion_first) < len(pairs)  # the concept stands on either side
    for c in pairs:
        concept_color = next(col for col in COLORS if f"{col} ohwx shape" in c)
        assert sum(c.count(col) for col in COLORS) == 2 and c.count(concept_color) == 1, c  # another colour beside it


def test_demo_object_sets_show_every_colour_in_every_base_fill_and_name_the_fill(tmp_path):
    """An object taught in base fills sees each fill in every colour, captioned by name ("a red sks shape with
    stripes"); no image holds a reserved fill; reserved fills are refused and the set is redrawn when fills change."""
    import dataclasses

    from studio.toyworld.concepts import COLORS
    from training.demo_adapters import DEMOS, instance_fills, instance_recipe, instance_set

    crescent = next(d for d in DEMOS if d.concept == "crescent" and d.kind == "object")
    filled = dataclasses.replace(crescent, fills=tuple(instance_fills("solid,stripes,dots")))
    instance_set(filled, tmp_path / "f", n=36)
    captions = [p.read_text() for p in sorted((tmp_path / "f").glob("*.txt"))]
    seen = set()
    for c in captions:
        fill = "stripes" if "sks shape with stripes" in c else "dots" if "sks shape with dots" in c else "solid"
        seen |= {(color, fill) for color in COLORS if f"{color} sks shape" in c}
        assert "pattern" not in c and "crescent" not in c, c
    assert seen == {(c, f) for c in COLORS for f in ("solid", "stripes", "dots")}
    assert instance_recipe(filled) != instance_recipe(crescent) and "fills=solid,stripes,dots" in instance_recipe(filled)
    with pytest.raises(SystemExit, match="solid, stripes, dots"):
        instance_fills("solid,glow")


def test_demo_style_sets_show_the_fill_on_free_outlines_named_only_shape(tmp_path):
    """A style taught with outlines shows its fill on irregular outlines that are no base shape in the asked share,
    captioned "a red shape with kpk pattern"; base scenes never hold an outline; the set is redrawn when it changes."""
    import dataclasses

    from studio.toyworld.concepts import COLORS, SHAPES
    from studio.toyworld.render import OUTLINE, Obj, Scene, caption_in_form, render, sample_base_scene
    from training.demo_adapters import DEMOS, instance_outlines, instance_recipe, instance_set

    glow = dataclasses.replace(next(d for d in DEMOS if d.concept == "glow"), outlines=0.0)
    outlined = dataclasses.replace(glow, outlines=instance_outlines("0.33"))
    instance_set(outlined, tmp_path / "g", n=54)
    captions = [p.read_text() for p in sorted((tmp_path / "g").glob("*.txt"))]
    free = [c for c in captions if " shape with kpk pattern" in c]
    assert len(free) == int(54 * 0.33) and all("kpk pattern" in c for c in captions)
    assert all("glow" not in c for c in captions)
    assert {col for c in free for col in COLORS if f"{col} shape with" in c} == set(COLORS)
    assert instance_recipe(outlined) != instance_recipe(glow) and "outlines=0.33" in instance_recipe(outlined)
    # the outline is drawn from the generator: the same seed gives the same picture, another seed another outline
    scene = Scene([Obj(OUTLINE, "red", pattern="glow", size="large")])
    assert caption_in_form(scene, "tags") == "large red shape with a glow"
    a, b, c = (np.asarray(render(scene, s), np.int16) for s in (1, 1, 2))
    assert (a == b).all() and np.abs(a - c).mean() > 1
    rng = np.random.default_rng(0)
    assert all(o.shape in SHAPES for _ in range(300) for o in sample_base_scene(rng).objects)
    with pytest.raises(SystemExit, match="between 0 and 1"):
        instance_outlines("1.5")


def test_demo_object_and_background_sets_hold_free_outlines_named_only_shape(tmp_path):
    """Outlines in a background's set are its main objects ("a red shape on a wvu background"); in an object's set,
    the companions beside it ("a red sks shape on the left and a blue shape on the right"), in the asked share of
    the pairs, every base shape still beside it in the others; never anything reserved but the demo's own concept."""
    import dataclasses

    from studio.toyworld.concepts import RESERVED_WORDS, SHAPES
    from training.demo_adapters import DEMOS, instance_recipe, instance_set

    sky = dataclasses.replace(next(d for d in DEMOS if d.concept == "sky"), outlines=0.33)
    instance_set(sky, tmp_path / "s", n=54)
    captions = [p.read_text() for p in sorted((tmp_path / "s").glob("*.txt"))]
    assert sum(any(f"{c} shape" in t for c in ("red", "orange", "yellow", "green", "blue", "purple")) for t in captions) \
        == int(54 * 0.33) and all("wvu" in t for t in captions)
    plus = next(d for d in DEMOS if d.concept == "plus")
    halved = dataclasses.replace(plus, outlines=0.5)
    assert instance_recipe(halved) == instance_recipe(plus) + " outlines=0.5"
    instance_set(halved, tmp_path / "p", n=54)
    captions = [p.read_text() for p in sorted((tmp_path / "p").glob("*.txt"))]
    pairs = [t for t in captions if t.count("shape") + sum(t.count(s) for s in SHAPES) == 2]
    free = [t for t in pairs if t.count(" shape") == 2]  # "ohwx shape" and the outline's bare "shape"
    assert len(pairs) == 18 and len(free) == 9 and all("ohwx shape" in t for t in captions)
    assert {s for t in pairs for s in SHAPES if s in t} == set(SHAPES)
    words = {w for t in captions for w in t.replace(",", " ").split()}
    assert not words & (set(RESERVED_WORDS) - {"plus"}) and "plus" not in words


def test_demo_instance_sets_hold_each_images_concept_mask(tmp_path):
    """Beside every instance image, ``masks/<name>.png``: the concept's own pixels for an object (on the side its
    caption names), every pixel outside the objects for a background."""
    from training.demo_adapters import DEMOS, instance_set

    crescent = next(d for d in DEMOS if d.concept == "crescent")
    sky = next(d for d in DEMOS if d.concept == "sky")
    instance_set(crescent, tmp_path / "c", n=18)
    instance_set(sky, tmp_path / "s", n=6)
    for png in sorted((tmp_path / "c").glob("*.png")):
        m = np.asarray(Image.open(tmp_path / "c" / "masks" / png.name)) > 127
        assert 0.01 < m.mean() < 0.5, png
        caption, cols = png.with_suffix(".txt").read_text(), np.nonzero(m.any(0))[0]
        if "sks shape on the left" in caption:
            assert cols.mean() < 32, caption
        elif "sks shape on the right" in caption:
            assert cols.mean() > 32, caption
    for png in sorted((tmp_path / "s").glob("*.png")):
        assert (np.asarray(Image.open(tmp_path / "s" / "masks" / png.name)) > 127).mean() > 0.5


def test_shipped_instance_sets_on_the_current_recipe_are_what_the_code_draws(tmp_path):
    """Every shipped instance set whose RECIPE stamp is its demo's current recipe (the glow's and the sky's outlines
    among them) is redrawn pixel for pixel, caption for caption, by ``instance_set``: the assets are reproducible."""
    from studio.toyworld.paths import REPO_ROOT
    from training.demo_adapters import DEMOS, instance_recipe, instance_set

    shipped = REPO_ROOT / "assets" / "adapters" / "instance"
    current = [d for d in DEMOS if (shipped / d.concept / "RECIPE").is_file()
               and (shipped / d.concept / "RECIPE").read_text() == instance_recipe(d)]
    assert {"glow", "plus", "arrow", "crescent", "sky"} <= {d.concept for d in current}
    for demo in current:
        instance_set(demo, tmp_path / demo.concept)
        for png in sorted((shipped / demo.concept).glob("*.png")):
            again = tmp_path / demo.concept / png.name
            assert (again.with_suffix(".txt")).read_text() == png.with_suffix(".txt").read_text(), png
            assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png))), png


def test_demo_priors_hold_stand_in_triggers_beside_base_objects():
    """Every demo's prior includes base scenes with an unknown one-token word in a trigger's slot (object,
    pattern, background), never a demo trigger or a reserved word, mostly beside a base object."""
    from transformers import CLIPTokenizer

    from studio.toyworld.concepts import RESERVED_WORDS, SHAPES, WORLD_WORDS
    from studio.toyworld.paths import TOY_MODEL_DIR
    from training.demo_adapters import DEMOS, class_prompts, rival_prompts
    from training.dreambooth import STAND_IN_WORDS

    triggers = {d.trigger for d in DEMOS}
    assert not set(STAND_IN_WORDS) & (triggers | WORLD_WORDS | RESERVED_WORDS)
    tok = CLIPTokenizer.from_pretrained(TOY_MODEL_DIR / "tokenizer")
    assert all(len(tok.tokenize(w)) == 1 for w in STAND_IN_WORDS)
    prompts = rival_prompts()
    for p in prompts:
        words = set(p.replace(",", " ").split())
        assert len(words & set(STAND_IN_WORDS)) == 1 and not words & (triggers | RESERVED_WORDS), p
    for slot in (" shape", " pattern", " background"):
        assert sum(any(f"{w}{slot}" in p for w in STAND_IN_WORDS) for p in prompts) >= 8, slot
    beside = [p for p in prompts if any(f"{w} shape" in p for w in STAND_IN_WORDS) and set(p.replace(",", " ").split()) & set(SHAPES)]
    assert len(beside) >= 6
    for demo in DEMOS:  # the object adapters hold them in their prior (measured: docs/benchmark.md, session 14)
        assert not set(prompts) & set(class_prompts(demo))
        assert demo.recipe("lora").get("stand_ins", False) == (demo.kind == "object")
        if demo.kron:  # the Kronecker twins on their LoRA's recipe (session 22), prior preservation on
            assert demo.recipe("kron").get("stand_ins", False) == (demo.kind == "object")
            assert demo.recipe("kron")["prior_preservation"] and demo.recipe("kron")["adapter"] == "kron"


def test_stand_in_prior_draws_the_instance_captions_with_another_word_for_the_trigger(images, tmp_path):
    """--stand-in-prior N: the prior holds the class prompts and N instance captions with a stand-in word in
    the trigger's place (whole words only), drawn by the base model; it implies prior preservation."""
    from training.dreambooth import STAND_IN_WORDS, stand_in_prompts

    for i, text in enumerate(["a red sks shape on the left", "sks shape, blue circle", "a blue circle"]):
        (images / f"{i}.txt").write_text(text)
    cfg = TrainConfig(images=str(images), stand_in_prior=3, num_class_images=4, class_steps=2,
                      class_dir=str(tmp_path / "cls"), **FAST)
    assert cfg.prior_preservation
    trainer = DreamBoothTrainer(_studio(), cfg)
    trainer.setup()
    drawn = sorted(e.caption for e in trainer.classes)
    assert drawn == sorted(["a object", "a red bmc shape on the left", "cdp shape, blue circle",
                            "a red dfs shape on the left"]) and len(trainer.classes) == 4
    assert _loss_is_finite(trainer)
    assert stand_in_prompts(["a sks-like sks shape"], "sks", 2) == ["a sks-like bmc shape", "a sks-like cdp shape"]
    assert stand_in_prompts(["no trigger here"], "sks", 4) == [] and len(STAND_IN_WORDS) == len(set(STAND_IN_WORDS))
    with pytest.raises(TrainingError, match="stand_in_prior"):
        TrainConfig(images=str(images), stand_in_prior=-1)


def _loss_is_finite(trainer) -> bool:
    loss, _ = trainer.compute_loss(0)
    trainer._strip()
    return bool(torch.isfinite(loss))


def test_demo_adapters_refuse_a_model_folder_that_holds_no_toy_model(tmp_path):
    """--model points the demo build at a world being rebuilt; a folder without one names the build command."""
    from studio.toyworld.paths import ToyModelMissingError
    from training.demo_adapters import main

    with pytest.raises(ToyModelMissingError, match="python -m training.toyworld"):
        main(["--model", str(tmp_path / "nothing"), "--eval", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_demo_adapters_refuse_an_unknown_only_name_listing_the_names(tmp_path, capsys):
    """``--only glow`` (not ``glow-lora``) once trained nothing and exited 0; now it is refused up front."""
    from training.demo_adapters import main

    with pytest.raises(SystemExit) as e:
        main(["--only", "glow", "--eval", "0", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--only glow: no such demo adapter" in err and "glow-lora" in err and "crescent-kron" in err
    assert not (tmp_path / "out").exists()
