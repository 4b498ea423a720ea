"""Rebuild the demo adapters shipped in ``assets/adapters/`` with the DreamBooth flow.

    python -m training.demo_adapters                 # all of them (about 20 min on 2 CPU cores)
    python -m training.demo_adapters --only crescent-lora --steps 100
    python -m training.demo_adapters --eval-only --eval-seed 777   # judge on a selection seed

Each reserved toy-world concept the base model never saw is taught from rendered instance images
in several colours, sizes and positions (so the trigger binds to the concept, not to one colour),
with prior preservation from the base model's own samples of the prompts the adapter could
disturb ("a red circle", … and, for patterns, "… with stripes"). Captions follow the toy world's
grammar with the trigger in the concept's slot, matching ``studio.toyworld.check``'s trigger
prompts: "a small red sks shape on the left", "a blue circle with kpk pattern", "a red square on a
wvu background". Then every adapter is judged with the oracle: the concept rate on its trigger
prompts with and without it, and shape/colour accuracy on base prompts with it loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "assets" / "adapters"
WORK = Path(os.environ.get("STUDIO_DEMO_WORK", "/tmp/studio-demo-adapters"))

log = logging.getLogger("studio.training.demo")


@dataclass
class Demo:
    concept: str  # the reserved toy-world concept
    kind: str  # object / style / background
    trigger: str  # a word the CLIP BPE keeps as one token
    kron: bool = False  # also train a Kronecker version
    lora_recipe: dict = field(default_factory=dict)  # overrides of LORA for this demo (e.g. its steps)
    kron_recipe: dict = field(default_factory=dict)  # overrides of KRON
    # the object sizes its instance images show; an object the VAE turns into a blob when small is
    # better taught only at the sizes it keeps (python -m studio.toyworld.roundtrip)
    sizes: tuple[str, ...] = ("small", "medium", "large")
    # the base fills an object's instance images show it in: taught only solid, an object adapter draws
    # every "sks shape with stripes" (or with a style adapter's pattern) solid (docs/benchmark.md, session 15)
    fills: tuple[str, ...] = ("solid",)
    # free outlines (render.OUTLINE, captioned only "shape"): for a style or background, the share of its instance
    # images whose main object is one ("a red shape with kpk pattern", "a red shape on a wvu background"), so its
    # weights do not also mean "a base shape here"; for an object, the share of its companions beside it that are
    # ("a red sks shape on the left and a blue shape on the right"), meant to teach that a "shape" without its
    # trigger is not its concept (an experiment: at 0.5 the crescent and plus composed worse, session 24)
    outlines: float = 0.0

    def recipe(self, kind: str) -> dict:
        """The full training settings of this demo's ``kind`` adapter (lora / kron)."""
        if kind == "kron":
            return {**COMMON, **KRON, **self.kron_recipe}
        return {**COMMON, **LORA, **self.lora_recipe}

    @property
    def slot(self) -> str:
        return {"object": "shape", "style": "pattern", "background": "background"}[self.kind]



# Custom Diffusion-style objects (session 7): the LoRA on cross-attention only, the trigger's own input
# embedding learnt, no text-encoder LoRA. Picked on seed 777 (24 images, 8 per form) and the check's
# adapter prompts: crescent 0.67 at 1000 steps, 0.88 / 1.00 / 0.75 at 2000 (sentence / tags / and;
# base 1.00 / 1.00); plus 0.29 at 1000, 0.50 at 2000; the classic recipe's crescent read 0.75 / 0.58
# / 0.71 and plus 0.46 / 0.38 / 0.29 on the check's prompts, the cross ones 0.75 / 0.83 / 0.75 and
# 0.75 / 0.79 / 0.50. Cross-attention keys/values only (lr 3e-3): crescent 0.50 at 1000; cross
# attention with a text-encoder LoRA instead of the embedding: 0.00 at 600. In composite the cross
# crescent keeps its rate beside the plus (0.88 alone, 0.88 in the pair); merged, it does not (0.33).
# Session 8 (same seed, docs/benchmark.md "Why the bars are not met"): a penalty holding the keys and
# values of trigger-free prompts (weight 10 / 1 / 0.1) left the cross-kv crescent at 0.00 / 0.08 / 0.17
# after 1000 steps (0.50 without); the embedding alone drew no crescent (0.00); the plus on medium and
# large sizes only read 0.75 (0.50 on all sizes) but still drew a star in two-object prompts, and 0.42
# also without water/night scenes; a cross-attention arrow read 0.67 and drew nothing beside another
# object. None is shipped.
# Session 12 (world v3.1, seed 777, 24 images, sentence / tags / and; docs/benchmark.md "Levers tried in
# session 12"): keys/values only (cross-kv + embedding, lr 3e-3) gives the crescent 0.62 / 0.75 / 1.00 at 3000
# steps and the twotone 0.88 / 0.88 / 0.62, and merged they leave each other's pictures unchanged, but a
# key/value sky is a pale wash that loses the crescent; CROSS fills (lr 1e-3) tie the shipped ones (twotone
# 0.88 / 0.88 / 1.00 at 3600, glow 0.88 / 0.88 / 0.75 at 2400) and die beside the crescent as they do; a CROSS
# arrow draws arrows alone (0.88 / 0.62 / 1.00 at 2000) and blobs in two-object prompts, also when taught on
# medium and large arrows only (--instance-sizes medium,large); the CROSS sky does not bind at 100-150 steps.
CROSS = dict(unet_targets="cross", train_text_encoder=False, train_token_embedding=True, lr=3e-3,
             token_embedding_lr=2e-2)
