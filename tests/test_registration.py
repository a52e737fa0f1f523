"""`import hf_ext`: one registry, idempotent, offline, with a clear error for unsupported library versions."""

import os
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_ext
from hf_ext import _versions


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
        print("warnings:", [str(w.message) for w in caught])
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


def test_unsupported_version_fails_with_the_supported_range(monkeypatch):
    monkeypatch.delenv("HF_EXT_SKIP_VERSION_CHECK", raising=False)
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda name: "4.57.1" if name == "transformers" else real(name))
    with pytest.raises(ImportError, match=r"transformers 4\.57\.1 is installed, hf_ext supports transformers>=5\.23,<5\.24"):
        _versions.check_versions()


def test_installed_versions_pass_the_check():
    _versions.check_versions()
