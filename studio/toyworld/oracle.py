"""The oracle: a small multi-label CNN that says what a toy-world image shows.

For each position slot (left / centre / right) it predicts the shape (or "empty"), the colour and
the fill pattern; for the whole image the background (or "none"). It knows every concept,
reserved ones included, and was trained on rendered images, their VAE reconstructions and hard
negatives (corrupt.py: blends, tints, cut shapes, blobs, noise), so "not there" is a real answer.

Two independently trained oracles ship: ``oracle`` (OracleNet) and ``oracle-b`` (OracleNetB:
another architecture and seed). Evaluations report how often they agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .concepts import ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, POSITIONS, concept_kind

SLOT_SHAPES = ("empty",) + ALL_SHAPES
BG_CLASSES = ("none",) + ALL_BACKGROUNDS
N_SHAPE, N_COLOR, N_PATTERN, N_BG = len(SLOT_SHAPES), len(COLORS), len(ALL_PATTERNS), len(BG_CLASSES)
SLOT_WIDTH = N_SHAPE + N_COLOR + N_PATTERN
N_OUT = N_BG + len(POSITIONS) * SLOT_WIDTH


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class OracleNet(nn.Module):
    """64x64 RGB in [0, 1] -> N_OUT logits (about 28M multiply-adds per image)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), nn.MaxPool2d(2),                           # 32
            _conv(w, 2 * w), nn.MaxPool2d(2),                       # 16
            _conv(2 * w, 4 * w), _conv(4 * w, 4 * w), nn.MaxPool2d(2),  # 8
            _conv(4 * w, 8 * w), _conv(8 * w, 8 * w, stride=2),     # 4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * w * 16, 256),
                                  nn.ReLU(inplace=True), nn.Linear(256, N_OUT))

    def forward(self, x):
        return self.head(self.features((x - 0.5) / 0.25))


class OracleNetB(nn.Module):
    """The second oracle's architecture: residual GroupNorm/GELU blocks, strided downsampling and
    per-slot pooling instead of one dense head (so its errors are not OracleNet's)."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.GELU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU())

        self.features = nn.Sequential(block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 3 * w, 2))  # 8x8
        self.pool = nn.AdaptiveAvgPool2d((2, 3))  # 3 columns ~ left / centre / right
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * w * 6 + 3 * w, 192), nn.GELU(), nn.Linear(192, N_OUT))

    def forward(self, x):
        f = self.features((x - 0.5) / 0.25)
        return self.head(torch.cat([self.pool(f).flatten(1), f.mean((2, 3))], 1))


ARCHS = {"OracleNet": OracleNet, "OracleNetB": OracleNetB}


def build_net(config: dict) -> nn.Module:
    """The network an oracle folder's config names (OracleNet for folders without ``arch``)."""
    return ARCHS[config.get("arch", "OracleNet")](width=config.get("width", 16))


def split_logits(logits: torch.Tensor):
    """-> (bg [B,N_BG], shape [B,3,N_SHAPE], color [B,3,N_COLOR], pattern [B,3,N_PATTERN])."""
    bg = logits[:, :N_BG]
    slots = logits[:, N_BG:].reshape(-1, len(POSITIONS), SLOT_WIDTH)
    return (bg, slots[..., :N_SHAPE], slots[..., N_SHAPE:N_SHAPE + N_COLOR],
            slots[..., N_SHAPE + N_COLOR:])


def scene_targets(scene) -> dict:
    """Integer targets of a Scene (or a corrupt.Truth) for training: bg, shape[3], color[3],
    pattern[3] (-1 = ignore, -2 = any class but a reserved one; see ``target_loss``)."""
    from .corrupt import Truth

    truth = scene if isinstance(scene, Truth) else Truth.of_scene(scene)
    if truth.reserved_absent_only:  # -2: "no reserved class", nothing else known
        return {"bg": -2, "shape": [-2] * len(POSITIONS), "color": [-1] * len(POSITIONS),
                "pattern": [-2] * len(POSITIONS)}
    shape, color, pattern = [0, 0, 0], [-1, -1, -1], [-1, -1, -1]
    for i, pos in enumerate(POSITIONS):
        s = truth.slots.get(pos)
        if s:
            shape[i] = SLOT_SHAPES.index(s["shape"])
            color[i] = COLORS.index(s["color"]) if truth.judge_color else -1
            pattern[i] = ALL_PATTERNS.index(s["pattern"]) if s["pattern"] is not None else -1  # unjudged
    return {"bg": BG_CLASSES.index(truth.background or "none"), "shape": shape, "color": color,
            "pattern": pattern}


def reserved_mask(head: str) -> torch.Tensor:
    """Which classes of a head ("bg", "shape", "pattern") are reserved concepts."""
    from .concepts import NOVEL_CONCEPTS

    classes = {"bg": BG_CLASSES, "shape": SLOT_SHAPES, "pattern": ALL_PATTERNS}[head]
    return torch.tensor([c in NOVEL_CONCEPTS for c in classes])


