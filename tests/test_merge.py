"""Weight-space merges (studio/adapters/merge.py): LoRA-LEGO and the baselines (spec: lego.md §4)."""

from __future__ import annotations

import json

import pytest
import torch

from studio.adapters.adapter import Adapter, KronDelta, LoraDelta
from studio.adapters.merge import (
    METHODS,
    canonicalize,
    merge_adapters,
    pool_units,
    spherical_kmeans,
    ties_merge,
)
from studio.errors import AdapterMismatchError, StudioError


def lora(m, n, r, alpha=None, seed=0, kernel=None):
    g = torch.Generator().manual_seed(seed)
    if kernel:
        return LoraDelta(torch.randn(r, n, kernel, kernel, generator=g) / n, torch.randn(m, r, 1, 1, generator=g) / r**0.5, alpha)
    return LoraDelta(torch.randn(r, n, generator=g) / n**0.5, torch.randn(m, r, generator=g) / r**0.5, alpha)


def adapter(name, layers, arch="sd1", **kw):
    return Adapter(name, layers, arch=arch, sha256=name * 8, **kw)


def dw(a: Adapter, key: str) -> torch.Tensor:
    return a.layers[key].delta()


def close(x, y, tol=1e-5):
    return float((x - y).norm() / y.norm().clamp_min(1e-12)) < tol


@pytest.fixture
def three():
    """Three adapters with different ranks and alphas; module "y" only in the first two."""
    a = adapter("a", {"x": lora(24, 40, 4, alpha=1.0, seed=1), "y": lora(16, 12, 3, seed=2)})
    b = adapter("b", {"x": lora(24, 40, 6, alpha=12.0, seed=3), "y": lora(16, 12, 2, alpha=4.0, seed=4)})
    c = adapter("c", {"x": lora(24, 40, 2, seed=5)})
    return [a, b, c], [0.7, 1.3, -0.5]


def weighted_sum(adapters, weights, key):
    return sum(w * a.layers[key].delta() for a, w in zip(adapters, weights) if key in a.layers)


# ---------------------------------------------------------------- exactness ------------------


def test_cat_is_the_exact_weighted_sum(three):
    ads, w = three
    m = merge_adapters(ads, w, "cat")
    for key in ("x", "y"):
        assert close(dw(m, key), weighted_sum(ads, w, key))
    assert m.layers["x"].rank == 12 and m.layers["y"].rank == 5 and m.layers["x"].scale == 1.0


def test_lego_full_rank_without_reweighting_equals_cat(three):
    ads, w = three
    cat = merge_adapters(ads, w, "cat")
    for metric in ("rho", "paper"):
        m = merge_adapters(ads, w, "lego", 12, reweight=False, metric=metric)
        for key in ("x", "y"):
            assert close(dw(m, key), dw(cat, key)), (metric, key)


def test_lego_one_adapter_k_equals_r_reproduces_it():
    a = adapter("a", {"x": lora(30, 20, 5, alpha=2.0, seed=7)})
    for opts in ({}, {"reweight": False}, {"magnitude": "sum"}, {"fit": True}):
        m = merge_adapters([a], [1.0], "lego", 5, **opts)
        assert close(dw(m, "x"), dw(a, "x")), opts
        assert m.layers["x"].rank == 5


def test_alpha_not_equal_rank_is_applied_once():
    a = adapter("a", {"x": lora(20, 32, 16, alpha=1.0, seed=1)})  # runtime scale 1/16
    truth = 0.8 * a.layers["x"].scale * (a.layers["x"].up @ a.layers["x"].down)
    for method, k in (("cat", None), ("lego", 16), ("svd", 16), ("ties_svd", 16)):
        opts = {"density": 1.0} if method == "ties_svd" else {}
        m = merge_adapters([a], [0.8], method, k, **opts)
        assert close(dw(m, "x"), truth, 1e-4), method


