"""CLoRA: token positions, attention capture, NT-Xent, gradients (finite differences, branchwise
== joint), Composite equivalence, masks, schedule and call counts, bad input."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from composers.base import Composer
from composers.clora import PRESETS, CLoRAComposer, nt_xent
from conftest import random_lora
from studio import Studio
from studio.adapters.activation import AdapterRig
from studio.attention import (
    AttentionCapture,
    assign_background,
    background_takes_free_cells,
    block_levels,
    capture_spec,
    morphology,
    threshold_masks,
)
from studio.base import TOY_MODEL_DIR, build_tiny_pipeline, make_scheduler
from studio.clip_tokenizer import build_clip_tokenizer
from studio.errors import GenerationError
from studio.prompts import branch_prompts, word_token_positions
from studio.sampling import AdapterWeight, ComposeContext, denoise, initial_latents

FAST = dict(steps=4, seed=3, progress=False)
PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


def two_adapters(studio: Studio):
    a = studio.adapters.add(random_lora(studio, "a", seed=1))
    b = studio.adapters.add(random_lora(studio, "b", seed=2))
    a.trigger, a.concept = "sks", "cat"
    b.trigger, b.concept = "zwx", "dog"
    return a, b


@contextmanager
def prepared(studio: Studio, composer: Composer, prompt: str = PROMPT, steps: int = 4, size=(64, 64)):
    """A composer prepared on a context like ``Studio.run`` builds, with a DDIM scheduler set."""
    adapters = studio.adapters.list()
    with AdapterRig(studio.pipe, adapters) as rig:
        ctx = ComposeContext(
            pipe=studio.pipe, rig=rig, adapters=[AdapterWeight(a, 1.0, 1.0) for a in adapters], prompt=prompt,
            negative_prompt="", guidance=7.5, steps=steps, width=size[0], height=size[1], arch=studio.arch,
            device=studio.device, dtype=studio.dtype,
        )
        sched = make_scheduler(studio.pipe, "ddim")
        sched.set_timesteps(steps)
        ctx.timesteps, ctx.scheduler = sched.timesteps, sched
        composer.prepare(ctx)
        composer.reset()
        yield composer, ctx, sched


# ---- prompts and token positions ---------------------------------------------------------
def test_token_positions_on_real_tokenizer(tok):
    plan = branch_prompts("A cat and a dog", [("c", "sks", "cat"), ("d", "zwx", "dog")], tok)
    assert plan.prompts == ["A cat and a dog", "A sks cat and a dog", "A cat and a zwx dog"]
    assert plan.tokens[0] == [[2], [5]]
    assert plan.tokens[1] == [[2, 3], [6]]  # the spec's example: sks, cat | dog
    assert plan.tokens[2] == [[2], [5, 6, 7]]  # "zwx" is two BPE pieces: z, wx
    assert plan.mask_tokens == [[], [2, 3], [5, 6, 7]]
    pieces = tok.convert_ids_to_tokens(tok(plan.prompts[2]).input_ids)
    assert [pieces[i] for i in plan.tokens[2][1]] == ["z", "wx</w>", "dog</w>"]
    pieces = tok.convert_ids_to_tokens(tok(plan.prompts[1]).input_ids)
    assert [pieces[i] for i in plan.tokens[1][0]] == ["sks</w>", "cat</w>"]


def test_multi_piece_concept_and_repeated_concept_word(tok):
    words = "a red hexagon , sks".split()
    pos = word_token_positions(tok, words, 2, 3)
    assert tok.convert_ids_to_tokens(tok(" ".join(words)).input_ids)[pos[0]:pos[-1] + 1] == ["hex", "agon</w>"]
    # two adapters on the same concept word: each claims the occurrence after its trigger
    plan = branch_prompts("a sks shape on the left and a zwx shape on the right",
                          [("z", "zwx", "shape"), ("s", "sks", "shape")], tok)
    assert plan.prompts[0] == "a shape on the left and a shape on the right"
    assert plan.prompts[1] == "a shape on the left and a zwx shape on the right"
    assert plan.prompts[2] == "a sks shape on the left and a shape on the right"
    assert plan.tokens[0] == [[8], [2]]
    assert plan.tokens[1] == [[8, 9, 10], [2]]
    assert plan.tokens[2] == [[9], [2, 3]]


def test_bare_trigger_stands_for_its_concept(tok):
    """The "and" phrasing of a background ("... on wvu") names no concept word: the trigger stands
    for it; the base and the other branches read the concept word in its place."""
    plan = branch_prompts("a red sks shape on wvu", [("c", "sks", "shape"), ("s", "wvu", "background")], tok)
    assert plan.prompts == ["a red shape on background", "a red sks shape on background", "a red shape on wvu"]
    for prompt, groups in zip(plan.prompts, plan.tokens):
        pieces = tok.convert_ids_to_tokens(tok(prompt).input_ids)
        words = [[pieces[i] for i in g] for g in groups]
        assert words[1] == (["wvu</w>"] if "wvu" in prompt else ["background</w>"])
        assert words[0][-1] == "shape</w>"
    # adjacent concepts (tag lists): a span ending where a trigger goes in does not grow
    plan = branch_prompts("red sks shape, wvu background", [("c", "sks", "shape"), ("s", "wvu", "background")], tok)
    pieces = tok.convert_ids_to_tokens(tok(plan.prompts[2]).input_ids)
    assert [pieces[i] for i in plan.tokens[2][0]][0] == "shape</w>"
    assert "wvu</w>" not in [pieces[i] for i in plan.tokens[2][0]]
    assert [pieces[i] for i in plan.tokens[2][1]] == ["wvu</w>", "background</w>"]


@pytest.mark.parametrize("prompt", [
    "a red sks shape on a wvu background",  # sentence
    "red sks shape, wvu background",  # tags
    "a red sks shape on wvu",  # "and" form: a bare trigger
    "a red sks shape on the left and a blue zwx shape on the right on a wvu background",
    "red sks shape, blue zwx shape, wvu background",
    "a red sks shape and a blue zwx shape on wvu",
])
def test_shared_trigger_stays_in_every_adapter_branch(tok, prompt):
    """CLoRA's background deviation keeps the background's trigger in every object's branch (so an
    object's mask cells draw the background); each branch's token groups still name each concept's
    own words, the branch's own trigger and every shared trigger included, and the base has none."""
    concepts = [("c", "sks", "shape"), ("s", "wvu", "background")]
    if "zwx" in prompt:
        concepts.insert(1, ("p", "zwx", "shape"))
    bg = len(concepts) - 1
    plain = branch_prompts(prompt, concepts, tok)
    plan = branch_prompts(prompt, concepts, tok, shared=frozenset({bg}))
    assert plan.prompts[0] == plain.prompts[0] and plan.prompts[bg + 1] == plain.prompts[bg + 1]
    bare = "background" not in prompt
    for b, (text, groups) in enumerate(zip(plan.prompts, plan.tokens)):
        pieces = tok.convert_ids_to_tokens(tok(text).input_ids)
        words = ["".join(pieces[i] for i in g).replace("</w>", " ").split() for g in groups]
        active = set() if b == 0 else {b - 1, bg}
        for k, (_, trigger, concept) in enumerate(concepts):
            own = (["wvu"] if bare else ["wvu", "background"]) if k == bg else ["zwx" if k == 1 and bg == 2 else "sks", "shape"]
            expect = own if k in active else [concept]
            assert [w.strip(",") for w in words[k] if w != ","] == expect, (b, k, text)
        assert ("wvu" in text) == (b != 0)
        assert plan.mask_tokens[b] == ([] if b == 0 else groups[b - 1])


