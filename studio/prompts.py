"""A1111 prompt syntax: ``<lora:NAME:TE[:UNET[:DYN]]>`` tags (also ``te=``, ``unet=``, ``dyn=``).

``<lyco:…>`` (the a1111-sd-webui-lycoris extension's tag, still common in shared prompts) is read
exactly like ``<lora:…>``: A1111's built-in Lora extension now loads LyCORIS files under both.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

from .errors import GenerationError

_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split a prompt into the text the encoder sees and its ``<lora:…>`` tags."""
    tags = []
    for match in _TAG.finditer(prompt):
        body, tag = match.group(1), match.group(0)
        parts = body.split(":")
        name, rest = parts[0].strip(), parts[1:]
        if not name:
            raise GenerationError(f"empty adapter name in {tag}; write <lora:NAME:WEIGHT>")
        positional, named = [], {}
        for p in rest:
            if "=" in p:
                k, v = p.split("=", 1)
                named[k.strip()] = v
            else:
                positional.append(p)
        keys = ["te", "unet", "dyn"]
        values = dict(zip(keys, positional)) | named
        try:
            te = float(values.get("te", 1.0))
            unet = float(values.get("unet", te))
        except ValueError:
            raise GenerationError(f"bad weight in {tag}; weights are numbers, e.g. <lora:{name}:0.8>") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise GenerationError(f"weight in {tag} is not a finite number; write e.g. <lora:{name}:0.8>")
        if "dyn" in values:
            warnings.warn(f"{tag}: DYN (rank limit) is not supported and is ignored", stacklevel=2)
        tags.append(LoraTag(name, te, unet))
    text = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip(" ,")
    return text, tags