def test_svd_applies_scale_once_peft_double_scaling_regression(three):
    """Spec §2.2: PEFT's *_svd types once computed Σ w_i s_i²·B_iA_i; ours is Σ w_i s_i·B_iA_i."""
    ads, w = three
    truth = weighted_sum(ads, w, "x")
    double = sum(wi * a.layers["x"].scale * a.layers["x"].delta() for a, wi in zip(ads, w))
    full = merge_adapters(ads, w, "svd", 12)
    assert close(dw(full, "x"), truth)
    assert not close(dw(full, "x"), double, 0.1)
    # below full rank: exactly the truncated SVD of the true sum
    u, s, vh = torch.linalg.svd(truth)
    m = merge_adapters(ads, w, "svd", 5)
    assert close(dw(m, "x"), (u[:, :5] * s[:5]) @ vh[:5], 1e-4)
    assert m.layers["x"].rank == 5 and m.layers["x"].scale == 1.0


def _peft_model(ads, targets):
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Linear(40, 24, bias=False)

    net = Net()
    model = None
    for a in ads:
        d = a.layers["x"]
        cfg = peft.LoraConfig(r=d.rank, lora_alpha=d.alpha if d.alpha is not None else d.rank, target_modules=targets)
        if model is None:
            model = peft.get_peft_model(net, cfg, adapter_name=a.name)
        else:
            model.add_adapter(a.name, cfg)
        layer = model.base_model.model.x
        layer.lora_A[a.name].weight.data = d.down.clone()
        layer.lora_B[a.name].weight.data = d.up.clone()
    return model, model.base_model.model.x


def test_svd_and_linear_agree_with_installed_peft():
    ads = [adapter("p", {"x": lora(24, 40, 4, alpha=1.0, seed=1)}), adapter("q", {"x": lora(24, 40, 4, alpha=12.0, seed=3)})]
    w = [0.7, -0.4]
    model, layer = _peft_model(ads, ["x"])
    model.add_weighted_adapter(["p", "q"], w, "lin", combination_type="linear")
    ours = merge_adapters(ads, w, "linear")
    assert close(dw(ours, "x"), layer.get_delta_weight("lin"))
    model.add_weighted_adapter(["p", "q"], w, "svd", combination_type="svd", svd_rank=8)
    peft_svd, ours = layer.get_delta_weight("svd"), dw(merge_adapters(ads, w, "svd", 8), "x")
    assert close(ours, weighted_sum(ads, w, "x"))
    if not close(peft_svd, ours, 1e-4):
        pytest.skip("this PEFT version double-scales its *_svd merges (lego.md §2.2); ours is the true sum")


def test_linear_has_peft_cross_terms():
    ads = [adapter("p", {"x": lora(8, 6, 3, seed=1)}), adapter("q", {"x": lora(8, 6, 3, seed=2)})]
    p, q = ads[0].layers["x"], ads[1].layers["x"]
    m = merge_adapters(ads, [1.0, -1.0], "linear")
    assert close(dw(m, "x"), (p.up + q.up) @ (p.down - q.down))


def test_ties_matches_peft_and_reduces_to_the_weighted_delta():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    tasks = torch.randn(3, 20, 30)
    w = [1.0, 0.5, -0.7]
    for method in ("total", "frequency"):
        ours = ties_merge(tasks, w, 0.3, method)
        ref = merge_utils.ties(list(tasks), torch.tensor(w), 0.3, method)
        assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ties_merge(tasks[:1], [0.6], 1.0), 0.6 * tasks[0])
    a = adapter("a", {"x": lora(12, 10, 3, alpha=6.0, seed=1)})
    for method in ("ties_svd", "dare_ties_svd"):
        assert close(dw(merge_adapters([a], [0.6], method, 3, density=1.0), "x"), 0.6 * dw(a, "x"), 1e-4)
    big = adapter("b", {"x": lora(80, 64, 3, seed=2)})  # big enough for the randomized solver
    for solver in ("lowrank", "full"):
        m = merge_adapters([big], [0.6], "ties_svd", 3, density=1.0, svd_solver=solver)
        assert close(dw(m, "x"), 0.6 * dw(big, "x"), 1e-4)
    two = [big, adapter("c", {"x": lora(80, 64, 3, seed=3)})]
    err = {s: float((lambda t: (dw(merge_adapters(two, [1, 1], "ties_svd", 4, svd_solver=s), "x") - t).norm())(
        ties_merge(torch.stack([dw(b, "x") for b in two]), [1, 1], 0.2))) for s in ("lowrank", "full")}
    assert err["lowrank"] <= err["full"] * 1.01  # randomized top-k is as good as the exact SVD


