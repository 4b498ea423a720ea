"""Training benchmarks; every number is a ratio against a baseline measured in the same run.

1. Our DreamBooth-LoRA step vs a minimal re-implementation of the diffusers reference loop
   (``examples/dreambooth/train_dreambooth_lora.py``: VAE-encode the batch and run the frozen text
   encoder every step, PEFT LoRA r4 on to_q/to_k/to_v/to_out.0, AdamW, clip 1.0): step time and
   peak memory (each variant in its own subprocess; CPU: peak RSS growth, CUDA: max allocated).
2. Kronecker (our ``KronLinear``) vs LoRA training step at a matched parameter count, plus PEFT's
   LoKr for context, and our layer with the forward forced to ``vec`` or ``dense``. Step times are
   taken round-robin in one process (each variant on its own copy of the model), so a busy machine
   slows all of them alike; memory is measured per loop in a fresh subprocess.
3. Kronecker vs LoRA inference: a CFG-batched UNet forward with the adapter attached by the rig.

Usage: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/train.py [--model toy|tiny] [--steps 20] [--layers]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH = 4  # instance images per step (the reference script's default train_batch_size)


def _studio(model: str):
    from studio.studio import Studio
    from studio.base import TOY_MODEL_DIR, build_tiny_pipeline

    if model == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise SystemExit("toy model missing: build it with python -m training.toyworld, or pass --model tiny")
        return Studio.load(None, device=torch.device("cpu"))
    return Studio.from_pipeline(build_tiny_pipeline("sd1"), "tiny-sd1")


def _images(folder: Path, n: int = 5) -> Path:
    from studio.toyworld.render import Obj, Scene, render

    folder.mkdir(parents=True, exist_ok=True)
    colors = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i in range(n):
        render(Scene([Obj("crescent", colors[i % 6])]), i).save(folder / f"{i}.png")
    return folder


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- training variants ----------------------------------------------------------------------------

def ours_trainer(model: str, adapter: str = "lora", studio=None, **kw):
    from training.dreambooth import DreamBoothTrainer, TrainConfig

    studio = studio or _studio(model)
    tmp = Path(tempfile.mkdtemp())
    cfg = TrainConfig(images=str(_images(tmp / "inst")), adapter=adapter, batch_size=BATCH, grad_accum=1, lr=1e-4,
                      steps=10**6, progress=False, final_grid=False, output_dir=str(tmp / "o"), **kw)
    trainer = DreamBoothTrainer(studio, cfg)
    return trainer


def ours_step(model: str, adapter: str = "lora", studio=None, **kw):
    """(step function, trainable parameter count) of our loop."""
    trainer = ours_trainer(model, adapter, studio, **kw)
    trainer.setup()
    trainer.unet.train()
    return trainer.train_step, sum(p.numel() for p in trainer.params)


def lokr_step(model: str, factor: int):
    """PEFT LoKr with a1 = a2 = factor (both factors full) in our loop, for context."""
    import types
    from peft import LoKrConfig
    from training import dreambooth as db

    trainer = ours_trainer(model, "lora")

    def inject(self):
        cfg = LoKrConfig(r=4096, alpha=4096, decompose_factor=factor, decompose_both=False, init_weights="lycoris",
                         target_modules=db.LORA_TARGETS)
        self.pipe.unet.add_adapter(cfg, adapter_name=db._PEFT_NAME)
        self._injected = True

    trainer._inject = types.MethodType(inject, trainer)
    trainer.setup()
    trainer.unet.train()
    return trainer.train_step, sum(p.numel() for p in trainer.params)


def reference_step(model: str, studio=None):
    """The diffusers reference DreamBooth-LoRA loop, reduced to what one step does."""
    import numpy as np
    from PIL import Image
    from peft import LoraConfig
    from diffusers import DDPMScheduler
    from accelerate import Accelerator
    from torchvision import transforms

    studio = studio or _studio(model)
    pipe = studio.pipe
    tmp = Path(tempfile.mkdtemp())
    folder = _images(tmp / "inst")
    res = studio.default_size
    tfm = transforms.Compose([transforms.Resize(res), transforms.CenterCrop(res), transforms.ToTensor(),
                              transforms.Normalize([0.5], [0.5])])
    paths = sorted(folder.glob("*.png"))
    accelerator = Accelerator(cpu=True)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    unet, opt, lr_sched = accelerator.prepare(unet, opt, lr_sched)
    sched_cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if k != "set_alpha_to_one"}
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    rng = np.random.default_rng(0)

    def batch():  # DreamBoothDataset + collate_fn: open, transform and tokenize every example
        idx = rng.integers(len(paths), size=BATCH)
        pixels = torch.stack([tfm(Image.open(paths[i]).convert("RGB")) for i in idx])
        ids = tok(["a sks object"] * BATCH, truncation=True, padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        return pixels, ids

    def step():
        unet.train()
        pixels, ids = batch()
        with accelerator.accumulate(unet):
            model_input = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,)).long()
            noisy = noise_scheduler.add_noise(model_input, noise, t)
            ehs = te(ids)[0]
            pred = unet(noisy, t, ehs, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()

    return step, sum(p.numel() for p in params)


def interleaved(fns: dict, rounds: int, warmup: int = 3) -> dict:
    """Median seconds per call of each function, called round-robin so drifting load hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_one(kind: str, model: str, steps: int) -> dict:
    """Peak memory growth of one loop over ``steps`` steps (run alone in a fresh process)."""
    studio = _studio(model)
    rss0 = _rss_mb()  # after loading the model: only what the loop adds counts
    step, _ = reference_step(model, studio) if kind == "reference" else ours_step(model, studio=studio, rank=4)
    for _ in range(steps):
        step()
    return {"peak_mb": max(0.0, _peak_mb() - rss0)}


