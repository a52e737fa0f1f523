"""GQA → MLA conversion of SmolLM2-135M: held-out perplexity vs KV-cache bytes per token, before and after healing.

`hf_ext.convert.to_mla` keeps ``qk_rope_head_dim / 2`` rotary frequencies per head and factors the rest of the keys
and the values into a ``kv_lora_rank`` latent; per token and layer the cache holds ``kv_lora_rank + n_kv ·
qk_rope_head_dim`` elements instead of 2 · n_kv · head_dim = 384. Measured (fp32, CPU, held-out Python documentation,
perplexity = exp of the token-weighted mean next-token cross-entropy):

* the original GQA model, and the exact conversion (defaults) as a check: max |Δlogit| ≤ 1e-4, same cache;
* a ladder of compressed ``(qk_rope_head_dim, kv_lora_rank)`` settings (about 25-70 % of the GQA cache), converted
  training-free with a plain weight SVD and calibrated on training-split text;
* the ``heal`` settings after a short Lion fine-tune, against the original given the *identical* fine-tune;
* ``deepseek_ladder``: ``to_mla(..., output_format="deepseek")``, evaluated as transformers' own
  ``DeepseekV3ForCausalLM`` (one rotary key shared by all heads, so ``kv_lora_rank + qk_rope_head_dim`` elements
  per token and layer, and DeepSeek's RMSNorm on the latent), without and with calibration, no healing.

RESULTS.md rows: ratio = peer PPL / candidate PPL (> 1: the MLA model predicts better), informational, no goal.
Run with ``python -m benchmarks.mla_conversion_quality`` (about 33 minutes on 2 cores, one thread) or ``--quick`` (a tiny
random Llama over bytes of the same text: every code path in seconds, not a measurement).
"""

import copy
import math
import os
import time
import warnings

import torch

import hf_ext

from .harness import (THREADS_ENVIRONMENT_VARIABLE, configure_threads, informational_metric, log, main, make_result,
                      pyplot, save_result)
from .tasks.mla_healing import cache_sizes, evaluate, heal, load_model, split_blocks

NAME = "mla_conversion_quality"
CANDIDATE = "hf_ext.convert.to_mla (MLA, compressed KV cache)"
PEER = "the GQA source model (original, or equally fine-tuned)"

FULL = {
    "model": "smollm2-135m",
    # (qk_rope_head_dim, kv_lora_rank): cache kv_lora_rank + 3 · qk_rope_head_dim of 384 elements per token and layer
    # = 66.7 %, 54.2 %, 45.8 %, 31.3 %, 22.9 % of SmolLM2's GQA cache.
    "ladder": ((32, 160), (16, 160), (16, 128), (8, 96), (8, 64)),
    "heal": ((16, 128), (8, 64)),  # calibrated conversions that get the healing fine-tune
    # output_format="deepseek" (one shared rotary key, latent RMSNorm): cache kv_lora_rank + qk_rope_head_dim of 384
    # = 100 %, 66.7 %, 66.7 %, 45.8 % of SmolLM2's GQA cache.
    "deepseek_ladder": ((64, 320), (64, 192), (32, 224), (32, 144)),
    "block_size": 256, "eval_blocks": 32, "eval_batch_size": 4,
    "max_eval_blocks_per_file": 2, "max_train_blocks_per_file": 4, "calibration_blocks": 8,
    # healing: Lion, linear warm-up then constant (about/mla_conversion_quality.md says why this learning rate)
    "heal_steps": 40, "heal_batch_size": 4, "heal_parameters": "attention",  # or "all"
    "learning_rate": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.01, "warmup_steps": 3,
    "exact_tolerance": 1e-4, "seed": 0,
}
QUICK = {**FULL, "model": "tiny-llama", "ladder": ((8, 24), (4, 16)), "heal": ((4, 16),),
         "deepseek_ladder": ((8, 24),), "block_size": 64,
         "eval_blocks": 4, "eval_batch_size": 2, "calibration_blocks": 2, "heal_steps": 3, "heal_batch_size": 2,
         "warmup_steps": 1}