def test_dare_is_seeded():
    ads = [adapter("a", {"x": lora(12, 10, 3, seed=1)}), adapter("b", {"x": lora(12, 10, 3, seed=2)})]
    m1, m2 = (merge_adapters(ads, [1, 1], "dare_ties_svd", 3, seed=5, density=0.5) for _ in range(2))
    m3 = merge_adapters(ads, [1, 1], "dare_ties_svd", 3, seed=6, density=0.5)
    assert torch.equal(dw(m1, "x"), dw(m2, "x")) and not torch.equal(dw(m1, "x"), dw(m3, "x"))


# ---------------------------------------------------------------- invariances ----------------


def test_permuting_gauge_and_joint_flips_change_nothing(three):
    ads, w = three
    b = ads[1].layers["x"]
    g = torch.Generator().manual_seed(9)
    perm = torch.randperm(b.rank, generator=g)
    flips = torch.tensor([1.0, -1, -1, 1, -1, 1])
    gauge = torch.eye(b.rank) + 0.3 * torch.randn(b.rank, b.rank, generator=g)
    variants = [
        LoraDelta(b.down[perm], b.up[:, perm], b.alpha),
        LoraDelta(b.down * flips[:, None], b.up * flips, b.alpha),
        LoraDelta(torch.linalg.solve(gauge, b.down), b.up @ gauge, b.alpha),
    ]
    ref = merge_adapters(ads, w, "lego", 5)
    for v in variants:
        alt = [ads[0], adapter("b", {**ads[1].layers, "x": v}), ads[2]]
        assert close(dw(merge_adapters(alt, w, "lego", 5), "x"), dw(ref, "x"), 1e-4)


def test_canonical_units_reproduce_the_lora_and_are_balanced():
    d = lora(20, 15, 6, seed=3)
    u, v = canonicalize(d.up, d.down)
    assert close(u.t() @ v, d.up @ d.down)
    assert torch.allclose(u.norm(dim=1), v.norm(dim=1), rtol=1e-4)
    assert bool((u.norm(dim=1)[:-1] >= u.norm(dim=1)[1:]).all())
    pool = pool_units([d, None, LoraDelta(d.down, torch.zeros_like(d.up))], [2.0, 1.0, 1.0])
    assert pool.size == 6 and pool.ranks == [6, 0, 6]  # the all-zero source contributes no units
    assert close(pool.delta(), 2 * d.delta())


def _orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))[0].t()


def test_sign_flipped_copies_of_a_unit_land_in_one_cluster():
    us, vs = _orthonormal(30, 4, 1), _orthonormal(20, 4, 2)
    u = torch.stack([us[0], us[1], -us[0], us[2], us[3], -us[1]]) * torch.tensor([[2.0], [1], [2], [1], [1], [1]])
    v = torch.stack([vs[0], vs[1], -vs[0], vs[2], vs[3], -vs[1]])
    labels, signs, _ = spherical_kmeans(u, v, 4, seed=3)
    assert labels[0] == labels[2] and labels[1] == labels[5]
    assert len(set(labels.tolist())) == 4
    # same through merge_adapters: two sources sharing a jointly flipped unit
    a = adapter("a", {"x": LoraDelta(vs[:2] * torch.tensor([[2.0], [1]]), us[:2].t())})
    b = adapter("b", {"x": LoraDelta(torch.stack([-vs[0], vs[2]]) * 2, torch.stack([-us[0], us[2]]).t())})
    m = merge_adapters([a, b], [1, 1], "lego", 3, reweight=False)
    expected = 2 * torch.outer(us[0], vs[0]) + torch.outer(us[1], vs[1]) + 2 * torch.outer(us[2], vs[2])
    assert close(dw(m, "x"), expected, 1e-5)  # the shared unit is averaged, not doubled