def test_shared_triggers_stay_out_of_each_others_branches(tok):
    """Two background adapters: each object's branch reads both triggers, each background's branch only its own
    (its adapter alone runs there)."""
    concepts = [("c", "sks", "shape"), ("s", "wvu", "background"), ("t", "nrf", "pattern")]
    plan = branch_prompts("a red sks shape on a wvu background with nrf pattern", concepts, tok, shared=frozenset({1, 2}))
    assert plan.prompts == ["a red shape on a background with pattern", "a red sks shape on a wvu background with nrf pattern",
                            "a red shape on a wvu background with pattern", "a red shape on a background with nrf pattern"]


def test_prompt_errors(tok):
    with pytest.raises(GenerationError, match="does not mention 'dog'"):
        branch_prompts("a cat on a sofa", [("c", "sks", "cat"), ("d", "zwx", "dog")], tok)
    with pytest.raises(GenerationError, match="right before its concept"):
        branch_prompts("a sks photo of a cat", [("c", "sks", "cat")], tok)


# ---- attention capture -------------------------------------------------------------------
def sd15_structure_unet() -> UNet2DConditionModel:
    """SD1.5's block structure (2 layers per block, 3 cross-attention levels) at tiny widths."""
    return UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2)


def test_capture_layers_at_sd15_resolution_and_non_square():
    unet = sd15_structure_unet()
    spec = capture_spec(unet, 8, 512, 512)
    assert spec.factor == 32 and spec.size == (16, 16)
    assert spec.layers == (
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2", "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    )
    assert capture_spec(unet, 8, 768, 512).size == (24, 16)  # (h, w): height 768, width 512
    assert capture_spec(unet, 8, 64, 64).factor == 16  # tiny latents: 1/32 would be 2x2


def test_capture_maps_sum_to_one_and_leave_other_layers_alone(sd1_pipe):
    unet = sd1_pipe.unet
    spec = capture_spec(unet, 8, 64, 128)  # height 64, width 128
    assert spec.size == (4, 8)
    cap = AttentionCapture(unet, spec)
    before = dict(unet.attn_processors)
    x = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=enc).sample
        with cap.record() as rec:
            captured = unet(x, 10, encoder_hidden_states=enc).sample
            during = dict(unet.attn_processors)
        with cap.record(truncate=True) as rec_t:
            unet(x, 10, encoder_hidden_states=enc)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    maps = rec.maps()
    assert maps.shape == (4, 8, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 8))
    torch.testing.assert_close(rec_t.maps(), maps)  # the truncated forward sees the same maps
    swapped = {k for k in during if during[k] is not before[k]}
    assert swapped == {f"{n}.processor" for n in spec.layers}
    assert all(isinstance(p, AttnProcessor2_0) for k, p in during.items() if k not in swapped)
    assert all(unet.attn_processors[k] is before[k] for k in before)  # restored after the call


