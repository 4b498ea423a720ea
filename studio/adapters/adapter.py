"""The in-memory form of an adapter: per-module low-rank or Kronecker weight deltas.

Every file format is read into this form and written from it, so composers, merges and the
activation rig never see a format. Module paths use diffusers naming with the component as the
first part: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…``.

An adapter may also carry trained token embeddings (pivotal tuning): ``embeddings[token][component]``
is the (n_vectors, hidden) input embedding that replaces ``token``'s row of that text encoder's
token-embedding table while the adapter is active on the text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraDelta:
    """ΔW = (alpha / r) · up @ down; conv layers keep their kernel on ``down``."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None means alpha = r (scale 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])
        return (self.up.shape[0], self.down.shape[1])

    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    def delta(self) -> torch.Tensor:
        """The full ΔW, shaped like the base module's weight."""
        down = self.down.float().flatten(1)
        up = self.up.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """The adapter's contribution to ``module(x)``, without materialising ΔW."""
        if self.is_conv:
            h = _conv(x, self.down, module)
            return F.conv2d(h, self.up.reshape(self.up.shape[0], -1, 1, 1)) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def to(self, device=None, dtype=None) -> "LoraDelta":
        return LoraDelta(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype), self.alpha)


@dataclass
class KronDelta:
    """ΔW = scale · kron(w1, w2) in ``torch.kron`` layout (DiffuseKronA / LyCORIS LoKr).

    ``w1`` is a1×a2 and ``w2`` is (out/a1)×(in/a2) (conv: ×kh×kw). Either factor may be given as a
    low-rank product (LoKr's ``_a``/``_b`` pieces); ``factor`` materialises it.
    """

    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    scale: float = 1.0
    t2: torch.Tensor | None = None  # LyCORIS Tucker core (r, r, kh, kw): w2 = t2 ×₁ w2_aᵀ ×₂ w2_bᵀ

    def factor1(self) -> torch.Tensor:
        return self.w1 if self.w1 is not None else self.w1_a @ self.w1_b

    def factor2(self) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2
        if self.t2 is not None:  # LyCORIS rebuild_tucker: w2_a (r, out/a1), w2_b (r, in/a2)
            return torch.einsum("i j ..., i p, j r -> p r ...", self.t2, self.w2_a, self.w2_b).contiguous()
        if self.w2_b.dim() == 4:  # conv Tucker-free form: (r, in/a2, kh, kw)
            return (self.w2_a @ self.w2_b.flatten(1)).reshape(self.w2_a.shape[0], *self.w2_b.shape[1:])
        return self.w2_a @ self.w2_b

    @property
    def is_conv(self) -> bool:
        return self.factor2().dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        a, b = self.factor1(), self.factor2()
        return (a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])

    def num_params(self) -> int:
        return sum(t.numel() for t in (self.w1, self.w2, self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t2)
                   if t is not None)

    def delta(self) -> torch.Tensor:
        a, b = self.factor1().float(), self.factor2().float()
        if b.dim() == 4:
            a = a[:, :, None, None]
        return self.scale * torch.kron(a, b)

    def forward(self, x: torch.Tensor, module: torch.nn.Module, vec: bool | None = None) -> torch.Tensor:
        """kron(A, B) x, as A·X·Bᵀ on the reshaped input (no ΔW) where that is cheaper (``vec=None``)."""
        a, b = self.factor1(), self.factor2()
        if b.dim() == 4:
            return _conv(x, self.delta().to(x.dtype), module)
        a1, a2 = a.shape
        b1, b2 = b.shape
        if not (use_vec_trick(a1 * b1, a2 * b2, a1, a2) if vec is None else vec):
            return F.linear(x, torch.kron(a, b).to(x.dtype)) * self.scale
        lead = x.shape[:-1]
        xr = x.reshape(-1, a2, b2)  # input index = i*b2 + j  (torch.kron layout)
        y = torch.matmul(a, torch.matmul(xr, b.t()))  # (N, a1, b1): output index = s*b1 + r, no transposes
        return y.reshape(*lead, a1 * b1) * self.scale

    def to(self, device=None, dtype=None) -> "KronDelta":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return KronDelta(mv(self.w1), mv(self.w2), mv(self.w1_a), mv(self.w1_b), mv(self.w2_a), mv(self.w2_b),
                         self.scale, mv(self.t2))


