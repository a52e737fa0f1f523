"""MLA decode speed: HfExt's absorbed MLA against transformers' `DeepseekV3Attention`, same weights, one process.

Both cache the same latent per token; transformers re-expands the whole cached latent into per-head keys and values
at every decode step, HfExt folds that expansion into the query and output ("absorbed") and reads the cache once.
Model: DeepseekV3ForCausalLM with DeepSeek-V2-Lite's attention at half its width (`tasks/mla_models.py`), fp32, CPU,
batch 1, sdpa, random weights. Per context L (full: 1024-16384, quick: 256, 512):

* ``decode_L``: tokens/s of `decode_steps` greedy steps from a cache prefilled with L tokens (cropped back to L
  before every call). Goal: speed_ratio (transformers' time / HfExt's time) >= 3 at L = 8192; others informational.
* ``prefill_L``: one forward pass, last-token logits. Goal: HfExt's time <= 1.1x transformers' (ratio >= 1/1.1).
* ``kv_bytes_per_token_vs_*``: HfExt's cache bytes per token against DeepSeek's (equal), an MHA and a GQA Llama.

Before timing, ``checks`` must pass (or the run stops): equal logits (1e-4) and greedy tokens on prefill and decode
steps, the absorbed kernel in every decode step and no prefill, caches holding what `kv_cache_bytes_per_token` says.

Run with ``python -m benchmarks.mla_decode_speed`` (8-9 minutes with one thread) or ``--quick`` (under a minute).
"""

import time

import torch

import hf_ext

from .harness import (compare, compare_peak_memory, configure_threads, informational_metric, log, main, make_result,
                      pyplot, save_result)
from .tasks.mla_models import (DTYPE, LOGIT_TOLERANCE, MODEL, REFERENCE_HEAD_DIM, REFERENCE_HEADS, ROPE_PARAMETERS,
                               Decoder, build_models, context_checks, expanded_cache_bytes_per_token, failures,
                               implementation_choice, raise_on_failures, reference_cache_bytes, validate)

NAME = "mla_decode_speed"
DECODE_GOAL = 3.0  # HfExt decode at least 3x as fast as transformers' …
DECODE_GOAL_CONTEXT = 8192  # … at an 8k context (the goal); other contexts are informational
PREFILL_MAX_TIME_RATIO = 1.1  # HfExt's prefill may take at most 1.1x transformers' time
PREFILL_GOAL = 1 / PREFILL_MAX_TIME_RATIO
# One peer label per result file (the harness's layout): the kv_bytes rows compare against other caches.
PEER_LABEL = "transformers DeepseekV3ForCausalLM, sdpa (kv_bytes rows: the cache named in the metric)"


def _schedule(prefill_rounds: int, prefill_warmup: int, decode_rounds: int, memory_repeats: int) -> dict:
    return dict(prefill_rounds=prefill_rounds, prefill_warmup=prefill_warmup, decode_rounds=decode_rounds,
                memory_repeats=memory_repeats)


# Per context, how often each comparison runs (about/mla_decode_speed.md says why so few rounds at long contexts).
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


