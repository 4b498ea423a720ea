"""The oracle: a small multi-label CNN that says what a toy-world image shows.

For each position slot (left / centre / right) it predicts the shape (or "empty"), the colour and
the fill pattern; for the whole image the background. It knows every concept, reserved ones
included, and was trained on rendered images and on their VAE reconstructions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .concepts import ALL_BACKGROUNDS, ALL_PATTERNS, ALL_SHAPES, COLORS, POSITIONS, concept_kind

SLOT_SHAPES = ("empty",) + ALL_SHAPES
N_SHAPE, N_COLOR, N_PATTERN, N_BG = len(SLOT_SHAPES), len(COLORS), len(ALL_PATTERNS), len(ALL_BACKGROUNDS)
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


def split_logits(logits: torch.Tensor):
    """-> (bg [B,N_BG], shape [B,3,N_SHAPE], color [B,3,N_COLOR], pattern [B,3,N_PATTERN])."""
    bg = logits[:, :N_BG]
    slots = logits[:, N_BG:].reshape(-1, len(POSITIONS), SLOT_WIDTH)
    return (bg, slots[..., :N_SHAPE], slots[..., N_SHAPE:N_SHAPE + N_COLOR],
            slots[..., N_SHAPE + N_COLOR:])


def scene_targets(scene) -> dict:
    """Integer targets of a Scene for training: bg, shape[3], color[3], pattern[3] (-1 = ignore)."""
    shape = [0, 0, 0]
    color = [-1, -1, -1]
    pattern = [-1, -1, -1]
    for o in scene.objects:
        i = POSITIONS.index(o.position)
        shape[i] = SLOT_SHAPES.index(o.shape)
        color[i] = COLORS.index(o.color)
        pattern[i] = ALL_PATTERNS.index(o.pattern)
    return {"bg": ALL_BACKGROUNDS.index(scene.background), "shape": shape, "color": color,
            "pattern": pattern}


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0


class Oracle:
    """Judge of toy-world images. ``predict`` returns one dict per image:
    ``{"objects": [{"position", "shape", "color", "pattern"}, ...], "background": str}``."""

    def __init__(self, net: OracleNet, config: dict | None = None):
        self.net = net.eval()
        self.config = config or {}

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
            preds.append({"objects": objs, "background": ALL_BACKGROUNDS[bg[b]]})
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
    cfg = dict(config, slot_shapes=list(SLOT_SHAPES), colors=list(COLORS),
               patterns=list(ALL_PATTERNS), backgrounds=list(ALL_BACKGROUNDS),
               positions=list(POSITIONS))
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    tmp.replace(folder / "config.json")


def extend_oracle(folder: str | Path) -> OracleNet:
    """An OracleNet for this code's vocabulary, started from an older oracle whose vocabulary is a
    subset (e.g. before a reserved pattern was added): every layer is copied, output rows are
    matched by name, new rows keep their fresh initialisation. Fine-tuning it keeps the older
    oracle's judgement of everything it knew, so measurements made with it stay comparable."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    old_names = _output_names(cfg["backgrounds"], cfg["slot_shapes"], cfg["colors"], cfg["patterns"], cfg["positions"])
    new_names = _output_names(ALL_BACKGROUNDS, SLOT_SHAPES, COLORS, ALL_PATTERNS, POSITIONS)
    missing = set(old_names) - set(new_names)
    if missing:
        raise ValueError(f"oracle at {folder} knows {sorted(missing)[:5]}, which this code does not: it cannot be extended")
    net = OracleNet(width=cfg.get("width", 16))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / "oracle.safetensors")).items()}
    last = f"head.{len(net.head) - 1}"
    w, b = sd.pop(f"{last}.weight"), sd.pop(f"{last}.bias")
    res = net.load_state_dict(sd, strict=False)
    if res.unexpected_keys or set(res.missing_keys) != {f"{last}.weight", f"{last}.bias"}:
        raise ValueError(f"oracle at {folder} has another architecture: {res}")
    layer = net.head[-1]
    with torch.no_grad():
        for i, name in enumerate(old_names):
            j = new_names.index(name)
            layer.weight[j] = w[i]
            layer.bias[j] = b[i]
    return net


def _output_names(backgrounds, slot_shapes, colors, patterns, positions) -> list[str]:
    """The name of each output logit, in split_logits' layout."""
    names = [f"bg:{b}" for b in backgrounds]
    for pos in positions:
        names += [f"{pos}:shape:{x}" for x in slot_shapes] + [f"{pos}:color:{x}" for x in colors]
        names += [f"{pos}:pattern:{x}" for x in patterns]
    return names


_CACHE: dict = {}


def load_oracle(path: str | Path | None = None) -> Oracle:
    """Load the shipped oracle (assets/models/oracle) or one at ``path``."""
    from safetensors.torch import load_file

    from .paths import require_oracle

    folder = require_oracle(path)
    key = str(folder.resolve())
    if key in _CACHE:
        return _CACHE[key]
    cfg = json.loads((folder / "config.json").read_text())
    if (cfg.get("slot_shapes") != list(SLOT_SHAPES) or cfg.get("colors") != list(COLORS)
            or cfg.get("patterns") != list(ALL_PATTERNS) or cfg.get("backgrounds") != list(ALL_BACKGROUNDS)):
        from .paths import _fail
        _fail("oracle (vocabulary differs from this code)", folder)
    net = OracleNet(width=cfg.get("width", 16))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / "oracle.safetensors")).items()}
    net.load_state_dict(sd)
    oracle = Oracle(net, cfg)
    _CACHE[key] = oracle
    return oracle