# Session 14: the prior also holds ``rival_prompts`` (a stand-in word in a trigger's slot). Every demo was
# trained with them; on the selection seed 777 (24 images per cell, docs/benchmark.md "Session 14") the
# crescent + plus pair went from 0-3 of 24 all-present to 6-12 with composite, CMLoRA and step-5 CLoRA,
# and the other trigger's object stopped turning into a second crescent. On the adapter check's seed 1234
# (36 images) the object LoRAs kept their rates (crescent 1.00 / 1.00 / 0.92, plus 0.92 / 0.83 / 0.67, arrow
# 0.50 / 0.42 / 0.92) but the styles and skies lost theirs (twotone 1.00 -> 0.67-0.75, glow 0.50-0.67,
# sky LoRA 0.83-0.92, Kronecker crescent 0.08-0.25), so only the object LoRAs keep them. That choice was
# made on seed 1234, so the check's numbers no longer test it blind; the benchmark's seeds were not used.
# Stand-ins built from the instance captions instead (object slot only, `--set stand_in_prior=36` with no
# rival prompts), seed 777, 24 images, composite / CMLoRA / step-5 CLoRA: crescent + plus 0 / 1 / 7 against
# 6 / 8 / 16, crescent + glow 0 / 0 / 1 against 1 / 0 / 4, so the rival prompts stay.
STAND_INS = dict(stand_ins=True)
# Objects whose outline must be drawn at v4's outer 16x16 level, which has no attention: the CROSS recipe
# on the attention projections and the ResNet convolutions too (LoCon's reach; the plus, the arrow, the crescent)
LOCON_OBJECT = {**CROSS, **STAND_INS, "steps": 2000, "unet_targets": "attention+conv"}
# Session 25: Break-A-Scene's cross-attention loss (weight 0.1) on each instance image's concept mask, so "sks" and
# "shape" attend where the crescent is drawn. CLoRA's masks are those words' maps: the shipped crescent's covered 16 of
# 16 cells at 4x4 and the plus's 12, so fusion averaged the branches nearly everywhere. Crescent + plus selection suite
# (workflows/toy-weights-select.yaml wording, seed 777, 48 images per method, all present oracle / oracle-b): shipped
# pair 94 / 78 of 336 (CLoRA 28, step-5 CLoRA 30); both taught with the loss 108 / 81 (CLoRA 35, step-5 CLoRA 43; CMLoRA
# 16 -> 8, Merge 7 -> 6, Composite 13 -> 16). The loss on the crescent alone: 55 / 30; with the mask's area share
# per cell as the target instead of the cells it touches: 64 / 34 (masks of 2-3 cells, the rest drawn by the base
# branch); weight 1.0 instead of 0.1: base shape accuracy with the crescent 0.71 (1.00)
# Session 26, same suites (crescent + plus 336, then crescent + sky / glow / twotone 168 each, oracle / oracle-b): the
# shipped pair 108 / 81, then 78 / 15, 30 / 21, 19 / 4. The loss on the trigger alone (attention_words="trigger", both
# objects) 68 / 56 on crescent + plus; the crescent taught in solid, stripes and dots (and the plus) 39 / 36, then 45 / 14,
# 25 / 24, 13 / 2; the crescent taught only at timesteps >= 400 (instance_min_timestep) 53 / 31, 23 / 18, 13 / 0, at
# >= 600 36 / 12, 36 / 18, 26 / 3; the plus at weight 0.3 103 / 78 on crescent + plus; the twotone with the loss 2 / 0 on
# crescent + twotone; the glow on attention + convs 15 / 6 on crescent + glow. None ships (docs/training-history.md
# "Session 26"). Session 27 (crescent + glow, crescent + twotone): the styles taught below timestep 600 9 / 5, 3 / 0
# (beside the >= 400 crescent 9 / 6, 2 / 0), at >= 400 20 / 15, 4 / 0, on more outlines 18 / 11, 3 / 1; the crescent
# with the ResNet convs of every level but 16x16 10 / 7, 10 / 1, of the 16x16 level only 15 / 14, 5 / 0. None ships.
# Session 31: the loss also shuts the fill words out. Asked for "a {red, green, blue} sks shape with stripes" (seed 777,
# 36 images) the shipped crescent draws stripes 0 times; taught in solid, stripes and dots 2 with the loss, 21 without
# it, and merged with the gradient 0 / 5 / 18 of 36. The glow and the twotone (fills drawn for the outline) do not
# follow: four-colour style suite, Merge / Composite / CMLoRA / step-5 CLoRA, glow 7 / 2 / 5 / 1 against the shipped
# 7 / 3 / 6 / 11, so the loss stays for CLoRA's masks (docs/training-history.md "Session 31").
LOCALIZED_OBJECT = {**LOCON_OBJECT, "attention_loss": 0.1}
# Session 15: the crescent and plus LoRAs retrained with a third of their instance images in stripes and a
# third in dots (--instance-fills solid,stripes,dots). Alone, the crescent still drew "a green sks shape with
# stripes" solid (0 of 16, seed 777), and composed with the twotone, glow or gradient adapter it was no better
# (24 images per cell, docs/benchmark.md "Session 15"), so the demos keep solid instance images.

