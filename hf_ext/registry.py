"""Every registration hf_ext makes with transformers / PEFT / diffusers, in one place.

`register()` is called by ``import hf_ext`` and is idempotent: a second call (or a second import) changes nothing
and logs nothing. It only touches in-process registries; nothing here reads the network or the disk.
Later capabilities add their registrations to `register()` and their names to the lists below.
"""

from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTENTION_FUNCTIONS
from .models.hfext import HfExtConfig, HfExtForCausalLM, HfExtModel, HfExtProcessor

# name -> (attention function, mask function): the `attn_implementation` values hf_ext adds to transformers.
ATTENTION_IMPLEMENTATIONS: dict[str, tuple] = dict(ATTENTION_FUNCTIONS)

_registered = False


def register() -> None:
    """Register hf_ext's model family and attention implementations with transformers (safe to call again)."""
    global _registered
    if _registered:
        return
    _register_model_family()
    _register_peft_methods()
    for name, (attention_fn, mask_fn) in ATTENTION_IMPLEMENTATIONS.items():
        # Both maps are needed: an attention function without a mask entry receives attention_mask=None.
        AttentionInterface.register(name, attention_fn)
        AttentionMaskInterface.register(name, mask_fn)
    _registered = True


def _register_model_family() -> None:
    from .hub import push_with_model_card

    AutoConfig.register(HfExtConfig.model_type, HfExtConfig, exist_ok=True)
    AutoModel.register(HfExtConfig, HfExtModel, exist_ok=True)
    AutoModelForCausalLM.register(HfExtConfig, HfExtForCausalLM, exist_ok=True)
    # save_pretrained then copies the model code next to the weights and writes `auto_map`, so that a checkpoint
    # loads with trust_remote_code=True where hf_ext is not installed.
    HfExtConfig.register_for_auto_class()
    HfExtModel.register_for_auto_class("AutoModel")
    HfExtForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    # Image-text models: AutoProcessor finds the processor by its class name in processor_config.json.
    AutoProcessor.register(HfExtConfig, HfExtProcessor, exist_ok=True)
    HfExtProcessor.register_for_auto_class("AutoProcessor")
    HfExtForCausalLM.hub_publisher = push_with_model_card  # the card template describes a causal LM


def _register_peft_methods() -> None:
    # peft.utils.register_peft_method refuses names outside its closed PeftType enum; the four public mappings
    # keyed by the string peft_type are what get_peft_model / PeftModel.from_pretrained look up.
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from .peft.gradient_view import PEFT_TYPE, GradientViewLoraConfig, GradientViewLoraModel

    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = GradientViewLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = GradientViewLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = GradientViewLoraModel.prefix


def registered_summary() -> dict[str, list[str]]:
    """What `register()` added, for `hf-ext info`."""
    return {
        "model_types": [HfExtConfig.model_type],
        "auto_classes": ["AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoProcessor"],
        "attention_implementations": sorted(ATTENTION_IMPLEMENTATIONS),
        "peft_types": ["HFX_GRADIENT_VIEW_LORA"],
        # diffusers needs no registry: a saved pipeline names the module, which `import hf_ext` has imported.
        "diffusers_schedulers": ["hf_ext.schedulers.ReFlowScheduler", "hf_ext.schedulers.UDMScheduler"],
    }
