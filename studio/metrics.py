"""CLIP metrics on open_clip: CLIPScore conventions, per-concept CLIP-T and CLIP-I.

Conventions (c = cosine of unit-normalised image and text embeddings):

- ``compat``: torchmetrics ``clip_score`` semantics, the Multi-LoRA / CMLoRA papers' number:
  100·c per image, the clamp at 0 applied to the *mean* (``max(100·mean(c), 0)``); text = the
  adapters' trigger phrases joined by ", ".
- ``hessel``: Hessel et al. CLIP-S, 2.5·max(c, 0) per image, then the mean; text =
  "A photo depicts " + caption.
- ``raw``: the cosine itself (clip-score ≥ 0.2, T2I-CompBench).

Every ``Score`` stores the raw cosine so any aggregate can be recomputed later, plus backend,
model, convention, the exact text scored, its token count and whether it was truncated.
A ``Scorer`` loads its model once; create one and reuse it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from .errors import ModelLoadError, StudioError

HESSEL_PREFIX = "A photo depicts "
# convention -> (scale, where the clamp at 0 is applied)
CONVENTIONS: dict[str, tuple[float, str]] = {
    "compat": (100.0, "mean"),
    "hessel": (2.5, "image"),
    "raw": (1.0, "none"),
}
TOY_TRAIN_COMMAND = "python -m training.toyworld --out assets/models"


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise StudioError(f"unknown CLIPScore convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


def per_image(cos: float, convention: str) -> float:
    """One image's score: compat 100·max(c,0) (torchmetrics on one image), hessel 2.5·max(c,0), raw c."""
    _check_convention(convention)
    scale, clamp = CONVENTIONS[convention]
    return scale * max(cos, 0.0) if clamp != "none" else scale * cos


def aggregate(cosines: Sequence[float], convention: str) -> float:
    """The convention's score over many images: compat clamps the mean, hessel each image, raw never."""
    _check_convention(convention)
    if not len(cosines):
        return float("nan")
    scale, clamp = CONVENTIONS[convention]
    mean = lambda xs: math.fsum(xs) / len(xs)  # noqa: E731
    if clamp == "mean":
        return max(scale * mean(cosines), 0.0)
    if clamp == "image":
        return mean([scale * max(c, 0.0) for c in cosines])
    return scale * mean(cosines)


def compat_text(triggers: Sequence[str | None]) -> str:
    """The compat convention's text: the trigger phrases joined by ", " (no quality prefix)."""
    return ", ".join(t.strip() for t in triggers if t and t.strip())


@dataclass
class Score:
    """One metric on one image, with everything needed to recompute or compare it."""

    value: float
    raw_cos: float
    backend: str
    model: str
    pretrained: str | None
    convention: str
    scale: float
    clamp: str
    text: str | None = None
    tokens: int | None = None
    truncated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class EmbeddingBackend(Protocol):
    """What a scorer needs from a CLIP model: unit embeddings and token counting."""

    backend: str
    model: str
    pretrained: str | None
    context_length: int

    def encode_images(self, images: Sequence) -> torch.Tensor: ...
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...
    def count_tokens(self, text: str) -> int: ...


class OpenClipBackend:
    """An open_clip model with its eval transform and tokenizer."""

    backend = "open_clip"

    def __init__(self, model, preprocess, tokenizer, model_name: str, pretrained: str | None, device="cpu"):
        self.net = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.context_length = int(getattr(tokenizer, "context_length", None) or 77)

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return self.net.encode_image(x, normalize=True).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.net.encode_text(tokens, normalize=True).float().cpu()

    def count_tokens(self, text: str) -> int:
        """Tokens including start and end markers (open_clip truncates silently past context)."""
        tok = self.tokenizer
        if hasattr(tok, "encode"):  # SimpleTokenizer
            return len(tok.encode(text)) + 2
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer
        if inner is not None:
            return len(inner(text, add_special_tokens=True)["input_ids"])
        return int((tok([text])[0] != 0).sum())


