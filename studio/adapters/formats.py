"""Adapter files: read, detect, validate, write and describe.

Formats (detected from the tensor names, never from the file name):

* ``diffusers``: what ``save_lora_weights`` writes: ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight`` (alphas in the ``lora_adapter_metadata`` header entry, a LoraConfig dict per
  component), and the older ``<module>.lora.down/up.weight``, ``lora_linear_layer.down/up`` and
  attention-processor ``to_q_lora.down`` spellings.
  Written so that ComfyUI maps every module too (``_build_diffusers``: attention-processor
  spelling for UNet attention, alpha folded into the up weights).
* ``peft``: ``get_peft_model_state_dict`` output, ``[base_model.model.]<module>.lora_A.weight``,
  one model per file (UNet unless the names are a text encoder's), alphas from a sibling
  ``adapter_config.json``. Written as ``PeftModel.from_pretrained`` reads it (a folder with
  ``adapter_config.json``); diffusers' ``load_lora_weights`` does not read it (no ``unet.`` keys).
* ``kohya``: A1111 / sd-scripts, ``lora_unet_<module_with_underscores>.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, SDXL's SGM block
  names (``input_blocks_4_1_…``), conv LoRA with 4-D weights.
* ``lokr``: LyCORIS LoKr, ``<kohya name>.lokr_w1`` / ``lokr_w2`` or the ``_a``/``_b`` low-rank
  pieces (Tucker ``lokr_t2`` too), and ``.alpha``.
* ``loha`` (read only): LyCORIS LoHa, ``hada_w1_a/_b``, ``hada_w2_a/_b`` (Tucker ``hada_t1/_t2``).
* DoRA (read only, in any of the above): ``dora_scale`` (LyCORIS) or ``lora_magnitude_vector`` (PEFT)
  wraps the module's layer in a ``DoraDelta``.

Trained token embeddings (pivotal tuning) travel in kohya and LoKr files as A1111's bundled
embeddings: ``bundle_emb.<token>.string_to_param.*`` (one text encoder: SD1/SD2) or
``bundle_emb.<token>.clip_l`` / ``.clip_g`` (SDXL's two encoders), each (n_vectors, hidden).
diffusers and PEFT files have no place for them, so writing an adapter with embeddings in those
formats is refused with an error naming kohya/lokr. (diffusers' own ``load_lora_weights`` refuses
kohya files that carry ``bundle_emb`` keys; A1111 reads them.)

Scales: ΔW = alpha / rank · up @ down for LoRA (alpha missing means alpha = rank). LoKr follows
LyCORIS: ΔW = kron(w1, w2) · alpha / rank when a factor is low-rank (rank = the ``_b`` piece's
first dim), and exactly kron(w1, w2) when both factors are full (alpha then ignored).

Safety: ``.safetensors`` only through safetensors; pickle files (``.ckpt .pt .bin .pth``) only
with ``allow_pickle=True`` and then through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Mapping

import torch

from ..atomic import atomic_path, write_atomic
from ..errors import AdapterFileError, AdapterMismatchError
from .adapter import COMPONENTS, Adapter, DoraDelta, HadaDelta, KronDelta, LoraDelta

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "peft", "kohya", "lokr")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
ARCHS = ("sd1", "sd2", "sdxl", "toy")
KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("lycoris_", "unet"),
)
_TE_TOP = ("embeddings", "encoder", "final_layer_norm")  # children of CLIP's text_model
_SGM = ("input_blocks", "middle_block", "output_blocks")
_LOKR_PIECES = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
_HADA_PIECES = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
_EMB_PARTS = {"string_to_param": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_DIR_CANDIDATES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
_OLD_PROJ = {  # attention-processor era names -> module names, per component family
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "te": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_STALE_KEYS = ("format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash",
               "modelspec.hash_sha256", "studio_lokr_kernels", "studio_component")

# tensor-name tails -> (role, piece); the module part is the regex group "m"
_KEY_RULES = [
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[\w-]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lokr_(?P<k>w1|w1_a|w1_b|w2|w2_a|w2_b|t2)$"), "lokr"),
    (re.compile(r"^(?P<m>.+)\.hada_(?P<k>w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "loha"),
    (re.compile(r"^(?P<m>.+)\.dora_scale$"), "dora"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$"), "dora"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
_UNSUPPORTED = [
    (re.compile(r"\.lora_mid\.weight$"), "is a LoCon with Tucker factors (lora_mid), which is not supported yet; "
     "retrain without use_tucker or use a plain LoRA"),
    (re.compile(r"\.(lora_B(\.[\w-]+)?|lora_up)\.bias$"), "has LoRA bias tensors, which are not supported; "
     "retrain with lora_bias=False"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R|oft_r)(\.weight)?$"), "is an OFT/BOFT adapter, which is not supported; "
     "use a LoRA or LoKr adapter"),
]


# --------------------------------------------------------------------------------------------
# public API


def read_adapter(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    allow_pickle: bool = False,
    module_names: Iterable[str] | Mapping[str, tuple[int, ...]] | None = None,
) -> Adapter:
    """Read an adapter file (or a PEFT/diffusers folder) of any supported format.

    ``module_names``: the base model's canonical module paths (``unet.…``, ``text_encoder.…``);
    kohya/LyCORIS underscore names are then mapped exactly and text-encoder paths follow the
    model's own layout. Passing the ``{path: weight shape}`` dict of ``base.module_shapes`` also
    lets LyCORIS conv factors and linear-vs-1×1-conv LoRA layouts take the base module's shape.
    """
    file = _resolve_path(Path(path))
    tensors, header, sha = _load_tensors(file, allow_pickle)
    if not tensors:
        raise AdapterFileError(f"{file.name} contains no tensors; re-export the adapter")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(
                f"{file.name}: tensor {_key(key)} contains NaN or infinite values; the adapter is broken "
                "(diverged training or a corrupt file): use an earlier checkpoint or retrain"
            )
        if t.numel() and not key.endswith(".alpha") and float(t.detach().abs().max()) > MAX_ABS_WEIGHT:
            raise AdapterFileError(
                f"{file.name}: tensor {_key(key)} has values up to {float(t.detach().abs().max()):.3g} (|w| > {MAX_ABS_WEIGHT:g}); "
                "the adapter is broken or hostile: use an earlier checkpoint or retrain"
            )
    names = _Names(module_names)
    embeddings = _read_bundle_embeddings(file, tensors)
    rest = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    if rest or not embeddings:
        fmt, layers = _parse(file, rest or tensors, header, names)
    else:  # only bundled embeddings: a pivotal-tuning file without weight deltas
        fmt, layers = "kohya", {}
    if not layers and not embeddings:
        raise AdapterFileError(f"{file.name} has no adapter layers; re-export the adapter")

    card = _read_card(file)
    metadata = dict(header)
    metadata.update({f"card.{k}": str(v) for k, v in card.items() if v not in (None, "")})
    adapter = Adapter(
        name=name or header.get("ss_output_name") or _default_name(file),
        layers=layers,
        kind="kron" if any(isinstance(d, KronDelta) for d in layers.values()) else "lora",
        format=fmt,
        path=str(file),
        sha256=(header.get("sshs_model_hash") or sha).lower(),
        metadata=metadata,
        embeddings=embeddings,
    )
    _fill_from_metadata(adapter)
    adapter.arch = guess_arch(adapter)
    return adapter


def guess_arch(adapter: Adapter) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` (or the ``toy`` model) from metadata, else from names and shapes."""
    declared = _arch_from_metadata(adapter.metadata)
    if declared:
        return declared
    comps = adapter.components()
    if "text_encoder_2" in comps:
        return "sdxl"
    cross = {d.weight_shape[1] for p, d in adapter.layers.items()
             if p.startswith("unet.") and p.endswith(("attn2.to_k", "attn2.to_v"))}
    by_dim = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    for dim, arch in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if dim in cross:
            return by_dim[dim]
    unet = [p for p in adapter.layers if p.startswith("unet.")]
    if any(re.search(r"\.transformer_blocks\.[1-9]", p) or ".add_embedding." in p for p in unet):
        return "sdxl"  # SD1/SD2 have a single transformer block per attention; SDXL has 2 or 10
    te = {d.weight_shape[1] for p, d in adapter.layers.items()
          if p.startswith("text_encoder.") and p.endswith("self_attn.q_proj")}
    if 1024 in te:
        return "sd2"
    if 768 in te and not unet:
        return "sd1"
    return None


