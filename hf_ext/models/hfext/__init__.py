from .configuration_hfext import HfExtConfig
from .modeling_hfext import HfExtForCausalLM, HfExtModel, HfExtPreTrainedModel
from .processing_hfext import HfExtProcessor

__all__ = ["HfExtConfig", "HfExtModel", "HfExtForCausalLM", "HfExtPreTrainedModel", "HfExtProcessor"]
