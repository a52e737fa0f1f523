"""Config of the gradient-view LoRA PEFT method (peft_type ``HFX_GRADIENT_VIEW_LORA``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._validation import check_choice, check_integer, check_number
from ...optim.gradient_view import GRADIENT_VIEW_MODES


class PeftMethodName(str):
    """A PEFT method's name that also answers ``.value``, as the members of PEFT's `PeftType` enum do.

    PEFT's `register_peft_method` accepts only names already in its closed `PeftType` enum, so an outside method's
    ``peft_type`` is a string; PEFT code reads ``config.peft_type.value`` (error messages, `PeftMixedModel`'s
    compatibility check), which a plain string lacks. It is written to ``adapter_config.json`` as a plain string
    and compares equal to one."""

    @property
    def value(self) -> str:
        return str(self)


PEFT_TYPE = PeftMethodName("HFX_GRADIENT_VIEW_LORA")


@dataclass
class GradientViewLoraConfig(PeftConfig):
    """Low-rank training done in the optimizer: target layers get a trainable dense update ΔW (zero at first) that
    only `hf_ext.peft.gradient_view_optimizer` may change, through rank-``r`` factors (`GradientViewLoRA`).

    The saved adapter holds what is trained: the rank-r factors B and A of ΔW = s·B A in modes ``"lora"`` and
    ``"fixed_a"`` (the size of a LoRA adapter of rank r), the dense ΔW in mode ``"resample"`` (its accumulated
    update is high-rank).
    """

    r: int = field(default=8, metadata={"help": "Rank of the factors the optimizer trains."})
    lora_alpha: float = field(default=8, metadata={
        "help": "Scaling s = lora_alpha / r of the low-rank term: finite and > 0 (at 0 nothing would train)."})
    mode: str = field(default="lora", metadata={"help": f"One of {GRADIENT_VIEW_MODES}."})
    resample_every: int = field(default=200, metadata={"help": "Steps between fresh projections (mode 'resample')."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (or a regex) of the Linear modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: ΔW starts at zero (the model starts as the base model). False: a small random ΔW (B drawn "
                "from N(0, 0.02²) in modes 'lora'/'fixed_a', ΔW itself in mode 'resample'), PEFT's convention for "
                "checking that an adapter is applied, saved and merged."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_choice("mode", self.mode, GRADIENT_VIEW_MODES)
        # the wording of r's error predates check_integer (and tests match it); the meaning is the same
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        check_number("lora_alpha", self.lora_alpha, low=0, low_open=True, why="scaling = lora_alpha / r")
        check_integer("resample_every", self.resample_every, low=1)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.target_modules is None:
            raise ValueError("target_modules is required (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
