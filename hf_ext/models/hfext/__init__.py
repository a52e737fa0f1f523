from .configuration_hfext import HfExtConfig
from .modeling_hfext import HfExtForCausalLM, HfExtModel, HfExtPreTrainedModel

__all__ = ["HfExtConfig", "HfExtModel", "HfExtForCausalLM", "HfExtPreTrainedModel"]
