"""A miniature of the ReRoPE / HWFA blog's length-extrapolation table (kexue.fm posts 9603, 9708, 9728, 9731).

HfExt language models of ~1M parameters are trained from scratch at N = 128 tokens on the Python documentation and
evaluated at N, 8×N and 16×N on held-out documents: next-token accuracy (%) and cross-entropy (`evaluate`) on
*natural* text (the same tokens at every length, only the context differs) and on *repeated* text (a held-out chunk
of N/2 … N tokens tiled to the full length: a test of copying from far back). Rows (`table_rows`): the RoPE
baseline; ReRoPE / Leaky ReRoPE / retro-fitted log-n ("log n†") / w = N applied at inference to that same trained
baseline; HWFA and HWFA+ReRoPE trained separately with the same data order, seed and budget. The blog's claim is an
ordering: RoPE collapses beyond N, ReRoPE and HWFA hold, ReRoPE with w = N collapses; ``tables.side_by_side`` (and
the RESULTS.md table) puts ours next to the blog's numbers. ``tables.copying`` (repeated minus natural accuracy)
says whether the models learned to copy at all; near 0, the repeated column measures nothing more than the natural
one. The ``metrics`` rows are informational: natural-text accuracy at 16×N of each row / the baseline's (> 1 better).

Run with ``python -m benchmarks.extrapolation_miniature`` (about 12 minutes on 2 CPU cores) or ``--quick`` (tiny
models, a few steps, one length: a smoke test of every code path, not a measurement).
"""

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_ext.models.hfext import HfExtForCausalLM

from .harness import (THREADS_ENVIRONMENT_VARIABLE, configure_threads, informational_metric, log, main, make_result,
                      save_result)
from .tasks.extrapolation_report import (copying_indicator, markdown_table, plot, print_side_by_side, side_by_side,
                                         string_keys)
from .tasks.tiny_lm import (Corpus, Inference, inference_variant, load_corpus, natural_eval_tokens,
                            repeated_eval_tokens, train_model)

NAME = "extrapolation_miniature"
PEER = "RoPE baseline (same training)"