def validate_adapter(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], arch: str) -> None:
    """Check every layer against the base's module shapes; raise AdapterMismatchError on the first misfit."""
    bad = []
    for module, delta in adapter.layers.items():
        got = tuple(delta.weight_shape)
        want = shapes.get(module)
        if want is None or tuple(want) != got:
            bad.append((module, None if want is None else tuple(want), got))
    for token, per_comp in adapter.embeddings.items():
        for comp, vec in per_comp.items():
            hidden = {s[1] for m, s in shapes.items() if m.startswith(f"{comp}.") and m.endswith("self_attn.q_proj")}
            if not hidden:
                raise AdapterMismatchError(
                    f"adapter {adapter.name!r} has a token embedding for {token!r} on {comp}, which the {arch} base "
                    "model does not have; use an adapter made for this base model"
                )
            if vec.shape[-1] not in hidden:
                raise AdapterMismatchError(
                    f"adapter {adapter.name!r} has a {vec.shape[-1]}-wide token embedding for {token!r} but {comp} of "
                    f"the {arch} base model is {min(hidden)} wide; use an adapter made for this base model"
                )
    if not bad:
        return
    module, want, got = bad[0]
    if want is None:
        problem = f"adapter {adapter.name!r} targets {module}, which the {arch} base model does not have"
    else:
        problem = (f"adapter {adapter.name!r} does not fit the {arch} base model: {module} has weight shape "
                   f"{_fmt_shape(want)} but the adapter's delta is {_fmt_shape(got)}")
    count = f"{len(bad)} of {len(adapter.layers)} modules do not fit"
    if adapter.arch and arch and adapter.arch != arch:
        fix = (f"the adapter was made for {adapter.arch} but the base model is {arch}: load {_an(adapter.arch)} "
               f"base model or use an adapter made for {arch}")
    elif "toy" in (adapter.arch, arch):
        fix = ("it was made for another build of the toy world: rebuild the demo adapters with "
               "`python -m training.demo_adapters`, or retrain yours on this model (`studio train`)")
    else:
        fix = f"use an adapter trained for this base model ({arch})"
    raise AdapterMismatchError(f"{problem} ({count}); {fix}")


