"""Error messages shared by hf_ext's schedulers: each names the argument, the value and what is allowed.

Numbers go through hf_ext's shared `check_number` / `check_integer`. `check_choice` keeps the schedulers' own
wording (``prediction_type='x0' is not supported; choose one of …``), which callers and tests already match.
"""

import numpy as np
import torch


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


def check_decreasing(name: str, values) -> np.ndarray:
    """Custom ``sigmas`` or ``timesteps`` as a float64 array: a non-empty 1-D list of finite numbers, strictly
    decreasing (a sampler goes from noise towards data). The error names the first offending position."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list, got shape {array.shape}")
    if len(array) == 0:
        raise ValueError(f"{name} is empty: pass at least one value")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name} must be finite, got {name}[{bad[0]}] = {array[bad[0]]}")
    rising = np.flatnonzero(np.diff(array) >= 0)
    if len(rising):
        i = rising[0] + 1
        raise ValueError(f"{name} must be strictly decreasing (from noise towards data), got {name}[{i}] = "
                         f"{array[i]:g} after {name}[{i - 1}] = {array[i - 1]:g}")
    return array


def timestep_not_in_schedule_error(timestep, schedule: torch.Tensor) -> ValueError:
    shown = ", ".join(f"{t:g}" for t in schedule[:8].tolist()) + (", …" if len(schedule) > 8 else "")
    value = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
    return ValueError(f"timestep {value} is not in the schedule set by set_timesteps() ({shown}); "
                      "pass one of scheduler.timesteps")
