"""Blind labelling sheets: a seeded shuffle without verdicts, and labels appended to the judge check as a group."""

import json

import pytest
from PIL import Image

from studio.toyworld.judgecheck import load_labels
from studio.toyworld.labelsheet import LabelSheetError, add_group, main, select_rows, write_sheets


def _run(folder, n, method="merge", set_id="object+style", shade=0):
    """A finished-run folder of ``n`` 64x64 images with results.jsonl rows like `studio eval` writes."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "results.jsonl", "w") as f:
        for i in range(n):
            name = f"images/{method}-{i}.png"
            Image.new("RGB", (64, 64), (shade + 10 * i, 0, 0)).save(folder / name)
            f.write(json.dumps({"job_id": f"{method}{i}", "image": name, "loraset_id": set_id, "method_label": method,
                                "prompt_id": f"os-{i}", "metrics": {"oracle": {"present": {"glow": True, "crescent": False},
                                                                               "all_present": False}}}) + "\n")
    return folder


def test_labels_are_asked_for_the_concepts_the_adapters_teach(tmp_path):
    """A suite may name an adapter "ship" for the crescent it teaches: the sheet asks about the crescent, the word the
    oracles judge, and a name that is no toy-world concept is refused when the labels are added."""
    run = _run(tmp_path / "a", 2)
    (run / "config.resolved.yaml").write_text("adapters:\n  glow: {name: glow, concept: glow}\n"
                                              "  crescent: {name: crescent, concept: plus}\n")
    assert select_rows([run], "object+style")[0]["concepts"] == ["glow", "plus"]
    (run / "config.resolved.yaml").write_text("adapters:\n  glow: {name: glow, concept: sunburst}\n")
    key = write_sheets(select_rows([run], "object+style"), tmp_path / "s", seed=0)
    assert key[0]["concepts"] == ["crescent", "sunburst"]  # an adapter the suite names without a concept stands for itself
    (tmp_path / "s" / "labels.txt").write_text("0 crescent=Y sunburst=N\n1 crescent=Y sunburst=N\n")
    labels = _judge_check(tmp_path)
    with pytest.raises(LabelSheetError, match="'sunburst', which is not a toy-world concept"):
        add_group(tmp_path / "s", "g", "test", labels)


def _judge_check(tmp_path):
    labels = tmp_path / "jc" / "labels.json"
    (labels.parent / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(labels.parent / "images" / "a-0.png")
    labels.write_text(json.dumps({"about": "test", "groups": {"a": "first"},
                                  "images": [{"file": "a-0.png", "labels": {"plus": "Y"}, "group": "a"}]}))
    return labels


def test_sheets_mix_runs_in_a_seeded_order_and_show_only_an_index(tmp_path):
    a = _run(tmp_path / "a", 5)
    b = _run(tmp_path / "b", 4, method="composite", shade=100)
    _run(tmp_path / "c", 3, set_id="object+object")
    rows = select_rows([a, b, tmp_path / "c"], "object+style")
    assert len(rows) == 9  # the other set is left out
    assert len(select_rows([a, b], "object+style", methods=["merge"])) == 5
    assert len(select_rows([a, b], "object+style", methods=["merge", "comp"])) == 9
    key = write_sheets(rows, tmp_path / "s1", seed=7)
    again = write_sheets(rows, tmp_path / "s2", seed=7)
    other = write_sheets(rows, tmp_path / "s3", seed=8)
    assert [k["job_id"] for k in key] == [k["job_id"] for k in again] != [k["job_id"] for k in other]
    assert {k["method"] for k in key[:9]} == {"merge", "composite"}
    assert json.loads((tmp_path / "s1" / "key.json").read_text()) == key
    lines = (tmp_path / "s1" / "labels.txt").read_text().splitlines()
    assert lines[1:] == [f"{i} crescent=? glow=?" for i in range(9)]
    with Image.open(tmp_path / "s1" / "sheet-0.png") as sheet:
        assert sheet.width == 6 * 180 and sheet.height == 2 * 190  # 9 tiles: two rows of six at 176 px
    assert not (tmp_path / "s1" / "sheet-1.png").exists()
    with pytest.raises(LabelSheetError, match="already holds a key.json"):
        write_sheets(rows, tmp_path / "s1", seed=7)
    with pytest.raises(LabelSheetError, match="no images of set 'object\\+sky'"):
        select_rows([a], "object+sky")
    with pytest.raises(LabelSheetError, match="no results.jsonl"):
        select_rows([tmp_path], "object+style")


def test_labels_join_the_judge_check_as_a_new_group(tmp_path):
    key = write_sheets(select_rows([_run(tmp_path / "a", 3)], "object+style"), tmp_path / "s", seed=1)
    labels = _judge_check(tmp_path)
    marks = ["crescent=Y glow=N", "crescent=? glow=Y", "crescent=N glow=N"]
    (tmp_path / "s" / "labels.txt").write_text("# by eye\n" + "\n".join(f"{i} {m}" for i, m in enumerate(marks)) + "\n")
    assert add_group(tmp_path / "s", "g", "three test images", labels) == 3
    folder, items = load_labels(labels, group="g")
    assert [it["file"] for it in items] == ["g-0.png", "g-1.png", "g-2.png"]
    assert items[1]["labels"] == {"crescent": "?", "glow": "Y"} and items[0]["method"] == "merge"
    for it, k in zip(items, key):
        with Image.open(folder / it["file"]) as copy, Image.open(k["image"]) as original:
            assert copy.tobytes() == original.tobytes()
    assert json.loads(labels.read_text())["groups"]["g"] == "three test images"
    with pytest.raises(LabelSheetError, match="already has a group 'g'"):
        add_group(tmp_path / "s", "g", "again", labels)


@pytest.mark.parametrize("text,match", [
    ("0 crescent=Y glow=N\n1 crescent=Y glow=N\n", "no complete line for image 2"),
    ("0 crescent=Y\n1 crescent=Y glow=N\n2 crescent=Y glow=N\n", "no complete line for image 0"),
    ("0 crescent=yes glow=N\n1 crescent=Y glow=N\n2 crescent=Y glow=N\n", "concept=Y, concept=N or concept=\\?"),
    ("zero crescent=Y glow=N\n", "line 1 starts with 'zero'; each line is an image index"),
])
def test_incomplete_or_unknown_labels_are_refused_and_change_nothing(tmp_path, text, match):
    write_sheets(select_rows([_run(tmp_path / "a", 3)], "object+style"), tmp_path / "s", seed=1)
    labels = _judge_check(tmp_path)
    before = labels.read_text()
    (tmp_path / "s" / "labels.txt").write_text(text)
    with pytest.raises(LabelSheetError, match=match):
        add_group(tmp_path / "s", "g", "test", labels)
    assert labels.read_text() == before and not list((labels.parent / "images").glob("g-*"))


def test_cli_names_the_problem(tmp_path, capsys):
    assert main(["sheets", str(tmp_path), "--set", "object+style", "--out", str(tmp_path / "s")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    _run(tmp_path / "a", 2)
    assert main(["sheets", str(tmp_path / "a"), "--set", "object+style", "--out", str(tmp_path / "s")]) == 0
    assert "2 images on 1 sheet in" in capsys.readouterr().out
