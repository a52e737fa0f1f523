"""The MLA benchmarks' task builders (benchmarks/tasks/mla_models.py, mla_healing.py): the DeepSeek-shaped model pair
and its decoder and checks, the by-file data split, perplexity, and the healing fine-tune."""

import math

import pytest
import torch
import torch.nn.functional as F

import hf_ext
from benchmarks.tasks import mla_healing, mla_models
from hf_ext.models.hfext import modeling_hfext

# MODEL's head dimensions at a width that builds in milliseconds; kv_lora_rank 96 keeps "auto" expanded in the
# prefill (2·96 + 32 > 64 + 32 + 96, see `HfExtMLAttention.use_absorbed`)
SMALL = {**mla_models.MODEL, "hidden_size": 128, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 4, "kv_lora_rank": 96, "vocab_size": 97}


@pytest.fixture(scope="module")
def pair():
    return mla_models.build_models(SMALL)


def test_decoder_restarts_from_the_context_every_call(pair):
    """Each call crops the cache back to the context: two calls decode the same tokens from the same state."""
    ids = torch.randint(97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for decoder in (mla_models.Decoder(model, ids, 3) for model in pair):
            first_tokens, first_logits = decoder.run()
            assert decoder.cache.get_seq_length() == 12 + 3
            second_tokens, second_logits = decoder.run()
            assert decoder.cache.get_seq_length() == 12 + 3 and first_tokens.shape == (1, 3)
            torch.testing.assert_close(second_tokens, first_tokens, rtol=0, atol=0)
            torch.testing.assert_close(second_logits, first_logits, rtol=0, atol=0)
            assert decoder.cache_bytes == 12 * hf_ext.kv_cache_bytes_per_token(decoder.model.config)


def test_checks_pass_on_the_pair_and_count_the_absorbed_kernel(pair):
    hfext, deepseek = pair
    kernel = modeling_hfext.absorbed_attention_with_weights
    with torch.inference_mode():
        validation = mla_models.validate(hfext, deepseek, length=16, steps=3, seed=0)
        context = mla_models.context_checks(mla_models.Decoder(hfext, torch.arange(3, 19)[None], 2),
                                            mla_models.Decoder(deepseek, torch.arange(3, 19)[None], 2),
                                            hf_ext.kv_cache_bytes_per_token(hfext.config),
                                            hf_ext.kv_cache_bytes_per_token(deepseek.config))
    assert modeling_hfext.absorbed_attention_with_weights is kernel  # the counter put the original back
    assert validation["passed"] and context["passed"]
    assert validation["absorbed_kernel_calls_prefill"] == 0
    assert validation["absorbed_kernel_calls_decode"] == SMALL["num_hidden_layers"] * 3
    assert mla_models.implementation_choice(hfext, 16)["ok"]
    checks = {"validation": validation, "contexts": {"16": context},
              "mla_implementation": {"16": {"ok": False}}, "reference_caches": {"mha": {"matches_helper": True}}}
    assert mla_models.failures(checks) == ["mla_implementation 16"]
    with pytest.raises(AssertionError, match="mla_implementation 16"):
        mla_models.raise_on_failures(checks)


def test_reference_llamas_have_the_models_width_and_the_predicted_cache():
    for kv_heads in mla_models.REFERENCE_HEADS.values():
        config = mla_models.reference_config(kv_heads)
        assert config.num_attention_heads * config.head_dim == mla_models.MODEL["hidden_size"]
        assert config.num_hidden_layers == mla_models.MODEL["num_hidden_layers"]
    # The fused CPU sdpa kernel needs v_head_dim == qk_nope + qk_rope (see benchmarks/about/mla_decode_speed.md).
    model = mla_models.MODEL
    assert model["v_head_dim"] == model["qk_nope_head_dim"] + model["qk_rope_head_dim"]
    references = mla_models.reference_cache_bytes({**SMALL, "num_attention_heads": 16}, prompt_length=5, seed=0)
    # keys + values of 16 (MHA) or 4 (GQA) heads of 64, 2 layers, fp32
    assert references["mha"]["helper_bytes_per_token"] == 2 * 16 * 64 * 2 * 4
    assert references["gqa"]["helper_bytes_per_token"] == 2 * 4 * 64 * 2 * 4
    assert all(entry["matches_helper"] for entry in references.values())
    assert mla_models.expanded_cache_bytes_per_token() == 16 * (64 + 32 + 96) * 2 * 4


def _documents(tmp_path, count=12):
    files = []
    for index in range(count):
        path = tmp_path / f"doc{index:02d}.rst.txt"
        path.write_text(f"Document {index}. " + "x" * (300 + 37 * index))
        files.append(path)
    return files


SPLIT = {"seed": 0, "block_size": 64, "eval_blocks": 6, "eval_batch_size": 4, "calibration_blocks": 2,
         "heal_steps": 3, "heal_batch_size": 2, "max_eval_blocks_per_file": 2, "max_train_blocks_per_file": 3}


def test_split_is_by_file_and_sized(tmp_path):
    files = _documents(tmp_path)
    data = mla_healing.split_blocks(mla_healing.ByteTokenizer(), SPLIT, files=files)
    assert not set(data["eval_files"]) & set(data["train_files"])
    assert [tuple(b.shape) for b in data["eval_batches"]] == [(4, 64), (2, 64)]
    assert tuple(data["calibration_input_ids"].shape) == (2, 64)
    assert [tuple(b.shape) for b in data["heal_batches"]] == [(2, 64)] * 3
    assert data["report"]["heal_tokens"] == 3 * 2 * 64
    # the same seed gives the same split
    again = mla_healing.split_blocks(mla_healing.ByteTokenizer(), SPLIT, files=files)
    assert again["eval_files"] == data["eval_files"]
    assert again["report"]["train_digest"] == data["report"]["train_digest"]
    with pytest.raises(ValueError, match="not enough text"):
        mla_healing.split_blocks(mla_healing.ByteTokenizer(), {**SPLIT, "heal_steps": 1000}, files=files)


def test_trainable_parameters_selects_attention():
    model = mla_healing.tiny_llama()
    selected = mla_healing.trainable_parameters(model, "attention")
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names and all(".self_attn." in name for name in names)
    assert sum(p.numel() for p in selected) == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert len(mla_healing.trainable_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError):
        mla_healing.trainable_parameters(model, "mlp")


def test_evaluate_weights_every_token_alike():
    model = mla_healing.tiny_llama()
    batches = [torch.randint(3, 259, (3, 20), generator=torch.Generator().manual_seed(1)),
               torch.randint(3, 259, (1, 20), generator=torch.Generator().manual_seed(2))]
    record = mla_healing.evaluate(model, batches, reference=model)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids).logits[:, :-1] for ids in batches]).reshape(-1, 259)
    expected = F.cross_entropy(logits, torch.cat(batches)[:, 1:].reshape(-1)).item()
    assert record["tokens"] == 4 * 19 and record["nll"] == pytest.approx(expected, rel=1e-5)
    assert record["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert record["max_abs_logit_diff"] == 0 and record["reference_nll"] == record["nll"]


def test_heal_changes_only_the_attention_and_keeps_the_cache():
    model = hf_ext.convert.to_mla(mla_healing.tiny_llama(), qk_rope_head_dim=4, kv_lora_rank=16)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = [torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(step)) for step in range(2)]
    settings = {"heal_parameters": "attention", "learning_rate": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.01,
                "warmup_steps": 1}
    cache = mla_healing.cache_sizes(model.config, gqa_bytes_fp32=512)
    record = mla_healing.heal(model, batches, settings)
    assert record["steps"] == len(record["train_loss"]) == 2 and record["finite"]
    assert record["optimizer_class"] == "hf_ext.optim.lion.Lion"
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".self_attn." in name for name in changed)
    assert record["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # the cache of (qk_rope_head_dim 4, kv_lora_rank 16) with 2 KV heads and 2 layers: 16 + 2·4 elements
    assert mla_healing.cache_sizes(model.config, gqa_bytes_fp32=512) == cache == {
        "kv_bytes_per_token_fp32": 24 * 2 * 4, "kv_bytes_per_token_bf16": 24 * 2 * 2,
        "kv_elements_per_token_per_layer": 24, "fraction_of_gqa": 24 * 2 * 4 / 512}
