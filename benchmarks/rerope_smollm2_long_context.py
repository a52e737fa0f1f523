"""ReRoPE on a real checkpoint: SmolLM2-135M read beyond its training length, against transformers' own RoPE scalings.

The question: with no fine-tuning at all, how well does a RoPE model read contexts longer than it was trained on
(N = `max_position_embeddings`, 8192 for SmolLM2-135M) when its attention is swapped for hf_ext's `hfx_rerope` /
`hfx_leaky_rerope`, compared with what transformers offers out of the box? Five methods, one loaded model (fp32, CPU):

==================  ===============================================================================================
method              what changes
==================  ===============================================================================================
`plain`             nothing: the checkpoint's RoPE and `sdpa` (the baseline; expected to break down beyond N)
`yarn`              transformers' YaRN rotary embedding, ``factor = L / N`` (plain when L <= N, as a user would do)
`dynamic`           transformers' dynamic-NTK rotary embedding (``factor`` below); it changes nothing while L <= N
`hfx_rerope`        hf_ext ReRoPE: relative distances capped at the window w = N/4, log-n query scaling beyond N
`hfx_leaky_rerope`  hf_ext Leaky ReRoPE: beyond w, distances grow by 1/16 per token; log-n scaling as above
==================  ===============================================================================================

Two measurements:

1. **Next-token loss vs context length** (the ReRoPE blog's protocol, scaled to the smaller model: it reports the mean
   cross-entropy over the last 4096 tokens of the window for Llama-2 trained at 4k; we use the last 1024 tokens).
   For each length L we feed the *last* L tokens of a long Python-documentation source file, so the scored tokens
   are the same at every L and only the amount of context in front of them changes: a good method's loss goes down
   (or stays flat) with L, a broken one goes up.
2. **Passkey retrieval**: "The pass key is 71432. Remember it. 71432 is the pass key." hidden near the beginning of
   filler text ("The grass is green. The sky is blue. ..."), then "What is the pass key? The pass key is"; greedy
   generation of a few tokens counts as correct when it contains the digits. L counts prompt + generated tokens.
   SmolLM2-135M is a small model: how well it does *within* N is the baseline the longer lengths compare against.

Cost saving. A 16k-token forward pass of this model takes minutes on 2 CPU cores, so a method is not run where it
computes what `plain` computes, and `plain`'s number is reported for it (marked in ``tables.same_as_plain``):
`yarn` and `dynamic` for L <= N, the ReRoPE variants for L <= w (every distance is inside the window, and log-n
scaling is 1 below N). The switching check below verifies these equalities on a short text before anything else.
Losses take the logits of the last tokens only (``logits_to_keep``): all 16k would be 3 GB of fp32 logits.

Switching methods on one model: the built-in scalings live entirely in the rotary embedding module, so we rebuild
``model.model.rotary_emb`` from a copy of the config with the new ``rope_parameters`` (transformers computes the
frequencies once, in the module's constructor) and use `sdpa`. ``model.config`` itself keeps the checkpoint's plain
RoPE on purpose: `hfx_rerope` reads it to rotate keys back to their original positions, which is only right for the
frequencies the keys were rotated with. The ReRoPE options are ``model.config`` attributes, read at every call.
Before measuring, `check_switching` confirms on a short text that each switch changes the logits where it should,
leaves them identical where it should, and that switching back to `plain` reproduces the first logits bit for bit.

Results: ``benchmarks/results/rerope_smollm2_long_context.json`` (tables under ``tables``; the ``metrics`` rows for
RESULTS.md compare the losses at the longest length, ratio = peer loss / candidate loss, > 1: ReRoPE better) and a
plot ``benchmarks/results/rerope_smollm2_long_context.png``. ``quick=True`` is a smoke test of every code path in
a few minutes (2-5 on 2 cores): it *pretends* the training length is 256 (so lengths 256/512 already exercise YaRN,
dynamic NTK, the ReRoPE window and log-n), which says nothing about the real model's long-context behaviour.

Full run (defaults in `FULL`): roughly 25 minutes on an otherwise idle 2-core CPU, most of it in the five 16k-token
forward passes (about 2.5 min each with sdpa, 4 min with ReRoPE, which computes two logits per pair beyond its
window); much longer when other processes compete for the cores. Every pass prints its time as it finishes.
"""

import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ext  # noqa: F401  (registers hfx_rerope / hfx_leaky_rerope)
from hf_ext.assets import PYTHON_DOC_SOURCES, python_doc_files, smollm2_gguf_path
from hf_ext.benchmarking import benchmark_settings, configure_threads, make_result, pyplot, save_result

NAME = "rerope_smollm2_long_context"
BUILTIN_METHODS = ("plain", "yarn", "dynamic")  # transformers' own; run with sdpa
RE_ROPE_METHODS = ("hfx_rerope", "hfx_leaky_rerope")  # hf_ext's attention implementations
METHODS = BUILTIN_METHODS + RE_ROPE_METHODS

