"""The composition tables: Wilson intervals, per-form rates, oracle agreement, overlap notes."""

import json

import pytest

from studio.composition_report import _wrap, main, markdown, wilson


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 48)[0] == 0.0 and wilson(0, 48)[1] == pytest.approx(0.0741, abs=1e-4)
    assert wilson(48, 48)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)


def _row(method, set_id, pid, a, b, present, secs=0.5, calls=50):
    return {"method_label": method, "loraset_id": set_id, "prompt_id": pid,
            "timing": {"seconds": secs, "unet_calls": calls},
            "metrics": {"oracle": {"all_present": a, "all_present_b": b, "agree": a == b,
                                   "present": present, "present_b": present}}}


def test_tables_report_rates_forms_agreement_and_overlap(tmp_path, capsys):
    rows = []
    for i in range(30):
        form = ("sentence", "tags", "and")[i % 3]
        rows.append(_row("merge", "obj+bg", f"ob-{form}", i < 27, i < 25, {"crescent": i < 28, "sky": i < 27}))
        rows.append(_row("lego", "obj+bg", f"ob-{form}", i < 3, i < 3, {"crescent": i < 3, "sky": True}, secs=0.2))
        rows.append(_row("switch", "obj+bg", f"ob-{form}", i < 25, i < 25, {"crescent": i < 25, "sky": True}))
    text = markdown(rows)
    assert "| merge | 30 | 0.90 [0.74, 0.97] |" in text
    assert "| lego | 30 | 0.10 [0.03, 0.26] |" in text
    assert "all present, tags form" in text
    assert "best: **merge**; not separable from it (intervals overlap): switch; below it: lego" in text
    # oracle B and agreement columns
    line = next(x for x in text.splitlines() if x.startswith("| merge | 30"))
    assert "0.83 [" in line and "| 0.93 |" in line
    run = tmp_path / "run"
    run.mkdir()
    from PIL import Image

    (run / "images").mkdir()
    for k, r in enumerate(rows):
        r["sample_idx"], r["image"] = k // 3, f"images/{k}.png"
        Image.new("RGB", (64, 64), (k, 0, 0)).save(run / r["image"])
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(run), "--markdown", str(tmp_path / "t.md"), "--grid", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "t.md").read_text().strip() == text.strip()
    with Image.open(tmp_path / "g.png") as g:  # one set down, three methods across, sample 0 of the sentence form
        assert g.size == (150 + 3 * 128, 20 + 128)
        assert g.getpixel((150 + 64, 20 + 64)) == (0, 0, 0) and g.getpixel((150 + 128 + 64, 20 + 64)) == (1, 0, 0)


def test_long_method_labels_wrap_under_their_column():
    """A grid header as long as "clora(step_size=5.0)[plus=1.25] cfg 5" breaks before its parts, not over
    the next column."""
    width = lambda t: 6 * len(t)  # noqa: E731 (PIL's default font: 6 px a character)
    assert _wrap("clora(step_size=5.0)[plus=1.25] cfg 5", width, 120) == ["clora(step_size=5.0)", "[plus=1.25] cfg 5"]
    assert _wrap("composite[plus=1.25] cfg 7.5", width, 120) == ["composite[plus=1.25]", "cfg 7.5"]
    assert _wrap("merge", width, 120) == ["merge"]


def test_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "results.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "results.jsonl").write_text(json.dumps({"metrics": {}}) + "\n")
    assert main([str(tmp_path)]) == 2
    assert "metrics: [oracle]" in capsys.readouterr().err
