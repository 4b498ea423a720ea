"""How much of an object the toy VAE keeps, per background and size, judged by pixels, not by an oracle.

    python -m studio.toyworld.roundtrip [--per-cell 12] [--shapes crescent,plus] [--model DIR]

For one-object scenes of every shape, size and background, it renders the scene, the same scene
with the object in a far colour (same jitter), and the bare background, then encodes and decodes the
scene with the VAE (posterior mean). The object's true mask is where the two renders differ; in
the round trip a pixel counts as object where it is nearer the scene than the bare background. The
measure is the IoU of the two masks (1: the outline is kept; near 0: the object is gone). Why pixels:
the oracles were trained on round trips, so they partly learnt the VAE's losses and cannot say what
the VAE drops. The last line is ``min_iou=… worst=<shape>/<size>/<background> iou_<background>=…``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .concepts import ALL_BACKGROUNDS, ALL_SHAPES, COLORS, SIZES

FAR = {"red": "blue", "green": "purple", "blue": "yellow", "yellow": "blue", "purple": "green", "orange": "blue"}


def masks(scene, seed: int):
    """(scene image, bare background, true object mask) for a one-object scene."""
    import dataclasses

    import numpy as np

    from .render import Scene, render

    obj = scene.objects[0]
    image = render(scene, seed)
    recoloured = render(Scene([dataclasses.replace(obj, color=FAR[obj.color])], scene.background), seed)
    bare = render(Scene([], scene.background), seed)  # the background is drawn first, so it is the same
    a, b = (np.asarray(x, np.float32) for x in (image, recoloured))
    return image, bare, np.abs(a - b).sum(-1) > 60


def kept_iou(image, bare, truth, decoded) -> float:
    """IoU of the true mask and the pixels of ``decoded`` nearer ``image`` than ``bare``."""
    import numpy as np

    d, i, b = (np.asarray(x, np.float32) for x in (decoded, image, bare))
    said = ((d - i) ** 2).sum(-1) < ((d - b) ** 2).sum(-1)
    union = (said | truth).sum()
    return float((said & truth).sum() / union) if union else 1.0


def measure(vae, shapes, per_cell: int, seed: int = 8080) -> dict[tuple[str, str, str], float]:
    """Mean kept-IoU per (shape, size, background) over ``per_cell`` scenes (colours and positions cycle)."""
    from tqdm import tqdm

    from .audit import roundtrip
    from .concepts import POSITIONS
    from .render import Obj, Scene

    cells = [(s, z, bg) for s in shapes for z in SIZES for bg in ALL_BACKGROUNDS]
    out = {}
    for k, (shape, size, bg) in enumerate(tqdm(cells, desc="round trips", mininterval=5)):
        items = [masks(Scene([Obj(shape, COLORS[i % len(COLORS)], size=size, position=POSITIONS[i % len(POSITIONS)])], bg),
                       seed + 1000 * k + i) for i in range(per_cell)]
        decoded = roundtrip(vae, [im for im, _, _ in items])
        out[(shape, size, bg)] = sum(kept_iou(im, bare, t, d) for (im, bare, t), d in zip(items, decoded)) / per_cell
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-cell", type=int, default=12, help="scenes per shape × size × background (default 12)")
    ap.add_argument("--shapes", default=",".join(ALL_SHAPES), help="comma list (default: every shape)")
    ap.add_argument("--model", default=None, help="toy pipeline folder (default assets/models/toy-sd)")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or args.per_cell < 1:
        ap.error(f"--shapes {unknown} unknown (the world knows {', '.join(ALL_SHAPES)})" if unknown
                 else "--per-cell must be ≥ 1")
    import torch

    from .check import load_pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    vae = load_pipeline(args.model).vae
    iou = measure(vae, shapes, args.per_cell)
    print("shape      size    " + " ".join(f"{bg:>7}" for bg in ALL_BACKGROUNDS))
    for shape in shapes:
        for size in SIZES:
            print(f"{shape:<10} {size:<7} " + " ".join(f"{iou[(shape, size, bg)]:7.2f}" for bg in ALL_BACKGROUNDS))
    worst = min(iou, key=iou.get)
    per_bg = {bg: sum(v for (_, _, b), v in iou.items() if b == bg) / (len(shapes) * len(SIZES)) for bg in ALL_BACKGROUNDS}
    print(f"min_iou={iou[worst]:.3f} worst={'/'.join(worst)} " + " ".join(f"iou_{bg}={v:.3f}" for bg, v in per_bg.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