def test_no_layer_at_requested_resolution(sd1):
    two_adapters(sd1)
    with pytest.raises(GenerationError, match="no cross-attention layer at attention_factor=128"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"attention_factor": 128}, **FAST)
    with pytest.raises(GenerationError, match="not a multiple of attention_factor=16"):
        sd1.run(PROMPT, ["a", "b"], method="clora", width=72, method_params={"attention_factor": 16}, **FAST)


# ---- loss --------------------------------------------------------------------------------
def brute_nt_xent(emb, labels, tau):
    e = torch.nn.functional.normalize(emb, dim=1)
    s = (e @ e.t() / tau).tolist()
    losses = []
    for a in range(len(labels)):
        for p in range(len(labels)):
            if a == p or labels[a] != labels[p]:
                continue
            den = np.exp(s[a][p]) + sum(np.exp(s[a][n]) for n in range(len(labels)) if labels[n] != labels[a])
            losses.append(-np.log(np.exp(s[a][p]) / den))
    return float(np.mean(losses)) if losses else 0.0


def test_nt_xent_matches_brute_force_and_is_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    emb = torch.rand(7, 16, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert float(nt_xent(emb, labels, 0.5)) == pytest.approx(brute_nt_xent(emb, labels.tolist(), 0.5), rel=1e-10)
    perm = torch.randperm(7, generator=g)
    assert float(nt_xent(emb[perm], labels[perm], 0.5)) == pytest.approx(float(nt_xent(emb, labels, 0.5)), rel=1e-12)
    # singleton groups have no positive pair: all-singleton labels give zero loss and gradient
    leaf = emb.clone().requires_grad_(True)
    loss = nt_xent(leaf, torch.arange(7), 0.5)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not leaf.grad.any()
    leaf.grad = None
    nt_xent(leaf, labels, 0.5).backward()
    assert leaf.grad.abs().max() > 1e-3


def test_singleton_concept_is_refused(sd1):
    two_adapters(sd1)
    indices = [[[], [5]], [[3], [6]], [[], [5, 6, 7]]]  # "cat" listed once: one map, no positive pair
    with pytest.raises(GenerationError, match="at least 2"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"token_indices": indices}, **FAST)


def test_loss_gradient_matches_finite_differences():
    studio = Studio.from_pipeline(build_tiny_pipeline("sd1").to(torch.float64), "tiny-sd1-fp64")
    two_adapters(studio)
    with prepared(studio, CLoRAComposer()) as (comp, ctx, sched):
        t = sched.timesteps[1]
        z = initial_latents(ctx, 5, sched).double()
        loss, grad, _ = comp.latent_grad(z, t)
        assert grad.dtype == torch.float64 and grad.norm() > 0

        def loss_at(zz):
            with torch.no_grad():
                return float(comp.loss([p.maps for p in comp._all(comp._scale(zz, t), t, truncate=True)]))

        assert loss_at(z) == pytest.approx(float(loss), rel=1e-12)
        for seed in (0, 1):
            d = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            d /= d.norm()
            h = 1e-4
            fd = (loss_at(z + h * d) - loss_at(z - h * d)) / (2 * h)
            assert fd == pytest.approx(float((grad * d).sum()), rel=1e-4, abs=1e-9)


def test_branchwise_backprop_equals_full_graph_gradient(sd1):
    two_adapters(sd1)
    with prepared(sd1, CLoRAComposer(backprop="branchwise")) as (comp, ctx, sched):
        t = sched.timesteps[0]
        z = initial_latents(ctx, 5, sched)
        loss_b, grad_b, _ = comp.latent_grad(z, t)
        assert comp.stats["backward_passes"] == 3 and comp.stats["grad_forwards"] == 3
        comp.params["backprop"] = "joint"
        loss_j, grad_j, _ = comp.latent_grad(z, t)
        assert comp.stats["backward_passes"] == 4  # one backward through all three graphs
    assert float(loss_b) == pytest.approx(float(loss_j), rel=1e-5)
    assert grad_b.abs().max() > 0
    torch.testing.assert_close(grad_b, grad_j, rtol=1e-4, atol=1e-6 * float(grad_j.abs().max()))
    # activation checkpointing in the branch passes changes memory, not the gradient
    for mode in ("fine", "all"):
        with prepared(sd1, CLoRAComposer(grad_checkpoint=mode, backprop="branchwise")) as (comp, ctx, sched):
            assert comp.ckpt_blocks
            _, grad_ck, _ = comp.latent_grad(initial_latents(ctx, 5, sched), sched.timesteps[0])
        torch.testing.assert_close(grad_ck, grad_b, rtol=1e-5, atol=1e-7 * float(grad_b.abs().max()))
    # graph passes one CFG row at a time: half the graph, the same gradient
    with prepared(sd1, CLoRAComposer(split_rows="on", backprop="branchwise")) as (comp, ctx, sched):
        assert comp.split_rows
        _, grad_rows, _ = comp.latent_grad(initial_latents(ctx, 5, sched), sched.timesteps[0])
    torch.testing.assert_close(grad_rows, grad_b, rtol=1e-4, atol=1e-6 * float(grad_b.abs().max()))
    # with maps from the cond half only, the graph pass runs the cond row alone
    with prepared(sd1, CLoRAComposer(attention_source="cond", backprop="branchwise")) as (comp, ctx, sched):
        _, grad_c1, _ = comp.latent_grad(initial_latents(ctx, 5, sched), sched.timesteps[0])
    with prepared(sd1, CLoRAComposer(attention_source="cond", split_rows="on", backprop="branchwise")) as (comp, ctx, sched):
        _, grad_c2, _ = comp.latent_grad(initial_latents(ctx, 5, sched), sched.timesteps[0])
    assert grad_c1.abs().max() > 0
    torch.testing.assert_close(grad_c2, grad_c1, rtol=1e-5, atol=1e-7 * float(grad_c1.abs().max()))


