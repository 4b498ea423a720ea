"""The studio CLI: generate reproduces from metadata; user errors exit 2 without writing."""

from __future__ import annotations

import pytest

from studio.cli import main


def test_generate_and_reproduce_exactly(tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--seed", "3", "--out", str(out)]) == 0
    again = tmp_path / "b.png"
    assert main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps"),
        (["--size", "63x64"], "multiple of 8"),
        (["--guidance", "-2"], "guidance"),
        (["--lora", "/nonexistent/x.safetensors"], "x.safetensors"),
        (["--method", "nope"], "choose one of"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "o.png"
    code = main(["generate", "--prompt", "a red circle", "--steps", "2", "--out", str(out)] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