def run(settings: dict, quick: bool = False) -> dict:
    settings = copy.deepcopy(settings)
    heal_set = {tuple(pair) for pair in settings["heal"]}
    unknown = heal_set - {tuple(pair) for pair in settings["ladder"]}
    if unknown:
        raise ValueError(f"heal settings {sorted(unknown)} are not on the ladder {settings['ladder']}")
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # a forward pass took 5.5 s with one thread, 11-14 s with two on the shared machine
    threads = configure_threads()
    torch.manual_seed(settings["seed"])
    sections, started = {}, time.perf_counter()
    mark = started  # the end of the previous lap

    def lap(name: str) -> float:
        nonlocal mark
        sections[name], mark = time.perf_counter() - mark, time.perf_counter()
        return sections[name]

    original, tokenizer, model_description = load_model(settings["model"], settings["seed"])
    original.requires_grad_(False)
    lap("load")
    data = split_blocks(tokenizer, settings)
    lap("data")
    config = original.config
    settings.update({"model_description": model_description, "dtype": "float32", "device": "cpu",
                     "threads": threads, "data": data["report"],
                     "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                     "num_key_value_heads": config.num_key_value_heads, "num_hidden_layers": config.num_hidden_layers,
                     "optimizer": f"hf_ext.optim.Lion, betas {tuple(settings['betas'])}, linear warm-up over "
                                  f"{settings['warmup_steps']} steps then constant, no gradient clipping"})
    log(f"{model_description}; {threads} threads; data {data['report']} ({sections['data']:.0f} s)")
    gqa_bytes = hf_ext.kv_cache_bytes_per_token(config, dtype=torch.float32)

    # 1. The original and the exact conversion, on the same batches.
    exact_model = hf_ext.convert.to_mla(original)
    joint = evaluate(exact_model, data["eval_batches"], reference=original)
    reference = {
        "original": {"ppl": joint["reference_ppl"], "nll": joint["reference_nll"], "tokens": joint["tokens"],
                     **cache_sizes(config, gqa_bytes)},
        "exact": {"ppl": joint["ppl"], "nll": joint["nll"], "tokens": joint["tokens"],
                  "max_abs_logit_diff": joint["max_abs_logit_diff"],
                  "qk_rope_head_dim": exact_model.config.qk_rope_head_dim,
                  "kv_lora_rank": exact_model.config.kv_lora_rank, **cache_sizes(exact_model.config, gqa_bytes)},
    }
    del exact_model
    log(f"original PPL {reference['original']['ppl']:.4f}; exact MLA PPL {reference['exact']['ppl']:.4f}, max "
        f"|Δlogit| {joint['max_abs_logit_diff']:.2e} ({lap('original_and_exact'):.0f} s)")

    # 2. The ladder: plain and calibrated conversions; healing of the calibrated ones listed in `heal`.
    ladder, healing = [], {}
    for rope, rank in settings["ladder"]:
        name = _setting_name(rope, rank)
        row = {"qk_rope_head_dim": rope, "kv_lora_rank": rank}
        for variant, calibration in (("plain", None), ("calibrated", data["calibration_input_ids"])):
            convert_start = time.perf_counter()
            model = hf_ext.convert.to_mla(original, kv_lora_rank=rank, qk_rope_head_dim=rope,
                                          calibration_input_ids=calibration)
            convert_seconds = time.perf_counter() - convert_start
            row.update(cache_sizes(model.config, gqa_bytes))
            row[variant] = {**evaluate(model, data["eval_batches"]), "convert_seconds": convert_seconds}
            if variant == "calibrated" and (rope, rank) in heal_set:
                healing[f"MLA {name}"] = heal(model, data["heal_batches"], settings)
                row["healed"] = evaluate(model, data["eval_batches"])
                row["healed_kv_bytes_per_token_fp32"] = hf_ext.kv_cache_bytes_per_token(model.config,
                                                                                        dtype=torch.float32)
            del model
        ladder.append(row)
        healed = (f", healed {row['healed']['ppl']:.3f} ({healing[f'MLA {name}']['seconds_per_step']:.1f} s/step)"
                  if row.get("healed") else "")
        log(f"{name:<18} {row['kv_bytes_per_token_fp32']:>7,} B/token fp32 ({row['fraction_of_gqa'] * 100:5.1f} % "
            f"of GQA): PPL plain {row['plain']['ppl']:.3f}, calibrated {row['calibrated']['ppl']:.3f}{healed} "
            f"({lap(name):.0f} s)")

    # 3. The DeepSeek-V3 export (transformers' DeepseekV3ForCausalLM), training-free, plain and calibrated.
    deepseek_ladder = []
    for rope, rank in settings["deepseek_ladder"]:
        row = {"qk_rope_head_dim": rope, "kv_lora_rank": rank}
        for variant, calibration in (("plain", None), ("calibrated", data["calibration_input_ids"])):
            convert_start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the plain variant's advice to calibrate: measured here instead
                model = hf_ext.convert.to_mla(original, kv_lora_rank=rank, qk_rope_head_dim=rope,
                                              calibration_input_ids=calibration, output_format="deepseek")
            convert_seconds = time.perf_counter() - convert_start
            row.update(cache_sizes(model.config, gqa_bytes))
            row[variant] = {**evaluate(model, data["eval_batches"]), "convert_seconds": convert_seconds}
            del model
        deepseek_ladder.append(row)
        log(f"DeepSeek {_setting_name(rope, rank):<18} {row['kv_bytes_per_token_fp32']:>7,} B/token fp32 "
            f"({row['fraction_of_gqa'] * 100:5.1f} % of GQA): PPL plain {row['plain']['ppl']:.3f}, calibrated "
            f"{row['calibrated']['ppl']:.3f} ({lap('deepseek ' + _setting_name(rope, rank)):.0f} s)")

    # 4. The honesty control: the original with the identical fine-tune.
    fine_tuned_gqa = None
    if heal_set:
        control = copy.deepcopy(original)
        healing["GQA original"] = heal(control, data["heal_batches"], settings)
        fine_tuned_gqa = evaluate(control, data["eval_batches"])
        del control
        log(f"GQA with the identical fine-tune: PPL {fine_tuned_gqa['ppl']:.4f} "
            f"({lap('fine_tuned_gqa'):.0f} s)")

    # Checks.
    tolerance = settings["exact_tolerance"]
    exact_ok = joint["max_abs_logit_diff"] <= tolerance and abs(joint["nll"] - joint["reference_nll"]) <= 1e-5
    all_ppl = [reference["original"]["ppl"], reference["exact"]["ppl"]] + [
        row[v]["ppl"] for row in ladder + deepseek_ladder for v in ("plain", "calibrated", "healed") if row.get(v)] + (
        [fine_tuned_gqa["ppl"]] if fine_tuned_gqa else [])
    layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    checks = {
        "exact_conversion": {
            "max_abs_logit_diff": joint["max_abs_logit_diff"], "tolerance": tolerance,
            "nll_abs_diff": abs(joint["nll"] - joint["reference_nll"]),
            "ppl_original": reference["original"]["ppl"], "ppl_exact": reference["exact"]["ppl"],
            "same_kv_bytes": reference["exact"]["kv_bytes_per_token_fp32"] == gqa_bytes,
            "passed": bool(exact_ok),
        },
        # kv_lora_rank + n_kv · qk_rope_head_dim elements per token and layer, 4 bytes each in fp32
        "kv_bytes_formula": all(row["kv_bytes_per_token_fp32"] == 4 * layers * (
            row["kv_lora_rank"] + n_kv * row["qk_rope_head_dim"]) for row in ladder),
        # DeepSeek's single shared rotary key: kv_lora_rank + qk_rope_head_dim
        "deepseek_kv_bytes_formula": all(row["kv_bytes_per_token_fp32"] == 4 * layers * (
            row["kv_lora_rank"] + row["qk_rope_head_dim"]) for row in deepseek_ladder),
        "healing_keeps_cache": all(row["healed_kv_bytes_per_token_fp32"] == row["kv_bytes_per_token_fp32"]
                                   for row in ladder if row.get("healed")),
        "split_by_file": not set(data["eval_files"]) & set(data["train_files"]),
        "same_healing_batches": {"digest": data["report"]["train_digest"], "runs": sorted(healing)},
        "all_finite": all(math.isfinite(p) for p in all_ppl) and all(r["finite"] for r in healing.values()),
    }
    if not exact_ok:
        log(f"WARNING: the exact conversion is not exact: {checks['exact_conversion']}")

    result = make_result(NAME, candidate=CANDIDATE, peer=PEER, settings=settings,
                         metrics=make_metrics(reference, ladder, fine_tuned_gqa, deepseek_ladder), checks=checks, quick=quick)
    sections["total"] = time.perf_counter() - started
    result["tables"] = {
        "units": "perplexity = exp(token-weighted mean next-token cross-entropy in nats) on the held-out blocks; "
                 "KV bytes per token summed over layers",
        "reference": reference, "ladder": ladder, "deepseek_ladder": deepseek_ladder,
        "fine_tuned_gqa": fine_tuned_gqa, "healing": healing,
        "eval_files": data["eval_files"], "sections_seconds": sections}
    result["markdown_tables"] = [markdown_table(reference, ladder, fine_tuned_gqa, settings, deepseek_ladder)]
    log(result["markdown_tables"][0])
    model_name = "SmolLM2-135M" if settings["model"] == "smollm2-135m" else settings["model"]
    figure = plot(reference, ladder, fine_tuned_gqa, healing, deepseek_ladder,
                  f"{model_name} → MLA: held-out perplexity vs KV cache ({settings['eval_blocks']}×"
                  f"{settings['block_size']} tokens of held-out Python docs)")
    save_result(result, figure, started)
    return result


