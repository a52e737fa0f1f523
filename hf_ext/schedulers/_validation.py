"""Error messages shared by hf_ext's schedulers: each names the argument, the value and what is allowed."""

import torch


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


def timestep_not_in_schedule_error(timestep, schedule: torch.Tensor) -> ValueError:
    shown = ", ".join(f"{t:g}" for t in schedule[:8].tolist()) + (", …" if len(schedule) > 8 else "")
    value = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
    return ValueError(f"timestep {value} is not in the schedule set by set_timesteps() ({shown}); "
                      "pass one of scheduler.timesteps")