def write_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    format: str = "diffusers",
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``adapter`` atomically as ``format`` (diffusers, kohya, peft or lokr); returns the file."""
    if format not in FORMATS:
        raise AdapterFileError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    config_path = None
    if format == "peft" and (path.is_dir() or path.suffix == ""):
        path, config_path = path / "adapter_model.safetensors", path / "adapter_config.json"
    elif format == "peft":
        config_path = path.parent / "adapter_config.json"
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"adapters are written as .safetensors; give a path ending in .safetensors, not {path.name}")
    if not adapter.layers and not adapter.embeddings:
        raise AdapterFileError(f"adapter {adapter.name!r} has no layers; nothing to write")
    if adapter.embeddings and format not in ("kohya", "lokr"):
        raise AdapterFileError(
            f"adapter {adapter.name!r} carries a trained token embedding for {', '.join(map(repr, adapter.embeddings))}, "
            f"which {format} files cannot hold; write it with format='kohya' (or 'lokr')"
        )
    if not adapter.is_finite():
        raise AdapterFileError(f"adapter {adapter.name!r} contains NaN or inf values; retrain or fix it before saving")
    other = [(m, d) for m, d in adapter.layers.items() if isinstance(d, (HadaDelta, DoraDelta))]
    if other:
        what = "LoHa" if isinstance(other[0][1], HadaDelta) else "DoRA"
        raise AdapterFileError(
            f"adapter {adapter.name!r} has {what} layers (e.g. {other[0][0]}), which the studio reads but does not "
            "write; keep the original file, or merge it into a plain LoRA with `studio merge --method svd` "
            "(LoHa; DoRA needs the base weights)"
        )
    kron = [m for m, d in adapter.layers.items() if isinstance(d, KronDelta)]
    if kron and format != "lokr":
        raise AdapterFileError(
            f"adapter {adapter.name!r} has Kronecker layers (e.g. {kron[0]}), which {format} files cannot hold; "
            "write it with format='lokr'"
        )
    extra: dict[str, str] = {}
    peft_config = None
    if format == "diffusers":
        tensors, configs = _build_diffusers(adapter)
        extra["lora_adapter_metadata"] = _pack_configs(configs)
    elif format == "peft":
        tensors, peft_config, comp = _build_peft(adapter)
        extra["lora_adapter_metadata"] = _pack_configs({comp: peft_config})
        extra["studio_component"] = comp
    else:
        tensors, kernels = _build_kohya(adapter)
        tensors.update(_bundle_embeddings(adapter))
        if kernels:
            extra["studio_lokr_kernels"] = json.dumps(kernels, sort_keys=True)
    header = _header_for(adapter, format, extra, metadata)
    _atomic_save(tensors, header, path)
    if config_path is not None:
        write_atomic(config_path, json.dumps(peft_config, indent=2, sort_keys=True))
    return path


def describe(adapter: Adapter) -> dict:
    """What ``studio info FILE`` prints: format, type, ranks/factors, targets, arch, triggers, hash, metadata."""
    plain = [d.inner if isinstance(d, DoraDelta) else d for d in adapter.layers.values()]
    loras = [d for d in plain if isinstance(d, LoraDelta)]
    krons = [d for d in plain if isinstance(d, KronDelta)]
    hadas = [d for d in plain if isinstance(d, HadaDelta)]
    doras = sum(isinstance(d, DoraDelta) for d in adapter.layers.values())
    names = [n for n, group in (("LoRA", loras), ("LoKr (Kronecker)", krons), ("LoHa (Hadamard)", hadas)) if group]
    if any(d.t2 is not None for d in krons) or any(d.t1 is not None for d in hadas):
        names = [n + " with Tucker factors" if n.startswith(("LoKr", "LoHa")) else n for n in names]
    kind = " + ".join(names) or "none"
    if doras:
        kind = f"DoRA ({kind})" if doras == len(plain) else f"{kind}, {doras} modules DoRA"
    per_comp = Counter(m.split(".", 1)[0] for m in adapter.layers)
    info: dict = {
        "name": adapter.name,
        "file": adapter.path,
        "format": adapter.format,
        "type": kind,
    }
    if loras:
        info["ranks"] = sorted({d.rank for d in loras})
        info["alphas"] = sorted({float(d.alpha) if d.alpha is not None else float(d.rank) for d in loras})
    if hadas:
        info["loha_ranks"] = sorted({d.rank for d in hadas})
    if krons:
        info["kron_factors"] = [list(f) for f in adapter.kron_factors()]
        low = sorted({t.shape[0] for d in krons for t in (d.w1_b, d.w2_b) if t is not None})
        if low:
            info["kron_low_rank"] = low
    info["modules"] = sum(per_comp.values())
    info["modules_per_component"] = {c: per_comp[c] for c in COMPONENTS if per_comp[c]}
    info["conv_modules"] = sum(1 for d in adapter.layers.values() if d.is_conv)
    info["params"] = adapter.num_params()
    info["arch"] = adapter.arch
    info["arch_guess"] = guess_arch(adapter)
    info["trigger"] = adapter.trigger
    if adapter.embeddings:
        info["token_embeddings"] = {t: {c: list(v.shape) for c, v in per.items()} for t, per in adapter.embeddings.items()}
    if adapter.concept or adapter.concept_kind:
        info["concept"] = adapter.concept
        info["concept_kind"] = adapter.concept_kind
    info["preferred_weight"] = adapter.weight
    tags = _tag_counts(adapter.metadata)
    if tags:
        info["top_tags"] = [t for t, _ in tags.most_common(10)]
    info["sha256"] = adapter.sha256
    info["shorthash"] = adapter.shorthash
    info["metadata"] = {k: v for k, v in sorted(adapter.metadata.items())
                        if not k.startswith("studio_") and k not in ("format", "ss_tag_frequency",
                                                                     "lora_adapter_metadata")}
    return info


def addnet_hash(path: str | os.PathLike) -> str:
    """A1111's "addnet" SHA-256: the bytes after the safetensors header (the whole file otherwise).

    A ``sshs_model_hash`` entry in the header wins, as in A1111.
    """
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            try:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > path.stat().st_size - 8:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n) or b"{}")
                meta = header.get("__metadata__") if isinstance(header, dict) else None
                override = meta.get("sshs_model_hash") if isinstance(meta, dict) else None
            except (ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:
                raise AdapterFileError(f"{path.name} is truncated or not a safetensors file ({_first_line(e)}); "
                                       "re-download or re-export it") from None
            if override:
                return str(override).lower()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_format(keys: Iterable[str]) -> str | None:
    """``diffusers`` / ``peft`` / ``kohya`` / ``lokr`` from tensor names, or None."""
    keys = list(keys)
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(".hada_" in k for k in keys):
        return "loha"
    parsed = [(k, _split_key(k)) for k in keys]
    mods = [p[0] for k, p in parsed if p and p[1] != "alpha"]
    if not mods:
        return None
    if all(_kohya_component(m) for m in mods):
        return "kohya"
    if any(m.startswith("base_model.model.") for m in mods):
        return "peft"
    if any(m.split(".", 1)[0] in COMPONENTS for m in mods):
        return "diffusers"
    if any(p[1] in ("down", "up") and (".lora_A" in k or ".lora_B" in k) for k, p in parsed if p):
        return "peft"
    return "diffusers"


# --------------------------------------------------------------------------------------------
# loading


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        for cand in _DIR_CANDIDATES:
            if (path / cand).is_file():
                return path / cand
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise AdapterFileError(
            f"folder {path} holds {len(found)} .safetensors files and no adapter_model.safetensors; "
            "pass the adapter file itself"
        )
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} not found; check the path (and that it is a file)")
    return path


def _load_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path, allow_pickle)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path.name} is truncated or not a safetensors file ({size} bytes); "
                                   "re-download or re-export it")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100_000_000:
            raise AdapterFileError(f"{path.name} is truncated or not a safetensors file (header of {n} bytes in a "
                                   f"{size}-byte file); re-download or re-export it as .safetensors")
        try:
            hdr = json.loads(f.read(n).decode("utf-8"))
            if not isinstance(hdr, dict):
                raise ValueError("header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in hdr.items() if k != "__metadata__"), default=0)
            dtypes = {k: str(v["dtype"]) for k, v in hdr.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, RecursionError) as e:
            raise AdapterFileError(f"{path.name} is corrupt: its safetensors header cannot be read ({_first_line(e)}); "
                                   "re-download or re-export it") from None
    _check_counts(path, len(dtypes), size)
    for key, dtype in dtypes.items():
        _check_dtype(path, key, dtype)
    if 8 + n + end > size:
        raise AdapterFileError(f"{path.name} is truncated: the header promises {end} bytes of tensors but only "
                               f"{size - 8 - n} are there; re-download or re-export it")
    meta = hdr.get("__metadata__") or {}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    try:
        from safetensors.torch import load, load_file

        try:
            str(path).encode("utf-8")
            tensors = load_file(str(path), device="cpu")
        except UnicodeEncodeError:  # a legal file name that is not UTF-8: safetensors takes only UTF-8 paths
            tensors = load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise AdapterFileError(f"{path.name} is corrupt and safetensors cannot read it ({_first_line(e)}); "
                               "re-download or re-export it") from None
    return tensors, meta, addnet_hash(path)


def _load_pickle(path: Path, allow_pickle: bool):
    if not allow_pickle:
        raise AdapterFileError(
            f"{path.name} is a pickle file ({path.suffix}), which can run code when opened; convert it to "
            ".safetensors, or if you trust it pass allow_pickle=True (CLI: --allow-pickle) to load its tensors "
            "with weights_only=True"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFileError(
            f"{path.name} cannot be loaded safely: weights_only=True refused it ({_first_line(e)}); "
            "convert it to .safetensors with a tool you trust"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{path.name} holds a {type(obj).__name__}, not a dict of tensors; "
                               "re-export the adapter as .safetensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    _check_counts(path, len(tensors), path.stat().st_size)
    for key, t in tensors.items():
        _check_dtype(path, key, _ST_DTYPE.get(t.dtype, str(t.dtype).replace("torch.", "")))
    return tensors, {}, addnet_hash(path)


# tensor dtypes an adapter may hold: floats; integer scalars only for ``alpha`` (some tools write it so)
_FLOAT_DTYPES = ("F16", "BF16", "F32")
_ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
MAX_ABS_WEIGHT = 1e4  # |w| above this is a broken or hostile adapter, not a trained one
MAX_ALPHA_PER_RANK = 1e3


def _check_counts(path: Path, count: int, size: int) -> None:
    """Refuse files over the tensor-count and size bounds before reading any tensor."""
    from ..schema import Limits, env_name

    limits = Limits.from_env()
    if count > limits.max_adapter_tensors:
        raise AdapterFileError(f"{path.name} holds {count} tensors, over the bound of {limits.max_adapter_tensors} "
                               f"({env_name('max_adapter_tensors')}=N raises it); an adapter has far fewer")
    if size > limits.max_adapter_bytes:
        raise AdapterFileError(f"{path.name} is {size} bytes, over the bound of {limits.max_adapter_bytes} "
                               f"({env_name('max_adapter_bytes')}=N raises it); is it a full model rather than an adapter?")


def _check_dtype(path: Path, key: str, dtype: str) -> None:
    """float16/bfloat16/float32 tensors (integer scalars for alpha); anything else is refused by name."""
    if dtype in _FLOAT_DTYPES or (key.endswith(".alpha") and dtype in ("I64", "I32", "I16", "F64")):
        return
    if dtype.startswith("F8"):
        raise AdapterFileError(f"{path.name}: tensor {_key(key)} is fp8 ({dtype}), which adapters are not read in; "
                               "convert the adapter to float16 or bfloat16 and load that")
    raise AdapterFileError(f"{path.name}: tensor {_key(key)} has dtype {dtype}; adapters hold float16, bfloat16 or "
                           "float32 tensors: re-export it in one of those")


def _read_card(file: Path) -> dict:
    """The A1111 card sidecar ``<stem>.json`` (description, sd version, activation text, preferred weight)."""
    side = file.with_suffix(".json")
    if not side.is_file() or side.name == "adapter_config.json":
        return {}
    try:
        card = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable LoRA card %s: %s", side, _first_line(e))
        return {}
    return card if isinstance(card, dict) else {}


def _default_name(file: Path) -> str:
    if file.name in _DIR_CANDIDATES:
        return file.parent.name or file.stem
    return file.stem


# --------------------------------------------------------------------------------------------
# key parsing and module names


def _split_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module part, role, piece)``: role is down / up / alpha / lokr; piece a LoKr piece or old proj."""
    for rx, role in _KEY_RULES:
        m = rx.match(key)
        if m:
            g = m.groupdict()
            return g["m"], role, g.get("k") or g.get("p")
    return None


