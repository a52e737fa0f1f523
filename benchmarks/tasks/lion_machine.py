"""What the machine offers a Lion step, measured beside it: reference copy and in-place-add bandwidth, and the
fused Lion kernel's first-call (compile) time in fresh processes."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BYTES_PER_ELEMENT = 4  # fp32


def reference_bandwidth(numel: int, repeats: int) -> dict:
    """Two reference kernels on fp32 tensors of ``numel`` elements, interleaved, ``repeats`` calls each.

    * ``copy``: ``dst.copy_(src)``, counted as 2 × bytes / time (the machine's copy bandwidth);
    * ``inplace_add``: ``dst.add_(src)``, counted as 3 × bytes / time. An in-place update writes lines it has just
      read, while a copy's destination lines are read into the cache before being overwritten (write-allocate),
      so a copy moves ~3 × bytes for the 2 × counted, and in-place kernels such as the optimizers' can exceed it.
    """
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)  # touch every page first
    seconds = {"copy": [], "inplace_add": []}
    kernels = {"copy": lambda: dst.copy_(src), "inplace_add": lambda: dst.add_(src)}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            kernel()
            seconds[name].append(time.perf_counter() - start)
    counted = {"copy": 2, "inplace_add": 3}
    return {name: {"seconds": values, "median_seconds": statistics.median(values),
                   "counted_bytes": counted[name] * numel * BYTES_PER_ELEMENT,
                   "bytes_per_second": counted[name] * numel * BYTES_PER_ELEMENT / statistics.median(values)}
            for name, values in seconds.items()} | {"numel": numel}


def pooled_bandwidth(runs: list[dict], name: str) -> float:
    """Counted bytes / median over every run's calls of the reference kernel ``name``."""
    median = statistics.median(s for run in runs for s in run[name]["seconds"])
    return runs[0][name]["counted_bytes"] / median


_COMPILE_PROBE = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from hf_ext.ops.lion import lion_update_fused
n = 1 << 20
param, grad, momentum = torch.randn(n), torch.randn(n), torch.zeros(n)
seconds = []
for _ in range(3):
    start = time.perf_counter()
    lion_update_fused([param], [grad], [momentum], 1e-4, 0.9, 0.99, 0.1)
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def cold_compile(threads: int) -> dict:
    """First-call times of the fused kernel in fresh processes, for each of its forms: ``c_kernel`` (float32 on the
    CPU; built by the system C compiler in each process) and ``torch_compile`` (the form CUDA and other dtypes use,
    forced here with ``HF_EXT_NATIVE_KERNELS=0``; two processes share a new, empty inductor cache)."""
    forms = {}
    for form, native_setting in (("c_kernel", "1"), ("torch_compile", "0")):
        with tempfile.TemporaryDirectory(prefix="hf_ext_lion_inductor_") as cache:
            environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, HF_EXT_NATIVE_KERNELS=native_setting)
            runs = {}
            for label in ("empty_cache", "filled_cache"):
                start = time.perf_counter()
                completed = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, str(threads)], env=environment,
                                           capture_output=True, text=True, timeout=600)
                wall = time.perf_counter() - start
                if completed.returncode != 0:
                    return {"error": completed.stderr[-2000:]}
                seconds = json.loads(completed.stdout.strip().splitlines()[-1])
                runs[label] = {"first_call_seconds": seconds[0], "later_call_seconds": seconds[1:],
                               "compile_seconds": seconds[0] - min(seconds[1:]), "process_wall_seconds": wall}
        forms[form] = runs
    forms["method"] = ("lion_update_fused on one 2^20-element float32 CPU tensor in a fresh Python process with "
                       "TORCHINDUCTOR_CACHE_DIR set to a new temporary directory; compile_seconds = first call - "
                       "fastest later call; the second process reuses the directory the first one filled (the C "
                       "kernel is rebuilt in every process: it has no disk cache)")
    return forms
