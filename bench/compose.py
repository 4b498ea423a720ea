"""Benchmark the composition methods: wall time as a ratio to single-adapter generation.

For each model and N adapters (random rank-8 LoRAs on every attention projection), times one
generation per method (best of ``--repeats``) and divides by the time of plain generation with one
adapter measured in the same run. Also reports the shallow/full UNet cost ratio ρ of CMLoRA's
feature cache and the adapter-switching overhead (one ``rig.set`` on and off per branch, as
Composite and CMLoRA do) as a % of a Composite step. The baseline is timed again at the end to show
drift; ``--clock cpu`` times this process's CPU time instead of wall time (steadier on a shared CPU
with one thread), ``--methods`` picks the rows. ``cmlora-nocache`` (``cache=off``, the spec's
reference row: the released code never reuses features, C1) and ``cmlora-reference``
(``reference_compat``: the released computation, cache off) cost what ``composite`` costs.

Models: ``tiny`` (tiny random SD1 at 64×64), ``toy`` (the bundled toy model, skipped when not
built), ``sd15`` (SD1.5's real UNet config with random weights at 256×256; a 1-layer 768-wide
text encoder and the tiny VAE, which barely matter for the timing).

    OMP_NUM_THREADS=2 .venv/bin/python bench/compose.py --models tiny,sd15 --n 2,3,4 --steps 10
    OMP_NUM_THREADS=1 .venv/bin/python bench/compose.py --models sd15 --steps 10 --repeats 1 \
        --methods merge,composite,cmlora --clock cpu    # ~20 min on one CPU core
    .venv/bin/python bench/compose.py --models tiny --n 2 --steps 4 --repeats 1   # smoke run

``--markdown PATH`` writes the table (atomically) for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.adapters.activation import AdapterRig  # noqa: E402
from studio.adapters.adapter import Adapter, LoraDelta  # noqa: E402
from studio.atomic import write_atomic  # noqa: E402
from studio.base import TOY_MODEL_DIR, build_tiny_pipeline, pick_device  # noqa: E402
from studio.studio import Studio  # noqa: E402
from studio.unet_cache import full_pass, shallow_pass  # noqa: E402

# SD1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), sample size for 256 px.
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=32,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KINDS = ("character", "style", "object", "background")
METHODS = {"merge": ("merge", {}), "composite": ("composite", {}), "cmlora": ("cmlora", {}),
           "cmlora-nocache": ("cmlora", {"cache": "off"}), "cmlora-reference": ("cmlora", {"reference_compat": True}),
           "cmlora-seq": ("cmlora", {"batch": "off"})}


def build_sd15_random(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5's UNet architecture and random weights (no download)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.base import _tiny_vae  # the 8× tiny VAE: decode cost is not what we measure
    from studio.clip_tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=te, tokenizer=build_clip_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def random_adapters(pipe, n: int, rank: int = 8) -> list[Adapter]:
    """n random LoRAs on every UNet attention projection, with kinds cycling character/style/object/background."""
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        layers = {}
        for name, m in pipe.unet.named_modules():
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                o, i = m.weight.shape
                layers[f"unet.{name}"] = LoraDelta(torch.randn(rank, i, generator=g) / math.sqrt(i),
                                                   torch.randn(o, rank, generator=g) * 0.05)
        out.append(Adapter(f"lora{k}", layers, concept_kind=KINDS[k % len(KINDS)]))
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_run(studio, adapters, method, params, size, steps, repeats, clock=time.perf_counter) -> tuple[float, dict]:
    best, report = float("inf"), {}
    for _ in range(repeats):
        sync(studio.device)
        t0 = clock()
        res = studio.run("a photo", adapters, method=method, method_params=params, steps=steps,
                         width=size, height=size, seed=0, progress=False)
        sync(studio.device)
        best = min(best, clock() - t0)
        report = res.report
    return best, report


def unet_costs(studio, adapters, size, repeats: int = 3, clock=time.perf_counter) -> dict:
    """Seconds of one full and one shallow pass, and of a rig.set on/off pair (switching)."""
    pipe, unet = studio.pipe, studio.pipe.unet
    lat = size // pipe.vae_scale_factor
    x = torch.randn(2, unet.config.in_channels, lat, lat, device=studio.device, dtype=studio.dtype)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, device=studio.device, dtype=studio.dtype)
    t = torch.tensor(500, device=studio.device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync(studio.device)
            t0 = clock()
            fn()
            sync(studio.device)
            times.append(clock() - t0)
        return min(times)

    with AdapterRig(pipe, adapters[:1]) as rig, torch.no_grad():
        rig.set(unet={adapters[0].name: 1.0})
        _, feat = full_pass(unet, x, t, ehs)
        full = best(lambda: full_pass(unet, x, t, ehs))
        shallow = best(lambda: shallow_pass(unet, x, t, ehs, feat))
        k = 2000
        t0 = clock()
        for _ in range(k):
            rig.set(unet={adapters[0].name: 1.0})
            rig.set(unet={})
        switch = (clock() - t0) / k
    with torch.no_grad():
        bare = best(lambda: unet(x, t, encoder_hidden_states=ehs, return_dict=False))
    return {"full_s": full, "shallow_s": shallow, "rho": shallow / full, "switch_s": switch, "bare_unet_s": bare}


def bench_model(name: str, ns: list[int], steps: int, repeats: int, device,
                methods: list[str] = tuple(METHODS), clock: str = "wall") -> dict | None:
    """Time every method for every N against single-adapter generation; ``clock`` is "wall" or
    "cpu" (this process's CPU time: on a shared CPU it does not count time lost to other jobs)."""
    tick = CLOCKS[clock]
    if name == "tiny":
        studio, size = Studio.from_pipeline(build_tiny_pipeline("sd1").to(device), "tiny-sd1"), 64
    elif name == "toy":
        if not TOY_MODEL_DIR.is_dir():
            print(f"[toy] skipped: {TOY_MODEL_DIR} is not built (python -m training.toyworld)", file=sys.stderr)
            return None
        studio = Studio.load(device=device)
        size = studio.default_size
    elif name == "sd15":
        studio, size = Studio.from_pipeline(build_sd15_random().to(device), "sd15-random"), 256
    else:
        raise SystemExit(f"unknown model {name!r}; choose tiny, toy or sd15")
    adapters = random_adapters(studio.pipe, max(ns))
    base_t, _ = timed_run(studio, adapters[:1], "merge", {}, size, steps, repeats + 1, tick)  # +1: warm-up
    costs = unet_costs(studio, adapters, size, clock=tick)
    print(f"[{name}] single adapter {base_t:.3f}s; full pass {costs['full_s']:.3f}s, shallow {costs['shallow_s']:.3f}s "
          f"(rho {costs['rho']:.2f})", file=sys.stderr)
    rows = []
    for n in ns:
        for method, params in (METHODS[m] for m in methods):
            secs, rep = timed_run(studio, adapters[:n], method, params, size, steps, repeats, tick)
            label = method + "".join(f"({k}={v})" for k, v in params.items())
            rows.append({"n": n, "method": label, "seconds": secs, "ratio": secs / base_t,
                         "unet_calls": rep["unet_calls"], "shallow_calls": rep["shallow_calls"]})
            print(f"[{name}] N={n} {label:18s} {secs:8.3f}s  ×{secs / base_t:5.2f}  "
                  f"full={rep['unet_calls']} shallow={rep['shallow_calls']}", file=sys.stderr)
    # the baseline once more at the end: how far the machine drifted during the run
    base_end, _ = timed_run(studio, adapters[:1], "merge", {}, size, steps, 1, tick)
    print(f"[{name}] single adapter at the end {base_end:.3f}s (start {base_t:.3f}s)", file=sys.stderr)
    # switching overhead relative to one Composite step with the largest N: N on/off pairs per step
    n_max = max(ns)
    comp = [r["seconds"] for r in rows if r["n"] == n_max and r["method"] in ("composite", "cmlora(cache=off)", "cmlora(reference_compat=True)")]
    comp_step = (comp[0] if comp else n_max * base_t) / steps  # without composite: N single-adapter steps
    return {
        "model": name, "size": size, "steps": steps, "device": str(device), "threads": torch.get_num_threads(),
        "clock": clock, "single_adapter_seconds": base_t, "single_adapter_seconds_end": base_end, "rows": rows, **costs,
        "switch_overhead_pct": 100 * n_max * costs["switch_s"] / comp_step,
        "hook_overhead_pct": 100 * (costs["full_s"] / costs["bare_unet_s"] - 1),
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [
            f"### {r['model']} ({r['size']}×{r['size']}, {r['steps']} DDIM steps, {r['device']}, {r['threads']} threads, "
            f"{r.get('clock', 'wall')} clock)",
            "",
            f"Single-adapter generation: {r['single_adapter_seconds']:.3f} s "
            f"({r.get('single_adapter_seconds_end', float('nan')):.3f} s again at the end of the run). Shallow/full UNet cost ρ = {r['rho']:.2f}; "
            f"adapter switching = {r['switch_overhead_pct']:.2f}% of a Composite step (N = {max(x['n'] for x in r['rows'])}); "
            f"idle-hook + one active LoRA cost on a UNet call = {r['hook_overhead_pct']:+.1f}%.",
            "",
            "| N | method | seconds | × single | full UNet calls | shallow calls |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {x['n']} | {x['method']} | {x['seconds']:.3f} | {x['ratio']:.2f} | {x['unet_calls']} | {x['shallow_calls']} |"
                  for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,toy,sd15", help="comma list of tiny, toy, sd15")
    ap.add_argument("--n", default="2,3,4", help="numbers of adapters")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)} (cmlora-nocache costs what composite costs)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared CPU; single-threaded runs)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables to this file")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else pick_device()[0]
    ns = [int(v) for v in args.n.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    if bad := [m for m in methods if m not in METHODS]:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    results = [r for m in args.models.split(",")
               if (r := bench_model(m.strip(), ns, args.steps, args.repeats, device, methods, args.clock))]
    text = markdown(results)
    print(text)
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
