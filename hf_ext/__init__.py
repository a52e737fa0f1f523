"""hf_ext: research techniques from Scientific Spaces (kexue.fm) as first-class transformers/PEFT/diffusers parts.

``import hf_ext`` checks the installed library versions, then registers every integration (see `hf_ext.registry`);
after that everything is used through the ordinary Auto classes, Trainer, PEFT and diffusers APIs.
"""

from ._import_noise import without_optional_kernel_notice
from ._versions import check_versions

check_versions()

with without_optional_kernel_notice():
    from .models.hfext import HfExtConfig, HfExtForCausalLM, HfExtModel, HfExtPreTrainedModel, HfExtProcessor  # noqa: E402
    from .registry import register  # noqa: E402
    from . import convert, hub, losses, ops, optim, schedulers  # noqa: E402
    from .attention import rerope_config  # noqa: E402
    from .kv_cache import kv_cache_bytes_per_token  # noqa: E402

    register()

__version__ = "0.1.0"

__all__ = ["HfExtConfig", "HfExtModel", "HfExtForCausalLM", "HfExtPreTrainedModel", "HfExtProcessor", "register",
           "rerope_config", "kv_cache_bytes_per_token", "convert", "hub", "losses", "ops", "optim", "schedulers",
           "__version__"]