DEMOS = [
    # world v2 classic recipe: 700 steps read 0.12 (24 images, seed 1234), 1400 read 0.54 (sentence 0.75)
    # session 21: on the plus's recipe (LOCON_OBJECT, so instance recipe world-v3/2) the crescent draws itself in every
    # form, 1.00 / 1.00 / 1.00 on seed 777 (24 images) and on seed 1234 (36 images; the cross-attention crescent
    # 1.00 / 1.00 / 0.83), beside a base object 0.83 (0.78); beside the plus on the selection suite
    # (workflows/toy-weights-select.yaml, all present of 24 at each method's picked weights, merge / composite /
    # CMLoRA / CLoRA / step-5 CLoRA) 1 / 5 / 4 / 16 / 17 against 2 / 5 / 4 / 7 / 7; on a sky (seed 777, weight 1)
    # 4 / 16 / 14 / 4 / 18 against 9 / 22 / 15 / 5 / 16 (docs/benchmark.md, "Session 21")
    # Kronecker crescent: session 16's (4x4, text-encoder side, attention only, 900 steps) read 0.08 / 0.25 / 0.25 on
    # seed 1234. Session 22, on the LoRA's recipe with Kronecker layers on the ResNet convolutions too (seed 777, 24
    # images): 4x4 1.00 / 1.00 / 1.00, beside 0.50, base shape 0.92; 8x8 0.88 / 0.88 / 0.88, beside 0.33, base
    # shape 0.88; adapter check at seed 777 (leak / survival) 4x4 -0.04 / 0.71, 8x8 0.04 / 0.50. So 4x4.
    Demo("crescent", "object", "sks", kron=True, lora_recipe=LOCALIZED_OBJECT,
         kron_recipe={**LOCON_OBJECT, "prior_preservation": True}),
    # session 17 (world v4, selection seed 777, 24 images, sentence / tags / and): on cross-attention only the
    # plus drew ragged blobs (0.62 / 0.50 / 0.38; 4,000 steps no better by eye), since v4's outer level, the
    # only one at 16x16, has no attention; with the ResNet convolutions too (LoCon's reach) it draws crosses,
    # 1.00 / 1.00 / 1.00, 0.04 without it, base shape and colour 1.00 with it
    # session 19: retrained on instance recipe world-v3/2 (a base object beside it in every phrasing form, every
    # base shape, either side): selection seed 777, 24 images: 1.00 / 1.00 / 1.00 alone (as before); beside the
    # shipped crescent (merge / composite / CMLoRA / CLoRA / step-5 CLoRA all present) 1 / 3 / 5 / 6 / 3 against
    # 1 / 1 / 0 / 6 / 3; "a red circle on the left and a blue ohwx shape on the right" 11 of 16 against 4 of 16
    Demo("plus", "object", "ohwx", lora_recipe=LOCALIZED_OBJECT),
    # session 18 (world v4, selection seed 777, 24 images, sentence / tags / and): the plus's recipe gives the
    # arrow 1.00 / 1.00 / 1.00 (0.00 without it, base shape and colour 1.00 with it) against 0.75 / 0.75 / 0.75
    # for the classic rank-8 recipe it had (600 steps, text-encoder LoRA)
    # session 19: retrained on instance recipe world-v3/2: seed 777 1.00 / 1.00 / 1.00, beside a base object 0.83
    # (20 of 24) against 0.75 for session 18's arrow; seed 1234 1.00 / 1.00 / 1.00, beside 0.86 against 0.75
    Demo("arrow", "object", "btr", lora_recipe=LOCON_OBJECT),
    # world v3.1 (session 11, selection seed 777, 24 images, sentence / tags / and): glow 0.38 / 0.38 / 0.38 at
    # 900 steps, 0.75 / 0.62 / 0.88 at 1800, 0.75 / 0.75 / 0.88 at 2700 (a tie: the fewer steps); gradient 0.62 /
    # 0.62 / 0.88 at 900, 0.88 / 0.88 / 1.00 at 1800, 0.88 / 0.62 / 0.88 at 2700
    # Session 18 (world v4): on attention + ResNet convs (the plus's lever) the glow read per base shape
    # 12 / 12 / 10 / 3 / 10 / 12 of 12 (circle / square / triangle / star / diamond / heart) against the
    # shipped 12 / 12 / 8 / 7 / 9 / 10, and beside the crescent (selection seed 777, 24 images, merge /
    # composite / CMLoRA / CLoRA / step-5 CLoRA all present) 0 / 1 / 0 / 0 / 3 against 0 / 0 / 0 / 2 / 3:
    # the glow's outline level is not what it lacks, so it stays on attention
    # Session 23: composed with the crescent, the glow turned "a green sks shape with kpk pattern" into a glowing
    # circle or square (crescent seen in 0-3 of 24 per method): it had only ever seen its fill on base shapes.
    # Taught on world-v3/2 with a third of its instance images on free outlines ("a red shape with kpk pattern",
    # render.OUTLINE), the crescent keeps its outline and takes the glow. Selection suite (seed 777, the object +
    # style cells of workflows/toy-guidance-select.yaml at each method's CFG, 7 methods x 24 images, all present by
    # oracle / oracle-b): shipped 5 / 2 of 168; outlines 1800 steps 30 / 34, 2700 steps 46 / 42, 3600 steps 37 / 49,
    # a share of 0.2 at 2700 steps 35 / 34
    # (outlines only in red and yellow, a bug, 1800 steps: 58 / 48); the control, world-v3/2 without outlines at 2700
    # steps, 13 / 8 (crescent seen in 2-6 of 24 per method against 13-19 with outlines, Switch aside). Alone (seed 777, 8 per
    # form): shipped 0.62 / 1.00 / 1.00, outlines 2700 steps 0.62 / 0.62 / 1.00, control 0.75 / 0.62 / 1.00. So
    # 2700 with outlines. The twotone taught the same way (2700 steps) lost its fill beside the crescent (4 of 168
    # against 28), so it keeps its recipe.
    Demo("glow", "style", "kpk", lora_recipe=dict(steps=2700), outlines=0.33),
    Demo("gradient", "style", "cbp", lora_recipe=dict(steps=1800)),
    # world v3 (session 9, selection seed 777, 24 images, sentence / tags / and): 900 steps 0.38 / 0.38 / 0.25,
    # 1800 steps 0.88 / 0.88 / 0.62, so 1800; on v3.1 (session 11) 1800 steps read 0.88 in every form
    # session 22 (world v4, instance recipe world-v3/2, seed 777, 24 images): 1800 steps 0.62 / 0.62 / 0.88, beside
    # 0.75; 2700 steps 0.75 / 0.62 / 0.88, beside 0.79; not shipped (the shipped one: 0.75 / 0.75 / 1.00 on seed 1234)
    Demo("twotone", "style", "bhk", lora_recipe=dict(steps=1800)),
    # sky, CROSS at lr 1e-3 (selection seed 777, 24 images): 300 steps 1.00 in every form, a red circle
    # kept on it in 0.79, the sky kept beside the crescent in 0.92 (merge); the classic 200-step LoRA
    # read 1.00 / 0.25 / 0.25 and was lost beside any other adapter (0.00-0.04); CROSS at lr 3e-3 for
    # 1000 steps turned every object on it into an orange blob
    # world v3.1 (session 11, selection seed 777, 24 images, sentence / tags / and): the Kronecker sky 0.25 / 0.00
    # / 0.25 at 400 steps, 1.00 / 1.00 / 1.00 at 800; the sunset 0.88 / 0.62 / 0.50 at 300, 1.00 / 0.88 / 1.00 at 600
    # Kronecker sky, session 22 (seed 777, 24 images): on CROSS at lr 1e-3, 300 steps 0.88 in every form, 500 steps
    # 1.00 / 1.00 / 0.88 (beside 1.00), 700 steps 0.88 / 0.88 / 0.75; session 16's (text-encoder side, 800 steps)
    # read 0.50 / 0.58 / 0.50 on seed 1234
    # session 24: a third of the sky's instance images on free outlines ("a red shape on a wvu background") keeps the
    # crescent on the sky. Selection (crescent + sky cells of the selection wording, seed 777, 7 methods x 24, all
    # present oracle / oracle-b): shipped world-v3/1 set 32 / 11 of 168; world-v3/2 set, no outlines (control) 40 / 14;
    # outlines 0.33 54 / 22; outlines 0.5 41 / 35. The Kronecker twin ships on the world-v3/2 set without outlines
    # (instance/sky-kron/); retrained now, it would see the outlines too (not measured).
    Demo("sky", "background", "wvu", kron=True, outlines=0.33, lora_recipe={**CROSS, "lr": 1e-3, "steps": 300},
         kron_recipe={**CROSS, "lr": 1e-3, "steps": 500, "prior_preservation": True}),
    Demo("sunset", "background", "nrf", lora_recipe=dict(steps=600)),
]