def _kohya_component(module: str) -> str | None:
    for prefix, comp in KOHYA_PREFIXES:
        if module.startswith(prefix) and "." not in module:
            return comp
    return None


def _te_variants(rel: str) -> list[str]:
    """A text-encoder path with and without CLIP's ``text_model.`` level (transformers 5 flattens CLIPTextModel)."""
    if rel.startswith("text_model."):
        return [rel, rel[len("text_model."):]]
    if rel.split(".", 1)[0] in _TE_TOP:
        return [rel, "text_model." + rel]
    return [rel]


@functools.lru_cache(maxsize=None)
def _te_has_text_model(component: str) -> bool:
    """Whether this transformers' CLIP text model class nests its layers under ``text_model``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         vocab_size=8, max_position_embeddings=4, projection_dim=8,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return hasattr(cls(cfg), "text_model")


class _Names:
    """Maps the names found in files to our canonical module paths."""

    def __init__(self, module_names):
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.names: set[str] | None = None
        self.kohya: dict[str, str] = {}
        self.layers_per_block = 2  # SD1.x / SD2.x / SDXL
        if module_names is None:
            return
        if isinstance(module_names, Mapping):
            self.shapes = {k: tuple(v) for k, v in module_names.items()}
        self.names = set(module_names)
        prefixes = {"unet": ("lora_unet_", "lycoris_"), "text_encoder": ("lora_te_", "lora_te1_"),
                    "text_encoder_2": ("lora_te2_",)}
        resnets = set()
        for path in self.names:
            comp, _, rel = path.partition(".")
            if comp not in prefixes:
                continue
            for variant in (_te_variants(rel) if comp != "unet" else [rel]):
                for pre in prefixes[comp]:
                    self.kohya.setdefault(pre + variant.replace(".", "_"), path)
            m = re.match(r"down_blocks\.0\.resnets\.(\d+)\.", rel) if comp == "unet" else None
            if m:
                resnets.add(int(m.group(1)))
        if resnets:
            self.layers_per_block = max(resnets) + 1

    def dotted(self, comp: str, rel: str) -> str:
        if comp == "unet":
            return f"unet.{rel}"
        variants = _te_variants(rel)
        if self.names is not None:
            for v in variants:
                if f"{comp}.{v}" in self.names:
                    return f"{comp}.{v}"
            return f"{comp}.{rel}"
        want = _te_has_text_model(comp)
        for v in variants:
            if v.startswith("text_model.") == want or v.split(".", 1)[0] not in _TE_TOP + ("text_model",):
                return f"{comp}.{v}"
        return f"{comp}.{rel}"

    def kohya_names(self, names: Iterable[str]) -> dict[str, str]:
        """kohya / LyCORIS module names (``lora_unet_…``) -> canonical paths."""
        names = list(names)
        out: dict[str, str] = {}
        renamed = {n: n for n in names}
        sgm = [n for n in names if n.startswith("lora_unet_") and any(p in n for p in _SGM)]
        if sgm:
            from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

            try:
                mapped = _maybe_map_sgm_blocks_to_diffusers(
                    {n: n for n in sgm}, SimpleNamespace(layers_per_block=self.layers_per_block))
            except (ValueError, IndexError, KeyError) as e:
                raise AdapterFileError(f"SDXL block names in this file cannot be mapped ({_first_line(e)}); "
                                       "the file may be for another architecture") from None
            for new, old in mapped.items():
                renamed[old] = new
        for name in names:
            out[name] = self._kohya_one(name, renamed[name])
        return out

    def _kohya_one(self, original: str, name: str) -> str:
        comp = _kohya_component(original)
        if comp == "unet":
            plain = (name.replace("input_blocks", "down_blocks").replace("middle_block", "mid_block")
                     .replace("output_blocks", "up_blocks"))
            if plain in self.kohya:
                return self.kohya[plain]
        elif name in self.kohya:
            return self.kohya[name]
        # diffusers' own kohya rules (the ones load_lora_weights uses)
        from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key, _convert_unet_lora_key

        if comp == "unet":
            body = name[len("lycoris_"):] if name.startswith("lycoris_") else name[len("lora_unet_"):]
            m = re.fullmatch(r"add_embedding_linear_(\d)", body)  # not in diffusers' table
            if m:
                return self.dotted("unet", f"add_embedding.linear_{m.group(1)}")
            converted = _convert_unet_lora_key("lora_unet_" + body + ".lora_down.weight")
        else:
            prefix = next(p for p, c in KOHYA_PREFIXES if original.startswith(p))
            converted = _convert_text_encoder_lora_key(name + ".lora_down.weight", prefix)
        split = _split_key(converted)
        if split is None:
            return self.dotted(comp, converted)
        module, _, proj = split
        module = module.replace(".processor", "")
        if proj:
            module = f"{module}.{_OLD_PROJ['unet' if comp == 'unet' else 'te'][proj]}"
        return self.dotted(comp, module)


def _dotted_component(module: str, default: str | None) -> tuple[str, str]:
    module = module.removeprefix("base_model.model.")
    first, _, rest = module.partition(".")
    if first in COMPONENTS and rest:
        return first, rest
    if default in COMPONENTS:
        return default, module
    if module.startswith("text_model.") or module.split(".", 1)[0] in _TE_TOP:
        return "text_encoder", module
    return "unet", module


# --------------------------------------------------------------------------------------------
# parsing state dicts into layers


def _parse(file: Path, tensors: dict, header: dict, names: _Names):
    groups: dict[str, dict] = {}
    unknown, ignored = [], []
    for key in tensors:
        for rx, why in _UNSUPPORTED:
            if rx.search(key):
                raise AdapterFileError(f"{file.name} {why}")
        if key.startswith("bundle_emb."):
            ignored.append(key)
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, role, piece = split
        if role in ("down", "up") and piece:  # attention-processor era name: fold the projection in
            module = f"{module.replace('.processor', '')}.@{piece}"
        g = groups.setdefault(module, {})
        slot = f"{role}_{piece}" if role in ("lokr", "loha") else role
        g[slot] = key
    if ignored:
        log.warning("%s: ignoring %d bundled embedding tensors (bundle_emb.*)", file.name, len(ignored))
    real = {m: g for m, g in groups.items() if set(g) - {"alpha", "dora"}}
    if not real or unknown:
        sample = ", ".join((unknown or list(tensors))[:5])
        if not real:
            raise AdapterFileError(
                f"{file.name} is not an adapter of a known format (diffusers, PEFT, kohya/A1111, LyCORIS LoKr); "
                f"its keys look like: {sample}; pass a LoRA/LoKr adapter file (a full model checkpoint is loaded "
                "as the base model, not as an adapter)"
            )
        raise AdapterFileError(f"{file.name} has {len(unknown)} tensors of no known adapter format "
                               f"(e.g. {sample}); re-export it as a plain LoRA/LoKr file")
    orphan_alpha = [m for m, g in groups.items() if set(g) == {"alpha"}]
    if orphan_alpha:
        log.warning("%s: %d alpha values without weights ignored", file.name, len(orphan_alpha))

    fmt = detect_format(k for g in real.values() for k in g.values())
    default_comp = header.get("studio_component") or None
    configs = _unpack_configs(header.get("lora_adapter_metadata"))
    sibling = file.parent / "adapter_config.json"
    kohya_mods = [m for m in real if _kohya_component(m)]
    kohya_map = names.kohya_names(kohya_mods) if kohya_mods else {}
    kernels = _json_or_empty(header.get("studio_lokr_kernels"))

    layers = {}
    for module, g in real.items():
        proj = None
        if "@" in module:
            module, proj = module.split(".@")
        if module in kohya_map:
            path, rel_for_pattern = kohya_map[module], None
        else:
            comp, rel = _dotted_component(module, default_comp)
            if proj:
                rel = f"{rel}.{_OLD_PROJ['unet' if comp == 'unet' else 'te'][proj]}"
            path, rel_for_pattern = names.dotted(comp, rel), rel
        get = lambda slot: tensors[g[slot]] if slot in g else None  # noqa: E731
        alpha_t = get("alpha")
        alpha = float(alpha_t.float().item()) if alpha_t is not None else None
        algos = {slot.split("_", 1)[0] for slot in g if slot.startswith(("lokr_", "loha_"))} | (
            {"lora"} if "down" in g or "up" in g else set())
        if len(algos) > 1:
            raise AdapterFileError(f"{file.name}: module {module} mixes {' and '.join(sorted(algos))} tensors; "
                                   "re-export the adapter")
        if algos & {"lokr", "loha"}:
            if "lokr" in algos:
                delta = _lokr_layer(file, module, path, {p: get(f"lokr_{p}") for p in _LOKR_PIECES}, alpha, names, kernels)
            else:
                delta = _loha_layer(file, module, path, {p: get(f"loha_{p}") for p in _HADA_PIECES}, alpha, names, kernels)
            _once(file, layers, path, module)
            layers[path] = _with_dora(delta, get("dora"))
            continue
        down, up = get("down"), get("up")
        if down is None or up is None:
            have, miss = ("down", "up") if down is not None else ("up", "down")
            raise AdapterFileError(f"{file.name}: module {module} has a lora_{have} tensor but no lora_{miss}; "
                                   "the file is incomplete, re-export it")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or down.shape[0] != up.shape[1]:
            raise AdapterFileError(
                f"{file.name}: module {module} has inconsistent LoRA ranks (down {_fmt_shape(down.shape)}, "
                f"up {_fmt_shape(up.shape)}); the file is corrupt, re-export it"
            )
        if alpha is None and rel_for_pattern is not None:
            comp = path.split(".", 1)[0]
            cfg = configs.get(comp)
            if cfg is None and fmt == "peft" and sibling.is_file():
                cfg = _read_peft_config(sibling)
                configs[comp] = cfg
            if cfg:
                rels = _te_variants(rel_for_pattern) if comp != "unet" else [rel_for_pattern]
                alpha = _peft_alpha(cfg, rels, down.shape[0])
        if down.shape[0] == 0 or 0 in down.shape or 0 in up.shape:
            raise AdapterFileError(f"{file.name}: module {module} has rank 0 or an empty tensor (down "
                                   f"{_fmt_shape(down.shape)}, up {_fmt_shape(up.shape)}); the file is corrupt, re-export it")
        if alpha is not None and (not math.isfinite(alpha) or abs(alpha) / down.shape[0] > MAX_ALPHA_PER_RANK):
            raise AdapterFileError(f"{file.name}: module {module} has alpha {alpha:g} for rank {down.shape[0]} "
                                   f"(alpha/rank over {MAX_ALPHA_PER_RANK:g}); the file is broken, re-export it")
        down, up = _fit_lora_layout(down, up, names.shapes.get(path) if names.shapes else None)
        _once(file, layers, path, module)
        layers[path] = _with_dora(LoraDelta(down=down, up=up, alpha=alpha), get("dora"))
    return fmt, layers


def _once(file: Path, layers: dict, path: str, module: str) -> None:
    """Two spellings of one module (e.g. a kohya and a diffusers key) in one file: refuse, never pick one."""
    if path in layers:
        raise AdapterFileError(f"{file.name}: module {path} is given twice, under two spellings of its keys (e.g. "
                               f"a kohya and a diffusers key, one of them {module}); keep one spelling and re-export")


def _with_dora(delta, magnitude: torch.Tensor | None):
    """Wrap a layer in DoRA when the file has its magnitude: PEFT's ``lora_magnitude_vector`` (out,)
    or LyCORIS's ``dora_scale``, (out, 1…) per output row or (1, in…) per input column."""
    if magnitude is None:
        return delta
    out = delta.weight_shape[0]
    on_out = magnitude.dim() <= 1 or (magnitude.shape[0] == out and magnitude[0].numel() == 1)
    return DoraDelta(inner=delta, magnitude=magnitude.float(), on_out=on_out)


