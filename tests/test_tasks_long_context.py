"""The long-context tasks of the ReRoPE benchmarks (benchmarks/tasks/long_context.py) on a tiny random Llama
(the benchmark itself needs SmolLM2)."""

import itertools

import pytest

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.tasks.long_context import (CLASSIC_FILLER, METHODS, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION,
                                           SAME_TOLERANCE, MethodSwitch, check_switching, passkey_prompt,
                                           rope_parameters_for, same_as_plain)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.25, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_rope_parameters_and_same_as_plain():
    base = {"rope_type": "default", "rope_theta": 100.0}
    assert rope_parameters_for("yarn", 32, 32, base, 2.0) == base
    assert rope_parameters_for("yarn", 64, 32, base, 2.0) == {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 100.0}
    assert rope_parameters_for("dynamic", 64, 32, base, 2.0) == {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}
    assert rope_parameters_for("hfx_rerope", 64, 32, base, 2.0) == base
    assert same_as_plain("yarn", 32, 32, 8) and not same_as_plain("yarn", 33, 32, 8)
    assert same_as_plain("hfx_rerope", 8, 32, 8) and not same_as_plain("hfx_leaky_rerope", 9, 32, 8)


def test_switching_check_passes_and_every_method_differs_beyond_n():
    model = tiny_llama()
    switch = MethodSwitch(model, training_length=32, window=8, leaky_factor=16.0, logn_scaling=True,
                          dynamic_factor=2.0)
    ids = torch.randint(3, 101, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        checks = check_switching(switch, ids)
        assert checks["passed"] and checks["plain_again_bitwise_equal"]
        long_ids = torch.randint(3, 101, (1, 64), generator=torch.Generator().manual_seed(2))
        logits = {}
        for method in METHODS:
            switch.use(method, 64)
            logits[method] = model(input_ids=long_ids, logits_to_keep=16, use_cache=False).logits
    for a, b in itertools.combinations(METHODS, 2):  # beyond N every method computes something else
        assert (logits[a] - logits[b]).abs().max() > SAME_TOLERANCE, (a, b)


def test_passkey_prompt_has_the_exact_length_and_the_needle():
    class CharTokenizer:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    tokenizer = CharTokenizer()
    filler = tokenizer(CLASSIC_FILLER).input_ids
    prompt = passkey_prompt(tokenizer, 600, 12345, 0.1, filler)
    text = "".join(map(chr, prompt))
    assert len(prompt) == 600 and text.endswith(PASSKEY_QUESTION)
    needle = PASSKEY_NEEDLE.format(key=12345)
    filler_length = 600 - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION)
    assert text.index(needle) == len(PASSKEY_INTRO) + int(0.1 * filler_length)


@pytest.mark.parametrize("successes, trials", [(0, 20), (7, 20), (20, 20), (1, 3), (59, 60)])
def test_passkey_interval_is_scipys_wilson_interval(successes, trials):
    from scipy.stats import binomtest

    from benchmarks.rerope_smollm2_long_context import wilson_interval
    reference = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(reference.low, abs=1e-6) and high == pytest.approx(reference.high, abs=1e-6)


def test_passkey_accuracy_by_depth_counts_each_depth_apart():
    from benchmarks.rerope_smollm2_long_context import accuracy_by_depth
    answers = [{"depth": 0.1, "correct": True}, {"depth": 0.5, "correct": False}, {"depth": 0.1, "correct": False},
               {"depth": 0.1, "correct": True}]
    table = accuracy_by_depth(answers)
    assert {depth: (row["correct"], row["trials"]) for depth, row in table.items()} == {"0.1": (2, 3), "0.5": (0, 1)}
