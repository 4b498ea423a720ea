"""Weight-space LoRA merges: LoRA-LEGO and the baselines ``cat``, ``linear``, ``svd``, ``ties_svd``,
``dare_ties_svd`` (spec: ../shared/specs/lego.md).

Everything works per module on fp32 factors. A module's update is handled as a pool of rank-1
*units*: rows ``u`` (P, m) and ``v`` (P, n) with ΔW = Σ_p u_p v_pᵀ = uᵀv, where m = out and
n = in (·kh·kw for conv layers, whose kernels are flattened and reshaped back at the end). The
runtime scale alpha/r and the user weight are folded into the factors before any merge, so every
output is an ordinary LoRA with alpha = rank (runtime scale 1).

The heavy part of LEGO, the k-means, runs on the P×P Gram matrices of the unit directions, so its
cost does not depend on the module width; modules with the same (P, k) are clustered in one batch.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from studio.adapters.adapter import Adapter, KronDelta, LoraDelta
from studio.errors import AdapterMismatchError, StudioError

__all__ = [
    "METHODS",
    "UnitPool",
    "fold_factors",
    "canonicalize",
    "pool_units",
    "pool_modules",
    "spherical_kmeans",
    "cluster_centroids",
    "truncated_svd",
    "ties_merge",
    "merge_adapters",
]

METHODS = ("lego", "cat", "linear", "svd", "ties_svd", "dare_ties_svd")

_KRON = {"kron_energy": 0.99, "kron_max_rank": 64}
_TIES = {"density": 0.2, "majority_sign_method": "total", "clamp_quantile": None, "svd_solver": "lowrank"}
# Valid options per method, with defaults. ``dtype`` (output dtype) is accepted by every method.
_OPTIONS: dict[str, dict] = {
    "lego": {
        "metric": "rho", "max_iter": 10, "n_init": 4, "reweight": True, "magnitude": None,
        "r_ref": "max", "quotas": None, "fit": False, **_KRON,
    },
    "cat": dict(_KRON),
    "linear": {},
    "svd": {"clamp_quantile": None},
    "ties_svd": dict(_TIES),
    "dare_ties_svd": dict(_TIES),
}
_RTOL = 1e-6  # units with σ <= _RTOL·σ_max are dropped


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


@dataclass
class UnitPool:
    """The rank-1 units of one module, pooled over sources: ΔW_total = uᵀ v (flattened)."""

    u: torch.Tensor  # (P, m)
    v: torch.Tensor  # (P, n)
    source: torch.Tensor  # (P,) long, index of the source adapter
    ranks: list[int]  # nominal rank of each source on this module (0 where absent)
    shape: tuple[int, ...]  # the module weight's shape

    @property
    def size(self) -> int:
        return self.u.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.u.t() @ self.v).reshape(self.shape)


def _core_svd(b: torch.Tensor, a: torch.Tensor):
    """SVD of b @ a (b: …×m×R, a: …×R×n, batched) through thin QRs: (Q_b U, S, Q_a V), no σ dropped."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.transpose(-1, -2))
    uc, s, vch = torch.linalg.svd(rb @ ra.transpose(-1, -2), full_matrices=False)
    return qb @ uc, s, qa @ vch.transpose(-1, -2)


def _n_keep(s: torch.Tensor, rtol: float = _RTOL) -> torch.Tensor:
    """How many of the descending σ (…, R) exceed rtol·σ_max (0 when all are zero)."""
    if s.shape[-1] == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.long)
    top = s[..., :1]
    return ((s > rtol * top) & (top > 0)).sum(-1)


