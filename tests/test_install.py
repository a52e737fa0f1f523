"""Installing hf_ext beside a user's stack changes none of it (pip's own resolver, asked for a dry run)."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
USER_STACK = ("torch", "transformers", "peft", "diffusers", "accelerate", "datasets", "huggingface_hub", "trl")


def test_pip_install_changes_none_of_the_installed_stack(tmp_path):
    if not (REPOSITORY / "pyproject.toml").is_file():
        pytest.skip("not a checkout: no pyproject.toml to install")
    try:
        installed = {name: metadata.version(name) for name in USER_STACK}
    except metadata.PackageNotFoundError as missing:
        # TRL needs Python >= 3.11, so the test extras leave it out on 3.10 (CI's oldest lane)
        pytest.skip(f"{missing}: the check needs the whole stack, TRL included")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--editable", f"{REPOSITORY}[quant]"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    would_install = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                     for item in json.loads(report.read_text())["install"]}
    touched = {name: (installed[name], would_install[key]) for name in USER_STACK
               if (key := name.lower().replace("_", "-")) in would_install}
    assert touched == {}, f"pip would replace (installed, new): {touched}"
    assert "hf-ext" in would_install


def test_import_prints_nothing():
    # With bitsandbytes installed on a CPU with AVX512-BF16, importing peft logs a warning about an optional Hub kernel;
    # `import hf_ext` imports peft, and must stay silent all the same.
    completed = subprocess.run([sys.executable, "-c", "import hf_ext"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0
    assert (completed.stdout, completed.stderr) == ("", "")
