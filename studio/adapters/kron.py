"""The trainable Kronecker adapter layer (DiffuseKronA): ΔW = kron(A, B) in ``torch.kron`` layout.

A is a1×a2 and B is (d_out/a1)×(d_in/a2); A ~ N(0, 1/a1²) and B = 0, so ΔW = 0 at step 0, and the
training scale is 1. Because the layout is the standard one, a trained layer *is* a LyCORIS LoKr
with both factors full (``lokr_w1`` = A, ``lokr_w2`` = B), and ``to_adapter`` hands it to the rest
of the studio as an ``Adapter`` of ``KronDelta`` layers.

The forward reuses ``KronDelta.forward`` (kron(A, B)·x as a reshaped matmul, never building ΔW)
on layers where that is cheaper; on small layers it folds ΔW into the frozen weight instead (one
GEMM, like the base layer alone). ``bench/train.py`` measures both routes. ``kron_to_lora`` turns a Kronecker adapter into a plain LoRA through the exact SVD of
a Kronecker product (the singular triplets of A ⊗ B are products of those of A and B).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StudioError
from .adapter import Adapter, KronDelta, LoraDelta, divisors, use_vec_trick

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# name -> (a1, a2). ``krona-paper`` is the paper's 3.8M-parameter SDXL setting, and a layout LyCORIS
# rebuilds at every SD1.5/SDXL width. ``krona-64x8`` (the official scripts' default, formerly
# ``krona-ibm``) is studio-only: LyCORIS needs w1 to be the smaller factor on both axes, split by one
# factor, which 64x8 never is at SD widths, so its LoKr files load in the studio, A1111 and ComfyUI
# but not in LyCORIS (``formats.lycoris_layout_problem`` says why; ``kron_to_lora`` converts).
PRESETS: dict[str, tuple[int, int]] = {"krona-paper": (16, 16), "krona-64x8": (64, 8)}
RENAMED = {"krona-ibm": "krona-64x8"}

# KronLinear (training) compares the reshaped matmul with ΔW folded into the base weight (one GEMM
# instead of two), so the reshape must save more to win than at inference; measured on CPU.
MERGED_MIN_SAVING = 8.0


class KronFactorError(StudioError):
    """Kronecker factors that do not divide a layer's dimensions."""