@pytest.mark.parametrize("params", [
    {"backprop": "branchwise"},
    {"backprop": "branchwise", "batch_branches": "off"},
    {"backprop": "branchwise", "split_rows": "on", "grad_checkpoint": "fine"},  # the large-latent settings
    {"backprop": "joint", "batch_branches": "off"},
], ids=["branchwise", "branchwise-seq", "branchwise-large", "joint-seq"])
def test_cost_settings_keep_the_default_trajectory(sd1, params):
    """Every way of computing the published schedule gives the default's latents at every step
    within 1e-5 (the default on this 8×8 latent is joint and batched, which tests/test_reference.py
    pins to the released loop)."""
    two_adapters(sd1)
    runs = []
    for p in ({}, params):
        zs = []
        res = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=p, steps=5, seed=3, progress=False,
                      on_step=lambda i, n, z: zs.append(z.clone()))
        runs.append((zs, res.report))
    (ref, rep_ref), (ours, rep) = runs
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"step {i}: max |dz| = {err:.2e}"
    n, steps, updates = 3, 5, rep_ref["latent_updates"]
    assert rep["latent_updates"] == updates == 2 + 2 * 2  # T = 5: steps 0, 1 update, K = 2 at both
    assert rep["grad_forwards"] == rep_ref["grad_forwards"] == n * updates
    # each branch runs once per step in full: at an updating step, in its last round
    assert rep["full_forwards"] == rep_ref["full_forwards"] == n * steps
    if params["backprop"] == "branchwise":  # graph-free maps, then a graph pass and a backward per branch
        assert rep["backward_passes"] == n * updates and rep["truncated_forwards"] == n * (2 * updates - 2)
    else:  # one graph pass and one backward for all branches
        assert rep["backward_passes"] == rep_ref["backward_passes"] == updates
        assert rep["truncated_forwards"] == rep_ref["truncated_forwards"] == n * (updates - 2)


def test_checkpointed_blocks_hold_no_capture_layer(sd1):
    two_adapters(sd1)
    unet = sd1.pipe.unet
    with prepared(sd1, CLoRAComposer()) as (comp, ctx, sched):
        assert comp.ckpt_blocks == []  # auto: off for an 8x8 latent
    chosen = {}
    for mode in ("fine", "all"):
        with prepared(sd1, CLoRAComposer(grad_checkpoint=mode)) as (comp, ctx, sched):
            names = chosen[mode] = {n for n, m in unet.named_modules() if any(m is b for b in comp.ckpt_blocks)}
            assert names and all(not layer.startswith(n + ".") for n in names for layer in comp.spec.layers)
            comp.latent_grad(initial_latents(ctx, 5, sched), sched.timesteps[0])
            assert all("forward" not in b.__dict__ for b in comp.ckpt_blocks)  # wrappers removed again
            level = comp.spec.level
    # "fine": only the blocks finer than the maps, where activations are large for their compute
    levels = block_levels(unet)
    top = lambda n: n.split(".")[0] if n.startswith("mid_block") else ".".join(n.split(".")[:2])  # noqa: E731
    assert level > 0 and chosen["fine"] == {n for n in chosen["all"] if levels[top(n)] < level}
    assert chosen["fine"] < chosen["all"]


def test_block_levels_follow_the_sd15_layout():
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    assert block_levels(unet) == {"down_blocks.0": 0, "down_blocks.1": 1, "down_blocks.2": 2, "down_blocks.3": 3,
                                  "mid_block": 3, "up_blocks.0": 3, "up_blocks.1": 2, "up_blocks.2": 1,
                                  "up_blocks.3": 0}
    spec = capture_spec(unet, 8, 256, 256, factor=32)  # SD1.5's H/32: down_blocks.2 and up_blocks.1
    assert spec.level == 2 and {n.split(".attentions")[0] for n in spec.layers} == {"down_blocks.2", "up_blocks.1"}


