"""The whole GPU picture in one run: composition methods, batched images, training, peak memory.

SD1.5- and SDXL-architecture UNets with random weights at their native sizes (512², 1024²) in fp16
(1-layer text encoders and the tiny VAE: they barely matter for the timing). For each model:

- plain generation (no adapter), one adapter, and merge, composite, cmlora, clora (``fast`` and the
  published ``spec`` schedule) at N = 2 and 3: seconds, ratio to one-adapter generation, peak memory;
- batched vs serial images (merge, composite N = 2) at batch 1, 4 and 8: throughput ratio;
- one DreamBooth training step, LoRA vs Kronecker: seconds and peak memory.

Peak memory is ``torch.cuda.max_memory_allocated`` per measurement (CPU: none). Prints one table of
ratios and writes ``gpu.json`` to the folder given. A section that fails is recorded with its error
and the run goes on. ``--smoke`` runs the same code on the tiny random pipelines at 64² with 2 steps
on CPU (tests/test_bench_gpu.py), so the script cannot rot.

    bash bench/gpu.sh OUT_DIR            # on one GPU; budgeted for ≤ 8 minutes on an H200
    bash bench/gpu.sh OUT_DIR --smoke    # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compose import SD15_UNET, random_adapters  # noqa: E402
from studio.atomic import write_atomic  # noqa: E402
from studio.studio import Studio  # noqa: E402

# SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), 1024².
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), in_channels=4, layers_per_block=2,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)
METHODS = {
    "plain": ("merge", {}, 0), "single": ("merge", {}, 1), "merge": ("merge", {}, None),
    "composite": ("composite", {}, None), "cmlora": ("cmlora", {}, None),
    "clora-fast": ("clora", {"preset": "fast"}, None), "clora-spec": ("clora", {"preset": "spec"}, None),
}


def build(arch: str, smoke: bool, device, dtype):
    """(pipeline, image size) for ``sd15`` / ``sdxl``: native sizes, random weights; tiny with ``smoke``."""
    from studio.base import build_tiny_pipeline

    if smoke:
        return build_tiny_pipeline("sd1" if arch == "sd15" else "sdxl").to(device, dtype), 64
    if arch == "sd15":
        from bench.compose import build_sd15_random
        from diffusers import UNet2DConditionModel

        pipe = build_sd15_random()
        pipe.unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": 64})
        return pipe.to(device, dtype), 512
    return _sdxl_random().to(device, dtype), 1024


def _sdxl_random():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.base import _tiny_vae
    from studio.clip_tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    common = dict(num_hidden_layers=1, max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     projection_dim=1280, **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(), unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler,
    )


def measure(fn, device) -> dict:
    """Seconds (synchronised) and peak GPU memory (GiB) of one call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    out = {"seconds": round(time.perf_counter() - start, 4)}
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    return out


def guarded(record: dict, key: str, fn) -> None:
    try:
        record[key] = fn()
    except Exception as e:  # one failing section must not lose the others
        record[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(f"  {key}: FAILED {type(e).__name__}: {e}", flush=True)
    else:
        print(f"  {key}: {record[key]}", flush=True)


def bench_model(arch: str, args, device, dtype) -> dict:
    pipe, size = build(arch, args.smoke, device, dtype)
    studio = Studio.from_pipeline(pipe, f"random-{arch}")
    adapters = random_adapters(pipe, 3)
    for a, (trigger, concept) in zip(adapters, [("sks", "cat"), ("zwx", "dog"), ("pqr", "hat")]):
        a.trigger, a.concept = trigger, concept
    prompt = "a cat and a dog and a hat"
    common = dict(steps=args.steps, width=size, height=size, seed=1, progress=False)
    out: dict = {"size": size, "steps": args.steps, "methods": {}, "batch": {}, "train": {}}

    def gen(method, params, ads, **kw):
        return lambda: studio.run(prompt, ads, method=method, method_params=params, **common, **kw)

    gen("merge", {}, adapters[:1])()  # warm-up (kernels, allocator)
    for label, (method, params, n_fixed) in METHODS.items():
        for n in ([n_fixed] if n_fixed is not None else args.n):
            guarded(out["methods"], f"{label}@{n}", lambda: measure(gen(method, params, adapters[:n]), device))
    for label in ("merge", "composite"):
        for bs in args.batches:
            guarded(out["batch"], f"{label}@b{bs}", lambda: {
                "serial": measure(gen(label, {}, adapters[:2], num_images=bs, batch_size=1), device),
                "batched": measure(gen(label, {}, adapters[:2], num_images=bs, batch_size=bs), device)})
    for kind in ("lora", "kron"):  # each on its own copy of the UNet: training leaves its layers attached
        guarded(out["train"], kind, lambda: train_step(fresh_unet(pipe), kind, device, size))
    del studio, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fresh_unet(pipe) -> Studio:
    """A studio on the same pipeline parts with a copy of the UNet."""
    import copy

    return Studio.from_pipeline(type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)}), "train-copy")


