"""MLA decode speed: HfExt's absorbed MLA against transformers' `DeepseekV3Attention`, same weights, one process.

Both models cache the same thing per token and layer: the normalised key/value latent c_kv (kv_lora_rank numbers)
and the rotated rotary key k_rope (qk_rope_head_dim numbers). They differ in what a decode step does with it.
transformers' `DeepseekV3Attention` re-expands the *whole* cached latent through `kv_b_proj` into per-head keys and
values at every step (L·d_c·H·(d_nope + d_v) multiply-adds per layer, plus writing those L·H·(d_qk + d_v) numbers)
and then runs sdpa over them. HfExt's `HfExtMLAttention` decodes in the absorbed form: W_UK is folded into the query
and W_UV into the output, so attention runs over the latent directly and the cache is read once per step
(L·H·(2·d_c + d_r) multiply-adds). Both are O(L) per step, but with a constant that differs by about
d_c·(d_nope + d_v) / (2·d_c + d_r) ≈ 75x for the shapes below, so decode speed should diverge with the context while
the cache (and its memory) stays the same size. Prefill (many queries) is where the expanded form is cheaper; HfExt's
`mla_implementation="auto"` picks it there, so prefill should cost what transformers' costs.

Measured (fp32, CPU, batch 1, sdpa, random weights; speed does not depend on the weight values):

1. **Decode** tokens/s at contexts L = 1024, 4096, 8192, 16384 (quick: 256, 512). Per model the context is
   prefilled once into a `DynamicCache`; each timed call crops the cache back to L (views, no copy) and runs
   `decode_steps` greedy single-token forwards, as a fresh generation would. speed_ratio = transformers' time /
   HfExt's time (`hf_ext.benchmarking.compare`, interleaved rounds). Goal: ≥ 3 at 8192 (the issue's goal); the other
   contexts are informational. Peak RSS growth during a decode call is recorded too, after all timing: the cache is
   the same, but transformers' step builds the expanded per-head keys and values of the whole context.
2. **Prefill** time at the same L: one forward pass, `use_cache=False`, logits of the last token only. Goal: HfExt's
   time ≤ 1.1x transformers' (speed_ratio ≥ 1/1.1) at every L. With "auto" both run the expanded form and the same
   sdpa call; this row checks that nothing around it (mask creation, rotary, the choice itself) costs extra.
3. **KV-cache bytes per token** (`hf_ext.kv_cache_bytes_per_token`, fp32, whole model): HfExt MLA; the transformers
   DeepSeek peer (transformers 5.x caches the latent as well, so the two are *equal*: the decode speed-up comes from
   compute, not from a smaller cache); an MHA (16 heads x head_dim 64, keys and values) and a GQA (4 KV heads)
   Llama of the same width and depth; and, for reference, what a cache of this model's expanded per-head keys and
   values would hold. The bytes actually held by each `DynamicCache` after the prefill (HfExt, DeepSeek at every
   context; MHA and GQA Llamas after a short prompt) must equal the helper's numbers.

Before any timing (recorded under ``checks``; the run stops if one fails): the logits of the two models agree to
1e-4 on a full prefill and on cached decode steps, at a short validation length and again at every context (the
last prefill logits and every step of the first, untimed decode call, which doubles as the warm-up; both models
must also pick the same greedy tokens); every HfExt layer's `use_absorbed(1, L + 1)` is True and
`use_absorbed(L, L)` is False for every context L (absorbed decode, expanded prefill), and during validation the
absorbed kernel is counted: never called in the prefill, once per layer and step while decoding.

Model: `DeepseekV3ForCausalLM` with dense MLPs in every layer (`first_k_dense_replace = num_hidden_layers`; the
converter supports no MoE) and DeepSeek-V2-Lite's attention proportions at half its width: hidden 1024, 16 heads,
kv_lora_rank 256 (= hidden / 4, as in V2-Lite: 512 / 2048), no query compression (V2-Lite has none),
qk_nope_head_dim 64, qk_rope_head_dim 32 (V2-Lite: 128, 64), rope_interleave as DeepSeek. Deviations, and why:
* v_head_dim = 96 = qk_nope + qk_rope instead of 64 (DeepSeek has v_head_dim = qk_nope_head_dim): torch's fused
  CPU sdpa kernel needs the value width to equal the query/key width; with a narrower v it falls back to the unfused
  math kernel, which holds the L x L scores of all 16 heads several times (measured: 162 MiB instead of 8 MiB at
  L = 1024, i.e. ~40 GiB at 16384), which this machine cannot hold. HfExt zero-pads the values to the query/key
  width before sdpa and so never falls back; transformers does not pad. Equal widths keep the prefill rows a
  comparison of the same kernel on both sides and let the 16k peer fit. It makes the expansion per step 25 % larger
  than with v = 64 (and the absorbed output projection 50 % larger): the ratio moves, the comparison stays fair.
* 2 layers, intermediate size 2048, vocabulary 2048: what differs between the two models is per layer (attention),
  and the MLP, embedding and head are identical on both sides, so fewer and smaller of them only shorten the run
  (a 16k prefill is ~40 s per model on one core) without changing what the attention rows measure. The absolute
  tokens/s are those of this small model; the ratios are what to read. A wider MLP or a larger vocabulary would
  dilute the decode ratio towards 1 (their cost per step does not grow with L); more layers would not (each adds
  attention and MLP alike).
max_position_embeddings 32768, rope_theta 10000 (plain RoPE: no YaRN scaling at these lengths).

Run with ``hf-ext bench mla_decode_speed`` (8-9 minutes on a 2-core machine with one thread, measured twice, more
than half of it the 8k and 16k prefills) or ``--quick`` (well under a minute). ``HF_EXT_BENCH_THREADS=N`` fixes
torch's thread count. On a machine shared with other busy processes use ``HF_EXT_BENCH_THREADS=1``: with 2 threads
and a core taken, every parallel op waits for the descheduled thread (~10-25 ms per op measured here), which costs the
absorbed path's many small ops (about ten per layer and step, each well under a millisecond alone) far more than the
few large matrix products of the expansion — on a loaded machine with 2 threads, HfExt's step at 4096 took 0.33 s
against transformers' 0.25 s, while with 1 thread it took 0.02 s against 0.23 s. Results:
``benchmarks/results/mla_decode_speed.json`` and ``.png`` (decode tokens/s and the ratios vs context); quick runs go
to ``results/quick/``, full runs with overridden settings to ``results/partial/`` (neither touches RESULTS.md).
"""

