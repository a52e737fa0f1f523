"""Small C kernels of hf_ext (``hf_ext/ops/kernels/*.c``), built at first use with the system C compiler and called
through ctypes.

Why not torch.compile for these: a multi-tensor update whose cost is memory traffic wants one pass over each
tensor and one call for the whole model; inductor emits one call per tensor and cannot fold a reduction (the
non-finite check) into a mutating loop on the CPU, and it compiles for a minute where this takes a fraction of a
second. The C source has no dependency on torch's headers, so it builds with any C compiler that has OpenMP.

A build happens once per process, in a temporary directory that is removed once the library is loaded (the loaded
code stays mapped). ``-march=native`` targets the machine it runs on, as inductor does; nothing is cached on disk.
Set ``HF_EXT_NATIVE_KERNELS=0`` to never build them (the callers then take their torch.compile or foreach paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

KERNEL_DIRECTORY = Path(__file__).with_name("kernels")
DISABLE_VARIABLE = "HF_EXT_NATIVE_KERNELS"
# -ffp-contract=off: only the fmaf() calls fuse a multiply and an add (bit equality with eager torch);
# -fno-trapping-math lets the compiler vectorize the selects (no code here reads floating-point exception flags).
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
_TARGETS = (["-march=native"], ["-mcpu=native"], [])  # x86 and most compilers; AArch64 clang; the compiler's default

_libraries: dict[str, ctypes.CDLL | None] = {}
_failures: dict[str, str] = {}


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else the first of cc, gcc, clang on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off")


@contextlib.contextmanager
def kernels_disabled():
    """Within this block, `load` returns None (as with ``HF_EXT_NATIVE_KERNELS=0``): to time or test the torch forms."""
    previous = os.environ.get(DISABLE_VARIABLE)
    os.environ[DISABLE_VARIABLE] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[DISABLE_VARIABLE]
        else:
            os.environ[DISABLE_VARIABLE] = previous


def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``kernels/<name>.c``, or None where it cannot be built here (the reason is logged and
    kept in `failure`). Built once per process."""
    if disabled():
        return None
    if name not in _libraries:
        try:
            _libraries[name] = _build(KERNEL_DIRECTORY / f"{name}.c")
        except (OSError, subprocess.SubprocessError) as error:
            _libraries[name] = None
            _failures[name] = f"{type(error).__name__}: {error}"
            logger.info("hf_ext: could not build the C kernel %s (%s); using the torch kernels", name, _failures[name])
    return _libraries[name]


def failure(name: str) -> str | None:
    """Why ``load(name)`` returned None, where it tried and failed."""
    return _failures.get(name)


def _build(source: Path) -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc or clang)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="hf_ext_kernel_") as directory:
        output = Path(directory) / f"{source.stem}.so"
        for target in _TARGETS:
            command = [cc, *_FLAGS, *target, str(source), "-o", str(output)]
            completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if completed.returncode == 0:
                logger.info("hf_ext: built the C kernel %s with %s", source.stem, " ".join(command[:-3]))
                return ctypes.CDLL(str(output))  # mapped now: the file may go with the directory
            errors.append((completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1])
    raise OSError(f"{cc} failed: {errors[-1]}")
