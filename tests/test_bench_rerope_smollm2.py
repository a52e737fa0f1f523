"""Smoke tests of benchmarks/rerope_smollm2_long_context.py on a tiny random Llama (the real run needs SmolLM2)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext import benchmarking



@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark("rerope_smollm2_long_context")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.25, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_rope_parameters_and_same_as_plain(bench):
    base = {"rope_type": "default", "rope_theta": 100.0}
    assert bench.rope_parameters_for("yarn", 32, 32, base, 2.0) == base
    assert bench.rope_parameters_for("yarn", 64, 32, base, 2.0) == {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 100.0}
    assert bench.rope_parameters_for("dynamic", 64, 32, base, 2.0) == {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}
    assert bench.rope_parameters_for("hfx_rerope", 64, 32, base, 2.0) == base
    assert bench.same_as_plain("yarn", 32, 32, 8) and not bench.same_as_plain("yarn", 33, 32, 8)
    assert bench.same_as_plain("hfx_rerope", 8, 32, 8) and not bench.same_as_plain("hfx_leaky_rerope", 9, 32, 8)


def test_switching_check_passes_and_yarn_dynamic_act_beyond_n(bench):
    model = tiny_llama()
    switch = bench.MethodSwitch(model, training_length=32, window=8, leaky_factor=16.0, logn_scaling=True,
                                dynamic_factor=2.0)
    ids = torch.randint(3, 101, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        checks = bench.check_switching(switch, ids)
        assert checks["passed"] and checks["plain_again_bitwise_equal"]
        long_ids = torch.randint(3, 101, (1, 64), generator=torch.Generator().manual_seed(2))
        losses = {}
        for method in bench.METHODS:
            switch.use(method, 64)
            losses[method] = bench.tail_loss(model, long_ids, 16)
    assert len(set(losses.values())) == len(losses)  # beyond N every method computes something else


def test_passkey_prompt_has_the_exact_length_and_the_needle(bench):
    class CharTokenizer:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    tokenizer = CharTokenizer()
    filler = tokenizer(bench.CLASSIC_FILLER).input_ids
    prompt = bench.passkey_prompt(tokenizer, 600, 12345, 0.1, filler)
    text = "".join(map(chr, prompt))
    assert len(prompt) == 600 and text.endswith(bench.PASSKEY_QUESTION)
    needle, question = bench.PASSKEY_NEEDLE.format(key=12345), bench.PASSKEY_QUESTION
    filler_length = 600 - len(bench.PASSKEY_INTRO) - len(needle) - len(question)
    assert text.index(needle) == len(bench.PASSKEY_INTRO) + int(0.1 * filler_length)


def test_loss_rows_render_in_results_table(bench, tmp_path):
    loss = {m: {64: 2.0 + i / 10} for i, m in enumerate(bench.METHODS)}
    result = benchmarking.make_result("rerope_demo", candidate="c", peer="p", settings={},
                                      metrics=bench.loss_metrics(loss, 64))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rerope_demo.json").write_text(json.dumps(result))
    table = benchmarking.write_results_table(tmp_path).read_text()
    assert table.count("| rerope_demo |") == 6 and "loss@64 hfx_rerope vs yarn" in table
