"""DeepSeek-V3-shaped models for the MLA decode benchmark: transformers' `DeepseekV3ForCausalLM` and its
`from_deepseek` conversion with the same random weights, MHA/GQA Llamas of the same width, a decoder that restarts
from a prefilled cache on every call, and the checks that both models compute the same thing."""

import copy

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_ext
from hf_ext.convert import from_deepseek
from hf_ext.models.hfext import modeling_hfext

DTYPE = torch.float32
LOGIT_TOLERANCE = 1e-4
# DeepSeek-V2-Lite's attention at half its width (see benchmarks/about/mla_decode_speed.md for v_head_dim and depth).
MODEL = {"vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2,
         "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 256, "q_lora_rank": None,
         "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 96, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
ROPE_PARAMETERS = {"rope_type": "default", "rope_theta": 10000.0}
# The MHA and GQA references: Llamas of the same width and depth (16 query heads x 64 = hidden 1024).
REFERENCE_HEADS = {"mha": 16, "gqa": 4}
REFERENCE_HEAD_DIM = 64


def deepseek_config(model: dict = MODEL) -> DeepseekV3Config:
    """The peer's config: every layer dense (`first_k_dense_replace = num_hidden_layers`), sdpa."""
    return DeepseekV3Config(**model, first_k_dense_replace=model["num_hidden_layers"],
                            rope_parameters=dict(ROPE_PARAMETERS), attn_implementation="sdpa")


def build_models(model: dict = MODEL, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(hfext, deepseek): transformers' DeepseekV3ForCausalLM with random weights and its `from_deepseek`
    conversion (`mla_implementation="auto"`), fp32, eval mode."""
    torch.manual_seed(seed)
    deepseek = DeepseekV3ForCausalLM(deepseek_config(model)).to(DTYPE).eval()
    # from_deepseek takes over the tensors of what it gets, hence the copy.
    hfext = from_deepseek(copy.deepcopy(deepseek)).eval()
    return hfext, deepseek


def reference_config(kv_heads: int, model: dict = MODEL) -> LlamaConfig:
    """An MHA/GQA Llama of the same width and depth as the MLA model (16 query heads x 64)."""
    return LlamaConfig(vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
                       intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_hidden_layers"],
                       num_attention_heads=model["num_attention_heads"], num_key_value_heads=kv_heads,
                       head_dim=REFERENCE_HEAD_DIM, max_position_embeddings=model["max_position_embeddings"],
                       rope_parameters=dict(ROPE_PARAMETERS), attn_implementation="sdpa")


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the tensors of a `DynamicCache` (keys and values of every layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def expanded_cache_bytes_per_token(model: dict = MODEL) -> int:
    """What a cache of this model's expanded per-head keys (d_nope + d_rope) and values (d_v) would hold."""
    per_layer = model["num_attention_heads"] * (model["qk_nope_head_dim"] + model["qk_rope_head_dim"]
                                                + model["v_head_dim"])
    return per_layer * model["num_hidden_layers"] * torch.empty((), dtype=DTYPE).element_size()


class Decoder:
    """A context prefilled once into a cache; each call crops the cache back to the context and decodes `steps`
    greedy tokens from there, as a fresh generation would."""

    def __init__(self, model, context_ids: torch.Tensor, steps: int):
        self.model, self.steps, self.context = model, steps, context_ids.shape[1]
        self.cache = DynamicCache(config=model.config)
        self.prefill_logits = model(input_ids=context_ids, past_key_values=self.cache, use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
        self.cache_bytes = cache_bytes(self.cache)  # before any decoding: exactly `context` tokens
        self.first_token = self.prefill_logits.argmax(-1, keepdim=True)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [1, steps], logits of every step [steps, vocab])."""
        # Cropping returns views (no copy): every call starts from the context's cache.
        extra = self.cache.get_seq_length() - self.context
        if extra:
            self.cache.crop(-extra)
        token, tokens, logits = self.first_token, [], []
        for _ in range(self.steps):
            step_logits = self.model(input_ids=token, past_key_values=self.cache, use_cache=True).logits[:, -1]
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits[0])
        return torch.cat(tokens, dim=1), torch.stack(logits)

    def __call__(self) -> torch.Tensor:
        return self.run()[0]


# ---------------------------------------------------------------------------------------------------------------
# Checks: the same computation on both sides, in the intended forms, with the predicted cache


class AbsorbedCallCounter:
    """Counts calls of HfExt's absorbed MLA kernel (wraps the name `HfExtMLAttention.forward` looks up) while
    active; the original is restored on exit."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self._original = modeling_hfext.absorbed_attention_with_weights

        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        modeling_hfext.absorbed_attention_with_weights = counted
        return self

    def __exit__(self, *exc):
        modeling_hfext.absorbed_attention_with_weights = self._original
        return False


def mla_layers(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def implementation_choice(hfext, context: int) -> dict:
    """What `mla_implementation="auto"` picks for a decode step and for a prefill at this context, per layer."""
    layers = mla_layers(hfext)
    decode = [layer.use_absorbed(1, context + 1) for layer in layers]
    prefill = [layer.use_absorbed(context, context) for layer in layers]
    return {"decode_absorbed": decode, "prefill_absorbed": prefill, "ok": all(decode) and not any(prefill)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def validate(hfext, deepseek, length: int, steps: int, seed: int) -> dict:
    """Same logits on a full prefill and on cached decode steps, at a short length; the absorbed kernel runs in
    every decode step of every layer and never in the prefill."""
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(hfext.config.vocab_size, (1, length), generator=generator)
    layers = len(mla_layers(hfext))
    with AbsorbedCallCounter() as counter:
        hfext_logits = hfext(input_ids=ids, use_cache=False).logits
        prefill_calls = counter.calls
        hfext_decoder = Decoder(hfext, ids, steps)
        cached_prefill_calls = counter.calls - prefill_calls
        hfext_tokens, hfext_step_logits = hfext_decoder.run()
        decode_calls = counter.calls - prefill_calls - cached_prefill_calls
    deepseek_logits = deepseek(input_ids=ids, use_cache=False).logits
    deepseek_tokens, deepseek_step_logits = Decoder(deepseek, ids, steps).run()
    checks = {
        "length": length,
        "steps": steps,
        "max_abs_logit_diff_prefill": max_diff(hfext_logits, deepseek_logits),
        "max_abs_logit_diff_decode": max_diff(hfext_step_logits, deepseek_step_logits),
        "greedy_tokens_equal": torch.equal(hfext_tokens, deepseek_tokens),
        "logit_scale": deepseek_logits.abs().max().item(),
        "absorbed_kernel_calls_prefill": prefill_calls + cached_prefill_calls,
        "absorbed_kernel_calls_decode": decode_calls,
        "absorbed_kernel_calls_decode_expected": layers * steps,
    }
    checks["passed"] = (checks["max_abs_logit_diff_prefill"] <= LOGIT_TOLERANCE
                        and checks["max_abs_logit_diff_decode"] <= LOGIT_TOLERANCE
                        and checks["greedy_tokens_equal"]
                        and checks["absorbed_kernel_calls_prefill"] == 0
                        and decode_calls == layers * steps)
    return checks


def context_checks(hfext_decoder: Decoder, deepseek_decoder: Decoder, hfext_bytes_per_token: int,
                   deepseek_bytes_per_token: int) -> dict:
    """The first (untimed) decode call of both decoders: same prefill logits, same step logits and tokens, and the
    cache bytes the helper predicts."""
    hfext_tokens, hfext_logits = hfext_decoder.run()
    deepseek_tokens, deepseek_logits = deepseek_decoder.run()
    context = hfext_decoder.context
    record = {
        "max_abs_logit_diff_prefill_last": max_diff(hfext_decoder.prefill_logits, deepseek_decoder.prefill_logits),
        "max_abs_logit_diff_decode": max_diff(hfext_logits, deepseek_logits),
        "greedy_tokens_equal": torch.equal(hfext_tokens, deepseek_tokens),
        "hfext_cache_bytes": hfext_decoder.cache_bytes,
        "deepseek_cache_bytes": deepseek_decoder.cache_bytes,
        "hfext_cache_bytes_per_token": hfext_decoder.cache_bytes / context,
        "deepseek_cache_bytes_per_token": deepseek_decoder.cache_bytes / context,
        "hfext_cache_matches_helper": hfext_decoder.cache_bytes == hfext_bytes_per_token * context,
        "deepseek_cache_matches_helper": deepseek_decoder.cache_bytes == deepseek_bytes_per_token * context,
    }
    record["passed"] = (record["max_abs_logit_diff_prefill_last"] <= LOGIT_TOLERANCE
                        and record["max_abs_logit_diff_decode"] <= LOGIT_TOLERANCE
                        and record["greedy_tokens_equal"]
                        and record["hfext_cache_matches_helper"] and record["deepseek_cache_matches_helper"])
    return record


def reference_cache_bytes(model: dict, prompt_length: int, seed: int) -> dict:
    """Cache bytes per token of the MHA and GQA Llamas: the helper's number and what a DynamicCache holds after a
    `prompt_length`-token prefill (random weights; the models are dropped afterwards)."""
    references = {}
    ids = torch.randint(model["vocab_size"], (1, prompt_length), generator=torch.Generator().manual_seed(seed))
    for name, kv_heads in REFERENCE_HEADS.items():
        config = reference_config(kv_heads, model)
        torch.manual_seed(seed)
        llama = LlamaForCausalLM(config).to(DTYPE).eval()
        cache = DynamicCache(config=llama.config)
        llama(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        helper = hf_ext.kv_cache_bytes_per_token(config, dtype=DTYPE)
        references[name] = {
            "config": {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": kv_heads,
                       "head_dim": REFERENCE_HEAD_DIM, "num_hidden_layers": config.num_hidden_layers},
            "helper_bytes_per_token": helper,
            "measured_bytes_per_token": cache_bytes(cache) / prompt_length,
            "matches_helper": cache_bytes(cache) == helper * prompt_length,
        }
        del llama, cache
    return references


def failures(checks: dict) -> list[str]:
    """Names of the failed checks in the benchmark's ``checks`` record."""
    failed = []
    if checks.get("validation") and not checks["validation"]["passed"]:
        failed.append("validation")
    failed += [f"mla_implementation {c}" for c, r in checks.get("mla_implementation", {}).items() if not r["ok"]]
    failed += [f"reference cache {n}" for n, r in checks.get("reference_caches", {}).items() if not r["matches_helper"]]
    failed += [f"context {c}" for c, r in checks.get("contexts", {}).items() if not r["passed"]]
    return failed


def raise_on_failures(checks: dict) -> None:
    failed = failures(checks)
    if failed:
        raise AssertionError(f"checks failed ({', '.join(failed)}): {checks}")