def test_batched_branches_equal_sequential_calls(sd1):
    """One batched call with per-row adapters gives each branch what its own rig call gives."""
    two_adapters(sd1)
    unet = sd1.pipe.unet
    with prepared(sd1, CLoRAComposer()) as (comp, ctx, sched):
        t = sched.timesteps[1]
        z = initial_latents(ctx, 2, sched)
        hooks = sum(len(m._forward_hooks) for m in unet.modules())
        with torch.no_grad():
            batched = comp._all(z, t, truncate=False)
            seq = [comp._pass(z, t, b, truncate=False) for b in range(3)]
            truncated = comp._all(z, t, truncate=True)
        assert comp.stats["batched_calls"] == 2 and ctx.counters.unet_calls == 6 and ctx.counters.shallow_calls == 3
        assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks  # row hooks removed again
        assert ctx.rig.active["unet"] == {}
        for b, s in enumerate(seq):
            for e_b, e_s in zip(batched[b].eps, s.eps):
                torch.testing.assert_close(e_b, e_s, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched[b].maps, s.maps, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(truncated[b].maps, s.maps, rtol=1e-5, atol=1e-6)
            assert truncated[b].eps is None
        assert (batched[1].eps[1] - batched[0].eps[1]).abs().max() > 1e-3  # the adapters act per branch
        assert (batched[2].eps[1] - batched[1].eps[1]).abs().max() > 1e-3
    on = sd1.run(PROMPT, ["a", "b"], method="clora", **FAST)
    off = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"batch_branches": False}, **FAST)
    # default (published) schedule at T = 4: steps 0 and 1 update 1 + K = 3 times (two truncated
    # batched calls, one full), steps 2 and 3 one full batched call each
    assert off.report["batched_calls"] == 0 and on.report["batched_calls"] == 8
    for key in ("full_forwards", "truncated_forwards", "latent_updates", "backward_passes"):
        assert on.report[key] == off.report[key]
    diff = np.abs(np.asarray(on.images[0], float) - np.asarray(off.images[0], float))
    assert diff.max() <= 2


# ---- fusion and masks --------------------------------------------------------------------
class HandComposite(Composer):
    """Composite over CLoRA's branches (base + one per adapter, CLoRA's prompts): plain average."""

    name = "hand-composite"

    def __init__(self, clora: CLoRAComposer):
        super().__init__()
        self.clora = clora

    def predict(self, x, t, step):
        outs = [self.ctx.eps(x, t, br.cond, br.unet) for br in self.clora.branches]
        eu = sum(u.float() for u, _ in outs) / len(outs)
        ec = sum(c.float() for _, c in outs) / len(outs)
        return self.ctx.cfg(eu, ec)


def test_no_update_all_ones_masks_equals_composite(sd1):
    two_adapters(sd1)
    params = dict(latent_update=False, apply_mask_after=99)
    with prepared(sd1, CLoRAComposer(**params)) as (comp, ctx, sched):
        z0 = initial_latents(ctx, 11, sched)
        out = denoise(ctx, comp, z0.clone(), sched, progress=False)
        assert all(m.all() for m in comp.history["masks"])
        hand = HandComposite(comp)
        hand.prepare(ctx)
        sched2 = make_scheduler(sd1.pipe, "ddim")
        sched2.set_timesteps(4)
        ref = denoise(ctx, hand, z0.clone(), sched2, progress=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masks_cover_every_pixel():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 5, 10, generator=g).softmax(-1)
    for alpha in (0.3, 0.8, 0.99):
        lora = threshold_masks(maps, [[1, 2], [4], [7]], alpha)
        for op in ("none", "erode", "dilate", "open", "close"):
            masks = assign_background(morphology(lora, op))
            assert masks.dtype == torch.bool and masks.shape == (4, 6, 5)
            assert (masks.sum(0) >= 1).all()
            assert torch.equal(masks[0], ~masks[1:].any(0))
    lora = threshold_masks(maps, [[1, 2], [4], [7]], 0.8)
    assert lora.any() and not lora.all()  # the threshold really selects
    for rows in ([2], [0, 2], [0, 1, 2]):  # a background branch takes the cells the others leave free
        masks = assign_background(background_takes_free_cells(lora, rows))
        others = [i for i in range(3) if i not in rows]
        free = ~lora[others].any(0) if others else torch.ones_like(lora[0])
        assert all(torch.equal(masks[1 + r], free) for r in rows)
        assert all(torch.equal(masks[1 + i], lora[i]) for i in others)
        assert (masks.sum(0) >= 1).all() and not masks[0].any()  # nothing left for the base branch


def test_run_masks_heatmaps_and_latent_blocks(sd1):
    two_adapters(sd1)
    result = sd1.run(PROMPT, ["a", "b"], method="clora", width=128, height=64,
                     method_params={"mask_threshold": 0.97, "inner_iterations": 1}, **FAST)
    rep = result.report
    assert result.images[0].size == (128, 64)
    assert rep["clora"]["attention_size"] == [4, 8]
    hist = rep["history"]
    assert len(hist["masks"]) == len(hist["heatmaps"]) == 4 and hist["heatmaps"][0].shape == (3, 2, 4, 8)
    for m in hist["masks"]:
        assert m.shape == (3, 4, 8) and (m.sum(0) >= 1).all() and np.array_equal(m[0], ~m[1:].any(0))
    assert any(not m[0].all() and m[0].any() for m in hist["masks"]), "masks should be partial at alpha 0.97"
    lat = rep["clora"]["final_latent_masks"]
    assert lat.shape == (3, 1, 8, 16)
    blocks = lat.reshape(3, 1, 4, 2, 8, 2)  # nearest upsampling: constant 2x2 blocks
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert set(rep["masks"]) == {"base", "a", "b"} and len(rep["heatmaps"]) == 6


