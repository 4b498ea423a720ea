"""The CFG scale a run gets when none is given (a light module: the CLI's help reads it)."""
from __future__ import annotations

REAL_MODEL_GUIDANCE = 7.5
# The toy model's scale per composition method, picked on selection seeds and wordings (base_seed 777, a
# green crescent "on sand"; never the benchmark's) as the best all-present rate over the three object pairs
# among 3 / 5 / 7.5 / 10, the shipped scale kept on a tie (docs/benchmark.md, "Session 22"; before: session 17
# on the benchmark's wordings; session 23 re-ran the glow's cells with its new adapter: switch 3 -> 7.5; session 24
# the sky's with its new adapter: composite 5 -> 10).
# Composite, CMLoRA and CLoRA average one prediction per adapter, so each concept is guided at about CFG / n
# and they need more than merge's 3; 3 is also the single-adapter scale (colours drift above it, README
# "The toy world").
TOY_GUIDANCE = {"merge": 3.0, "switch": 7.5, "composite": 10.0, "cmlora": 5.0, "clora": 7.5, "lego": 5.0}


def default_cfg(arch: str, method: str = "merge") -> float:
    """7.5 on real models; on the toy model ``TOY_GUIDANCE[method]`` (merge's for a method not in it)."""
    return TOY_GUIDANCE.get(method, TOY_GUIDANCE["merge"]) if arch == "toy" else REAL_MODEL_GUIDANCE


def toy_guidance_text() -> str:
    """"merge 3, switch 3, …" for help texts."""
    return ", ".join(f"{m} {g:g}" for m, g in TOY_GUIDANCE.items())