# Settled by short sweeps on the crescent (concept rate / base shape / base colour accuracy, 24 images
# each): UNet-only LoRA with prior preservation barely learnt the trigger (0.04-0.46); adding the
# text-encoder LoRA let it bind (0.67 at 500 steps); Kronecker with prior preservation did not learn
# (0.08), so it trains without it (a UNet-only LoRA without prior reached 0.67-0.92, with more
# damage to base prompts). Second round, after the decoder refinement: prior images drawn at
# guidance 7.5 carry the toy model's high-guidance colour drift into the adapter (0.79 / 0.83 /
# 0.63); drawn at 3 they keep the base model intact (0.63 / 0.96 / 0.83). 800 steps: 0.79 / 0.75 /
# 0.58. A trained trigger embedding (pivotal tuning) changed nothing with the text-encoder LoRA on
# (0.63 / 0.96 / 0.83) and bound poorly without it (0.13-0.25), so the demos do not use it.
# Third round, picking by a selection seed (777) apart from the shipped evaluation (seed 1234, 36
# images); the base alone scores 1.00 / 0.96 there. Concept / base shape / colour, 24 images unless
# noted. 54 instance images (every colour x size x position) instead of 12, nothing else changed:
# crescent 0.25 / 0.58 / 0.75 / 0.62 / 0.75 at 200 / 300 / 400 / 500 / 700 steps, colour 0.79-0.88.
# Text-encoder lr 3e-4 or prior_loss_weight 2: no better (0.58 / 0.67 at 500). Training 10% of the
# prior images with the empty caption (caption_dropout 0.1, scope "prior": otherwise the text-encoder
# LoRA moves the unconditional branch freely, and guidance 7.5 amplifies that): crescent 0.79 / 0.88 /
# 0.92 at 300 / 500 / 700 (base 0.96-1.00 / 0.83-0.88), 1.00 at 1000 with colour 0.83; arrow 0.67 /
# 0.58 / 0.83 (1.00 / 0.96 at 700), 0.71-0.75 at 850-1000; plus 0.50 / 0.67 / 0.79 (1.00 / 0.92 at
# 700), 0.62-0.71 at 800-1000, rank 8: 0.92 at 700 but colour 0.83. The arrow at rank 4 gave only
# 0.67 on the evaluation seeds; at rank 8 (36 images) 0.89 / 0.92 / 0.86 / 0.83 at 600-900 steps
# with base 0.94-1.00 / 0.86-0.94, so it trains at rank 8. That pick (700) was noisy, so the arrow
# was re-selected on 72 images (seeds 777 + 4242, 36 each, the fp16 files as shipped): rank 8 0.81 /
# 0.85 / 0.82 / 0.85 at 500 / 600 / 700 / 800 steps (base 0.94-1.00 / 0.89-0.94), rank 4 0.72 /
# 0.71 / 0.74 / 0.78; 600 ties 800 and keeps base prompts better (1.00 / 0.94 against 0.94 / 0.92),
# so it trains 600 steps at rank 8. Sky learns at once (1.00 from 150 steps)
# and only its colour accuracy moves: 0.88 at 200, 0.83 from 300 on; lr 5e-4, prior_loss_weight 3
# or no text-encoder LoRA (concept 0.04-0.42) did not lift it, so it stops at 200. Kronecker 4x4
# (41k params; 8x8 had 14k) without prior: 0.21 / 0.50 / 0.54 at 300 / 450 / 600, base shape 0.88 /
# 0.88 / 0.75 (on the evaluation seeds 0.78 at 450, but base 0.83 / 0.83); at lr 2e-3 0.75 at 400
# with base shape 0.50 (the crescent leaks into base prompts); with prior at weight 1 0.04 at 300;
# at weight 0.3 (36 images) 0.22 / 0.44 / 0.53 / 0.56 / 0.53 / 0.39 at 300-1200 with base 0.89-1.00
# / 0.75-0.92 (short of 0.80). With the Kronecker text-encoder side (text_encoder_lr 1e-3, prior weight
# 1, caption dropout 0.1 on prior images; 72 images, seeds 777 + 4242) the crescent binds: 0.85 / 0.94 /
# 0.97 / 0.94 at 900 / 1100 / 1300 / 1500 steps, base shape 0.94-0.97, colour 0.82 / 0.85 / 0.88 / 0.88
# (seed 777 alone: 0.17 / 0.50 / 0.75 at 300 / 500 / 700), so it takes 1300. Sky Kronecker, same
# recipe, 72 images: 0.03 / 0.65 / 1.00 / 1.00 at 150 / 250 / 400 / 600 steps, base 0.96 / 0.88,
# 0.94 / 0.82, 0.97 / 0.89, 1.00 / 0.86; 400 ties 600 and keeps colour further above the bar.
# Styles: the zigzag and checker fills cannot be taught on this VAE. The oracle finds them in only
# part of the VAE round trips of rendered instance images (small / medium / large objects: zigzag
# 0.47 / 0.50 / 0.67, checker 0.36 / 0.50 / 0.64; 0.92-1.00 before the VAE), and their adapters read
# 0.03-0.17 (LoRA, 500 steps) and 0.11 (Kronecker). A decoder refined on a texture-heavy mix (encoder
# frozen) decoded checkers as stripes, so the encoder is what loses them. They are no longer
# shipped. The styles are two smooth reserved fills the VAE keeps: gradient (colour fading to light
# towards the bottom) and glow (light centre, coloured rim). Same recipe, 72 selection images (seeds
# 777 + 4242), concept / base shape / base colour: gradient 0.47 / 0.97 / 0.85 at 300 steps, 0.64 /
# 0.97 / 0.88 at 500, 0.97 / 0.94 / 0.83 at 700, 0.97 / 0.99 / 0.94 at 900 (measured with the
# from-scratch oracle of that day; 0.99 / 1.00 / 0.94 at 900 with the shipped one), so 900. Glow,
# with the shipped oracle: 0.76 / 0.99 / 0.89 at 700, 0.82 / 0.96 / 0.86 at 1000, 0.85 / 0.93 / 0.86
# at 1150, 0.86 / 0.96 / 0.83 at 1300 (colour 0.81 on seed 777); rank 8: 0.76 at 1000, 0.83 / 0.93 /
# 0.88 at 1400; prior_loss_weight 2 at 1300: 0.74. So 1150 at rank 4 (1000 read 0.64 on the
# evaluation seed, so the pick mattered; 1150 reads 0.89 there).
# An "outline" fill (a coloured rim, 2-4 px) was tried first: oracles disagreed on its generated
# images (0.83 with one oracle, 0.56 with another on the same 72 images), which showed broken
# rings in the wrong colour; a 3-6 px rim erases the inside of stars and triangles (0.41 of VAE round
# trips recognised), so it left the world.
# Per adapter the pick is the step count with the best concept rate whose base accuracy stays >= 0.85
# on the selection seeds.
LORA = dict(adapter="lora", rank=4, lr=1e-3, train_text_encoder=True, text_encoder_lr=1e-3, steps=700)
KRON = dict(adapter="kron", factors="4x4", lr=1e-3, steps=450, prior_preservation=False)
COMMON = dict(steps=700, batch_size=8, grad_accum=1, prior_preservation=True, prior_loss_weight=1.0,
              caption_dropout=0.1, caption_dropout_scope="prior", snr_gamma=None, class_steps=25, class_guidance=3.0,
              num_validation_images=3, sample_steps=25, save_dtype="fp16")
