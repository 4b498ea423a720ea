"""CLIPScore conventions on fixed embeddings (hand-computed values) and a tiny open_clip model end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.metrics import HESSEL_PREFIX, Scorer, aggregate, compat_text, load_backend, per_image


def unit(angle_cos: float) -> torch.Tensor:
    """A 2-D unit vector whose cosine with (1, 0) is ``angle_cos``."""
    return torch.tensor([angle_cos, math.sqrt(1 - angle_cos**2)])


class FixedBackend:
    """Embeddings looked up from dicts: images are keys, texts are strings; real open_clip token counting."""

    backend, model, pretrained = "fixed", "fixed-2d", None

    def __init__(self, images: dict, texts: dict):
        import open_clip

        self.images, self.texts = images, texts
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")  # BPE ships with open_clip; no download
        self.context_length = 77
        self.text_calls = 0

    def encode_images(self, images):
        return torch.stack([self.images[i] for i in images])

    def encode_texts(self, texts):
        self.text_calls += 1
        return torch.stack([self.texts.get(t, unit(0.0)) for t in texts])

    def count_tokens(self, text):
        return len(self.tokenizer.encode(text)) + 2


def test_conventions_on_positive_cosines():
    cos = [0.3, 0.2, 0.25]
    assert aggregate(cos, "compat") == pytest.approx(25.0)
    assert aggregate(cos, "hessel") == pytest.approx(2.5 * 0.25)
    assert aggregate(cos, "raw") == pytest.approx(0.25)
    assert per_image(0.3, "compat") == pytest.approx(30.0)
    assert per_image(0.3, "hessel") == pytest.approx(0.75)


def test_clamps_differ_with_one_negative_cosine():
    # compat clamps the mean: max(100 * mean(0.3, 0.2, -0.4), 0) = 100 * 0.1 / 3
    cos = [0.3, 0.2, -0.4]
    assert aggregate(cos, "compat") == pytest.approx(100 * 0.1 / 3)
    # hessel clamps each image: 2.5 * mean(0.3, 0.2, 0) = 2.5 * 0.5 / 3
    assert aggregate(cos, "hessel") == pytest.approx(2.5 * 0.5 / 3)
    assert aggregate(cos, "raw") == pytest.approx(0.1 / 3)
    # a negative mean: compat is 0, hessel still counts the positive image
    assert aggregate([0.1, -0.5], "compat") == 0.0
    assert aggregate([0.1, -0.5], "hessel") == pytest.approx(0.125)
    assert per_image(-0.5, "compat") == 0.0 and per_image(-0.5, "raw") == -0.5


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(StudioError, match="choose one of compat, hessel, raw"):
        aggregate([0.1], "torchmetrics")


def test_scorer_records_text_tokens_and_raw_cosine():
    triggers = ["red sks", "zkq style"]
    text = compat_text(triggers + [None, " "])
    assert text == "red sks, zkq style"
    backend = FixedBackend({"a": unit(1.0)}, {text: unit(0.31), HESSEL_PREFIX + "a crescent": unit(-0.2)})
    scorer = Scorer(backend)
    s = scorer.clipscore("a", text, "compat")
    assert s.raw_cos == pytest.approx(0.31, abs=1e-6)
    assert s.value == pytest.approx(31.0, abs=1e-4)
    assert (s.text, s.convention, s.scale, s.clamp, s.backend, s.model) == (text, "compat", 100.0, "mean", "fixed", "fixed-2d")
    assert s.tokens == len(backend.tokenizer.encode(text)) + 2 and not s.truncated
    h = scorer.clipscore("a", "a crescent", "hessel")
    assert h.text == "A photo depicts a crescent" and h.value == 0.0 and h.raw_cos == pytest.approx(-0.2, abs=1e-6)
    calls = backend.text_calls
    scorer.clipscore("a", text, "raw")  # text embeddings are cached
    assert backend.text_calls == calls


def test_long_trigger_string_is_flagged_truncated():
    scorer = Scorer(FixedBackend({"a": unit(1.0)}, {}))
    long_text = compat_text([f"trigger{i} word{i} thing{i}" for i in range(12)])
    s = scorer.clipscore("a", long_text, "compat")
    assert s.tokens > 77 and s.truncated
    assert not scorer.clipscore("a", "short", "compat").truncated


def test_per_concept_clip_t_mean_and_min_and_clip_i():
    backend = FixedBackend({"img": unit(1.0)}, {"a crescent": unit(0.5), "a zigzag pattern": unit(0.1)})
    scorer = Scorer(backend)
    ct = scorer.concept_scores("img", {"crescent": "a crescent", "zigzag": "a zigzag pattern"})
    assert ct["value"] == pytest.approx(0.3, abs=1e-6) and ct["min"] == pytest.approx(0.1, abs=1e-6)
    assert ct["per_concept"]["zigzag"]["text"] == "a zigzag pattern"
    refs = {"crescent": torch.stack([unit(0.8), unit(0.6)]), "zigzag": torch.stack([unit(0.2)])}
    ci = scorer.clip_i("img", refs)
    assert ci["per_concept"]["crescent"] == pytest.approx(0.7, abs=1e-6)
    assert ci["value"] == pytest.approx(0.45, abs=1e-6) and ci["min"] == pytest.approx(0.2, abs=1e-6)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random open_clip model in open_clip's local-folder layout (config + safetensors), ~2M params."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }))
    return folder


def test_tiny_open_clip_folder_end_to_end(tmp_path):
    folder = write_tiny_clip(tmp_path / "clip")
    scorer = Scorer.load(str(folder))
    assert scorer.backend.context_length == 16 and scorer.backend.pretrained == "local"
    images = [Image.new("RGB", (40, 40), c) for c in ((200, 30, 30), (30, 30, 200))]
    emb = scorer.image_embeddings(images)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    s = scorer.clipscore(images[0], "red sks, zigzag style", "compat")
    # the score equals the hand-made cosine of the model's own normalised embeddings
    with torch.no_grad():
        t = scorer.backend.net.encode_text(scorer.backend.tokenizer(["red sks, zigzag style"]), normalize=True)[0]
    assert s.raw_cos == pytest.approx(float(emb[0] @ t), abs=1e-5)
    assert s.value == pytest.approx(per_image(s.raw_cos, "compat"), abs=1e-6)
    long = scorer.clipscore(images[0], " ".join(["word"] * 20), "raw")
    assert long.tokens == 22 and long.truncated  # 16-token context
    ci = scorer.clip_i(images[0], {"red": [images[0]], "blue": [images[1]]})
    assert ci["per_concept"]["red"] == pytest.approx(1.0, abs=1e-5) and ci["min"] <= ci["value"]


def test_bad_scorer_specs_are_clear_errors(tmp_path):
    with pytest.raises(StudioError, match="open_clip:ARCH/TAG"):
        load_backend("not-a-model")
    with pytest.raises(StudioError, match="no architecture"):
        load_backend("open_clip:ViT-Nope/openai")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="open_clip_config.json"):
        load_backend(str(tmp_path / "empty"))


def test_missing_toy_clip_names_the_training_command(monkeypatch):
    import studio.toyworld.paths as paths

    monkeypatch.setattr(paths, "TOY_CLIP_DIR", Path("/nonexistent/toy-clip"))
    import studio.toyworld.clip as toy_clip

    monkeypatch.setattr(toy_clip, "_LOADED", {})
    # require_toy_clip reads the default at call time through its module global
    with pytest.raises(StudioError, match="training.toyworld"):
        load_backend("toy")
