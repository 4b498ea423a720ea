"""Train the toy world from scratch: VAE, tokenizer + text encoder + UNet, toy CLIP, a refinement of
the VAE decoder with its encoder frozen (the UNet's latents stay valid), then the oracle.

    python -m training.toyworld --out assets/models            # ~55 min wall on 2 shared CPU cores
    python -m training.toyworld --out /tmp/tw --quick           # smoke run, ~1 min

Writes ``<out>/toy-sd`` (a diffusers StableDiffusionPipeline folder, fp16 safetensors),
``<out>/toy-clip`` (an open_clip model config + weights), ``<out>/oracle`` and
``<out>/toyworld-train.json`` (configuration, timings and measured quality). Fixed seeds make a
run reproducible on the same hardware and library versions. Use ``--stages`` to rerun parts
(each stage reads what earlier ones wrote).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from studio.toyworld.concepts import (
    ALL_SHAPES, FORMS, NOVEL_BACKGROUNDS, NOVEL_CONCEPTS, NOVEL_PATTERNS, NOVEL_SHAPES,
)
from studio.toyworld.render import (
    SIZE as RENDER_SIZE, caption, caption_in_form, is_heldout, render, sample_any_scene, sample_base_scene,
    sample_concept_scene, training_caption,
)

# Run order. The oracle comes last: half its training images are VAE round trips, so it must see
# the decoder the model ships with (trained on the first decoder, it learnt that decoder's hue
# shifts and called the refined decoder's oranges red). Seeds stay tied to the stage, not its place.
STAGES = ("vae", "unet", "clip", "decoder", "oracle")
STAGE_SEED = {"vae": 0, "oracle": 1, "unet": 2, "clip": 3, "decoder": 4}
CLIP_MODEL_NAME = "ToyCLIP-ViT-8"
WORK = ".toyworld-work"  # stage outputs not yet assembled into toy-sd
TOKEN_LENGTH = 32

# ----------------------------------------------------------------------------- configuration
# 8 latent channels (world v3): at 8x8x4 the latent itself lost small shapes and fills (a small
# plus came back as a star whatever the decoder; README "VAE round trip"). v3 was grown from v2's
# 4-channel VAE and UNet by ``expand_vae_latents`` / ``expand_unet_channels`` (function-preserving).
LATENT_CHANNELS = 8
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=8,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=128,
)
# Factor-8 VAE: 64x64 images, 8x8 latents. A 16x16-latent world (factor-4 VAE, 3-level UNet) was
# tried for v2 and still drew blobs after 5,870 UNet steps (wip notes, session 5); at 8x8 the
# decoder draws the shapes and the UNet forms them within 1,000-2,000 steps.
UNET_CONFIG = dict(
    sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
# World v4 (session 15, an experiment; ``--world v4``): a factor-4 VAE, 16x16x4 latents, trained from
# scratch, and the earlier world's UNet grown by an outer 16x16 level (``grow_unet_level``) with its text
# encoder frozen. At 8x8 a glow on a crescent or two objects on a sky did not survive the latent
# (``python -m studio.toyworld.ceiling``); the 16x16 latent keeps most of them.
VAE_CONFIG_V4 = dict(VAE_CONFIG, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 32, 64))
WORLDS = ("v3", "v4")
# Warm-started VAE: weight of the pull towards the earlier encoder's posterior means.
VAE_ANCHOR = 0.2
SCHED_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": TOKEN_LENGTH, "vocab_size": 49408, "width": 64, "heads": 4,
                 "layers": 3},
}
FULL = dict(vae_steps=6000, vae_batch=16, vae_images=16000, oracle_steps=3500, oracle_batch=64,
            oracle_images=12000, oracle_width=16, oracle_b_width=24, oracle_drawn=1200, oracle_redrawn=0, oracle_adapter_redrawn=0,
            unet_steps=5000, unet_batch=32, unet_images=24000,
            clip_steps=800, clip_batch=128, clip_images=12000, eval_images=600,
            decoder_steps=3000, decoder_batch=32, decoder_images=9000,
            vae_minutes=10.5, oracle_minutes=5, unet_minutes=20, clip_minutes=6, decoder_minutes=10)
QUICK = dict(vae_steps=20, vae_batch=16, vae_images=400, oracle_steps=20, oracle_batch=32,
             oracle_images=400, oracle_width=16, oracle_b_width=24, oracle_drawn=12, oracle_redrawn=12, oracle_adapter_redrawn=0,
             unet_steps=20, unet_batch=16, unet_images=400, clip_steps=10,
             clip_batch=32, clip_images=300, eval_images=60,
             decoder_steps=10, decoder_batch=8, decoder_images=200, decoder_minutes=0,
             vae_minutes=0, oracle_minutes=0, unet_minutes=0, clip_minutes=0)


def log(msg: str) -> None:
    tqdm.write(f"[toyworld {time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def seed_all(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # uint8 [B,3,64,64]


def u8_to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def cosine_lr(step, total, warmup, floor=0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class Budget:
    """Fix a stage's step count at the end of its LR warm-up from the measured step time, so a
    stage fits ``minutes`` of wall clock on a slow or shared machine. The cosine schedule only
    reads the total after warm-up, so the run equals a fixed-step run with the logged total
    (reproduce it with ``--set <stage>_steps=N --no-budget``)."""

    def __init__(self, name: str, steps: int, warmup: int, minutes: float):
        self.name, self.total, self.warmup, self.minutes = name, steps, warmup, minutes
        self.t0 = time.time()

    def at(self, step: int) -> None:
        if step == self.warmup and self.minutes > 0:
            per = (time.time() - self.t0) / max(1, step)
            fit = self.minutes * 60 / per
            fit = int(fit)
            if fit < self.total:
                log(f"{self.name}: {per:.3f} s/step; budget {self.minutes:g} min -> {max(fit, self.warmup + 1)} steps instead of {self.total}")
                self.total = max(fit, self.warmup + 1)

    def lr(self, step: int, floor: float) -> float:
        return cosine_lr(step, self.total, self.warmup, floor)

    def loop(self):
        """(step, progress bar) for each step of the stage, up to the total ``at`` settles on."""
        bar = tqdm(range(self.total), desc=self.name, mininterval=10)
        for step in bar:
            self.at(step)
            if step >= self.total:
                break
            if bar.total != self.total:  # the budget settled on fewer steps than configured
                bar.total = self.total
                bar.refresh()
            yield step, bar


# ----------------------------------------------------------------------------- growing the latent
def _copy_matching(old, new) -> dict:
    """``new``'s state dict with every tensor of ``old`` that has the same shape copied in."""
    sd_old, sd_new = old.state_dict(), new.state_dict()
    for k, v in sd_old.items():
        if sd_new[k].shape == v.shape:
            sd_new[k].copy_(v)
    return sd_new


