"""The library versions hf_ext works with, checked once at import.

Each core dependency has a minimum (the oldest release that has every API hf_ext uses, see `reason`) and the newest
release CI has run (`newest_tested`). The minimums are the lower bounds in ``pyproject.toml`` (a test keeps the two
equal). Below a minimum ``import hf_ext`` raises ImportError naming the package, the installed version and the
range; above the newest tested release it warns once and carries on, because new releases usually work and a
plugin that refuses its users' stack is not a plugin they can use. Where an API moved between supported releases,
the code detects the feature (hasattr / try-import) instead of comparing versions.
Set ``HF_EXT_SKIP_VERSION_CHECK=1`` to skip the check (at your own risk below a minimum).
"""

import os
import warnings
from dataclasses import dataclass
from importlib import metadata

from packaging.version import Version


@dataclass(frozen=True)
class SupportedRange:
    minimum: str
    newest_tested: str
    reason: str  # what the minimum release is the first to have

    def describe(self, package: str) -> str:
        return f"{package}>={self.minimum} (CI runs {self.minimum} and {self.newest_tested})"


SUPPORTED_VERSIONS = {
    "torch": SupportedRange(
        "2.6", "2.14.1",
        "`torch.accelerator` (the device choice of the flow/reflow trainers) first appears in torch 2.6; "
        "transformers' own newest releases need it too"),
    "transformers": SupportedRange(
        "5.15", "5.25.0",
        "its DeepSeek-V2/V3 models cache the compressed latent (what `kv_cache_bytes_per_token` counts and the MLA "
        "conversions are checked against) and DeepSeek-V2 applies YaRN's mscale, both from 5.15; before that also "
        "missing: strict dataclass configs (5.4) and the Hub client `transformers.utils.hub.hf_api` (5.10)"),
    "peft": SupportedRange(
        "0.21", "0.22.0",
        "the first release that saves and loads adapters of PEFT types outside its own `PeftType` enum (it looks "
        "them up in PEFT_TYPE_TO_TUNER_MAPPING, where hf_ext registers its gradient-view LoRA)"),
    "diffusers": SupportedRange(
        "0.36", "0.42.1",
        "the first release whose pipelines import beside transformers 5 (0.35 imports the removed "
        "`transformers.utils.FLAX_WEIGHTS_NAME`)"),
    "accelerate": SupportedRange(
        "1.3", "1.16.0",
        "transformers 5's Trainer calls `Accelerator.unwrap_model(..., keep_torch_compile=...)`, new in 1.3"),
}

_warned: set[str] = set()


class UntestedVersionWarning(UserWarning):
    """A dependency is newer than the newest release hf_ext's CI has run."""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> Version:
    # Local labels (2.13.0+cpu) and pre-releases (5.26.0.dev0) are compared as the release they lead to.
    return Version(Version(version).base_version)


def check_versions() -> None:
    """Raise ``ImportError`` for a core dependency that is missing or older than its minimum; warn (once per
    process and package) for one newer than the newest tested release."""
    if os.environ.get("HF_EXT_SKIP_VERSION_CHECK") == "1":
        return
    problems = []
    for package, supported in SUPPORTED_VERSIONS.items():
        found = installed_version(package)
        if found is None or _release(found) < Version(supported.minimum):
            problems.append(f"{package} {found or '(not installed)'} is installed, hf_ext needs "
                            f"{package}>={supported.minimum}: {supported.reason}")
        elif _release(found) > Version(supported.newest_tested) and package not in _warned:
            _warned.add(package)
            warnings.warn(
                f"{package} {found} is newer than the newest release hf_ext has been tested with "
                f"({supported.newest_tested}); it will probably work. Please report problems. Supported: "
                f"{supported.describe(package)}.",
                UntestedVersionWarning, stacklevel=3)
    if problems:
        raise ImportError(
            "hf_ext cannot run with the installed libraries:\n  - " + "\n  - ".join(problems)
            + "\nUpgrade them (for example `pip install -U 'transformers>="
            + SUPPORTED_VERSIONS["transformers"].minimum + "'`), or set HF_EXT_SKIP_VERSION_CHECK=1 to try anyway."
        )
