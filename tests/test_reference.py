"""Reference equivalence at DEFAULT settings: the released per-step loops against ``Studio.run``.

The LoRAs are random, written as diffusers files and loaded twice: by the studio's library and by a
copy of the pipeline with diffusers' ``load_lora_weights`` (PEFT adapters), which the reference
loops drive with ``set_adapters`` as the released ComposLoRA, CMLoRA and CLoRA code does. Each
loop below is the released computation written from the formulas in shared/specs/ (cmlora.md
§1.2–1.5, clora.md §1.2–1.3); latents are compared after every step. These tests guard the
defaults: if a default drifts from the papers' computation, they fail.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor

from composers.cmlora import refresh_events
from studio.adapters.formats import write_adapter
from studio.attention import capture_spec
from studio.base import build_tiny_pipeline
from studio.studio import Studio
from test_composers import make_adapter

T, SIZE, SEED, PROMPT = 5, 64, 7, "a hero in a forest"
TOL = 1e-5
# ComposLoRA's combination order is character, clothing, style, background, object; listed scrambled
KINDS = {"forest": "background", "style": "style", "hero": "character"}
COMBINATION = ["hero", "style", "forest"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(studio, reference pipeline with the same LoRAs loaded through diffusers/PEFT)."""
    pipe = build_tiny_pipeline("sd1")
    ref = copy.deepcopy(pipe)
    studio = Studio.from_pipeline(pipe, "tiny-sd1")
    folder = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(KINDS, start=1):
        # every adapter has text-encoder weights, so the text-encoder mode matters
        ad = make_adapter(pipe, name, seed, KINDS[name], text=True)
        path = write_adapter(ad, folder / f"{name}.safetensors")
        loaded = studio.adapters.load(path, name=name, kind=KINDS[name])
        loaded.concept_kind = KINDS[name]
        ref.load_lora_weights(str(path), adapter_name=name)
    return studio, ref


def studio_latents(studio, names, method, params=None, **kw) -> list[torch.Tensor]:
    zs = []
    studio.run(PROMPT, names, method=method, method_params=params, steps=T, width=SIZE, height=SIZE, seed=SEED,
               progress=False, on_step=lambda i, n, z: zs.append(z.clone()), **kw)
    return zs


def start(ref, steps: int = T):
    sched = DDIMScheduler.from_config(ref.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(SEED)
    z = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) * sched.init_noise_sigma
    return sched, z


def encode(ref, active: list[str] | None, prompt: str = PROMPT, negative: str = "") -> torch.Tensor:
    """[negative; prompt] embeddings with these adapters active (None: LoRA off), as the pipeline does."""
    if active is None:
        ref.disable_lora()
    else:
        ref.enable_lora()
        ref.set_adapters(active, [1.0] * len(active))
    pe, ne = ref.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    ref.enable_lora()
    return torch.cat([ne, pe])


@torch.no_grad()
def unet_halves(ref, z, t, embeds, active: list[str]):
    ref.set_adapters(active, [1.0] * len(active))
    out = ref.unet(torch.cat([z, z]), t, encoder_hidden_states=embeds).sample
    return out.chunk(2)


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs) == T
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"step {i}: max |Δz| = {err:.2e}"


def run_loop(ref, eps_at) -> list[torch.Tensor]:
    """DDIM loop; ``eps_at(z, t, i)`` is the released method's CFG-combined noise at step i."""
    sched, z = start(ref)
    zs = []
    for i, t in enumerate(sched.timesteps):
        z = sched.step(eps_at(sched.scale_model_input(z, t), t, i), t, z).prev_sample
        zs.append(z.clone())
    return zs


G = 7.5  # the studio's default guidance for a real-architecture model


def cfg(u, c):
    return u + G * (c - u)


# ---- ComposLoRA: Merge, Switch, Composite (Zhong et al.; spec cmlora.md §1.2–1.4) -------------
def test_merge_default_equals_released_loop(worlds):
    studio, ref = worlds
    names = list(KINDS)
    emb = encode(ref, names)  # the text encoder with every adapter active
    theirs = run_loop(ref, lambda z, t, i: cfg(*unet_halves(ref, z, t, emb, names)))
    compare(studio_latents(studio, names, "merge"), theirs)


