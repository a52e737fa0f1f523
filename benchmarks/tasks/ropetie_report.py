"""Reporting of the `ropetie_digit_canvas` benchmark: the markdown table for RESULTS.md with a reading generated
from the numbers, the accuracy-vs-canvas-size plot, and each layout's rotary positions of a small example.
"""

from __future__ import annotations

import math

import torch

from ..harness import pyplot
from .digit_canvas import BEYOND, CELL, KINDS, build_processor, overall
from .ropetie_training import build_model


def positions_example(settings: dict) -> dict:
    """Every layout's rotary positions of a small example: a 2×3 canvas and a question after it."""
    processor = build_processor(patch_size=CELL, image_channels=1)
    batch = processor(text=["<image> what is at row 1 col 2 ?"], images=[[torch.zeros(2 * CELL, 3 * CELL)]])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    positions = {}
    for layout in settings["layouts"]:
        model = build_model(layout, {**settings, "model": {**settings["model"], "num_hidden_layers": 1}}, processor, 0)
        ids = model.model.get_position_ids(batch["input_ids"], batch["image_grid_hw"], batch["attention_mask"])
        positions[layout] = [[float(x) for x in axis[0].tolist()] for axis in ids]
    return {"canvas": "2 rows × 3 columns", "tokens": tokens, "positions": positions,
            "axes": {"flatten": ["1-D"], "mrope": ["time", "row", "column"], "rope_tie_v1": ["row", "column"],
                     "rope_tie_v2": ["row", "column"]}}



def window_means(values: list[float], window: int) -> list[float]:
    """Means of consecutive windows of ``window`` values (the last one may be shorter), rounded for the JSON file."""
    chunks = [values[i:i + window] for i in range(0, len(values), window)]
    return [round(sum(chunk) / len(chunk), 5) for chunk in chunks]



PLACEMENT_WORDS = {"after": "after the image", "before": "before the image",
                   "both": "both before and after the image"}


