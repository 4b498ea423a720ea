"""The person-labelled judge check: its labels file is well formed and its counting is right."""

import json

import pytest
from PIL import Image

from studio.toyworld.judgecheck import LABELS, MARKS, Tally, load_labels, tally
from studio.toyworld.concepts import RESERVED_WORDS


def test_shipped_labels_name_existing_images_reserved_concepts_and_known_marks():
    folder, items = load_labels(LABELS)
    assert len(items) >= 200
    assert len({it["file"] for it in items}) == len(items)
    for it in items:
        with Image.open(folder / it["file"]) as im:
            assert im.size == (64, 64)
        assert it["labels"] and set(it["labels"]) <= RESERVED_WORDS
        assert set(it["labels"].values()) <= set(MARKS)
    clear = [m for it in items for m in it["labels"].values() if m != "?"]
    assert clear.count("Y") >= 50 and clear.count("N") >= 50  # both kinds of error can be measured
    _, held_out = load_labels(LABELS, group="b")  # labelled after the oracles it tests were trained
    assert 100 <= len(held_out) < len(items) and all(it["group"] == "b" for it in held_out)
    with pytest.raises(ValueError, match="its groups: a, b, c, d"):
        load_labels(LABELS, group="z")


def test_tally_counts_verdicts_by_the_persons_label():
    items = [{"labels": {"plus": "Y"}}, {"labels": {"plus": "N"}}, {"labels": {"plus": "N", "sky": "?"}},
             {"labels": {"sky": "Y"}}]
    preds = [{"plus"}, {"plus"}, {"sky"}, set()]
    t = tally(preds, items, lambda pred, concept: concept in pred)
    assert (t["plus"].said, t["plus"].of) == ({"Y": 1, "N": 1, "?": 0}, {"Y": 1, "N": 2, "?": 0})
    assert (t["sky"].said, t["sky"].of) == ({"Y": 0, "N": 0, "?": 1}, {"Y": 1, "N": 0, "?": 1})
    pooled = Tally()
    for x in t.values():
        pooled += x
    assert pooled.of == {"Y": 2, "N": 2, "?": 1} and pooled.said == {"Y": 1, "N": 1, "?": 1}


def test_a_mark_other_than_y_n_or_question_is_refused(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"images": [{"file": "a.png", "labels": {"plus": "yes"}}]}))
    with pytest.raises(ValueError, match="one of Y, N, \\?"):
        load_labels(tmp_path / "labels.json")
    with pytest.raises(FileNotFoundError, match="--labels"):
        load_labels(tmp_path / "missing.json")