FULL = {
    "vocab_size": 2048,
    "model": {"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 4, "num_attention_heads": 4},
    "training_length": 128,  # N
    "batch_size": 8,  # many small steps: the best use of ~2.5 minutes of training (see about/)
    "steps": 1200,
    "learning_rate": 2e-3,
    "warmup_fraction": 0.05,
    "weight_decay": 0.01,
    "eval_lengths": (128, 1024, 2048),  # N, 8×N, 16×N
    "eval_documents": 8,  # natural: this many windows of max(eval_lengths) tokens
    "eval_tokens_per_forward": 8192,  # batch size at length L = this // L
    "heldout_every": 10,  # every 10th documentation file is held out (never trained on)
    "leaky_factor": 16,
    "seed": 0,
    "max_documents": None,  # of the documentation (None: every file)
}
QUICK = {
    **FULL,
    "vocab_size": 512,
    "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
    "steps": 20,
    "eval_lengths": (256,),
    "eval_documents": 2,
    "max_documents": 60,  # for a fast tokenizer
}

# The blog's numbers (kexue.fm posts 9708 and 9728 for ReRoPE / Leaky ReRoPE, 9603 and 9731 for HWFA and HWFA2):
# GAU ~100M, N = 512, accuracy (%) at N and at 8×N = 4096; its "log n" rows were trained with log-n scaling.
BLOG = {
    "Baseline (RoPE extrapolation)": {"train": 49.41, "repeated_8x": 24.17, "natural_8x": 23.16},
    "ReRoPE-w256": {"train": 49.41, "repeated_8x": 77.90, "natural_8x": 48.48},
    "ReRoPE-w256-log n†": {"train": 49.41, "repeated_8x": 82.40, "natural_8x": 48.85},
    "ReRoPE-w128": {"train": 49.41, "repeated_8x": 76.11, "natural_8x": 47.82},
    "ReRoPE-w128-log n†": {"train": 49.41, "repeated_8x": 82.28, "natural_8x": 48.78},
    "ReRoPE-w512 (w = N)": {"train": 49.41, "repeated_8x": 7.09, "natural_8x": 8.25},
    "Leaky ReRoPE-w128-k16-log n (trained with log n)": {"train": 49.40, "repeated_8x": 85.15, "natural_8x": 49.10},
    "HWFA (23 window w16 + 1 full NoPE log n)": {"train": 48.70, "repeated_8x": 80.84, "natural_8x": 48.15},
    "HWFA2 w̃64-f1 (ReRoPE w256 at inference)": {"train": 49.32, "repeated_8x": 82.41, "natural_8x": 49.37},
    "HWFA2 w̃64-f2 (ReRoPE w256 at inference)": {"train": 49.46, "repeated_8x": 84.43, "natural_8x": 49.36},
}

# Same logits up to float rounding; the switches change them by far more than this.
SAME_TOLERANCE = 1e-4


@torch.no_grad()
def evaluate(model: HfExtForCausalLM, tokens: torch.Tensor, tokens_per_forward: int) -> dict:
    """Next-token accuracy (%) and mean cross-entropy over every predicted position of `tokens` [n, L].

    Full-length rows without padding: no attention mask and default position ids (0 … L−1), which
    `consistency_checks` shows to equal an explicit all-ones mask with explicit positions.
    """
    batch = max(1, tokens_per_forward // tokens.shape[1])
    correct, total, loss_sum = 0, 0, 0.0
    for start in range(0, len(tokens), batch):
        ids = tokens[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        correct += (logits.argmax(-1) == targets).sum().item()
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total += targets.numel()
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "tokens": total}


@torch.no_grad()
def consistency_checks(model: HfExtForCausalLM, tokens: torch.Tensor, training_length: int) -> dict:
    """Equalities the measurements rely on, on the trained baseline (raises if one fails)."""
    short = tokens[:2, :training_length]
    long = tokens[:1, : 2 * training_length]

    def logits(ids, **kwargs):
        return model(input_ids=ids, use_cache=False, **kwargs).logits

    reference_short, reference_long = logits(short), logits(long)
    results = {}
    with inference_variant(model, Inference("rerope", window=long.shape[1])):
        results["rerope_window_ge_length_vs_rope"] = (logits(long) - reference_long).abs().max().item()
    with inference_variant(model, Inference("leaky_rerope", window=long.shape[1], leaky_factor=16)):
        results["leaky_window_ge_length_vs_rope"] = (logits(long) - reference_long).abs().max().item()
    with inference_variant(model, Inference(logn_dagger=True)):
        results["logn_dagger_within_n_vs_rope"] = (logits(short) - reference_short).abs().max().item()
    with inference_variant(model, Inference("rerope", window=training_length // 2)):
        explicit = logits(long, attention_mask=torch.ones_like(long),
                          position_ids=torch.arange(long.shape[1])[None])
        results["rerope_explicit_mask_positions_vs_default"] = (explicit - logits(long)).abs().max().item()
        changed = (logits(long) - reference_long).abs().max().item()
    results["rope_explicit_mask_positions_vs_default"] = (
        logits(long, attention_mask=torch.ones_like(long), position_ids=torch.arange(long.shape[1])[None])
        - reference_long).abs().max().item()
    results["switch_back_bitwise_equal"] = bool(torch.equal(logits(long), reference_long))
    failed = [name for name, value in results.items() if not isinstance(value, bool) and value > SAME_TOLERANCE]
    if failed or not results["switch_back_bitwise_equal"]:
        raise AssertionError(f"consistency checks failed: {failed or 'switch back'}: {results}")
    # And the switch must actually do something beyond the window (otherwise every row would equal the baseline).
    if changed <= SAME_TOLERANCE:
        raise AssertionError(f"ReRoPE (w = N/2) did not change the logits of a 2N-token text ({changed:.2e}).")
    results["rerope_w_half_n_changes_logits_by"] = changed
    results["tolerance"] = SAME_TOLERANCE
    return results


# ----------------------------------------------------------------------------------------------------------------
# The rows of the table


@dataclass(frozen=True)
class Row:
    """One row of the table: a trained model run in one inference variant, and the blog row it corresponds to."""

    name: str
    model: str  # which trained model (`model_config` kind)
    inference: Inference
    blog: str | None  # the BLOG row it corresponds to


def table_rows(settings: dict) -> list[Row]:
    n = settings["training_length"]
    half, quarter, k = n // 2, n // 4, settings["leaky_factor"]
    return [
        Row("RoPE baseline", "baseline", Inference(), "Baseline (RoPE extrapolation)"),
        Row(f"ReRoPE w{half}", "baseline", Inference("rerope", half), "ReRoPE-w256"),
        Row(f"ReRoPE w{half} log n†", "baseline", Inference("rerope", half, logn_dagger=True),
            "ReRoPE-w256-log n†"),
        Row(f"ReRoPE w{quarter}", "baseline", Inference("rerope", quarter), "ReRoPE-w128"),
        Row(f"ReRoPE w{quarter} log n†", "baseline", Inference("rerope", quarter, logn_dagger=True),
            "ReRoPE-w128-log n†"),
        Row(f"Leaky ReRoPE w{quarter} k{k} log n†", "baseline",
            Inference("leaky_rerope", quarter, leaky_factor=k, logn_dagger=True),
            "Leaky ReRoPE-w128-k16-log n (trained with log n)"),
        Row(f"ReRoPE w{n} (w = N)", "baseline", Inference("rerope", n), "ReRoPE-w512 (w = N)"),
        Row("HWFA v1", "hwfa", Inference(), "HWFA (23 window w16 + 1 full NoPE log n)"),
        Row("HWFA+ReRoPE f1, eval RoPE", "hwfa_rerope_f1", Inference(), None),
        Row(f"HWFA+ReRoPE f1 (ReRoPE w{half})", "hwfa_rerope_f1", Inference("rerope"),
            "HWFA2 w̃64-f1 (ReRoPE w256 at inference)"),
        Row("HWFA+ReRoPE f2, eval RoPE", "hwfa_rerope_f2", Inference(), None),
        Row(f"HWFA+ReRoPE f2 (ReRoPE w{half})", "hwfa_rerope_f2", Inference("rerope"),
            "HWFA2 w̃64-f2 (ReRoPE w256 at inference)"),
    ]


def measure(settings: dict, corpus: Corpus) -> dict:
    """Train each model once, evaluate every row at every length; returns the tables and timings."""
    n, lengths = settings["training_length"], list(settings["eval_lengths"])
    longest = max(lengths)
    natural_all = natural_eval_tokens(corpus, longest, settings["eval_documents"])
    eval_sets = {}
    for length in lengths:
        # The same natural tokens at every length, in more and shorter rows at the shorter lengths.
        usable = longest // length * length
        natural = natural_all[:, :usable].reshape(-1, length)
        repeated = repeated_eval_tokens(corpus, length, natural.numel() // length, n, settings["seed"])
        eval_sets[length] = {"natural": natural, "repeated": repeated}

    rows = table_rows(settings)
    accuracy, loss, eval_seconds, training, checks = {}, {}, {}, {}, {}
    for kind in dict.fromkeys(row.model for row in rows):  # train in row order, each model once
        log(f"training {kind} ...")
        model, training[kind] = train_model(kind, corpus, settings)
        log(f"  {kind}: {training[kind]['parameters'] / 1e6:.2f}M parameters, layers {training[kind]['layers']}, "
            f"final train loss {training[kind]['final_train_loss']:.3f}, {training[kind]['seconds']:.0f} s")
        if kind == "baseline":
            checks = consistency_checks(model, natural_all, n)
            log(f"  consistency checks passed: {checks}")
        for row in (r for r in rows if r.model == kind):
            accuracy[row.name], loss[row.name] = {"natural": {}, "repeated": {}}, {"natural": {}, "repeated": {}}
            started = time.perf_counter()
            with inference_variant(model, row.inference):
                for length in lengths:
                    for text, tokens in eval_sets[length].items():
                        scores = evaluate(model, tokens, settings["eval_tokens_per_forward"])
                        accuracy[row.name][text][length] = scores["accuracy"]
                        loss[row.name][text][length] = scores["loss"]
            eval_seconds[row.name] = time.perf_counter() - started
            log(f"  {row.name:<36} " + "  ".join(
                f"L={length}: nat {accuracy[row.name]['natural'][length]:5.2f} "
                f"rep {accuracy[row.name]['repeated'][length]:5.2f}" for length in lengths)
                + f"  ({eval_seconds[row.name]:.0f} s)")
        del model
    return {"rows": rows, "accuracy": accuracy, "loss": loss, "eval_seconds": eval_seconds,
            "training": training, "checks": checks,
            "eval_tokens": {length: {text: int(t.shape[0] * (t.shape[1] - 1)) for text, t in sets.items()}
                            for length, sets in eval_sets.items()}}


def accuracy_metrics(rows: list[Row], accuracy: dict, length: int) -> dict:
    """Informational RESULTS.md rows (no goal), one per table row: accuracy on natural text at `length` against the
    baseline's (every number goes to RESULTS.md in `markdown_table`)."""
    baseline = accuracy[rows[0].name]["natural"][length]
    metrics = {}
    for row in rows[1:]:
        candidate = accuracy[row.name]["natural"][length]
        metrics[f"acc@{length} natural: {row.name}"] = informational_metric(
            f"next-token accuracy (%) on natural held-out text at {length} tokens; ratio = candidate accuracy / "
            "baseline accuracy (> 1: the candidate predicts better)", "% acc", candidate, baseline,
            candidate / baseline if baseline > 0 else None,
            "candidate accuracy / baseline accuracy; > 1: the candidate is better")
    return metrics


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # one thread unless asked otherwise (see about/extrapolation_miniature.md)
    threads = configure_threads()
    settings.update(threads=threads, device="cpu", dtype="float32")
    corpus = load_corpus(settings["vocab_size"], settings["heldout_every"], settings["max_documents"])
    settings["corpus"] = {"source": "Python 3.11 documentation sources (python_doc_files)",
                          "train_documents": corpus.train_documents, "heldout_documents": corpus.heldout_documents,
                          "train_tokens": len(corpus.train_tokens),
                          "tokenizer": f"byte-level BPE, vocab {corpus.tokenizer.get_vocab_size()}"}
    log(f"corpus: {settings['corpus']} ({time.perf_counter() - started:.0f} s)")
    measured = measure(settings, corpus)
    n, lengths = settings["training_length"], list(settings["eval_lengths"])
    rows = measured["rows"]
    table = side_by_side(rows, measured["accuracy"], lengths, n, BLOG)
    print_side_by_side(table, lengths, n)

    result = make_result(
        NAME,
        candidate="the row named in the metric",
        peer=PEER,
        settings=settings,
        metrics=accuracy_metrics(rows, measured["accuracy"], max(lengths)),
        checks=measured["checks"],
        quick=quick,
    )
    result["tables"] = string_keys({
        "units": "accuracy in %, loss = mean next-token cross-entropy in nats; keys are evaluation lengths",
        "training_length": n,
        "eval_lengths": lengths,
        "eval_tokens": measured["eval_tokens"],
        "rows": [{"name": r.name, "model": r.model, "rerope_mode": r.inference.rerope_mode,
                  "rerope_window": r.inference.window, "leaky_factor": r.inference.leaky_factor,
                  "logn_dagger": r.inference.logn_dagger, "blog_row": r.blog} for r in rows],
        "accuracy": measured["accuracy"],
        "loss": measured["loss"],
        "side_by_side": table,
        "blog": {"setting": "GAU ~100M, 24 layers, N = 512, next-token accuracy (%) at 512 and at 4096 = 8×N "
                            "(kexue.fm posts 9708, 9728, 9603, 9731)", "rows": BLOG},
        "copying": {"definition": "repeated minus natural accuracy (points); near 0: the model does not copy",
                    "by_row": copying_indicator(measured["accuracy"], lengths)},
        "training": measured["training"],
        "eval_seconds": measured["eval_seconds"],
    })
    result["markdown_tables"] = [markdown_table(table, lengths, n, settings)]
    figure = plot(measured["accuracy"], n, f"HfExt {settings['model']['num_hidden_layers']}L×"
                  f"{settings['model']['hidden_size']} trained at N = {n} on Python docs ({settings['steps']} steps): "
                  "accuracy vs length")
    save_result(result, figure, started)
    return result


if __name__ == "__main__":
    main()