# ---- schedule, counts, semantics ---------------------------------------------------------
def test_presets_and_scaled_schedule():
    assert PRESETS["notebook"] == dict(steps=100, guidance=10.0, latent_update=True, step_size=20.0,
                                       max_iter_to_alter=50, iterative_steps=(0, 10, 20), inner_iterations=20,
                                       tau=0.5, mask_threshold=0.4, apply_mask_after=0, negative_prompt="nsfw",
                                       seed=53)
    assert PRESETS["fast"] == {**PRESETS["spec"], "iterative_steps": ()}  # the spec's preset minus inner iterations
    # the default is the published schedule ("spec"); "fast" (no inner iterations) is a named deviation
    assert CLoRAComposer()._schedule(50) == (25, {0, 10, 20}, 20)
    assert CLoRAComposer()._schedule(25) == (12, {0, 5, 10}, 10)
    assert CLoRAComposer(preset="fast")._schedule(50) == (25, set(), 20)
    assert CLoRAComposer.presets["fast"].deviation and not CLoRAComposer.presets["spec"].deviation
    c = CLoRAComposer(preset="spec")
    assert c._schedule(50) == (25, {0, 10, 20}, 20)  # the spec's default preset at T = 50
    assert c._schedule(4) == (2, {0, 1}, 2)
    assert c._schedule(20) == (10, {0, 4, 8}, 8)
    assert CLoRAComposer(preset="notebook")._schedule(100) == (50, {0, 10, 20}, 20)
    assert CLoRAComposer(iterative_steps="none")._schedule(50) == (25, set(), 20)
    assert CLoRAComposer(max_iter_to_alter=5, iterative_steps="0,10", inner_iterations=3)._schedule(50) == (5, {0}, 3)


def test_notebook_preset_is_a_whole_recipe(sd1):
    """A named preset applies its steps, guidance, sampler and negative prompt unless set explicitly."""
    two_adapters(sd1)
    small = {"preset": "notebook", "max_iter_to_alter": 0, "batch_branches": "on"}  # keep 100 steps cheap
    res = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=small, seed=1, progress=False,
                  width=32, height=32, steps=None)
    r = res.recipes[0]
    assert (r.steps, r.guidance, r.sampler, r.negative_prompt) == (100, 10.0, "ddim", "nsfw")
    assert res.report["from_preset"] == {"steps": 100, "guidance": 10.0, "sampler": "ddim", "negative_prompt": "nsfw",
                                         "weight": 1.0}  # the adapters were named without a weight
    assert r.from_preset == res.report["from_preset"] and r.effective["preset"] == "notebook"
    assert r.effective["schedule"]["iterative_steps"] == [] and r.effective["te_mode"] == "per_branch"
    res = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=small, guidance=4.0, negative_prompt="",
                  **{**FAST, "steps": 3})
    r = res.recipes[0]
    assert (r.steps, r.guidance, r.negative_prompt) == (3, 4.0, "") and res.report["from_preset"] == {"sampler": "ddim", "weight": 1.0}
    # the default preset is not named: the studio's own defaults, no run settings from it
    res = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"max_iter_to_alter": 0}, **FAST)
    assert res.report["from_preset"] == {} and res.recipes[0].negative_prompt == ""
    assert res.recipes[0].effective["preset"] == "spec" and "deviation" not in res.recipes[0].effective
    fast = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"preset": "fast"}, **FAST)
    assert "inner iterations" in fast.recipes[0].effective["deviation"]