def train_step(studio, kind: str, device, size: int) -> dict:
    """One DreamBooth step (batch 1, after a warm-up step) with a LoRA or Kronecker adapter."""
    import tempfile

    from PIL import Image

    from training.dreambooth import DreamBoothTrainer, TrainConfig

    tmp = Path(tempfile.mkdtemp())
    (tmp / "inst").mkdir()
    for i in range(2):
        Image.new("RGB", (size, size), (40 * i, 90, 160)).save(tmp / "inst" / f"{i}.png")
    cfg = TrainConfig(images=str(tmp / "inst"), adapter=kind, batch_size=1, grad_accum=1, lr=1e-4, steps=10**6,
                      progress=False, final_grid=False, output_dir=str(tmp / "o"), resolution=size)
    trainer = DreamBoothTrainer(studio, cfg)
    trainer.setup()
    trainer.unet.train()
    try:
        trainer.train_step()
        return measure(trainer.train_step, device)
    finally:
        trainer.unet.eval()
        teardown = getattr(trainer, "teardown", None) or getattr(trainer, "close", None)
        if teardown is not None:
            teardown()


def table(results: dict) -> str:
    """One table of ratios: each method against one-adapter generation, batch throughput, training."""
    lines = [f"{'model':6} {'row':22} {'seconds':>9} {'ratio':>7} {'peak GiB':>9}"]
    for arch, r in results["models"].items():
        if "error" in r:
            lines.append(f"{arch:6} FAILED: {r['error']}")
            continue
        base = r["methods"].get("single@1", {}).get("seconds")
        for key, m in r["methods"].items():
            lines.append(_timed_row(arch, key, m, base))
        for key, m in r["batch"].items():
            if "error" in m:
                lines.append(f"{arch:6} {key:22} {'error':>9}")
                continue
            s, b = m["serial"], m["batched"]
            lines.append(f"{arch:6} {key + ' throughput':22} {b['seconds']:9.3f} {s['seconds'] / b['seconds']:7.2f} "
                         f"{b['peak_gib'] if b['peak_gib'] is not None else '-':>9}")
        lora = r["train"].get("lora", {}).get("seconds")
        for key, m in r["train"].items():
            lines.append(_timed_row(arch, "train " + key, m, lora))
    return "\n".join(lines)


def _timed_row(arch: str, label: str, m: dict, base: float | None) -> str:
    """One table row: seconds, the ratio to ``base`` (measured in the same run) and peak memory."""
    if "error" in m:
        return f"{arch:6} {label:22} {'error':>9}"
    ratio = f"{m['seconds'] / base:7.2f}" if base else "      -"
    peak = m["peak_gib"] if m["peak_gib"] is not None else "-"
    return f"{arch:6} {label:22} {m['seconds']:9.3f} {ratio} {peak:>9}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for gpu.json")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64², 2 steps, CPU")
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; smoke 2)")
    ap.add_argument("--n", default="2,3", help="adapter counts for the composition rows")
    ap.add_argument("--batches", default="1,4,8", help="images per request for batched vs serial")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.n = [int(s) for s in args.n.split(",")]
    args.batches = [int(s) for s in args.batches.split(",")]
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.float16
    else:
        ap.error("no GPU: run with --smoke on CPU")
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
               "torch": torch.__version__, "smoke": args.smoke, "models": {}}
    for arch in args.models.split(","):
        print(f"{arch}:", flush=True)
        guarded(results["models"], arch, lambda: bench_model(arch, args, device, dtype))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    print(f"total {results['seconds']} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "gpu.json", json.dumps(results, indent=2, default=str))
    return 0 if all("error" not in r for r in results["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
