"""The README's diffusers snippets run as written (in a scratch folder)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(heading: str) -> str:
    section = README.read_text().split(f"### {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("heading", ["diffusers: ReFlow and UDM schedulers",
                                     "diffusers: rectified flow, reflow and distillation"])
def test_readme_snippet_runs(heading, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet(heading), f"README: {heading}", "exec"), namespace)
    if "reflow" in namespace:
        assert type(namespace["pipe"].scheduler).__name__ == "UDMScheduler"
        assert namespace["reflow"].config.shift == 3.0 and namespace["reflow"].order == 2
    else:
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in printed[-3:]] == ["1-RF", "2-RF", "2-RF"]
        assert (tmp_path / "rf1" / "checkpoint-1000").is_dir()