def test_style_adapter_in_every_lora_branch(sd1):
    a, b = two_adapters(sd1)
    style = sd1.adapters.add(random_lora(sd1, "st", seed=9))
    style.trigger = style.concept = None  # a style adapter needs neither
    params = {"style": "st", "latent_update": False}
    res = sd1.run(PROMPT, ["a", "b", "st"], method="clora", method_params=params, **FAST)
    rep = res.report
    assert set(rep["masks"]) == {"base", "a", "b"} and res.recipes[0].effective["style"] == ["st"]
    assert rep["full_forwards"] == 3 * 4
    plain = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"latent_update": False}, **FAST)
    assert np.abs(np.asarray(res.images[0], float) - np.asarray(plain.images[0], float)).max() > 0
    with prepared(sd1, CLoRAComposer(style="st")) as (comp, ctx, sched):
        assert [br.unet for br in comp.branches] == [{}, {"a": 1.0, "st": 1.0}, {"b": 1.0, "st": 1.0}]  # base: none
        # batched rows give each branch what its own call gives, the style adapter included
        z = initial_latents(ctx, 2, sched)
        with torch.no_grad():
            batched = comp._all(z, sched.timesteps[1], truncate=False)
            seq = [comp._pass(z, sched.timesteps[1], k, truncate=False) for k in range(3)]
        for bp, sp in zip(batched, seq):
            torch.testing.assert_close(bp.eps[1], sp.eps[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(GenerationError, match="not among the composed adapters"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"style": "zz"}, **FAST)
    with pytest.raises(GenerationError, match="at least one concept"):
        sd1.run(PROMPT, ["st"], method="clora", method_params={"style": "st"}, **FAST)


def test_background_adapter_takes_the_cells_the_objects_leave(sd1):
    two_adapters(sd1)
    res = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"background": "b", "latent_update": False}, **FAST)
    masks = res.report["masks"]
    assert np.array_equal(masks["b"], ~masks["a"]) and not masks["base"].any()
    eff = res.recipes[0].effective
    assert eff["background"] == ["b"] and "background adapters take the cells" in eff["deviation"]
    plain = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"latent_update": False}, **FAST)
    assert "background" not in plain.recipes[0].effective and "deviation" not in plain.recipes[0].effective
    sd1.adapters.get("b").concept_kind = "background"
    auto = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"background": "auto", "latent_update": False}, **FAST)
    assert auto.recipes[0].effective["background"] == ["b"]
    np.testing.assert_array_equal(np.asarray(auto.images[0]), np.asarray(res.images[0]))
    sd1.adapters.get("b").concept_kind = None  # no background adapter: auto changes nothing
    none = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"background": "auto", "latent_update": False}, **FAST)
    np.testing.assert_array_equal(np.asarray(none.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(GenerationError, match="background adapter.*zz.*not among"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"background": "zz"}, **FAST)


def test_background_in_objects_draws_the_background_in_every_object_branch(sd1):
    """The background deviation's second half: an object's branch keeps the background's trigger and
    runs its adapter at ``background_in_objects`` × its UNet weight (auto: 0.5 beside one object, off
    beside more); "off" is session 29's fusion."""
    two_adapters(sd1)
    prompt = "a sks cat on a zwx dog"
    branches = {}
    with prepared(sd1, CLoRAComposer(background="b"), prompt) as (comp, _, _):
        assert comp.effective()["background_in_objects"] == 0.5  # auto, one object
    c = sd1.adapters.add(random_lora(sd1, "c", seed=3))
    c.trigger, c.concept = "ohwx", "bird"
    with prepared(sd1, CLoRAComposer(background="b"), "a sks cat and a ohwx bird on a zwx dog") as (comp, _, _):
        assert "background_in_objects" not in comp.effective()  # auto, two objects: off
        assert {b.label: b.unet for b in comp.branches}["c"] == {"c": 1.0}
        prompts = {b.label: text for b, text in zip(comp.branches, comp.plan.prompts)}
        assert "zwx" not in prompts["a"] + prompts["c"] + prompts["base"] and "zwx" in prompts["b"]
    with prepared(sd1, CLoRAComposer(background="b", background_in_objects=0), "a sks cat and a ohwx bird on a zwx dog") as (comp, _, _):
        assert {b.label: b.unet for b in comp.branches}["c"] == {"c": 1.0, "b": 0.0}  # the trigger alone
        prompts = {b.label: text for b, text in zip(comp.branches, comp.plan.prompts)}
        assert "zwx" in prompts["a"] and "zwx" in prompts["c"] and "zwx" not in prompts["base"]
    sd1.adapters.remove("c")
    for share in (0.5, 0.0, "off"):
        with prepared(sd1, CLoRAComposer(background="b", background_in_objects=share), prompt) as (comp, ctx, _):
            branches[share] = {b.label: b for b in comp.branches}
            eff = comp.effective()
        if share == "off":
            assert "background_in_objects" not in eff and "keeps the background's trigger" not in eff["deviation"]
        else:
            assert eff["background_in_objects"] == share and "keeps the background's trigger" in eff["deviation"]
    assert branches[0.5]["a"].unet == {"a": 1.0, "b": 0.5} and branches[0.0]["a"].unet == {"a": 1.0, "b": 0.0}
    assert branches["off"]["a"].unet == {"a": 1.0}
    assert branches[0.5]["b"].unet == branches["off"]["b"].unet == {"b": 1.0} and branches[0.5]["base"].unet == {}
    # the object's branch reads the background's trigger (and its text-encoder weights): another encoding
    assert not torch.equal(branches[0.5]["a"].cond.embeds, branches["off"]["a"].cond.embeds)
    torch.testing.assert_close(branches[0.5]["a"].cond.embeds, branches[0.0]["a"].cond.embeds)
    torch.testing.assert_close(branches[0.5]["base"].cond.embeds, branches["off"]["base"].cond.embeds)
    for bad in (-0.5, "half", 3):
        with pytest.raises(GenerationError, match="background_in_objects must be auto, off or a weight fraction"):
            with prepared(sd1, CLoRAComposer(background="b", background_in_objects=bad), prompt):
                pass
    with prepared(sd1, CLoRAComposer(background_in_objects=1.0), prompt) as (comp, _, _):  # no background: no effect
        assert {b.label: b.unet for b in comp.branches}["a"] == {"a": 1.0}


def test_call_counts_updates_and_determinism(sd1):
    a, b = two_adapters(sd1)
    params = {"preset": "spec", "inner_iterations": 2}
    r1 = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=params, **FAST)
    rep = r1.report
    n, steps, a_steps, k = 3, 4, 2, 2  # T=4: updates on steps 0, 1; both are iterative steps
    updates = a_steps + 2 * k
    assert rep["latent_updates"] == updates == len(rep["history"]["losses"])
    # default on this 8x8 latent: joint, one graph pass of all branches and one backward per update,
    # the last one at a step run to the end (its eps are the step's prediction)
    assert rep["full_forwards"] == n * steps
    assert rep["grad_forwards"] == n * updates and rep["backward_passes"] == updates
    assert rep["truncated_forwards"] == n * (updates - a_steps)
    # branchwise (the default from 32x32 latents): graph-free maps, then one graph pass and backward per branch
    bw = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={**params, "backprop": "branchwise"}, **FAST).report
    assert bw["full_forwards"] == n * steps
    assert bw["grad_forwards"] == bw["backward_passes"] == n * updates
    assert bw["truncated_forwards"] == n * (updates - a_steps) + n * updates
    r2 = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=params, **FAST)
    assert np.array_equal(np.asarray(r1.images[0]), np.asarray(r2.images[0]))
    off = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"latent_update": False}, **FAST)
    zero = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"step_size": 0.0, "inner_iterations": 1}, **FAST)
    assert off.report["latent_updates"] == 0 and off.report["backward_passes"] == 0
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(zero.images[0]))
    assert np.abs(np.asarray(off.images[0], float) - np.asarray(r1.images[0], float)).mean() > 0.1
    none = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"max_iter_to_alter": 0}, **FAST)
    assert none.report["latent_updates"] == 0