def test_switch_default_equals_released_loop(worlds):
    studio, ref = worlds
    tau = 1  # the released τ is 5; at T = 5 that never switches, so τ = 1 exercises the order
    emb = encode(ref, [COMBINATION[0]])  # encoded once with only the first LoRA's text encoder

    def eps(z, t, i):
        idx = 0 if i == 0 else ((i - 1) // tau) % len(COMBINATION)
        return cfg(*unet_halves(ref, z, t, emb, [COMBINATION[idx]]))

    ours = studio_latents(studio, list(KINDS), "switch", {"tau": tau})
    compare(ours, run_loop(ref, eps))


def test_composite_default_equals_released_loop(worlds):
    studio, ref = worlds
    names = list(KINDS)
    emb = encode(ref, names)

    def eps(z, t, i):
        outs = [unet_halves(ref, z, t, emb, [n]) for n in names]
        return cfg(sum(u for u, _ in outs) / len(outs), sum(c for _, c in outs) / len(outs))

    compare(studio_latents(studio, names, "composite"), run_loop(ref, eps))


def test_composite_at_guidance_one_skips_the_unconditional_pass(worlds):
    studio, ref = worlds
    names = list(KINDS)
    emb = encode(ref, names)[1:]
    zs = []
    res = studio.run(PROMPT, names, method="composite", steps=T, width=SIZE, height=SIZE, seed=SEED,
                     guidance=1.0, progress=False, on_step=lambda i, n, z: zs.append(z.clone()))

    @torch.no_grad()
    def eps(z, t, i):  # diffusers: no CFG at guidance ≤ 1, one conditional row per LoRA
        outs = []
        for n in names:
            ref.set_adapters([n])
            outs.append(ref.unet(z, t, encoder_hidden_states=emb).sample)
        return sum(outs) / len(outs)

    compare(zs, run_loop(ref, eps))
    assert res.report["unet_calls"] == len(names) * T


# ---- CMLoRA (Zou et al.; spec cmlora.md §1.5) ----------------------------------------------------
def released_rotation(steps: int, order: list[str], high: list[str]) -> list[str]:
    """The released loop's dominant LoRA per step: H before ``i <= 120`` ends, order[1:] after,
    advancing at each non-uniform refresh event after step 0 (spec §1.5 c, d)."""
    events, k, out = set(refresh_events(steps)), 0, []
    for i in range(steps):
        k += i > 0 and i in events
        cands = high if i <= 120 else order[1:]
        out.append(cands[k % len(cands)])
    return out


def test_cmlora_reference_compat_equals_released_loop(worlds):
    studio, ref = worlds
    names = list(KINDS)
    order, high = COMBINATION, COMBINATION[:2]  # background is the low-frequency LoRA, run last
    emb = encode(ref, names)
    n = len(order)
    dom_share, other_share = (n - 0.5) / (2 * n - 1.5), 1 / (2 * n - 1.5)
    dominant = released_rotation(T, order, high)

    def eps(z, t, i):
        outs = {m: unet_halves(ref, z, t, emb, [m]) for m in order}
        w = {m: dom_share if m == dominant[i] else other_share for m in order}
        return cfg(sum(w[m] * outs[m][0] for m in order), sum(w[m] * outs[m][1] for m in order))

    ours = []
    res = studio.run(PROMPT, names, method="cmlora", method_params={"reference_compat": True}, steps=T,
                     width=SIZE, height=SIZE, seed=SEED, progress=False,
                     on_step=lambda i, k, z: ours.append(z.clone()))
    compare(ours, run_loop(ref, eps))
    assert res.report["late_start"] == 121 and not res.report["caching"]


def test_cmlora_reference_late_phase_starts_after_step_120():
    """At the scripts' 220 steps the released ``i <= 120`` makes step 121 the first late step."""
    from composers.cmlora import dominant_schedule

    T220, order = 220, ["hero", "style", "forest"]
    ev = refresh_events(T220)
    ours = [order[k] for k in dominant_schedule(T220, 3, 2, 121, ev)]
    assert ours == released_rotation(T220, order, order[:2])
    assert any(d == "forest" for d in ours[121:]) and "forest" not in ours[:121]


# ---- CLoRA (Meral et al.; spec clora.md §1.2–1.3) -----------------------------------------------
class _Recorder(AttnProcessor):
    """Explicit-probability attention (as the released code installs) that keeps the probabilities."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        scores = attn.get_attention_scores

        def keep(q, key, mask=None):
            p = scores(q, key, mask)
            self.store.append(p)
            return p

        attn.get_attention_scores = keep
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


def nt_xent_loops(emb: list[torch.Tensor], labels: list[int], tau: float = 0.5) -> torch.Tensor:
    """NT-Xent written out pair by pair (spec clora.md §1.2 step 4)."""
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0) / tau  # noqa: E731
    losses = []
    for a in range(len(emb)):
        for p in range(len(emb)):
            if a == p or labels[a] != labels[p]:
                continue
            neg = [torch.exp(cos(emb[a], emb[m])) for m in range(len(emb)) if labels[m] != labels[a]]
            pos = torch.exp(cos(emb[a], emb[p]))
            losses.append(-torch.log(pos / (pos + sum(neg))))
    return torch.stack(losses).mean()


def test_clora_default_equals_released_loop(worlds):
    studio, ref = worlds
    a, b = studio.adapters.get("hero"), studio.adapters.get("forest")
    a.trigger, a.concept, b.trigger, b.concept = "sks", "hero", "zwx", "forest"
    names = ["hero", "forest"]
    ours = []
    res = studio.run(PROMPT, names, method="clora", steps=T, width=SIZE, height=SIZE, seed=SEED, progress=False,
                     on_step=lambda i, k, z: ours.append(z.clone()))
    plan = res.report["clora"]
    # the published schedule (spec §1.4) scaled to T = 5: updates on steps < 2 (T/2, rounded), K = 20·T/50
    # inner iterations at steps round({0, 10, 20}·T/50) = {0, 1}
    max_iter, iterative, K = round(25 * T / 50), {round(s * T / 50) for s in (0, 10, 20)} & set(range(2)), 2
    assert (plan["max_iter_to_alter"], set(plan["iterative_steps"]), plan["inner_iterations"]) == (max_iter, iterative, K)

    spec = capture_spec(ref.unet, 8, SIZE, SIZE)
    store: list = []
    procs = dict(ref.unet.attn_processors)
    ref.unet.set_attn_processor({k: (_Recorder(store) if k[: -len(".processor")] in spec.layers else AttnProcessor())
                                 for k in procs})
    embeds = [encode(ref, None, plan["prompts"][0])] + [encode(ref, [n], p) for n, p in zip(names, plan["prompts"][1:])]
    h, w = spec.size

    def branch(z, t, bi):
        if bi == 0:
            ref.disable_lora()
        else:
            ref.enable_lora()
            ref.set_adapters([names[bi - 1]])
        store.clear()
        out = ref.unet(torch.cat([z, z]), t, encoder_hidden_states=embeds[bi]).sample
        ref.enable_lora()
        amap = torch.stack([p.mean(0) for p in store]).mean(0).reshape(h, w, -1)  # CFG halves, heads, layers
        return out.chunk(2), amap

    def loss(maps):
        emb, labels = [], []
        for bi, groups in enumerate(plan["token_indices"]):
            for g, toks in enumerate(groups):
                for tok in toks:
                    v = maps[bi][:, :, tok].flatten()
                    emb.append((v - v.min()) / (v.max() - v.min() + 1e-8))
                    labels.append(g)
        return nt_xent_loops(emb, labels)

    def all_branches(z, t, grad: bool):
        with torch.set_grad_enabled(grad):
            outs = [branch(z, t, bi) for bi in range(3)]
        return [o for o, _ in outs], [m for _, m in outs]

    try:
        sched, z = start(ref)
        theirs = []
        for i, t in enumerate(sched.timesteps):
            if i < max_iter:
                for _ in range(1 + (K if i in iterative else 0)):
                    zz = z.detach().requires_grad_(True)
                    eps, maps = all_branches(zz, t, grad=True)
                    L = loss(maps)
                    z = (z - 20.0 * torch.autograd.grad(L, zz)[0]).detach()
                    eps = [(u.detach(), c.detach()) for u, c in eps]
                    maps = [m.detach() for m in maps]
            else:
                eps, maps = all_branches(z, t, grad=False)
            with torch.no_grad():
                lora = []
                for bi in (1, 2):
                    toks = plan["mask_indices"][bi]
                    lora.append(torch.stack([maps[bi][:, :, k] > 0.4 * maps[bi][:, :, k].max() for k in toks]).any(0))
                masks = torch.stack([~torch.stack(lora).any(0)] + lora).float()[:, None]
                lat = F.interpolate(masks, size=z.shape[-2:], mode="nearest")
                den = lat.sum(0)
                eu = sum(m * u for m, (u, _) in zip(lat, eps)) / den
                ec = sum(m * c for m, (_, c) in zip(lat, eps)) / den
                z = sched.step(cfg(eu, ec), t, z).prev_sample
            theirs.append(z.clone())
    finally:
        ref.unet.set_attn_processor(procs)
    assert res.report["latent_updates"] == max_iter + K * len(iterative)
    compare(ours, theirs)