import copy
import json
import time
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_ext
from hf_ext.benchmarking import (benchmark_settings, compare, compare_peak_memory, configure_threads, make_result,
                                 pyplot, save_result)
from hf_ext.convert import from_deepseek
from hf_ext.models.hfext import modeling_hfext

NAME = "mla_decode_speed"
DECODE_GOAL = 3.0  # HfExt decode at least 3x as fast as transformers' …
DECODE_GOAL_CONTEXT = 8192  # … at an 8k context (the goal); other contexts are informational
PREFILL_MAX_TIME_RATIO = 1.1  # HfExt's prefill may take at most 1.1x transformers' time
PREFILL_GOAL = 1 / PREFILL_MAX_TIME_RATIO
LOGIT_TOLERANCE = 1e-4
DTYPE = torch.float32
BENCH_DIR = Path(__file__).resolve().parent

# DeepSeek-V2-Lite's attention at half its width (see the module docstring for v_head_dim and the depth).
MODEL = {"vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2,
         "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 256, "q_lora_rank": None,
         "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 96, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
ROPE_PARAMETERS = {"rope_type": "default", "rope_theta": 10000.0}
# The MHA and GQA references: Llamas of the same width and depth (16 query heads x 64 = hidden 1024).
REFERENCE_HEADS = {"mha": 16, "gqa": 4}
REFERENCE_HEAD_DIM = 64
# One peer label per result file (the harness's layout): the kv_bytes rows compare against other caches.
PEER_LABEL = "transformers DeepseekV3ForCausalLM, sdpa (kv_bytes rows: the cache named in the metric)"


def _schedule(prefill_rounds: int, prefill_warmup: int, decode_rounds: int, memory_repeats: int) -> dict:
    return {"prefill_rounds": prefill_rounds, "prefill_warmup": prefill_warmup, "decode_rounds": decode_rounds,
            "memory_repeats": memory_repeats}


# Per context, how often each comparison runs. A 16k prefill takes 30-40 s per model on one core, so the long
# prefills get the fewest rounds (but an odd number: with 2 the "median" is the mean of two rounds, and one round
# disturbed by other load moved the 16k ratio from 0.99 to 0.91 in a first run) and no warm-up (the decoders' own
# prefills at that length came just before). Decode calls at 16k take ~8 s on transformers' side, a fraction of a
# second elsewhere; they get 3-5 rounds. Decode needs no warm-up call: the untimed check call before it is one.
FULL = {
    "contexts": {1024: _schedule(5, 1, 5, 2), 4096: _schedule(3, 0, 5, 2), 8192: _schedule(3, 0, 5, 1),
                 16384: _schedule(3, 0, 3, 1)},
    "decode_steps": 8,
    "validation_length": 256, "validation_steps": 8,
    "reference_prompt_length": 64,
    "seed": 0,
}
QUICK = {
    "contexts": {256: _schedule(3, 1, 3, 1), 512: _schedule(3, 1, 3, 1)},
    "decode_steps": 4,
    "validation_length": 64, "validation_steps": 4,
    "reference_prompt_length": 16,
    "seed": 0,
}


# ---------------------------------------------------------------------------------------------------------------
# Models


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


def prefill(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The timed prefill: one forward pass, no cache, logits of the last token only."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the tensors of a `DynamicCache` (keys and values of every layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


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
# Checks


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
    prefill_ = [layer.use_absorbed(context, context) for layer in layers]
    return {"decode_absorbed": decode, "prefill_absorbed": prefill_,
            "ok": all(decode) and not any(prefill_)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def validate(hfext, deepseek, settings: dict) -> dict:
    """Same logits on a full prefill and on cached decode steps, at a short length; the absorbed kernel runs in
    every decode step of every layer and never in the prefill."""
    length, steps = settings["validation_length"], settings["validation_steps"]
    generator = torch.Generator().manual_seed(settings["seed"] + 1)
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


# ---------------------------------------------------------------------------------------------------------------
# KV bytes rows


def kv_metrics(ours: int, others: dict[str, tuple[int, str]]) -> dict:
    """RESULTS.md rows: HfExt MLA's cache bytes per token against each reference (informational)."""
    metrics = {}
    for name, (bytes_per_token, what) in others.items():
        metrics[f"kv_bytes_per_token_vs_{name}"] = {
            "description": f"KV-cache bytes per token (fp32, all {MODEL['num_hidden_layers']} layers): HfExt MLA vs "
                           f"{what}",
            "unit": "bytes/token", "candidate": float(ours), "peer": float(bytes_per_token),
            "candidate_bytes_per_token": ours, "peer_bytes_per_token": bytes_per_token,
            # RESULTS.md renders speed_ratio as the ratio column; here it is a ratio of cache sizes.
            "speed_ratio": bytes_per_token / ours, "cache_ratio": bytes_per_token / ours,
            "ratio_definition": "peer bytes / candidate bytes; > 1 means HfExt's cache is smaller",
            "goal": None, "min_speed_ratio": None, "passed": None,
        }
    return metrics


def expanded_cache_bytes_per_token(model: dict) -> int:
    """What a cache of this model's expanded per-head keys (d_nope + d_rope) and values (d_v) would hold."""
    per_layer = model["num_attention_heads"] * (model["qk_nope_head_dim"] + model["qk_rope_head_dim"]
                                                + model["v_head_dim"])
    return per_layer * model["num_hidden_layers"] * torch.empty((), dtype=DTYPE).element_size()


# ---------------------------------------------------------------------------------------------------------------
# Tables and the plot


def _tables(contexts: list[int], metrics: dict) -> dict:
    decode = {"hfext_tokens_per_second": [], "deepseek_tokens_per_second": [], "speed_ratio": [],
              "hfext_seconds_per_step": [], "deepseek_seconds_per_step": []}
    prefill_ = {"hfext_seconds": [], "deepseek_seconds": [], "speed_ratio": [], "time_ratio": []}
    for context in contexts:
        row = metrics[f"decode_{context}"]
        decode["hfext_tokens_per_second"].append(row["candidate"])
        decode["deepseek_tokens_per_second"].append(row["peer"])
        decode["speed_ratio"].append(row["speed_ratio"])
        decode["hfext_seconds_per_step"].append(1 / row["candidate"])
        decode["deepseek_seconds_per_step"].append(1 / row["peer"])
        row = metrics[f"prefill_{context}"]
        prefill_["hfext_seconds"].append(row["candidate_median_seconds"])
        prefill_["deepseek_seconds"].append(row["peer_median_seconds"])
        prefill_["speed_ratio"].append(row["speed_ratio"])
        prefill_["time_ratio"].append(row["time_ratio"])
    return {"contexts": contexts, "decode": decode, "prefill": prefill_}


def _markdown_tables(tables: dict, kv: dict, model: dict) -> list[str]:
    shape = (f"{model['num_hidden_layers']} layers, hidden {model['hidden_size']}, {model['num_attention_heads']} "
             f"heads, d_c {model['kv_lora_rank']}, d_nope/d_rope/d_v {model['qk_nope_head_dim']}/"
             f"{model['qk_rope_head_dim']}/{model['v_head_dim']}")
    rows = [f"Decode (greedy, batch 1, fp32 CPU; {shape}) and prefill (one pass, last-token logits) per context: "
            "HfExt absorbed MLA vs transformers DeepseekV3Attention.", "",
            "| context | HfExt decode tok/s | DeepSeek decode tok/s | decode ratio | HfExt prefill s | "
            "DeepSeek prefill s | prefill time ratio |", "|---|---|---|---|---|---|---|"]
    decode, prefill_ = tables["decode"], tables["prefill"]
    for i, context in enumerate(tables["contexts"]):
        rows.append(f"| {context} | {decode['hfext_tokens_per_second'][i]:.1f} | "
                    f"{decode['deepseek_tokens_per_second'][i]:.1f} | {decode['speed_ratio'][i]:.2f}x | "
                    f"{prefill_['hfext_seconds'][i]:.2f} | {prefill_['deepseek_seconds'][i]:.2f} | "
                    f"{prefill_['time_ratio'][i]:.3f} |")
    kv_rows = ["KV-cache bytes per token (fp32, whole model; measured = DynamicCache bytes after a prefill / tokens).",
               "", "| cache | bytes/token (helper) | measured | HfExt MLA smaller by |", "|---|---|---|---|"]
    for name, entry in kv.items():
        measured = entry.get("measured_bytes_per_token")
        kv_rows.append(f"| {entry['label']} | {entry['helper_bytes_per_token']:,} | "
                       f"{'—' if measured is None else f'{measured:,.0f}'} | {entry['ratio_vs_hfext']:.2f}x |")
    return ["\n".join(rows), "\n".join(kv_rows)]


def plot(tables: dict, path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter

    contexts = tables["contexts"]
    decode, prefill_ = tables["decode"], tables["prefill"]
    figure, (speed_axis, ratio_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    speed_axis.plot(contexts, decode["hfext_tokens_per_second"], marker="o", color="tab:blue",
                    label="HfExt MLA (absorbed decode)")
    speed_axis.plot(contexts, decode["deepseek_tokens_per_second"], marker="s", color="tab:red",
                    label="transformers DeepseekV3Attention")
    speed_axis.set_yscale("log")
    speed_axis.set_ylabel("decode tokens/s (batch 1)")
    speed_axis.legend(fontsize=8, loc="lower left")  # the curves fall to the right
    ratio_axis.plot(contexts, decode["speed_ratio"], marker="o", color="tab:blue", label="decode speed ratio")
    ratio_axis.plot(contexts, prefill_["speed_ratio"], marker="^", color="tab:green", label="prefill speed ratio")
    ratio_axis.axhline(DECODE_GOAL, color="tab:blue", linestyle=":",
                       label=f"decode goal (>= {DECODE_GOAL:g} at {DECODE_GOAL_CONTEXT})")
    ratio_axis.axhline(PREFILL_GOAL, color="tab:green", linestyle=":",
                       label=f"prefill goal (>= 1/{PREFILL_MAX_TIME_RATIO})")
    ratio_axis.set_yscale("log")
    ratio_axis.set_ylabel("speed ratio = DeepSeek time / HfExt time")
    ratio_axis.legend(fontsize=8, loc="best")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    # Minor ticks of a log axis: label 2x and 5x a power of ten only, so that wide ranges stay readable.
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
    for axis in (speed_axis, ratio_axis):
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(sparse)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def _output_dir(quick: bool, partial: bool) -> Path:
    directory = BENCH_DIR / "results" / ("quick" if quick else "partial" if partial else "")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``decode_steps=4``). A full
    run with overrides is partial: its results go to ``results/partial/`` and leave RESULTS.md alone."""
    started = time.perf_counter()
    settings = benchmark_settings(FULL, QUICK, quick, overrides)
    partial = bool(overrides) and not quick
    threads = configure_threads()
    schedule = {int(c): plan for c, plan in settings.pop("contexts").items()}
    contexts = sorted(schedule)
    steps, seed = settings["decode_steps"], settings["seed"]
    sections = {}

    section_start = time.perf_counter()
    hfext, deepseek = build_models(MODEL, seed)
    sections["build"] = time.perf_counter() - section_start
    hfext_kv = hf_ext.kv_cache_bytes_per_token(hfext.config, dtype=DTYPE)
    deepseek_kv = hf_ext.kv_cache_bytes_per_token(deepseek.config, dtype=DTYPE)
    settings.update({
        "model": dict(MODEL, architecture="DeepseekV3ForCausalLM", rope_parameters=ROPE_PARAMETERS,
                      first_k_dense_replace=MODEL["num_hidden_layers"],
                      rope_interleave=bool(deepseek.config.rope_interleave)),
        "weights": f"random (seed {seed}): speed does not depend on the weight values",
        "candidate_model": "hf_ext.convert.from_deepseek(copy.deepcopy(peer)), mla_implementation="
                           f"{hfext.config.mla_implementation!r}",
        "dtype": "float32", "device": "cpu", "batch": 1, "attn_implementation": "sdpa", "threads": threads,
        "partial": partial, "contexts": {str(c): plan for c, plan in schedule.items()},
        "decode": f"per call: crop the prefilled DynamicCache back to the context, then {steps} greedy single-token "
                  "forwards; tokens/s = steps / median seconds per call",
        "prefill": "one forward pass, use_cache=False, logits_to_keep=1",
        "decode_goal": f"speed_ratio >= {DECODE_GOAL} at context {DECODE_GOAL_CONTEXT}; other contexts informational",
        "prefill_goal": f"HfExt time <= {PREFILL_MAX_TIME_RATIO} x DeepSeek time (speed_ratio >= "
                        f"1/{PREFILL_MAX_TIME_RATIO}) at every context",
    })
    metrics, checks = {}, {"logit_tolerance": LOGIT_TOLERANCE, "contexts": {}, "mla_implementation": {}}
    decoders = {}

    with torch.inference_mode():
        # 0. Same computation, and the intended forms, before anything is timed.
        section_start = time.perf_counter()
        checks["mla_implementation_setting"] = hfext.config.mla_implementation
        checks["validation"] = validate(hfext, deepseek, settings)
        print(f"validation: {checks['validation']}")
        for context in contexts:
            checks["mla_implementation"][str(context)] = implementation_choice(hfext, context)
        references = reference_cache_bytes(MODEL, settings["reference_prompt_length"], seed)
        checks["reference_caches"] = references
        sections["validation"] = time.perf_counter() - section_start
        _raise_on_failures(checks)

        for context in contexts:
            plan = schedule[context]
            ids = torch.randint(MODEL["vocab_size"], (1, context),
                                generator=torch.Generator().manual_seed(seed + context))

            # 1. Decode from a prefilled cache. The check call is the decoders' warm-up.
            section_start = time.perf_counter()
            pair = (Decoder(hfext, ids, steps), Decoder(deepseek, ids, steps))
            decoders[context] = pair
            sections[f"decode_{context}_prefills"] = time.perf_counter() - section_start
            checks["contexts"][str(context)] = context_checks(*pair, hfext_kv, deepseek_kv)
            _raise_on_failures(checks)
            section_start = time.perf_counter()
            metrics[f"decode_{context}"] = compare(
                pair[0], pair[1], work=steps, unit="tokens/s", repeats=plan["decode_rounds"], warmup=0,
                min_speed_ratio=DECODE_GOAL if context == DECODE_GOAL_CONTEXT else None,
                description=f"{steps} greedy decode steps from a {context}-token cache: HfExt absorbed MLA vs "
                            "transformers DeepseekV3Attention")
            sections[f"decode_{context}_timing"] = time.perf_counter() - section_start
            _print_row(metrics[f"decode_{context}"], f"decode  L={context}")

            # 2. Prefill.
            section_start = time.perf_counter()
            row = compare(
                lambda: prefill(hfext, ids), lambda: prefill(deepseek, ids), work=context, unit="tokens/s",
                repeats=plan["prefill_rounds"], warmup=plan["prefill_warmup"], min_speed_ratio=PREFILL_GOAL,
                description=f"prefill of {context} tokens (one pass, last-token logits): HfExt vs transformers")
            row.update({"time_ratio": 1 / row["speed_ratio"], "max_time_ratio": PREFILL_MAX_TIME_RATIO})
            metrics[f"prefill_{context}"] = row
            sections[f"prefill_{context}_timing"] = time.perf_counter() - section_start
            _print_row(row, f"prefill L={context}")

        # 3. Peak memory of a decode call, after all timing (it fixes glibc's mmap threshold for the process).
        for context in contexts:
            section_start = time.perf_counter()
            metrics[f"decode_{context}"].update(compare_peak_memory(
                decoders[context][0], decoders[context][1], repeats=schedule[context]["memory_repeats"],
                description=f"decode {context}"))
            sections[f"decode_{context}_memory"] = time.perf_counter() - section_start

    # 4. KV bytes per token.
    kv = {
        "hfext_mla": {"label": "HfExt MLA (latent + rotary key)", "helper_bytes_per_token": hfext_kv,
                      "measured_bytes_per_token": checks["contexts"][str(contexts[-1])]["hfext_cache_bytes_per_token"]},
        "deepseek": {"label": "transformers DeepSeek-V3 (5.x caches the latent too)",
                     "helper_bytes_per_token": deepseek_kv,
                     "measured_bytes_per_token":
                         checks["contexts"][str(contexts[-1])]["deepseek_cache_bytes_per_token"]},
        "mha": {"label": f"MHA Llama, {REFERENCE_HEADS['mha']} KV heads x {REFERENCE_HEAD_DIM}",
                "helper_bytes_per_token": references["mha"]["helper_bytes_per_token"],
                "measured_bytes_per_token": references["mha"]["measured_bytes_per_token"]},
        "gqa": {"label": f"GQA Llama, {REFERENCE_HEADS['gqa']} KV heads x {REFERENCE_HEAD_DIM}",
                "helper_bytes_per_token": references["gqa"]["helper_bytes_per_token"],
                "measured_bytes_per_token": references["gqa"]["measured_bytes_per_token"]},
        "expanded": {"label": "this model's expanded per-head keys + values (not cached by either side)",
                     "helper_bytes_per_token": expanded_cache_bytes_per_token(MODEL),
                     "measured_bytes_per_token": None},
    }
    for entry in kv.values():
        entry["ratio_vs_hfext"] = entry["helper_bytes_per_token"] / hfext_kv
    metrics.update(kv_metrics(hfext_kv, {
        "deepseek": (deepseek_kv, "transformers DeepseekV3 (latent cache in 5.x: equal)"),
        "mha": (kv["mha"]["helper_bytes_per_token"], "MHA of the same width (16 KV heads x 64)"),
        "gqa": (kv["gqa"]["helper_bytes_per_token"], "GQA of the same width (4 KV heads x 64)"),
    }))

    checks["failures"] = _failures(checks)
    checks["passed"] = not checks["failures"]
    tables = _tables(contexts, metrics)
    tables["kv_bytes_per_token"] = kv
    tables["sections_seconds"] = sections
    tables["total_seconds"] = time.perf_counter() - started
    result = make_result(NAME, candidate="HfExt MLA (from_deepseek, auto: absorbed decode)",
                         peer=PEER_LABEL, settings=settings, metrics=metrics,
                         checks=checks, quick=quick)
    result["partial"] = partial
    result["tables"] = tables
    result["markdown_tables"] = _markdown_tables(tables, kv, MODEL)
    output = _output_dir(quick, partial)
    title = (f"MLA decode, DeepseekV3 shapes ({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
             f"{MODEL['num_attention_heads']} heads, d_c {MODEL['kv_lora_rank']}), fp32 CPU, batch 1, "
             f"{threads} thread{'s' if threads > 1 else ''}")
    plotted = plot(tables, output / f"{NAME}.png", title)
    if partial:  # save_result would rewrite RESULTS.md with a run of other settings
        path = output / f"{NAME}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    else:
        if plotted is not None and not quick:
            result["plots"] = [f"results/{NAME}.png"]
        path = save_result(result, BENCH_DIR)
    for entry in kv.values():
        print(f"KV bytes/token {entry['label']}: {entry['helper_bytes_per_token']:,} "
              f"({entry['ratio_vs_hfext']:.2f}x HfExt's)")
    print(f"total {tables['total_seconds']:.0f} s; passed={result['passed']}; results in {path}")
    return result


def _failures(checks: dict) -> list[str]:
    failures = []
    if checks.get("validation") and not checks["validation"]["passed"]:
        failures.append("validation")
    failures += [f"mla_implementation {c}" for c, r in checks.get("mla_implementation", {}).items() if not r["ok"]]
    failures += [f"reference cache {n}" for n, r in checks.get("reference_caches", {}).items()
                 if not r["matches_helper"]]
    failures += [f"context {c}" for c, r in checks.get("contexts", {}).items() if not r["passed"]]
    return failures


def _raise_on_failures(checks: dict) -> None:
    failures = _failures(checks)
    if failures:
        raise AssertionError(f"checks failed ({', '.join(failures)}): {checks}")


def _print_row(row: dict, label: str) -> None:
    print(f"{label}: HfExt {row['candidate']:,.1f} tokens/s ({row['candidate_median_seconds']:.3f} s), DeepSeek "
          f"{row['peer']:,.1f} tokens/s ({row['peer_median_seconds']:.3f} s), speed_ratio {row['speed_ratio']:.3f}"
          + (f" (goal {row['goal']}: {'pass' if row['passed'] else 'FAIL'})" if row["goal"] else ""), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
