"""Composition methods: schedules, exact equivalences, call counts, the composer contract, errors.

Tiny random SD1/SDXL pipelines at 64×64 and adapters built directly as ``Adapter`` objects with
random LoRA deltas on the attention projections (and the text encoder's q_proj for one of them).
Final latents are captured through the step callback so equivalences are checked before the
VAE rounds them to 8-bit pixels.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from composers import COMPOSERS, make_composer
from composers.cmlora import (
    decayed_shares,
    dominant_schedule, frequency_score, kind_partition, refresh_events, shares,
)
from composers.switch import switch_index
from studio.adapters.activation import AdapterRig
from studio.adapters.adapter import Adapter, LoraDelta
from studio.base import build_tiny_pipeline
from studio.errors import AdapterMismatchError, GenerationError, StudioError
from studio.studio import Studio
from studio.unet_cache import full_pass, shallow_pass

STEPS = 4
METHODS = ("merge", "switch", "composite", "cmlora")  # the methods this file covers (CLoRA has its own tests)
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def make_adapter(pipe, name: str, seed: int, kind: str | None = None, text: bool = False, scale: float = 0.3) -> Adapter:
    """Random rank-4 LoRA on every attention projection of the UNet (and q_proj of the TE if asked)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    targets = [("unet", n, m) for n, m in pipe.unet.named_modules() if n.endswith(ATTN)]
    if text:
        targets += [("text_encoder", n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith("q_proj")]
    for comp, n, m in targets:
        out_f, in_f = m.weight.shape
        layers[f"{comp}.{n}"] = LoraDelta(
            torch.randn(4, in_f, generator=g) * scale, torch.randn(out_f, 4, generator=g) * scale, alpha=2.0,
        )
    return Adapter(name, layers, concept_kind=kind)


@pytest.fixture(scope="module")
def sd1():
    studio = Studio.from_pipeline(build_tiny_pipeline("sd1"))
    p = studio.pipe
    ads = [make_adapter(p, "style", 1, "style", text=True), make_adapter(p, "hero", 2, "character"),
           make_adapter(p, "forest", 3, "background")]
    return studio, ads


@pytest.fixture(scope="module")
def sdxl():
    studio = Studio.from_pipeline(build_tiny_pipeline("sdxl"))
    p = studio.pipe
    return studio, [make_adapter(p, "style", 1, "style"), make_adapter(p, "hero", 2, "character")]


def gen(studio, adapters, method="merge", params=None, steps=STEPS, seed=3, **kw):
    """(final latents, image array, report) of one 64×64 generation."""
    last = {}
    res = studio.run("a hero in a forest", adapters, method=method, method_params=params, steps=steps,
                     width=64, height=64, seed=seed, progress=False,
                     on_step=lambda i, n, z: last.__setitem__("z", z.clone()), **kw)
    return last["z"], np.asarray(res.images[0]), res.report


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def hook_count(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for comp in (pipe.unet, pipe.text_encoder) for m in comp.modules())


# ---- pure schedules ----------------------------------------------------------------------------
def test_switch_index_reference_values():
    got = [switch_index(k, 5, 3) for k in range(21)]
    assert got == [0] * 6 + [1] * 5 + [2] * 5 + [0] * 5
    assert all(switch_index(k, 1, 1) == 0 for k in range(10))


def test_refresh_events_nonuniform_sizes_and_shape():
    for T, size in ((100, 43), (200, 85), (220, 92)):
        ev = refresh_events(T)
        assert len(ev) == size
        assert ev == sorted(set(ev)) and ev[0] == 0 and ev[-1] < T
    assert refresh_events(10, 3) == [0, 3, 6, 9]
    with pytest.raises(GenerationError):
        refresh_events(10, -1)


def test_shares_match_spec_and_sum_to_one():
    expected = {2: (0.600, 0.400), 3: (0.556, 0.222), 4: (0.538, 0.154), 5: (0.529, 0.118)}
    for n, (d, o) in expected.items():
        pd, po = shares(n)
        assert round(pd, 3) == d and round(po, 3) == o
        assert abs(pd + (n - 1) * po - 1) < 1e-12
    assert shares(4, 1.0) == (0.25, 0.25)
    with pytest.raises(GenerationError):
        shares(3, 0)


def test_dominant_decay_lowers_the_dominant_share_at_events_down_to_equal_weights():
    ev = refresh_events(20)
    const = decayed_shares(20, 3, None, 0.0, ev)
    assert const == [shares(3)] * 20
    dec = decayed_shares(20, 3, None, 0.5, ev)
    dom = [d for d, _ in dec]
    assert dom[0] == shares(3)[0] and all(a >= b for a, b in zip(dom, dom[1:]))
    assert dom[-1] == pytest.approx(1 / 3)  # coefficient 2.5 hits the floor 1 after 3 events
    for step in range(1, 20):  # it only changes at refresh events
        if step not in ev:
            assert dec[step] == dec[step - 1]
    assert all(abs(d + 2 * o - 1) < 1e-12 for d, o in dec)
    with pytest.raises(GenerationError, match="dominant_decay"):
        decayed_shares(20, 3, None, -1.0, ev)


def test_rotation_phases_and_late_refresh():
    T = 200
    ev = refresh_events(T)
    kinds = ["character", "style", "clothing", "background"]
    high, low = kind_partition(kinds)
    order = high + low  # character, clothing, style, background
    assert [kinds[i] for i in order] == ["character", "clothing", "style", "background"]
    late = round(0.6 * T)
    dom = dominant_schedule(T, 4, len(high), late, ev)
    assert all(dom[k] != 3 for k in range(late))  # background never dominant early
    assert all(dom[k] != 0 for k in range(late, T))  # the first adapter never dominant late
    assert dom[0] == 0
    # C3 fixed: every late candidate is the newly dominant (refreshed) adapter at some event after late_start
    assert {dom[e] for e in ev if e >= late} == {1, 2, 3}
    # without a low-frequency adapter every adapter is dominant within any N consecutive events
    dom_all = dominant_schedule(T, 3, 3, late, ev)
    event_doms = [dom_all[e] for e in ev]
    assert all(set(event_doms[i:i + 3]) == {0, 1, 2} for i in range(len(event_doms) - 2))


def test_frequency_score_orders_texture_above_gradient():
    for n in (64, 512):
        yy, xx = np.indices((n, n))
        board = (((yy // 5) + (xx // 5)) % 2) * 255.0  # 5-px squares: no exact periodicity, like real texture
        ramp = np.tile(np.linspace(0, 255, n), (n, 1))
        assert frequency_score(np.stack([board] * 3, -1)) > frequency_score(np.stack([ramp] * 3, -1)) + 0.5
    with pytest.raises(GenerationError, match="beyond"):
        frequency_score(np.zeros((64, 64)), cutoff=100)


# ---- feature cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_shallow_pass_with_fresh_cache_reproduces_full_pass(arch, request):
    studio, ads = request.getfixturevalue(arch)
    unet = studio.pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if arch == "sdxl":
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    t = torch.tensor(501)
    with AdapterRig(studio.pipe, [ads[0]]) as rig, torch.no_grad():
        rig.set(unet={ads[0].name: 0.8})
        out, feat = full_pass(unet, x, t, ehs, added)
        plain = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]
        again = shallow_pass(unet, x, t, ehs, feat, added)
        rig.set(unet={})
        off = shallow_pass(unet, x, t, ehs, feat, added)
    assert torch.equal(out, plain)
    assert close(again, out, 1e-6)
    # SD1's shallow blocks have attention, so the adapter acts there; SDXL's first/last blocks have none
    assert close(off, out, 1e-6) == (arch == "sdxl")


# ---- exact equivalences ------------------------------------------------------------------------
def test_merge_equals_hand_fused_weights(sd1):
    studio, ads = sd1
    weights = [0.7, -0.4]
    used = [(ads[0], weights[0]), (ads[1], weights[1])]
    z, _, _ = gen(studio, used, "merge")
    fused = copy.deepcopy(studio.pipe)
    for adapter, w in zip(ads[:2], weights):
        for path, delta in adapter.layers.items():
            comp, name = path.split(".", 1)
            mod = getattr(fused, comp).get_submodule(name)
            mod.weight.data += w * delta.delta().to(mod.weight.dtype)
    z_fused, _, _ = gen(Studio.from_pipeline(fused), [], "merge")
    z_plain, _, _ = gen(studio, [], "merge")
    assert close(z, z_fused, 1e-4)
    assert not close(z, z_plain, 1e-2)


def test_composite_with_one_adapter_equals_merge(sd1):
    studio, ads = sd1
    for te_mode in ("per_lora", "reference"):
        zc, _, rep = gen(studio, [(ads[0], 0.9)], "composite", {"te_mode": te_mode})
        zm, _, _ = gen(studio, [(ads[0], 0.9)], "merge")
        assert close(zc, zm)
        assert rep["unet_calls"] == STEPS


def test_composite_with_copies_equals_single_adapter(sd1):
    studio, ads = sd1
    twin = Adapter("hero_copy", dict(ads[1].layers))
    zm, _, _ = gen(studio, [ads[1]], "merge")
    zc, _, rep = gen(studio, [ads[1], twin], "composite", {"batch": "off"})
    assert close(zc, zm)
    assert rep["unet_calls"] == 2 * STEPS
    # both branches in one call of per-row adapters: the same to float rounding
    zb, _, rep = gen(studio, [ads[1], twin], "composite", {"batch": "on"})
    assert close(zb, zm, tol=1e-5 * float(zm.abs().max()))
    assert rep["unet_calls"] == 2 * STEPS


def test_switch_with_long_tau_equals_first_adapter_alone(sd1):
    studio, ads = sd1
    # kind order puts the character first although it is listed second
    zs, _, rep = gen(studio, ads, "switch", {"tau": STEPS})
    zm, _, _ = gen(studio, [ads[1]], "merge")
    assert close(zs, zm)
    assert rep["order"][0] == "hero" and set(rep["active_per_step"]) == {"hero"}
    # with tau = 1 the adapters really change, so the result differs
    z1, _, rep1 = gen(studio, ads, "switch", {"tau": 1})
    assert rep1["active_per_step"] == ["hero", "hero", "style", "forest"]
    assert not close(z1, zm, 1e-3)


def test_cmlora_cache_off_equal_weights_equals_composite(sd1):
    studio, ads = sd1
    zc, _, _ = gen(studio, ads, "composite")
    zo, _, rep = gen(studio, ads, "cmlora", {"cache": "off", "dominant_coeff": 1.0})
    assert close(zc, zo)
    assert rep["unet_calls"] == 3 * STEPS and rep["shallow_calls"] == 0
    zd, _, _ = gen(studio, ads, "cmlora", {"cache": "off"})  # dominant weighting changes the result
    assert not close(zd, zc, 1e-4)


def test_cmlora_one_adapter_cache_off_equals_merge(sd1):
    studio, ads = sd1
    z, _, _ = gen(studio, [ads[2]], "cmlora", {"cache": "off"})
    zm, _, _ = gen(studio, [ads[2]], "merge")
    assert close(z, zm)


def test_cmlora_interval_one_equals_cache_off(sd1):
    studio, ads = sd1
    z1, _, r1 = gen(studio, ads, "cmlora", {"interval": 1})
    zo, _, _ = gen(studio, ads, "cmlora", {"cache": "off", "interval": 1})  # same rotation, every step an event
    assert torch.equal(z1, zo) and r1["shallow_calls"] == 0


# ---- call counts and reports -------------------------------------------------------------------
def test_unet_call_counts_and_report_fields(sd1):
    studio, ads = sd1
    T, N = 10, 3
    expect = {"merge": T, "switch": T, "composite": N * T}
    for method, calls in expect.items():
        _, _, rep = gen(studio, ads, method, steps=T)
        assert rep["unet_calls"] == calls and rep["shallow_calls"] == 0
    _, _, rep = gen(studio, ads, "cmlora", {"interval": 2}, steps=T)
    n_events = len(refresh_events(T, 2))
    assert rep["unet_calls"] == N + n_events - 1
    assert rep["shallow_calls"] == N * T - (N + n_events - 1) == rep["cache_hits"]
    for key in ("unet_calls", "shallow_calls", "cache_hits", "seconds"):
        assert key in rep
    assert rep["seconds"] > 0


def test_cmlora_default_caches_on_nonuniform_schedule(sd1):
    studio, ads = sd1
    T = 20
    z, img, rep = gen(studio, ads, "cmlora", steps=T)
    n_events = len(refresh_events(T))
    assert rep["caching"] and rep["refresh_events"] == n_events
    assert rep["unet_calls"] == 3 + n_events - 1 and rep["shallow_calls"] == 3 * T - rep["unet_calls"]
    assert rep["order"] == ["hero", "style", "forest"] and rep["low_frequency"] == ["forest"]
    late = rep["late_start"]
    assert late == 12
    refreshed_late = {r for s, _, r in rep["events"] if s >= late}
    assert refreshed_late == {"style", "forest"}  # the late candidates (order minus its first)
    assert all(d != "forest" for s, d, _ in rep["events"] if s < late)
    assert torch.isfinite(z).all() and img.std() > 0


def test_cmlora_batched_passes_equal_sequential_ones(sd1):
    studio, ads = sd1
    z_seq, img_seq, rep_seq = gen(studio, ads, "cmlora", {"batch": "off"}, steps=10)
    z_bat, img_bat, rep_bat = gen(studio, ads, "cmlora", {"batch": "on"}, steps=10)
    assert close(z_seq, z_bat, tol=1e-4)
    assert np.abs(img_seq.astype(int) - img_bat.astype(int)).max() <= 1
    for key in ("unet_calls", "shallow_calls", "cache_hits", "events"):
        assert rep_seq[key] == rep_bat[key]
    assert not any(m._forward_hooks for m in studio.pipe.unet.modules())
    with pytest.raises(GenerationError, match="batch"):
        gen(studio, ads, "cmlora", {"batch": "maybe"}, steps=2)


def test_cmlora_dominant_decay_changes_the_mix_not_the_calls(sd1):
    studio, ads = sd1
    z0, _, rep0 = gen(studio, ads, "cmlora", steps=10)
    z1, _, rep1 = gen(studio, ads, "cmlora", {"dominant_decay": 1.0}, steps=10)
    assert rep1["unet_calls"] == rep0["unet_calls"] and rep1["shallow_calls"] == rep0["shallow_calls"]
    assert rep1["final_shares"]["dominant"] == pytest.approx(1 / 3, abs=1e-4) and rep0["final_shares"] == rep0["shares"]
    assert not close(z0, z1)
    with pytest.raises(GenerationError, match="dominant_decay"):
        gen(studio, ads, "cmlora", {"dominant_decay": "fast"}, steps=2)


def test_cmlora_frequency_order_profiles_each_adapter(sd1):
    studio, ads = sd1
    _, _, rep = gen(studio, ads, "cmlora", {"order": "freq", "profile_steps": 2, "cache": "off"})
    scores = rep["frequency_scores"]
    assert set(scores) == {"style", "hero", "forest"}
    lowest = min(scores, key=scores.get)
    assert rep["order"][-1] == lowest and rep["low_frequency"] == [lowest]
    assert rep["profile_unet_calls"] == 3 * 2 and rep["unet_calls"] == 3 * STEPS


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_both_architectures(arch, method, request):
    studio, ads = request.getfixturevalue(arch)
    z, img, rep = gen(studio, ads[:2], method, steps=3)
    assert torch.isfinite(z).all() and img.shape == (64, 64, 3)
    assert rep["method"] == method and rep["unet_calls"] >= 1


# ---- the composer contract ---------------------------------------------------------------------
def test_no_adapter_stays_active_after_a_call(sd1):
    studio, ads = sd1
    before_hooks = hook_count(studio.pipe)
    z0, img0, _ = gen(studio, [], "merge")
    for method in METHODS:
        gen(studio, ads, method)
    assert hook_count(studio.pipe) == before_hooks
    z1, img1, _ = gen(studio, [], "merge")
    assert torch.equal(z0, z1) and np.array_equal(img0, img1)


def test_no_adapter_stays_active_after_an_error(sd1):
    studio, ads = sd1
    before = hook_count(studio.pipe)
    with pytest.raises(StudioError):
        gen(studio, ads, "cmlora", {"cache": "maybe"})
    assert hook_count(studio.pipe) == before


def test_threads_give_the_same_images_as_serial_calls(sd1):
    studio, ads = sd1
    jobs = {"a": ([ads[0]], "composite"), "b": ([ads[1], ads[2]], "cmlora")}
    serial = {k: gen(studio, a, m)[1] for k, (a, m) in jobs.items()}
    results, errors = {}, []

    def work(key):
        try:
            results[key] = gen(studio, *jobs[key])[1]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in jobs for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for k in jobs:
        assert np.array_equal(results[k], serial[k])
    assert not np.array_equal(serial["a"], serial["b"])


# ---- bad input ---------------------------------------------------------------------------------
def test_unknown_method_lists_valid_ones(sd1):
    studio, ads = sd1
    with pytest.raises(GenerationError) as e:
        gen(studio, ads, "blend")
    for name in COMPOSERS:
        assert name in str(e.value)


def test_unknown_parameter_lists_valid_ones_with_defaults():
    with pytest.raises(GenerationError) as e:
        make_composer("cmlora", {"cache_interval": 3})
    msg = str(e.value)
    assert "cache_interval" in msg and "interval=0" in msg and "cache='auto'" in msg and "\n" not in msg
    with pytest.raises(GenerationError, match="tau=5"):
        make_composer("switch", {"t": 1})


def test_cli_style_string_parameters_are_coerced():
    c = make_composer("cmlora", {"interval": "2", "reference_compat": "true", "late_start": "0.5"})
    assert c.params["interval"] == 2 and c.params["reference_compat"] is True and c.params["late_start"] == 0.5
    assert make_composer("switch", {"tau": "3"}).params["tau"] == 3


@pytest.mark.parametrize("method", ["switch", "composite", "cmlora"])
def test_methods_need_an_adapter(sd1, method):
    studio, _ = sd1
    with pytest.raises(GenerationError, match="at least 1 adapter"):
        gen(studio, [], method)


@pytest.mark.parametrize("method,params", [
    ("switch", {"tau": 0}), ("switch", {"order": "random"}), ("composite", {"te_mode": "both"}),
    ("cmlora", {"cache": "maybe"}), ("cmlora", {"order": "size"}), ("cmlora", {"dominant_coeff": "big"}),
    ("cmlora", {"interval": -2}), ("cmlora", {"late_start": 60}),
])
def test_bad_parameter_values(sd1, method, params):
    studio, ads = sd1
    with pytest.raises(GenerationError):
        gen(studio, ads[:2], method, params)


def test_adapter_for_another_architecture_is_refused(sd1, sdxl):
    studio, _ = sd1
    _, xl_ads = sdxl
    before = hook_count(studio.pipe)
    with pytest.raises(AdapterMismatchError, match="architecture|base model"):
        gen(studio, [xl_ads[0]], "composite")
    assert hook_count(studio.pipe) == before


# ---- faithful defaults and presets (issue 18) ----------------------------------------------------
def test_switch_kind_order_is_the_released_combination_order(sd1):
    studio, _ = sd1
    from composers.switch import kind_order
    from studio.sampling import AdapterWeight

    kinds = ["object", "background", None, "style", "clothing", "character"]
    ads = [AdapterWeight(Adapter(f"a{i}", {}, concept_kind=k)) for i, k in enumerate(kinds)]
    assert [a.adapter.concept_kind for a in kind_order(ads)] == [
        "character", "clothing", "style", "background", "object", None]


def test_defaults_are_the_reference_ones_and_recorded(sd1):
    studio, ads = sd1
    for method in ("composite", "switch", "cmlora"):
        assert make_composer(method).params["te_mode"] == "reference"
        res = studio.run("a hero", ads[:2], method=method, steps=2, width=64, height=64, seed=1, progress=False)
        eff = res.recipes[0].effective
        assert eff["te_mode"] == "reference" and eff["preset"] == "none" and res.report["effective"] == eff
        assert "Composition effective" in res.images[0].info["parameters"]
    cm = studio.run("a hero", ads[:2], method="cmlora", steps=2, width=64, height=64, seed=1, progress=False)
    assert cm.recipes[0].effective["cache"] == "on" and "C1" in cm.recipes[0].effective["deviation"]
    ref = studio.run("a hero", ads[:2], method="cmlora", method_params={"reference_compat": True}, steps=2,
                     width=64, height=64, seed=1, progress=False)
    assert ref.recipes[0].effective["cache"] == "off" and ref.recipes[0].effective["late_start"] == 121
    kept = studio.run("a hero", ads[:2], method="cmlora", method_params={"reference_compat": True, "cache": "on"},
                      steps=2, width=64, height=64, seed=1, progress=False)
    assert kept.report["caching"]  # an explicit cache setting wins


def test_paper_preset_applies_run_settings_unless_set(sd1):
    studio, ads = sd1
    names = [studio.adapters.add(a).name if a.name not in studio.adapters else a.name for a in ads[:2]]
    res = studio.run("a hero", names, method="composite", method_params={"preset": "paper"}, steps=3,
                     width=64, height=64, seed=1, progress=False)
    r = res.recipes[0]
    assert (r.sampler, r.guidance, r.steps) == ("dpm++2m", 10.0, 3)
    assert [(a.weight, a.te_weight) for a in r.adapters] == [(0.8, 0.8), (0.8, 0.8)]
    assert r.from_preset == {"sampler": "dpm++2m", "guidance": 10.0, "weight": 0.8} == res.report["from_preset"]
    # explicit values win: a weighted adapter keeps its weight, an explicit guidance stays
    res = studio.run("a hero", [(names[0], 0.5)], method="merge", method_params={"preset": "paper-reality"}, steps=2,
                     guidance=3.0, width=64, height=64, seed=1, progress=False)
    r = res.recipes[0]
    assert (r.sampler, r.guidance, r.adapters[0].weight) == ("dpm++2m", 3.0, 0.5) and r.from_preset == {"sampler": "dpm++2m"}
    cm = make_composer("cmlora", {"preset": "paper"})
    assert cm.params["reference_compat"] is True
    assert cm.named_preset().run_settings() == {"sampler": "dpm++2m", "steps": 220, "guidance": 8.5, "weight": 1.0}
    with pytest.raises(GenerationError, match="preset must be one of none, paper, paper-reality"):
        make_composer("switch", {"preset": "anime"})