def test_identical_loras_mean_gives_one_copy_sum_gives_two():
    d = lora(20, 16, 4, seed=4)
    ads = [adapter("a", {"x": d}), adapter("b", {"x": d})]
    assert close(dw(merge_adapters(ads, [1, 1], "lego", 4), "x"), d.delta(), 1e-5)
    assert close(dw(merge_adapters(ads, [1, 1], "lego", 4, magnitude="sum"), "x"), 2 * d.delta(), 1e-5)


# ---------------------------------------------------------------- shapes and kinds -----------


def test_different_ranks_default_rank_and_output_shapes(three):
    ads, w = three
    m = merge_adapters(ads, w, "lego")  # default k: largest source rank per module
    x, y = m.layers["x"], m.layers["y"]
    assert x.down.shape == (6, 40) and x.up.shape == (24, 6) and x.alpha == 6.0 and x.scale == 1.0
    assert y.rank == 3
    assert torch.linalg.matrix_rank(x.delta()) <= 6
    for method in ("svd", "ties_svd", "dare_ties_svd"):
        assert merge_adapters(ads, w, method, 4).layers["x"].rank == 4


def test_missing_module_counts_as_zero(three):
    ads, w = three
    for method, k in (("cat", None), ("svd", 5), ("lego", 5)):
        m = merge_adapters(ads, w, method, k, reweight=False) if method == "lego" else merge_adapters(ads, w, method, k)
        assert close(dw(m, "y"), weighted_sum(ads, w, "y"), 1e-4), method
    only = merge_adapters([ads[2], ads[0]], [1.0, 0.0], "cat")
    assert set(only.layers) == {"x"}  # a zero weight contributes nothing