def _setting_name(rope: int, rank: int) -> str:
    return f"rope {rope} / rank {rank}"


def _ppl_metric(description: str, candidate: float, peer: float) -> dict:
    return informational_metric(description, "PPL", candidate, peer, peer / candidate,
                                "peer PPL / candidate PPL; > 1 means the MLA model is better")


def make_metrics(reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None,
                 deepseek_ladder: list[dict] = ()) -> dict:
    """One informational RESULTS.md row for the exact conversion, every calibrated setting and every healed one."""
    metrics = {"exact conversion vs original": _ppl_metric(
        "held-out perplexity of the exact conversion (qk_rope_head_dim = head_dim, kv_lora_rank = n_kv·head_dim) "
        "against the original", reference["exact"]["ppl"], reference["original"]["ppl"])}
    for row in ladder:
        name, share = _setting_name(row["qk_rope_head_dim"], row["kv_lora_rank"]), row["fraction_of_gqa"] * 100
        metrics[f"training-free calibrated {name} ({share:.0f}% cache) vs original"] = _ppl_metric(
            f"held-out perplexity, calibrated conversion without training, {share:.1f} % of the GQA cache, against "
            "the original GQA model", row["calibrated"]["ppl"], reference["original"]["ppl"])
    for row in deepseek_ladder:
        name, share = _setting_name(row["qk_rope_head_dim"], row["kv_lora_rank"]), row["fraction_of_gqa"] * 100
        metrics[f"DeepSeek-V3 export, calibrated {name} ({share:.0f}% cache) vs original"] = _ppl_metric(
            f"held-out perplexity of to_mla(output_format='deepseek') loaded as transformers' DeepseekV3ForCausalLM "
            f"(one shared rotary key, latent RMSNorm), calibrated, without training, {share:.1f} % of the GQA "
            "cache, against the original GQA model", row["calibrated"]["ppl"], reference["original"]["ppl"])
    for row in ladder:
        if row.get("healed") and fine_tuned_gqa:
            name, share = _setting_name(row["qk_rope_head_dim"], row["kv_lora_rank"]), row["fraction_of_gqa"] * 100
            metrics[f"healed {name} ({share:.0f}% cache) vs equally fine-tuned GQA"] = _ppl_metric(
                f"held-out perplexity after the healing fine-tune, {share:.1f} % of the GQA cache, against the "
                "original GQA model given the identical fine-tune", row["healed"]["ppl"], fine_tuned_gqa["ppl"])
    return metrics