@torch.no_grad()
def expand_vae_latents(old, channels: int):
    """A VAE like ``old`` with ``channels`` latent channels that encodes and decodes exactly as
    ``old`` does: the old channels keep their weights, the new ones start as small encoder outputs
    the decoder ignores (zero weights into ``decoder.conv_in``), so training adds detail to them
    while an earlier UNet stays a good start on the old ones."""
    from diffusers import AutoencoderKL

    c0 = old.config.latent_channels
    if channels < c0:
        raise ValueError(f"cannot shrink the latent from {c0} to {channels} channels")
    new = AutoencoderKL(**{**dict(old.config), "latent_channels": channels})
    sd_old, sd = old.state_dict(), _copy_matching(old, new)
    # encoder.conv_out and quant_conv emit [means, log-variances]; the old ones keep these slots
    slots = torch.tensor(list(range(c0)) + list(range(channels, channels + c0)))
    w = sd["encoder.conv_out.weight"]
    w.copy_(0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    w[slots] = sd_old["encoder.conv_out.weight"]
    sd["encoder.conv_out.bias"].zero_()
    sd["encoder.conv_out.bias"][slots] = sd_old["encoder.conv_out.bias"]
    qw = torch.eye(2 * channels)  # the new channels pass through
    qw[slots[:, None], slots] = sd_old["quant_conv.weight"][:, :, 0, 0]
    qb = torch.zeros(2 * channels)
    qb[channels + c0:] = -7.0  # posterior std 0.03: the new channels start near-deterministic, like the old
    qb[slots] = sd_old["quant_conv.bias"]
    sd["quant_conv.weight"].copy_(qw[:, :, None, None])
    sd["quant_conv.bias"].copy_(qb)
    pw = torch.eye(channels)
    pw[:c0, :c0] = sd_old["post_quant_conv.weight"][:, :, 0, 0]
    sd["post_quant_conv.weight"].copy_(pw[:, :, None, None])
    sd["post_quant_conv.bias"].zero_()
    sd["post_quant_conv.bias"][:c0] = sd_old["post_quant_conv.bias"]
    sd["decoder.conv_in.weight"].zero_()
    sd["decoder.conv_in.weight"][:, :c0] = sd_old["decoder.conv_in.weight"]
    new.load_state_dict(sd)
    return new


@torch.no_grad()
def normalize_new_latents(vae, c0: int, x: torch.Tensor, target_std: float | None = None) -> None:
    """Rescale latent channels ``c0:`` so their posterior means have ``target_std`` on ``x``
    (default: the spread of the old channels ``:c0``), folded into quant_conv and post_quant_conv:
    the decoded images do not change, and one scaling_factor fits every channel."""
    m = vae.encode(x).latent_dist.mean
    c = vae.config.latent_channels
    target = float(m[:, :c0].std()) if target_std is None else target_std
    for j in range(c0, c):
        s = target / max(float(m[:, j].std()), 1e-6)
        vae.quant_conv.weight[j] *= s
        vae.quant_conv.bias[j] *= s
        vae.quant_conv.bias[c + j] += 2 * math.log(s)  # log-variance: the std scales by s too
        vae.post_quant_conv.weight[:, j] /= s


@torch.no_grad()
def expand_unet_channels(old, channels: int):
    """A UNet like ``old`` taking and predicting ``channels`` latent channels; the old channels
    keep their path, the new inputs start with zero weights and the new outputs at zero."""
    from diffusers import UNet2DConditionModel

    c0 = old.config.in_channels
    new = UNet2DConditionModel(**{**dict(old.config), "in_channels": channels, "out_channels": channels})
    sd_old, sd = old.state_dict(), _copy_matching(old, new)
    for k, rows in (("conv_in.weight", (slice(None), slice(0, c0))), ("conv_out.weight", slice(0, c0)),
                    ("conv_out.bias", slice(0, c0))):
        sd[k].zero_()
        sd[k][rows] = sd_old[k]
    new.load_state_dict(sd)
    return new


@torch.no_grad()
def grow_unet_level(old, latent_channels: int):
    """A UNet with one more, outer resolution level than ``old`` (a ``DownBlock2D`` / ``UpBlock2D``
    pair at twice the latent size, as wide as ``old``'s first level) around ``old``'s blocks, which
    keep their weights: a factor-4 VAE's 16x16 latents go through the new level, and at 8x8 the
    blocks that already bind text to shapes and colours go on as before. ``conv_in``, ``conv_out``
    and the new level start fresh; the upsampler ``old``'s last up block gains starts as nearest
    neighbour (an identity convolution)."""
    from diffusers import UNet2DConditionModel

    c = dict(old.config)
    c0 = c["block_out_channels"][0]
    new = UNet2DConditionModel(**{
        **c, "in_channels": latent_channels, "out_channels": latent_channels, "sample_size": 2 * c["sample_size"],
        "block_out_channels": (c0, *c["block_out_channels"]),
        "down_block_types": ("DownBlock2D", *c["down_block_types"]),
        "up_block_types": (*c["up_block_types"], "UpBlock2D")})
    sd = new.state_dict()
    for k, v in old.state_dict().items():
        if k.startswith(("conv_in.", "conv_out.")):
            continue
        if k.startswith("down_blocks."):
            i, rest = k[len("down_blocks."):].split(".", 1)
            k = f"down_blocks.{int(i) + 1}.{rest}"
        sd[k].copy_(v)  # up_blocks keep their indices: the new level is the last up block
    up = f"up_blocks.{len(c['up_block_types']) - 1}.upsamplers.0.conv"
    sd[up + ".weight"].zero_()
    sd[up + ".weight"][:, :, 1, 1] = torch.eye(c0)
    sd[up + ".bias"].zero_()
    new.load_state_dict(sd)
    return new


# ----------------------------------------------------------------------------- generic images
def _rand_color(rng):
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _texture(d: ImageDraw.ImageDraw, rng, n, color):
    kind = int(rng.integers(4))
    p = int(rng.integers(6, 20))
    off = int(rng.integers(0, p))
    w = int(rng.integers(2, max(3, p // 2 + 1)))
    if kind == 0:  # stripes at a random angle
        ang = rng.uniform(0, math.pi)
        dx, dy = math.cos(ang), math.sin(ang)
        for k in range(-2 * n // p, 2 * n // p):
            cx, cy = n / 2 + (k * p + off) * -dy, n / 2 + (k * p + off) * dx
            d.line([(cx - dx * 2 * n, cy - dy * 2 * n), (cx + dx * 2 * n, cy + dy * 2 * n)], fill=color, width=w)
    elif kind == 1:  # dots
        r = rng.uniform(1.5, p / 2.5)
        for i in range(-1, n // p + 2):
            for j in range(-1, n // p + 2):
                x, y = i * p + off, j * p + off
                d.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif kind == 2:  # zig-zag / wave lines
        a, wl = rng.uniform(2, p / 1.5), rng.uniform(6, 20)
        for j in range(-1, n // p + 2):
            y0 = j * p + off
            pts = [(x, y0 + (a if (x // (wl / 2)) % 2 else -a)) for x in np.arange(-wl, n + wl, wl / 2)]
            d.line(pts, fill=color, width=w)
    else:  # checker / grid
        if rng.random() < 0.5:
            for i in range(-1, n // p + 2):
                for j in range(-1, n // p + 2):
                    if (i + j) % 2 == 0:
                        d.rectangle([i * p + off, j * p + off, i * p + off + p - 1, j * p + off + p - 1], fill=color)
        else:
            for k in range(-1, n // p + 2):
                d.rectangle([k * p + off, 0, k * p + off + w - 1, n], fill=color)
                d.rectangle([0, k * p + off, n, k * p + off + w - 1], fill=color)


def generic_image(rng: np.random.Generator) -> Image.Image:
    """A broad generic image (polygons, ellipses, chords, strokes, textures, gradients, grids) so
    the VAE learns to represent shapes and patterns it never sees in the toy world itself."""
    n = 128
    u = rng.random()
    if u < 0.4:
        g = int(rng.integers(200, 256))
        bgc = tuple(int(v) for v in np.clip(g + rng.integers(-12, 13, 3), 0, 255))
        img = Image.new("RGB", (n, n), bgc)
    elif u < 0.6:
        bgc = _rand_color(rng)
        img = Image.new("RGB", (n, n), bgc)
    elif u < 0.85:
        a, b = np.array(_rand_color(rng)), np.array(_rand_color(rng))
        t = np.linspace(0, 1, n)[:, None, None]
        arr = np.broadcast_to(a * (1 - t) + b * t, (n, n, 3))
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2)
        img = Image.fromarray(arr.astype(np.uint8).copy())
        bgc = tuple(int(v) for v in arr[n // 2, n // 2])
    else:
        bgc = _rand_color(rng)
        img = Image.new("RGB", (n, n), bgc)
        _texture(ImageDraw.Draw(img), rng, n, _rand_color(rng))
    for _ in range(int(rng.integers(0, 5))):
        col = _rand_color(rng)
        cx, cy = rng.uniform(0, n, 2)
        r = rng.uniform(8, 50)
        m = Image.new("L", (n, n), 0)
        md = ImageDraw.Draw(m)
        kind = int(rng.integers(6))
        if kind == 0:  # random polygon
            k = int(rng.integers(3, 10))
            angs = np.sort(rng.uniform(0, 2 * math.pi, k))
            rad = rng.uniform(0.3, 1.0, k) * r
            md.polygon([(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angs, rad)], fill=255)
        elif kind == 1:  # ellipse, maybe with a bite taken out (crescents, rings)
            rx, ry = r, r * rng.uniform(0.4, 1.0)
            md.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
            if rng.random() < 0.5:
                ox, oy = rng.uniform(-r, r, 2)
                rr = r * rng.uniform(0.4, 1.0)
                md.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=0)
        elif kind == 2:  # thick strokes: crosses, bars, poly-lines
            for _ in range(int(rng.integers(1, 4))):
                a = rng.uniform(0, math.pi)
                w = int(rng.integers(3, 18))
                dx, dy = math.cos(a) * r, math.sin(a) * r
                md.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=w)
        elif kind == 3:  # star with random point count
            k = int(rng.integers(3, 9))
            inner = rng.uniform(0.3, 0.7)
            rot = rng.uniform(0, math.pi)
            pts = [(cx + (r if i % 2 == 0 else r * inner) * math.cos(rot + i * math.pi / k),
                    cy + (r if i % 2 == 0 else r * inner) * math.sin(rot + i * math.pi / k)) for i in range(2 * k)]
            md.polygon(pts, fill=255)
        elif kind == 4:  # chord / pie slice
            a0 = float(rng.uniform(0, 360))
            a1 = a0 + float(rng.uniform(60, 300))
            box = [cx - r, cy - r, cx + r, cy + r]
            (md.chord if rng.random() < 0.5 else md.pieslice)(box, a0, a1, fill=255)
        else:  # rectangle with a pointed end (arrows, signs)
            w, h = r, r * rng.uniform(0.2, 0.6)
            a = rng.uniform(0, 2 * math.pi)
            pts = [(-w, -h), (0.2 * w, -h), (0.2 * w, -2 * h), (w, 0), (0.2 * w, 2 * h), (0.2 * w, h), (-w, h)]
            c, s = math.cos(a), math.sin(a)
            md.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
        img.paste(col, (0, 0), m)
        u = rng.random()
        if u < 0.45:  # textured or smooth (radial, linear, split) fill
            t = Image.new("L", (n, n), 0)
            if u < 0.25:
                _texture(ImageDraw.Draw(t), rng, n, 255)
            else:
                yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
                a = rng.uniform(0, 2 * math.pi)
                proj = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / r
                f = [np.clip(1 - np.hypot(xx - cx, yy - cy) / r, 0, 1), np.clip(0.5 + proj / 2, 0, 1),
                     (proj < 0).astype(np.float32)][int(rng.integers(3))]
                t = Image.fromarray((f * 255).astype(np.uint8))
            tm = Image.fromarray((np.asarray(t, np.uint16) * np.asarray(m, np.uint16) // 255).astype(np.uint8))
            img.paste(_rand_color(rng) if rng.random() < 0.5 else (245, 245, 245), (0, 0), tm)
    return img.resize((64, 64), Image.BOX)


# ----------------------------------------------------------------------------- VAE
def train_vae(cfg, out: Path, rng, device, report):
    from diffusers import AutoencoderKL

    t0 = time.time()
    n = cfg["vae_images"]
    imgs = []
    for i in tqdm(range(n), desc="vae data", mininterval=5):
        imgs.append(generic_image(rng) if i % 3 == 0 else render(sample_base_scene(rng), rng))
    data = to_tensor(imgs)
    log(f"vae data: {n} images in {time.time() - t0:.1f}s")
    v4 = cfg.get("world") == "v4"
    config = VAE_CONFIG_V4 if v4 else VAE_CONFIG
    init = None if v4 else cfg.get("init")  # a factor-4 VAE has no earlier one to start from
    anchor = None
    c0 = config["latent_channels"]
    if init:  # warm start: keep the earlier latent space so an earlier UNet stays a good start
        anchor = AutoencoderKL.from_pretrained(Path(init) / "toy-sd" / "vae", torch_dtype=torch.float32).to(device)
        anchor.requires_grad_(False).eval()
        c0 = anchor.config.latent_channels
        vae = expand_vae_latents(anchor, config["latent_channels"]).to(device)
    else:
        vae = AutoencoderKL(**config).to(device)
    nparams = sum(p.numel() for p in vae.parameters())
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4 if init else 2e-3, weight_decay=1e-4)
    steps, bs = cfg["vae_steps"], cfg["vae_batch"]
    bud = Budget("vae", steps, 60, cfg["vae_minutes"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bud.lr(s, 0.05))
    g = torch.Generator().manual_seed(1)
    vae.train()
    for step, bar in bud.loop():
        idx = torch.randint(0, n, (bs,), generator=g)
        x = u8_to_unit(data[idx]).to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        # posterior noise ramps in over the first half: decoding the mean first converges much
        # faster, and by the end the decoder is trained on genuine posterior samples
        ramp = 0.0 if step < bud.warmup else min(1.0, (step - bud.warmup) / max(1, 0.5 * bud.total))
        if init:
            ramp = 1.0
        z = post.mean + ramp * post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        if anchor is not None:
            with torch.no_grad():
                old = anchor.encode(x).latent_dist.mean
            loss = loss + VAE_ANCHOR * F.mse_loss(post.mean[:, :c0], old)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    # measured scaling factor and PSNR on fresh base-world images
    with torch.no_grad():
        ev = to_tensor([render(sample_base_scene(rng), rng) for _ in range(512)])
        x = u8_to_unit(ev).to(device) * 2 - 1
        if c0 < vae.config.latent_channels:  # grown channels: scale them like the old ones
            normalize_new_latents(vae, c0, x)
        post = vae.encode(x).latent_dist
        z = post.sample()
        scaling = float(1.0 / z.std())
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
        psnr = 10 * math.log10(1.0 / mse)
    vae.register_to_config(scaling_factor=scaling)
    # kept in a work folder until the UNet stage assembles toy-sd atomically: a half-built
    # toy-sd folder would break everyone who loads the bundled model meanwhile
    vae.to(torch.float16).save_pretrained(out / WORK / "vae", safe_serialization=True)
    dt = time.time() - t0
    steps = bud.total
    log(f"vae: {nparams / 1e6:.2f}M params, {steps} steps, PSNR {psnr:.1f} dB, scaling_factor {scaling:.4f}, {dt / 60:.1f} min")
    report["vae"] = dict(params=nparams, steps=steps, batch=bs, psnr_db=round(psnr, 2), init_from=init,
                         scaling_factor=round(scaling, 5), minutes=round(dt / 60, 2), config=config,
                         world=cfg.get("world", "v3"))


def vae_dir(out: Path) -> Path | None:
    for p in (out / WORK / "vae", out / "toy-sd" / "vae"):
        if (p / "config.json").is_file():
            return p
    return None


def load_vae(out: Path, device):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir(out), torch_dtype=torch.float32).to(device).eval()


@torch.no_grad()
def vae_roundtrip(vae, data_u8: torch.Tensor, device, bs=256) -> torch.Tensor:
    out = []
    for i in range(0, len(data_u8), bs):
        x = u8_to_unit(data_u8[i:i + bs]).to(device) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- oracle
# How often each kind of image (studio/toyworld/corrupt.py) appears in the oracle's training set.
ORACLE_MIX = {"clean": 0.46, "noised": 0.06, "blend": 0.08, "tint": 0.08, "erased": 0.08, "chipped": 0.08,
              "blob": 0.06, "star4": 0.04, "noise": 0.03, "wash": 0.03}


def _drawn_negatives(pipe, n: int, seed: int):
    """n images the base model draws for prompts naming reserved concepts or broken prompts (guidance
    1, 3 or 7.5, 15 steps), with the one thing known of them: no reserved concept is there."""
    from studio.toyworld.check import generate
    from studio.toyworld.corrupt import Truth, drawn_prompts

    rng = np.random.default_rng(seed)
    prompts = drawn_prompts(rng, n)
    images = []
    for k, g in enumerate((1.0, 3.0, 7.5)):
        part = prompts[k::3]
        images += generate(pipe, part, seed * 7919 + k * 100003, 15, g, batch=32)
    return images, [Truth.drawn() for _ in images]


# Redrawn scenes keep their labels only at low strength: at 0.3 the base model already turns a reserved
# shape it never learnt (crescent, plus, arrow) into a blob, so only base-world scenes are redrawn, and
# dots, which often fade, are not judged on them (session 18, docs/images/redrawn-s18.png). Off by
# default (``--set oracle_redrawn=1500`` turns it on): in session 18 a 10-minute continuation with 1,500
# of them read the base model's complete captions a little better than one without (selection seeds 11
# and 12, README "Oracles"), but judged the composed images of the judge check no better, and those
# are what the oracles are for.
REDRAW_STRENGTH = (0.2, 0.4)


def _img2img(pipe):
    """An img2img pipeline over ``pipe``'s own modules (nothing copied), its progress bar off."""
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def _redraw(i2i, captions: list[str], renders: list, strength: float, seed: int) -> list:
    """Renders redrawn from their captions (guidance 3, 25 steps), image j with its own generator (seed + j)."""
    gens = [torch.Generator().manual_seed(seed + j) for j in range(len(renders))]
    return i2i(captions, image=renders, strength=strength, guidance_scale=3.0, num_inference_steps=25,
               generator=gens).images


def _redrawn_scenes(pipe, n: int, seed: int, strength: tuple = REDRAW_STRENGTH):
    """n base-world renders redrawn by the base model (img2img from their own caption, strength drawn
    from ``strength``, guidance 3): the model's own textures and soft edges on content known by
    construction, which clean renders and round trips do not show the oracle. The fill of a dotted
    object is left unjudged (the model often smooths the dots away). Returns the redrawn images,
    their truths and the renders they were redrawn from."""
    from studio.toyworld.corrupt import Truth

    i2i = _img2img(pipe)
    rng = np.random.default_rng(seed)
    scenes = [sample_base_scene(rng, p_two=0.5) for _ in range(n)]
    images, renders = [], []
    for i in tqdm(range(0, n, 32), desc="redrawn scenes", mininterval=5):
        part = scenes[i:i + 32]
        s = float(rng.uniform(*strength))
        renders += [render(sc, rng) for sc in part]
        captions = [caption_in_form(sc, FORMS[int(rng.integers(3))]) for sc in part]
        images += _redraw(i2i, captions, renders[i:], s, seed * 7919 + i)
    return images, [Truth.redrawn(sc) for sc in scenes], renders


def _adapter_redrawn_scenes(pipe, n: int, seed: int, strength: tuple = REDRAW_STRENGTH,
                            adapters_dir: Path | None = None):
    """n renders of one reserved concept each, redrawn like ``_redrawn_scenes`` but with that concept's
    demo LoRA active and its trigger in the caption, so the model's own soft outlines of the reserved
    shapes, fills and backgrounds come with content known by construction (the base model alone melts a
    shape it never learnt). Every small object's fill is left unjudged. Returns the redrawn images,
    their truths and the renders."""
    from studio.adapters.activation import AdapterRig
    from studio.resources import demo_adapters_dir
    from studio.studio import Studio
    from studio.toyworld.corrupt import Truth
    from studio.toyworld.prompts import with_trigger

    folder = adapters_dir or demo_adapters_dir()
    index = json.loads((folder / "index.json").read_text())  # the world concept of each file
    demos = {e["concept"]: e for e in index.values() if e.get("type") == "lora" and e["concept"] in NOVEL_CONCEPTS}
    studio = Studio.from_pipeline(pipe, "toy-sd")
    loaded = {c: studio.adapters.load(str(folder / e["file"]), name=f"redraw-{c}") for c, e in sorted(demos.items())}
    i2i = _img2img(pipe)
    rng = np.random.default_rng(seed)
    concepts = sorted(loaded)
    images, truths, renders = [], [], []
    with AdapterRig(i2i, list(loaded.values())) as rig:
        for i in tqdm(range(0, n, 16), desc="adapter-redrawn scenes", mininterval=5):
            concept = concepts[(i // 16) % len(concepts)]
            scenes = [sample_concept_scene(concept, rng, p_two=0.3) for _ in range(min(16, n - i))]
            part = [render(sc, rng) for sc in scenes]
            captions = [with_trigger(caption_in_form(sc, FORMS[int(rng.integers(3))]), concept,
                                     demos[concept]["trigger"]) for sc in scenes]
            rig.set(unet={loaded[concept].name: 1.0}, text={loaded[concept].name: 1.0})
            images += _redraw(i2i, captions, part, float(rng.uniform(*strength)), seed * 7919 + i)
            truths += [Truth.redrawn(sc, small_fills=False) for sc in scenes]
            renders += part
    return images, truths, renders


def _oracle_data(n: int, vae, rng, device, drawn=None):
    """n images of every kind in ORACLE_MIX with their targets; half go through a VAE round trip
    (the decoder the model ships), since judged images are always decodes. ``drawn``: (images,
    truths) drawn or redrawn by the base model, appended as they are (they are decodes already)."""
    from studio.toyworld.corrupt import sample
    from studio.toyworld.oracle import scene_targets

    kinds = list(ORACLE_MIX)
    picks = rng.choice(len(kinds), n, p=[ORACLE_MIX[k] for k in kinds])
    imgs, tg = [], []
    for k in tqdm(picks, desc="oracle data", mininterval=5):
        im, truth = sample(rng, kinds[int(k)])
        imgs.append(im)
        tg.append(scene_targets(truth))
    data = to_tensor(imgs)
    half = n // 2
    data = torch.cat([vae_roundtrip(vae, data[:half], device), data[half:]])
    if drawn:
        data = torch.cat([data, to_tensor(drawn[0])])
        tg += [scene_targets(t) for t in drawn[1]]
    return data, {k: torch.tensor([t[k] for t in tg]) for k in ("bg", "shape", "color", "pattern")}


def _fit_oracle(net, data, T, bud: "Budget", bs: int, lr: float, seed: int, device):
    from studio.toyworld.oracle import reserved_mask, split_logits, target_loss

    res = {h: reserved_mask(h) for h in ("bg", "shape", "pattern")}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bud.lr(s, 0.02))
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step, bar in bud.loop():
        idx = torch.randint(0, len(data), (bs,), generator=g)
        x = u8_to_unit(data[idx]).to(device)
        x = x + 0.02 * torch.randn(x.shape, generator=g).to(device)  # small robustness noise
        bg, sh, co, pa = split_logits(net(x))
        loss = (target_loss(bg, T["bg"][idx].to(device), res["bg"])
                + target_loss(sh.reshape(-1, sh.shape[-1]), T["shape"][idx].reshape(-1).to(device), res["shape"])
                + target_loss(co.reshape(-1, co.shape[-1]), T["color"][idx].reshape(-1).to(device))
                + target_loss(pa.reshape(-1, pa.shape[-1]), T["pattern"][idx].reshape(-1).to(device), res["pattern"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def train_oracle(cfg, out: Path, rng, device, report):
    """Train both oracles, each on its own data draw: ``oracle`` (OracleNet) and ``oracle-b``
    (OracleNetB, another seed), then measure them on fresh renders and round trips. Besides the
    ORACLE_MIX kinds, each sees ``oracle_drawn`` base-model drawings as reserved-concept negatives and
    ``oracle_redrawn`` base-world renders redrawn by the base model (``_redrawn_scenes``)."""
    from studio.toyworld.oracle import OracleNet, OracleNetB, _CACHE, load_oracle, save_oracle

    vae = load_vae(out, device)
    pipe = None
    if (out / "toy-sd" / "unet" / "config.json").is_file():
        from studio.toyworld.check import load_pipeline

        pipe = load_pipeline(out / "toy-sd")
    for name, arch, width_setting, lr, seed in (("oracle", OracleNet, "oracle_width", 2e-3, 2),
                                                ("oracle-b", OracleNetB, "oracle_b_width", 1.5e-3, 12)):
        if name not in cfg.get("oracles", ("oracle", "oracle-b")):
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        # a continuation: more steps on an oracle this build already trained, on a data draw of its own
        prev = load_oracle(out / name) if cfg.get("oracle_continue") else None
        before = int(prev.config.get("steps", 0)) if prev else 0
        dseed = seed + 100 + before if prev else seed
        drawn = None
        if pipe is not None:
            neg, negt = _drawn_negatives(pipe, cfg["oracle_drawn"], dseed)
            red, redt, _ = _redrawn_scenes(pipe, cfg["oracle_redrawn"], dseed) if cfg["oracle_redrawn"] else ([], [], [])
            ared, aredt, _ = (_adapter_redrawn_scenes(pipe, cfg["oracle_adapter_redrawn"], dseed)
                              if cfg["oracle_adapter_redrawn"] else ([], [], []))
            drawn = (neg + red + ared, negt + redt + aredt)
        data, T = _oracle_data(cfg["oracle_images"], vae, np.random.default_rng(dseed) if prev else rng, device, drawn)
        log(f"{name} data: {len(data)} images in {time.time() - t0:.1f}s")
        width = int(prev.config["width"]) if prev else cfg[width_setting]  # a continuation keeps its width
        net = arch(width=width).to(device)
        if prev:
            net.load_state_dict(prev.net.state_dict())
            lr, seed = lr / 3, dseed
            _CACHE.clear()
        bud = Budget(name, cfg["oracle_steps"], 100, cfg["oracle_minutes"])
        net = _fit_oracle(net, data, T, bud, cfg["oracle_batch"], lr, seed, device)
        save_oracle(net.cpu(), out / name, {"width": width, "steps": before + bud.total, "images": len(data),
                                            "mix": ORACLE_MIX, "continued_from_steps": before or None})
        _CACHE.clear()
        oracle = load_oracle(out / name)  # evaluate exactly what was saved (fp16 weights)
        ev_rng = np.random.default_rng(777)
        acc = oracle_accuracy(oracle, ev_rng, cfg["eval_images"])
        rec_acc = novel_reconstruction_rates(oracle, vae, ev_rng, max(40, cfg["eval_images"] // 5), device)
        dt = time.time() - t0
        log(f"{name}: rendered {acc}")
        log(f"{name}: reserved concepts on VAE round trips {rec_acc}")
        report[name] = dict(arch=type(net).__name__, params=sum(p.numel() for p in net.parameters()),
                            steps=bud.total, rendered_accuracy=acc, novel_reconstruction_rate=rec_acc,
                            minutes=round(dt / 60, 2))


def oracle_accuracy(oracle, rng, n) -> dict:
    scenes = [sample_any_scene(rng) for _ in range(n)]
    preds = oracle.predict([render(s, rng) for s in scenes])
    keys = ("shape", "color", "pattern", "position", "background", "count")
    tot = {k: 0 for k in keys}
    for p, s in zip(preds, scenes):
        m = oracle.matches(p, s)
        for k in keys:
            tot[k] += bool(m[k])
    return {k: round(v / n, 4) for k, v in tot.items()}


def novel_reconstruction_rates(oracle, vae, rng, n, device) -> dict:
    out = {}
    for concept in NOVEL_SHAPES + NOVEL_PATTERNS + NOVEL_BACKGROUNDS:
        scenes = [sample_concept_scene(concept, rng) for _ in range(n)]
        data = to_tensor([render(s, rng) for s in scenes])
        rec = vae_roundtrip(vae, data, device)
        preds = oracle.predict_tensor(u8_to_unit(rec))
        out[concept] = round(sum(oracle.has_concept(p, concept) for p in preds) / n, 4)
    return out


# ----------------------------------------------------------------------------- UNet + text encoder
def build_tokenizer():
    from studio.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(model_max_length=TOKEN_LENGTH)


def _unet_data(cfg, vae, rng, device):
    """Base-world scenes (held-out pairs removed) and their VAE posteriors."""
    n = cfg["unet_images"]
    scenes = []
    while len(scenes) < n:
        s = sample_base_scene(rng)
        if not is_heldout(s):
            scenes.append(s)
    data = to_tensor([render(s, rng) for s in tqdm(scenes, desc="unet data", mininterval=5)])
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 256):
            x = u8_to_unit(data[i:i + 256]).to(device) * 2 - 1
            post = vae.encode(x).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    return scenes, torch.cat(means), torch.cat(stds)


def _fit_unet(unet, text_encoder, scenes, means, stds, sf, bud: "Budget", bs: int, lr: float, seed: int, device,
              train_text_encoder: bool = True):
    """Epsilon-prediction training with min-SNR-5 weighting, 10% caption dropout and EMA; the EMA
    weights are copied into the models at the end. Returns the last loss."""
    from diffusers import DDPMScheduler

    tok = build_tokenizer()
    noise_sched = DDPMScheduler(**SCHED_CONFIG)
    acp = noise_sched.alphas_cumprod.to(device)
    snr = acp / (1 - acp)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    text_encoder.requires_grad_(train_text_encoder)  # frozen: no graph is built through it
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bud.lr(s, 0.1))
    g = torch.Generator().manual_seed(seed)
    cap_rng = np.random.default_rng(seed + 1)
    n = len(scenes)
    unet.train()
    text_encoder.train(train_text_encoder)
    loss = torch.zeros(())
    for step, bar in bud.loop():
        idx = torch.randint(0, n, (bs,), generator=g)
        caps = [training_caption(scenes[i], cap_rng) if cap_rng.random() >= 0.1 else "" for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)).to(device) * sf
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (bs,), generator=g).to(device)
        zt = noise_sched.add_noise(z, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return float(loss.item())


def train_unet(cfg, out: Path, rng, device, report):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.time()
    vae = load_vae(out, device)
    sf = vae.config.scaling_factor
    tok = build_tokenizer()
    scenes, means, stds = _unet_data(cfg, vae, rng, device)
    log(f"unet data: {len(scenes)} scenes rendered and encoded in {time.time() - t0:.1f}s")

    init = cfg.get("init")
    grown = False
    if init:  # warm start from an earlier world's UNet and text encoder
        text_encoder = CLIPTextModel.from_pretrained(Path(init) / "toy-sd" / "text_encoder",
                                                     torch_dtype=torch.float32).to(device)
        unet = UNet2DConditionModel.from_pretrained(Path(init) / "toy-sd" / "unet",
                                                    torch_dtype=torch.float32)
        latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
        if unet.config.sample_size * 2 == latent_size:  # world v4: a factor-4 VAE, latents twice as large
            unet, grown = grow_unet_level(unet, vae.config.latent_channels), True
        elif unet.config.in_channels != vae.config.latent_channels:  # the VAE stage grew the latent
            unet = expand_unet_channels(unet, vae.config.latent_channels)
        unet = unet.to(device)
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).to(device)
        unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
    bs = cfg["unet_batch"]
    bud = Budget("unet", cfg["unet_steps"], 100 if init else 200, cfg["unet_minutes"])
    # a grown UNet's new level starts from scratch (the from-scratch rate); the text encoder its inner
    # blocks were trained against stays as it is
    last_loss = _fit_unet(unet, text_encoder, scenes, means, stds, sf, bud, bs, 3e-4 if init and not grown else 5e-4, 3,
                          device, train_text_encoder=not grown)
    unet.eval()
    text_encoder.eval()
    steps = bud.total
    train_min = (time.time() - t0) / 60
    nparams_unet = sum(p.numel() for p in unet.parameters())
    nparams_te = sum(p.numel() for p in text_encoder.parameters())

    scheduler = DDIMScheduler(**SCHED_CONFIG, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _replace_pipeline(pipe, out)
    dt = time.time() - t0
    log(f"unet: {nparams_unet / 1e6:.2f}M params (+ text encoder {nparams_te / 1e6:.2f}M), {steps} steps, {dt / 60:.1f} min")
    report["unet"] = dict(params=nparams_unet, text_encoder_params=nparams_te, steps=steps, batch=bs,
                          train_minutes=round(train_min, 2), minutes=round(dt / 60, 2),
                          final_loss=round(last_loss, 4), config=dict(unet.config), text_config=TEXT_CONFIG, init_from=init,
                          grown_level=grown, text_encoder_trained=not grown,
                          heldout_pairs=len(__import__("studio.toyworld.render", fromlist=["x"]).HELDOUT_PAIRS))


def _replace_pipeline(pipe, out: Path) -> None:
    """Save ``pipe`` as ``out/toy-sd`` (fp16) through a temp folder and a rename, with the marker that
    tells a toy world loaded by path from a real SD1 model (``studio.toyworld.paths.is_toy_world``)."""
    from studio.toyworld.paths import WORLD_MARKER

    pipe.to("cpu").to(torch.float16)
    target = out / "toy-sd"
    tmp = Path(tempfile.mkdtemp(prefix=".toy-sd-", dir=out))
    pipe.save_pretrained(tmp, safe_serialization=True)
    latent = [pipe.vae.config.latent_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size]
    world = "v4" if pipe.vae_scale_factor == 4 else "v3"  # the VAE says which world a build is (WORLDS)
    (tmp / WORLD_MARKER).write_text(json.dumps({"world": world, "latent": latent, "image_size": RENDER_SIZE,
                                                "built_by": "python -m training.toyworld"}, indent=2) + "\n")
    old = out / ".toy-sd-old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- decoder refinement
def train_decoder(cfg, out: Path, rng, device, report):
    """Refine the VAE decoder with the encoder frozen, after the UNet is trained.

    The joint VAE stage stops at ~24 dB and decodes colours off-hue (red as brown, green as
    teal); a frozen encoder keeps every latent the UNet learnt bit-identical, so this stage sharpens
    images and colours without retraining the UNet."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    target = out / "toy-sd" / "vae"
    vae = AutoencoderKL.from_pretrained(target, torch_dtype=torch.float32).to(device)
    n = cfg["decoder_images"]
    data = to_tensor([generic_image(rng) if i % 3 == 0 else render(sample_base_scene(rng), rng)
                      for i in tqdm(range(n), desc="decoder data", mininterval=5)])
    ev = to_tensor([render(sample_base_scene(rng), rng) for _ in range(256)])

    @torch.no_grad()
    def psnr() -> float:
        x = u8_to_unit(ev).to(device) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        return 10 * math.log10(4.0 / F.mse_loss(rec, x).item())

    before = psnr()
    with torch.no_grad():  # the encoder is frozen: its posteriors are computed once
        mu, sd = [], []
        for i in range(0, n, 256):
            post = vae.encode(u8_to_unit(data[i:i + 256]).to(device) * 2 - 1).latent_dist
            mu.append(post.mean)
            sd.append(post.std)
        mu, sd = torch.cat(mu), torch.cat(sd)
    vae.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    steps, bs = cfg["decoder_steps"], cfg["decoder_batch"]
    bud = Budget("decoder", steps, 50, cfg["decoder_minutes"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bud.lr(s, 0.05))
    g = torch.Generator().manual_seed(5)
    for step, bar in bud.loop():
        idx = torch.randint(0, n, (bs,), generator=g)
        x = u8_to_unit(data[idx]).to(device) * 2 - 1
        z = mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g).to(device)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    after = psnr()
    tmp = Path(tempfile.mkdtemp(prefix=".vae-", dir=target.parent))
    vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    old = target.with_name(".vae-old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    from studio.toyworld.oracle import load_oracle

    novel = None  # measured with the oracle when one is there (the stage may run before it)
    if (out / "oracle").is_dir():
        novel = novel_reconstruction_rates(load_oracle(out / "oracle"), vae.float(), rng, cfg["eval_images"] // 5,
                                           device)
    dt = time.time() - t0
    log(f"decoder: {bud.total} steps, PSNR {before:.1f} -> {after:.1f} dB, {dt / 60:.1f} min; novel {novel}")
    report["decoder"] = dict(steps=bud.total, batch=bs, psnr_db_before=round(before, 2), psnr_db=round(after, 2),
                             novel_reconstruction_rate=novel, minutes=round(dt / 60, 2))


# ----------------------------------------------------------------------------- toy CLIP
def train_clip(cfg, out: Path, rng, device, report):
    import open_clip
    from safetensors.torch import save_file

    t0 = time.time()
    folder = out / "toy-clip"
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{CLIP_MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(CLIP_CONFIG, indent=2))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None).to(device)
    init = cfg.get("init")
    if init:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(
            str(Path(init) / "toy-clip" / "open_clip_model.safetensors")).items()})
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1).to(device)
    n = cfg["clip_images"]
    # the whole world, reserved concepts included, so CLIPScore can judge novel concepts
    scenes = [sample_any_scene(rng) for _ in range(n)]
    data = to_tensor([render(s, rng) for s in tqdm(scenes, desc="clip data", mininterval=5)])
    log(f"clip data: {n} images in {time.time() - t0:.1f}s")
    steps, bs = cfg["clip_steps"], cfg["clip_batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    bud = Budget("clip", steps, 50, cfg["clip_minutes"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bud.lr(s, 0.02))
    g = torch.Generator().manual_seed(5)
    cap_rng = np.random.default_rng(6)
    model.train()
    for step, bar in bud.loop():
        idx = torch.randint(0, n, (bs,), generator=g)
        caps = [caption(scenes[i]) if cap_rng.random() < 0.5 else training_caption(scenes[i], cap_rng)
                for i in idx.tolist()]
        x = (u8_to_unit(data[idx]).to(device) - mean) / std
        text = tokenizer(caps).to(device)
        img_f, txt_f, scale = model(x, text)[:3]
        logits = scale * img_f @ txt_f.t()
        # several images can share a caption: use soft targets over identical captions
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32, device=device)
        tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-tgt * logits.log_softmax(1), 1).mean()
                      + torch.sum(-tgt * logits.t().log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    steps = bud.total
    sd = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmpw = folder / "open_clip_model.safetensors.tmp"
    save_file(sd, str(tmpw))
    tmpw.replace(folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": CLIP_CONFIG,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "model_name": CLIP_MODEL_NAME,
    }, indent=2))
    # zero-shot shape accuracy of the saved model, reserved shapes included
    from studio.toyworld.clip import load_toy_clip

    m2, pre, tk = load_toy_clip(folder)
    ev_rng = np.random.default_rng(888)
    ev = [sample_concept_scene(ALL_SHAPES[i % len(ALL_SHAPES)], ev_rng) for i in range(cfg["eval_images"] // 2)]
    with torch.no_grad():
        imf = m2.encode_image(torch.stack([pre(render(s, ev_rng)) for s in ev]), normalize=True)
        tf = m2.encode_text(tk([f"a {o.color} {s}" for s in ALL_SHAPES for o in [ev[0].objects[0]]]), normalize=True)
        # per image: prompt with its own colour
        correct = 0
        for i, s in enumerate(ev):
            o = s.objects[0]
            tf = m2.encode_text(tk([f"a {o.color} {sh}" for sh in ALL_SHAPES]), normalize=True)
            correct += int(ALL_SHAPES[int((imf[i:i + 1] @ tf.t()).argmax())] == o.shape)
    zs = correct / len(ev)
    dt = time.time() - t0
    log(f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, zero-shot shape acc {zs:.3f}, {dt / 60:.1f} min")
    report["clip"] = dict(params=sum(p.numel() for p in model.parameters()), steps=steps, batch=bs,
                          zero_shot_shape_acc=round(zs, 4), minutes=round(dt / 60, 2), config=CLIP_CONFIG,
                          init_from=init)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/models", help="output folder (default assets/models)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test, not a usable model")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-budget", action="store_true",
                    help="ignore the per-stage wall-clock budgets (*_minutes): exact step counts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: robust on a shared machine; 0: torch default)")
    ap.add_argument("--init", default=None, metavar="FOLDER",
                    help="warm start the vae, unet (+ text encoder) and clip stages from an earlier build "
                         "with the same architecture (e.g. the previous assets/models); the oracles start from "
                         "scratch unless --oracle-continue trains on the ones already in --out")
    ap.add_argument("--world", choices=WORLDS, default="v3",
                    help="vae stage: v3, a factor-8 VAE (8x8x8 latents); v4, a factor-4 VAE (16x16x4: the shipped "
                         "world since session 16) from scratch, after which the unet stage grows --init's v3 UNet "
                         "by an outer level (a v4 --init is simply trained on)")
    ap.add_argument("--oracles", default="oracle,oracle-b",
                    help="oracle stage: which of the two oracles to train (default both; two processes can "
                         "train one each)")
    ap.add_argument("--oracle-continue", action="store_true",
                    help="oracle stage: train the oracles already in --out for oracle_steps more (at a third of "
                         "the learning rate, on a fresh data draw) instead of from scratch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="override a step/batch/size setting, e.g. --set unet_steps=3000")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k not in cfg:
            ap.error(f"unknown setting {k}; known: {', '.join(cfg)}")
        cfg[k] = float(v) if k.endswith("_minutes") else int(v)
    if args.init:
        init = Path(args.init).resolve()
        if not (init / "toy-sd" / "unet" / "config.json").is_file():
            ap.error(f"--init {args.init}: no toy-sd/unet there; give a folder written by this script")
        cfg["init"] = str(init)
    cfg["oracle_continue"] = args.oracle_continue
    cfg["world"] = args.world
    cfg["oracles"] = tuple(x.strip() for x in args.oracles.split(",") if x.strip())
    if not cfg["oracles"] or set(cfg["oracles"]) - {"oracle", "oracle-b"}:
        ap.error(f"--oracles {args.oracles!r}: give oracle, oracle-b or both")
    if args.no_budget:
        for k in cfg:
            if k.endswith("_minutes"):
                cfg[k] = 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; known: {STAGES}")
    if args.world == "v4" and "unet" in stages and not args.init:  # refused before any stage runs
        raise SystemExit("--world v4 grows an earlier world's UNet: give --init FOLDER (e.g. a copy of assets/models)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rpath = out / "toyworld-train.json"
    report = json.loads(rpath.read_text()) if rpath.exists() else {}
    report.update(quick=args.quick, seed=args.seed, device=device, settings=cfg,
                  torch=torch.__version__)
    t0 = time.time()
    fns = {"vae": train_vae, "oracle": train_oracle, "unet": train_unet, "clip": train_clip,
           "decoder": train_decoder}
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage != "vae" and vae_dir(out) is None:
            ap.error(f"stage {stage} needs the VAE: run with --stages vae first")
        if stage == "decoder" and not (out / "toy-sd" / "vae" / "config.json").is_file():
            ap.error(f"stage {stage} refines toy-sd: run the unet stage first")
        rng = seed_all(args.seed * 1000 + STAGE_SEED[stage])
        log(f"stage {stage} ...")
        fns[stage](cfg, out, rng, device, report)
        if stage == "unet":
            shutil.rmtree(out / WORK, ignore_errors=True)  # the VAE now lives in toy-sd
        tmp = rpath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(rpath)
    log(f"done in {(time.time() - t0) / 60:.1f} min -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
