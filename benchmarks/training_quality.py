"""Training quality on real text: Lion vs AdamW, and the tail-capped (TaiLr) loss vs cross-entropy on noisy labels.

Short `Trainer` runs of a small HfExt model on the Python documentation (a byte-level BPE of 4096 tokens, blocks of
128), every run from the same initial weights and through the same batches, answer two questions:

1. Does `hf_ext.optim.Lion`, with hyper-parameters from `adamw_to_lion` (factor 1, 3 and 10), reach AdamW's held-out
   loss in the same number of steps?
2. With 15 % of the training *labels* replaced by random tokens, does `hf_ext.losses.TailCappedLoss` (TaiLr, passed as
   ``compute_loss_func``) reach a lower *clean* held-out loss than cross-entropy, as the TaiLr paper claims? The same
   losses on clean labels show what TaiLr costs without noise.

The number reported per run is the mean next-token cross-entropy (nats) on held-out clean blocks after the last step;
the metric rows (informational, no goal) give ratio = peer loss / candidate loss, > 1: the candidate is better. One
more AdamW run with seed 1 shows how far the loss moves from the seed alone; smaller differences are not evidence.

Run with ``python -m benchmarks.training_quality`` (eleven trainings, 12-13 minutes on 2 CPU cores with one torch
thread) or ``--quick`` (a tiny model for a few steps: a smoke test, not a measurement).
"""

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from hf_ext.hub import parameter_count
from hf_ext.models.hfext import HfExtForCausalLM

from .harness import (THREADS_ENVIRONMENT_VARIABLE, configure_threads, informational_metric, log, main, make_result,
                      pyplot, save_result)
from .tasks.text_training import (Blocks, factor_label, load_data, mean_loss, model_config, noisy_labels, run_specs,
                                  tailr_name, train_one)

NAME = "training_quality"
CANDIDATE = "hf_ext Lion (adamw_to_lion) / TailCappedLoss (per metric)"
PEER = "AdamW (adamw_torch) / cross-entropy, same init, data order and budget"

FULL = {
    "vocab_size": 4096,
    "block_size": 128,
    "max_characters": 3_000_000,
    "eval_blocks": 256,
    # hfext-small with hidden size 256 is 3.95 M parameters and 0.33 s per step of 8 blocks on one thread here;
    # narrowed to 128 it is 1.25 M and 0.12 s, which fits nine runs of 500 steps in the time budget.
    "model": {"preset": "hfext-small", "overrides": {"hidden_size": 128, "intermediate_size": 344, "head_dim": 32}},
    "steps": 400,
    "batch_size": 8,
    "warmup_fraction": 0.1,
    "adamw_learning_rate": 2e-3,
    "adamw_weight_decay": 0.01,
    # 3 is adamw_to_lion's default, 10 the other end of the paper's range, 1 keeps AdamW's learning rate.
    "lion_factors": (1.0, 3.0, 10.0),
    "lion_betas": (0.9, 0.99),
    "label_noise": 0.15,
    # TailCappedLoss settings as (gamma, min_weight): min_weight 0 is the pure TaiLr weight; 0.2 is the floor the
    # TaiLr paper's scripts use ("density min weight" 0.2-0.3); γ = 1e-7 with floor 0.2 is the paper's setting for
    # training from scratch (its synthetic and WritingPrompts scripts). Every noisy setting also trains on clean
    # labels unless listed in clean_skip (to stay within the time budget).
    "tailr": ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1e-7, 0.2)),
    "clean_skip": ((0.5, 0.0),),
    "eval_every": 100,
    "seed": 0,
    "spread_seeds": (1,),
}
QUICK = {
    **FULL,
    "vocab_size": 512,
    "max_characters": 150_000,
    "eval_blocks": 16,
    "model": {"preset": "hfext-tiny", "overrides": {}},
    "steps": 4,
    "batch_size": 4,
    "lion_factors": (3.0,),
    "tailr": ((0.1, 0.0),),
    "clean_skip": (),
    "eval_every": 2,
    "spread_seeds": (),
}


