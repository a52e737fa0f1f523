"""ReRoPE on a real checkpoint: SmolLM2-135M read beyond its training length N, against transformers' RoPE scalings.

One loaded model (fp32, CPU), no fine-tuning, five methods: `plain` (the checkpoint's RoPE, sdpa), transformers'
`yarn` (factor L / N) and `dynamic` NTK, and hf_ext's `hfx_rerope` / `hfx_leaky_rerope` (window w = N/4, log-n).

* **loss**: mean next-token cross-entropy (nats) of the last `loss_tail` tokens of a long Python-documentation file,
  fed the last L tokens of it; the scored tokens are the same at every L, so a good method's loss falls (or stays
  flat) as L grows and a broken one's rises.
* **passkey**: a needle near the start of filler text, greedy answer at the end; accuracy per L with its 95 % Wilson
  interval, also per depth.

A method is not run where it computes exactly what `plain` does (listed in ``tables.same_as_plain``); a switching
check verifies those equalities first. RESULTS.md rows: losses at the longest L, ratio = peer loss / ReRoPE loss
(> 1: ReRoPE better). Quick mode pretends N = 256 (a smoke test, not a result).

Run with ``python -m benchmarks.rerope_smollm2_long_context`` (about 25 minutes on 2 cores) or ``--quick``.
"""

import copy
import random
import time

import torch
import torch.nn.functional as F

from .harness import configure_threads, log, main, make_result, pyplot, save_result
from .tasks.assets import smollm2_gguf_path
from .tasks.long_context import (BUILTIN_METHODS, METHODS, RE_ROPE_METHODS, MethodSwitch, check_switching,
                                 load_documents, load_model_and_tokenizer, passkey_filler_ids, passkey_prompt,
                                 same_as_plain)

NAME = "rerope_smollm2_long_context"

FULL = {
    "loss_lengths": (2048, 4096, 8192, 16384),
    "loss_tail": 1024,  # tokens scored at the end of each window
    "documents": 1,
    # Within N and beyond it (the needle at depth 0.1 of 10240 tokens is ~9.2k tokens before the question).
    "passkey_lengths": (4096, 10240),
    "passkey_trials": 1,  # per length; trial i uses its own passkey and depth passkey_depths[i % len]
    "passkey_depths": (0.1, 0.3),  # where the needle starts, as a fraction of the filler
    "passkey_new_tokens": 8,
    "passkey_filler": "classic",  # or "docs": real documentation text
    "training_length": None,  # None: the checkpoint's max_position_embeddings
    "rerope_window": None,  # None: training_length // 4 (hf_ext's default)
    "leaky_factor": 16.0,
    "logn_scaling": True,
    "dynamic_factor": 2.0,  # transformers' dynamic NTK: base * (factor * L / N - factor + 1) ** (d / (d - 2))
    "switch_check_tokens": 256,
    "seed": 0,
    "device": "auto",  # "auto": CUDA when available (the passkey statistics need it: minutes there, hours here)
}
# The protocol for passkey statistics (20 trials per length and depth, 4k-16k), too slow for 2 CPU cores:
# python -m benchmarks.rerope_smollm2_long_context --set 'passkey_lengths=[4096, 8192, 12288, 16384]' \
#     --set passkey_trials=60 --set 'passkey_depths=[0.1, 0.5, 0.9]' --set 'loss_lengths=[4096, 8192, 12288, 16384]'

QUICK = {
    **FULL,
    "loss_lengths": (128, 256),
    "loss_tail": 64,
    "passkey_lengths": (256,),
    "switch_check_tokens": 128,
    "training_length": 128,  # pretended: exercises every code path, says nothing about the model
}


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def tail_loss(model, ids: torch.Tensor, tail: int) -> float:
    """Mean cross-entropy (nats) of the last ``tail`` tokens of ``ids`` [1, L], each predicted from all before it."""
    logits = model(input_ids=ids, logits_to_keep=tail + 1, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, -tail:]).item()


