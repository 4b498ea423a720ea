"""Property-based tests (Hypothesis) over the parsers that read outside input: the recipe parser,
the suite loader, the prompt/tag parser and the safetensors header reader. Each either accepts its
input or raises a StudioError with a one-line message; nothing else escapes. Also the invariants of
CLoRA's branch prompts, which rewrite any user prompt."""

from __future__ import annotations

import json
import math
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from studio.errors import StudioError  # noqa: E402
from studio.metadata import Recipe  # noqa: E402
from studio.prompts import parse_prompt  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=True)  # the same examples on every run: CI must not be a lottery

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
RECIPE_KEYS = ["prompt", "negative_prompt", "steps", "guidance", "sampler", "seed", "width", "height", "model",
               "arch", "method", "method_params", "effective", "from_preset", "adapters", "schema", "packages"]


def _one_line(e: BaseException) -> None:
    assert isinstance(e, StudioError), repr(e)
    assert "\n" not in str(e).strip() and str(e)


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_recipe_parser_on_any_text(text):
    try:
        Recipe.from_json(text)
    except Exception as e:  # noqa: BLE001
        _one_line(e)


@FAST
@given(st.dictionaries(st.sampled_from(RECIPE_KEYS), json_values, max_size=len(RECIPE_KEYS)))
def test_recipe_parser_on_any_object(data):
    try:
        Recipe.from_json(json.dumps(data))
    except Exception as e:  # noqa: BLE001
        _one_line(e)


valid_recipes = st.builds(
    dict, prompt=st.text(max_size=50), negative_prompt=st.text(max_size=20), steps=st.integers(1, 500),
    guidance=st.floats(0, 30), sampler=st.sampled_from(["ddim", "euler"]), seed=st.integers(0, 2**32 - 1),
    width=st.integers(1, 64).map(lambda n: 8 * n), height=st.integers(1, 64).map(lambda n: 8 * n),
    model=st.sampled_from(["toy-sd", "tiny-random-sd1", "owner/model"]), arch=st.sampled_from(["sd1", "toy"]),
    method=st.sampled_from(["merge", "switch"]),
    method_params=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                                  st.integers(-100, 100) | st.floats(-10, 10) | st.text(max_size=5), max_size=3),
)


@FAST
@given(valid_recipes)
def test_valid_recipes_round_trip(data):
    if any(ord(c) < 32 for c in data["prompt"] + data["negative_prompt"]):
        return
    recipe = Recipe.from_json(json.dumps(data))
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert recipe.steps == data["steps"] and recipe.width == data["width"]


@FAST
@given(st.text(max_size=120) | st.builds(lambda a, w, b: f"{a}<lora:{w}>{b}", st.text(max_size=10),
                                           st.text(max_size=20), st.text(max_size=10)))
def test_prompt_parser(prompt):
    try:
        text, tags = parse_prompt(prompt)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        return
    assert "<lora:" not in text.lower() or ">" not in text.split("<lora:", 1)[-1].lower()
    for tag in tags:
        assert math.isfinite(tag.te) and math.isfinite(tag.unet) and tag.name


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_tag_weights_are_finite_or_refused(w):
    try:
        _, tags = parse_prompt(f"x <lora:a:{w!r}>")
    except StudioError:
        assert not math.isfinite(w)
        return
    assert tags[0].te == w


SUITE_KEYS = ["steps", "guidance", "size", "samples", "prompts", "methods", "metrics", "weights", "adapters",
              "base_seed", "oracle", "name", "sampler"]


@FAST
@given(st.dictionaries(st.sampled_from(SUITE_KEYS), json_values, max_size=6))
def test_suite_loader(tmp_path_factory, data):
    import yaml

    from studio.evaluation import load_suite

    path = tmp_path_factory.mktemp("suite") / "s.yaml"
    data = {k: (v if not (isinstance(v, float) and math.isnan(v)) else float("nan")) for k, v in data.items()}
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_suite(path)
    except Exception as e:  # noqa: BLE001
        _one_line(e)


@FAST
@given(st.binary(max_size=64), st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=80)),
       st.booleans())
def test_safetensors_header_reader(tmp_path_factory, tail, header, honest_length):
    from studio.adapters.formats import read_adapter

    path = tmp_path_factory.mktemp("st") / "a.safetensors"
    length = len(header) if honest_length else struct.unpack("<Q", (tail + b"\0" * 8)[:8])[0]
    path.write_bytes(struct.pack("<Q", length) + header + tail)
    try:
        read_adapter(path)
    except Exception as e:  # noqa: BLE001
        _one_line(e)


@FAST
@given(st.dictionaries(st.text(max_size=30), st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "F8_E4M3", "F64", "X"]),
     "shape": st.lists(st.integers(-1, 5), max_size=4),
     "data_offsets": st.lists(st.integers(-5, 200), min_size=0, max_size=3)}), max_size=3))
def test_safetensors_structured_headers(tmp_path_factory, header):
    from studio.adapters.formats import read_adapter

    path = tmp_path_factory.mktemp("st") / "a.safetensors"
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 200)
    try:
        read_adapter(path)
    except Exception as e:  # noqa: BLE001
        _one_line(e)


@FAST
@given(st.data())
def test_triggers_go_in_before_their_concepts_and_every_span_follows(data):
    """CLoRA's branch prompts (``studio.prompts._with_triggers``): for any words, concept spans and set of
    active concepts, each active concept's span is its trigger then its words (a bare trigger alone), every
    other span still holds its words, and removing the triggers gives the base words back."""
    from studio.prompts import _with_triggers

    n = data.draw(st.integers(1, 4))
    lengths = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    gaps = data.draw(st.lists(st.integers(0, 2), min_size=n + 1, max_size=n + 1))
    base, spans = [], []
    for k in range(n):
        base += [f"w{len(base) + i}" for i in range(gaps[k])]
        spans.append([len(base), len(base) + lengths[k]])
        base += [f"c{k}_{i}" for i in range(lengths[k])]
    base += [f"w{len(base) + i}" for i in range(gaps[n])]
    triggers = [[f"t{k}_{i}" for i in range(data.draw(st.integers(1, 2)))] for k in range(n)]
    bare = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    active = set(data.draw(st.lists(st.integers(0, n - 1), max_size=n)))
    words, out = _with_triggers(base, spans, triggers, bare, active)
    for k, (s0, s1) in enumerate(out):
        concept = base[spans[k][0]:spans[k][1]]
        if k in active:
            assert words[s0:s1] == triggers[k] + ([] if bare[k] else concept)
        else:
            assert words[s0:s1] == concept
    restored = [w for w in words if not w.startswith("t")]
    dropped = {j for k in active if bare[k] for j in range(*spans[k])}
    assert restored == [w for j, w in enumerate(base) if j not in dropped]
