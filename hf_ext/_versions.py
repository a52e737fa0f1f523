"""The library versions hf_ext is tested against, checked once at import.

The ranges here are the same as in ``pyproject.toml``. hf_ext plugs into private-looking corners of transformers
(attention and mask interfaces, cache layer types, rotary init functions), which change between minor releases, so
an untested version fails loudly at import instead of with an obscure AttributeError later.
Set ``HF_EXT_SKIP_VERSION_CHECK=1`` to try an untested version at your own risk.
"""

import os
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_VERSIONS = {
    "torch": ">=2.13,<2.14",
    "transformers": ">=5.23,<5.24",
    "peft": ">=0.21,<0.22",
    "diffusers": ">=0.42,<0.43",
}


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise ``ImportError`` naming the supported range if a core dependency is missing or outside it."""
    if os.environ.get("HF_EXT_SKIP_VERSION_CHECK") == "1":
        return
    problems = []
    for package, supported in SUPPORTED_VERSIONS.items():
        found = installed_version(package)
        # Local version labels (2.13.0+cpu) are not part of the release being checked.
        if found is None or Version(Version(found).base_version) not in SpecifierSet(supported):
            problems.append(f"{package} {found or '(not installed)'} is installed, hf_ext supports {package}{supported}")
    if problems:
        raise ImportError(
            "hf_ext cannot run with the installed libraries:\n  - "
            + "\n  - ".join(problems)
            + "\nInstall a supported version (for example `pip install 'transformers>=5.23,<5.24'`), "
            "or set HF_EXT_SKIP_VERSION_CHECK=1 to try anyway."
        )
