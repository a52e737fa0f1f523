"""RoPE-Tie on real images: does a position layout help a tiny image-text model answer off the trained canvas size?

One small HfExt image-text model per `position_layout` (``flatten``, ``mrope``, ``rope_tie_v1``, ``rope_tie_v2``) is
trained on 4×4 canvases of scikit-learn's 8×8 handwritten digits (one image token per cell), each canvas with four
one-word questions: "what is at row r col c ?", "how many d ?", "what is left of d ?", "what is above d ?". Every
layout starts from the same weights and sees the same batches. Measured (`evaluate`): accuracy (%) of greedy
``generate()`` on held-out canvases (digit images never seen in training) of the trained size and larger ones, per
layout × canvas size × question type; overall = the mean of the four types. ``tables.baselines`` has the
majority-answer and chance accuracy per size; "at (beyond)" asks about a row or column beyond the trained size.
The ``metrics`` rows are informational: overall accuracy of RoPE-Tie-v2 against flatten per size, ratio =
candidate / peer accuracy (> 1: RoPE-Tie-v2 better). One seed: differences of a few points are not evidence.

Run with ``python -m benchmarks.ropetie_digit_canvas`` (about 50 minutes on 2 CPU cores) or ``--quick`` (a tiny
model for 3 steps: a smoke test of every code path, not a measurement).
"""

import os
import time

import torch

from hf_ext import HfExtForCausalLM

from .harness import (THREADS_ENVIRONMENT_VARIABLE, configure_threads, informational_metric, log, main, make_result,
                      save_result)
from .tasks.digit_canvas import (BEYOND, CELL, KINDS, QUESTION_PLACEMENTS, baselines, build_processor,
                                 evaluation_sets, model_inputs, overall, split_digits, training_batches)
from .tasks.ropetie_report import markdown_table, plot, positions_example, window_means
from .tasks.ropetie_training import build_model, run_in_processes, train, weights_digest

NAME = "ropetie_digit_canvas"
LAYOUTS = ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2")
CANDIDATE = "hf_ext RoPE-Tie-v2 (position_layout='rope_tie_v2')"
PEER = "flatten (RoPE-1D over token order), same initial weights, data order and budget"
LOSS_WINDOW = 25  # the result file keeps the training loss as means over windows of this many steps

FULL = {
    "layouts": list(LAYOUTS),
    "train_size": 4,
    "eval_sizes": [4, 6, 8],
    "empty_probability": 0.25,
    "eval_fraction": 0.3,
    "split_seed": 0,
    "data_seed": 0,
    "eval_seed": 1,
    "seed": 0,
    # where the questions stand (tasks/digit_canvas.py QUESTION_PLACEMENTS); other than "after" the results go to
    # ropetie_digit_canvas_question_<placement>.json, beside the main run's
    "question_placement": "after",
    "model": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
              "initializer_range": 0.08, "rope_theta": 100.0},
    "steps": 8000,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "adam_betas": [0.9, 0.99],
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "decay_fraction": 0.25,
    "grad_clip": 1.0,
    "log_every": 250,
    "eval_canvases": 500,
    "eval_batch_size": 100,
    "workers": 2,
}
QUICK = {
    **FULL,
    "eval_sizes": [4, 5],
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "initializer_range": 0.08},
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_canvases": 8,
    "eval_batch_size": 4,
}