def measure_losses(switch: MethodSwitch, documents, lengths, tail: int, methods=METHODS) -> dict:
    """loss[method][L] (mean over documents), per-document losses, seconds per forward pass, and the reused cells."""
    loss = {m: {} for m in methods}
    per_document = {m: {} for m in methods}
    seconds = {m: {} for m in methods}
    reused = []
    for length in lengths:
        for method in methods:
            if method != "plain" and same_as_plain(method, length, switch.training_length, switch.window):
                per_document[method][length] = per_document["plain"][length]
                reused.append(f"{method}@{length}")
            else:
                values, times = [], []
                switch.use(method, length)
                for name, ids in documents:
                    window = torch.tensor([ids[-length:]], device=switch.model.device)
                    start = time.perf_counter()
                    values.append(tail_loss(switch.model, window, tail))
                    times.append(time.perf_counter() - start)
                    log(f"  loss L={length:>5} {method:<17} {name}: {values[-1]:.4f} nats ({times[-1]:.1f} s)")
                per_document[method][length] = values
                seconds[method][length] = times
            loss[method][length] = sum(per_document[method][length]) / len(documents)
    return {"loss": loss, "per_document": per_document, "seconds": seconds, "reused": reused}


def measure_passkey(switch: MethodSwitch, tokenizer, lengths, trials: int, depths, new_tokens: int,
                    filler_ids: list[int], seed: int, methods=METHODS) -> dict:
    """Greedy passkey retrieval: per method and length, correct / trials and what the model answered."""
    rng = random.Random(seed)
    cases = {length: [(rng.randint(10000, 99999), depths[i % len(depths)]) for i in range(trials)]
             for length in lengths}
    table = {m: {} for m in methods}
    seconds = {m: {} for m in methods}
    reused = []
    for length in lengths:
        prompts = [(key, depth, passkey_prompt(tokenizer, length - new_tokens, key, depth, filler_ids))
                   for key, depth in cases[length]]
        for method in methods:
            if method != "plain" and same_as_plain(method, length, switch.training_length, switch.window):
                table[method][length] = copy.deepcopy(table["plain"][length])
                reused.append(f"{method}@{length}")
                continue
            switch.use(method, length)
            answers, times = [], []
            for key, depth, prompt in prompts:
                ids = torch.tensor([prompt], device=switch.model.device)
                start = time.perf_counter()
                output = switch.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=tokenizer.eos_token_id,
                )
                times.append(time.perf_counter() - start)
                text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
                answers.append({"key": key, "depth": depth, "answer": text, "correct": str(key) in text})
                log(f"  passkey L={length:>5} {method:<17} key {key} depth {depth}: {text!r} "
                     f"{'correct' if answers[-1]['correct'] else 'wrong'} ({times[-1]:.1f} s)")
            correct = sum(a["correct"] for a in answers)
            table[method][length] = {"accuracy": correct / len(answers), "correct": correct,
                                     "trials": len(answers), "interval_95": wilson_interval(correct, len(answers)),
                                     "by_depth": accuracy_by_depth(answers), "answers": answers}
            seconds[method][length] = times
    return {"passkey": table, "seconds": seconds, "reused": reused}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> list[float]:
    """The 95 % Wilson score interval of a binomial proportion (Wilson 1927): unlike p ± z·√(p(1−p)/n) it stays
    inside [0, 1] and does not collapse to a point at 0 or n successes."""
    if trials == 0:
        return [0.0, 1.0]
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) + z * z / (4 * trials)) / trials) ** 0.5 / (1 + z * z / trials)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_by_depth(answers: list[dict]) -> dict:
    """{depth: {"correct", "trials", "interval_95"}} over the answers of one method and length."""
    table = {}
    for depth in sorted({a["depth"] for a in answers}):
        marks = [a["correct"] for a in answers if a["depth"] == depth]
        table[str(depth)] = {"correct": sum(marks), "trials": len(marks),
                             "interval_95": wilson_interval(sum(marks), len(marks))}
    return table


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def loss_metrics(loss: dict, length: int) -> dict:
    """RESULTS.md rows: each ReRoPE variant against each built-in method at ``length`` (informational)."""
    metrics = {}
    for candidate in RE_ROPE_METHODS:
        for peer in BUILTIN_METHODS:
            if candidate not in loss or peer not in loss:
                continue
            metrics[f"loss@{length} {candidate} vs {peer}"] = {
                "description": f"mean next-token cross-entropy at context {length}; ratio = peer loss / candidate "
                               "loss (> 1: the candidate predicts better)",
                "unit": "nats",
                "candidate": loss[candidate][length],
                "peer": loss[peer][length],
                # RESULTS.md renders this field as the ratio column; for a loss it is the loss ratio, not a speed.
                "speed_ratio": loss[peer][length] / loss[candidate][length],
                "ratio_definition": "peer loss / candidate loss; > 1 means the candidate is better",
                "goal": None,
                "min_speed_ratio": None,
                "passed": None,
            }
    return metrics


