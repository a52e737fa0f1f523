"""Tables and plots of the results of `lora_finetuning` and `lora_ga_init_memory` (presentation only: every number
comes from the result)."""

import statistics

from ..harness import pyplot


def mib_text(value) -> str:
    """MiB without decimals; "—" for None (a peak this platform cannot measure)."""
    return "—" if value is None else f"{value:.0f}"


def finetuning_table(task: str, runs: dict[str, dict], summary: dict, settings: dict) -> str:
    """One task's markdown table: a line on the setting, then per method init, memory, speed and the eval curve."""
    steps = settings["eval_steps"]
    size = (f"{settings['steps']} steps of {settings['batch_size']} blocks of {settings['block_size']} tokens"
            if task == "text" else f"{settings['steps']} steps of {settings['batch_size']} examples of at most "
            f"{settings['block_size']} tokens (loss on the answers)")
    ratio = summary["step_ratio"]
    held_out = ("blocks (files not trained on)" if task == "text"
                else "examples (files and glossary terms not trained on)")
    lines = [
        f"**{task}** task: {settings['model']} (fp32, CPU), {size}; eval loss (nats) on {settings['eval_examples']} "
        f"held-out {held_out}. Rank {settings['rank']}, alpha {settings['lora_alpha']}, targets "
        f"{', '.join(settings['target_modules'])}; AdamW, lr {settings['learning_rate']:g} for every method, "
        f"constant. Threshold = LoRA's final eval loss {summary['threshold']:.4f}; steps to it at eval resolution "
        f"{settings['eval_every']}. LoRA / hf_ext LoRA-GA steps: "
        f"{summary['step_ratio_note'] if ratio is None else f'{ratio:.2f}'} (goal >= {settings['goal_step_ratio']}).",
        "",
        "| method | init s | init peak MiB | train peak MiB | s/step | "
        + " | ".join(f"eval @{step}" for step in steps) + " | steps to threshold |",
        "|---|---|---|---|---|" + "---|" * len(steps) + "---|",
    ]
    for run in runs.values():
        reached = run["steps_to_threshold"]
        lines.append(f"| {run['label']} | {run['init_seconds']:.1f} | {mib_text(run['init_peak_mib'])} | "
                     f"{mib_text(run['train_peak_mib'])} | {run['seconds_per_step']:.2f} | "
                     + " | ".join(f"{run['eval_curve'][step]:.4f}" for step in steps)
                     + f" | {'not reached' if reached is None else reached} |")
    return "\n".join(lines)


def finetuning_plot(results: dict[str, dict], settings: dict, dashed: set[str]):
    """Eval loss (top) and training loss (bottom) against the step, one column per task, the ``dashed`` methods
    dashed; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 8.5), squeeze=False, sharex="col")
    colors = plt.get_cmap("tab10").colors
    for column, (task, task_result) in enumerate(results.items()):
        top, bottom = axes[0][column], axes[1][column]
        for index, (method, run) in enumerate(task_result["runs"].items()):
            color, style = colors[index % len(colors)], "--" if method in dashed else "-"
            steps = sorted(run["eval_curve"])
            top.plot(steps, [run["eval_curve"][s] for s in steps], marker="o", linestyle=style, color=color,
                     label=f"{run['label']}: {run['final_eval_loss']:.3f}")
            bottom.plot(range(1, len(run["train_loss"]) + 1), run["train_loss"], linestyle=style, color=color,
                        alpha=0.8, linewidth=1)
        top.axhline(task_result["threshold"], color="grey", linestyle=":", linewidth=1,
                    label=f"threshold (LoRA final) {task_result['threshold']:.3f}")
        top.set(title=f"{task}: eval loss", ylabel="eval cross-entropy (nats)")
        top.legend(fontsize=7)
        bottom.set(title=f"{task}: training loss (per batch)", xlabel="training step",
                   ylabel="training cross-entropy (nats)")
        for axis in (top, bottom):
            axis.grid(True, alpha=0.3)
    figure.suptitle(f"{settings['model']}, rank {settings['rank']}, lr {settings['learning_rate']:g}, "
                    f"{settings['steps']} steps of {settings['batch_size']}")
    figure.tight_layout()
    return figure


def init_memory_table(settings: dict, tables: dict, checks: dict, goal: float, modules_per_layer: int) -> str:
    """The side-by-side table: gradient passes, extra peak (median and samples), time, logits check; then the ratios
    and the A-row agreement with PEFT."""
    peaks, seconds = tables["peak_bytes_samples"], tables["init_seconds_samples"]
    lines = [
        f"{settings['model']} (fp32, CPU), LoRA r={settings['rank']} on {settings['target_layers']} "
        f"{settings['target_modules']} targets (their fp32 weight gradients: "
        f"{tables['target_gradients_mib']:.1f} MiB), "
        f"{settings['batches']} batches of {settings['batch_size']} x {settings['sequence_length']} tokens: extra peak "
        f"RSS of the whole initialisation (median of {settings['memory_repeats']}) and its wall time. "
        "Goal: hf_ext <= 0.5x PEFT's extra peak.",
        "",
        "| side | gradient passes | extra peak (MiB) | samples (MiB) | / target gradients | init time (s) | "
        "logits max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"candidate": "hf_ext get_lora_ga_model", "peer": "PEFT preprocess_loraga + get_peft_model"}
    passes = {"candidate": settings["candidate_gradient_passes"], "peer": settings["peer_gradient_passes"]}
    for side, name in names.items():
        samples = ", ".join(f"{value / 2**20:.0f}" for value in peaks[side])
        lines.append(f"| {name} | {passes[side]} | {tables['extra_peak_mib'][side]:.1f} | {samples} | "
                     f"{tables['extra_peak_over_target_gradients'][side]:.2f} | {tables['init_seconds'][side]:.1f} | "
                     f"{checks[f'{side}_logits_max_abs_diff']:.1e} |")
    ratio = tables["extra_peak_mib"]["peer"] / tables["extra_peak_mib"]["candidate"] \
        if tables["extra_peak_mib"]["candidate"] else float("nan")
    agreement = checks["a_rows_vs_peft"]
    lines += ["", f"PEFT / hf_ext extra peak: {ratio:.2f} (goal >= {goal}); PEFT / hf_ext time: "
                  f"{statistics.median(seconds['peer']) / statistics.median(seconds['candidate']):.2f}. "
                  f"A rows vs PEFT's (q/v/down projections of {len(agreement['layers']) // modules_per_layer} "
                  f"layers, informational): mean |cosine| {agreement['mean_abs_row_cosine']:.3f}, subspace overlap "
                  f"{agreement['mean_subspace_overlap']:.3f}."]
    return "\n".join(lines)
