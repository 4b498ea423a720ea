"""Benchmark CLoRA: wall time and peak memory against Composite and plain generation.

For each model and N adapters (random rank-8 LoRAs; N = number of adapters, so CLoRA runs N + 1
branches), times one generation per method (best of ``--repeats``, after a warm-up) and measures
peak memory above the idle baseline (the lowest over repeats: one-time allocations such as the
autograd engine's first backward are not the method's): ``torch.cuda.max_memory_allocated`` on
CUDA, the sampled in-use heap on CPU (glibc ``mallinfo2``; sampled RSS, which also counts the
allocator's cache, is printed beside it). Ratios are against plain generation (no adapter) and
Composite with the same N, measured in the same run; the median time over repeats and its ratio
(``x_plain_median``, against plain's median) are printed beside the best, which is steadier on an
idle machine, the median on a contended one. Targets from issue 6: CLoRA
≤ 6× plain time at N = 2, peak memory ≤ 1.5× Composite; the published schedule (the default since
issue 18) exceeds the time bound, ``clora-fast`` is the cheaper named option (docs/performance.md).

Methods: ``plain``, ``composite``, ``clora`` (default ``spec`` preset, the published schedule: one
update per step on the first T/2 steps plus 20·T/50 inner iterations at the steps matching
{0, 10, 20} of 50; auto settings by latent size), ``clora-fast`` (the ``fast`` preset, a named
deviation: no inner iterations), ``clora-seq`` (branches one call each),
``clora-joint`` (all branch graphs kept at once: the memory the branchwise VJPs avoid; the default
below 32×32 latents), ``clora-branchwise`` (one branch graph at a time: the default from 32×32),
``clora-lowmem`` (the large-latent memory settings forced on: ``grad_checkpoint=fine``,
``split_rows=on``), ``clora-nockpt`` / ``clora-ckptall`` / ``clora-nosplit`` / ``clora-cond`` (one
setting changed) and ``clora-noupd`` (latent update off: the masked-fusion cost alone).

Models: ``tiny`` (tiny random SD1, 64×64), ``toy`` (the bundled toy model; skipped when absent),
``sd15`` (SD1.5's UNet architecture with random weights; 512×512 on CUDA, 256×256 on CPU).

    .venv/bin/python bench/clora.py --models tiny,toy,sd15 --n 2,3 --steps 50      # full (GPU)
    OMP_NUM_THREADS=1 .venv/bin/python bench/clora.py --models tiny --n 2 --steps 4 --repeats 1  # smoke

``--json PATH`` writes the results (atomically).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compose import build_sd15_random, random_adapters, sync, write_atomic  # noqa: E402
from studio.base import TOY_MODEL_DIR, build_tiny_pipeline, pick_device  # noqa: E402
from studio.studio import Studio  # noqa: E402

TRIGGERS = ("sks", "zwx", "pqk", "vtm")
CONCEPTS = ("cat", "dog", "bird", "car")
METHODS = {
    "plain": ("merge", {}),
    "composite": ("composite", {}),
    "clora": ("clora", {}),
    "clora-fast": ("clora", {"preset": "fast"}),
    "clora-seq": ("clora", {"batch_branches": False}),
    "clora-nockpt": ("clora", {"grad_checkpoint": "off"}),
    "clora-ckptall": ("clora", {"grad_checkpoint": "all"}),
    "clora-nosplit": ("clora", {"split_rows": False}),
    "clora-cond": ("clora", {"attention_source": "cond"}),
    "clora-joint": ("clora", {"backprop": "joint"}),
    "clora-branchwise": ("clora", {"backprop": "branchwise"}),
    "clora-lowmem": ("clora", {"grad_checkpoint": "fine", "split_rows": True}),  # the large-latent defaults, forced
    "clora-noupd": ("clora", {"latent_update": False}),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None


LIBC = _libc()


def heap_in_use() -> int | None:
    """Bytes the process has malloc'ed and not freed (glibc ``mallinfo2``: arenas + mmapped chunks).

    The CPU analogue of ``torch.cuda.memory_allocated``: unlike RSS it excludes memory the allocator
    keeps cached after a free, which made RSS peaks of the same run differ by up to 25 %.
    """
    if LIBC is None:
        return None
    m = LIBC.mallinfo2()
    return m.uordblks + m.hblkhd


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the RSS baseline holds no cached free memory."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


class PeakMemory:
    """Peak bytes above the level at entry: CUDA allocator stats, or on CPU the sampled (2 ms)
    in-use heap (``heap_in_use``); ``rss_peak`` is the sampled RSS, kept for comparison."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.rss_peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            trim_heap()
            self.heap = heap_in_use() is not None
            self.base, self.rss_base = heap_in_use() or 0, rss_bytes()
            self.top, self.rss_top, self.stop = self.base, self.rss_base, False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self._read()
            time.sleep(0.002)

    def _read(self):
        self.top = max(self.top, heap_in_use() or 0)
        self.rss_top = max(self.rss_top, rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = self.rss_peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self._read()
            self.rss_peak = self.rss_top - self.rss_base
            self.peak = self.top - self.base if self.heap else self.rss_peak


def prompt_for(n: int) -> str:
    parts = [f"a {t} {c}" for t, c in zip(TRIGGERS[:n], CONCEPTS[:n])]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if n > 1 else parts[0]


def measure(studio, adapters, method: str, params: dict, prompt: str, size: int, steps: int, repeats: int):
    """(best seconds, peak bytes, RSS peak bytes, report, median seconds) over ``repeats`` runs."""
    peak, rss, report, times = float("inf"), float("inf"), {}, []
    for _ in range(repeats):
        sync(studio.device)
        with PeakMemory(studio.device) as mem:
            t0 = time.perf_counter()
            res = studio.run(prompt, adapters, method=method, method_params=params, steps=steps,
                             width=size, height=size, seed=0, progress=False)
            sync(studio.device)
            secs = time.perf_counter() - t0
        # steady state: no first-use allocations
        peak, rss, report = min(peak, mem.peak), min(rss, mem.rss_peak), res.report
        times.append(secs)
    return min(times), peak, rss, report, statistics.median(times)


def load_model(name: str, device, dtype):
    if name == "tiny":
        return Studio.from_pipeline(build_tiny_pipeline("sd1").to(device, dtype), "tiny-sd1"), 64
    if name == "toy":
        if not TOY_MODEL_DIR.is_dir():
            return None, 0
        studio = Studio.load(device=device, dtype=dtype)
        return studio, studio.default_size
    if name == "sd15":
        size = 512 if torch.device(device).type == "cuda" else 256
        return Studio.from_pipeline(build_sd15_random().to(device, dtype), "sd15-random"), size
    raise SystemExit(f"unknown model {name!r}; choose tiny, toy or sd15")


def setup(name: str, n: int, device, dtype):
    """(studio, size, n random adapters with triggers and concepts, in its library), or None when
    the toy model is not built."""
    studio, size = load_model(name, device, dtype)
    if studio is None:
        print(f"[{name}] skipped: {TOY_MODEL_DIR} is not built (python -m training.toyworld)", file=sys.stderr)
        return None
    adapters = random_adapters(studio.pipe, n)
    for k, a in enumerate(adapters):
        a.trigger, a.concept = TRIGGERS[k], CONCEPTS[k]
        studio.adapters.add(a)
    return studio, size, adapters


def bench_model(name: str, ns: list[int], steps: int, repeats: int, methods: list[str], device, dtype) -> dict | None:
    ready = setup(name, max(ns), device, dtype)
    if ready is None:
        return None
    studio, size, adapters = ready
    measure(studio, [], "merge", {}, prompt_for(1), size, steps, 1)  # warm-up
    plain_s, plain_mem, _, _, plain_med = measure(studio, [], "merge", {}, prompt_for(max(ns)), size, steps, repeats)
    print(f"[{name}] {size}px T={steps} plain {plain_s:.3f}s (median {plain_med:.3f}s) peak {plain_mem / 2**20:.1f} MiB",
          file=sys.stderr)
    rows = []
    for n in ns:
        prompt, comp = prompt_for(n), None
        for label in methods:
            if label == "plain":
                continue
            method, params = METHODS[label]
            secs, peak, rss, rep, med = measure(studio, adapters[:n], method, params, prompt, size, steps, repeats)
            if label == "composite":
                comp = (secs, peak)
            row = {"n": n, "method": label, "seconds": secs, "x_plain": secs / plain_s, "peak_mib": peak / 2**20,
                   "median_seconds": med, "x_plain_median": med / plain_med,
                   "rss_peak_mib": rss / 2**20,
                   "mem_x_composite": peak / comp[1] if comp and comp[1] > 0 else None,
                   "x_composite": secs / comp[0] if comp else None,
                   **{k: rep.get(k) for k in ("unet_calls", "shallow_calls", "latent_updates", "backward_passes")}}
            rows.append(row)
            mx = f"{row['mem_x_composite']:.2f}" if row["mem_x_composite"] is not None else "-"
            print(f"[{name}] N={n} {label:12s} {secs:8.3f}s ×plain {row['x_plain']:6.2f} (median {row['x_plain_median']:6.2f})  peak {row['peak_mib']:8.1f} MiB "
                  f"×composite(mem) {mx} (rss {row['rss_peak_mib']:.0f} MiB)  full={rep.get('unet_calls')} trunc={rep.get('shallow_calls')} "
                  f"updates={rep.get('latent_updates', '-')} backward={rep.get('backward_passes', '-')}", file=sys.stderr)
    return {"model": name, "size": size, "steps": steps, "device": str(device), "dtype": str(dtype),
            "threads": torch.get_num_threads(), "plain_seconds": plain_s, "plain_median_seconds": plain_med, "plain_peak_mib": plain_mem / 2**20, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,toy,sd15")
    ap.add_argument("--n", default="2,3", help="numbers of adapters (CLoRA runs N + 1 branches)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="plain,composite,clora,clora-joint,clora-noupd")
    ap.add_argument("--dtype", choices=("auto", "fp32", "fp16"), default="auto")
    ap.add_argument("--json", type=Path, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    device, auto_dtype = pick_device()
    dtype = {"auto": auto_dtype, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "composite" in methods:  # composite first: the memory ratio needs it
        methods.remove("composite")
        methods.insert(0, "composite")
    ns = [int(x) for x in args.n.split(",")]
    results = [r for m in args.models.split(",") if (r := bench_model(m.strip(), ns, args.steps, args.repeats, methods, device, dtype))]
    print(json.dumps(results, indent=1))
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