def test_refresh_after_update_and_cond_only_maps(sd1):
    two_adapters(sd1)
    params = {"inner_iterations": 0, "refresh_after_update": True, "attention_source": "cond"}
    rep = sd1.run(PROMPT, ["a", "b"], method="clora", method_params=params, **FAST).report
    assert rep["latent_updates"] == 2
    assert rep["full_forwards"] == 3 * 4 + 3 * 2  # one more forward of every branch per updating step


def test_guide_leaves_no_graph(sd1):
    two_adapters(sd1)
    with prepared(sd1, CLoRAComposer(inner_iterations=0)) as (comp, ctx, sched):
        z = initial_latents(ctx, 1, sched)
        with torch.enable_grad():
            out = comp.guide(z, sched.timesteps[0], 0)
            same = comp.guide(z, sched.timesteps[3], 3)  # step 3 >= T/2: no update
        assert out.grad_fn is None and not out.requires_grad and not torch.equal(out, z)
        assert same is z


# ---- bad input ---------------------------------------------------------------------------
def test_bad_input(sd1):
    a, b = two_adapters(sd1)
    b.concept = None
    with pytest.raises(GenerationError, match="'b' has no concept word.*set it in the library"):
        sd1.run(PROMPT, ["a", "b"], method="clora", **FAST)
    b.concept, a.trigger = "dog", ""
    with pytest.raises(GenerationError, match="'a' has no trigger word"):
        sd1.run(PROMPT, ["a", "b"], method="clora", **FAST)
    a.trigger = "sks"
    with pytest.raises(GenerationError, match="does not mention 'dog'"):
        sd1.run("a cat in the snow", ["a", "b"], method="clora", **FAST)
    with pytest.raises(GenerationError, match="backprop"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"backprop": "magic"}, **FAST)
    with pytest.raises(GenerationError, match="grad_checkpoint"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"grad_checkpoint": "maybe"}, **FAST)
    with pytest.raises(GenerationError, match="mask_morphology"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"mask_morphology": "blur"}, **FAST)
    with pytest.raises(GenerationError, match="need 3 entries"):
        sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"token_indices": "[[[2],[5]]]"}, **FAST)


def test_explicit_override_equals_auto(sd1):
    two_adapters(sd1)
    auto = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={"inner_iterations": 1}, **FAST)
    c = auto.report["clora"]
    manual = sd1.run(PROMPT, ["a", "b"], method="clora", method_params={
        "inner_iterations": 1, "prompts": c["prompts"], "token_indices": c["token_indices"]}, **FAST)
    assert np.array_equal(np.asarray(auto.images[0]), np.asarray(manual.images[0]))


# ---- other architectures -----------------------------------------------------------------
def test_sdxl_tiny(sdxl):
    two_adapters(sdxl)
    result = sdxl.run(PROMPT, ["a", "b"], method="clora", method_params={"preset": "spec", "inner_iterations": 1}, sampler="euler", **FAST)
    rep = result.report
    assert result.images[0].size == (64, 64)
    assert rep["clora"]["capture_layers"] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    assert rep["latent_updates"] == 4 and all(np.isfinite(l) for _, l in rep["history"]["losses"])


@pytest.mark.skipif(not TOY_MODEL_DIR.is_dir(), reason="the toy model is not built (python -m training.toyworld)")
def test_toy_model():
    studio = Studio.load(device="cpu")
    for name, trig in (("s", "sks"), ("z", "zwx")):
        ad = studio.adapters.add(random_lora(studio, name, seed=len(name)))
        ad.trigger, ad.concept = trig, "shape"
    result = studio.run("a sks shape on the left and a zwx shape on the right", ["s", "z"], method="clora",
                        method_params={"preset": "spec", "inner_iterations": 1}, **FAST)
    rep = result.report
    assert rep["clora"]["attention_size"] == [4, 4] and rep["latent_updates"] == 4
    assert rep["clora"]["prompts"][0] == "a shape on the left and a shape on the right"
