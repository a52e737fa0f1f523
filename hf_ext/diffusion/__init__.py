"""Rectified flow with diffusers models: training from data, reflow, distillation, sampling and straightness.

    from hf_ext.diffusion import (FlowTrainingArguments, train_rectified_flow, generate_reflow_pairs, train_reflow,
                                  distill, solve_flow, straightness)

Works with `UNet2DModel` (and other diffusers models whose output has ``.sample``) or any callable velocity model;
the time input is σ·num_train_timesteps, so trained models sample with `hf_ext.schedulers.ReFlowScheduler` or
diffusers' FlowMatchEulerDiscreteScheduler.
"""

from .pairs import ReflowPairs, generate_reflow_pairs
from .sampling import FlowSolution, predict_velocity, solve_flow, straightness
from .training import (FlowTrainingArguments, FlowTrainingResult, distill, rectified_flow_loss, train_reflow,
                       train_rectified_flow)

__all__ = [
    "FlowTrainingArguments", "FlowTrainingResult", "train_rectified_flow", "train_reflow", "distill",
    "rectified_flow_loss", "ReflowPairs", "generate_reflow_pairs", "solve_flow", "FlowSolution", "straightness",
    "predict_velocity",
]