def _metric(description: str, candidate: float, peer: float) -> dict:
    return informational_metric(description, "nats", candidate, peer, peer / candidate,
                                "peer loss / candidate loss; > 1 means the candidate is better",
                                difference=candidate - peer)


def loss_metrics(runs: dict[str, dict], settings: dict) -> dict:
    """RESULTS.md rows (informational): Lion vs AdamW, TaiLr vs CE on noisy and on clean labels."""
    pct = f"{settings['label_noise'] * 100:g}%"
    reference = runs["AdamW, CE, clean"]["final_eval_loss"]
    metrics = {}
    for factor in settings["lion_factors"]:
        name = f"Lion ×{factor_label(factor)}, CE, clean"
        metrics[f"eval loss: Lion (adamw_to_lion ×{factor_label(factor)}) vs AdamW"] = _metric(
            f"clean held-out cross-entropy after {settings['steps']} steps; Lion lr/weight decay from "
            f"adamw_to_lion(AdamW lr, wd, factor={factor_label(factor)})", runs[name]["final_eval_loss"], reference)
    noisy_ce = runs[f"AdamW, CE, {pct} noisy labels"]["final_eval_loss"]
    for gamma, min_weight in settings["tailr"]:
        loss = tailr_name(gamma, min_weight)
        metrics[f"clean eval loss, {pct} noisy labels: {loss} vs CE"] = _metric(
            f"clean held-out cross-entropy after training on labels with {pct} random tokens; "
            f"TailCappedLoss(gamma={gamma:g}, min_weight={min_weight:g}) vs cross-entropy",
            runs[f"AdamW, {loss}, {pct} noisy labels"]["final_eval_loss"], noisy_ce)
    for gamma, min_weight in settings["tailr"]:
        loss = tailr_name(gamma, min_weight)
        if f"AdamW, {loss}, clean" in runs:
            metrics[f"clean eval loss, clean labels: {loss} vs CE"] = _metric(
                f"clean held-out cross-entropy after training on clean labels; "
                f"TailCappedLoss(gamma={gamma:g}, min_weight={min_weight:g}) vs cross-entropy",
                runs[f"AdamW, {loss}, clean"]["final_eval_loss"], reference)
    return metrics


def markdown_table(runs: list[dict], settings: dict, data_report: dict, parameters: int,
                   spread_runs: list[dict]) -> str:
    reference = runs[0]["final_eval_loss"]
    model = settings["model"]
    lines = [
        f"Mean next-token cross-entropy (nats) on {data_report['data']['eval_blocks']} clean held-out blocks of "
        f"{settings['block_size']} tokens of the Python documentation, after {settings['steps']} Trainer steps of "
        f"{settings['batch_size']} blocks; HfExt {model['preset']} {model['overrides']} ({parameters / 1e6:.2f} M "
        "parameters). Same initial weights and batch order for every seed-0 run; Lion's hyper-parameters from "
        f"`adamw_to_lion(lr, wd, factor)`; noisy rows: {settings['label_noise'] * 100:g}% of the training labels "
        "replaced by uniformly random tokens (inputs clean). Δ = row − reference (AdamW, CE, clean); negative is "
        "better.",
        "",
        "| run | optimizer | lr | weight decay | training loss | label noise | clean eval loss | Δ vs reference | "
        "accuracy % | median token loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['name']} | {run['optimizer']} | {run['learning_rate']:.3g} | {run['weight_decay']:.3g} | "
            f"{run['loss']} | {run['label_noise'] * 100:g}% | {run['final_eval_loss']:.4f} | "
            f"{run['final_eval_loss'] - reference:+.4f} | {run['final_eval_accuracy']:.2f} | "
            f"{run['final_eval_median_token_loss']:.3f} | {run['seconds']:.0f} |"
        )
    if spread_runs:
        losses = [r["final_eval_loss"] for r in spread_runs]
        accuracies = [r["final_eval_accuracy"] for r in spread_runs]
        lines += ["", f"Seed spread (AdamW, CE, clean; other initial weights and data order): final losses "
                      f"{', '.join(f'{x:.4f}' for x in losses)} (range {max(losses) - min(losses):.4f} nats), "
                      f"accuracies {', '.join(f'{x:.2f}' for x in accuracies)} % (range "
                      f"{max(accuracies) - min(accuracies):.2f} points). Differences of that size are within "
                      "run-to-run noise (the rows of one seed share initial weights and batches, so their paired "
                      "differences are less noisy than that)."]
    return "\n".join(lines)


