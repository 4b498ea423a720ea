"""Where CLoRA's time goes: wall time per phase of one generation, in units of plain generation.

Phases: graph-free passes (full: noise prediction + maps; truncated: maps only), graph passes
(forward with autograd, up to the last captured layer, or on to the end with the tail graph-free
when the pass also serves the step's noise prediction) and their backward (``autograd.grad``
calls), and the rest (loss, masks, fusion, scheduler, VAE, text encoders). Plain generation (one
UNet call per step) is timed in the same run.

    OMP_NUM_THREADS=1 python bench/clora_phases.py --models sd15 --n 2 --steps 4
    OMP_NUM_THREADS=1 python bench/clora_phases.py --models toy --n 2 --steps 25
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from clora import prompt_for, setup  # noqa: E402

import composers.clora as clora  # noqa: E402
from studio.base import pick_device  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


@contextmanager
def timed(key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMES[key] += time.perf_counter() - t0
        CALLS[key] += 1


def instrument() -> None:
    """Wrap the composer's UNet-pass methods and autograd.grad with timers (no change to the maths)."""
    C = clora.CLoRAComposer
    orig_all, orig_grad = C._all, torch.autograd.grad

    def _all(self, x_in, t, truncate):
        kind = "graph-free truncated" if truncate else "graph-free full"
        if torch.is_grad_enabled():
            kind = "graph fwd (joint)"
        with timed(kind):
            return orig_all(self, x_in, t, truncate)

    state = {"in_grad": False}

    def grad(*a, **k):
        if state["in_grad"]:
            return orig_grad(*a, **k)
        state["in_grad"] = True
        try:
            with timed("backward"):
                return orig_grad(*a, **k)
        finally:
            state["in_grad"] = False

    C._all = _all
    torch.autograd.grad = grad
    orig_vjp = C._vjp

    def _vjp(self, *a, **k):
        with timed("graph pass + backward (vjp)"):
            return orig_vjp(self, *a, **k)

    C._vjp = _vjp


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sd15")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--params", default="", help="extra clora parameters, key=value,...")
    args = ap.parse_args(argv)
    device, dtype = pick_device()
    params = dict(kv.split("=", 1) for kv in args.params.split(",") if kv)
    instrument()
    for name in args.models.split(","):
        ready = setup(name, args.n, device, dtype)
        if ready is None:
            continue
        studio, size, adapters = ready
        prompt = prompt_for(args.n)
        kw = dict(steps=args.steps, width=size, height=size, seed=0, progress=False)
        studio.run(prompt, [], method="merge", **kw)  # warm-up
        t0 = time.perf_counter()
        studio.run(prompt, [], method="merge", **kw)
        plain = time.perf_counter() - t0
        TIMES.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        res = studio.run(prompt, adapters, method="clora", method_params=params, **kw)
        total = time.perf_counter() - t0
        rep = res.report
        print(f"[{name}] {size}px T={args.steps} N={args.n} params={params or 'default'}: plain {plain:.2f}s, "
              f"clora {total:.2f}s = {total / plain:.2f}x plain; full={rep['full_forwards']} "
              f"truncated={rep['truncated_forwards']} backward={rep['backward_passes']} updates={rep['latent_updates']}")
        vjp = TIMES.pop("graph pass + backward (vjp)", None)
        inner = TIMES.get("backward", 0.0)
        if vjp is not None:
            TIMES["graph fwd (branchwise)"] = vjp - inner
            CALLS["graph fwd (branchwise)"] = CALLS.pop("graph pass + backward (vjp)")
        TIMES["rest"] = total - sum(TIMES.values())
        for key, secs in sorted(TIMES.items(), key=lambda kv: -kv[1]):
            print(f"  {key:26s} {secs:8.2f}s  {secs / plain:6.2f}x plain  {100 * secs / total:5.1f}%  calls {CALLS.get(key, '-')}")


if __name__ == "__main__":
    main()
