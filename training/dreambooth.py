"""DreamBooth training of a LoRA (PEFT) or Kronecker (DiffuseKronA) adapter, on accelerate.

One flow for SD1.x/2.x, SDXL and the toy model: instance images (+ optional kohya-style ``.txt``
captions) with a trigger prompt, optional prior preservation with class images the base model
draws itself (cached on disk), Min-SNR weighting, mixed precision, gradient accumulation and
checkpointing, step-based checkpoints that resume exactly, validation images and a final grid.
Optionally the trigger's input embedding is trained too (pivotal tuning, ``train_token_embedding``):
one extra vector per text encoder, injected by a hook on the token-embedding table (the table itself
never changes) and stored in the adapter, so the trigger binds without a text-encoder LoRA that
would change how every prompt is encoded.
The result is an ``Adapter`` (LoRA or Kronecker layers) written through ``studio.adapters.formats``
with the trigger, concept and training parameters (including A1111's ``ss_*`` keys) in the header.

Why latents and (frozen) text embeddings are computed once: the instance set is a handful of
images resized/cropped deterministically, so encoding them every step (as the diffusers reference
script does) only costs time. A fresh latent is still drawn from the stored VAE posterior each step.
Every random draw of a micro-step comes from a generator seeded by (seed, process, micro-step), so
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio.adapters.adapter import Adapter, LoraDelta
from studio.adapters import kron as kronlib
from studio.atomic import atomic_dir, atomic_path, write_atomic
from studio.errors import StudioError

log = logging.getLogger("studio.training")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Which UNet Linear layers the adapter sits on (matched by name suffix, as PEFT does).
# "cross-kv" is Custom Diffusion's choice (Kumari et al. 2023): only the cross-attention key and
# value projections, which see nothing but the text, so the adapter acts through the prompt's tokens.
UNET_TARGETS = {
    "attention": LORA_TARGETS,
    "cross": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "cross-kv": ["attn2.to_k", "attn2.to_v"],
    # LoCon's reach (LyCORIS): the attention projections plus the ResNet blocks' 3x3 convolutions,
    # which draw the outline of a shape that the attention layers alone can only steer towards
    "attention+conv": LORA_TARGETS + ["conv1", "conv2"],
}
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_PEFT_NAME = "studio_train"


class TrainingError(StudioError):
    """Bad training input (folder, images, options) the user can fix."""


@dataclass
class TrainConfig:
    """Everything a DreamBooth run needs; the defaults follow training.md §1.1/§1.2."""

    images: str = ""  # folder of instance images (optional <image>.txt captions)
    out: str = ""  # adapter file to write (.safetensors); empty: return the adapter only
    trigger: str = "sks"
    class_word: str = "object"  # the concept the trigger binds to ("shape", "dog")
    instance_prompt: str | None = None  # default "a {trigger} {class_word}"
    concept_kind: str = "object"  # object / style / background / character
    name: str | None = None  # adapter name (default: file stem or trigger)
    adapter: str = "lora"  # lora | kron
    rank: int = 4
    unet_targets: str = "attention"  # attention | cross | cross-kv | attention+conv (UNET_TARGETS)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    factors: str = "krona-paper"  # kron: A1xA2 or a preset
    kron_mode: str = "auto"  # auto | vec | dense (how the Kronecker forward is computed)
    train_text_encoder: bool = False  # the adapter (LoRA or Kronecker, same rank/factors) on the text encoder(s) too
    train_token_embedding: bool = False  # pivotal tuning: learn the trigger's input embedding (stored in the adapter)
    token_embedding_lr: float = 5e-3
    steps: int = 500  # optimizer steps
    lr: float | None = None  # None: 1e-4 (lora) / 1e-3 (kron)
    text_encoder_lr: float = 5e-6
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1  # instance images per micro-step (per process)
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    resolution: int | None = None  # None: the model's native size
    prior_preservation: bool = False
    class_prompts: list[str] = field(default_factory=list)  # default ["a {class_word}"]
    class_dir: str | None = None  # cached class images (default <output_dir>/class_images)
    num_class_images: int = 100
    class_steps: int = 25
    class_guidance: float = 7.5
    prior_loss_weight: float = 1.0
    stand_in_prior: int = 0  # prior prompts with a stand-in word where the trigger stands (implies prior preservation)
    snr_gamma: float | None = None  # Min-SNR γ (5 recommended); None: off
    # Break-A-Scene's cross-attention loss: on instance images with a concept mask (masks/<name>.png), the
    # max-normalised cross-attention maps of the trigger and the word after it pulled onto the mask, so the
    # concept's words attend where it is drawn (what CLoRA's masks read); 0: off
    attention_loss: float = 0.0
    attention_factor: int = 0  # image pixels per map cell of that loss; 0: the level CLoRA's auto masks read
    attention_words: str = "trigger+word"  # the tokens that loss pulls: the trigger and the word after it, or "trigger"
    # instance images only at noise levels below this timestep (prior images at every level): a fill or
    # style learnt where the outline is already drawn, base-like at high noise; None: every level
    instance_max_timestep: int | None = None
    # instance images only at noise levels from this timestep up (prior images at every level): an object learnt
    # where its outline is decided, base-like at low noise where a fill or style is drawn; None: every level
    instance_min_timestep: int | None = None
    caption_dropout: float = 0.0  # share of examples trained with the empty caption (keeps the CFG branch)
    caption_dropout_scope: str = "all"  # all | prior: drop only class-image captions (base model's own samples)
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps; 0: only on Ctrl-C
    keep_checkpoints: int = 2
    resume: str | bool | None = None  # True/"latest" or a checkpoint folder
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)  # default [instance prompt]
    num_validation_images: int = 4
    sample_steps: int = 25
    sample_guidance: float = 7.5
    final_grid: bool = True
    output_dir: str | None = None  # checkpoints/samples (default <out stem>-train/)
    format: str | None = None  # None: kohya (lora) / lokr (kron)
    save_dtype: str = "fp16"  # fp16 | fp32 | bf16 for the written adapter
    svd_lora_rank: int = 0  # kron: also write <out>-lora<R>.safetensors (SVD; diffusers, or kohya with an embedding)
    seed: int = 0
    skip_bad_images: bool = True  # False: a corrupt image is fatal
    progress: bool = True
    extra_metadata: dict[str, str] = field(default_factory=dict)  # added to the file header

    def __post_init__(self):
        if self.adapter not in ("lora", "kron"):
            raise TrainingError(f"adapter type {self.adapter!r} is unknown; use --adapter lora or --adapter kron")
        if self.unet_targets not in UNET_TARGETS:
            raise TrainingError(f"unet_targets {self.unet_targets!r} is not one of {', '.join(UNET_TARGETS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed precision {self.mixed_precision!r} is unknown; use no, fp16 or bf16")
        for label, v in (("steps", self.steps), ("batch_size", self.batch_size), ("grad_accum", self.grad_accum),
                         ("rank", self.rank)):
            if int(v) < 1:
                raise TrainingError(f"{label} must be ≥ 1, got {v}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainingError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.instance_max_timestep is not None and not 1 <= self.instance_max_timestep <= 1000:
            raise TrainingError(f"instance_max_timestep {self.instance_max_timestep} is outside 1-1000; give a "
                                "timestep of the 1000-step training schedule (e.g. 600), or leave it unset")
        if self.instance_min_timestep is not None and not 0 <= self.instance_min_timestep < 1000:
            raise TrainingError(f"instance_min_timestep {self.instance_min_timestep} is outside 0-999; give a "
                                "timestep of the 1000-step training schedule (e.g. 400), or leave it unset")
        if None not in (self.instance_min_timestep, self.instance_max_timestep) \
                and self.instance_min_timestep >= self.instance_max_timestep:
            raise TrainingError(f"instance_min_timestep {self.instance_min_timestep} must be below instance_max_timestep "
                                f"{self.instance_max_timestep}")
        if isinstance(self.attention_loss, bool) or not isinstance(self.attention_loss, (int, float)) \
                or not math.isfinite(self.attention_loss) or self.attention_loss < 0:
            raise TrainingError(f"attention_loss must be a finite number ≥ 0 (e.g. 0.01), got {self.attention_loss!r}")
        if self.attention_words not in ("trigger+word", "trigger"):
            raise TrainingError(f"attention_words {self.attention_words!r} is unknown; use trigger+word or trigger")
        if self.attention_loss and self.gradient_checkpointing:
            raise TrainingError("attention_loss reads attention maps that gradient checkpointing would recompute "
                                "with other processors; turn one of them off")
        if self.caption_dropout_scope not in ("all", "prior"):
            raise TrainingError(f"caption_dropout_scope {self.caption_dropout_scope!r} is unknown; use all or prior")
        if self.train_token_embedding and not self.token_embedding_lr > 0:
            raise TrainingError(f"token_embedding_lr must be > 0, got {self.token_embedding_lr}")
        for label in ("lr", "alpha", "text_encoder_lr", "token_embedding_lr", "snr_gamma"):
            v = getattr(self, label, None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise TrainingError(f"{label} must be a finite number ≥ 0, got {v!r}")
        if self.out and Path(self.out).suffix.lower() != ".safetensors":  # refused before training, not after
            raise TrainingError(f"--out {self.out} must end in .safetensors (adapters are written as safetensors); "
                                f"e.g. --out {Path(self.out).with_suffix('.safetensors')}")
        if self.out and Path(self.out).is_dir():
            raise TrainingError(f"--out {self.out} is an existing folder; give a .safetensors file path")
        if self.adapter == "kron":
            kronlib.parse_factors(self.factors)
        if isinstance(self.class_prompts, str):
            self.class_prompts = [self.class_prompts]
        if isinstance(self.stand_in_prior, bool) or not isinstance(self.stand_in_prior, int) or self.stand_in_prior < 0:
            raise TrainingError(f"stand_in_prior must be a whole number ≥ 0 (prompts), got {self.stand_in_prior!r}")
        if self.stand_in_prior:
            self.prior_preservation = True
        if isinstance(self.validation_prompts, str):
            self.validation_prompts = [self.validation_prompts]

    @property
    def prompt(self) -> str:
        return self.instance_prompt or f"a {self.trigger} {self.class_word}"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.adapter == "kron" else 1e-4)

    def out_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        if self.out:
            p = Path(self.out)
            return p.with_name(p.stem + "-train")
        return Path(tempfile.gettempdir()) / f"studio-train-{self.trigger}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Example:
    path: Path
    caption: str
    image: Image.Image  # resized and cropped to resolution × resolution
    original_size: tuple[int, int]  # (h, w) before resizing (SDXL time ids)
    crop_top_left: tuple[int, int]
    latent_mean: torch.Tensor | None = None  # the VAE posterior, encoded once
    latent_std: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (res, res) in [0, 1]: where the image shows the concept (masks/<name>.png)


def _resize_crop(img: Image.Image, res: int) -> tuple[Image.Image, tuple[int, int]]:
    """Shorter side to ``res`` (bicubic), then a centre crop; returns the crop's top-left."""
    w, h = img.size
    s = res / min(w, h)
    nw, nh = max(res, round(w * s)), max(res, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - res) // 2, (nh - res) // 2
    return img.crop((left, top, left + res, top + res)), (top, left)


