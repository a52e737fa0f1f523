"""The README's diffusers snippets run as written (in a scratch folder)."""

import pytest

from readme_snippets import run_readme_snippet


@pytest.mark.parametrize("heading", ["diffusers: ReFlow and UDM schedulers",
                                     "diffusers: rectified flow, reflow and distillation"])
def test_readme_snippet_runs(heading, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_readme_snippet(heading)
    if "reflow" in namespace:
        assert type(namespace["pipe"].scheduler).__name__ == "UDMScheduler"
        assert namespace["reflow"].config.shift == 3.0 and namespace["reflow"].order == 2
    else:
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in printed[-3:]] == ["1-RF", "2-RF", "2-RF"]
        assert (tmp_path / "rf1" / "checkpoint-1000").is_dir()