def markdown_table(accuracy: dict, base: dict, records: dict, settings: dict, parameters: int) -> str:
    """The RESULTS.md table: accuracy per layout × canvas size × question type, the majority-answer rows, and the
    generated reading (`interpretation`)."""
    train, placement = settings["train_size"], settings.get("question_placement", "after")
    lines = [
        f"Accuracy (%) of greedy `generate()` on held-out canvases ({settings['eval_canvases']} per size, digit images "
        f"never seen in training), one model per layout trained on {train}×{train} canvases only: "
        f"{parameters / 1e6:.2f} M parameters, {settings['steps']} steps of {settings['batch_size']} canvases × 4 "
        f"questions {PLACEMENT_WORDS[placement]}, same initial weights and "
        f"batches for every layout. Overall = mean of the four types; "
        f"\"at (beyond)\" asks about a row or column > {train} (numbers never used as coordinates in training). "
        f"Standard error of one cell ≤ {50 / math.sqrt(settings['eval_canvases']):.1f} points.",
        "",
        "| layout | canvas | overall | at | count | left_of | above | at (beyond) | final train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, by_size in accuracy.items():
        for size in settings["eval_sizes"]:
            cells = by_size[str(size)]
            beyond = f"{cells[BEYOND]:.1f}" if BEYOND in cells else "—"
            label = f"{size}×{size}" + (" (trained)" if size == train else "")
            lines.append(f"| {layout} | {label} | **{overall(cells):.1f}** | {cells['at']:.1f} | {cells['count']:.1f} "
                         f"| {cells['left_of']:.1f} | {cells['above']:.1f} | {beyond} | "
                         f"{records[layout]['final_train_loss']:.3f} |")
    for size in settings["eval_sizes"]:
        cells = base[str(size)]
        majority = {kind: cells[kind]["majority_accuracy"] for kind in cells}
        beyond = f"{majority[BEYOND]:.1f}" if BEYOND in majority else "—"
        lines.append(f"| majority answer | {size}×{size} | {overall(majority):.1f} | {majority['at']:.1f} | "
                     f"{majority['count']:.1f} | {majority['left_of']:.1f} | {majority['above']:.1f} | {beyond} "
                     "| — |")
    command, result_file = "python -m benchmarks.ropetie_digit_canvas", "ropetie_digit_canvas.json"
    if placement != "after":  # the other placements were run for two layouts and write their own file
        layouts = ", ".join(f'"{layout}"' for layout in settings["layouts"])
        command += f" --set question_placement={placement} --set 'layouts=[{layouts}]'"
        result_file = f"ropetie_digit_canvas_question_{placement}.json"
    lines += ["", interpretation(accuracy, base, settings), "",
              f"Command: `{command}` (protocol above; `benchmarks/results/{result_file}` has every number, the "
              "training losses and the positions of a small example in each layout)."]
    return "\n".join(lines)


def _neighbour_mean(by_kind: dict) -> float:
    return (by_kind["left_of"] + by_kind["above"]) / 2


def interpretation(accuracy: dict, base: dict, settings: dict, learned: float = 80.0) -> str:
    """A few sentences read off the numbers (generated, so that they always match the table above them)."""
    train, sizes = settings["train_size"], settings["eval_sizes"]
    larger = [s for s in sizes if s > train]
    at_train = {layout: overall(by_size[str(train)]) for layout, by_size in accuracy.items()}
    weak = sorted({kind for by_size in accuracy.values() for kind in KINDS if by_size[str(train)][kind] < learned})
    sentences = [
        f"At the trained size the layouts reach {min(at_train.values()):.1f}–{max(at_train.values()):.1f} % overall "
        f"(best: {max(at_train, key=at_train.get)})"
        + (f"; {', '.join(weak)} stayed below {learned:.0f} % for at least one layout in this budget, so their "
           "off-size numbers say little" if weak else f"; every question type is above {learned:.0f} %") + "."]
    for size in larger:
        scores = {layout: overall(by_size[str(size)]) for layout, by_size in accuracy.items()}
        majority = overall({k: v["majority_accuracy"] for k, v in base[str(size)].items()})
        best = max(scores, key=scores.get)
        ranking = sorted(scores, key=scores.get, reverse=True)
        sentences.append(f"At {size}×{size}: {min(scores.values()):.1f}–{max(scores.values()):.1f} % overall "
                         f"against {majority:.1f} % for always giving the majority answer; best {best}, RoPE-Tie-v2 "
                         f"{scores['rope_tie_v2']:.1f} % (rank {ranking.index('rope_tie_v2') + 1} of {len(scores)}).")
    if larger:
        def row(by_size: dict) -> str:
            return " / ".join(f"{_neighbour_mean(by_size[str(size)]):.1f}" for size in sizes)

        majority = {str(size): {k: v["majority_accuracy"] for k, v in base[str(size)].items()} for size in sizes}
        sentences.append(
            f"Neighbour questions (mean of left_of and above, whose geometry mrope and rope_tie_v2 keep fixed at every "
            f"size) at {' / '.join(f'{s}×{s}' for s in sizes)}: "
            + ", ".join(f"{layout} {row(by_size)}" for layout, by_size in accuracy.items())
            + f" %; majority answer {row(majority)} %.")
    if larger:
        v2_best = all(max(accuracy, key=lambda l: overall(accuracy[l][str(s)])) == "rope_tie_v2" for s in larger)
        near_chance = all(max(overall(by_size[str(s)]) for by_size in accuracy.values())
                          <= overall({k: v["majority_accuracy"] for k, v in base[str(s)].items()}) + 10 for s in larger)
        sentences.append(
            ("RoPE-Tie-v2 is the best layout at every larger canvas, as the blog expects"
             if v2_best else "RoPE-Tie-v2 is not the best layout at every larger canvas, so this run does not "
                             "support the blog's expectation that it extrapolates best")
            + ("; no layout extrapolates in this setting: off the trained size all are within 10 points of the "
               "majority-answer baseline." if near_chance else "."))
    return " ".join(sentences)


def plot(accuracy: dict, base: dict, settings: dict, title: str):
    """Accuracy vs canvas size, one line per layout, per question type and overall: a figure, or None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    panels = ["overall", *KINDS]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharey=True)
    sizes = settings["eval_sizes"]

    def value(by_kind: dict, panel: str) -> float:
        return overall(by_kind) if panel == "overall" else by_kind[panel]

    for axis, panel in zip(axes, panels):
        for layout, by_size in accuracy.items():
            axis.plot(sizes, [value(by_size[str(s)], panel) for s in sizes], marker="o", label=layout)
        majority = [value({k: v["majority_accuracy"] for k, v in base[str(s)].items()}, panel) for s in sizes]
        axis.plot(sizes, majority, linestyle="--", color="grey", label="majority answer")
        axis.axvline(settings["train_size"], color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(sizes, [f"{s}×{s}" for s in sizes])
        axis.set_title(panel)
        axis.set_xlabel("canvas (dotted: trained size)")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    return figure