def test_conv_lora():
    a = adapter("a", {"c": lora(8, 6, 3, alpha=1.5, seed=1, kernel=3), "p": lora(8, 6, 2, seed=2, kernel=1)})
    b = adapter("b", {"c": lora(8, 6, 4, seed=3, kernel=3), "p": lora(8, 6, 2, alpha=4.0, seed=4, kernel=1)})
    w = [1.0, 0.6]
    cat = merge_adapters([a, b], w, "cat")
    lego = merge_adapters([a, b], w, "lego", 7, reweight=False)
    small = merge_adapters([a, b], w, "lego", 3)
    assert small.layers["c"].down.shape == (3, 6, 3, 3) and small.layers["c"].up.shape == (8, 3, 1, 1)
    x = torch.randn(2, 6, 9, 9)
    for key, k in (("c", 3), ("p", 1)):
        conv = torch.nn.Conv2d(6, 8, k, padding=k // 2)
        runtime = sum(wi * ad.layers[key].forward(x, conv) for ad, wi in zip((a, b), w))
        for m in (cat, lego):
            assert torch.allclose(m.layers[key].forward(x, conv), runtime, atol=1e-5)
        assert close(dw(merge_adapters([a, b], w, "svd", 7), key), weighted_sum([a, b], w, key), 1e-4)


def _kron(seed, conv=False):
    g = torch.Generator().manual_seed(seed)
    w2 = torch.randn(6, 5, 3, 3, generator=g) if conv else torch.randn(6, 5, generator=g)
    return KronDelta(w1=torch.randn(4, 2, generator=g), w2=w2, scale=0.5)


def test_kron_source():
    for conv in (False, True):
        k = _kron(1, conv)
        a = adapter("k", {"x": k}, kind="kron")
        exact = {"kron_energy": 1.0, "kron_max_rank": None}
        full = 2 * (6 if conv else 5)  # rank(kron(w1, w2)) = rank(w1)·rank(w2)
        m = merge_adapters([a], [0.8], "lego", full, reweight=False, **exact)
        assert close(dw(m, "x"), 0.8 * k.delta(), 1e-5)
        assert close(dw(merge_adapters([a], [0.8], "svd", full), "x"), 0.8 * k.delta(), 1e-5)
        reduced = merge_adapters([a], [1.0], "cat")  # default: 99% of the energy
        err = (dw(reduced, "x") - k.delta()).norm() ** 2 / k.delta().norm() ** 2
        assert err <= 0.01 + 1e-6 and reduced.layers["x"].rank <= full
        # mixed with a LoRA of the same module shape
        shape = k.weight_shape
        lo = LoraDelta(torch.randn(3, *shape[1:]), torch.randn(shape[0], 3, *([1, 1] if conv else [])))
        b = adapter("b", {"x": lo})
        mix = merge_adapters([a, b], [0.8, 0.5], "cat", **exact)
        assert close(dw(mix, "x"), 0.8 * k.delta() + 0.5 * lo.delta(), 1e-5)


def test_other_expandable_deltas_are_merged_and_unknown_ones_rejected():
    class DenseDelta:  # e.g. a LoHa layer: anything that can expand itself to ΔW
        def __init__(self, d):
            self.d, self.weight_shape = d, tuple(d.shape)

        def delta(self):
            return self.d

    d = torch.randn(10, 3) @ torch.randn(3, 12)
    m = merge_adapters([adapter("h", {"x": DenseDelta(d)})], [1.0], "lego", 3)
    assert close(dw(m, "x"), d, 1e-5)

    class Opaque:
        weight_shape = (10, 12)

    with pytest.raises(StudioError, match="not supported yet"):
        merge_adapters([adapter("o", {"x": Opaque()})], [1.0], "lego")


# ---------------------------------------------------------------- LEGO options ---------------


def test_same_seed_is_bit_identical_and_restarts_never_hurt(three):
    ads, w = three
    m1, m2 = (merge_adapters(ads, w, "lego", 4, seed=3) for _ in range(2))
    for key in m1.layers:
        assert torch.equal(m1.layers[key].up, m2.layers[key].up) and torch.equal(m1.layers[key].down, m2.layers[key].down)
    pool = pool_units([a.layers["x"] for a in ads], w)
    for seed in range(5):
        one = spherical_kmeans(pool.u, pool.v, 4, n_init=1, seed=seed)[2]
        four = spherical_kmeans(pool.u, pool.v, 4, n_init=4, seed=seed)[2]
        assert four >= one - 1e-5


def test_quotas_keep_a_small_source_intact():
    style = adapter("style", {"x": lora(32, 24, 16, seed=1)})
    subject = adapter("subject", {"x": lora(32, 24, 2, seed=2)})
    m = merge_adapters([style, subject], [1, 1], "lego", 6, quotas=[4, 2], reweight=False)
    assert m.layers["x"].rank == 6
    # the subject's two units survive as output units of their own
    out = m.layers["x"]
    mats = [torch.outer(out.up[:, j], out.down[j]) for j in range(6)]
    su, sv = canonicalize(subject.layers["x"].up, subject.layers["x"].down)
    for j in range(2):
        unit = torch.outer(su[j], sv[j])
        assert min(float((mat - unit).norm() / unit.norm()) for mat in mats) < 1e-4
    share = json.loads(m.metadata["merge_cluster_share"])
    assert share["subject"] == pytest.approx(2 / 6, abs=1e-3)
    eq = merge_adapters([style, subject], [1, 1], "lego", 6, quotas="equal")
    assert eq.layers["x"].rank == 4 + 2  # subject has only 2 units: its spare quota goes to style


def test_fit_and_output_reweighting():
    ads = [adapter(n, {"x": lora(24, 20, 4, seed=s)}) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    cat = dw(merge_adapters(ads, [1, 1, 1], "cat"), "x")
    err = lambda m: float((dw(m, "x") - cat).norm() / cat.norm())  # noqa: E731
    plain = merge_adapters(ads, [1, 1, 1], "lego", 4, reweight=False, magnitude="sum")
    fit = merge_adapters(ads, [1, 1, 1], "lego", 4, fit=True)
    assert err(fit) <= err(plain) + 1e-6
    on = merge_adapters(ads, [1, 1, 1], "lego", 12)  # singletons: only √(r/k) = √(4/12) applies
    assert close(dw(on, "x"), cat * (4 / 12) ** 0.5)
    mean = merge_adapters(ads, [1, 1, 1], "lego", 12, r_ref="mean")
    assert close(dw(mean, "x"), dw(on, "x"))


def test_metadata_arch_and_trigger(three):
    ads, w = three
    ads[0].trigger, ads[1].trigger = "sks", "xyz"
    m = merge_adapters(ads, w, "lego", 4, seed=2, name="combo", n_init=2)
    assert m.name == "combo" and m.arch == "sd1" and m.kind == "lora" and m.trigger == "sks, xyz"
    md = m.metadata
    assert md["merge_method"] == "lego" and md["merge_rank"] == "4" and md["merge_seed"] == "2"
    assert json.loads(md["merge_sources"])[1] == {"name": "b", "sha256": "b" * 8}
    assert json.loads(md["merge_weights"]) == w
    opts = json.loads(md["merge_options"])
    assert opts["n_init"] == "2" and opts["magnitude"] == "mean" and opts["reweight"] == "True"
    assert all(isinstance(v, str) for v in md.values())
    assert merge_adapters([adapter("n", ads[0].layers, arch=None), ads[1]], [1, 1], "cat").arch == "sd1"


def test_fp16_sources_give_fp16_output():
    a = adapter("a", {"x": LoraDelta(torch.randn(4, 10).half(), torch.randn(8, 4).half(), 2.0)})
    m = merge_adapters([a], [1.0], "lego", 4)
    assert m.layers["x"].down.dtype == torch.float16
    assert merge_adapters([a], [1.0], "svd", 4, dtype="float32").layers["x"].up.dtype == torch.float32


# ---------------------------------------------------------------- bad input ------------------


def test_bad_input(three):
    ads, w = three
    with pytest.raises(AdapterMismatchError, match=r"'a' is sd1, 'x' is sdxl"):
        merge_adapters([ads[0], adapter("x", ads[1].layers, arch="sdxl")], [1, 1])
    with pytest.raises(StudioError, match=">= 1"):
        merge_adapters(ads, w, "lego", 0)
    with pytest.raises(StudioError, match="larger than the number of rank-1 units pooled.*12"):
        merge_adapters(ads, w, "lego", 13)
    with pytest.raises(StudioError, match="larger than the total rank"):
        merge_adapters(ads, w, "svd", 13)
    with pytest.raises(StudioError, match="got 2 weights for 3 adapters"):
        merge_adapters(ads, [1, 1], "cat")
    with pytest.raises(StudioError, match="valid methods: " + ", ".join(METHODS)):
        merge_adapters(ads, w, "avg")
    with pytest.raises(StudioError, match="unknown option.*densty"):
        merge_adapters(ads, w, "ties_svd", 4, densty=0.5)
    with pytest.raises(StudioError, match="equal ranks"):
        merge_adapters(ads, w, "linear")
    with pytest.raises(StudioError, match="omit rank"):
        merge_adapters(ads, w, "cat", 4)
    with pytest.raises(StudioError, match="quotas"):
        merge_adapters(ads, w, "lego", 4, quotas=[1, 1])
    with pytest.raises(AdapterMismatchError, match="different shapes"):
        merge_adapters([ads[0], adapter("z", {"x": lora(24, 41, 4)})], [1, 1])
    with pytest.raises(StudioError, match="at least one"):
        merge_adapters([], None)
    with pytest.raises(StudioError, match="finite"):
        merge_adapters(ads, [1, float("nan"), 1])
