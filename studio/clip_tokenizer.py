"""The SD-1.5 CLIP tokenizer rebuilt offline from the BPE merges that open_clip ships.

Token ids equal Stable Diffusion's (``sks`` is 48136), so prompts and triggers behave as on the
real model; used by the toy world and by the tiny test pipelines, since no hub is reachable.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile

import open_clip
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer

N_MERGES = 48894  # 49408 ids = 512 byte symbols + merges + 2 specials


def write_clip_vocab(folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the SD-1.5 tokenizer into ``folder``."""
    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with SD-1.5's vocabulary, built without any download."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(tmp)
        return CLIPTokenizer(
            os.path.join(tmp, "vocab.json"),
            os.path.join(tmp, "merges.txt"),
            pad_token="<|endoftext|>",
            model_max_length=model_max_length,
        )