def load_examples(folder: str | os.PathLike, res: int, default_caption: str, skip_bad: bool = True,
                  what: str = "instance") -> list[Example]:
    """Read every image of ``folder`` with its caption (``name.txt`` beside it, else the default)."""
    path = Path(folder)
    if not str(folder) or not path.is_dir():
        raise TrainingError(f"{what} image folder {str(folder)!r} does not exist; pass a folder of PNG/JPG images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise TrainingError(f"{what} image folder {path} has no images ({'/'.join(IMAGE_EXTS)}); add a few images of the concept")
    examples, bad, sizes = [], [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as e:  # unreadable / truncated / not an image
            if not skip_bad:
                raise TrainingError(f"{what} image {f} is unreadable ({type(e).__name__}); fix or remove it, or skip it (skip_bad_images / no --strict-images)") from e
            log.warning("skipping unreadable %s image %s (%s)", what, f, type(e).__name__)
            bad.append(f)
            continue
        sizes.add(img.size)
        cap_file = f.with_suffix(".txt")
        caption = cap_file.read_text(encoding="utf-8").strip() if cap_file.is_file() else default_caption
        original = (img.size[1], img.size[0])
        img, crop = _resize_crop(img, res)
        examples.append(Example(f, caption or default_caption, img, original, crop, mask=_concept_mask(f, original, res)))
    if not examples:
        raise TrainingError(f"none of the {len(files)} {what} images in {path} could be read; check the files")
    if sizes != {(res, res)}:
        log.info("resized %d %s image(s) of size(s) %s to %dx%d", len(examples), what,
                 ", ".join(f"{w}x{h}" for w, h in sorted(sizes)), res, res)
    return examples


def _concept_mask(image_path: Path, original: tuple[int, int], res: int) -> torch.Tensor | None:
    """The concept mask of an instance image, ``masks/<image name>.png`` beside it (white = the concept),
    resized and cropped as the image is; None when there is none."""
    path = image_path.parent / "masks" / (image_path.stem + ".png")
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            m = im.convert("L")
    except Exception as e:
        raise TrainingError(f"concept mask {path} is unreadable ({type(e).__name__}); fix or remove it") from e
    if (m.size[1], m.size[0]) != original:
        raise TrainingError(f"concept mask {path} is {m.size[0]}x{m.size[1]} but its image is "
                            f"{original[1]}x{original[0]}; draw the mask at the image's size")
    m, _ = _resize_crop(m, res)
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)


def trigger_pieces(tokenizer, trigger: str) -> dict[str, list[str]]:
    """Words of the trigger that the tokenizer splits into several tokens (they bind worse)."""
    split = {}
    for word in trigger.split():
        pieces = tokenizer.tokenize(word)
        if len(pieces) > 1:
            split[word] = pieces
    return split


# ---- loss -------------------------------------------------------------------------------------

def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights: min(SNR, γ)/SNR (epsilon) or min(SNR, γ)/(SNR + 1) (v-prediction); the SNR
    is diffusers' ``training_utils.compute_snr`` (what its training examples use)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_loss_weight: float = 1.0,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE on the instance half + λ·MSE on the class half (if any), per-sample weighted."""
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    if weights is not None:
        per = per * weights
    inst = per[:n_instance].mean()
    parts = {"instance": float(inst.detach())}
    loss = inst
    if per.shape[0] > n_instance:
        prior = per[n_instance:].mean()
        parts["prior"] = float(prior.detach())
        loss = inst + prior_loss_weight * prior
    return loss, parts


# ---- the trainer ------------------------------------------------------------------------------

def _make_accelerator(cfg: TrainConfig, cpu: bool):
    """An Accelerator for this run, and whether the run does its own mixed precision.

    accelerate's state (mixed precision included) is process-wide and can be set only once; a
    second run in the same process (the app, tests) with another precision would need its private
    ``_reset_state``. So the Accelerator is made without a precision, and the run applies its own
    (``torch.autocast`` + a GradScaler for fp16), unless ``accelerate launch`` already set one,
    which must then match.
    """
    from accelerate import Accelerator

    try:
        acc = Accelerator(cpu=cpu)
    except ValueError as e:
        raise TrainingError(f"accelerate cannot be set up for this run ({_first_line(e)}); start a new process") from e
    if acc.mixed_precision not in ("no", None):
        if acc.mixed_precision != cfg.mixed_precision:
            raise TrainingError(f"accelerate launch set mixed precision {acc.mixed_precision!r}, but this run asks for "
                                f"{cfg.mixed_precision!r}; pass --mixed-precision {acc.mixed_precision}")
        return acc, False
    if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise TrainingError("fp16 mixed precision is not available on the CPU; use --mixed-precision bf16 or no")
    return acc, cfg.mixed_precision != "no"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class DreamBoothTrainer:
    """One training run on a ``Studio``'s pipeline; ``run()`` returns the trained ``Adapter``.

    The adapter layers are injected into the shared UNet for the run only: ``close()`` (called by
    ``run``) strips them again, and the run holds the studio's lock so no generation sees them.
    """

    def __init__(self, studio, cfg: TrainConfig):
        self.studio, self.cfg = studio, cfg
        self.pipe = studio.pipe
        self.arch = studio.arch
        self.history: list[dict[str, float]] = []  # one entry per optimizer step
        self.warnings: list[str] = []
        self.step = 0
        self.outputs: dict[str, str] = {}
        self._injected = False
        self.token_params: dict[str, torch.nn.Parameter] = {}  # text-encoder component -> trigger vector (1, hidden)
        self._token_ids: dict[str, int] = {}
        self._token_enabled = True  # off while sampling: the studio's rig applies the adapter's embedding then

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, pipe = self.cfg, self.pipe
        self.accelerator, own_amp = _make_accelerator(cfg, cpu=self.studio.device.type == "cpu")
        acc = self.accelerator
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision) if own_amp else None
        self.grad_scaler = torch.amp.GradScaler(acc.device.type) if self.amp_dtype is torch.float16 else None
        self.device = acc.device
        if self.device != self.studio.device:
            for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
                if getattr(pipe, comp, None) is not None:
                    getattr(pipe, comp).to(self.device)
            self.studio.device = self.device
        self.res = cfg.resolution or self.studio.default_size
        if self.res % pipe.vae_scale_factor:
            raise TrainingError(f"resolution {self.res} is not a multiple of {pipe.vae_scale_factor}; pick e.g. {self.res // 8 * 8}")
        from diffusers import DDPMScheduler
        import inspect

        allowed = set(inspect.signature(DDPMScheduler.__init__).parameters)
        sched_cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if k in allowed and k != "set_alpha_to_one"}
        self.noise_scheduler = DDPMScheduler(**sched_cfg)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

        split = trigger_pieces(pipe.tokenizer, cfg.trigger)
        for word, pieces in split.items():
            msg = (f"trigger word {word!r} is split by the tokenizer into {pieces}; a rare single-token word "
                   "such as 'sks' binds more reliably")
            log.warning(msg)
            self.warnings.append(msg)

        if cfg.train_token_embedding:
            self._token_ids = self._trigger_token_ids()

        self.instance = load_examples(cfg.images, self.res, cfg.prompt, cfg.skip_bad_images, "instance")
        if not any(cfg.trigger in e.caption for e in self.instance):
            msg = f"no caption contains the trigger {cfg.trigger!r}; the adapter will not respond to it"
            log.warning(msg)
            self.warnings.append(msg)
        self.classes: list[Example] = []
        if cfg.prior_preservation:
            self.classes = self._class_examples()
        self.attention_spec = None
        self._token_positions: dict[str, list[int]] = {}
        if cfg.attention_loss:
            self.attention_spec = self._attention_spec()

        self._inject()
        self.unet = pipe.unet
        self.params = [p for p in self._trainable_modules_params()]
        self.param_names = self._param_names()
        named = list(zip(self.param_names, self.params))
        groups = [{"params": [p for n, p in named if not n.startswith(("text_encoder", "token_embedding."))],
                   "lr": cfg.learning_rate}]
        te = [p for n, p in named if n.startswith("text_encoder")]
        if te:
            groups.append({"params": te, "lr": cfg.text_encoder_lr})
        emb = [p for n, p in named if n.startswith("token_embedding.")]
        if emb:  # no weight decay: shrinking an input embedding towards 0 has no meaning
            groups.append({"params": emb, "lr": cfg.token_embedding_lr, "weight_decay": 0.0})
        self.base_lrs = [g["lr"] for g in groups]
        self.lr_scheduler = None  # built on the first step (after a resume), see _lr_schedule
        self.optimizer = acc.prepare_optimizer(torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))
        self.model = acc.prepare_model(self.unet) if acc.num_processes > 1 else self.unet
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._encode_latents()
        self._encode_captions()
        if cfg.resume:
            self.load_checkpoint(self._resume_path())

    def _attention_spec(self):
        """The cross-attention layers the attention loss reads; refuses a run with no concept masks."""
        from studio.attention import capture_spec

        have = sum(e.mask is not None for e in self.instance)
        if not have:
            raise TrainingError(f"attention_loss needs concept masks: put a mask per instance image in "
                                f"{Path(self.cfg.images) / 'masks'} (same name, white where the concept is), "
                                "or set attention_loss to 0")
        if have < len(self.instance):
            log.info("attention loss on the %d of %d instance images that have a concept mask", have, len(self.instance))
        try:
            return capture_spec(self.pipe.unet, self.pipe.vae_scale_factor, self.res, self.res, self.cfg.attention_factor)
        except StudioError as e:
            raise TrainingError(f"attention_factor: {e}") from e

    def _concept_tokens(self, caption: str) -> list[int]:
        """Positions of the trigger's tokens and of the token after them (the concept word) in ``caption``;
        tokenised once per caption (the captions repeat every few steps)."""
        if caption not in self._token_positions:
            self._token_positions[caption] = self._find_concept_tokens(caption)
        return self._token_positions[caption]

    def _find_concept_tokens(self, caption: str) -> list[int]:
        tok = self.pipe.tokenizer
        ids = tok(caption, truncation=True, max_length=tok.model_max_length).input_ids
        trig = tok(self.cfg.trigger, add_special_tokens=False).input_ids
        for i in range(1, len(ids) - len(trig)):
            if ids[i:i + len(trig)] == trig:
                end = i + len(trig)
                word = self.cfg.attention_words == "trigger+word" and ids[end] != tok.eos_token_id
                return list(range(i, end + word))
        return []

    def attention_loss(self, maps: torch.Tensor, picks: list[Example], captions: list[str]) -> torch.Tensor | None:
        """Mean over instance picks with a mask of MSE(map / max(map), mask at map size), per concept token.

        ``maps``: ``(images, h, w, tokens)`` of the batch. Break-A-Scene (Avrahami et al. 2023, eq. 3). The
        mask at map size is 1 on every cell the concept touches (max pooling), not its area share: CLoRA keeps
        cells above 0.4 of the map's maximum, and on coarse maps (4x4 on the toy model) an area target leaves
        the cells an object half covers out of its mask, where another branch then draws (session 25)."""
        h, w = maps.shape[1:3]
        losses = []
        for i, (e, c) in enumerate(zip(picks[:self.cfg.batch_size], captions)):
            if e.mask is None or not c:
                continue
            target = F.adaptive_max_pool2d((e.mask[None, None] > 0.5).float().to(maps.device), (h, w))[0, 0]
            for t in self._concept_tokens(c):
                m = maps[i, :, :, t]
                losses.append(F.mse_loss(m / m.max().clamp_min(1e-8), target))
        return torch.stack(losses).mean() if losses else None

    def _trainable_modules_params(self):
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is not None:
                for p in model.parameters():
                    if p.requires_grad:
                        yield p
        yield from self.token_params.values()

    def _param_names(self) -> list[str]:
        names = []
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is not None:
                names += [f"{comp}.{n}" for n, p in model.named_parameters() if p.requires_grad]
        return names + [f"token_embedding.{comp}" for comp in self.token_params]

    def _trigger_token_ids(self) -> dict[str, int]:
        """The trigger's token id per text encoder; it must be one token for a trained embedding."""
        from studio.adapters.activation import single_token_id
        from studio.errors import AdapterMismatchError

        ids = {}
        for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if getattr(self.pipe, comp, None) is None:
                continue
            try:
                ids[comp] = single_token_id(getattr(self.pipe, tok), self.cfg.trigger, owner="--train-token-embedding")
            except AdapterMismatchError as e:
                raise TrainingError(f"{e}; pick a one-token trigger or drop --train-token-embedding") from None
        return ids

    def _inject_token_embeddings(self) -> None:
        """One trainable vector per text encoder, started from the trigger's own row, put in by a hook."""
        for comp, tid in self._token_ids.items():
            table = getattr(self.pipe, comp).get_input_embeddings()
            param = torch.nn.Parameter(table.weight.detach()[tid : tid + 1].float().clone())
            self.token_params[comp] = param

            def hook(module, args, output, tid=tid, param=param):
                if not self._token_enabled:
                    return output
                return torch.where((args[0] == tid).unsqueeze(-1), param.to(output.dtype), output)

            self._token_handles.append(table.register_forward_hook(hook))

    def _inject(self) -> None:
        cfg = self.cfg
        self._token_handles: list = []
        if cfg.train_token_embedding:
            self._inject_token_embeddings()
            self._injected = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.adapter == "kron":
                self._inject_kron()
            else:
                from peft import LoraConfig

                alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
                self.pipe.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                      target_modules=UNET_TARGETS[cfg.unet_targets]), adapter_name=_PEFT_NAME)
                self._injected = True
                if cfg.train_text_encoder:
                    for comp in ("text_encoder", "text_encoder_2"):
                        te = getattr(self.pipe, comp, None)
                        if te is not None:  # peft directly: transformers' add_adapter wants a newer peft
                            from peft import inject_adapter_in_model

                            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                               target_modules=TE_TARGETS), te, adapter_name=_PEFT_NAME)
        for p in self._trainable_modules_params():
            p.data = p.data.float()  # trainable weights stay fp32 under mixed precision

    def _models(self) -> list[torch.nn.Module]:
        """The pipeline's UNet and text encoders: where adapter layers may sit."""
        return [m for c in ("unet", "text_encoder", "text_encoder_2") if (m := getattr(self.pipe, c, None)) is not None]

    def _text_encoders(self) -> list[str]:
        """The pipeline's text-encoder components the adapter trains on (none without train_text_encoder)."""
        if not self.cfg.train_text_encoder:
            return []
        return [c for c in ("text_encoder", "text_encoder_2") if getattr(self.pipe, c, None) is not None]

    def _inject_kron(self) -> None:
        """Kronecker layers on the UNet (and the text encoders' TE_TARGETS with the same factors).

        Every layer's factors are checked before any layer is put in, so a bad choice (an error naming
        the layer and the valid factors) leaves the whole pipeline untouched.
        """
        cfg = self.cfg
        a1, a2 = kronlib.parse_factors(cfg.factors)
        plan = [("unet", self.pipe.unet, UNET_TARGETS[cfg.unet_targets])]
        plan += [(c, getattr(self.pipe, c), TE_TARGETS) for c in self._text_encoders()]
        for comp, model, targets in plan:
            found = kronlib.target_layers(model, targets)
            if not found:
                raise TrainingError(f"{comp} has no {'/'.join(targets)} layers to attach a Kronecker adapter to")
            for name, mod in found:
                kronlib.check_factors(f"{comp}.{name}", *kronlib.layer_dims(mod), a1, a2)
        for i, (comp, model, targets) in enumerate(plan):  # seed + i: independent A draws per component
            layers = kronlib.inject_kron(model, (a1, a2), targets, mode=cfg.kron_mode, seed=cfg.seed + i)
            self._injected = True
            for layer in layers.values():
                layer.kron_A.requires_grad_(True)
                layer.kron_B.requires_grad_(True)

    def _strip(self) -> None:
        """Remove every injected layer so the shared pipeline is exactly as before."""
        if not self._injected:
            return
        for handle in getattr(self, "_token_handles", []):
            handle.remove()
        self._token_handles = []
        unet = self.pipe.unet
        if self.cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        if self.cfg.adapter == "kron":
            for model in self._models():
                kronlib.remove_kron(model)
        else:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for comp in ("unet", "text_encoder", "text_encoder_2"):
                model = getattr(self.pipe, comp, None)
                if model is None:
                    continue
                for name, mod in list(model.named_modules()):
                    if isinstance(mod, BaseTunerLayer):
                        kronlib._set_submodule(model, name, mod.get_base_layer())
                if hasattr(model, "peft_config"):
                    del model.peft_config
                if hasattr(model, "_hf_peft_config_loaded"):
                    model._hf_peft_config_loaded = False
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is not None:
                model.requires_grad_(False).eval()
        self._injected = False

    def _set_training_adapter(self, enabled: bool) -> None:
        self._token_enabled = enabled
        if self.cfg.adapter == "kron":
            for model in self._models():
                kronlib.set_kron_enabled(model, enabled)
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is None:
                continue
            for mod in model.modules():
                if isinstance(mod, BaseTunerLayer):
                    mod.enable_adapters(enabled)

    # -- class images ---------------------------------------------------------------------------
    def _class_examples(self) -> list[Example]:
        """Class images for prior preservation, generated by the base model where missing."""
        cfg, acc = self.cfg, self.accelerator
        prompts = cfg.class_prompts or [f"a {cfg.class_word}"]
        if cfg.stand_in_prior:
            prompts = prompts + [p for p in stand_in_prompts([e.caption for e in self.instance], cfg.trigger,
                                                             cfg.stand_in_prior) if p not in prompts]
        folder = Path(cfg.class_dir) if cfg.class_dir else self.cfg.out_dir() / "class_images"
        per_prompt = math.ceil(cfg.num_class_images / len(prompts))
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            from studio.metadata import save_png

            todo = []
            for prompt in prompts:
                key = hashlib.sha1(f"{self.studio.model_id}|{self.res}|{prompt}".encode()).hexdigest()[:10]
                for i in range(per_prompt):
                    stem = folder / f"class-{key}-{i:04d}"
                    if not stem.with_suffix(".png").is_file():
                        todo.append((prompt, i, stem))
            if todo:
                log.info("generating %d class image(s) with the base model into %s", len(todo), folder)
            bar = _tqdm(todo, "class images", cfg.progress and acc.is_main_process)
            for prompt, i, stem in bar:
                image = self.studio.run(prompt, steps=cfg.class_steps, guidance=cfg.class_guidance, seed=cfg.seed * 100003 + i,
                                        width=self.res, height=self.res, progress=False).images[0]
                _write_text_atomic(stem.with_suffix(".txt"), prompt)
                save_png(image, stem.with_suffix(".png"))
        acc.wait_for_everyone()
        keep = set()
        for prompt in prompts:
            key = hashlib.sha1(f"{self.studio.model_id}|{self.res}|{prompt}".encode()).hexdigest()[:10]
            keep |= {f"class-{key}-{i:04d}.png" for i in range(per_prompt)}
        examples = [e for e in load_examples(folder, self.res, prompts[0], True, "class") if e.path.name in keep]
        return examples

    # -- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_latents(self) -> None:
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16
        if upcast:
            vae.to(torch.float32)
        try:
            for group in (self.instance, self.classes):
                for e in group:
                    x = self.pipe.image_processor.preprocess(e.image).to(self.device, vae.dtype)
                    dist = vae.encode(x).latent_dist
                    e.latent_mean, e.latent_std = dist.mean.float(), dist.std.float()
        finally:
            if upcast:
                vae.to(torch.float16)

    def _encode_captions(self) -> None:
        """Encode the captions that training cannot change once (all of them unless the text side learns)."""
        self._emb_cache: dict[str, tuple] = {}
        if self.cfg.train_text_encoder:
            return
        with torch.no_grad():
            captions = [e.caption for e in self.instance + self.classes] + ([""] if self.cfg.caption_dropout else [])
            for c in captions:
                if c not in self._emb_cache and not self._has_trigger_token(c):
                    self._emb_cache[c] = self._encode(c)

    def _has_trigger_token(self, caption: str) -> bool:
        """Whether a trained trigger embedding takes part in encoding this caption."""
        if not self._token_ids:
            return False
        tok = self.pipe.tokenizer
        return self._token_ids["text_encoder"] in tok(caption, truncation=True, max_length=tok.model_max_length).input_ids

    def _encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipe = self.pipe
        if self.arch == "sdxl":
            pe, _, pooled, _ = pipe.encode_prompt(caption, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
            return pe.float(), pooled.float()
        pe, _ = pipe.encode_prompt(caption, self.device, 1, False)
        return pe.float(), None

    # -- one micro-step -------------------------------------------------------------------------
    def _micro_batch(self, micro: int):
        cfg, acc = self.cfg, self.accelerator
        g = torch.Generator("cpu").manual_seed((cfg.seed * 1_000_003 + acc.process_index * 7_919 + micro) % 2**63)
        picks = [self.instance[i] for i in torch.randint(len(self.instance), (cfg.batch_size,), generator=g).tolist()]
        if self.classes:
            picks += [self.classes[i] for i in torch.randint(len(self.classes), (cfg.batch_size,), generator=g).tolist()]
        means = torch.cat([e.latent_mean for e in picks]).cpu()
        stds = torch.cat([e.latent_std for e in picks]).cpu()
        x0 = (means + stds * torch.randn(means.shape, generator=g)) * self.pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(picks),), generator=g)
        if cfg.instance_max_timestep is not None or cfg.instance_min_timestep is not None:
            n = self.noise_scheduler.config.num_train_timesteps  # the first batch_size picks are instance images
            lo, hi = cfg.instance_min_timestep or 0, cfg.instance_max_timestep or n
            t[:cfg.batch_size] = lo + t[:cfg.batch_size] * (hi - lo) // n
        captions = [e.caption for e in picks]
        if cfg.caption_dropout > 0:  # drawn last, so runs without dropout keep their random stream
            drop = (torch.rand(len(picks), generator=g) < cfg.caption_dropout).tolist()
            if cfg.caption_dropout_scope == "prior":  # the first batch_size picks are instance images
                drop = [False] * cfg.batch_size + drop[cfg.batch_size:]
            captions = ["" if d else c for c, d in zip(captions, drop)]
        return picks, captions, x0.to(self.device), noise.to(self.device), t.to(self.device)

    def compute_loss(self, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        picks, captions, x0, noise, t = self._micro_batch(micro)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        enc = [self._emb_cache[c] if c in self._emb_cache else self._encode(c) for c in captions]
        embeds = torch.cat([pe for pe, _ in enc])
        added = None
        if self.arch == "sdxl":
            time_ids = torch.tensor([[*e.original_size, *e.crop_top_left, self.res, self.res] for e in picks],
                                    device=self.device, dtype=torch.float32)
            added = {"text_embeds": torch.cat([p for _, p in enc]), "time_ids": time_ids}
        unet_dtype = self.unet.dtype
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else self.accelerator.autocast()
        capture = contextlib.nullcontext()
        if self.attention_spec is not None:
            from studio.attention import AttentionCapture

            capture = AttentionCapture(self.unet, self.attention_spec).record(images=len(picks), halves=1)
        with autocast, capture as recorder:
            pred = self.model(xt.to(unet_dtype), t, encoder_hidden_states=embeds.to(unet_dtype),
                              added_cond_kwargs=None if added is None else {k: v.to(unet_dtype) for k, v in added.items()},
                              return_dict=False)[0]
        weights = None
        if cfg.snr_gamma:
            weights = snr_weights(self.noise_scheduler, t, cfg.snr_gamma, self.prediction_type)
        loss, parts = dreambooth_loss(pred, target, cfg.batch_size, cfg.prior_loss_weight, weights)
        if recorder is not None:
            attn = self.attention_loss(recorder.image_maps()[0], picks, captions)
            if attn is not None:
                parts["attention"] = float(attn.detach())
                loss = loss + cfg.attention_loss * attn
        return loss, parts

    def train_step(self) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-steps, clip, AdamW. Returns the mean losses."""
        cfg, acc = self.cfg, self.accelerator
        lr_schedule = self._lr_schedule()
        totals: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            micro = self.step * cfg.grad_accum + k
            sync = k == cfg.grad_accum - 1
            ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.model)
            with ctx:
                loss, parts = self.compute_loss(micro)
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(loss / cfg.grad_accum).backward()
                else:
                    acc.backward(loss / cfg.grad_accum)
            parts["loss"] = float(loss.detach())
            for key, v in parts.items():
                totals[key] = totals.get(key, 0.0) + v / cfg.grad_accum
        if acc.num_processes > 1:  # outside the DDP-wrapped UNet: average the embedding's gradient by hand
            for p in self.token_params.values():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        self.step += 1
        self.history.append({"step": self.step, **totals})
        return totals

    def _scaler(self):
        """The fp16 GradScaler in use: this run's own, or accelerate's under ``accelerate launch``."""
        return self.grad_scaler if self.grad_scaler is not None else getattr(self.accelerator, "scaler", None)

    def _lr_schedule(self):
        """diffusers' ``get_scheduler``: constant, or linear warm-up over ``warmup_steps`` (lr 0 at step 0,
        as in diffusers' and kohya's scripts). Built at the current step, so a resumed run continues it."""
        if self.lr_scheduler is None:
            from diffusers.optimization import get_scheduler

            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = group["initial_lr"] = base
            name = "constant_with_warmup" if self.cfg.warmup_steps else "constant"
            self.lr_scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=self.cfg.warmup_steps or None,
                                              last_epoch=self.step - 1)
        return self.lr_scheduler

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return self.cfg.out_dir() / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Adapter weights + optimizer state (safetensors) and the run state (JSON), atomically."""
        acc = self.accelerator
        final = self.checkpoint_dir() / f"step-{self.step:06d}"
        if acc.is_main_process:
            tensors = {f"param.{n}": p for n, p in zip(self.param_names, self.params)}
            opt = self.optimizer.state_dict()
            scalars = {}
            for idx, st in opt["state"].items():
                for key, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optim.{idx}.{key}"] = v
                    else:
                        scalars[f"{idx}.{key}"] = v
            scaler = self._scaler().state_dict() if self._scaler() is not None else None
            state = {"step": self.step, "param_groups": opt["param_groups"], "scalars": scalars, "scaler": scaler,
                     "history": self.history, "config": self.cfg.to_json()}
            with atomic_dir(final) as tmp:
                _save_safetensors_atomic(tensors, tmp / "state.safetensors", {"format": "pt"})
                (tmp / "state.json").write_text(json.dumps(state, default=str))
            done = sorted(p for p in self.checkpoint_dir().glob("step-*") if p.is_dir())
            for old in done[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s", final)
        acc.wait_for_everyone()
        return final

    def _resume_path(self) -> Path:
        r = self.cfg.resume
        if r is True or r in ("latest", "true", "True"):
            found = sorted(p for p in self.checkpoint_dir().glob("step-*") if (p / "state.json").is_file())
            if not found:
                raise TrainingError(f"no checkpoint to resume in {self.checkpoint_dir()}; run without --resume first")
            return found[-1]
        p = Path(str(r))
        if not (p / "state.json").is_file():
            raise TrainingError(f"checkpoint {p} not found (no state.json); pass a step-N folder or --resume latest")
        return p

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        saved = state.get("config", {})
        for key in ("adapter", "rank", "unet_targets", "factors", "batch_size", "grad_accum", "seed", "prior_preservation",
                    "train_token_embedding", "train_text_encoder"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise TrainingError(f"checkpoint {path} was made with {key}={saved[key]!r}, not {getattr(self.cfg, key)!r}; "
                                    "use the same settings to resume")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                if f"param.{n}" not in tensors:
                    raise TrainingError(f"checkpoint {path} lacks {n}; it belongs to another run")
                p.copy_(tensors[f"param.{n}"])
        opt_state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v.to(self.device)
        for key, v in state["scalars"].items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        if state.get("scaler") and self._scaler() is not None:
            self._scaler().load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        log.info("resumed from %s at step %d", path, self.step)

    # -- adapter, samples, output ----------------------------------------------------------------
    def current_adapter(self) -> Adapter:
        """The adapter as trained so far, as plain data (``LoraDelta`` or ``KronDelta`` layers)."""
        cfg = self.cfg
        fields = dict(kind=cfg.adapter, concept_kind=cfg.concept_kind, trigger=cfg.trigger, concept=cfg.class_word,
                      arch=self.arch)
        name = cfg.name or (Path(cfg.out).stem if cfg.out else cfg.trigger)
        if cfg.adapter == "kron":
            adapter = kronlib.to_adapter(self.pipe.unet, name, "unet", **fields)
            for comp in self._text_encoders():
                adapter.layers.update(kronlib.to_adapter(getattr(self.pipe, comp), name, comp).layers)
            adapter.embeddings = self._trained_embeddings()
            return adapter
        from peft.tuners.lora import LoraLayer

        layers = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, comp, None)
            if model is None:
                continue
            for mname, mod in model.named_modules():
                if isinstance(mod, LoraLayer) and _PEFT_NAME in mod.lora_A:
                    layers[f"{comp}.{mname}"] = LoraDelta(
                        down=mod.lora_A[_PEFT_NAME].weight.detach().float().clone(),
                        up=mod.lora_B[_PEFT_NAME].weight.detach().float().clone(),
                        alpha=float(mod.lora_alpha[_PEFT_NAME]),
                    )
        return Adapter(name=name, layers=layers, embeddings=self._trained_embeddings(), **fields)

    def _trained_embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        if not self.token_params:
            return {}
        return {self.cfg.trigger: {c: p.detach().float().clone() for c, p in self.token_params.items()}}

    def sample(self, prompts: list[str], n: int, tag: str) -> list[Image.Image]:
        """Images of the adapter as trained so far (through the studio's own sampling loop)."""
        from studio.metadata import save_png

        if not self.accelerator.is_main_process:
            return []
        adapter = self.current_adapter()
        self._set_training_adapter(False)
        was_training = self.unet.training
        self.unet.eval()
        images = []
        try:
            for prompt in prompts:
                for i in range(n):
                    img = self.studio.run(prompt, [(adapter, 1.0)], steps=self.cfg.sample_steps,
                                          guidance=self.cfg.sample_guidance, seed=self.cfg.seed + i,
                                          width=self.res, height=self.res, progress=False).images[0]
                    images.append(img)
                    save_png(img, self.cfg.out_dir() / "samples" / f"{tag}-{_slug(prompt)}-{i}.png")
        finally:
            self._set_training_adapter(True)
            self.unet.train(was_training)
        return images

    def metadata(self, started: float) -> dict[str, str]:
        """Header metadata: our fields plus the ``ss_*`` / ``modelspec.*`` keys A1111 shows."""
        cfg = self.cfg
        arch_key = {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2", "sd1": "sd_v1", "toy": "toy"}.get(self.arch, self.arch)
        spec_arch = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2", "sd1": "stable-diffusion-v1",
                     "toy": "toy-sd"}.get(self.arch, self.arch)
        name = cfg.name or (Path(cfg.out).stem if cfg.out else cfg.trigger)
        a1, a2 = kronlib.parse_factors(cfg.factors) if cfg.adapter == "kron" else (0, 0)
        tags: dict[str, int] = {}
        for e in self.instance:
            for tag in e.caption.split(","):
                tags[tag.strip()] = tags.get(tag.strip(), 0) + 1
        params = {k: v for k, v in cfg.to_json().items()
                  if k not in ("out", "output_dir", "resume", "progress", "extra_metadata")}
        md = {
            "ss_output_name": name,
            "ss_sd_model_name": str(self.studio.model_id),
            "ss_base_model_version": arch_key,
            "ss_v2": str(self.arch == "sd2"),
            "ss_network_module": "lycoris.kohya" if cfg.adapter == "kron" else "networks.lora",
            "ss_network_dim": str(cfg.rank if cfg.adapter == "lora" else max(a1, a2)),
            "ss_network_alpha": str(cfg.alpha if cfg.alpha is not None else cfg.rank) if cfg.adapter == "lora" else "1",
            "ss_network_args": json.dumps({"algo": "lokr", "factor_a1": a1, "factor_a2": a2, "full_matrix": True}
                                          if cfg.adapter == "kron" else {}),
            "ss_resolution": f"({self.res}, {self.res})",
            "ss_learning_rate": str(cfg.learning_rate),
            "ss_unet_lr": str(cfg.learning_rate),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0),
            "ss_lr_scheduler": "constant_with_warmup" if cfg.warmup_steps else "constant",
            "ss_lr_warmup_steps": str(cfg.warmup_steps),
            "ss_max_train_steps": str(cfg.steps),
            "ss_steps": str(self.step),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_num_train_images": str(len(self.instance)),
            "ss_num_reg_images": str(len(self.classes)),
            "ss_prior_loss_weight": str(cfg.prior_loss_weight),
            "ss_min_snr_gamma": str(cfg.snr_gamma),
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_max_grad_norm": str(cfg.max_grad_norm),
            "ss_seed": str(cfg.seed),
            "ss_optimizer": "torch.optim.AdamW",
            "ss_training_started_at": str(started),
            "ss_training_finished_at": str(time.time()),
            "ss_tag_frequency": json.dumps({Path(cfg.images).name: tags}),
            "ss_training_comment": f"DreamBooth {cfg.adapter}, trigger {cfg.trigger!r} -> {cfg.class_word}",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{spec_arch}/{'lycoris-lokr' if cfg.adapter == 'kron' else 'lora'}",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
            "modelspec.title": name,
            "modelspec.trigger_phrase": cfg.trigger,
            "modelspec.resolution": f"{self.res}x{self.res}",
            "trigger": cfg.trigger,
            "concept": cfg.class_word,
            "concept_kind": cfg.concept_kind,
            "instance_prompt": cfg.prompt,
            "base_arch": self.arch,
            "training_params": json.dumps(params, default=str),
        }
        md.update({str(k): str(v) for k, v in cfg.extra_metadata.items()})
        return md

    def run(self) -> Adapter:
        """Set up, train to ``cfg.steps``, write the adapter and samples; always strip the layers."""
        cfg = self.cfg
        started = time.time()
        lock = getattr(self.studio, "_lock", contextlib.nullcontext())
        with lock:
            try:
                self.setup()
                acc = self.accelerator
                self.unet.train()
                bar = _tqdm(range(self.step, cfg.steps), "training", cfg.progress and acc.is_main_process,
                            initial=self.step, total=cfg.steps)
                try:
                    for _ in bar:
                        stats = self.train_step()
                        if hasattr(bar, "set_postfix"):
                            bar.set_postfix(loss=f"{stats['loss']:.4f}")
                        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                            self.save_checkpoint()
                        if cfg.validate_every and self.step % cfg.validate_every == 0 and self.step < cfg.steps:
                            self.sample(cfg.validation_prompts or [cfg.prompt], min(2, cfg.num_validation_images),
                                        f"step-{self.step:06d}")
                            acc.wait_for_everyone()
                except KeyboardInterrupt:
                    path = self.save_checkpoint()
                    log.warning("interrupted at step %d; checkpoint saved to %s (continue with --resume)", self.step, path)
                    raise
                if cfg.checkpoint_every:  # the end state too, so a later run can extend it with --resume
                    self.save_checkpoint()
                adapter = self.current_adapter()
                adapter.metadata.update(self.metadata(started))
                if acc.is_main_process:
                    self._write_outputs(adapter)
                acc.wait_for_everyone()
                return adapter
            finally:
                self._strip()

    def _write_outputs(self, adapter: Adapter) -> None:
        cfg = self.cfg
        out_dir = cfg.out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out_dir / "history.json", json.dumps(self.history))
        if cfg.out:
            from studio.adapters.formats import write_adapter

            fmt = cfg.format or ("lokr" if cfg.adapter == "kron" else "kohya")
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
            saved = _cast(adapter, dtype)
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            write_adapter(saved, cfg.out, format=fmt)
            self.outputs["adapter"] = str(cfg.out)
            adapter.path = str(cfg.out)
            log.info("adapter written: %s (%s)", cfg.out, fmt)
            if cfg.adapter == "kron" and cfg.svd_lora_rank:
                lora = kronlib.kron_to_lora(adapter, cfg.svd_lora_rank, name=f"{adapter.name}-lora{cfg.svd_lora_rank}")
                lora = _cast(dataclasses.replace(lora, embeddings=adapter.embeddings), dtype)
                path = Path(cfg.out).with_name(f"{Path(cfg.out).stem}-lora{cfg.svd_lora_rank}.safetensors")
                write_adapter(lora, path, format="kohya" if lora.embeddings else "diffusers")
                self.outputs["svd_lora"] = str(path)
                log.info("SVD LoRA (rank %d) written: %s", cfg.svd_lora_rank, path)
        if cfg.final_grid and cfg.num_validation_images > 0:
            prompts = cfg.validation_prompts or [cfg.prompt]
            images = self.sample(prompts, cfg.num_validation_images, "final")
            if images:
                grid = image_grid(images, rows=len(prompts))
                path = out_dir / "samples" / "final-grid.png"
                from studio.metadata import save_png

                save_png(grid, path)
                self.outputs["grid"] = str(path)