def _conv(x: torch.Tensor, weight: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``weight`` applied as ``module``'s convolution (its stride, padding, dilation, groups); a training
    wrapper on the same layer (PEFT's LoRA, our ``KronConv2d``) keeps those on its ``base_layer``."""
    conv = getattr(module, "base_layer", module)
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _apply(delta_w: torch.Tensor, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """ΔW·x with the module's own op (linear, or conv with its stride/padding)."""
    delta_w = delta_w.to(x.dtype)
    if delta_w.dim() == 4:
        return _conv(x, delta_w, module)
    return F.linear(x, delta_w)


@dataclass
class HadaDelta:
    """LyCORIS LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), the Hadamard product of two low-rank
    matrices (rank up to r², from 2r(out + in) parameters).

    Conv layers store w·_b flattened (r, in·kh·kw), reshaped to ``shape``; with Tucker cores
    (``t1``/``t2``, (r, r, kh, kw)) each factor is LyCORIS's ``einsum("i j ..., j r, i p -> p r ...",
    t, w_b, w_a)`` with w_a (r, out) and w_b (r, in). ``scale`` = alpha / r, r = w1_b's first dim.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    shape: tuple[int, ...]  # the base weight's shape
    scale: float = 1.0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def num_params(self) -> int:
        return sum(t.numel() for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2) if t is not None)

    @staticmethod
    def _part(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is not None:
            return torch.einsum("i j ..., j r, i p -> p r ...", t.float(), b.float(), a.float())
        return a.float() @ b.float().flatten(1)

    def delta(self) -> torch.Tensor:
        p1 = self._part(self.w1_a, self.w1_b, self.t1)
        p2 = self._part(self.w2_a, self.w2_b, self.t2)
        return (self.scale * p1 * p2).reshape(self.shape)

    def forward(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return _apply(self.delta(), x, module)

    def to(self, device=None, dtype=None) -> "HadaDelta":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return HadaDelta(mv(self.w1_a), mv(self.w1_b), mv(self.w2_a), mv(self.w2_b), self.shape, self.scale,
                         mv(self.t1), mv(self.t2))


@dataclass
class DoraDelta:
    """DoRA (weight-decomposed LoRA, or LoHa/LoKr with ``dora_scale``): the base weight's direction
    moves by ``inner``'s ΔW and each output row (``on_out``; LyCORIS may also norm input columns)
    gets the trained magnitude: W' = m · (W + ΔW) / ‖W + ΔW‖, so ΔW_eff = W' − W.

    ΔW_eff depends on the base weight, which ``forward`` takes from the module; an adapter weight w
    scales ΔW_eff (A1111's rule; PEFT puts w inside the norm instead; the two agree at w = 1).
    Weight-space merges cannot fold it without the base weights and say so.
    """

    inner: "LayerDelta"
    magnitude: torch.Tensor  # PEFT lora_magnitude_vector (out,), LyCORIS dora_scale (out, 1[, 1, 1]) or (1, in…)
    on_out: bool = True

    @property
    def rank(self) -> int:
        return getattr(self.inner, "rank", 0)

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def is_conv(self) -> bool:
        return self.inner.is_conv

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.inner.weight_shape

    def num_params(self) -> int:
        return self.inner.num_params() + self.magnitude.numel()

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            from ..errors import StudioError

            raise StudioError("DoRA layers change the base weight's magnitude, so their ΔW needs the base model's "
                              "weights: weight-space merges cannot fold DoRA adapters; compose them with a "
                              "method that applies adapters on the model (merge, switch, composite, cmlora, clora)")
        base = base.float()
        w = base + self.inner.delta().reshape(base.shape)
        if self.on_out:
            norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        else:
            norm = w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
        m = self.magnitude.float().reshape(norm.shape)
        return w * (m / (norm + torch.finfo(w.dtype).eps)) - base

    def forward(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return _apply(self.delta(module.weight.detach()), x, module)

    def to(self, device=None, dtype=None) -> "DoraDelta":
        return DoraDelta(self.inner.to(device, dtype), self.magnitude.to(device=device, dtype=dtype), self.on_out)


LayerDelta = Union[LoraDelta, KronDelta, HadaDelta, DoraDelta]

# The reshaped matmul pays off when it saves at least this factor of multiply-adds over building
# kron(A, B) and one F.linear (below it, its two small GEMMs and reshapes cost more; measured on CPU
# for toy/SD1/SDXL attention shapes, see bench/train.py and docs/performance.md).
VEC_MIN_SAVING = 5.0


def use_vec_trick(d_out: int, d_in: int, a1: int, a2: int, min_saving: float = VEC_MIN_SAVING) -> bool:
    """Whether kron(A, B)·x is cheaper as the reshaped matmul than with ΔW materialised."""
    vec = d_in * (d_out // a1) + d_out * a2  # multiply-adds per input row
    return d_out * d_in >= min_saving * vec


@dataclass
class Adapter:
    """A named set of layer deltas plus what an artist needs to use it."""

    name: str
    layers: dict[str, LayerDelta]
    kind: str = "lora"  # "lora" or "kron" (what the layers are)
    concept_kind: str | None = None  # object / style / background / character
    trigger: str | None = None  # trigger word(s), e.g. "sks"
    concept: str | None = None  # the class word the trigger binds to, e.g. "shape"
    weight: float = 1.0  # preferred weight
    arch: str | None = None  # base architecture the file was made for: sd1 / sd2 / sdxl / toy
    format: str | None = None  # the file format it was read from
    path: str | None = None
    sha256: str | None = None  # A1111 "addnet" hash of the tensor bytes
    metadata: dict[str, str] = field(default_factory=dict)
    # pivotal tuning: token string -> {text-encoder component: (n_vectors, hidden) input embedding}
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:12] if self.sha256 else None

    def fingerprint(self) -> str:
        """The file's hash, or for an in-memory adapter a SHA-256 of its tensors (then kept as ``sha256``)."""
        if self.sha256 is None:
            import hashlib

            h = hashlib.sha256()
            for path in sorted(self.layers):
                h.update(path.encode())
                for t in vars(self.layers[path]).values():
                    if isinstance(t, torch.Tensor):
                        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                    else:
                        h.update(repr(t).encode())
            for token in sorted(self.embeddings):
                for comp in sorted(self.embeddings[token]):
                    h.update(f"emb:{token}:{comp}".encode())
                    h.update(self.embeddings[token][comp].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self.sha256 = h.hexdigest()
        return self.sha256

    def components(self) -> set[str]:
        """The model components the adapter changes (a token embedding counts for its text encoder)."""
        return {k.split(".", 1)[0] for k in self.layers} | {c for per in self.embeddings.values() for c in per}

    def num_params(self) -> int:
        return sum(d.num_params() for d in self.layers.values()) + sum(
            t.numel() for per in self.embeddings.values() for t in per.values())

    def ranks(self) -> list[int]:
        return sorted({d.rank for d in self.layers.values() if isinstance(d, LoraDelta)})

    def kron_factors(self) -> list[tuple[int, int]]:
        return sorted({tuple(d.factor1().shape) for d in self.layers.values() if isinstance(d, KronDelta)})

    def is_finite(self) -> bool:
        for d in self.layers.values():
            for t in vars(d).values():
                if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                    return False
        return all(torch.isfinite(t).all() for per in self.embeddings.values() for t in per.values())


def divisors(n: int) -> list[int]:
    """The valid Kronecker factor sizes along an axis of length n."""
    return [d for d in range(1, n + 1) if n % d == 0]