def _string_keys(table: dict) -> dict:
    """JSON-friendly copy: integer length keys become strings."""
    return {k if isinstance(k, str) else str(k): _string_keys(v) if isinstance(v, dict) else v
            for k, v in table.items()}


def plot(loss: dict, passkey: dict, training_length: int, title: str):
    """Loss and passkey accuracy against context length, one line per method (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, by_length in loss.items():
        lengths = sorted(by_length)
        left.plot(lengths, [by_length[n] for n in lengths], marker="o", label=method)
    for method, by_length in passkey.items():
        lengths = sorted(by_length)
        right.plot(lengths, [by_length[n]["accuracy"] for n in lengths], marker="o", label=method)
    for axis, ylabel in ((left, "mean cross-entropy of the last tokens (nats)"), (right, "passkey accuracy")):
        axis.set_xscale("log", base=2)
        lengths = sorted({n for line in axis.get_lines() for n in line.get_xdata()})
        axis.set_xticks(lengths, [str(int(n)) for n in lengths])
        axis.minorticks_off()
        axis.axvline(training_length, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("context length (tokens); dashed: training length")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    right.set_ylim(-0.05, 1.05)
    left.legend()
    right.legend()  # lines of equal accuracy overlap
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _print_tables(loss: dict, passkey: dict) -> None:
    lengths = sorted(next(iter(loss.values())))
    log("\nmean CE (nats) of the scored tail   " + "".join(f"{n:>9}" for n in lengths))
    for method, by_length in loss.items():
        log(f"  {method:<33}" + "".join(f"{by_length[n]:>9.4f}" for n in lengths))
    lengths = sorted(next(iter(passkey.values())))
    log("passkey accuracy                    " + "".join(f"{n:>9}" for n in lengths))
    for method, by_length in passkey.items():
        log(f"  {method:<33}" + "".join(f"{by_length[n]['accuracy']:>9.2f}" for n in lengths))


def _markdown_tables(loss: dict, passkey: dict, tail: int, training_length: int) -> list[str]:
    """The loss and passkey tables as markdown, for benchmarks/RESULTS.md."""
    tables = []
    lengths = sorted(next(iter(loss.values())))
    rows = [f"Mean cross-entropy (nats) of the last {tail} tokens of a long document, by context length "
            f"(trained at N = {training_length}):", "",
            "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    rows += [f"| {method} | " + " | ".join(f"{by_length[n]:.4f}" for n in lengths) + " |"
             for method, by_length in loss.items()]
    tables.append("\n".join(rows))
    lengths = sorted(next(iter(passkey.values())))
    rows = ["Passkey retrieval accuracy (needle near the start, question at the end), correct / trials and the 95 % "
            "Wilson interval:", "",
            "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    rows += [f"| {method} | " + " | ".join(
        f"{by_length[n]['correct']}/{by_length[n]['trials']} [{by_length[n]['interval_95'][0]:.2f}, "
        f"{by_length[n]['interval_95'][1]:.2f}]" for n in lengths) + " |" for method, by_length in passkey.items()]
    tables.append("\n".join(rows))
    return tables


# ----------------------------------------------------------------------------------------------------------------


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    threads = configure_threads()
    torch.manual_seed(settings["seed"])

    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer()
    model.to(device)
    checkpoint_training_length = model.config.max_position_embeddings
    training_length = settings["training_length"] or checkpoint_training_length
    window = settings["rerope_window"] or training_length // 4
    settings.update({
        "model": smollm2_gguf_path().name, "dtype": "float32", "device": device, "threads": threads,
        "checkpoint_max_position_embeddings": checkpoint_training_length,
        "checkpoint_rope_parameters": dict(model.config.rope_parameters),
        "training_length_used": training_length, "rerope_window_used": window,
        "training_length_pretended": training_length != checkpoint_training_length,
    })
    log(f"SmolLM2-135M: max_position_embeddings {checkpoint_training_length}, rope {model.config.rope_parameters}; "
        f"N = {training_length}{' (pretended, quick mode)' if settings['training_length_pretended'] else ''}, "
        f"ReRoPE window {window}")
    switch = MethodSwitch(model, training_length=training_length, window=window,
                          leaky_factor=settings["leaky_factor"], logn_scaling=settings["logn_scaling"],
                          dynamic_factor=settings["dynamic_factor"])

    longest = max(settings["loss_lengths"])
    documents = load_documents(tokenizer, settings["documents"], longest)
    with torch.no_grad():
        check_ids = torch.tensor([documents[0][1][:settings["switch_check_tokens"]]], device=device)
        switch_checks = check_switching(switch, check_ids)
        log(f"switching check passed: {switch_checks}")
        losses = measure_losses(switch, documents, settings["loss_lengths"], settings["loss_tail"])
        filler_ids = passkey_filler_ids(tokenizer, settings["passkey_filler"])
        passkey = measure_passkey(switch, tokenizer, settings["passkey_lengths"], settings["passkey_trials"],
                                  settings["passkey_depths"], settings["passkey_new_tokens"], filler_ids,
                                  settings["seed"])
    switch.use("plain", training_length)  # leave the model as loaded

    _print_tables(losses["loss"], passkey["passkey"])
    figure = plot(
        losses["loss"], passkey["passkey"], training_length,
        f"SmolLM2-135M (N = {training_length}{', pretended' if settings['training_length_pretended'] else ''}), "
        f"ReRoPE window {window}: loss of the last {settings['loss_tail']} tokens and passkey retrieval",
    )
    settings["documents_used"] = [name for name, _ in documents]
    result = make_result(
        NAME,
        candidate="hf_ext ReRoPE (hfx_rerope / hfx_leaky_rerope)",
        peer="transformers RoPE: plain sdpa / YaRN / dynamic NTK",
        settings=settings,
        metrics=loss_metrics(losses["loss"], longest),
        checks={"switching": switch_checks},
        quick=quick,
    )
    result["tables"] = _string_keys({
        "loss_nats": losses["loss"],
        "loss_nats_per_document": losses["per_document"],
        "loss_forward_seconds": losses["seconds"],
        "passkey": passkey["passkey"],
        "passkey_generate_seconds": passkey["seconds"],
        "same_as_plain": {"loss": losses["reused"], "passkey": passkey["reused"]},
    })
    result["markdown_tables"] = _markdown_tables(losses["loss"], passkey["passkey"], settings["loss_tail"],
                                                 training_length)
    save_result(result, figure, started)
    return result


if __name__ == "__main__":
    main()
