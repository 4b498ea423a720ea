"""Batched generation: the images of one request share every UNet call, and each equals the image
its own one-image request gives (same seed) within 1/255 per pixel, for every method."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_lora
from studio.errors import GenerationError
from studio.studio import CPU_BATCH_SIZE, auto_batch_size

PROMPT = "a cat and a dog"
RUN = dict(steps=4, seed=7, progress=False)


def adapters(studio, n: int = 2):
    out = []
    for i, (trigger, concept) in enumerate([("sks", "cat"), ("zwx", "dog"), ("pqr", "hat")][:n]):
        a = studio.adapters.add(random_lora(studio, f"l{i}", seed=i + 1))
        a.trigger, a.concept = trigger, concept
        out.append(a.name)
    return out


def assert_twins(batched, serial) -> None:
    assert len(batched.images) == len(serial.images)
    for rb, rs, ib, is_ in zip(batched.recipes, serial.recipes, batched.images, serial.images):
        assert rb.seed == rs.seed
        diff = np.abs(np.asarray(ib, np.int16) - np.asarray(is_, np.int16))
        assert diff.max() <= 1, f"seed {rb.seed}: images differ by {diff.max()}/255"
    # distinct seeds give distinct images (the rows are not all the same image)
    assert np.abs(np.asarray(batched.images[0], float) - np.asarray(batched.images[1], float)).mean() > 0.5


def run_both(studio, names, method, params=None, n_images=3, **kw):
    common = dict(method=method, method_params=params or {}, num_images=n_images, **RUN, **kw)
    batched = studio.run(PROMPT, names, batch_size=n_images, **common)
    serial = studio.run(PROMPT, names, batch_size=1, **common)
    return batched, serial


CASES = [
    ("merge", {}),
    ("switch", {"tau": 1}),
    ("composite", {}),
    ("composite", {"batch": "off"}),
    ("composite", {"te_mode": "per_lora"}),
    ("cmlora", {}),  # cache on, batched full/shallow passes
    ("cmlora", {"batch": "off"}),
    ("cmlora", {"cache": "off"}),
    ("lego", {}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{'-'.join(map(str, p.values())) or 'default'}" for m, p in CASES])
def test_batched_images_equal_serial_twins(sd1, method, params):
    names = adapters(sd1, 2)
    batched, serial = run_both(sd1, names, method, params)
    assert_twins(batched, serial)
    assert batched.report["batch_size"] == 3 and serial.report["batch_size"] == 1
    assert batched.report["unet_calls"] == serial.report["unet_calls"]  # counted per image


@pytest.mark.parametrize("params", [{}, {"batch_branches": "off"}, {"preset": "fast", "grad_clip": 0.5},
                                    {"split_rows": "on", "attention_source": "cond"}, {"backprop": "joint"}],
                         ids=["spec", "sequential", "fast-clip", "split-cond", "joint"])
def test_clora_batched_images_equal_serial_twins(sd1, params):
    names = adapters(sd1, 2)
    batched, serial = run_both(sd1, names, "clora", {"inner_iterations": 1, **params}, n_images=2)
    assert_twins(batched, serial)
    for key in ("latent_updates", "full_forwards", "truncated_forwards", "backward_passes"):
        assert batched.report[key] == serial.report[key]
    # the report's history is the last image's, as with one image per call
    lb, ls = batched.report["history"]["losses"], serial.report["history"]["losses"]
    assert [s for s, _ in lb] == [s for s, _ in ls]
    assert [v for _, v in lb] == pytest.approx([v for _, v in ls], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", ["merge", "composite", "cmlora", "clora"])
def test_sdxl_batched_images_equal_serial_twins(sdxl, method):
    names = adapters(sdxl, 2)
    params = {"preset": "fast"} if method == "clora" else {}
    batched, serial = run_both(sdxl, names, method, params, n_images=2)
    assert_twins(batched, serial)


def test_batch_size_splits_requests_and_guidance_one(sd1):
    names = adapters(sd1, 2)
    batched, serial = run_both(sd1, names, "composite", n_images=5, guidance=1.0)
    assert_twins(batched, serial)
    split = sd1.run(PROMPT, names, method="merge", num_images=5, batch_size=2, **RUN)
    whole = sd1.run(PROMPT, names, method="merge", num_images=5, batch_size=5, **RUN)
    assert [r.seed for r in split.recipes] == [7, 8, 9, 10, 11] == [r.seed for r in whole.recipes]
    assert_twins(split, whole)
    with pytest.raises(GenerationError, match="batch_size"):
        sd1.run(PROMPT, names, num_images=2, batch_size=0, **RUN)


def test_step_callback_sees_every_image(sd1):
    seen = []
    sd1.run(PROMPT, num_images=3, batch_size=3, on_step=lambda i, n, z: seen.append((i, z.shape[0])), **RUN)
    assert len(seen) == 3 * 4 and all(rows == 1 for _, rows in seen)


def test_auto_batch_size_on_cpu():
    assert auto_batch_size("cpu", 512, 512, 8) == CPU_BATCH_SIZE