def _ppl(value) -> str:
    if value is None:
        return "—"
    return f"{value:,.1f}" if value >= 1000 else f"{value:.3f}" if value < 100 else f"{value:.2f}"


def markdown_table(reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None, settings: dict,
                   deepseek_ladder: list[dict] = ()) -> str:
    heal_note = (f"healed = calibrated conversion + {settings['heal_steps']} Lion steps of "
                 f"{settings['heal_batch_size']}×{settings['block_size']} tokens ({settings['heal_parameters']} "
                 f"parameters, lr {settings['learning_rate']:g})")
    rows = [f"Held-out perplexity ({settings['eval_blocks']} blocks of {settings['block_size']} tokens from held-out "
            f"Python documentation files) vs KV cache per token; {heal_note}. Fine-tuned GQA: the original given the "
            "identical fine-tune (the fair reference for healed rows).", "",
            "| model / setting (qk_rope_head_dim, kv_lora_rank) | KV elements / token / layer | KV bytes / token fp32 "
            "| bf16 | % of GQA | PPL training-free, plain SVD | PPL training-free, calibrated | PPL healed |",
            "|---|---|---|---|---|---|---|---|"]

    def sizes(row, share=None):
        share = share or f"{row['fraction_of_gqa'] * 100:.1f} %"
        return (f"{row['kv_elements_per_token_per_layer']} | {row['kv_bytes_per_token_fp32']:,} | "
                f"{row['kv_bytes_per_token_bf16']:,} | {share}")

    original, exact = reference["original"], reference["exact"]
    rows.append(f"| original GQA | {sizes(original, '100 %')} | {_ppl(original['ppl'])} (original) | — | "
                f"{_ppl(fine_tuned_gqa['ppl']) + ' (fine-tuned GQA)' if fine_tuned_gqa else '—'} |")
    rows.append(f"| exact MLA ({exact['qk_rope_head_dim']}, {exact['kv_lora_rank']}) | {sizes(exact)} | "
                f"{_ppl(exact['ppl'])} | — | — |")
    for row in ladder:
        rows.append(f"| MLA ({row['qk_rope_head_dim']}, {row['kv_lora_rank']}) | {sizes(row)} | "
                    f"{_ppl(row['plain']['ppl'])} | {_ppl(row['calibrated']['ppl'])} | "
                    f"{_ppl(row['healed']['ppl']) if row.get('healed') else '—'} |")
    for row in deepseek_ladder:
        rows.append(f"| DeepSeek-V3 export ({row['qk_rope_head_dim']}, {row['kv_lora_rank']}) | {sizes(row)} | "
                    f"{_ppl(row['plain']['ppl'])} (no calibration) | {_ppl(row['calibrated']['ppl'])} | — |")
    return "\n".join(rows)


