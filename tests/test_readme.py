"""The README's Python API and CLI blocks run as written (from a folder that holds the repository's assets/)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "assets").symlink_to(REPO / "assets")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert (tmp_path / "out.png").is_file()
    assert len(scope["result"].images) == 1
    assert (scope["pick"].method, scope["pick"].params) == ("clora", {"step_size": 5.0})


def test_readme_cli_block_runs(tmp_path, monkeypatch, capsys):
    """Every line of the README's CLI block exits 0; the reproduced image has the same bytes."""
    import shlex

    from studio.cli import main

    text = (REPO / "README.md").read_text()
    section = text[text.index("## CLI"):]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    (tmp_path / "assets").symlink_to(REPO / "assets")
    monkeypatch.chdir(tmp_path)
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(argv[0] == "studio" for argv in lines)
    for argv in lines:
        try:
            code = main(argv[1:])
        except SystemExit as e:  # --version exits through argparse
            code = e.code
        assert code == 0, (argv, capsys.readouterr().err)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert len(list((tmp_path / "outdir").glob("*.png"))) == 9  # 1 + 8, numbered on