def format_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` stands in ``text`` as a word of its own ("sks" in "a sks shape", not in "asks")."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def untagged_triggers(text: str, used: set[str], triggers: dict[str, str | None]) -> dict[str, list[str]]:
    """Trigger words in ``text`` whose adapters are all left out of ``used``: {trigger: [adapter names]}.
    Without its adapter a trigger is a rare word the base model draws as nothing in particular, so the
    concept is silently missing; ``triggers`` maps adapter name -> trigger word (or None)."""
    by_trigger: dict[str, list[str]] = {}
    for name, trigger in sorted(triggers.items()):
        if trigger:
            by_trigger.setdefault(trigger, []).append(name)
    return {t: names for t, names in by_trigger.items() if has_word(text, t) and not set(names) & used}


def untagged_trigger_warning(trigger: str, names: list[str], fix: str) -> str:
    """The warning for a trigger word whose adapters (``names``) are left out; ``fix`` says how to add one."""
    return (f"{trigger!r} is the trigger of {' / '.join(names)}, which this prompt does not use, so the model "
            f"draws it as an unknown word; add {fix}")


# ---- token positions of concepts and triggers (CLoRA) -------------------------------------

_PUNCT = ",.;:!?\"'()[]{}"


def _norm(word: str) -> str:
    return word.lower().strip(_PUNCT)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, truncation=False).input_ids)


def word_token_positions(tokenizer, words: list[str], start: int, stop: int) -> list[int]:
    """Positions in ``tokenizer(" ".join(words)).input_ids`` (BOS included, so the first word
    starts at 1) of the tokens of ``words[start:stop]``; a word split into pieces gives them all.

    CLIP's BPE works within whitespace-separated words, so the tokens of a prefix are a prefix
    of the tokens; this is checked against the full tokenization.
    """
    specials = len(_ids(tokenizer, ""))  # BOS + EOS
    lead = 1 if specials and _ids(tokenizer, "")[0] == getattr(tokenizer, "bos_token_id", None) else 0
    first = lead + len(_ids(tokenizer, " ".join(words[:start]))) - specials
    last = lead + len(_ids(tokenizer, " ".join(words[:stop]))) - specials
    full = _ids(tokenizer, " ".join(words))
    piece = _ids(tokenizer, " ".join(words[start:stop]))[lead:lead + last - first]
    if full[first:last] != piece:
        raise GenerationError(f"cannot locate {' '.join(words[start:stop])!r} in the tokenized prompt; "
                              "pass explicit token_indices")
    return list(range(first, last))


@dataclass
class BranchPrompts:
    """CLoRA's prompts and token positions: branch 0 is the base, branch k+1 adapter k's.

    ``tokens[b][g]``: positions of concept g (plus its trigger in its own branch) in prompt b,
    BOS at 0. ``mask_tokens[b]``: the positions whose maps define branch b's mask (none for the base).
    """

    prompts: list[str]
    tokens: list[list[list[int]]]
    mask_tokens: list[list[int]]


def _find(norms: list[str], pattern: list[str], taken: set[int], start: int = 0) -> int:
    for i in range(start, len(norms) - len(pattern) + 1):
        if norms[i:i + len(pattern)] == pattern and not taken & set(range(i, i + len(pattern))):
            return i
    return -1


def _with_triggers(base: list[str], spans: list[list[int]], triggers: list[list[str]], bare: list[bool],
                   active: set[int]) -> tuple[list[str], list[tuple[int, int]]]:
    """The base words with the triggers of ``active`` concepts put before their concept words (a bare
    trigger takes its concept word's place), and every concept's span in the new words; an active
    concept's span includes its trigger."""
    at = {spans[k][0]: k for k in active}
    cut = {j for k in active if bare[k] for j in range(*spans[k])}
    words: list[str] = []
    new: dict[int, int] = {}  # base index -> index in words
    trigger_at: dict[int, int] = {}
    for j, w in enumerate(base):
        if j in at:
            trigger_at[at[j]] = len(words)
            words.extend(triggers[at[j]])
        if j not in cut:
            new[j] = len(words)
            words.append(w)
    out = []
    for k, (s0, s1) in enumerate(spans):
        if k in active:
            start = trigger_at[k]
            out.append((start, start + len(triggers[k]) + (0 if bare[k] else s1 - s0)))
        else:
            out.append((new[s0], new[s1 - 1] + 1))
    return words, out


def branch_prompts(prompt: str, concepts: list[tuple[str, str, str]], tokenizer,
                   shared: frozenset[int] = frozenset()) -> BranchPrompts:
    """Base and per-adapter prompts from a user prompt and (name, trigger, concept) per adapter.

    Each adapter claims one occurrence of its concept word(s): the one right after its trigger if
    the prompt has "trigger concept", else the first unclaimed one. The base prompt drops every
    trigger; adapter k's prompt inserts its trigger before its own concept only. E.g. "a sks shape
    on the left and a zwx shape on the right" -> base "a shape on the left and a shape on the
    right", sks branch "a sks shape on the left and a shape on the right", and so on.

    A trigger that stands alone, with its concept word nowhere in the prompt ("a red sks shape on
    wvu", the "and" phrasing of a background), stands for its concept: the base prompt and the
    other branches read the concept word in its place ("... on background"), its own branch the
    trigger, and the trigger's tokens are the concept's tokens there.

    ``shared`` (adapter indices) keep their trigger in every branch of an adapter outside ``shared``,
    not only their own: CLoRA's background deviation draws each object on the background, not on a
    plain one. The branch of a shared adapter holds only its own trigger.
    """
    words = prompt.split()
    norms = [_norm(w) for w in words]
    taken: set[int] = set()
    # (trigger start, concept start, concept len); a bare trigger: (start, start, 0)
    claims: list[tuple[int, int, int] | None] = [None] * len(concepts)
    for k, (name, trigger, concept) in enumerate(concepts):  # pass 1: "trigger concept" in the prompt
        tw, cw = trigger.lower().split(), concept.lower().split()
        i = _find(norms, tw + cw, taken)
        if i >= 0:
            claims[k] = (i, i + len(tw), len(cw))
            taken |= set(range(i, i + len(tw) + len(cw)))
    for k, (name, trigger, concept) in enumerate(concepts):  # pass 2: the concept word alone, or the trigger alone
        if claims[k] is not None:
            continue
        tw, cw = trigger.lower().split(), concept.lower().split()
        t, i = _find(norms, tw, taken), _find(norms, cw, taken)
        if t >= 0 and i < 0:  # the trigger stands for its concept
            claims[k] = (t, t, 0)
            taken |= set(range(t, t + len(tw)))
            continue
        if t >= 0:
            raise GenerationError(f"trigger {trigger!r} of adapter {name!r} must stand right before its concept "
                                  f"{concept!r}; write '{trigger} {concept}' in the prompt")
        if i < 0:
            raise GenerationError(f"the prompt does not mention {concept!r}, the concept of adapter {name!r}; "
                                  f"add it, e.g. 'a {trigger} {concept}'")
        claims[k] = (i, i, len(cw))
        taken |= set(range(i, i + len(cw)))
    bare = {c[0]: k for k, c in enumerate(claims) if c[2] == 0}  # trigger start -> adapter
    drop = {j for (t, c0, n), (_, trigger, _) in zip(claims, concepts)
            for j in range(t, t + len(trigger.split()) if n == 0 else c0)}
    base: list[str] = []
    spans: list[list[int]] = [[0, 0] for _ in concepts]  # concept span in base words
    for j, w in enumerate(words):
        if j in bare:
            k = bare[j]
            cw = concepts[k][2].split()
            spans[k] = [len(base), len(base) + len(cw)]
            base.extend(cw)  # a bare trigger: the base reads its concept word instead
            continue
        for k, c in enumerate(claims):
            if j == c[1] and c[2]:
                spans[k][0] = len(base)
                spans[k][1] = len(base) + c[2]
        if j not in drop:
            base.append(w)
    limit = getattr(tokenizer, "model_max_length", 77)
    prompts, tokens, masks = [], [], []
    for b in range(len(concepts) + 1):
        active = set() if b == 0 else {b - 1} if b - 1 in shared else {b - 1} | set(shared)
        bw, sp = _with_triggers(base, spans, [c[1].split() for c in concepts], [c[2] == 0 for c in claims], active)
        own = None if b == 0 else b - 1
        groups = [word_token_positions(tokenizer, bw, s0, s1) for s0, s1 in sp]
        for (name, _, concept), g in zip(concepts, groups):
            if g and g[-1] >= limit - 1:
                raise GenerationError(f"concept {concept!r} of adapter {name!r} falls beyond the {limit}-token "
                                      "limit; shorten the prompt")
        prompts.append(" ".join(bw))
        tokens.append(groups)
        masks.append([] if own is None else list(groups[own]))
    return BranchPrompts(prompts, tokens, masks)