# Long, mostly prose sources first (each is 30k+ tokens, so one file is one document even at 16k); any further
# documents come from the largest remaining files.
PREFERRED_DOCUMENTS = ("reference/datamodel.rst.txt", "whatsnew/2.7.rst.txt", "whatsnew/3.2.rst.txt")
PASSKEY_DOCS_FILLER = "library/stdtypes.rst.txt"  # for passkey_filler="docs"
CLASSIC_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

FULL = {
    "loss_lengths": (2048, 4096, 8192, 16384),
    "loss_tail": 1024,  # tokens scored at the end of each window
    "documents": 1,
    # Within N (where ReRoPE already caps distances beyond its window) and beyond N: the needle at depth 0.1 of
    # 10240 tokens is ~9.2k tokens before the question, farther than any distance seen in training. Not 16384: the
    # five 16k passes would add ~15 minutes to a run that the 16k loss passes already make ~18 minutes long.
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
}
QUICK = {
    **FULL,
    "loss_lengths": (256, 512),
    "loss_tail": 128,
    "passkey_lengths": (256, 512),
    "training_length": 256,  # pretended, see the module docstring
}
# Switching changes logits by much more than this; the equalities it relies on hold to float rounding.
SAME_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Methods


def rope_parameters_for(method: str, length: int, training_length: int, base_rope: dict, dynamic_factor: float) -> dict:
    """The rotary embedding's ``rope_parameters`` for ``method`` at context ``length`` (plain RoPE for hf_ext's)."""
    theta = base_rope["rope_theta"]
    if method == "yarn" and length > training_length:
        # The keys transformers' _compute_yarn_parameters reads (and validate_rope requires).
        return {"rope_type": "yarn", "factor": length / training_length,
                "original_max_position_embeddings": training_length, "rope_theta": theta}
    if method == "dynamic":
        return {"rope_type": "dynamic", "factor": dynamic_factor, "rope_theta": theta}
    return copy.deepcopy(base_rope)


def same_as_plain(method: str, length: int, training_length: int, window: int) -> bool:
    """Whether ``method`` computes exactly what plain RoPE computes for a context of ``length`` tokens."""
    if method in ("yarn", "dynamic"):
        return length <= training_length
    if method in RE_ROPE_METHODS:
        return length <= window  # and window <= training_length, so the log-n factor is 1 as well
    return method == "plain"


class MethodSwitch:
    """Puts one loaded Llama-type model into any of `METHODS` (see the module docstring for how and why)."""

    def __init__(self, model, *, training_length: int, window: int, leaky_factor: float, logn_scaling: bool,
                 dynamic_factor: float):
        self.model = model
        self.training_length = training_length
        self.window = window
        self.dynamic_factor = dynamic_factor
        self.base_config = copy.deepcopy(model.config)  # the checkpoint's, before any switch
        self.base_rope = dict(model.config.rope_parameters)
        config = model.config
        config.rerope_window = window
        config.rerope_leaky_factor = leaky_factor
        config.logn_scaling = logn_scaling
        config.logn_training_length = training_length
        self.current = None

    def use(self, method: str, length: int) -> None:
        """Switch to ``method`` for contexts of ``length`` tokens (YaRN's factor depends on it)."""
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
        rope = rope_parameters_for(method, length, self.training_length, self.base_rope, self.dynamic_factor)
        rotary_config = copy.deepcopy(self.base_config)
        rotary_config.rope_parameters = rope
        # YaRN: the extended length, so that transformers' consistency check (factor = max / original) holds.
        # Dynamic NTK: the training length, from which it measures how far the input goes beyond.
        rotary_config.max_position_embeddings = max(length, self.training_length) if method == "yarn" \
            else self.training_length
        rotary_config.validate_rope()
        rotary_class = type(self.model.model.rotary_emb)
        self.model.model.rotary_emb = rotary_class(config=rotary_config).to(self.model.device)
        self.model.set_attn_implementation(method if method in RE_ROPE_METHODS else "sdpa")
        self.current = (method, length)


# ----------------------------------------------------------------------------------------------------------------
# Text


def load_model_and_tokenizer():
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _doc(relative: str) -> Path:
    return PYTHON_DOC_SOURCES / relative


def load_documents(tokenizer, count: int, min_tokens: int) -> list[tuple[str, list[int]]]:
    """``count`` (name, token ids) documents of at least ``min_tokens`` tokens: preferred files, then the largest."""
    files = python_doc_files()
    preferred = [_doc(name) for name in PREFERRED_DOCUMENTS if _doc(name) in set(files)]
    rest = sorted((f for f in files if f not in preferred), key=lambda f: f.stat().st_size, reverse=True)
    documents = []
    for path in preferred + rest:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        if len(ids) >= min_tokens:
            documents.append((path.relative_to(PYTHON_DOC_SOURCES).as_posix(), ids))
        if len(documents) == count:
            return documents
    raise ValueError(f"Only {len(documents)} documentation files have >= {min_tokens} tokens; asked for {count}.")


