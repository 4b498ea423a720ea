"""Shared fixtures: tiny random SD1.5- and SDXL-architecture studios and random adapters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait make a suite
# sharing 2 cores with anything else many times slower.
torch.set_num_threads(1)

from studio import Studio
from studio.adapters.adapter import Adapter, LoraDelta
from studio.base import build_tiny_pipeline

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(studio: Studio, name: str, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                scale: float = 0.3, targets=ATTN) -> Adapter:
    """A LoRA on the UNet's attention projections with non-trivial random weights."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, shape in studio.adapters.shapes.items():
        if path.startswith("unet.") and path.endswith(targets) and len(shape) == 2:
            layers[path] = LoraDelta(torch.randn(rank, shape[1], generator=g) * scale,
                                     torch.randn(shape[0], rank, generator=g) * scale, alpha)
    return Adapter(name, layers, arch=studio.arch, trigger=name, concept="shape")


@pytest.fixture(scope="session")
def sd1_pipe():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def sdxl_pipe():
    return build_tiny_pipeline("sdxl")


@pytest.fixture
def sd1(sd1_pipe) -> Studio:
    return Studio.from_pipeline(sd1_pipe, "tiny-sd1")


@pytest.fixture
def sdxl(sdxl_pipe) -> Studio:
    return Studio.from_pipeline(sdxl_pipe, "tiny-sdxl")