@torch.no_grad()
def evaluate(model: HfExtForCausalLM, sets: dict, processor) -> dict:
    """Accuracy of greedy ``generate()`` (one new token) on every question of every held-out canvas, each question
    given the canvas and the earlier questions with their true answers (the training format). One forward pass of
    the whole text also gives the argmax at every answer position (teacher forcing), which must pick the same tokens:
    a check of generate()'s positions."""
    tokenizer = processor.tokenizer
    results = {}
    for (size, beyond), entry in sets.items():
        kinds = [BEYOND] if beyond else list(KINDS)  # beyond sets: only their first ("at") question counts
        correct = {kind: 0 for kind in kinds}
        agree = total = 0
        predictions = {kind: [] for kind in kinds}
        for batch in entry["batches"]:
            positions, answers = batch["answer_positions"], batch["answer_ids"]
            logits = model(**model_inputs(batch)).logits
            for index, kind in enumerate(kinds):
                position = int(positions[index])
                generated = model.generate(**model_inputs(batch, length=position), max_new_tokens=1, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                predicted = generated[:, position]
                correct[kind] += int((predicted == answers[:, index]).sum())
                agree += int((predicted == logits[:, position - 1].argmax(dim=-1)).sum())
                predictions[kind] += tokenizer.convert_ids_to_tokens(predicted.tolist())
            total += len(answers)
        for kind in kinds:
            results[(size, kind)] = {"accuracy": 100.0 * correct[kind] / total, "correct": correct[kind],
                                     "questions": total, "predictions": predictions[kind]}
        results[(size, "generate_matches_argmax" + ("_beyond" if beyond else ""))] = {
            "agree": agree, "of": total * len(kinds)}
    return results


def _accuracy_table(results: dict) -> dict:
    """{size: {kind: accuracy %}} from `evaluate`'s records (JSON-friendly string keys)."""
    table = {}
    for (size, kind), record in results.items():
        if "accuracy" in record:
            table.setdefault(str(size), {})[kind] = record["accuracy"]
    return table


def train_and_evaluate(layouts: list[str], settings: dict) -> dict:
    """In one process: build the training batches and evaluation sets once, then train and evaluate each layout."""
    started = time.perf_counter()
    processor = build_processor(patch_size=CELL, image_channels=1)
    pools = split_digits(settings["eval_fraction"], settings["split_seed"])
    batches, data_digest = training_batches(settings, processor, pools["train"])
    sets = evaluation_sets(settings, processor, pools["eval"])
    data_seconds = time.perf_counter() - started
    log(f"  data for {', '.join(layouts)}: {len(batches)} batches of {settings['batch_size']} canvases "
        f"({batches[0]['input_ids'].shape[1]} tokens each) and the evaluation sets ({data_seconds:.0f} s)")
    records = {}
    for layout in layouts:
        model = build_model(layout, settings, processor, settings["seed"])
        record = {"initial_weights_digest": weights_digest(model), **train(model, batches, settings, layout)}
        evaluation_started = time.perf_counter()
        results = evaluate(model, sets, processor)
        record["eval_seconds"] = time.perf_counter() - evaluation_started
        record["accuracy"] = _accuracy_table(results)
        record["generate_matches_argmax"] = {f"{size}/{kind}": value for (size, kind), value in results.items()
                                             if kind.startswith("generate_matches_argmax")}
        record["predictions"] = {f"{size}/{kind}": value["predictions"] for (size, kind), value in results.items()
                                 if "predictions" in value}
        records[layout] = record
        by_size = {size: round(overall(by_kind), 1) for size, by_kind in record["accuracy"].items()}
        log(f"  {layout}: overall accuracy by canvas size {by_size} "
            f"(train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s)")
    answers = {f"{size}/{'beyond' if beyond else 'main'}": entry["answers"] for (size, beyond), entry in sets.items()}
    return {"records": records, "data_digest": data_digest, "data_seconds": data_seconds,
            "train_digits": len(pools["train"].labels), "eval_digits": len(pools["eval"].labels),
            "digit_split_disjoint": not set(pools["train"].indices.tolist()) & set(pools["eval"].indices.tolist()),
            "eval_answers": answers, "tokens_per_training_sequence": batches[0]["input_ids"].shape[1]}


def accuracy_metrics(accuracy: dict, settings: dict) -> dict:
    """Informational RESULTS.md rows: overall accuracy of RoPE-Tie-v2 against flatten at every canvas size."""
    metrics = {}
    for size in settings["eval_sizes"]:
        key = str(size)
        note = " (trained size)" if size == settings["train_size"] else ""
        candidate, peer = overall(accuracy["rope_tie_v2"][key]), overall(accuracy["flatten"][key])
        metrics[f"overall accuracy {size}×{size}{note}: rope_tie_v2 vs flatten"] = informational_metric(
            f"mean accuracy over the four question types on held-out {size}×{size} canvases, model trained on "
            f"{settings['train_size']}×{settings['train_size']} canvases", "% acc", candidate, peer,
            candidate / peer if peer > 0 else None,
            "RoPE-Tie-v2 accuracy / flatten accuracy; > 1: RoPE-Tie-v2 is better")
    return metrics


def result_name(placement: str) -> str:
    return NAME if placement == "after" else f"{NAME}_question_{placement}"


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    if settings["question_placement"] not in QUESTION_PLACEMENTS:
        raise ValueError(f"question_placement must be one of {list(QUESTION_PLACEMENTS)}, got "
                         f"{settings['question_placement']!r}")
    benchmark = result_name(settings["question_placement"])
    unknown = set(settings["layouts"]) - set(LAYOUTS)
    if unknown or "flatten" not in settings["layouts"] or "rope_tie_v2" not in settings["layouts"]:
        raise ValueError(f"layouts must be among {list(LAYOUTS)} and include flatten and rope_tie_v2, got "
                         f"{settings['layouts']}")
    threads_before = torch.get_num_threads()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # one thread per worker process (see about/ropetie_digit_canvas.md)
    settings.update(threads=configure_threads(), device="cpu", dtype="float32")
    torch.set_num_threads(threads_before)
    workers = max(1, min(settings["workers"], len(settings["layouts"])))
    groups = [settings["layouts"][i::workers] for i in range(workers)]
    log(f"{benchmark}: layouts {settings['layouts']} in {workers} process(es) {groups}, {settings['threads']} thread(s) "
        f"each; trained on {settings['train_size']}×{settings['train_size']} canvases, evaluated on "
        f"{settings['eval_sizes']}")
    if workers == 1:
        outputs = [train_and_evaluate(groups[0], settings)]
    else:  # every process builds the same batches from the same seeds; the digests are compared below
        outputs = run_in_processes(f"{__package__}.{NAME}:train_and_evaluate",
                                   [{"layouts": group, "settings": settings} for group in groups], settings["threads"])
    records = {layout: output["records"][layout] for layout in settings["layouts"] for output in outputs
               if layout in output["records"]}
    first = outputs[0]
    accuracy = {layout: record["accuracy"] for layout, record in records.items()}
    base = baselines(first["eval_answers"])
    processor = build_processor(patch_size=CELL, image_channels=1)
    parameters = sum(p.numel() for p in build_model("flatten", settings, processor, settings["seed"]).parameters())
    agreement = {layout: [sum(v["agree"] for v in r["generate_matches_argmax"].values()),
                          sum(v["of"] for v in r["generate_matches_argmax"].values())] for layout, r in records.items()}
    checks = {
        "same_data_order": len({output["data_digest"] for output in outputs}) == 1,
        "data_digest": first["data_digest"],
        "same_initial_weights": len({r["initial_weights_digest"] for r in records.values()}) == 1,
        "digit_split_disjoint": all(output["digit_split_disjoint"] for output in outputs),
        "generate_matches_argmax": {layout: f"{agree}/{of}" for layout, (agree, of) in agreement.items()},
        "generate_matches_argmax_all": all(agree == of for agree, of in agreement.values()),
        "all_finite": all(r["finite"] for r in records.values()),
    }
    for name in ("same_data_order", "same_initial_weights", "digit_split_disjoint"):
        if not checks[name]:
            raise AssertionError(f"check {name} failed: the layouts were not compared on equal terms")
    settings["parameters"] = parameters
    settings["data"] = {"source": "sklearn.datasets.load_digits (1797 8×8 images)",
                        "train_digit_images": first["train_digits"], "eval_digit_images": first["eval_digits"],
                        "tokens_per_training_sequence": first["tokens_per_training_sequence"]}

    log(f"\n{'layout':<14}" + "".join(f"{f'{s}×{s}':>10}" for s in settings["eval_sizes"]) + "   (overall %)")
    for layout, by_size in accuracy.items():
        log(f"{layout:<14}" + "".join(f"{overall(by_size[str(s)]):>10.1f}" for s in settings["eval_sizes"]))

    result = make_result(benchmark, candidate=CANDIDATE, peer=PEER, settings=settings,
                         metrics=accuracy_metrics(accuracy, settings), checks=checks, quick=quick)
    result["tables"] = {
        "units": "accuracy in % of greedy generate() answers; keys: canvas size, then question type",
        "accuracy": accuracy,
        "overall": {layout: {size: overall(by_kind) for size, by_kind in by_size.items()}
                    for layout, by_size in accuracy.items()},
        "baselines": base,
        "training": {layout: {key: r[key] for key in ("train_seconds", "seconds_per_step", "final_train_loss",
                                                      "eval_seconds", "initial_weights_digest")}
                     for layout, r in records.items()},
        "train_loss_per_window": {"window_steps": LOSS_WINDOW, **{
            layout: window_means(r["train_loss"], LOSS_WINDOW) for layout, r in records.items()}},
        "data_seconds": [output["data_seconds"] for output in outputs],
        "positions_example": positions_example(settings),
        # every generated answer, space-separated in the order of the evaluation canvases
        "predictions": {layout: {key: " ".join(words) for key, words in r["predictions"].items()}
                        for layout, r in records.items()},
    }
    result["markdown_tables"] = [markdown_table(accuracy, base, records, settings, parameters)]
    asked = {"after": "", "before": ", questions before the image", "both": ", questions before and after the image"}
    figure = plot(accuracy, base, settings, f"Digit canvas VQA, trained on {settings['train_size']}×"
                  f"{settings['train_size']}{asked[settings['question_placement']]}: held-out accuracy vs canvas size")
    save_result(result, figure, started)
    return result


if __name__ == "__main__":
    main()