def _energy_rank(s: torch.Tensor, energy: float, max_rank: int | None) -> int:
    """Smallest rank keeping ``energy`` of Σσ² (all nonzero σ when energy >= 1), capped."""
    nz = int((s > _RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    r = nz
    if energy < 1 and nz:
        e = (s[:nz] ** 2).cumsum(0)
        r = min(nz, int((e < energy * e[-1]).sum()) + 1)
    return r if max_rank is None else min(r, max_rank)


def fold_factors(delta, weight: float = 1.0, *, kron_energy: float = 0.99,
                 kron_max_rank: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B: m×r, A: r×n) with B @ A = weight·ΔW (flattened), the scale split √|s| each side.

    LoraDelta: exact. KronDelta: exact SVDs of both Kronecker factors give the SVD of kron(w1, w2);
    the smallest rank keeping ``kron_energy`` of the energy (capped at ``kron_max_rank``) is kept
    (``kron_energy=1, kron_max_rank=None`` is exact). Any other delta with ``.delta()`` (LoHa, DoRA
    expansions) goes through a dense SVD with the same rule.
    """
    if isinstance(delta, LoraDelta):
        s = float(weight) * delta.scale
        root = math.sqrt(abs(s))
        return delta.up.float().flatten(1) * math.copysign(root, s), delta.down.float().flatten(1) * root
    if isinstance(delta, KronDelta):
        a = delta.factor1().float()
        b = delta.factor2().float().flatten(1)  # conv: flatten(kron(a, b4d)) == kron(a, b.flatten(1))
        ua, sa, vah = torch.linalg.svd(a, full_matrices=False)
        ub, sb, vbh = torch.linalg.svd(b, full_matrices=False)
        s = (sa[:, None] * sb[None, :]).flatten()
        s, order = torch.sort(s, descending=True, stable=True)
        r = _energy_rank(s, kron_energy, kron_max_rank)
        i, j = order[:r] // sb.numel(), order[:r] % sb.numel()
        c = float(weight) * float(delta.scale)
        root = (s[:r] * abs(c)).sqrt()
        left = (ua[:, None, i] * ub[None, :, j]).reshape(-1, r) * root * math.copysign(1.0, c)
        right = (vah.t()[:, None, i] * vbh.t()[None, :, j]).reshape(-1, r) * root
        return left, right.t()
    if hasattr(delta, "delta"):
        d = delta.delta().float().flatten(1) * float(weight)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = _energy_rank(s, kron_energy, kron_max_rank)
        root = s[:r].sqrt()
        return u[:, :r] * root, vh[:r] * root[:, None]
    raise StudioError(f"merging {type(delta).__name__} layers is not supported yet; convert the adapter to LoRA first")


def _fix_signs(u: torch.Tensor, v: torch.Tensor):
    """Flip each unit (rows of u: (…, R, m)) jointly so the largest-magnitude entry of u is positive."""
    if u.shape[-2] == 0 or u.shape[-1] == 0:
        return u, v
    s = torch.sign(u.gather(-1, u.abs().argmax(-1, keepdim=True)))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return u * s, v * s


def _canonical_batch(b: torch.Tensor, a: torch.Tensor):
    """Batched ``canonicalize`` without dropping: u (L, R, m), v (L, R, n), kept counts (L,)."""
    lu, s, lv = _core_svd(b, a)
    root = s.sqrt().unsqueeze(-1)
    u, v = _fix_signs(lu.transpose(-1, -2) * root, lv.transpose(-1, -2) * root)
    return u, v, _n_keep(s)


def canonicalize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauge-free units of the LoRA b @ a (b: m×r, a: r×n): rows u (R, m), v (R, n).

    Thin QR of b and aᵀ, SVD of the small core, u_j = √σ_j·Q_b U_j, v_j = √σ_j·Q_a V_j, units with
    σ <= 1e-6·σ_max dropped, sign fixed (largest |entry| of u_j positive). Σ u_j v_jᵀ = b @ a;
    ‖u_j‖ = ‖v_j‖; ordered by energy.
    """
    u, v, keep = _canonical_batch(b[None].float(), a[None].float())
    return u[0, : int(keep[0])].contiguous(), v[0, : int(keep[0])].contiguous()


def pool_modules(per_module: dict[str, Sequence], weights: Sequence[float], *, canonical: bool = True,
                 kron_energy: float = 0.99, kron_max_rank: int | None = 64) -> dict[str, UnitPool]:
    """``pool_units`` for many modules at once; canonicalisation is batched over same-shape factors."""
    items = []  # (module, source, b, a, nominal rank)
    for name, deltas in per_module.items():
        for i, (d, w) in enumerate(zip(deltas, weights)):
            if d is not None and w != 0:
                b, a = fold_factors(d, w, kron_energy=kron_energy, kron_max_rank=kron_max_rank)
                items.append([name, i, b, a, d.rank if isinstance(d, LoraDelta) else b.shape[1]])
    if canonical:
        groups: dict[tuple, list[int]] = {}
        for j, it in enumerate(items):
            groups.setdefault((tuple(it[2].shape), tuple(it[3].shape), it[2].device), []).append(j)
        for js in groups.values():
            u, v, keep = _canonical_batch(torch.stack([items[j][2] for j in js]), torch.stack([items[j][3] for j in js]))
            for row, j in enumerate(js):
                n = int(keep[row])
                items[j][2], items[j][3] = u[row, :n], v[row, :n]
    else:
        for it in items:
            it[2], it[3] = it[2].t(), it[3]
    by_module: dict[str, list] = {}
    for it in items:
        by_module.setdefault(it[0], []).append(it)
    pools = {}
    for name, its in by_module.items():
        ranks = [0] * len(weights)
        for it in its:
            ranks[it[1]] = it[4]
        src = torch.cat([torch.full((it[2].shape[0],), it[1], dtype=torch.long, device=it[2].device) for it in its])
        shape = tuple(next(d for d in per_module[name] if d is not None).weight_shape)
        pools[name] = UnitPool(torch.cat([it[2] for it in its]), torch.cat([it[3] for it in its]), src, ranks, shape)
    return pools


def pool_units(deltas: Sequence, weights: Sequence[float], *, canonical: bool = True,
               kron_energy: float = 0.99, kron_max_rank: int | None = 64) -> UnitPool | None:
    """Pool the rank-1 units of one module over sources (None = source lacks the module).

    Scale alpha/r and weight are folded in; with ``canonical`` each source is canonicalised
    (``canonicalize``), otherwise its raw folded factors are used (exact concatenation).
    Returns None when no source has the module (or all its weights are 0).
    """
    return pool_modules({"": deltas}, weights, canonical=canonical, kron_energy=kron_energy,
                        kron_max_rank=kron_max_rank).get("")


# --------------------------------------------------------------------------------------------
# Spherical k-means (on Gram matrices, batched over modules and restarts)
# --------------------------------------------------------------------------------------------


def _job_seed(seed: int, *parts) -> int:
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def _draws(seeds: Sequence[int], n_init: int, k: int, device) -> torch.Tensor:
    """(B, n_init, k) uniforms; restart r's draws do not depend on n_init."""
    out = []
    for sd in seeds:
        g = torch.Generator().manual_seed(int(sd))
        out.append(torch.stack([torch.rand(k, generator=g) for _ in range(n_init)]))
    return torch.stack(out).to(device)


def _grams(u: torch.Tensor, v: torch.Tensor, metric: str):
    """Gram matrices for the k-means: unit directions (rho) or raw [u; v] (paper)."""
    if metric == "rho":
        x1, x2 = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return x1 @ x1.transpose(-1, -2), x2 @ x2.transpose(-1, -2)
    return u @ u.transpose(-1, -2) + v @ v.transpose(-1, -2), None


def _kmeans_gram(g1, g2, k: int, rand: torch.Tensor, max_iter: int, metric: str):
    """k-means++ then Lloyd on Gram matrices g1, g2 (B, P, P); centroids as coefficients over points.

    rho: similarity cos(u, ū)·cos(v, v̄), centroid = normalised mean of jointly sign-aligned members.
    paper: similarity −‖[u; v] − c‖², centroid = plain mean. Returns labels, signs (B, P) and the
    objective Σ_p sim(p, centroid) (B,) of the best of the rand.shape[1] restarts.
    """
    bsz, p, _ = g1.shape
    n_init = rand.shape[1]
    rho = metric == "rho"
    if rho:
        dist = (1 - g1 * g2).clamp_min(0)
    else:
        dg = torch.diagonal(g1, dim1=1, dim2=2)
        dist = (dg[:, :, None] + dg[:, None, :] - 2 * g1).clamp_min(0)

    # k-means++ (probability ∝ distance to the nearest chosen centre; 1−ρ is the squared-chord analogue)
    rows = dist[:, None].expand(bsz, n_init, p, p)
    idx = torch.empty(bsz, n_init, k, dtype=torch.long, device=g1.device)
    dmin = None
    for t in range(k):
        if t == 0:
            pick = (rand[..., 0] * p).long().clamp_(max=p - 1)
        else:
            w = torch.where(dmin.sum(-1, keepdim=True) > 0, dmin, torch.ones_like(dmin))
            cdf = w.cumsum(-1)
            pick = torch.searchsorted(cdf, (rand[..., t] * cdf[..., -1]).unsqueeze(-1), right=True)
            pick = pick.squeeze(-1).clamp_(max=p - 1)
        idx[..., t] = pick
        d = rows.gather(2, pick[..., None, None].expand(bsz, n_init, 1, p)).squeeze(2)
        dmin = d if dmin is None else torch.minimum(dmin, d)
    coef = F.one_hot(idx, p).to(g1.dtype)  # (B, R, k, P)

    def assign(coef):
        wf = coef.reshape(bsz, n_init * k, p)
        if rho:
            d1 = torch.bmm(g1, wf.transpose(1, 2))
            d2 = torch.bmm(g2, wf.transpose(1, 2))
            n1 = (wf * torch.bmm(wf, g1)).sum(-1).clamp_min(1e-30).sqrt()
            n2 = (wf * torch.bmm(wf, g2)).sum(-1).clamp_min(1e-30).sqrt()
            cos1 = (d1 / n1[:, None]).view(bsz, p, n_init, k)
            sim = cos1 * (d2 / n2[:, None]).view(bsz, p, n_init, k)
        else:
            cross = torch.bmm(g1, wf.transpose(1, 2))
            cc = (wf * torch.bmm(wf, g1)).sum(-1)
            sim = -(torch.diagonal(g1, dim1=1, dim2=2)[:, :, None] - 2 * cross + cc[:, None]).view(bsz, p, n_init, k)
        if rho:
            # Canonical units of one source are exactly orthogonal (ρ = 0 in theory, ~1e-15 in
            # floats): compare on a 1e-6 grid so such ties go to the first cluster, not to noise.
            labels = torch.round(sim * 1e6).argmax(-1)  # (B, P, R)
            best = sim.gather(-1, labels[..., None]).squeeze(-1)
            c1 = cos1.gather(-1, labels[..., None]).squeeze(-1)
            signs = torch.where(c1 < -1e-5, -1.0, 1.0).to(sim.dtype)  # near-orthogonal: no flip
        else:
            best, labels = sim.max(-1)
            signs = torch.ones_like(best)
        return labels, signs, best.sum(1)

    def update(labels, signs, coef):
        onehot = F.one_hot(labels, k).to(g1.dtype)  # (B, P, R, k)
        count = onehot.sum(1)  # (B, R, k)
        new = (onehot * signs[..., None]).permute(0, 2, 3, 1)  # (B, R, k, P)
        if not rho:
            new = new / count.clamp_min(1)[..., None]
        return torch.where((count > 0)[..., None], new, coef)

    prev = None
    for _ in range(max_iter):
        labels, signs, _ = assign(coef)
        if prev is not None and torch.equal(labels, prev):
            break
        prev = labels
        coef = update(labels, signs, coef)
    labels, signs, obj = assign(coef)
    best = (torch.round(obj * 1e4) if rho else obj).argmax(-1)  # (B,); near-equal restarts: the first
    pick = best[:, None, None].expand(bsz, p, 1)
    return labels.gather(2, pick).squeeze(2), signs.gather(2, pick).squeeze(2), obj.gather(1, best[:, None]).squeeze(1)


def spherical_kmeans(u: torch.Tensor, v: torch.Tensor, k: int, *, n_init: int = 4, max_iter: int = 10,
                     seed: int | Sequence[int] = 0, metric: str = "rho"):
    """Cluster rank-1 units (rows of u: (P, m), v: (P, n), or batched (B, P, ·)) into k clusters.

    metric "rho": spherical k-means on ρ(a, b) = cos(u_a, u_b)·cos(v_a, v_b) (invariant to the joint
    flip (u, v) → (−u, −v)); "paper": Euclidean k-means on [u; v]. k-means++ init, ``n_init``
    restarts (the best Σρ wins), ``seed`` (one per batch entry, or one for all).
    Returns (labels (…, P) long, signs (…, P) ±1: the joint flip aligning each unit with its
    centroid, objective (…)).
    """
    single = u.dim() == 2
    if single:
        u, v = u[None], v[None]
    if metric not in ("rho", "paper"):
        raise StudioError(f"unknown LEGO metric {metric!r}; use 'rho' or 'paper'")
    p = u.shape[1]
    if not 1 <= k <= p:
        raise StudioError(f"k-means needs 1 <= k <= {p} (the number of units), got k={k}")
    seeds = [seed] * u.shape[0] if isinstance(seed, int) else list(seed)
    g1, g2 = _grams(u.float(), v.float(), metric)
    out = _kmeans_gram(g1, g2, k, _draws(seeds, n_init, k, u.device), max_iter, metric)
    return tuple(t[0] for t in out) if single else out


def cluster_centroids(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, signs: torch.Tensor, k: int,
                      magnitude: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reassemble clusters into units: mean of the sign-aligned members' (u, v), then magnitude.

    magnitude "mean": rescale to the members' mean ‖u‖‖v‖ (LEGO parameter reweighting); "sum":
    least-squares scalar reproducing the members' sum; "none": the plain mean. Empty clusters are
    dropped. Returns (ū (K, m), v̄ (K, n), kept cluster ids (K,)).
    """
    onehot = F.one_hot(labels, k).to(u.dtype).t()  # (k, P)
    count = onehot.sum(1)
    keep = count > 0
    onehot, count = onehot[keep], count[keep][:, None]
    cu = (onehot * signs) @ u / count
    cv = (onehot * signs) @ v / count
    nu, nv = cu.norm(dim=1), cv.norm(dim=1)
    if magnitude == "mean":
        mu = onehot @ (u.norm(dim=1) * v.norm(dim=1)) / count[:, 0]
        f = torch.where(nu * nv > 0, (mu / (nu * nv).clamp_min(1e-30)).sqrt(), torch.zeros_like(mu))
        cu, cv = cu * f[:, None], cv * f[:, None]
    elif magnitude == "sum":
        c = (onehot * ((cu @ u.t()) * (cv @ v.t()))).sum(1) / ((nu * nv) ** 2).clamp_min(1e-30)
        cu, cv = cu * (c.abs().sqrt() * torch.sign(c))[:, None], cv * c.abs().sqrt()[:, None]
    elif magnitude != "none":
        raise StudioError(f"unknown LEGO magnitude {magnitude!r}; use 'mean', 'sum' or 'none'")
    return cu, cv, keep.nonzero().flatten()


def _fit_scales(cu, cv, u, v):
    """Least-squares per-unit scales c minimising ‖Σ c_j ū_j v̄_jᵀ − Σ_p u_p v_pᵀ‖_F."""
    gram = (cu @ cu.t()) * (cv @ cv.t())
    rhs = ((cu @ u.t()) * (cv @ v.t())).sum(1)
    c = torch.linalg.pinv(gram, rtol=1e-7, hermitian=True) @ rhs
    return cu * (c.abs().sqrt() * torch.sign(c))[:, None], cv * c.abs().sqrt()[:, None]


# --------------------------------------------------------------------------------------------
# SVD and TIES/DARE on ΔW
# --------------------------------------------------------------------------------------------


def truncated_svd(u: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-k truncated SVD of ΔW = uᵀ v (u: (P, m), v: (P, n)) without forming ΔW.

    Returns (B = U_k S_k: m×k', A = V_kᵀ: k'×n), k' = min(k, rank).
    """
    lu, s, lv = _core_svd(u.t(), v)
    k = min(k, int(_n_keep(s)))
    return lu[:, :k] * s[:k], lv[:, :k].t()


def _dense_svd(d: torch.Tensor, k: int, solver: str, seed: int):
    """Rank-k factors (U_k S_k, V_kᵀ) of a dense matrix; "lowrank" = seeded randomized subspace
    iteration (q = k + 16, 4 power iterations) with a local generator (no global RNG state)."""
    q = min(k + 16, *d.shape)
    if solver == "lowrank" and q < min(d.shape):
        g = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(d @ torch.randn(d.shape[1], q, generator=g).to(d)).Q
        for _ in range(4):
            basis = torch.linalg.qr(d @ torch.linalg.qr(d.t() @ basis).Q).Q
        ub, s, v = torch.linalg.svd(basis.t() @ d, full_matrices=False)
        u = basis @ ub
    else:
        u, s, v = torch.linalg.svd(d, full_matrices=False)
    k = min(k, int(_n_keep(s)))
    return u[:, :k] * s[:k], v[:k]


def ties_merge(tasks: torch.Tensor, weights: Sequence[float], density: float = 0.2,
               majority_sign_method: str = "total", *, dare: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES (or DARE-TIES) on stacked ΔW's (N, …), PEFT's ``ties``/``dare_ties`` semantics.

    Trim: keep the top-``density`` fraction of |ΔW_i| per task (``dare``: keep each entry with
    probability ``density`` and rescale by 1/density). Elect: majority sign of Σ trimmed ΔW_i
    ("total") or of Σ sign ("frequency"), ties → +. Disjoint mean: Σ w_i·ΔW_i over tasks agreeing
    with the majority, divided by max(1, their count).
    """
    tasks = tasks.float()
    if density < 1:
        flat = tasks.flatten(1)
        if dare:
            keep = torch.rand(flat.shape, generator=generator, device="cpu").to(flat.device) < density
            flat = flat * keep / density
        else:
            n = int(density * flat.shape[1])  # PEFT's top-k count; a k-th value threshold is cheaper
            if n > 0:
                mag = flat.abs()
                flat = flat * (mag >= mag.kthvalue(flat.shape[1] - n + 1, dim=1, keepdim=True).values)
            else:
                flat = torch.zeros_like(flat)
        tasks = flat.view_as(tasks)
    sign = tasks.sign()
    if majority_sign_method == "total":
        mag = tasks.sum(0)
    elif majority_sign_method == "frequency":
        mag = sign.sum(0)
    else:
        raise StudioError(f"unknown majority_sign_method {majority_sign_method!r}; use 'total' or 'frequency'")
    agree = sign == torch.where(mag >= 0, 1.0, -1.0)
    w = torch.as_tensor(list(weights), dtype=tasks.dtype, device=tasks.device).view(-1, *[1] * (tasks.dim() - 1))
    return (tasks * w * agree).sum(0) / agree.sum(0).clamp_min(1)


def _clamp(b: torch.Tensor, a: torch.Tensor, q: float | None):
    """kohya's svd_merge_lora clamp: both factors to ±quantile_q of their entries (lossy)."""
    if q is None:
        return b, a
    hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), float(q))
    return b.clamp(-hi, hi), a.clamp(-hi, hi)


# --------------------------------------------------------------------------------------------
# merge_adapters
# --------------------------------------------------------------------------------------------


def _common_arch(adapters: Sequence[Adapter]) -> str | None:
    seen: dict[str, str] = {}
    for a in adapters:
        if a.arch is not None:
            seen.setdefault(a.arch, a.name)
    if len(seen) > 1:
        (a1, n1), (a2, n2) = list(seen.items())[:2]
        raise AdapterMismatchError(
            f"cannot merge adapters made for different bases: {n1!r} is {a1}, {n2!r} is {a2}; merge adapters of one base model")
    return next(iter(seen), None)


def _options(method: str, options: dict) -> dict:
    valid = _OPTIONS[method]
    bad = sorted(set(options) - set(valid) - {"dtype"})
    if bad:
        names = ", ".join(sorted([*valid, "dtype"]))
        raise StudioError(f"unknown option(s) {', '.join(bad)} for merge method {method!r}; valid: {names}")
    opts = {**valid, "dtype": None, **options}
    if method == "lego":
        if opts["magnitude"] is None:
            opts["magnitude"] = "mean" if opts["reweight"] else "none"
        if opts["magnitude"] not in ("mean", "sum", "none"):
            raise StudioError(f"unknown LEGO magnitude {opts['magnitude']!r}; use 'mean', 'sum' or 'none'")
        if opts["metric"] not in ("rho", "paper"):
            raise StudioError(f"unknown LEGO metric {opts['metric']!r}; use 'rho' or 'paper'")
        if opts["r_ref"] not in ("max", "mean"):
            raise StudioError(f"unknown r_ref {opts['r_ref']!r}; use 'max' or 'mean'")
        if int(opts["n_init"]) < 1 or int(opts["max_iter"]) < 1:
            raise StudioError("n_init and max_iter must be >= 1")
    if method.endswith("ties_svd"):
        if not 0 < float(opts["density"]) <= 1:
            raise StudioError(f"density must be in (0, 1], got {opts['density']}")
        if opts["svd_solver"] not in ("full", "lowrank"):
            raise StudioError(f"unknown svd_solver {opts['svd_solver']!r}; use 'full' or 'lowrank'")
    if opts.get("clamp_quantile") is not None and not 0 < float(opts["clamp_quantile"]) <= 1:
        raise StudioError(f"clamp_quantile must be in (0, 1], got {opts['clamp_quantile']}")
    if "kron_energy" in opts and not 0 < float(opts["kron_energy"]) <= 1:
        raise StudioError(f"kron_energy must be in (0, 1], got {opts['kron_energy']}")
    return opts


def _lora(b: torch.Tensor, a: torch.Tensor, shape: tuple[int, ...], dtype) -> LoraDelta:
    """Output factors (B: m×k, A: k×n flattened) as a LoraDelta with alpha = k (scale 1)."""
    k = a.shape[0]
    if len(shape) == 4:
        a, b = a.reshape(k, *shape[1:]), b.reshape(shape[0], k, 1, 1)
        return LoraDelta(a.to(dtype).contiguous(), b.to(dtype).contiguous(), float(k))
    return LoraDelta(a.to(dtype).contiguous(), b.to(dtype).contiguous(), float(k))


def _out_dtype(adapters, requested):
    if requested is not None:
        allowed = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        dt = allowed.get(requested) if isinstance(requested, str) else requested
        if dt not in allowed.values():
            from ..errors import StudioError

            raise StudioError(f"dtype {requested!r} is not a dtype adapters are written in; choose one of "
                              f"{', '.join(allowed)}")
        return dt
    dts = {t.dtype for a in adapters for d in a.layers.values() for t in vars(d).values()
           if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return dts.pop() if len(dts) == 1 else torch.float32


def _nominal_rank(d, kron: dict) -> int:
    """A LoRA's rank; for other layers, the rank their unit reduction keeps."""
    return d.rank if isinstance(d, LoraDelta) else fold_factors(d, 1.0, **kron)[0].shape[1]


def _check_rank(k: int | None, limit: int, what: str):
    if k is None:
        return
    if k < 1:
        raise StudioError(f"merge rank must be >= 1, got {k}")
    if k > limit:
        raise StudioError(f"merge rank {k} is larger than {what} ({limit}); pick a rank between 1 and {limit}")


def _merge_lego(pools: dict[str, UnitPool], k: int | None, seed: int, opts: dict, n_src: int):
    metric, n_init, max_iter = opts["metric"], int(opts["n_init"]), int(opts["max_iter"])
    quotas = opts["quotas"]
    # jobs: (layer, point indices, k_job); k-means jobs are grouped by (P, k_job) and batched
    jobs: list[tuple[str, torch.Tensor, int, str]] = []
    for name, pool in pools.items():
        k_l = k if k is not None else max(pool.ranks)
        if quotas is None:
            jobs.append((name, torch.arange(pool.size, device=pool.u.device), k_l, "all"))
            continue
        present = [i for i in range(n_src) if (pool.source == i).any()]
        avail = {i: int((pool.source == i).sum()) for i in present}
        if quotas == "equal":
            base, extra = divmod(k_l, len(present))
            order = sorted(present, key=lambda i: -avail[i])
            q = {i: base + (1 if j < extra else 0) for j, i in enumerate(order)}
        else:
            q = {i: int(quotas[i]) for i in present}
        q = {i: min(q[i], avail[i]) for i in present}
        left = (k_l if quotas == "equal" else sum(quotas)) - sum(q.values())
        for i in sorted(present, key=lambda i: -(avail[i] - q[i])):  # hand unused quota to others
            add = min(left, avail[i] - q[i])
            q[i] += add
            left -= add
        for i in present:
            if q[i] > 0:
                jobs.append((name, (pool.source == i).nonzero().flatten(), q[i], str(i)))

    results: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (name, pts, kj, tag) in enumerate(jobs):
        if kj >= pts.numel():  # short-circuit: every unit is its own cluster
            results[j] = (torch.arange(pts.numel(), device=pts.device), torch.ones(pts.numel(), device=pts.device), pts.numel())
        else:
            groups.setdefault((pts.numel(), kj), []).append(j)
    for (p, kj), members in groups.items():
        g1s, g2s = [], []
        for j in members:
            pool, pts = pools[jobs[j][0]], jobs[j][1]
            g1, g2 = _grams(pool.u[pts], pool.v[pts], metric)
            g1s.append(g1)
            g2s.append(g2)
        g1 = torch.stack(g1s)
        g2 = torch.stack(g2s) if metric == "rho" else None
        rand = _draws([_job_seed(seed, jobs[j][0], jobs[j][3]) for j in members], n_init, kj, g1.device)
        labels, signs, _ = _kmeans_gram(g1, g2, kj, rand, max_iter, metric)
        for b, j in enumerate(members):
            results[j] = (labels[b], signs[b], kj)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    share = torch.zeros(n_src)
    n_clusters = 0
    per_layer: dict[str, list] = {}
    for j, (name, pts, _, _) in enumerate(jobs):
        per_layer.setdefault(name, []).append(j)
    for name, js in per_layer.items():
        pool = pools[name]
        cus, cvs = [], []
        for j in js:
            pts = jobs[j][1]
            labels, signs, kj = results[j]
            u, v = pool.u[pts], pool.v[pts]
            cu, cv, kept = cluster_centroids(u, v, labels, signs, kj, opts["magnitude"])
            cus.append(cu)
            cvs.append(cv)
            member = F.one_hot(labels, kj).t()[kept].float() @ F.one_hot(pool.source[pts], n_src).float()
            share += (member > 0).sum(0).cpu()
            n_clusters += member.shape[0]
        cu, cv = torch.cat(cus), torch.cat(cvs)
        if opts["fit"]:
            cu, cv = _fit_scales(cu, cv, pool.u, pool.v)
        elif opts["reweight"]:
            ranks = [r for r in pool.ranks if r > 0]
            r_ref = max(ranks) if opts["r_ref"] == "max" else sum(ranks) / len(ranks)
            f = (r_ref / cu.shape[0]) ** 0.25  # √(r/k) on ΔW, split over both factors
            cu, cv = cu * f, cv * f
        out[name] = (cu.t(), cv)
    return out, (share / max(n_clusters, 1)).tolist()


def merge_adapters(adapters: list[Adapter], weights: list[float] | None = None, method: str = "lego",
                   rank: int | None = None, *, seed: int = 0, name: str = "merged", **options) -> Adapter:
    """Merge N adapters into one ordinary LoRA (LoraDelta layers, alpha = rank so scale 1).

    ``weights`` default to each adapter's preferred ``weight``; the scale alpha/r and the weight are
    applied once. A module missing from an adapter counts as zero for it. ``rank`` (k) defaults to
    the largest source rank on each module.

    Methods (per module):
      - ``lego``: LoRA-LEGO as in the spec: pool rank-1 units, canonicalise each source, spherical
        k-means into k clusters, centroids → rank-k LoRA, dual reweighting. Options: ``metric``
        ("rho" | "paper"), ``n_init`` 4, ``max_iter`` 10, ``reweight`` True (parameter + output
        reweighting √(r_ref/k)), ``magnitude`` ("mean" | "sum" | "none"; default "mean", "none"
        when reweight is off), ``r_ref`` ("max" | "mean"), ``quotas`` (None | "equal" | ints per
        source, summing to k: each source is clustered into its own share), ``fit`` (least-squares
        per-unit scales reproducing the summed ΔW; replaces the output reweighting),
        ``kron_energy`` 0.99 / ``kron_max_rank`` 64 (Kronecker → units). With magnitude "mean" LEGO
        *averages* (two identical LoRAs merge to one copy); ``cat``/runtime multi-adapter *sum*.
      - ``cat``: exact concatenation of the scaled units; output rank = Σ source ranks; ``rank``
        must be None. ΔW equals runtime multi-adapter exactly (Kronecker sources up to kron_energy).
      - ``linear``: PEFT ``add_weighted_adapter(..., "linear")`` semantics, for compatibility:
        A = Σ sign(w_i s_i)√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i. This is NOT the weighted sum of ΔW's:
        it contains cross-terms B_i A_j. All LoRA sources must share the rank on each module.
      - ``svd``: ΔW = Σ w_i (alpha_i/r_i) B_i A_i (scale applied once), exact truncated SVD to rank
        k (computed through QR of the stacked factors); B = U_k S_k, A = V_kᵀ. Option
        ``clamp_quantile`` (kohya's lossy clamp; off by default).
      - ``ties_svd`` / ``dare_ties_svd``: TIES / DARE-TIES on the per-source ΔW's (``ties_merge``),
        then truncated SVD to rank k. Options ``density`` 0.2, ``majority_sign_method`` "total",
        ``svd_solver`` ("lowrank": seeded randomized top-k SVD, q = k+16, 4 power
        iterations, ~50× faster than "full" on CPU at 1280² with the same residual to ~1e-5;
        "full": exact ``torch.linalg.svd``), ``clamp_quantile``. DARE masks are drawn from a
        generator seeded by (seed, module), so a module's result does not depend on the others.
    Every method accepts ``dtype`` (output dtype; default: the sources' common dtype, else fp32).

    The result's metadata records method, sources (name + sha256), weights, rank, seed and the
    resolved options (JSON strings); its ``arch`` is the sources' common arch.
    """
    if not adapters:
        raise StudioError("merge needs at least one adapter; pass the adapters to merge")
    if method not in METHODS:
        raise StudioError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}")
    if weights is None:
        weights = [float(a.weight) for a in adapters]
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise StudioError(f"merge weights must be numbers, got {weights!r}") from None
    if len(weights) != len(adapters):
        raise StudioError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise StudioError(f"merge weights must be finite numbers, got {weights}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank):
        raise StudioError(f"merge rank must be a whole number, got {rank!r}")
    rank = None if rank is None else int(rank)
    if rank is not None and rank < 1:
        raise StudioError(f"merge rank must be >= 1, got {rank}")
    arch = _common_arch(adapters)
    opts = _options(method, options)
    dtype = _out_dtype(adapters, opts["dtype"])

    names = sorted(set().union(*(a.layers for a in adapters)))
    per_layer: dict[str, list] = {}
    for n in names:
        ds = [a.layers.get(n) for a in adapters]
        shapes = {tuple(d.weight_shape) for d in ds if d is not None}
        if len(shapes) > 1:
            got = ", ".join(f"{a.name}: {tuple(d.weight_shape)}" for a, d in zip(adapters, ds) if d is not None)
            raise AdapterMismatchError(f"module {n} has different shapes across adapters ({got}); merge adapters of one base model")
        per_layer[n] = ds

    layers: dict[str, LoraDelta] = {}
    share = None
    kron = {"kron_energy": float(opts.get("kron_energy", _KRON["kron_energy"])),
            "kron_max_rank": opts.get("kron_max_rank", _KRON["kron_max_rank"])}
    if method in ("lego", "cat"):
        pools = pool_modules(per_layer, weights, canonical=(method == "lego" and opts["metric"] == "rho"), **kron)
        if method == "cat":
            if rank is not None:
                raise StudioError("method 'cat' keeps every unit (output rank = sum of source ranks); "
                                  "omit rank, or use 'lego' or 'svd' to choose one")
            for n, p in pools.items():
                layers[n] = _lora(p.u.t(), p.v, p.shape, dtype)
        else:
            if opts["quotas"] not in (None, "equal"):
                q = list(opts["quotas"])
                if len(q) != len(adapters) or any(int(x) < 0 for x in q):
                    raise StudioError(f"quotas must be 'equal' or one non-negative int per adapter ({len(adapters)}), got {q}")
                opts["quotas"] = q = [int(x) for x in q]
                if rank is not None and sum(q) != rank:
                    raise StudioError(f"quotas {q} sum to {sum(q)}, not the rank {rank}; make them sum to the rank")
            _check_rank(rank, max((sum(p.ranks) for p in pools.values()), default=0),
                        "the number of rank-1 units pooled from the sources")
            merged, share = _merge_lego(pools, rank, seed, opts, len(adapters))
            for n, (b, a) in merged.items():
                if a.shape[0]:
                    layers[n] = _lora(b, a, pools[n].shape, dtype)
    elif method == "linear":
        for n, ds in per_layer.items():
            present = [(d, w) for d, w in zip(ds, weights) if d is not None]
            if any(not isinstance(d, LoraDelta) for d, _ in present):
                raise StudioError(f"method 'linear' merges LoRA factors only; module {n} has a non-LoRA layer; "
                                  "use 'cat', 'svd' or 'lego'")
            if len({d.rank for d, _ in present}) > 1:
                got = sorted({d.rank for d, _ in present})
                raise StudioError(f"method 'linear' needs equal ranks, module {n} has ranks {got}; use 'cat', 'svd' or 'lego'")
            if rank is not None and rank != present[0][0].rank:
                raise StudioError(f"method 'linear' keeps the source rank ({present[0][0].rank}); omit rank or use 'svd' or 'lego'")
            b = sum(math.sqrt(abs(w * d.scale)) * d.up.float() for d, w in present)
            a = sum(math.copysign(math.sqrt(abs(w * d.scale)), w * d.scale) * d.down.float() for d, w in present)
            layers[n] = LoraDelta(a.to(dtype), b.to(dtype), float(a.shape[0]))
    elif method == "svd":
        pools = pool_modules(per_layer, weights, canonical=False, kron_energy=1.0, kron_max_rank=None)
        _check_rank(rank, max((sum(p.ranks) for p in pools.values()), default=0), "the total rank of the sources")
        for n, p in pools.items():
            k = rank if rank is not None else max(p.ranks)
            b, a = _clamp(*truncated_svd(p.u, p.v, k), opts["clamp_quantile"])
            if a.shape[0]:
                layers[n] = _lora(b, a, p.shape, dtype)
    else:  # ties_svd, dare_ties_svd
        dare = method == "dare_ties_svd"
        shapes = {n: tuple(next(d for d in ds if d is not None).weight_shape) for n, ds in per_layer.items()}
        _check_rank(rank, max((min(s[0], math.prod(s[1:])) for s in shapes.values()), default=0),
                    "the largest module's full rank")
        for n, ds in per_layer.items():
            shape = shapes[n]
            m, cols = shape[0], math.prod(shape[1:])
            dense = [None if d is None else d.delta().float().reshape(m, cols) for d in ds]
            ref = next(t for t in dense if t is not None)
            tasks = torch.stack([torch.zeros_like(ref) if t is None else t for t in dense])
            g = torch.Generator().manual_seed(_job_seed(seed, n, "dare")) if dare else None
            merged = ties_merge(tasks, weights, float(opts["density"]), opts["majority_sign_method"], dare=dare, generator=g)
            k = rank if rank is not None else max(_nominal_rank(d, kron) for d in ds if d is not None)
            b, a = _dense_svd(merged, k, opts["svd_solver"], _job_seed(seed, n, "svd"))
            b, a = _clamp(b, a, opts["clamp_quantile"])
            if a.shape[0]:
                layers[n] = _lora(b, a, shape, dtype)

    shown = {key: (str(val) if not isinstance(val, (list, tuple)) else [str(x) for x in val])
             for key, val in opts.items() if key != "dtype"}
    shown["dtype"] = str(dtype).replace("torch.", "")
    metadata = {
        "merge_method": method,
        "merge_sources": json.dumps([{"name": a.name, "sha256": a.sha256} for a in adapters]),
        "merge_weights": json.dumps(weights),
        "merge_rank": "auto" if rank is None and method != "cat" else (str(rank) if rank is not None else "sum"),
        "merge_seed": str(seed),
        "merge_options": json.dumps(shown, sort_keys=True),
    }
    if share is not None:
        metadata["merge_cluster_share"] = json.dumps({a.name: round(s, 4) for a, s in zip(adapters, share)})
    triggers = list(dict.fromkeys(t for a in adapters if a.trigger for t in [a.trigger]))
    return Adapter(name, layers, kind="lora", arch=arch, trigger=", ".join(triggers) or None, metadata=metadata)