def load_backend(spec: str = "toy", device: str | torch.device = "cpu") -> OpenClipBackend:
    """A CLIP backend from ``toy`` (the toy CLIP), a local open_clip folder, or ``open_clip:ARCH/TAG``.

    A folder holds ``open_clip_config.json`` and weights (open_clip's ``local-dir:`` layout).
    ``ARCH/TAG`` downloads weights, so it works online only; OpenAI weights get QuickGELU.
    """
    import open_clip

    spec = str(spec)
    if spec == "toy":
        try:
            from .toyworld.clip import load_toy_clip
        except ImportError as e:
            raise ModelLoadError(f"the toy CLIP loader is not available ({e}); build the toy world with: {TOY_TRAIN_COMMAND}") from e
        try:
            model, preprocess, tokenizer = load_toy_clip(device=str(device))
        except StudioError:  # the toy world's own error already names the training command
            raise
        except FileNotFoundError as e:
            raise ModelLoadError(f"the toy CLIP is not built ({str(e).splitlines()[0][:160]}); build it with: {TOY_TRAIN_COMMAND}") from e
        return OpenClipBackend(model, preprocess, tokenizer, "toy-clip", None, device)
    path = Path(spec)
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(f"{spec} has no open_clip_config.json; pass an open_clip local folder or open_clip:ARCH/TAG")
        name = f"local-dir:{path.resolve()}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        return OpenClipBackend(model, preprocess, open_clip.get_tokenizer(name), str(path), "local", device)
    arch, _, tag = spec.removeprefix("open_clip:").partition("/")
    if not arch or not tag:
        raise ModelLoadError(f"CLIP model {spec!r} is not 'toy', a folder, or open_clip:ARCH/TAG (e.g. open_clip:ViT-B-16/openai)")
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    quick = tag == "openai" and not arch.endswith("quickgelu")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device, force_quick_gelu=quick)
    except Exception as e:  # offline, unknown tag
        raise ModelLoadError(
            f"could not load open_clip {arch}/{tag} ({str(e).splitlines()[0][:160]}); offline, use 'toy' or a local open_clip folder"
        ) from e
    return OpenClipBackend(model, preprocess, open_clip.get_tokenizer(arch), arch, tag, device)


class Scorer:
    """CLIPScore, per-concept CLIP-T and CLIP-I with one loaded CLIP model (create once, reuse)."""

    def __init__(self, backend: EmbeddingBackend):
        self.backend = backend
        self._text_cache: dict[str, torch.Tensor] = {}
        self._ref_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, spec: str = "toy", device: str | torch.device = "cpu") -> "Scorer":
        return cls(load_backend(spec, device))

    # ---- embeddings ----------------------------------------------------------------------
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            for t, e in zip(missing, self.backend.encode_texts(missing)):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts])

    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        return self.backend.encode_images(images)

    def text_info(self, text: str) -> tuple[int, bool]:
        """(token count with start/end markers, whether it exceeds the context and is truncated)."""
        n = self.backend.count_tokens(text)
        return n, n > self.backend.context_length

    def _score(self, cos: float, convention: str, text: str | None) -> Score:
        scale, clamp = CONVENTIONS[convention]
        tokens, truncated = self.text_info(text) if text is not None else (None, False)
        return Score(
            value=per_image(cos, convention), raw_cos=cos, backend=self.backend.backend, model=self.backend.model,
            pretrained=self.backend.pretrained, convention=convention, scale=scale, clamp=clamp,
            text=text, tokens=tokens, truncated=truncated,
        )

    # ---- metrics -------------------------------------------------------------------------
    def clipscore(self, image, text: str, convention: str = "compat", image_embedding: torch.Tensor | None = None) -> Score:
        """CLIPScore of one image against ``text`` (hessel adds its "A photo depicts " prefix)."""
        _check_convention(convention)
        if convention == "hessel" and not text.startswith(HESSEL_PREFIX):
            text = HESSEL_PREFIX + text
        img = image_embedding if image_embedding is not None else self.image_embeddings([image])[0]
        cos = float(img.float() @ self.text_embeddings([text])[0])
        return self._score(cos, convention, text)

    def concept_scores(self, image, concepts: dict[str, str], image_embedding: torch.Tensor | None = None) -> dict:
        """Per-concept CLIP-T (raw cosine of the image with each concept prompt), with mean and min."""
        if not concepts:
            return {}
        img = image_embedding if image_embedding is not None else self.image_embeddings([image])[0]
        texts = list(concepts.values())
        cos = (self.text_embeddings(texts) @ img.float()).tolist()
        per = {name: self._score(c, "raw", t).to_dict() for (name, t), c in zip(concepts.items(), cos)}
        return {"value": math.fsum(cos) / len(cos), "min": min(cos), "convention": "raw",
                "backend": self.backend.backend, "model": self.backend.model, "per_concept": per}

    def reference_embeddings(self, key: str, references: Sequence) -> torch.Tensor:
        """Embeddings of an adapter's reference images, computed once per key."""
        if key not in self._ref_cache:
            self._ref_cache[key] = self.image_embeddings(references)
        return self._ref_cache[key]

    def clip_i(self, image, references: dict[str, Sequence], image_embedding: torch.Tensor | None = None) -> dict:
        """CLIP-I: mean cosine of the image with each adapter's reference images; mean and min over adapters."""
        refs = {k: v for k, v in references.items() if v is not None and len(v)}
        if not refs:
            return {}
        img = image_embedding if image_embedding is not None else self.image_embeddings([image])[0]
        per = {}
        for name, images in refs.items():
            emb = images if isinstance(images, torch.Tensor) else self.reference_embeddings(name, images)
            per[name] = float((emb.float() @ img.float()).mean())
        vals = list(per.values())
        return {"value": math.fsum(vals) / len(vals), "min": min(vals), "convention": "raw",
                "backend": self.backend.backend, "model": self.backend.model, "per_concept": per}
