"""diffusers schedulers: `ReFlowScheduler` (rectified flow, FlowMatchEuler drop-in) and `UDMScheduler` (DDPM, DDIM
and the probability-flow ODE as one unified-diffusion-model sampler).

Both are ordinary `SchedulerMixin`/`ConfigMixin` classes. A pipeline saved with one records it in model_index.json as
``["hf_ext.schedulers", "<class>"]``; diffusers loads such a component only when the module is already imported, so
``import hf_ext`` before ``DiffusionPipeline.from_pretrained``.
"""

from .scheduling_reflow import ReFlowScheduler, ReFlowSchedulerOutput
from .scheduling_udm import UDMScheduler, UDMSchedulerOutput

__all__ = ["ReFlowScheduler", "ReFlowSchedulerOutput", "UDMScheduler", "UDMSchedulerOutput"]
