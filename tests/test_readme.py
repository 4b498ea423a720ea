"""The README's Python API block runs as written (from a folder that holds the repository's assets/)."""

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