def _loha_layer(file, module, path, p, alpha, names: "_Names", kernels: dict) -> HadaDelta:
    """A LyCORIS LoHa module (``hada_w1_a/b``, ``hada_w2_a/b``, optional Tucker ``hada_t1/t2``)."""
    missing = [k for k in ("w1_a", "w1_b", "w2_a", "w2_b") if p[k] is None]
    if missing:
        raise AdapterFileError(f"{file.name}: LoHa module {module} lacks hada_{', hada_'.join(missing)}; "
                               "the file is incomplete, re-export it")
    for piece in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"):
        t = p[piece]
        if t is not None and (t.dim() < 2 or 0 in t.shape):
            raise AdapterFileError(f"{file.name}: LoHa module {module} has a malformed hada_{piece} of shape "
                                   f"{_fmt_shape(t.shape)} (expected ≥ 2-D, no empty axis); the file is corrupt, re-export it")
    tucker = p["t1"] is not None
    if tucker != (p["t2"] is not None):
        raise AdapterFileError(f"{file.name}: LoHa module {module} has only one of hada_t1/hada_t2; re-export it")
    rank = p["w1_b"].shape[0]
    if tucker:  # w_a (r, out), w_b (r, in), t (r, r, kh, kw)
        shape = (p["w1_a"].shape[1], p["w1_b"].shape[1], *p["t1"].shape[2:])
        ok = p["w1_a"].shape[0] == p["t1"].shape[0] and p["w1_b"].shape[0] == p["t1"].shape[1]
    else:  # w_a (out, r), w_b (r, in·kh·kw)
        ok = p["w1_a"].shape[1] == rank and p["w2_a"].shape[1] == p["w2_b"].shape[0]
        out, flat = p["w1_a"].shape[0], p["w1_b"].flatten(1).shape[1]
        want = names.shapes.get(path) if names.shapes else None
        if want is not None and want[0] == out and math.prod(want[1:]) == flat:
            shape = tuple(want)
        else:
            kernel = _conv_kernel(path, names, kernels) if p["w1_b"].dim() == 2 else tuple(p["w1_b"].shape[2:])
            kh, kw = kernel or (1, 1)
            shape = (out, flat // (kh * kw), kh, kw) if kernel and flat % (kh * kw) == 0 else (out, flat)
    if not ok:
        raise AdapterFileError(f"{file.name}: LoHa module {module} has inconsistent hada_* ranks; the file is corrupt")
    scale = alpha / rank if alpha is not None else 1.0
    return HadaDelta(w1_a=p["w1_a"], w1_b=p["w1_b"], w2_a=p["w2_a"], w2_b=p["w2_b"], shape=tuple(shape), scale=scale,
                     t1=p["t1"], t2=p["t2"])


def _read_bundle_embeddings(file: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A1111 bundled embeddings (``bundle_emb.<token>.…``) as ``{token: {component: (n, hidden)}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, t in tensors.items():
        if not key.startswith("bundle_emb."):
            continue
        token, _, part = key[len("bundle_emb."):].partition(".")
        comp = _EMB_PARTS.get(part.split(".", 1)[0]) if token else None
        if comp is None or not t.is_floating_point() or t.dim() not in (1, 2):
            skipped.append(key)
            continue
        out.setdefault(token, {})[comp] = t.reshape(-1, t.shape[-1]).float()
    if skipped:
        log.warning("%s: ignoring %d bundled embedding tensors of an unknown layout (e.g. %s)",
                    file.name, len(skipped), skipped[0])
    return out


def _lokr_layer(file, module, path, p, alpha, names: _Names, kernels: dict) -> KronDelta:
    def need(a, b, c, label):
        if a is None and (b is None or c is None):
            raise AdapterFileError(f"{file.name}: LoKr module {module} lacks {label} (neither lokr_{label} nor both "
                                   f"lokr_{label}_a/_b); the file is incomplete, re-export it")
    need(p["w1"], p["w1_a"], p["w1_b"], "w1")
    need(p["w2"], p["w2_a"], p["w2_b"], "w2")
    allowed = {"w1": (2,), "w1_a": (2,), "w1_b": (2,), "w2": (2, 4), "w2_a": (2,), "w2_b": (2, 4), "t2": (4,)}
    for piece, dims in allowed.items():
        t = p.get(piece)
        if t is not None and (t.dim() not in dims or 0 in t.shape):
            raise AdapterFileError(f"{file.name}: LoKr module {module} has a malformed lokr_{piece} of shape "
                                   f"{_fmt_shape(t.shape)} (expected {' or '.join(f'{d}-D' for d in dims)}, no empty "
                                   "axis); the file is corrupt, re-export it")
    if alpha is not None and not math.isfinite(alpha):
        raise AdapterFileError(f"{file.name}: LoKr module {module} has a non-finite alpha; re-export it")
    for f in ("w1", "w2"):
        a, b = p[f"{f}_a"], p[f"{f}_b"]
        if f == "w2" and p["t2"] is not None:  # Tucker: w2_a (r, out/a1), w2_b (r, in/a2), t2 (r, r, kh, kw)
            if p["w2"] is not None or not (a.shape[0] == b.shape[0] == p["t2"].shape[0] == p["t2"].shape[1]):
                raise AdapterFileError(f"{file.name}: LoKr module {module} has inconsistent Tucker factors "
                                       "(lokr_t2, lokr_w2_a/_b); the file is corrupt")
            continue
        if p[f] is None and (a.dim() != 2 or a.shape[1] != b.shape[0]):
            raise AdapterFileError(f"{file.name}: LoKr module {module} has inconsistent lokr_{f}_a/_b ranks "
                                   f"({_fmt_shape(a.shape)} @ {_fmt_shape(b.shape)}); the file is corrupt")
    # LyCORIS's rank: w1's when w1 is low-rank, else w2's (LokrModule.make_module_from_state_dict)
    rank = p["w1_b"].shape[0] if p["w1_b"] is not None else p["w2_b"].shape[0] if p["w2_b"] is not None else None
    scale = alpha / rank if (alpha is not None and rank) else 1.0
    w2_b = p["w2_b"]
    if w2_b is not None and w2_b.dim() == 2 and p["t2"] is None:  # LyCORIS stores a conv w2_b flattened: (r, in/a2 * kh * kw)
        kernel = _conv_kernel(path, names, kernels)
        if kernel and w2_b.shape[1] % (kernel[0] * kernel[1]) == 0:
            w2_b = w2_b.reshape(w2_b.shape[0], -1, *kernel)
    return KronDelta(w1=p["w1"], w2=p["w2"], w1_a=p["w1_a"], w1_b=p["w1_b"], w2_a=p["w2_a"], w2_b=w2_b, scale=scale,
                     t2=p["t2"])


def _conv_kernel(path: str, names: _Names, kernels: dict) -> tuple[int, int] | None:
    if names.shapes is not None and path in names.shapes:
        shape = names.shapes[path]
        return tuple(shape[2:]) if len(shape) == 4 else None
    if path in kernels:
        return tuple(int(k) for k in kernels[path])
    if path.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv", "conv_in", "conv_out"):
        return (3, 3)  # SD/SDXL resnet, sampler and in/out convs
    return None


def _fit_lora_layout(down, up, shape):
    """Linear-vs-1×1-conv layouts (as A1111 does): follow the base module's weight shape when known."""
    if shape is None:
        return down, up
    if len(shape) == 4 and tuple(shape[2:]) == (1, 1) and down.dim() == 2:
        return down.reshape(*down.shape, 1, 1), up.reshape(*up.shape[:2], 1, 1)
    if len(shape) == 2 and down.dim() == 4 and tuple(down.shape[2:]) == (1, 1):
        return down.flatten(1), up.flatten(1)
    if len(shape) == 4 and down.dim() == 4 and up.dim() == 2:
        return down, up.reshape(*up.shape, 1, 1)
    return down, up


# --------------------------------------------------------------------------------------------
# PEFT configs (adapter_config.json, diffusers' lora_adapter_metadata)


def _get_pattern_key(pattern_keys, key: str) -> str:
    try:
        from peft.utils.other import get_pattern_key

        return get_pattern_key(list(pattern_keys), key)
    except ImportError:  # same semantics as peft's
        for pat in pattern_keys:
            if re.match(rf"(.*\.)?({pat})$", key):
                return pat
        return key


def _peft_alpha(cfg: dict, rels: list[str], rank: int) -> float:
    """The alpha giving PEFT's scale for this module (lora_alpha / r, rank_pattern, alpha_pattern, rsLoRA).

    ``rels``: the module's name as the config saw it, and its other text-encoder spelling.
    """
    def lookup(patterns: dict, default):
        for rel in rels:
            key = _get_pattern_key(patterns.keys(), rel)
            if key in patterns:
                return patterns[key]
        return default

    r = lookup(cfg.get("rank_pattern") or {}, cfg.get("r", 8))
    alpha = lookup(cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        return float(alpha) / math.sqrt(r) * rank
    return float(alpha) if r == rank else float(alpha) / r * rank


def _read_peft_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path} cannot be read ({_first_line(e)}); fix or delete it") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(cfg).__name__}, not an object; it is not a PEFT "
                               "adapter_config.json: fix or delete it")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise AdapterFileError(f"{path}: {key} is {v!r}, not a positive number; fix adapter_config.json")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, dict) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v.values())):
            raise AdapterFileError(f"{path}: {key} must map module patterns to positive numbers; fix adapter_config.json")
    if cfg.get("peft_type", "LORA") not in ("LORA", None):
        raise AdapterFileError(f"{path} describes a {cfg.get('peft_type')} adapter; only LoRA PEFT adapters are supported")
    return cfg


