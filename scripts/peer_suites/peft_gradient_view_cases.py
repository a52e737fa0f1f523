"""PEFT's own generic custom-model tests (peft's tests/test_custom_models.py) run against gradient-view LoRA.

`peft_tests` is the peft sdist's tests/ folder (copied next to this file by peft_generic.sh, with an empty
__init__.py because its modules import each other relatively); nothing of PEFT or hf_ext is patched (PEFT's
TEST_CASES list gains the gradient-view rows, see below). Every test of
PEFT's `TestPeftCustomModel` that is parametrised over its TEST_CASES runs over GRADIENT_VIEW_CASES instead (its other
parametrisations — dtypes, autocast, low_cpu_mem_usage — kept), every test parametrised over its config classes runs
for GradientViewLoraConfig, and PEFT's method-specific tests are left out. `TestLoraControl` runs the LoRA rows the
cases were taken from, as PEFT has them.
"""

import functools

import hf_ext  # noqa: F401  (first: registers HFX_GRADIENT_VIEW_LORA with PEFT)
import peft_tests.test_custom_models as peft_suite  # the module, so that pytest does not collect PEFT's class here
import pytest
from peft import LoraConfig

from hf_ext.peft import GradientViewLoraConfig

# PEFT's LoRA rows on nn.Linear (its "MLP") and transformers' Conv1D ("EmbConv1D") targets, with their model ids and
# target modules; LoRA-only keys (lora_dropout, use_dora, kasa/mica, lora_bias) have no gradient-view counterpart.
GRADIENT_VIEW_CASES = [
    ("MLP 1", "MLP", GradientViewLoraConfig, {"target_modules": "lin0"}),
    ("MLP 2", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0"]}),
    ("MLP 3", "MLP", GradientViewLoraConfig, {"target_modules": ["lin1"]}),
    ("MLP 4", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP 5 modules_to_save", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP 6 alpha 4", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0"], "lora_alpha": 4}),
    ("MLP 9 alpha 32", "MLP", GradientViewLoraConfig, {"target_modules": "lin1", "lora_alpha": 32}),
    ("MLP r 4", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0"], "r": 4}),
    ("MLP both alpha 32", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0", "lin1"], "lora_alpha": 32}),
    ("Embedding + Conv1D", "EmbConv1D", GradientViewLoraConfig, {"target_modules": ["conv1d"]}),
    # the other two modes: fixed_a saves its factors as lora does, resample the dense ΔW
    ("MLP 4 fixed_a", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0", "lin1"], "mode": "fixed_a"}),
    ("MLP 4 resample", "MLP", GradientViewLoraConfig, {"target_modules": ["lin0", "lin1"], "mode": "resample"}),
]
# PEFT's tests that step the adapter with torch.optim.SGD/Adam: hf_ext refuses any optimizer but the gradient-view
# one on ΔW (it would train a full-rank update), so each must fail with that RuntimeError — strictly, so that a
# test failing any other way, or passing, is reported.
REFUSED_BY_DESIGN = {"test_disable_adapters", "test_disable_adapters_with_merging", "test_only_params_are_updated",
                     "test_parameters_after_loading_model"}
REFUSAL = pytest.mark.xfail(raises=RuntimeError, strict=True,
                            reason="steps ΔW with a plain torch optimizer, which hf_ext refuses on purpose")
LORA_SOURCES = {"Vanilla MLP 1 LoRA", "Vanilla MLP 2 LoRA", "Vanilla MLP 3 LoRA", "Vanilla MLP 4 LoRA",
                "Vanilla MLP 5 LoRA", "Vanilla MLP 6 LoRA", "Vanilla MLP 9 LoRA with DoRA",
                "Vanilla MLP 1 LoRA with KaSA", "Vanilla MLP 1 LoRA with MiCA", "Vanilla MLP 1 LoRA with lora_b bias",
                "Embedding + transformers Conv1D 1 LoRA"}
LORA_CASES = [row for row in peft_suite.TEST_CASES if row[2] is LoraConfig and row[0] in LORA_SOURCES]
# Tests parametrised over config classes (peft >= 0.22's test_get_additive_delta_uses_adapter_dtype) look up a
# representative row for their class in PEFT's TEST_CASES when they run: give gradient-view LoRA its rows there too.
# The parametrisations were fixed at import, so no other test changes.
peft_suite.TEST_CASES.extend(GRADIENT_VIEW_CASES)


def _parametrized_over(function, values):
    return next((mark for mark in getattr(function, "pytestmark", [])
                 if mark.name == "parametrize" and mark.args[1] is values), None)


def _with_marks(function, marks):
    @functools.wraps(function)  # keeps the signature, so pytest still hands it PEFT's fixtures
    def test(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    test.pytestmark = marks
    return test


def suite(name, cases, config_class, refused=frozenset()):
    ids = [case[0].replace(" ", "_") for case in cases]
    tests = {}
    for attribute, function in vars(peft_suite.TestPeftCustomModel).items():
        if not attribute.startswith("test_"):
            continue
        by_case = _parametrized_over(function, peft_suite.TEST_CASES)
        by_class = _parametrized_over(function, peft_suite.ALL_PEFT_CONFIG_CLASSES)
        replaced, replacement = (
            (by_case, pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", cases, ids=ids))
            if by_case else (by_class, pytest.mark.parametrize("config_cls", [config_class])) if by_class
            else (None, None))
        others = [mark for mark in getattr(function, "pytestmark", []) if mark is not replaced]
        if attribute in refused:
            others.append(REFUSAL)
        tests[attribute] = _with_marks(function, others + [replacement.mark]) if replaced else None
    return type(name, (peft_suite.TestPeftCustomModel,), tests)


TestGradientView = suite("TestGradientView", GRADIENT_VIEW_CASES, GradientViewLoraConfig, REFUSED_BY_DESIGN)
TestLoraControl = suite("TestLoraControl", LORA_CASES, LoraConfig)