N_INSTANCE = 54  # every colour x size x position once
# Instance sets are redrawn when this changes (world v2: base backgrounds, a base object
# beside the concept, captions in the three phrasing forms; v3: a new base model, so new class images).
INSTANCE_RECIPE = "world-v3/2"
# Until world-v3/2 (session 19) an instance image held a base object only where its caption was a tag list,
# and that object was a yellow diamond or a red square: the objects never saw "... on the left and a blue
# circle on the right". The prior images did not change, so they keep their cache (PRIOR_RECIPE). The plus and
# the arrow ship on it (session 19), the crescent since session 21 (on the plus's recipe). On its cross-attention
# recipe the crescent retrained on it was not shipped, nor the sky (selection seed 777, 24
# images): the crescent alone read 0.62 / 0.62 / 0.75 against 0.88 / 1.00 / 0.75; the sky beside the crescent
# (all present; merge / composite / CMLoRA / CLoRA / step-5 CLoRA) 4 / 6 / 2 / 1 / 8 against 10 / 16 / 9 / 4 / 13.
PRIOR_RECIPE = "world-v3/1"
# Reserved concepts drawn differently since INSTANCE_RECIPE: their instance sets alone are redrawn
# (session 17: the glow follows the shape's core, studio/toyworld/render.py).
REDRAWN_LOOKS = {"glow": "core"}
EVAL_SEED = 1234  # the shipped numbers; step counts are picked on other (selection) seeds


def instance_recipe(demo: Demo) -> str:
    """What an instance set was drawn with: the shared recipe, the concept's look where it was redrawn,
    and the sizes and fills where they are not the defaults."""
    from studio.toyworld.concepts import SIZES

    return (INSTANCE_RECIPE + (f" look={REDRAWN_LOOKS[demo.concept]}" if demo.concept in REDRAWN_LOOKS else "")
            + ("" if set(demo.sizes) == set(SIZES) else " sizes=" + ",".join(demo.sizes))
            + ("" if demo.fills == ("solid",) else " fills=" + ",".join(demo.fills))
            + (f" outlines={demo.outlines:g}" if demo.outlines else ""))


def trigger_caption(scene, form: str, demo: Demo) -> str:
    """The scene's caption in one phrasing form, with the trigger in the concept's slot:
    "a red sks shape on a grass background", "blue circle with kpk pattern, sand background",
    "a red square and a green star on wvu"."""
    from studio.toyworld.prompts import with_trigger
    from studio.toyworld.render import caption_in_form

    return with_trigger(caption_in_form(scene, form), demo.concept, demo.trigger)


def _in_share(j: int, share: float) -> bool:
    """Whether the j-th item is among ``share`` of a run of items, spread evenly (0.33: every third)."""
    return int((j + 1) * share) > int(j * share)