def _unpack_configs(raw: str | None) -> dict[str, dict]:
    data = _json_or_empty(raw)
    out: dict[str, dict] = {}
    for key, value in data.items():
        comp, _, field = key.partition(".")
        if comp in COMPONENTS and field:
            out.setdefault(comp, {})[field] = value
    return out


def _pack_configs(configs: dict[str, dict]) -> str:
    return json.dumps({f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}, indent=2, sort_keys=True)


def _lora_config(entries: list[tuple[str, int, float]]) -> dict:
    """A LoraConfig dict reproducing each module's rank and alpha: entries are (pattern, rank, alpha)."""
    ranks = Counter(r for _, r, _ in entries)
    alphas = Counter(a for _, _, a in entries)
    r = ranks.most_common(1)[0][0]
    a = alphas.most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _num(a),
        "rank_pattern": {p: rk for p, rk, _ in entries if rk != r},
        "alpha_pattern": {p: _num(al) for p, _, al in entries if al != a},
        "target_modules": sorted(p for p, _, _ in entries),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "task_type": None,
        "base_model_name_or_path": None,
    }


# --------------------------------------------------------------------------------------------
# writing


def _split_path(path: str) -> tuple[str, str]:
    comp, _, rel = path.partition(".")
    if comp not in COMPONENTS or not rel:
        raise AdapterFileError(f"module path {path!r} does not start with one of {', '.join(COMPONENTS)}; "
                               "fix the adapter's layer names")
    return comp, rel