def passkey_prompt(tokenizer, length: int, key: int, depth: float, filler_ids: list[int]) -> list[int]:
    """Token ids of a passkey prompt of exactly ``length`` tokens, the needle starting ``depth`` into the filler.

    The pieces are tokenised separately so the length is exact; each starts with a space or newline, as in the
    text as a whole. The filler is cut at its end, just before the question.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    intro, needle, question = encode(PASSKEY_INTRO), encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION)
    filler_length = length - len(intro) - len(needle) - len(question)
    if filler_length < 0:
        raise ValueError(f"A passkey prompt needs more than {length} tokens.")
    repeats = -(-filler_length // len(filler_ids))
    filler = (filler_ids * repeats)[:filler_length]
    before = int(depth * filler_length)
    prompt = intro + filler[:before] + needle + filler[before:] + question
    assert len(prompt) == length
    return prompt


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def tail_loss(model, ids: torch.Tensor, tail: int) -> float:
    """Mean cross-entropy (nats) of the last ``tail`` tokens of ``ids`` [1, L], each predicted from all before it."""
    logits = model(input_ids=ids, logits_to_keep=tail + 1, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, -tail:]).item()


def check_switching(switch: MethodSwitch, ids: torch.Tensor) -> dict:
    """Each switch changes the computation where it should and nothing where it should not (see the docstring).

    ``ids`` must be shorter than the training length and longer than the window it sets for the ReRoPE check.
    """
    model, length = switch.model, ids.shape[1]

    def logits(method, at_length=length):
        switch.use(method, at_length)
        return model(input_ids=ids, use_cache=False).logits

    def diff(a, b):
        return (a - b).abs().max().item()

    reference = logits("plain")
    window = switch.window
    model.config.rerope_window = max(1, length // 4)
    rerope_short_window = logits("hfx_rerope")
    leaky_short_window = logits("hfx_leaky_rerope")
    model.config.rerope_window = length  # covers every distance: sdpa's computation
    rerope_full_window = logits("hfx_rerope")
    model.config.rerope_window = window
    checks = {
        "tokens": length,
        "rerope_window_for_check": max(1, length // 4),
        "plain_vs_hfx_rerope_small_window": diff(reference, rerope_short_window),
        "plain_vs_hfx_leaky_rerope_small_window": diff(reference, leaky_short_window),
        "plain_vs_hfx_rerope_window_covering_input": diff(reference, rerope_full_window),
        # YaRN as it would be set for a context of 2N: changes every position's rotation.
        "plain_vs_yarn_2N": diff(reference, logits("yarn", 2 * switch.training_length)),
        # Dynamic NTK leaves inputs within N alone, which same_as_plain relies on.
        "plain_vs_dynamic_within_N": diff(reference, logits("dynamic")),
    }
    checks["plain_again_bitwise_equal"] = torch.equal(reference, logits("plain"))
    problems = []
    for name in ("plain_vs_hfx_rerope_small_window", "plain_vs_hfx_leaky_rerope_small_window", "plain_vs_yarn_2N"):
        if checks[name] <= SAME_TOLERANCE:
            problems.append(f"{name} = {checks[name]:.2e}: switching did not change the computation")
    for name in ("plain_vs_hfx_rerope_window_covering_input", "plain_vs_dynamic_within_N"):
        if checks[name] > SAME_TOLERANCE:
            problems.append(f"{name} = {checks[name]:.2e} > {SAME_TOLERANCE}: expected the plain computation")
    if not checks["plain_again_bitwise_equal"]:
        problems.append("switching back to plain did not reproduce the first logits")
    if problems:
        raise AssertionError("Method switching is broken: " + "; ".join(problems))
    checks["passed"] = True
    return checks


def _log(message: str) -> None:
    print(message, flush=True)


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
                    window = torch.tensor([ids[-length:]])
                    start = time.perf_counter()
                    values.append(tail_loss(switch.model, window, tail))
                    times.append(time.perf_counter() - start)
                    _log(f"  loss L={length:>5} {method:<17} {name}: {values[-1]:.4f} nats ({times[-1]:.1f} s)")
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
                ids = torch.tensor([prompt])
                start = time.perf_counter()
                output = switch.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=tokenizer.eos_token_id,
                )
                times.append(time.perf_counter() - start)
                text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
                answers.append({"key": key, "depth": depth, "answer": text, "correct": str(key) in text})
                _log(f"  passkey L={length:>5} {method:<17} key {key} depth {depth}: {text!r} "
                     f"{'correct' if answers[-1]['correct'] else 'wrong'} ({times[-1]:.1f} s)")
            correct = sum(a["correct"] for a in answers)
            table[method][length] = {"accuracy": correct / len(answers), "correct": correct,
                                     "trials": len(answers), "answers": answers}
            seconds[method][length] = times
    return {"passkey": table, "seconds": seconds, "reused": reused}


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


def plot(path: Path, loss: dict, passkey: dict, training_length: int, title: str) -> Path | None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _print_tables(loss: dict, passkey: dict) -> None:
    lengths = sorted(next(iter(loss.values())))
    _log("\nmean CE (nats) of the scored tail   " + "".join(f"{n:>9}" for n in lengths))
    for method, by_length in loss.items():
        _log(f"  {method:<33}" + "".join(f"{by_length[n]:>9.4f}" for n in lengths))
    lengths = sorted(next(iter(passkey.values())))
    _log("passkey accuracy                    " + "".join(f"{n:>9}" for n in lengths))
    for method, by_length in passkey.items():
        _log(f"  {method:<33}" + "".join(f"{by_length[n]['accuracy']:>9.2f}" for n in lengths))


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
    rows = ["Passkey retrieval accuracy (needle near the start, question at the end):", "",
            "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    rows += [f"| {method} | " + " | ".join(f"{by_length[n]['accuracy']:.2f}" for n in lengths) + " |"
             for method, by_length in passkey.items()]
    tables.append("\n".join(rows))
    return tables


# ----------------------------------------------------------------------------------------------------------------


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``documents=2``)."""
    started = time.perf_counter()
    settings = benchmark_settings(FULL, QUICK, quick, overrides)
    threads = configure_threads()
    torch.manual_seed(settings["seed"])

    model, tokenizer = load_model_and_tokenizer()
    checkpoint_training_length = model.config.max_position_embeddings
    training_length = settings["training_length"] or checkpoint_training_length
    window = settings["rerope_window"] or training_length // 4
    settings.update({
        "model": smollm2_gguf_path().name, "dtype": "float32", "device": "cpu", "threads": threads,
        "checkpoint_max_position_embeddings": checkpoint_training_length,
        "checkpoint_rope_parameters": dict(model.config.rope_parameters),
        "training_length_used": training_length, "rerope_window_used": window,
        "training_length_pretended": training_length != checkpoint_training_length,
    })
    _log(f"SmolLM2-135M: max_position_embeddings {checkpoint_training_length}, rope {model.config.rope_parameters}; "
         f"N = {training_length}{' (pretended, quick mode)' if settings['training_length_pretended'] else ''}, "
         f"ReRoPE window {window}")
    switch = MethodSwitch(model, training_length=training_length, window=window,
                          leaky_factor=settings["leaky_factor"], logn_scaling=settings["logn_scaling"],
                          dynamic_factor=settings["dynamic_factor"])

    longest = max(settings["loss_lengths"])
    documents = load_documents(tokenizer, settings["documents"], longest)
    with torch.no_grad():
        check_ids = torch.tensor([documents[0][1][:settings["switch_check_tokens"]]])
        switch_checks = check_switching(switch, check_ids)
        _log(f"switching check passed: {switch_checks}")
        losses = measure_losses(switch, documents, settings["loss_lengths"], settings["loss_tail"])
        if settings["passkey_filler"] == "classic":
            filler_ids = tokenizer(CLASSIC_FILLER, add_special_tokens=False).input_ids
        else:
            filler_ids = tokenizer(_doc(PASSKEY_DOCS_FILLER).read_text(), add_special_tokens=False).input_ids
        passkey = measure_passkey(switch, tokenizer, settings["passkey_lengths"], settings["passkey_trials"],
                                  settings["passkey_depths"], settings["passkey_new_tokens"], filler_ids,
                                  settings["seed"])
    switch.use("plain", training_length)  # leave the model as loaded

    _print_tables(losses["loss"], passkey["passkey"])
    results_dir = Path(__file__).resolve().parent / "results"
    figure = plot(
        (results_dir / "quick" if quick else results_dir) / f"{NAME}.png", losses["loss"], passkey["passkey"],
        training_length,
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
    result["plot"] = str(figure) if figure else None
    result["markdown_tables"] = _markdown_tables(losses["loss"], passkey["passkey"], settings["loss_tail"],
                                                 training_length)
    result["plots"] = [f"results/{Path(figure).name}"] if figure and not quick else []
    result["total_seconds"] = time.perf_counter() - started
    path = save_result(result, Path(__file__).resolve().parent)
    _log(f"results in {path}" + (f", plot {figure}" if figure else "") + f"; {result['total_seconds']:.0f} s in all")
    return result


if __name__ == "__main__":
    main()