def prefill(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The timed prefill: one forward pass, no cache, logits of the last token only."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    partial = not quick and settings != FULL  # a full run with overridden settings
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
    metrics, checks, decoders = {}, {"logit_tolerance": LOGIT_TOLERANCE, "contexts": {}, "mla_implementation": {}}, {}

    with torch.inference_mode():
        # 0. Same computation, and the intended forms, before anything is timed.
        section_start = time.perf_counter()
        checks["mla_implementation_setting"] = hfext.config.mla_implementation
        checks["validation"] = validate(hfext, deepseek, settings["validation_length"], settings["validation_steps"],
                                        seed)
        log(f"validation: {checks['validation']}")
        for context in contexts:
            checks["mla_implementation"][str(context)] = implementation_choice(hfext, context)
        references = reference_cache_bytes(MODEL, settings["reference_prompt_length"], seed)
        checks["reference_caches"] = references
        sections["validation"] = time.perf_counter() - section_start
        raise_on_failures(checks)

        for context in contexts:
            plan = schedule[context]
            ids = torch.randint(MODEL["vocab_size"], (1, context),
                                generator=torch.Generator().manual_seed(seed + context))

            # 1. Decode from a prefilled cache. The check call is the decoders' warm-up.
            section_start = time.perf_counter()
            pair = decoders[context] = (Decoder(hfext, ids, steps), Decoder(deepseek, ids, steps))
            sections[f"decode_{context}_prefills"] = time.perf_counter() - section_start
            checks["contexts"][str(context)] = context_checks(*pair, hfext_kv, deepseek_kv)
            raise_on_failures(checks)
            section_start = time.perf_counter()
            metrics[f"decode_{context}"] = compare(
                pair[0], pair[1], work=steps, unit="tokens/s", repeats=plan["decode_rounds"], warmup=0,
                min_speed_ratio=DECODE_GOAL if context == DECODE_GOAL_CONTEXT else None,
                description=f"{steps} greedy decode steps from a {context}-token cache: HfExt absorbed MLA vs "
                            "transformers DeepseekV3Attention")
            sections[f"decode_{context}_timing"] = time.perf_counter() - section_start
            _log_row(metrics[f"decode_{context}"], f"decode  L={context}")

            # 2. Prefill.
            section_start = time.perf_counter()
            row = compare(
                lambda: prefill(hfext, ids), lambda: prefill(deepseek, ids), work=context, unit="tokens/s",
                repeats=plan["prefill_rounds"], warmup=plan["prefill_warmup"], min_speed_ratio=PREFILL_GOAL,
                description=f"prefill of {context} tokens (one pass, last-token logits): HfExt vs transformers")
            row.update({"time_ratio": 1 / row["speed_ratio"], "max_time_ratio": PREFILL_MAX_TIME_RATIO})
            metrics[f"prefill_{context}"] = row
            sections[f"prefill_{context}_timing"] = time.perf_counter() - section_start
            _log_row(row, f"prefill L={context}")

        # 3. Peak memory of a decode call, after all timing (it fixes glibc's mmap threshold for the process).
        for context in contexts:
            section_start = time.perf_counter()
            metrics[f"decode_{context}"].update(compare_peak_memory(
                *decoders[context], repeats=schedule[context]["memory_repeats"], description=f"decode {context}"))
            sections[f"decode_{context}_memory"] = time.perf_counter() - section_start

    # 4. KV bytes per token: the helper's numbers and what the caches held after the prefills.
    last = checks["contexts"][str(contexts[-1])]
    kv = {
        "hfext_mla": {"label": "HfExt MLA (latent + rotary key)", "helper_bytes_per_token": hfext_kv,
                      "measured_bytes_per_token": last["hfext_cache_bytes_per_token"]},
        "deepseek": {"label": "transformers DeepSeek-V3 (5.x caches the latent too)",
                     "helper_bytes_per_token": deepseek_kv,
                     "measured_bytes_per_token": last["deepseek_cache_bytes_per_token"]},
        **{name: {"label": f"{name.upper()} Llama, {REFERENCE_HEADS[name]} KV heads x {REFERENCE_HEAD_DIM}",
                  "helper_bytes_per_token": references[name]["helper_bytes_per_token"],
                  "measured_bytes_per_token": references[name]["measured_bytes_per_token"]} for name in ("mha", "gqa")},
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

    checks["failures"] = failures(checks)
    checks["passed"] = not checks["failures"]
    tables = _tables(contexts, metrics)
    tables["kv_bytes_per_token"] = kv
    tables["sections_seconds"] = sections
    tables["total_seconds"] = time.perf_counter() - started
    result = make_result(NAME, candidate="HfExt MLA (from_deepseek, auto: absorbed decode)", peer=PEER_LABEL,
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["partial"] = partial
    result["tables"] = tables
    result["markdown_tables"] = _markdown_tables(tables, kv, MODEL)
    title = (f"MLA decode, DeepseekV3 shapes ({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
             f"{MODEL['num_attention_heads']} heads, d_c {MODEL['kv_lora_rank']}), fp32 CPU, batch 1, "
             f"{threads} thread{'s' if threads > 1 else ''}")
    save_result(result, plot(tables, title))
    for entry in kv.values():
        log(f"KV bytes/token {entry['label']}: {entry['helper_bytes_per_token']:,} "
            f"({entry['ratio_vs_hfext']:.2f}x HfExt's)")
    log(f"total {tables['total_seconds']:.0f} s; passed={result['passed']}")
    return result


def kv_metrics(ours: int, others: dict[str, tuple[int, str]]) -> dict:
    """RESULTS.md rows: HfExt MLA's cache bytes per token against each reference (informational)."""
    metrics = {}
    for name, (bytes_per_token, what) in others.items():
        metrics[f"kv_bytes_per_token_vs_{name}"] = informational_metric(
            f"KV-cache bytes per token (fp32, all {MODEL['num_hidden_layers']} layers): HfExt MLA vs {what}",
            "bytes/token", float(ours), float(bytes_per_token), bytes_per_token / ours,
            "peer bytes / candidate bytes; > 1 means HfExt's cache is smaller", candidate_bytes_per_token=ours,
            peer_bytes_per_token=bytes_per_token, cache_ratio=bytes_per_token / ours)
    return metrics


def _tables(contexts: list[int], metrics: dict) -> dict:
    """The per-context rows as columns: decode tokens/s and prefill seconds of both sides, and their ratios."""
    decode = [metrics[f"decode_{context}"] for context in contexts]
    prefill_ = [metrics[f"prefill_{context}"] for context in contexts]
    return {"contexts": contexts,
            "decode": {"hfext_tokens_per_second": [row["candidate"] for row in decode],
                       "deepseek_tokens_per_second": [row["peer"] for row in decode],
                       "speed_ratio": [row["speed_ratio"] for row in decode],
                       "hfext_seconds_per_step": [1 / row["candidate"] for row in decode],
                       "deepseek_seconds_per_step": [1 / row["peer"] for row in decode]},
            "prefill": {"hfext_seconds": [row["candidate_median_seconds"] for row in prefill_],
                        "deepseek_seconds": [row["peer_median_seconds"] for row in prefill_],
                        "speed_ratio": [row["speed_ratio"] for row in prefill_],
                        "time_ratio": [row["time_ratio"] for row in prefill_]}}


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
    for entry in kv.values():
        measured = entry.get("measured_bytes_per_token")
        kv_rows.append(f"| {entry['label']} | {entry['helper_bytes_per_token']:,} | "
                       f"{'—' if measured is None else f'{measured:,.0f}'} | {entry['ratio_vs_hfext']:.2f}x |")
    return ["\n".join(rows), "\n".join(kv_rows)]


def plot(tables: dict, title: str):
    """Decode tokens/s of both sides and the decode and prefill speed ratios against the context."""
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
    return figure


def _log_row(row: dict, label: str) -> None:
    log(f"{label}: HfExt {row['candidate']:,.1f} tokens/s ({row['candidate_median_seconds']:.3f} s), DeepSeek "
        f"{row['peer']:,.1f} tokens/s ({row['peer_median_seconds']:.3f} s), speed_ratio {row['speed_ratio']:.3f}"
        + (f" (goal {row['goal']}: {'pass' if row['passed'] else 'FAIL'})" if row["goal"] else ""))


if __name__ == "__main__":
    main()