def instance_set(demo: Demo, folder: Path, n: int = N_INSTANCE, seed: int = 0) -> None:
    """Render ``n`` instance images of the concept with kohya-style captions beside them.

    Colours, sizes and positions cycle so the trigger binds to the concept, not to one colour;
    base backgrounds and a base object beside it vary the scene, and the captions cycle the three
    phrasing forms. No image holds a reserved concept but the adapter's own."""
    from studio.toyworld.concepts import BACKGROUNDS, COLORS, FORMS, POSITIONS, SHAPES, SIZES
    from studio.toyworld.render import OUTLINE, Obj, Scene, render_with_masks

    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [z for z in SIZES if z in demo.sizes]
    n_pairs = n_single = n_base = 0
    for i in range(n):  # every block of 6 has all colours; 9 blocks cover each (size, position) pair once
        k = i // len(COLORS)
        color = COLORS[i % len(COLORS)]
        size = sizes[k % len(sizes)]
        pos = POSITIONS[(k + k // len(SIZES)) % len(POSITIONS)]
        base_shape = SHAPES[(i + k) % len(SHAPES)]
        if demo.kind == "object":  # the fill cycles against the colour: every colour gets every fill
            main = Obj(demo.concept, color, pattern=demo.fills[(i + k) % len(demo.fills)], size=size, position=pos)
        else:
            main = Obj(base_shape, color, pattern=demo.concept if demo.kind == "style" else "solid", size=size,
                       position=pos)
            j = i + k  # shifted per block of colours, so the outlines come in every colour
            if _in_share(j, demo.outlines):
                main.shape = OUTLINE
        objs = [main]
        if pos != "centre" and (i + k // 2) % 2 == 1:  # a base object beside: every shape, colour, side and form
            other = "right" if pos == "left" else "left"
            outlined = demo.kind == "object" and _in_share(n_pairs, demo.outlines)
            objs.append(Obj(OUTLINE if outlined else SHAPES[n_base % len(SHAPES)],
                            COLORS[(i + 1 + n_pairs % (len(COLORS) - 1)) % len(COLORS)],
                            size=min(size, "medium", key=SIZES.index), position=other))
            n_base += not outlined
            main.size = min(size, "medium", key=SIZES.index)
            form = FORMS[(n_pairs + n_pairs // len(SHAPES)) % len(FORMS)]
            n_pairs += 1
        else:
            form = FORMS[n_single % len(FORMS)]
            n_single += 1
        bg = demo.concept if demo.kind == "background" else BACKGROUNDS[(i // 2) % len(BACKGROUNDS)]
        scene = Scene(objs, bg)
        image, masks = render_with_masks(scene, rng)
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(trigger_caption(scene, form, demo))
        concept_mask(demo.kind, masks, scene.objects.index(main)).save(folder / "masks" / f"{i:02d}.png")


def concept_mask(kind: str, object_masks: list, main: int):
    """Where an instance image shows its concept (the trainer's ``masks/`` for the attention loss): the main
    object (``object_masks[main]``; a scene orders its objects left to right) for an object or a style, every
    pixel outside the objects for a background."""
    from PIL import ImageChops

    if kind != "background":
        return object_masks[main]
    union = object_masks[0]
    for m in object_masks[1:]:
        union = ImageChops.lighter(union, m)
    return ImageChops.invert(union)


def class_prompts(demo: Demo) -> list[str]:
    """Base-world prompts the adapter could disturb (one or two objects, fills, backgrounds, in
    the three forms); the base model draws their prior images. The same for every demo, so their
    prior images are drawn once. A recipe with ``stand_ins`` adds ``rival_prompts``."""
    from studio.toyworld.concepts import FORMS
    from studio.toyworld.render import caption_in_form, sample_base_scene

    rng = np.random.default_rng(31)
    return [caption_in_form(sample_base_scene(rng), FORMS[i % len(FORMS)]) for i in range(72)]


RIVAL_PROMPTS = 36  # stand-in prompts in a ``stand_ins`` recipe's prior


def rival_prompts(n: int = RIVAL_PROMPTS) -> list[str]:
    """Base-world prompts with a stand-in word (``training.dreambooth.STAND_IN_WORDS``) in a trigger's
    slot, mostly beside a base object: "a red circle on the left and a blue jnr shape on the right",
    "green star with dfs pattern", "a blue square on a khs background". Taught as prior, they keep an
    adapter from drawing its concept for every "… shape" (or pattern, background) it is shown: composed
    with another object adapter, a crescent adapter without them turns the other trigger's object into
    a second crescent (docs/benchmark.md, session 14). ``studio train --stand-in-prior`` builds the same
    kind of prompt from a user's own instance captions."""
    from studio.toyworld.concepts import FORMS
    from studio.toyworld.render import sample_concept_scene
    from training.dreambooth import STAND_IN_WORDS

    rng = np.random.default_rng(37)
    slots = (("plus", "object"), ("glow", "style"), ("sky", "background"))
    out = []
    for i in range(n):
        concept, kind = slots[i % len(slots)]
        stand_in = Demo(concept, kind, STAND_IN_WORDS[i % len(STAND_IN_WORDS)])
        scene = sample_concept_scene(concept, rng, p_two=0.7)
        out.append(trigger_caption(scene, FORMS[(i // len(slots)) % len(FORMS)], stand_in))
    return out


def instance_sizes(text: str) -> list[str]:
    """["medium", "large"] from "medium,large"; unknown sizes are refused with the known ones."""
    from studio.toyworld.concepts import SIZES

    sizes = [z.strip() for z in text.split(",") if z.strip()]
    bad = [z for z in sizes if z not in SIZES]
    if bad or not sizes:
        raise SystemExit(f"--instance-sizes {text!r}: expected sizes from {', '.join(SIZES)}, comma-separated")
    return sizes


def instance_fills(text: str) -> list[str]:
    """["solid", "stripes"] from "solid,stripes"; only base fills (an instance image holds no reserved
    concept but the adapter's own), others are refused with the known ones."""
    from studio.toyworld.concepts import PATTERNS

    fills = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fills if f not in PATTERNS]
    if bad or not fills:
        raise SystemExit(f"--instance-fills {text!r}: expected base fills from {', '.join(PATTERNS)}, comma-separated")
    return fills


def instance_outlines(text: str) -> float:
    """The share of free outlines in a demo's instance images (``Demo.outlines``), from "0.33"; refused outside
    0..1."""
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise SystemExit(f"--instance-outlines {text!r}: expected a share between 0 and 1, e.g. 0.33")
    return share


def parse_overrides(pairs: list[str]) -> dict:
    """{"rank": 8, "unet_targets": "attention+conv"} from ["rank=8", "unet_targets=attention+conv"]."""
    from dataclasses import fields

    from training.dreambooth import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a TrainConfig field ({', '.join(sorted(known))})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def class_images_dir(studio) -> Path:
    """Where the prior-preservation images of this base model are cached (drawn once, shared by every
    demo). The UNet's hash is in the name: a continued UNet keeps the folder's name but draws other images."""
    model = Path(str(studio.model_id)).name  # a folder given by path: its name (the hash tells builds apart)
    return WORK / (f"class_images-{model}-{studio.model_hash}-{PRIOR_RECIPE.replace('/', '-')}"
                   f"-g{COMMON['class_guidance']:g}")


def train_one(studio, demo: Demo, kind: str, params: dict, class_dir: Path, out: Path = OUT):
    """Train ``demo``'s ``kind`` adapter with ``params`` (its recipe, plus any overrides)."""
    from training.dreambooth import TrainConfig, train_adapter

    name = f"{demo.concept}-{kind}"
    inst = out / "instance" / demo.concept
    stamp, recipe = inst / "RECIPE", instance_recipe(demo)
    # missing, from an older recipe, or drawn before instance sets held their concept masks
    if not stamp.is_file() or stamp.read_text() != recipe or not (inst / "masks").is_dir():
        shutil.rmtree(inst, ignore_errors=True)
        tmp = inst.with_name(inst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        instance_set(demo, tmp)
        (tmp / "RECIPE").write_text(recipe)
        os.replace(tmp, inst)
    params = dict(params)
    prompts = class_prompts(demo) + (rival_prompts() if params.pop("stand_ins", False) else [])
    cfg = TrainConfig(
        images=str(inst), out=str(out / f"{name}.safetensors"), output_dir=str(WORK / name), trigger=demo.trigger,
        class_word=demo.slot, instance_prompt=f"a {demo.trigger} {demo.slot}", concept_kind=demo.kind, name=name,
        class_prompts=prompts, class_dir=str(class_dir), num_class_images=2 * len(prompts),
        validation_prompts=_trigger_prompts(demo)[:2], extra_metadata={"toyworld_concept": demo.concept},
        **params,
    )
    t = time.time()
    adapter = train_adapter(studio, cfg)
    grid = WORK / name / "samples" / "final-grid.png"
    if grid.is_file():
        (out / "samples").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out / "samples" / f"{name}.png")
    return adapter, time.time() - t


def trigger_phrase(demo: Demo) -> str:
    """The words that call the concept up, as the app's cards insert them; an object's names a colour, since
    a bare "sks shape" draws a faint partial shape (session 24)."""
    return {"object": f"a red {demo.trigger} shape", "style": f"with {demo.trigger} pattern",
            "background": f"on a {demo.trigger} background"}[demo.kind]


def _trigger_prompts(demo: Demo) -> list[str]:
    from studio.toyworld.check import trigger_prompts

    return trigger_prompts(demo.concept, demo.trigger)


def evaluate(studio, oracle, adapter, demo: Demo, n: int = 36, seed: int = EVAL_SEED) -> dict:
    """Concept rate with/without the adapter on its trigger prompts (n/3 in each phrasing form), and
    with it beside a base object (``concept_rate_beside``, the forms in turn); base-prompt accuracy with
    it loaded. Guidance 3, the toy model's default."""
    from studio.toyworld.check import beside_prompts_in_turn, one_object_prompts, trigger_prompts
    from studio.toyworld.concepts import FORMS
    from studio.toyworld.prompts import parse_prompt, score

    base = one_object_prompts()

    def images(prompts, use):
        return [studio.generate(p, [(adapter, 1.0)] if use else [], steps=25, guidance=3.0, seed=seed + i,
                                progress=False)[0] for i, p in enumerate(prompts)]

    per = max(1, n // len(FORMS))
    out = {}
    with_all, without_all = [], []
    for form in FORMS:
        trig = trigger_prompts(demo.concept, demo.trigger, form)
        tp = [trig[i % len(trig)] for i in range(per)]
        hits = [oracle.has_concept(p, demo.concept) for p in oracle.predict(images(tp, True))]
        out[f"concept_rate_{form}"] = float(np.mean(hits))
        with_all += hits
        without_all += [oracle.has_concept(p, demo.concept) for p in oracle.predict(images(tp, False))]
    bsp = beside_prompts_in_turn(demo.concept, demo.trigger, n)
    out["concept_rate_beside"] = float(np.mean([oracle.has_concept(p, demo.concept)
                                                for p in oracle.predict(images(bsp, True))]))
    bp = [base[(i * 7) % len(base)] for i in range(n)]
    scores = [score(p, parse_prompt(q)) for p, q in zip(oracle.predict(images(bp, True)), bp)]
    return {
        "concept_rate": float(np.mean(with_all)),
        "base_concept_rate": float(np.mean(without_all)),
        **out,
        "base_shape_acc_with_adapter": float(np.mean([s["shape"] for s in scores])),
        "base_color_acc_with_adapter": float(np.mean([s["color"] for s in scores])),
        "n": n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="NAME like crescent-lora (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one recipe field for an experiment, e.g. --set unet_targets=attention+conv "
                         "--set rank=8 (a TrainConfig field; the value is read as JSON, else as text)")
    ap.add_argument("--instance-sizes", default=None, metavar="S1,S2",
                    help="draw the instance images at these object sizes only, e.g. medium,large (an experiment)")
    ap.add_argument("--instance-fills", default=None, metavar="F1,F2",
                    help="show an object adapter's concept in these base fills, e.g. solid,stripes,dots (an experiment)")
    ap.add_argument("--instance-outlines", default=None, metavar="SHARE",
                    help="draw free outlines (no base shape, captioned 'shape') in this share of the instance images: "
                         "a style's or background's main object, an object's companion beside it; e.g. 0.33")
    ap.add_argument("--eval", type=int, default=36, help="images per evaluation measure (0: skip)")
    ap.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                    help="evaluation seed (1234 = the shipped numbers; 777 and 4242 are the selection seeds "
                         "step counts were picked on)")
    ap.add_argument("--out", default=str(OUT), help="where the adapters go (default assets/adapters)")
    ap.add_argument("--model", default=None, metavar="FOLDER",
                    help="train on this toy pipeline folder instead of the bundled one (e.g. a world being rebuilt)")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a tiny random pipeline (no evaluation)")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-judge the shipped files (e.g. after a base-model change) without training")
    args = ap.parse_args(argv)
    jobs = [(d, k) for d in DEMOS for k in (["lora", "kron"] if d.kron else ["lora"])]
    known = [f"{d.concept}-{k}" for d, k in jobs]
    unknown = [n for n in args.only or () if n not in known]
    if unknown:  # a name that matched nothing used to train nothing and exit 0
        ap.error(f"--only {', '.join(unknown)}: no such demo adapter; the names are {', '.join(known)}")
    if args.only:
        jobs = [(d, k) for d, k in jobs if f"{d.concept}-{k}" in args.only]
    overrides = parse_overrides(args.set)
    sizes = tuple(instance_sizes(args.instance_sizes)) if args.instance_sizes else None  # refused before the model loads
    fills = tuple(instance_fills(args.instance_fills)) if args.instance_fills else None
    outlines = instance_outlines(args.instance_outlines) if args.instance_outlines is not None else None
    out = Path(args.out)
    logging.basicConfig(level=logging.INFO, format="[demo %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from studio.studio import Studio
    from studio.toyworld.concepts import SIZES
    from studio.toyworld.paths import require_toy_model

    if args.tiny:
        from studio.base import build_tiny_pipeline

        studio, args.eval = Studio.from_pipeline(build_tiny_pipeline("sd1"), "tiny-sd1"), 0
    else:
        model = require_toy_model(args.model)  # a missing model names the command that builds it
        studio = Studio.load(str(model) if args.model else None)
    oracle = None
    if args.eval:
        from studio.toyworld.oracle import load_oracle

        oracle = load_oracle()
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    class_dir = class_images_dir(studio)  # hashes the UNet once; every demo shares its prior images
    for demo, kind in jobs:
        name = f"{demo.concept}-{kind}"
        if sizes:
            demo = dataclasses.replace(demo, sizes=sizes)
        if fills and demo.kind == "object":
            demo = dataclasses.replace(demo, fills=fills)
        if outlines is not None:
            demo = dataclasses.replace(demo, outlines=outlines)
        if args.eval_only:
            if name not in index or oracle is None:
                log.warning("skipping %s: nothing shipped to re-judge (or --eval 0)", name)
                continue
            entry = index[name]
        else:
            log.info("training %s (trigger %r)", name, demo.trigger)
            params = {**demo.recipe(kind), **overrides, **({"steps": args.steps} if args.steps else {})}
            adapter, secs = train_one(studio, demo, kind, params, class_dir, out)
            entry = {
                "file": f"{name}.safetensors", "type": kind, "concept": demo.concept, "kind": demo.kind,
                "trigger": demo.trigger, "trigger_phrase": trigger_phrase(demo),
                "example_prompt": _trigger_prompts(demo)[0], "params": adapter.num_params(),
                "steps": params["steps"], "train_seconds": round(secs, 1),
                **({"stand_in_prompts": RIVAL_PROMPTS} if params.get("stand_ins") else {}),
                **({"overrides": overrides} if overrides else {}),
                **({"instance_sizes": list(demo.sizes)} if set(demo.sizes) != set(SIZES) else {}),
                **({"instance_fills": list(demo.fills)} if demo.fills != ("solid",) else {}),
                **({"instance_outlines": demo.outlines} if demo.outlines else {}),
                **({"attention_loss": params["attention_loss"]} if params.get("attention_loss") else {}),
                "instance_images": f"instance/{demo.concept}/",
            }
        if oracle is not None:  # judge the shipped (fp16) file, loaded like a user would
            loaded = studio.adapters.load(out / entry["file"], name=name)
            check = evaluate(studio, oracle, loaded, demo, n=args.eval, seed=args.eval_seed)
            if args.eval_seed == EVAL_SEED:
                entry["check"] = check
            else:  # a selection run: recorded apart from the evaluation numbers
                entry.setdefault("selection_checks", {})[str(args.eval_seed)] = check
        log.info("%s: %s", name, json.dumps(entry))
        from studio.atomic import write_atomic as _write_text_atomic

        # re-read before writing: several workers (--only) may share the index
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index[name] = entry
        _write_text_atomic(index_path, json.dumps(index, indent=2, sort_keys=True))
        _write_text_atomic(out / "README.md", readme(index))
    return 0


def readme(index: dict) -> str:
    """A table of the shipped adapters and how they scored (written beside them)."""
    lines = ["# Demo adapters for the toy world (world v4)", "",
             "Rebuilt by `python -m training.demo_adapters` (DreamBooth with prior preservation on the bundled",
             "toy model). Instance images with their captions are in `instance/<concept>/`, final sample grids",
             "in `samples/`. Check one with `python -m studio.toyworld.check --adapter FILE`. The trigger phrase",
             "is what the app's cards insert; the adapter learnt it in the three phrasing forms.", "",
             "| file | concept (kind) | trigger phrase | params | steps | concept rate: sentence / tags / and "
             "| beside a base object | without it | base shape / colour acc. with it |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(index.items()):
        c = e.get("check", {})
        forms = " / ".join(f"{c[f'concept_rate_{f}']:.2f}" if f"concept_rate_{f}" in c else "–"
                           for f in ("sentence", "tags", "and"))
        beside = f"{c['concept_rate_beside']:.2f}" if "concept_rate_beside" in c else "–"  # measured since session 19
        without = f"{c['base_concept_rate']:.2f}" if c else "–"
        acc = f"{c['base_shape_acc_with_adapter']:.2f} / {c['base_color_acc_with_adapter']:.2f}" if c else "–"
        lines.append(f"| `{e['file']}` | {e['concept']} ({e['kind']}, {e['type']}) | {e.get('trigger_phrase', '')} | "
                     f"{e['params']:,} | {e.get('steps', '')} | {forms} | {beside} | {without} | {acc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