# ---- helpers ----------------------------------------------------------------------------------

# Stand-ins for other adapters' triggers: one CLIP token each, none a demo trigger or a toy-world word.
STAND_IN_WORDS = ("bmc", "cdp", "dfs", "fgm", "gts", "hns", "jnr", "khs", "ldr", "mkt", "mnf", "bpd")


def stand_in_prompts(captions: list[str], trigger: str, n: int) -> list[str]:
    """Up to ``n`` prior prompts: instance captions with a stand-in word (``STAND_IN_WORDS``) where the
    trigger stands, "a small red sks shape" -> "a small red bmc shape". The base model draws them, so
    the adapter learns that only its own trigger calls its concept up; without them a composed object
    adapter draws its concept for every "… shape" it is shown (docs/benchmark.md, session 14)."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])")
    with_trigger = list(dict.fromkeys(c for c in captions if pattern.search(c)))
    out: list[str] = []
    for i in range(n if with_trigger else 0):
        word = STAND_IN_WORDS[i % len(STAND_IN_WORDS)]
        prompt = pattern.sub(word, with_trigger[i % len(with_trigger)])
        if prompt not in out:
            out.append(prompt)
    return out


def _cast(adapter: Adapter, dtype: torch.dtype) -> Adapter:
    """A copy of ``adapter`` with its layers and token embeddings in ``dtype`` (for writing)."""
    return dataclasses.replace(
        adapter, layers={k: d.to(dtype=dtype) for k, d in adapter.layers.items()},
        embeddings={t: {c: v.to(dtype) for c, v in per.items()} for t, per in adapter.embeddings.items()},
    )


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:40]


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def _tqdm(it, desc: str, enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not enabled, **kw)


def train_adapter(studio_or_pipe, config: TrainConfig | dict | None = None, **overrides) -> Adapter:
    """DreamBooth-train an adapter on a ``Studio`` (or a bare SD/SDXL pipeline) and return it.

    ``config`` is a ``TrainConfig`` or a dict of its fields; keyword overrides win. When
    ``config.out`` is set the adapter file, checkpoints and samples are written too.
    """
    from studio.studio import Studio

    if isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    else:
        cfg = TrainConfig(**{**(config or {}), **overrides})
    studio = studio_or_pipe if isinstance(studio_or_pipe, Studio) else Studio.from_pipeline(studio_or_pipe)
    return DreamBoothTrainer(studio, cfg).run()


# ---- CLI --------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    from studio.studio import Studio

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = TrainConfig(
        images=args.images, out=args.out, trigger=args.trigger, class_word=args.class_word,
        instance_prompt=args.instance_prompt, concept_kind=args.kind, name=args.name, adapter=args.adapter,
        rank=args.rank, unet_targets=args.unet_targets, alpha=args.alpha, factors=args.factors or "krona-paper",
        train_text_encoder=args.train_text_encoder,
        text_encoder_lr=args.text_encoder_lr,
        train_token_embedding=args.train_token_embedding, token_embedding_lr=args.token_embedding_lr,
        steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        resolution=args.resolution, prior_preservation=args.prior_preservation, class_prompts=args.class_prompt or [],
        class_dir=args.class_dir, num_class_images=args.num_class_images, prior_loss_weight=args.prior_loss_weight,
        stand_in_prior=args.stand_in_prior,
        snr_gamma=args.snr_gamma, attention_loss=args.attention_loss, attention_factor=args.attention_factor,
        caption_dropout=args.caption_dropout, caption_dropout_scope=args.caption_dropout_scope,
        instance_max_timestep=args.instance_max_timestep, instance_min_timestep=args.instance_min_timestep,
        attention_words=args.attention_words, mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, resume=args.resume, validate_every=args.validate_every,
        validation_prompts=args.validation_prompt or [], num_validation_images=args.num_validation_images,
        sample_steps=args.sample_steps, output_dir=args.output_dir, format=args.format, seed=args.seed,
        skip_bad_images=not args.strict_images, save_dtype=args.save_dtype, svd_lora_rank=args.svd_lora_rank,
    )
    from studio.cli import check_writable

    check_writable(cfg.out)  # before the base model is loaded or a step is trained
    studio = Studio.load(args.model)
    adapter = train_adapter(studio, cfg)
    from accelerate.state import PartialState

    state = PartialState()
    if state.is_main_process:
        print(f"{cfg.out}  {adapter.kind}  {len(adapter.layers)} layers  {adapter.num_params():,} params  "
              f"({state.num_processes} process{'es' if state.num_processes > 1 else ''})")
    return 0


def add_cli(subparsers) -> None:
    """Register ``studio train``."""
    t = subparsers.add_parser("train", help="DreamBooth-train a LoRA or Kronecker adapter")
    t.add_argument("--images", required=True, help="folder of instance images (optional NAME.txt captions)")
    t.add_argument("--trigger", default="sks", help="rare token that names the concept in prompts")
    t.add_argument("--class-word", default="object", help="what the trigger is: shape, dog, style…")
    t.add_argument("--instance-prompt", default=None, help="default: 'a TRIGGER CLASS-WORD'")
    t.add_argument("--kind", default="object", choices=["object", "style", "background", "character"], help="what kind of concept (composers use it)")
    t.add_argument("--name", default=None, help="adapter name (default: the --out file stem)")
    t.add_argument("--adapter", default="lora", choices=["lora", "kron"], help="LoRA or Kronecker (LoKr) adapter")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank")
    t.add_argument("--unet-targets", default="attention", choices=list(UNET_TARGETS),
                   help="UNet layers the adapter sits on: every attention projection (default), cross-attention only, "
                        "its keys/values only (Custom Diffusion), or the attention projections plus the ResNet "
                        "convolutions (attention+conv, LyCORIS' LoCon reach; LoKr conv layers for kron). Pair cross/cross-kv with --train-token-embedding: "
                        "alone they barely bind the trigger (README, Training, has what each measured)")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha/rank (default: alpha = rank)")
    t.add_argument("--factors", default=None, help=f"kron: A1xA2 or {'/'.join(kronlib.PRESETS)} (default krona-paper)")
    t.add_argument("--train-text-encoder", action="store_true",
                   help="train the adapter on the text encoder(s) too (LoRA of --rank or Kronecker of --factors, "
                        "at --text-encoder-lr); binds the trigger more firmly but changes how every prompt is encoded")
    t.add_argument("--text-encoder-lr", type=float, default=5e-6, help="learning rate of the text-encoder side")
    t.add_argument("--train-token-embedding", action="store_true",
                   help="pivotal tuning: also learn the trigger's input embedding (stored in the adapter; trigger must be one token)")
    t.add_argument("--token-embedding-lr", type=float, default=5e-3, help="learning rate of the trigger's embedding")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps")
    t.add_argument("--lr", type=float, default=None, help="default 1e-4 (lora) / 1e-3 (kron)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    t.add_argument("--batch-size", type=int, default=1, help="examples per forward pass")
    t.add_argument("--grad-accum", type=int, default=4, help="gradient-accumulation passes per optimizer step")
    t.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's native size)")
    t.add_argument("--prior-preservation", action="store_true", help="also train on class images to keep the class word's meaning")
    t.add_argument("--class-prompt", action="append", help="repeatable; default 'a CLASS-WORD'")
    t.add_argument("--class-dir", default=None, help="folder of class images (default: generated into OUTPUT-DIR/class)")
    t.add_argument("--num-class-images", type=int, default=100, help="class images to use or generate")
    t.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class images' loss")
    t.add_argument("--stand-in-prior", type=int, default=0, metavar="N",
                   help="add N prior prompts that are instance captions with an unknown word where the trigger "
                        "stands, so the adapter answers only its own trigger (implies --prior-preservation; what it "
                        "measured on composed pairs: README, --stand-in-prior)")
    t.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting gamma, e.g. 5 (default: off)")
    t.add_argument("--attention-loss", type=float, default=0.0,
                   help="weight of Break-A-Scene's cross-attention loss, e.g. 0.1: the trigger's attention is pulled onto "
                        "each instance image's concept mask (IMAGES/masks/<name>.png, white where the concept is); 0: off")
    t.add_argument("--attention-factor", type=int, default=0,
                   help="image pixels per attention-map cell of that loss (0: the level CLoRA's masks read)")
    t.add_argument("--attention-words", default="trigger+word", choices=["trigger+word", "trigger"],
                   help="the tokens that loss pulls: the trigger and the word after it (default), or the trigger alone")
    t.add_argument("--caption-dropout", type=float, default=0.0, help="share of examples trained with the empty caption")
    t.add_argument("--caption-dropout-scope", default="all", choices=["all", "prior"],
                   help="prior: drop only the class images' captions (keeps the unconditional branch)")
    t.add_argument("--instance-max-timestep", type=int, default=None, metavar="T",
                   help="noise the instance images only below timestep T of 1000 (prior images everywhere): a "
                        "style or fill learnt on outlines already drawn (README, --instance-max-timestep)")
    t.add_argument("--instance-min-timestep", type=int, default=None, metavar="T",
                   help="noise the instance images only from timestep T of 1000 up (prior images everywhere): an "
                        "object learnt where its outline is decided (README, --instance-min-timestep)")
    t.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate mixed precision")
    t.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    t.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps (0 = never)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, help="latest (default) or a checkpoint folder")
    t.add_argument("--validate-every", type=int, default=0, help="render validation samples every N steps (0 = never)")
    t.add_argument("--validation-prompt", action="append", help="prompt of the validation samples, repeatable (default: the instance prompt)")
    t.add_argument("--num-validation-images", type=int, default=4, help="validation images per prompt")
    t.add_argument("--sample-steps", type=int, default=25, help="denoising steps of validation samples")
    t.add_argument("--output-dir", default=None, help="checkpoints and samples (default OUT-train/)")
    t.add_argument("--format", default=None, choices=["kohya", "diffusers", "lokr"], help="default kohya (lora) / lokr (kron)")
    t.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="dtype of the written adapter")
    t.add_argument("--svd-lora-rank", type=int, default=0, help="kron: also write an SVD-converted plain LoRA of this rank")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--strict-images", action="store_true", help="stop at an unreadable image instead of skipping it")
    t.add_argument("--model", default=None, help="base model folder or hub id (default: bundled toy model)")
    t.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    t.set_defaults(func=_cmd_train)