def inference(model: str, rounds: int, rank: int, factors: str) -> dict:
    from studio.adapters.activation import AdapterRig
    from studio.adapters.adapter import Adapter, KronDelta, LoraDelta
    from studio.adapters.kron import parse_factors, target_layers

    pipes = {k: _studio(model).pipe for k in ("base", "lora", "kron")}
    pipe = pipes["base"]
    a1, a2 = parse_factors(factors)
    g = torch.Generator().manual_seed(0)
    lora, kron = {}, {}
    for name, mod in target_layers(pipe.unet):
        o, i = mod.weight.shape
        lora[f"unet.{name}"] = LoraDelta(torch.randn(rank, i, generator=g) * 0.01, torch.randn(o, rank, generator=g) * 0.01)
        kron[f"unet.{name}"] = KronDelta(w1=torch.randn(a1, a2, generator=g) * 0.01,
                                         w2=torch.randn(o // a1, i // a2, generator=g) * 0.01)
    res = _studio(model).default_size // pipe.vae_scale_factor
    x = torch.randn(2, pipe.unet.config.in_channels, res, res, generator=g)
    with torch.no_grad():
        ehs, _ = pipe.encode_prompt(["", "a sks object"], "cpu", 1, False)
    rigs = {"base": AdapterRig(pipes["base"], []), "lora": AdapterRig(pipes["lora"], [Adapter("lora", lora)]),
            "kron": AdapterRig(pipes["kron"], [Adapter("kron", kron, kind="kron")])}
    fns = {}
    for k, rig in rigs.items():
        rig.__enter__()
        if k != "base":
            rig.set(unet={k: 1.0})
        fns[k] = (lambda p=pipes[k]: _no_grad_unet(p, x, ehs))
    out = interleaved(fns, rounds * 3)
    for rig in rigs.values():
        rig.__exit__(None, None, None)
    return out


def _no_grad_unet(pipe, x, ehs):
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=ehs, return_dict=False)


def layer_table(rounds: int) -> list[str]:
    """Per-layer fwd+bwd (training) and forward (inference) times on real SD1.5/SDXL attention shapes."""
    import torch.nn.functional as F
    from studio.adapters.adapter import KronDelta
    from studio.adapters.kron import KronLinear

    rows = ["| layer (out×in, tokens) | factors | train: vec / dense / LoRA r4 (ms) | infer: vec / dense / LoRA r4 (ms) |",
            "|---|---|---|---|"]
    for d_out, d_in, n, label in [(320, 320, 4096, "SD1.5 attn1 64²"), (1280, 1280, 256, "SD1.5 attn1 16²"),
                                  (640, 2048, 77, "SDXL attn2 to_k"), (1280, 1280, 1024, "SDXL attn1 32²"),
                                  (128, 128, 512, "toy attn1 8², batch 8")]:
        for factors in ((16, 16), (64, 8)):
            a1, a2 = factors
            g = torch.Generator().manual_seed(0)
            base = torch.nn.Linear(d_in, d_out).requires_grad_(False)
            x = torch.randn(n, d_in, generator=g, requires_grad=True)
            layers = {m: KronLinear(base, a1, a2, mode=m) for m in ("vec", "dense")}
            for l in layers.values():
                with torch.no_grad():
                    l.kron_B.normal_()
            down = torch.randn(4, d_in, generator=g, requires_grad=True)
            up = torch.randn(d_out, 4, generator=g, requires_grad=True)
            kd = layers["vec"].to_delta()
            lora_train = lambda: (base(x) + F.linear(F.linear(x, down), up)).sum().backward()  # noqa: E731
            t = interleaved({"vec": lambda: layers["vec"](x).sum().backward(),
                             "dense": lambda: layers["dense"](x).sum().backward(), "lora": lora_train}, rounds)
            with torch.no_grad():
                xi = x.detach()
                i = interleaved({"vec": lambda: kd.forward(xi, None, vec=True),
                                 "dense": lambda: kd.forward(xi, None, vec=False),
                                 "lora": lambda: F.linear(F.linear(xi, down), up)}, rounds)
            rows.append(f"| {label}: {d_out}×{d_in}, {n} | {a1}×{a2} | {t['vec']*1e3:.2f} / {t['dense']*1e3:.2f} / "
                        f"{t['lora']*1e3:.2f} | {i['vec']*1e3:.2f} / {i['dense']*1e3:.2f} / {i['lora']*1e3:.2f} |")
    return rows


def _one(args) -> None:
    torch.manual_seed(0)
    print("RESULT " + json.dumps(memory_one(args.one, args.model, args.steps)))


def _sub(args, one: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--one", one, "--model", args.model, "--steps", str(args.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{one} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _matched(model: str) -> tuple[str, int]:
    """Kronecker factors and the LoRA rank with the closest parameter count on this model."""
    from studio.adapters.kron import param_count
    from studio.base import module_shapes

    shapes = module_shapes(_studio(model).pipe)
    factors = "4x4" if model == "tiny" else "8x8"
    n = param_count(shapes, factors)
    rank = min(range(1, 65), key=lambda r: abs(param_count(shapes, rank=r) - n))
    return factors, rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy", choices=["toy", "tiny"])
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (every variant once per round)")
    ap.add_argument("--layers", action="store_true", help="only the per-layer vec/dense/LoRA table")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return _one(args)
    if args.layers:
        print("\n".join(layer_table(args.steps)))
        return
    factors, rank = _matched(args.model)
    a = int(factors.split("x")[0])
    mem_ref, mem_ours = _sub(args, "reference"), _sub(args, "ours")
    variants = {
        "reference": reference_step(args.model),
        "ours": ours_step(args.model, rank=4),
        "lora": ours_step(args.model, rank=rank),
        "kron": ours_step(args.model, "kron", factors=factors),
        "kron_vec": ours_step(args.model, "kron", factors=factors, kron_mode="vec"),
        "kron_dense": ours_step(args.model, "kron", factors=factors, kron_mode="dense"),
        "lokr": lokr_step(args.model, a),
    }
    t = interleaved({k: v[0] for k, v in variants.items()}, args.steps)
    n = {k: v[1] for k, v in variants.items()}
    inf = inference(args.model, args.steps, rank, factors)
    rows = [
        ("our LoRA r4 loop vs diffusers reference loop: step time", t["ours"], t["reference"], "ms"),
        ("our LoRA r4 loop vs diffusers reference loop: peak memory growth", mem_ours["peak_mb"], mem_ref["peak_mb"], "MB"),
        (f"Kron {factors} ({n['kron']:,} p) vs LoRA r{rank} ({n['lora']:,} p): training step", t["kron"], t["lora"], "ms"),
        (f"Kron {factors}: reshaped matmul (vec) vs ΔW folded into W (dense): training step", t["kron_vec"], t["kron_dense"], "ms"),
        (f"PEFT LoKr f={a} ({n['lokr']:,} p) vs LoRA r{rank}: training step", t["lokr"], t["lora"], "ms"),
        (f"Kron {factors} vs LoRA r{rank}: UNet forward (batch 2, rig hooks)", inf["kron"], inf["lora"], "ms"),
        ("LoRA r%d vs no adapter: UNet forward" % rank, inf["lora"], inf["base"], "ms"),
    ]
    print(f"model: {args.model}, batch {BATCH} (instance only), {args.steps} interleaved rounds (median), "
          f"torch threads {torch.get_num_threads()}")
    print("| measurement | ours / candidate | baseline | ratio |")
    print("|---|---|---|---|")
    for label, x, y, unit in rows:
        scale = 1e3 if unit == "ms" else 1
        print(f"| {label} | {x * scale:.1f} {unit} | {y * scale:.1f} {unit} | {x / y if y else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