def plot(reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None, healing: dict,
         deepseek_ladder: list[dict], title: str):
    """Left: perplexity vs KV bytes per token (plain, calibrated, healed MLA; original and fine-tuned GQA).
    Right: the healing runs' training losses."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    kib = lambda row: row["kv_bytes_per_token_fp32"] / 1024  # noqa: E731
    rows = sorted(ladder, key=kib)
    xs = [kib(r) for r in rows]
    left.plot(xs, [r["plain"]["ppl"] for r in rows], marker="x", linestyle="--", color="tab:red",
              label="MLA training-free, plain SVD")
    left.plot(xs, [r["calibrated"]["ppl"] for r in rows], marker="o", color="tab:blue",
              label="MLA training-free, calibrated")
    if deepseek_ladder:
        exports = sorted(deepseek_ladder, key=kib)
        left.plot([kib(r) for r in exports], [r["calibrated"]["ppl"] for r in exports], marker="^",
                  color="tab:purple", label="DeepSeek-V3 export, calibrated")
        for r in exports:
            left.annotate(f"({r['qk_rope_head_dim']},{r['kv_lora_rank']})", (kib(r), r["calibrated"]["ppl"]),
                          textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:purple")
    healed = [r for r in rows if r.get("healed")]
    if healed:
        left.plot([kib(r) for r in healed], [r["healed"]["ppl"] for r in healed], marker="*", markersize=12,
                  linestyle="none", color="tab:green", label="MLA calibrated + healing fine-tune")
    original = reference["original"]
    left.plot([kib(original)], [original["ppl"]], marker="s", markersize=9, color="black", linestyle="none",
              label="original GQA")
    left.plot([kib(reference["exact"])], [reference["exact"]["ppl"]], marker="s", markersize=14, color="black",
              fillstyle="none", linestyle="none", label="exact MLA conversion")
    left.axhline(original["ppl"], color="black", linewidth=0.8, linestyle=":")
    if fine_tuned_gqa:
        left.plot([kib(original)], [fine_tuned_gqa["ppl"]], marker="D", markersize=8, color="tab:green",
                  linestyle="none", label="GQA, identical fine-tune")
        left.axhline(fine_tuned_gqa["ppl"], color="tab:green", linewidth=0.8, linestyle=":")
    for r in rows:
        left.annotate(f"({r['qk_rope_head_dim']},{r['kv_lora_rank']})", (kib(r), r["calibrated"]["ppl"]),
                      textcoords="offset points", xytext=(4, 6), fontsize=8)
    left.set_yscale("log")
    left.set_xlabel("KV cache per token, fp32 (KiB); labels: (qk_rope_head_dim, kv_lora_rank)")
    left.set_ylabel("held-out perplexity (log scale)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    top = left.secondary_xaxis("top", functions=(lambda x: x / kib(original) * 100,
                                                 lambda p: p * kib(original) / 100))
    top.set_xlabel("% of the GQA cache")
    for name, run_record in healing.items():
        right.plot(range(1, len(run_record["train_loss"]) + 1), run_record["train_loss"], label=name)
    right.set_xlabel("healing step")
    right.set_ylabel("training loss (nats)")
    right.set_title("healing fine-tune", fontsize=10)
    right.grid(True, alpha=0.3)
    if healing:
        right.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
