"""`import hf_ext`: one registry, idempotent, offline, with a clear error for unsupported library versions."""

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_ext
from hf_ext import _versions

pytestmark = pytest.mark.smoke


def _run(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="0")  # prove offline-ness by blocking sockets, not by the flag
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_register_again_changes_nothing():
    before = (dict(CONFIG_MAPPING._extra_content), AutoConfig.for_model("hf_ext").__class__)
    hf_ext.register()
    hf_ext.register()
    assert (dict(CONFIG_MAPPING._extra_content), AutoConfig.for_model("hf_ext").__class__) == before


def test_import_twice_and_register_again_warn_about_nothing():
    result = _run(
        """
        import importlib, logging, warnings
        import transformers  # import the libraries first: their own import-time warnings are not ours
        import peft, diffusers
        logging.basicConfig(level=logging.WARNING)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_ext
            importlib.reload(hf_ext)
            hf_ext.register()
        # a release newer than CI has run is worth its one warning; nothing else may warn
        print("warnings:", [str(w.message) for w in caught if type(w.message).__name__ != "UntestedVersionWarning"])
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warnings: []" in result.stdout, result.stdout
    assert "WARNING" not in result.stderr, result.stderr[-2000:]


def test_import_opens_no_network_connection():
    result = _run(
        """
        import socket
        def refuse(*args, **kwargs):
            raise AssertionError(f"network access during import: {args}")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import hf_ext
        print("ok", hf_ext.__version__)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def _pretend_installed(monkeypatch, package: str, version: str) -> None:
    monkeypatch.delenv("HF_EXT_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(_versions, "_warned", set())
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda name: version if name == package else real(name))


def test_a_version_below_the_minimum_fails_naming_package_version_and_minimum(monkeypatch):
    _pretend_installed(monkeypatch, "transformers", "4.57.1")
    minimum = _versions.SUPPORTED_VERSIONS["transformers"].minimum
    with pytest.raises(ImportError, match=rf"transformers 4\.57\.1 is installed, hf_ext needs transformers>={minimum}"):
        _versions.check_versions()


def test_a_missing_dependency_is_named(monkeypatch):
    _pretend_installed(monkeypatch, "diffusers", None)
    with pytest.raises(ImportError, match=r"diffusers \(not installed\) is installed, hf_ext needs diffusers>="):
        _versions.check_versions()


def test_a_newer_release_than_tested_warns_once_and_imports(monkeypatch):
    newest = _versions.SUPPORTED_VERSIONS["torch"].newest_tested
    major, minor = (int(part) for part in newest.split(".")[:2])
    _pretend_installed(monkeypatch, "torch", f"{major}.{minor + 1}.0+cu130")
    with pytest.warns(_versions.UntestedVersionWarning, match=rf"torch {major}\.{minor + 1}\.0\+cu130 is newer than"):
        _versions.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second check in the same process says nothing
        _versions.check_versions()


def test_pre_releases_and_local_builds_count_as_their_release(monkeypatch):
    minimum = _versions.SUPPORTED_VERSIONS["transformers"].minimum
    _pretend_installed(monkeypatch, "transformers", f"{minimum}.0.dev0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _versions.check_versions()


def test_pyproject_lower_bounds_are_the_checked_minimums():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a checkout: pyproject.toml is not next to the tests")
    declared = dict(re.findall(r'^\s*"([A-Za-z_]+)>=([0-9.]+)",?$', pyproject.read_text(), flags=re.M))
    for package, supported in _versions.SUPPORTED_VERSIONS.items():
        assert declared.get(package) == supported.minimum, package


def test_installed_versions_pass_the_check():
    _versions.check_versions()
