"""Batched images: throughput of one request of k images against k one-image requests.

For each method (merge, composite at N adapters, ...) times ``Studio.run(num_images=k)`` drawn as
one batch (``batch_size=k``) and one by one (``batch_size=1``), side by side in one process, best
of ``--repeats``, and prints serial/batched (the throughput gain). ``--sizes`` also sweeps the batch
size for the CPU default (``studio.studio.CPU_BATCH_SIZE``). Models as in bench/compose.py: ``tiny``
(random SD1 at 64×64), ``toy`` (skipped when not built).

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch.py --models tiny --images 8 --methods merge,composite
    OMP_NUM_THREADS=1 .venv/bin/python bench/batch.py --models tiny --sizes 1,2,4,8,16 --images 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compose import random_adapters  # noqa: E402
from studio.base import TOY_MODEL_DIR, build_tiny_pipeline  # noqa: E402
from studio.studio import Studio  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
METHODS = {"merge": ("merge", {}), "composite": ("composite", {}), "cmlora": ("cmlora", {}),
           "clora-fast": ("clora", {"preset": "fast"}), "switch": ("switch", {})}


def load(model: str) -> Studio | None:
    if model == "toy":
        return Studio.load(device="cpu") if TOY_MODEL_DIR.is_dir() else None
    return Studio.from_pipeline(build_tiny_pipeline("sd1"), "tiny-sd1")


def timed(clock, fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--methods", default="merge,composite")
    ap.add_argument("--n", type=int, default=2, help="adapters composed")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="", help="batch sizes to sweep with merge (e.g. 1,2,4,8,16)")
    ap.add_argument("--clock", choices=CLOCKS, default="cpu")
    args = ap.parse_args(argv)
    clock = CLOCKS[args.clock]
    print(f"threads {torch.get_num_threads()}, clock {args.clock}, {args.images} images, {args.steps} steps")
    for model in args.models.split(","):
        studio = load(model)
        if studio is None:
            print(f"{model}: not built, skipped")
            continue
        names = random_adapters(studio.pipe, args.n)
        prompt = "a red circle"
        for label in args.methods.split(","):
            method, params = METHODS[label]
            ads = names[:1] if method == "merge" and args.n == 1 else names

            def run(bs, method=method, params=params, ads=ads):
                studio.run(prompt, ads, method=method, method_params=params, steps=args.steps, seed=1,
                           num_images=args.images, batch_size=bs, progress=False)

            run(args.images)  # warm-up
            serial = timed(clock, lambda: run(1), args.repeats)
            batched = timed(clock, lambda: run(args.images), args.repeats)
            print(f"{model:5} {label:12} N={args.n}: serial {serial:7.2f}s  batched {batched:7.2f}s  "
                  f"throughput x{serial / batched:.2f}")
        for bs in [int(s) for s in args.sizes.split(",") if s]:
            t = timed(clock, lambda: studio.run(prompt, names, steps=args.steps, seed=1, num_images=args.images,
                                                batch_size=bs, progress=False), args.repeats)
            print(f"{model:5} merge batch_size {bs:3}: {t:7.2f}s  ({args.images / t:.2f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