def plot(runs: list[dict], settings: dict, title: str):
    """Clean held-out loss vs step: optimizers on the left, loss functions (clean and noisy labels) on the right."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = (
        ("optimizers (cross-entropy, clean labels)", [r for r in runs if r["loss"] == "cross-entropy"
                                                       and r["label_noise"] == 0]),
        ("losses (AdamW; dashed: clean labels, solid: noisy)", [r for r in runs if r["optimizer"] == "AdamW"
                                                                 and r["seed"] == settings["seed"]]),
    )
    colors = plt.get_cmap("tab10").colors
    for axis, (panel_title, panel_runs) in zip(axes, panels):
        for index, run in enumerate(panel_runs):
            steps = sorted(run["eval_curve"])
            style = "--" if run["label_noise"] == 0 and panel_title.startswith("losses") else "-"
            if run["seed"] != settings["seed"]:
                style = ":"
            axis.plot(steps, [run["eval_curve"][s] for s in steps], marker="o", linestyle=style,
                      color=colors[index % len(colors)], label=f"{run['name']}: {run['final_eval_loss']:.3f}")
        axis.set_title(panel_title)
        axis.set_xlabel("training step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("cross-entropy on clean held-out text (nats)")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def run(settings: dict, quick: bool = False) -> dict:
    """Every training of `run_specs`, then the result document."""
    started = time.perf_counter()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # one thread unless asked otherwise (about/training_quality.md)
    threads = configure_threads()
    settings.update({"threads": threads, "device": "cpu", "dtype": "float32"})
    data = load_data(settings)
    settings["data"] = {"source": "Python 3.11 documentation sources (python_doc_files), tasks.text_training.load_data",
                        **data.report["text"], **data.report["data"],
                        "tokenizer": f"byte-level BPE, vocab {data.report['tokenizer']['vocab_size']}",
                        "train_tokens_per_run": settings["steps"] * settings["batch_size"] * settings["block_size"]}
    log(f"data: {settings['data']} ({time.perf_counter() - started:.0f} s)")

    # Labels: clean, and one noisy copy shared by every noisy run.
    clean = Blocks(data.train_input_ids, data.train_input_ids.clone())
    noise_generator = torch.Generator().manual_seed(settings["seed"])
    noisy_label_ids, replaced = noisy_labels(data.train_input_ids, settings["label_noise"], len(data.tokenizer),
                                             noise_generator)
    noisy = Blocks(data.train_input_ids, noisy_label_ids)
    changed = noisy_label_ids != data.train_input_ids
    # Position 0 of a block is never a target (labels are shifted inside the loss); count targets only.
    noise_check = {"requested": settings["label_noise"],
                   "replaced_target_fraction": replaced[:, 1:].float().mean().item(),
                   "changed_target_fraction": changed[:, 1:].float().mean().item(),
                   "inputs_unchanged": bool(torch.equal(noisy.input_ids, data.train_input_ids))}

    initial_models = {}
    config = model_config(settings, data.tokenizer)
    for seed in sorted({spec.seed for spec in run_specs(settings)}):
        torch.manual_seed(seed)
        initial_models[seed] = HfExtForCausalLM(config)
    parameters = parameter_count(initial_models[settings["seed"]])
    initial_loss = {seed: mean_loss(model, data.eval_blocks, 2 * settings["batch_size"])
                    for seed, model in initial_models.items()}
    settings["parameters"] = parameters
    log(f"model: {parameters / 1e6:.2f} M parameters; initial clean held-out loss {initial_loss}")

    runs = []
    with tempfile.TemporaryDirectory() as output_dir:
        for spec in run_specs(settings):
            record = train_one(spec, initial_models[spec.seed], noisy if spec.label_noise else clean, data, settings,
                               Path(output_dir) / "trainer", quick)
            record["eval_curve"] = {0: initial_loss[spec.seed], **record["eval_curve"]}
            runs.append(record)
    by_name = {r["name"]: r for r in runs}

    seed0 = [r for r in runs if r["seed"] == settings["seed"]]
    spread_runs = [r for r in runs if r["loss"] == "cross-entropy" and r["optimizer"] == "AdamW"
                   and r["label_noise"] == 0]
    spread = [r["final_eval_loss"] for r in spread_runs]
    checks = {
        "same_data_order": len({r["data_order_digest"] for r in seed0}) == 1,
        "batches_per_run": sorted({r["batches"] for r in runs}),
        "label_noise": noise_check,
        "initial_eval_loss": {str(k): v for k, v in initial_loss.items()},
        "optimizer_classes": {r["name"]: r["optimizer_class"] for r in runs},
        # token_statistics and mean_loss compute the same mean cross-entropy
        "final_eval_recomputed_max_abs_diff": max(abs(r["final_eval_loss"] - r["final_eval_loss_recomputed"])
                                                  for r in runs),
    }
    if not checks["same_data_order"]:
        raise AssertionError("The seed-0 runs did not see the same batches; the comparison would not be fair.")

    log(f"\n{'run':<52}{'clean eval loss':>16}{'Δ vs AdamW CE clean':>22}{'accuracy %':>12}{'median':>9}")
    for r in runs:
        log(f"{r['name']:<52}{r['final_eval_loss']:>16.4f}{r['final_eval_loss'] - runs[0]['final_eval_loss']:>+22.4f}"
            f"{r['final_eval_accuracy']:>12.2f}{r['final_eval_median_token_loss']:>9.3f}")

    result = make_result(NAME, candidate=CANDIDATE, peer=PEER, settings=settings,
                         metrics=loss_metrics(by_name, settings), checks=checks, quick=quick)
    result["tables"] = {
        "units": "mean next-token cross-entropy in nats on the clean held-out blocks; eval_curve keys are steps",
        "reference": runs[0]["name"],
        "seed_spread": {"runs": [r["name"] for r in spread_runs], "final_eval_loss": spread,
                        "range": max(spread) - min(spread) if spread else None},
        "label_noise_cost": {
            "definition": "clean eval loss of cross-entropy trained on noisy labels minus trained on clean labels",
            "nats": by_name[f"AdamW, CE, {settings['label_noise'] * 100:g}% noisy labels"]["final_eval_loss"]
            - runs[0]["final_eval_loss"],
            "asymptotic_reference_nats": -math.log(1 - settings["label_noise"]),
        },
        "runs": [{**r, "eval_curve": {str(k): v for k, v in r["eval_curve"].items()}} for r in runs],
    }
    result["markdown_tables"] = [markdown_table(runs, settings, data.report, parameters,
                                                spread_runs if len(spread_runs) > 1 else [])]
    figure = plot(runs, settings, f"HfExt {parameters / 1e6:.2f} M on Python docs, {settings['steps']} steps of "
                  f"{settings['batch_size']}×{settings['block_size']} tokens: clean held-out loss")
    save_result(result, figure, started)
    return result


if __name__ == "__main__":
    main()
