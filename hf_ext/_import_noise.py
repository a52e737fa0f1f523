"""Keep ``import hf_ext`` silent.

Registering our PEFT methods imports peft, which imports bitsandbytes when it is installed. On CPUs with AVX512-BF16,
bitsandbytes then looks for an optional 4-bit CPU kernel on the Hub (through the `kernels` package) and, when it cannot
load it (offline, or an unverified repository), both libraries log warnings at import time. bitsandbytes' own 4-bit
CPU path still works (`tests/test_lora_ga_integration.py` initialises a 4-bit base on the CPU). We drop the messages
about that one lookup while *our* import runs; anything else these loggers say, and the same messages when a user
imports bitsandbytes before hf_ext, are left alone.
"""

from __future__ import annotations

import contextlib
import logging

_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
_OPTIONAL_KERNEL = "kernels-community/quantization-bitsandbytes"
_OPTIONAL_KERNEL_FAILURE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _is_not_about_the_optional_kernel(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return _OPTIONAL_KERNEL not in message and not message.startswith(_OPTIONAL_KERNEL_FAILURE)


@contextlib.contextmanager
def without_optional_kernel_notice():
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(_is_not_about_the_optional_kernel)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_is_not_about_the_optional_kernel)