def parse_factors(spec: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"16x16"``, ``"krona-paper"``, ``(64, 8)`` -> (a1, a2)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise KronFactorError(f"Kronecker factors {spec!r} must be two numbers a1xa2, e.g. 16x16")
        a1, a2 = int(spec[0]), int(spec[1])
    elif spec in PRESETS:
        a1, a2 = PRESETS[spec]
    elif spec in RENAMED:
        warnings.warn(f"Kronecker preset {spec!r} is now {RENAMED[spec]!r} (LyCORIS cannot load its LoKr files; "
                      "krona-paper it can)", DeprecationWarning, stacklevel=2)
        a1, a2 = PRESETS[RENAMED[spec]]
    else:
        try:
            a1, a2 = (int(v) for v in str(spec).lower().split("x"))
        except ValueError:
            raise KronFactorError(
                f"Kronecker factors {spec!r} are not A1xA2 or a preset; use e.g. 16x16 or one of {', '.join(PRESETS)}"
            ) from None
    if a1 < 1 or a2 < 1:
        raise KronFactorError(f"Kronecker factors must be positive, got {a1}x{a2}")
    return a1, a2


def check_factors(name: str, d_out: int, d_in: int, a1: int, a2: int) -> None:
    """Raise KronFactorError naming the layer and the valid factors when a1∤d_out or a2∤d_in."""
    if d_out % a1 or d_in % a2:
        raise KronFactorError(
            f"Kronecker factors {a1}x{a2} do not fit layer {name} (out {d_out}, in {d_in}): a1 must be one of "
            f"{divisors(d_out)} and a2 one of {divisors(d_in)}; choose other --factors"
        )


class _KronLayer(nn.Module):
    """A frozen base layer plus trainable A (a1×a2, ~ N(0, 1/a1²)) and B (zeros, ``b_shape``), so
    ΔW = scale · kron(A, B) is 0 at step 0. A is drawn on CPU so the seed means the same on any device."""

    def __init__(self, base: nn.Module, a1: int, a2: int, b_shape: tuple[int, ...],
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.kron_A = nn.Parameter(torch.empty(a1, a2, device=base.weight.device, dtype=torch.float32))
        self.kron_B = nn.Parameter(torch.zeros(*b_shape, device=base.weight.device, dtype=torch.float32))
        with torch.no_grad():
            self.kron_A.copy_(torch.randn(a1, a2, generator=generator) / a1)
        self.scale = 1.0
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # what hooks and dtype checks look at
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def to_delta(self) -> KronDelta:
        return KronDelta(w1=self.kron_A.detach().float().clone(), w2=self.kron_B.detach().float().clone(), scale=self.scale)

    def extra_repr(self) -> str:
        return f"A={tuple(self.kron_A.shape)}, B={tuple(self.kron_B.shape)}"


class KronLinear(_KronLayer):
    """``base(x) + scale · kron(A, B) x`` around a frozen ``nn.Linear``; only A and B train."""

    def __init__(self, base: nn.Linear, a1: int, a2: int, name: str = "", mode: str = "auto",
                 generator: torch.Generator | None = None):
        d_out, d_in = base.out_features, base.in_features
        check_factors(name or "linear", d_out, d_in, a1, a2)
        if mode not in ("auto", "vec", "dense"):
            raise ValueError(f"mode must be auto, vec or dense, got {mode!r}")
        super().__init__(base, a1, a2, (d_out // a1, d_in // a2), generator)
        self.vec = mode == "vec" or (mode == "auto" and use_vec_trick(d_out, d_in, a1, a2, MERGED_MIN_SAVING))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.vec:  # base(x) + kron(A, B)·x by the reshaped matmul (KronDelta.forward)
            out = self.base(x)
            delta = KronDelta(w1=self.kron_A, w2=self.kron_B, scale=self.scale).forward(x.to(self.kron_A.dtype), self.base, vec=True)
            return out + delta.to(out.dtype)
        # small layers: fold ΔW into the weight, one GEMM forward and one for the input gradient
        w = self.base.weight
        return F.linear(x, w + (self.scale * torch.kron(self.kron_A, self.kron_B)).to(w.dtype), self.base.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'vec' if self.vec else 'dense'}"


class KronConv2d(_KronLayer):
    """``conv(x; W + scale · kron(A, B))`` around a frozen ``nn.Conv2d`` (LyCORIS LoKr's conv layout).

    A is a1×a2 over the channels and B is (out/a1)×(in/a2)×kh×kw, so ΔW[i·o + p, j·c + q] = A[i, j] ·
    B[p, q]: the kernel lives in B, as in LoKr. ΔW is folded into the weight (one convolution);
    a conv's kernel is small next to its activations, so there is no cheaper route.
    """

    def __init__(self, base: nn.Conv2d, a1: int, a2: int, name: str = "", generator: torch.Generator | None = None):
        if base.groups != 1:
            raise KronFactorError(f"layer {name or 'conv'} is a grouped convolution (groups={base.groups}); "
                                  "Kronecker adapters need groups=1; leave it out of the targets")
        d_out, d_in = base.out_channels, base.in_channels
        check_factors(name or "conv", d_out, d_in, a1, a2)
        super().__init__(base, a1, a2, (d_out // a1, d_in // a2, *base.kernel_size), generator)

    @property
    def base_layer(self) -> nn.Conv2d:  # PEFT's name: where the rig finds stride, padding, groups and channels
        return self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        w = self.base.weight
        delta = self.scale * torch.kron(self.kron_A[:, :, None, None], self.kron_B)
        return self.base._conv_forward(x, w + delta.to(w.dtype), self.base.bias)


KRON_LAYERS = (KronLinear, KronConv2d)


def layer_dims(mod: nn.Module) -> tuple[int, int]:
    """(out, in) features or channels of a Linear or Conv2d: the dimensions the factors must divide."""
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels, mod.in_channels
    return mod.out_features, mod.in_features


def target_layers(model: nn.Module, targets: Iterable[str] = TARGETS) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear, or ungrouped nn.Conv2d, whose name ends with one of the
    targets (``to_out.0``, ``conv1``…)."""
    targets = tuple(targets)
    found = []
    for name, mod in model.named_modules():
        wanted = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
        if wanted and any(name == t or name.endswith("." + t) for t in targets):
            found.append((name, mod))
    return found


def inject_kron(
    model: nn.Module,
    factors: str | tuple[int, int],
    targets: Iterable[str] = TARGETS,
    mode: str = "auto",
    seed: int = 0,
) -> dict[str, KronLinear]:
    """Replace every target Linear (Conv2d) of ``model`` by a ``KronLinear`` (``KronConv2d``); returns
    them by module name.

    All factors are checked before anything is replaced, so a bad choice leaves the model untouched.
    """
    a1, a2 = parse_factors(factors)
    found = target_layers(model, targets)
    if not found:
        raise KronFactorError(f"no {'/'.join(targets)} Linear or Conv2d layers found to attach a Kronecker adapter to")
    for name, mod in found:
        check_factors(name, *layer_dims(mod), a1, a2)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    layers = {}
    for name, mod in found:
        layer = (KronConv2d(mod, a1, a2, name=name, generator=generator) if isinstance(mod, nn.Conv2d)
                 else KronLinear(mod, a1, a2, name=name, mode=mode, generator=generator))
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def remove_kron(model: nn.Module) -> int:
    """Put the original layer back wherever a Kronecker layer sits; returns how many were removed."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, KRON_LAYERS)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).base)
    return len(names)


def set_kron_enabled(model: nn.Module, enabled: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, KRON_LAYERS):
            mod.enabled = enabled


def kron_layers(model: nn.Module) -> dict[str, KronLinear | KronConv2d]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, KRON_LAYERS)}


def to_adapter(model: nn.Module, name: str, component: str = "unet", **fields) -> Adapter:
    """The trained Kronecker layers of ``model`` as an ``Adapter`` of ``KronDelta`` layers."""
    layers = {f"{component}.{n}": mod.to_delta() for n, mod in kron_layers(model).items()}
    if not layers:
        raise KronFactorError(f"{type(model).__name__} has no Kronecker layers to export; call inject_kron first")
    fields["kind"] = "kron"
    return Adapter(name=name, layers=layers, **fields)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def param_count(shapes: dict[str, tuple[int, ...]], factors: str | tuple[int, int] | None = None,
                rank: int | None = None, targets: Iterable[str] = TARGETS) -> int:
    """Trainable parameters of a Kronecker (``factors``) or LoRA (``rank``) adapter on these layers."""
    targets = tuple(targets)
    total = 0
    a1, a2 = parse_factors(factors) if factors is not None else (0, 0)
    for name, shape in shapes.items():
        if len(shape) != 2 or not any(name.endswith("." + t) for t in targets):
            continue
        d_out, d_in = shape
        if factors is not None:
            check_factors(name, d_out, d_in, a1, a2)
            total += a1 * a2 + (d_out // a1) * (d_in // a2)
        else:
            total += rank * (d_out + d_in)
    return total


def kron_to_lora(adapter: Adapter, rank: int, name: str | None = None) -> Adapter:
    """Best rank-``rank`` LoRA approximation of every Kronecker layer (exact SVD of kron(A, B)).

    The singular values of A ⊗ B are σᵢ(A)·σⱼ(B) with vectors uᵢ ⊗ u'ⱼ and vᵢ ⊗ v'ⱼ, so the top
    ``rank`` triplets come from the two small SVDs without building or decomposing ΔW. Conv layers
    and LoRA layers fall back to an SVD of ΔW / are kept as they are. Lossy unless rank ≥ rank(ΔW).
    """
    if rank < 1:
        raise StudioError(f"LoRA rank must be ≥ 1, got {rank}")
    layers = {}
    for path, d in adapter.layers.items():
        if isinstance(d, LoraDelta):
            layers[path] = d
            continue
        if d.is_conv:
            w = d.delta().flatten(1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = min(rank, s.numel())
            up = (u[:, :k] * s[:k]).reshape(w.shape[0], k, 1, 1)
            down = vh[:k].reshape(k, *d.weight_shape[1:])
            layers[path] = LoraDelta(down=down.contiguous(), up=up.contiguous())
            continue
        a, b = d.factor1().float(), d.factor2().float()
        ua, sa, vha = torch.linalg.svd(a, full_matrices=False)
        ub, sb, vhb = torch.linalg.svd(b, full_matrices=False)
        prod = (sa[:, None] * sb[None, :]).flatten()  # index i*len(sb) + j
        k = min(rank, prod.numel())
        top = torch.topk(prod, k).indices
        i, j = top // sb.numel(), top % sb.numel()
        # column c of up: σ · (uA[:, i] ⊗ uB[:, j]); row c of down: vA[i] ⊗ vB[j]
        up = torch.einsum("pc,qc->pqc", ua[:, i], ub[:, j]).reshape(a.shape[0] * b.shape[0], k) * (prod[top] * d.scale)
        down = torch.einsum("cp,cq->cpq", vha[i], vhb[j]).reshape(k, a.shape[1] * b.shape[1])
        layers[path] = LoraDelta(down=down.contiguous(), up=up.contiguous())
    return Adapter(
        name=name or f"{adapter.name}-lora{rank}", layers=layers, kind="lora", concept_kind=adapter.concept_kind,
        trigger=adapter.trigger, concept=adapter.concept, weight=adapter.weight, arch=adapter.arch,
        metadata={**adapter.metadata, "converted_from": "kron", "svd_rank": str(rank)},
    )