def _external_rel(comp: str, rel: str) -> str:
    """Text-encoder paths as files spell them (with CLIP's ``text_model.`` level)."""
    if comp != "unet" and rel.split(".", 1)[0] in _TE_TOP:
        return "text_model." + rel
    return rel


def _pattern(comp: str, rel: str) -> str:
    """A PEFT pattern matching the module with or without ``text_model.`` (suffix match)."""
    return rel[len("text_model."):] if comp != "unet" and rel.startswith("text_model.") else rel


def _conv_up(d: LoraDelta) -> torch.Tensor:
    return d.up.reshape(*d.up.shape[:2], 1, 1) if d.is_conv and d.up.dim() == 2 else d.up


def _alpha_of(d: LoraDelta) -> float:
    return float(d.alpha) if d.alpha is not None else float(d.rank)


_ATTN_PROJ = re.compile(r"^(?P<m>.+)\.(?P<p>to_q|to_k|to_v|to_out)(?:\.0)?$")


def _build_diffusers(adapter: Adapter):
    """diffusers LoRA tensors in the spelling both diffusers and ComfyUI read, alpha folded into up.

    UNet attention projections use the attention-processor names ``….processor.to_q_lora.down`` /
    ``to_out_lora.up`` and other UNet modules ``….lora.down/up``: ComfyUI's key map knows UNet
    attention only as ``….processor.to_q`` (``model_lora_keys_unet``), and diffusers converts this
    older spelling itself (``convert_unet_state_dict_to_peft``: ``.processor.`` dropped, ``to_q_lora.down``
    -> ``to_q.lora_A``). Text-encoder modules keep ``lora_A/lora_B`` (both read them). ComfyUI
    ignores the ``lora_adapter_metadata`` alphas, so each module's alpha / rank is multiplied into its
    up weight and the metadata says alpha = rank: the same ΔW in every reader.
    """
    tensors, entries = {}, {}
    for path, d in adapter.layers.items():
        comp, rel = _split_path(path)
        ext = _external_rel(comp, rel)
        up = _conv_up(d) * (_alpha_of(d) / d.rank)
        if comp == "unet":
            m = _ATTN_PROJ.match(ext)
            base = f"unet.{m['m']}.processor.{m['p']}_lora" if m else f"unet.{ext}.lora"
            tensors[f"{base}.down.weight"] = d.down
            tensors[f"{base}.up.weight"] = up
        else:
            tensors[f"{comp}.{ext}.lora_A.weight"] = d.down
            tensors[f"{comp}.{ext}.lora_B.weight"] = up
        entries.setdefault(comp, []).append((_pattern(comp, rel), d.rank, float(d.rank)))
    return tensors, {c: _lora_config(e) for c, e in entries.items()}


def _build_peft(adapter: Adapter):
    comps = sorted(adapter.components())
    if len(comps) != 1:
        raise AdapterFileError(f"a PEFT file holds one model but adapter {adapter.name!r} touches {' and '.join(comps)}; "
                               "write it with format='diffusers' or 'kohya'")
    comp = comps[0]
    tensors, entries = {}, []
    for path, d in adapter.layers.items():
        _, rel = _split_path(path)
        tensors[f"base_model.model.{rel}.lora_A.weight"] = d.down
        tensors[f"base_model.model.{rel}.lora_B.weight"] = _conv_up(d)
        entries.append((_pattern(comp, rel), d.rank, _alpha_of(d)))
    return tensors, _lora_config(entries), comp


def _build_kohya(adapter: Adapter):
    te1 = "lora_te1_" if "text_encoder_2" in adapter.components() else "lora_te_"
    prefix = {"unet": "lora_unet_", "text_encoder": te1, "text_encoder_2": "lora_te2_"}
    tensors, kernels, unfit = {}, {}, []
    for path, d in adapter.layers.items():
        comp, rel = _split_path(path)
        name = prefix[comp] + _external_rel(comp, rel).replace(".", "_")
        if isinstance(d, LoraDelta):
            tensors[f"{name}.lora_down.weight"] = d.down
            tensors[f"{name}.lora_up.weight"] = _conv_up(d)
            tensors[f"{name}.alpha"] = torch.tensor(_alpha_of(d), dtype=torch.float32)
            continue
        pieces, alpha, kernel = _lokr_pieces(d)
        tensors.update({f"{name}.lokr_{k}": v for k, v in pieces.items()})
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        problem = lycoris_layout_problem(d)
        if problem:
            unfit.append((path, problem))
        if kernel:
            kernels[path] = list(kernel)
    if unfit:
        log.warning("adapter %r: %d of %d LoKr modules cannot be rebuilt by LyCORIS (e.g. %s: %s); the studio, "
                    "and A1111/ComfyUI (which compute kron(w1, w2) directly), still read them. For LyCORIS use "
                    "Kronecker factors like krona-paper (16x16) on SD widths, or convert with kron_to_lora",
                    adapter.name, len(unfit), sum(isinstance(d, KronDelta) for d in adapter.layers.values()), *unfit[0])
    return tensors, kernels


