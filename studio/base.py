"""Base pipelines: load them, recognise their architecture, pick device and dtype, schedulers.

Accepted bases are diffusers ``StableDiffusionPipeline`` (SD1.x, SD2.x, the bundled toy model)
and ``StableDiffusionXLPipeline``. ``build_tiny_pipeline`` makes random-weight pipelines of both
architectures from configs, for tests and for running before the toy model exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .clip_tokenizer import build_clip_tokenizer
from .errors import GenerationError, ModelLoadError
from .resources import toy_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL_DIR = toy_model_dir()  # checkout or installed package data (studio/resources.py)

_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

# our short name -> (A1111 sampler label, diffusers scheduler class, config overrides).
# A1111's "… Karras" samplers are the same solvers on Karras et al.'s sigma schedule.
SAMPLERS = {
    "ddim": ("DDIM", DDIMScheduler, {}),
    "euler": ("Euler", EulerDiscreteScheduler, {}),
    "euler_a": ("Euler a", EulerAncestralDiscreteScheduler, {}),
    "euler_karras": ("Euler Karras", EulerDiscreteScheduler, _KARRAS),
    "dpm++2m": ("DPM++ 2M", DPMSolverMultistepScheduler, _DPMPP),
    "dpm++2m_karras": ("DPM++ 2M Karras", DPMSolverMultistepScheduler, _DPMPP | _KARRAS),
    "dpm++2m_sde": ("DPM++ 2M SDE", DPMSolverMultistepScheduler, _DPMPP | {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m_sde_karras": ("DPM++ 2M SDE Karras", DPMSolverMultistepScheduler,
                           _DPMPP | {"algorithm_type": "sde-dpmsolver++"} | _KARRAS),
    "heun": ("Heun", HeunDiscreteScheduler, {}),
    "lms": ("LMS", LMSDiscreteScheduler, {}),
    "lms_karras": ("LMS Karras", LMSDiscreteScheduler, _KARRAS),
    "unipc": ("UniPC", UniPCMultistepScheduler, {}),
}
SCHEDULERS = SAMPLERS  # older name, kept for scripts
_BY_LABEL = {label.lower(): key for key, (label, _, _) in SAMPLERS.items()}


def resolve_sampler(name: str, schedule: str | None = None) -> str:
    """Our short name for a sampler given as a short name or an A1111 label ("DPM++ 2M Karras",
    "Euler a"), optionally with A1111 1.6+'s separate ``Schedule type`` ("Karras")."""
    text = str(name).strip()
    key = text if text in SAMPLERS else _BY_LABEL.get(text.lower())
    if key and schedule and schedule.strip().lower() == "karras" and not key.endswith("_karras"):
        key = key + "_karras" if key + "_karras" in SAMPLERS else None
    if key is None:
        labels = ", ".join(f"{k} ({v[0]})" for k, v in SAMPLERS.items())
        raise GenerationError(f"unknown sampler {name!r}{f' with schedule {schedule!r}' if schedule else ''}; "
                              f"choose one of {labels}")
    return key


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when present, else CPU in fp32 (fp16 on CPU is slow and imprecise)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def detect_arch(pipe: DiffusionPipeline) -> str:
    """``sdxl``, ``sd2`` or ``sd1`` from the pipeline's components (the toy model is SD1-shaped)."""
    if getattr(pipe, "text_encoder_2", None) is not None or isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if pipe.unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def make_scheduler(pipe: DiffusionPipeline, name: str):
    """A fresh scheduler of the given kind for one generation (schedulers carry state)."""
    label, cls, overrides = SAMPLERS[resolve_sampler(name)]
    config = dict(pipe.scheduler.config)
    config.update(overrides)
    return cls.from_config(config)


def sampler_label(name: str) -> str:
    """The A1111 label of a sampler ("dpm++2m_karras" -> "DPM++ 2M Karras")."""
    return SAMPLERS[resolve_sampler(name)][0]


def load_pipeline(source: str | os.PathLike, device=None, dtype=None) -> DiffusionPipeline:
    """Load SD1.x/2.x/SDXL from a local diffusers folder, a single-file checkpoint, or a hub id."""
    default_device, default_dtype = pick_device()
    device, dtype = device or default_device, dtype or default_dtype
    source = str(source)
    path = Path(source)
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{source} is not a diffusers pipeline folder (no model_index.json); "
                    "pass a folder saved with save_pretrained, or a .safetensors checkpoint file"
                )
            cls_name = json.loads((path / "model_index.json").read_text())["_class_name"]
            cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
            pipe = cls.from_pretrained(source, dtype=dtype, safety_checker=None, requires_safety_checker=False) \
                if cls is StableDiffusionPipeline else cls.from_pretrained(source, dtype=dtype)
        elif path.suffix == ".safetensors" and path.is_file():
            pipe = StableDiffusionPipeline.from_single_file(source, dtype=dtype)
        elif path.exists() or source.startswith((".", "/")):
            raise ModelLoadError(f"model {source} not found or not a folder/.safetensors file; check the path")
        else:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype)
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(
            f"could not load {source!r} ({str(e).splitlines()[0][:200]}); offline, the hub is unreachable: "
            "pass a local diffusers folder (save_pretrained) instead"
        ) from e
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelLoadError(f"{source} is a {type(pipe).__name__}; only Stable Diffusion 1.x/2.x/XL pipelines are supported")
    return pipe.to(device)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_text_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=32, **kw,
    )


def build_tiny_pipeline(arch: str = "sd1", seed: int = 0) -> DiffusionPipeline:
    """A random-weight pipeline with SD1.5's or SDXL's block structure and tiny widths.

    Module names match the real models (``down_blocks.1.attentions.0…to_q``), so adapter files
    made for them map onto it; only the widths differ. Runs at 64×64 in well under a second.
    """
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    if arch == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        return StableDiffusionPipeline(
            vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_text_config()), tokenizer=build_clip_tokenizer(),
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if arch == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
        )
        return StableDiffusionXLPipeline(
            vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config()),
            tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(), unet=unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose sd1 or sdxl")


def model_hash(pipe: DiffusionPipeline, source: str | os.PathLike | None = None) -> str:
    """A1111's ``Model hash``: the first 10 hex digits of SHA-256 over the checkpoint file.

    A diffusers folder has no single checkpoint, so its UNet weight files are hashed (in name
    order); a pipeline with neither (built in memory, or from the hub cache) hashes its UNet's
    tensors in state-dict order. All three stay the same across runs and devices.
    """
    import hashlib

    h = hashlib.sha256()
    path = Path(source) if source is not None else None
    files: list[Path] = []
    if path is not None and path.is_file():
        files = [path]
    elif path is not None and path.is_dir():
        files = sorted(p for p in (path / "unet").glob("*") if p.suffix in (".safetensors", ".bin"))
    if files:
        for file in files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    else:
        for name, tensor in pipe.unet.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def module_shapes(pipe: DiffusionPipeline) -> dict[str, tuple[int, ...]]:
    """Weight shapes of every Linear/Conv2d an adapter may target, keyed by component path."""
    shapes = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes[f"{comp}.{name}"] = tuple(mod.weight.shape)
    return shapes