def target_loss(logits: torch.Tensor, target: torch.Tensor, reserved: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over rows with a class target; for rows marked -2, -log P(not a reserved
    class); rows marked -1 are ignored. Mean over the rows that count."""
    logp = logits.log_softmax(-1)
    pos, neg = target >= 0, target == -2
    total = logits.new_zeros(())
    if pos.any():
        total = total + F.nll_loss(logp[pos], target[pos], reduction="sum")
    if neg.any() and reserved is not None:
        p_res = torch.logsumexp(logp[neg][:, reserved.to(logits.device)], -1).exp()
        total = total - torch.log1p(-p_res.clamp(max=1 - 1e-6)).sum()
    return total / max(1, int((pos | neg).sum()))


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0


class Oracle:
    """Judge of toy-world images. ``predict`` returns one dict per image:
    ``{"objects": [{"position", "shape", "color", "pattern"}, ...], "background": str | None}``
    (None: no background of the world, e.g. noise or a colour wash)."""

    def __init__(self, net: OracleNet, config: dict | None = None, sha: str | None = None):
        self.net = net.eval()
        self.config = config or {}
        self.sha = sha  # first 12 hex digits of the weights file's SHA-256: which judge judged

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), 256):
            out.append(self.net(x[i:i + 256].float()))
        return torch.cat(out)

    def predict_tensor(self, x: torch.Tensor) -> list[dict]:
        """x: [B,3,64,64] in [0, 1]."""
        bg, shape, color, pattern = split_logits(self.logits(x))
        bg, shape, color, pattern = (t.argmax(-1).tolist() for t in (bg, shape, color, pattern))
        preds = []
        for b in range(len(bg)):
            objs = []
            for i, pos in enumerate(POSITIONS):
                if shape[b][i] == 0:
                    continue
                objs.append({"position": pos, "shape": SLOT_SHAPES[shape[b][i]],
                             "color": COLORS[color[b][i]], "pattern": ALL_PATTERNS[pattern[b][i]]})
            preds.append({"objects": objs, "background": None if bg[b] == 0 else BG_CLASSES[bg[b]]})
        return preds

    def predict(self, images) -> list[dict]:
        """Predict the content of PIL images (resized to 64x64 if needed)."""
        if not images:
            return []
        return self.predict_tensor(images_to_tensor(images))

    @staticmethod
    def has_concept(image_pred: dict, concept_word: str) -> bool:
        """Whether a prediction shows ``concept_word`` (shape, colour, pattern or background)."""
        kind = concept_kind(concept_word)
        if kind == "background":
            return image_pred["background"] == concept_word
        return any(o[kind] == concept_word for o in image_pred["objects"])

    @staticmethod
    def concepts(image_pred: dict, judge_color: bool = True) -> set:
        """Every concept word a prediction calls present."""
        out = {image_pred["background"]} if image_pred["background"] else set()
        for o in image_pred["objects"]:
            out |= {o["shape"], o["pattern"]} | ({o["color"]} if judge_color else set())
        return out

    @staticmethod
    def same_concepts(preds_a: list[dict], preds_b: list[dict]) -> int:
        """On how many images two lists of predictions call exactly the same concepts present."""
        return sum(Oracle.concepts(a) == Oracle.concepts(b) for a, b in zip(preds_a, preds_b))

    @staticmethod
    def matches(image_pred: dict, scene) -> dict:
        """Per-attribute agreement of a prediction with a Scene (for accuracy tables)."""
        by_pos = {o["position"]: o for o in image_pred["objects"]}
        out = {"background": image_pred["background"] == scene.background,
               "count": len(image_pred["objects"]) == len(scene.objects)}
        ok = {"shape": True, "color": True, "pattern": True, "position": True}
        for o in scene.objects:
            p = by_pos.get(o.position)
            if p is None:
                ok = {k: False for k in ok}
                continue
            ok["shape"] &= p["shape"] == o.shape
            ok["color"] &= p["color"] == o.color
            ok["pattern"] &= p["pattern"] == o.pattern
        ok["position"] = set(by_pos) == {o.position for o in scene.objects}
        out.update(ok)
        return out


def save_oracle(net: OracleNet, folder: str | Path, config: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in net.state_dict().items()}
    tmp = folder / "oracle.safetensors.tmp"
    save_file(sd, str(tmp))
    tmp.replace(folder / "oracle.safetensors")
    cfg = dict(config, arch=type(net).__name__, slot_shapes=list(SLOT_SHAPES), colors=list(COLORS),
               patterns=list(ALL_PATTERNS), backgrounds=list(BG_CLASSES), positions=list(POSITIONS))
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    tmp.replace(folder / "config.json")


_CACHE: dict = {}


def load_oracle(path: str | Path | None = None) -> Oracle:
    """Load the shipped oracle (assets/models/oracle) or one at ``path`` (e.g. the second oracle,
    ``paths.ORACLE_B_DIR``)."""
    from safetensors.torch import load

    from .paths import require_oracle

    folder = require_oracle(path)
    stat = (folder / "oracle.safetensors").stat()
    key = (str(folder.resolve()), stat.st_mtime_ns, stat.st_size)  # a replaced file is loaded anew
    if key in _CACHE:
        return _CACHE[key]
    cfg = json.loads((folder / "config.json").read_text())
    if (cfg.get("slot_shapes") != list(SLOT_SHAPES) or cfg.get("colors") != list(COLORS)
            or cfg.get("patterns") != list(ALL_PATTERNS) or cfg.get("backgrounds") != list(BG_CLASSES)):
        from .paths import _fail
        _fail("oracle (vocabulary differs from this code)", folder)
    net = build_net(cfg)
    data = (folder / "oracle.safetensors").read_bytes()  # read once: the weights and their hash
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load(data).items()}
    net.load_state_dict(sd)
    oracle = Oracle(net, cfg, sha=hashlib.sha256(data).hexdigest()[:12])
    _CACHE[key] = oracle
    return oracle