def _bundle_embeddings(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A1111's ``bundle_emb`` tensors: ``string_to_param.*`` for one text encoder, ``clip_l``/``clip_g`` for SDXL."""
    sdxl = adapter.arch == "sdxl" or any("text_encoder_2" in per for per in adapter.embeddings.values())
    out = {}
    for token, per in adapter.embeddings.items():
        if not token or "." in token:
            raise AdapterFileError(f"token embedding name {token!r} of adapter {adapter.name!r} cannot be written "
                                   "(it must be non-empty without dots); rename the trigger")
        for comp, vec in per.items():
            if comp not in ("text_encoder", "text_encoder_2"):
                raise AdapterFileError(f"token embedding {token!r} of adapter {adapter.name!r} is for {comp!r}; "
                                       "use text_encoder or text_encoder_2")
            part = ("clip_l" if comp == "text_encoder" else "clip_g") if sdxl else "string_to_param.*"
            out[f"bundle_emb.{token}.{part}"] = vec.reshape(-1, vec.shape[-1])
    return out


def _lokr_pieces(d: KronDelta):
    """LyCORIS tensors for a Kronecker layer, its alpha, and a flattened conv kernel.

    Every module gets an ``.alpha``: LyCORIS's ``create_network_from_weights`` calls
    ``float(alpha)`` and fails without one. With a low-rank factor LyCORIS scales by alpha / rank
    (rank: w1's if low-rank, else w2's); with both factors full it applies no scale at all, so the
    scale is folded into w1 and alpha = 1 is written.
    """
    pieces = {k: getattr(d, k) for k in _LOKR_PIECES if getattr(d, k) is not None}
    rank = d.w1_b.shape[0] if d.w1_b is not None else d.w2_b.shape[0] if d.w2_b is not None else None
    if rank:
        alpha = d.scale * rank
    else:
        alpha = 1.0
        if d.scale != 1.0:
            pieces["w1"] = pieces["w1"] * d.scale
    kernel = None
    if d.w2_b is not None and d.w2_b.dim() == 4 and d.t2 is None:
        kernel = tuple(d.w2_b.shape[2:])
        pieces["w2_b"] = d.w2_b.flatten(1)
    return pieces, alpha, kernel


def _factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's ``factorization``: dim = m·n with m ≤ n, m = factor when it divides dim, else the
    most balanced split with m ≤ factor."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (n, m) if m > n else (m, n)
    factor = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lycoris_layout_problem(d: KronDelta) -> str | None:
    """Why LyCORIS's ``create_network_from_weights`` cannot rebuild this LoKr layer, or None.

    LyCORIS guesses one ``factor`` from the tensor shapes (as ``LokrModule.make_module_from_state_dict``
    does), builds w1 = (out_m, in_m) and w2 = (out_n, in_n) from ``factorization(dim, factor)``
    (m ≤ n: w1 is the smaller factor on both axes), decomposes a factor only when its rank is below
    half its larger side, and copies the tensors in: any other layout fails there.
    """
    if d.t2 is not None:
        return None  # Tucker LoKr: left to LyCORIS (not checked here)
    a = d.w1.shape if d.w1 is not None else (d.w1_a.shape[0], d.w1_b.shape[1])
    b = tuple(d.factor2().shape[:2])
    out_dim, in_dim = a[0] * b[0], a[1] * b[1]
    if tuple(a) == (_factorization(out_dim)[0], _factorization(in_dim)[0]):
        factor = -1
    else:
        f1, f2 = max(a), max(b)
        fits = lambda f: not out_dim % f and not in_dim % f and f in (a[0], b[0]) and f in (a[1], b[1])  # noqa: E731
        factor = f1 if fits(f1) else f2 if fits(f2) else min(f1, f2)
    (ol, ok), (im, in_) = _factorization(out_dim, factor), _factorization(in_dim, factor)
    if (tuple(a), tuple(b)) != ((ol, im), (ok, in_)):
        return (f"LyCORIS would rebuild {out_dim}x{in_dim} as w1 {ol}x{im} ⊗ w2 {ok}x{in_}, not {a[0]}x{a[1]} ⊗ "
                f"{b[0]}x{b[1]} (w1 must be the smaller factor on both axes, split by one factor)")
    if d.w1 is None:
        rank = d.w1_a.shape[1]
        if not rank < max(a) / 2:
            return f"its w1 rank {rank} is not below half of {max(a)}, so LyCORIS would make w1 full"
    if d.w2 is None:
        rank = d.w2_a.shape[1]
        if not rank < max(b) / 2:
            return f"its w2 rank {rank} is not below half of {max(b)}, so LyCORIS would make w2 full"
    if d.w1 is None and d.w2 is None and d.w1_a.shape[1] != d.w2_a.shape[1]:
        return "its two factors have different ranks, and LyCORIS keeps one rank per module"
    return None


def _header_for(adapter: Adapter, fmt: str, extra: dict, metadata) -> dict[str, str]:
    header = {str(k): str(v) for k, v in adapter.metadata.items()
              if k not in _STALE_KEYS and not str(k).startswith("card.")}
    header.update({
        "ss_output_name": adapter.name,
        "studio_trigger": adapter.trigger or "",
        "studio_concept": adapter.concept or "",
        "studio_concept_kind": adapter.concept_kind or "",
        "studio_weight": repr(float(adapter.weight)),
        "studio_arch": adapter.arch or "",
        "studio_kind": adapter.kind,
        "studio_format": fmt,
    })
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(adapter.arch or "")
    if base_version and "ss_base_model_version" not in header:
        header["ss_base_model_version"] = base_version
    if fmt == "lokr" and "ss_network_module" not in header:
        header["ss_network_module"] = "lycoris.kohya"
        header["ss_network_args"] = json.dumps({"algo": "lokr"})
    header.update(extra)
    for k, v in (metadata or {}).items():
        header[str(k)] = v if isinstance(v, str) else json.dumps(v)
    header["format"] = "pt"
    return header


def _atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=header)


# --------------------------------------------------------------------------------------------
# metadata


def _fill_from_metadata(adapter: Adapter) -> None:
    meta = adapter.metadata
    adapter.trigger = (meta.get("studio_trigger") or meta.get("card.activation text")
                       or _top_tag(meta) or None)
    adapter.concept = meta.get("studio_concept") or None
    adapter.concept_kind = meta.get("studio_concept_kind") or None
    weight = _float(meta.get("studio_weight"))
    if weight is None:
        weight = _float(meta.get("card.preferred weight"))
        weight = weight if weight and weight > 0 else None  # A1111 writes 0 for "not set"
    adapter.weight = 1.0 if weight is None else weight


def _arch_from_metadata(meta: Mapping[str, str]) -> str | None:
    for key in ("studio_arch", "card.sd version", "modelspec.architecture", "ss_base_model_version"):
        arch = _arch_name(meta.get(key))
        if arch:
            return arch
    v2 = str(meta.get("ss_v2", "")).lower()
    if v2 == "true":
        return "sd2"
    if v2 == "false" and meta.get("ss_base_model_version") is None and meta.get("ss_network_module"):
        return "sd1"  # older sd-scripts wrote only ss_v2
    return None


def _arch_name(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().lower()
    if v in ARCHS:
        return v
    if v in ("unknown", ""):
        return None
    if "xl" in v:
        return "sdxl"
    if re.search(r"sd_?v?3|stable-diffusion-v?3", v):
        return "sd3"
    if "flux" in v:
        return "flux"
    if re.search(r"(^|[^0-9])(v2|2\.|sd2|sd_v2)", v) or v.startswith("stable-diffusion-v2"):
        return "sd2"
    if re.search(r"(^|[^0-9])(v1|1\.|sd1|sd_v1)", v) or v.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def _tag_counts(meta: Mapping[str, str]) -> Counter:
    data = _json_or_empty(meta.get("ss_tag_frequency"))
    counts: Counter = Counter()
    for tags in data.values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[str(tag).strip()] += n
    return counts


def _top_tag(meta) -> str | None:
    counts = _tag_counts(meta)
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------------------------
# small helpers


def _json_or_empty(raw) -> dict:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _an(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aefhilmnorsx" else f"a {word}"


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _key(key: str) -> str:
    """A tensor name as an error shows it: printable names as they are, others escaped, so a
    message stays one line whatever a file calls its tensors."""
    return key if key.isprintable() else ascii(key)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
