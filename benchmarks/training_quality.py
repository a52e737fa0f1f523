"""Training quality on real text: Lion vs AdamW, and the tail-capped (TaiLr) loss vs cross-entropy on noisy labels.

Two questions, each answered by short `Trainer` runs of a small HfExt model on the Python documentation:

1. **Optimizer.** Does `hf_ext.optim.Lion`, with its hyper-parameters taken from a working AdamW setting by
   `hf_ext.optim.adamw_to_lion` (learning rate ÷ factor, weight decay × factor; factor 3, its default, and 10, the
   paper's range; factor 1, AdamW's own learning rate, as a control), reach the held-out loss of AdamW
   (``optim="adamw_torch"``) in the same number of steps?
2. **Noisy labels.** With 15 % of the training *targets* (the ``labels``, not the ``input_ids``) replaced by
   uniformly random tokens, does `hf_ext.losses.TailCappedLoss` (TaiLr, passed as ``Trainer(compute_loss_func=...)``;
   γ = 0.1 and 0.5 with min_weight 0, and γ = 0.1 with the floor min_weight = 0.2 of the TaiLr paper's scripts) give
   a lower cross-entropy on *clean* held-out text than plain cross-entropy trained on the same noisy labels, as the
   TaiLr paper claims (robustness to noisy data)? The same comparison on clean labels shows what TaiLr costs or gains
   when there is no noise (γ = 0.5 is left out there to save time).

Two reference points. A model that fits 15 % uniform label noise perfectly predicts 0.85·p + 0.15/V instead of p,
which costs up to −log 0.85 ≈ 0.16 nats of clean cross-entropy (less on low-probability tokens): the most a
noise-robust loss can win back at convergence. And TaiLr weights each target's NLL by w = p / (γ + (1 − γ)p):
from scratch every p is about 1/V, so w ≈ 1/(γV) (0.0024 for γ = 0.1, V = 4096) and the weight grows with p, so
tokens the model already predicts dominate the gradient. With min_weight 0 the gradient is that of the objective
−log(γ + (1 − γ)p) / (1 − γ), which stays bounded (by −log γ / (1 − γ)) as a target's probability goes to 0, so
nothing stops the model from giving up on hard tokens. `TailCappedLoss`'s docstring notes (after Su) that γ should
be near 0 from scratch and larger when fine-tuning; this benchmark trains from scratch with the γ values the issue
asks for, so it tests the claim in a setting that is hard for TaiLr.

Protocol:

* Data: the demo's pipeline (`hf_ext.demo`: ``load_text``, ``train_tokenizer``, ``make_blocks``): the first ~3 M
  characters of the Python 3.11 documentation sources (Debian python3.11-doc, `hf_ext.assets.python_doc_files`), split
  into paragraphs, a byte-level BPE tokenizer (vocabulary 4096) trained on that text, the token stream cut into blocks
  of 128 tokens; `eval_blocks` (256) random blocks are held out (never trained on) and are the evaluation set. The
  held-out blocks come from the same documents as the training blocks (the demo's split), not from held-out files.
* Model: the ``hfext-small`` preset (4 layers, 4 heads, 2 KV heads, RoPE) narrowed to hidden size 128 (head_dim 32,
  MLP 344; ~1.25 M parameters with the tied 4096-token embedding), fp32, sdpa, CPU.
* Training: transformers' `Trainer`, 400 steps of 8 blocks (410 k tokens, two thirds of an epoch), cosine schedule
  with 10 % warm-up, gradient clipping at 1.0 (the Trainer's default), no dropout. AdamW: lr 2e-3 (at 500 steps,
  1e-3 / 2e-3 / 4e-3 reached 4.96 / 4.70 / 4.71 nats), weight decay 0.01, betas (0.9, 0.999). Lion:
  ``adamw_to_lion(2e-3, 0.01, factor)``, betas (0.9, 0.99), through
  ``optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args)``. Every run starts from the *same* initial weights
  (one model built with seed 0, deep-copied) and sees the *same* batches in the same order (Trainer seed 0; checked:
  ``checks.same_data_order`` compares a hash of every batch's input_ids). The noisy labels are drawn once (seed 0)
  and shared by every noisy run.
* Evaluation: mean next-token cross-entropy (nats) over every position of the clean held-out blocks (the demo's
  ``_mean_loss``), at step 0, every ``eval_every`` steps and at the end; the final value is the number reported. At
  the end also next-token accuracy and the median token loss (a mean far above the median: a few tokens with huge
  losses, the signature of a model that gave up on them).
* Seed spread: one more AdamW / cross-entropy / clean run with seed 1 (other initial weights, other data order)
  shows how much the final loss moves from the seed alone; differences smaller than that are not evidence.

Results: ``benchmarks/results/training_quality.json`` (every run's final loss, accuracy, eval curve and training log
under ``tables.runs``), a markdown table in RESULTS.md, informational ``metrics`` rows (ratio = peer loss / candidate
loss, > 1: the candidate is better; no pass/fail goal) and a plot ``benchmarks/results/training_quality.png``.

Run with ``hf-ext bench training_quality`` (eleven trainings of about a minute each: 12-13 minutes on 2 shared CPU
cores with one torch thread; ``HF_EXT_BENCH_THREADS=N`` changes the thread count) or ``hf-ext bench training_quality
--quick`` (a tiny model for a few steps: a smoke test of every code path in seconds, not a measurement; written to
``benchmarks/results/quick/``).
"""

import copy
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_ext.benchmarking import (
    THREADS_ENVIRONMENT_VARIABLE,
    configure_threads,
    make_result,
    pyplot,
    save_figure,
    save_result,
)
from hf_ext.demo import DemoRun, DemoSettings, _mean_loss, load_text, make_blocks, train_tokenizer
from hf_ext.hub import parameter_count, preset_path
from hf_ext.losses import TailCappedLoss
from hf_ext.models.hfext import HfExtConfig, HfExtForCausalLM
from hf_ext.optim import adamw_to_lion, lion_optimizer_cls_and_kwargs

NAME = "training_quality"
CANDIDATE = "hf_ext Lion (adamw_to_lion) / TailCappedLoss (per metric)"
PEER = "AdamW (adamw_torch) / cross-entropy, same init, data order and budget"
IGNORE_INDEX = -100
NUM_SPECIAL_TOKENS = 3  # "<pad>", "<s>", "</s>" (ids 0, 1, 2); random replacement tokens are drawn above them

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


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train_input_ids: torch.Tensor  # [N, block_size]
    eval_blocks: object  # datasets.Dataset with "input_ids" (what the demo's `_mean_loss` takes)
    report: dict


def load_data(settings: dict) -> Data:
    """The demo's text, tokenizer and blocks (`hf_ext.demo` steps), with this benchmark's sizes."""
    run = DemoRun(DemoSettings(vocab_size=settings["vocab_size"], block_size=settings["block_size"],
                               max_characters=settings["max_characters"], eval_blocks=settings["eval_blocks"],
                               seed=settings["seed"]))
    for step in (load_text, train_tokenizer, make_blocks):
        step(run)
    train_input_ids = torch.tensor(run.artifacts["train_blocks"]["input_ids"], dtype=torch.long)
    return Data(tokenizer=run.artifacts["tokenizer"], train_input_ids=train_input_ids,
                eval_blocks=run.artifacts["eval_blocks"], report=run.report)


def noisy_labels(labels: torch.Tensor, fraction: float, vocab_size: int, generator: torch.Generator,
                 low: int = NUM_SPECIAL_TOKENS, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``labels`` in which each position that is not ``ignore_index`` is, with probability ``fraction``,
    replaced by a token drawn uniformly from ``[low, vocab_size)``; returns (noisy labels, replaced mask).

    A drawn token can equal the original (probability 1 / (vocab_size − low)), so slightly fewer labels *change*
    than are *replaced*. Ignored positions are never touched. ``labels`` itself is not modified.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noisy_labels: fraction must be in [0, 1], got {fraction!r}")
    if not 0 <= low < vocab_size:
        raise ValueError(f"noisy_labels: need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
    valid = labels != ignore_index
    replaced = (torch.rand(labels.shape, generator=generator) < fraction) & valid
    random_tokens = torch.randint(low, vocab_size, labels.shape, generator=generator, dtype=labels.dtype)
    return torch.where(replaced, random_tokens, labels), replaced


class Blocks(torch.utils.data.Dataset):
    """Fixed-length training blocks: input_ids and (possibly noisy) labels, one dict per block."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape != labels.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class RecordingCollator:
    """`default_data_collator` that also hashes every batch's input_ids, to verify that runs saw the same batches."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self.batches = 0

    def __call__(self, features: list[dict]) -> dict:
        from transformers import default_data_collator

        batch = default_data_collator(features)
        self._digest.update(batch["input_ids"].numpy().tobytes())
        self.batches += 1
        return batch

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Model and runs


def model_config(settings: dict, tokenizer) -> HfExtConfig:
    """The preset's config (`hub_configs/`) with the benchmark's overrides, sized to the tokenizer (as the demo)."""
    config = HfExtConfig.from_pretrained(
        preset_path(settings["model"]["preset"]), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=settings["block_size"], **settings["model"]["overrides"],
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass(frozen=True)
class RunSpec:
    name: str
    optimizer: str = "adamw"  # "adamw" or "lion"
    lion_factor: float | None = None
    gamma: float | None = None  # None: cross-entropy; else TailCappedLoss(gamma, min_weight)
    min_weight: float = 0.0
    label_noise: float = 0.0
    seed: int = 0

    @property
    def loss_name(self) -> str:
        return "cross-entropy" if self.gamma is None else tailr_name(self.gamma, self.min_weight)


def tailr_name(gamma: float, min_weight: float) -> str:
    return f"TaiLr γ={gamma:g}" + (f" min_weight={min_weight:g}" if min_weight else "")


def _factor(value: float) -> str:
    return f"{value:g}"


def run_specs(settings: dict) -> list[RunSpec]:
    """The trainings, reference first: AdamW / cross-entropy / clean labels / seed 0."""
    seed, noise = settings["seed"], settings["label_noise"]
    pct = f"{noise * 100:g}%"
    specs = [RunSpec("AdamW, CE, clean", seed=seed)]
    specs += [RunSpec(f"Lion ×{_factor(f)}, CE, clean", optimizer="lion", lion_factor=f, seed=seed)
              for f in settings["lion_factors"]]
    skip = {tuple(pair) for pair in settings["clean_skip"]}
    specs += [RunSpec(f"AdamW, {tailr_name(g, b)}, clean", gamma=g, min_weight=b, seed=seed)
              for g, b in settings["tailr"] if (g, b) not in skip]
    specs += [RunSpec(f"AdamW, CE, {pct} noisy labels", label_noise=noise, seed=seed)]
    specs += [RunSpec(f"AdamW, {tailr_name(g, b)}, {pct} noisy labels", gamma=g, min_weight=b, label_noise=noise,
                      seed=seed) for g, b in settings["tailr"]]
    specs += [RunSpec(f"AdamW, CE, clean, seed {s}", seed=s) for s in settings["spread_seeds"]]
    return specs


def _eval_steps(settings: dict) -> list[int]:
    every, steps = settings["eval_every"], settings["steps"]
    return sorted({*range(every, steps + 1, every), steps})


def train_one(spec: RunSpec, initial_model: HfExtForCausalLM, train_set: Blocks, data: Data, settings: dict,
              output_dir: Path, quick: bool) -> dict:
    """One Trainer run from a copy of ``initial_model``; returns its record (final clean eval loss, curve, log)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if spec.optimizer == "lion":
        hyper = adamw_to_lion(settings["adamw_learning_rate"], settings["adamw_weight_decay"], spec.lion_factor)
    else:
        hyper = {"learning_rate": settings["adamw_learning_rate"], "weight_decay": settings["adamw_weight_decay"]}
    steps, batch_size = settings["steps"], settings["batch_size"]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine", warmup_steps=max(1, int(settings["warmup_fraction"] * steps)),
        optim="adamw_torch", logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=spec.seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=quick, **hyper,
    )
    eval_steps = set(_eval_steps(settings))
    curve: dict[int, float] = {}

    class EvalCurve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in eval_steps:
                curve[state.global_step] = _mean_loss(model, data.eval_blocks, 2 * batch_size)
                model.train()

    model = copy.deepcopy(initial_model)
    collator = RecordingCollator()
    trainer_kwargs = {}
    if spec.optimizer == "lion":
        trainer_kwargs["optimizer_cls_and_kwargs"] = lion_optimizer_cls_and_kwargs(args, betas=settings["lion_betas"])
    if spec.gamma is not None:
        trainer_kwargs["compute_loss_func"] = TailCappedLoss(gamma=spec.gamma, min_weight=spec.min_weight)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      callbacks=[EvalCurve()], **trainer_kwargs)
    _log(f"\n=== {spec.name}: {'Lion' if spec.optimizer == 'lion' else 'AdamW'} lr {hyper['learning_rate']:.3g} "
         f"weight decay {hyper['weight_decay']:.3g}, loss {spec.loss_name}, label noise {spec.label_noise:g}, "
         f"seed {spec.seed}")
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    final = curve[steps]
    final_eval = token_statistics(model, data.eval_blocks, 2 * batch_size)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    train_log = [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]
    _log(f"=== {spec.name}: clean held-out loss {final:.4f} ({seconds:.0f} s)")
    return {
        "name": spec.name,
        "optimizer": "Lion" if spec.optimizer == "lion" else "AdamW",
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "lion_factor": spec.lion_factor,
        "learning_rate": hyper["learning_rate"],
        "weight_decay": hyper["weight_decay"],
        "betas": list(settings["lion_betas"]) if spec.optimizer == "lion" else [args.adam_beta1, args.adam_beta2],
        "loss": spec.loss_name,
        "gamma": spec.gamma,
        "min_weight": spec.min_weight if spec.gamma is not None else None,
        "label_noise": spec.label_noise,
        "seed": spec.seed,
        "final_eval_loss": final,
        "final_eval_perplexity": math.exp(final),
        "final_eval_accuracy": final_eval["accuracy"],
        "final_eval_median_token_loss": final_eval["median_token_loss"],
        "final_eval_loss_recomputed": final_eval["loss"],
        "eval_curve": curve,
        "train_log": train_log,  # the training objective (TaiLr runs: the TaiLr loss) on the (noisy) training labels
        "seconds": seconds,
        "batches": collator.batches,
        "data_order_digest": collator.digest,
    }


def token_statistics(model, blocks, batch_size: int) -> dict:
    """Over every predicted position of the held-out blocks: mean cross-entropy (the same number as the demo's
    ``_mean_loss``), next-token accuracy (%) and the median token loss (a mean far above the median means a few
    tokens with huge losses)."""
    model.eval()
    losses, correct = [], []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
            logits = model(ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"))
            correct.append((logits.argmax(-1) == targets).flatten())
    losses, correct = torch.cat(losses), torch.cat(correct)
    return {"loss": losses.mean().item(), "accuracy": 100 * correct.float().mean().item(),
            "median_token_loss": losses.median().item()}


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _metric(description: str, candidate: float, peer: float) -> dict:
    return {
        "description": description,
        "unit": "nats",
        "candidate": candidate,
        "peer": peer,
        # RESULTS.md renders this field as the ratio column; for a loss it is the loss ratio, not a speed.
        "speed_ratio": peer / candidate,
        "ratio_definition": "peer loss / candidate loss; > 1 means the candidate is better",
        "difference": candidate - peer,
        "goal": None,
        "min_speed_ratio": None,
        "passed": None,
    }


def loss_metrics(runs: dict[str, dict], settings: dict) -> dict:
    """RESULTS.md rows (informational): Lion vs AdamW, TaiLr vs CE on noisy and on clean labels."""
    pct = f"{settings['label_noise'] * 100:g}%"
    reference = runs["AdamW, CE, clean"]["final_eval_loss"]
    metrics = {}
    for factor in settings["lion_factors"]:
        name = f"Lion ×{_factor(factor)}, CE, clean"
        metrics[f"eval loss: Lion (adamw_to_lion ×{_factor(factor)}) vs AdamW"] = _metric(
            f"clean held-out cross-entropy after {settings['steps']} steps; Lion lr/weight decay from "
            f"adamw_to_lion(AdamW lr, wd, factor={_factor(factor)})", runs[name]["final_eval_loss"], reference)
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


def plot(path: Path, runs: list[dict], settings: dict, title: str) -> Path | None:
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
    return save_figure(figure, path)


def run(settings: dict, save: bool = True, quick: bool = False) -> dict:
    """Every training of `run_specs`, then the result document (saved under benchmarks/results when ``save``)."""
    started = time.perf_counter()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        # One thread unless asked otherwise: on the shared 2-core machine a training step of this model took 0.12 s
        # with one thread and 0.42 s with two while another process was busy. The numbers here are losses, not speeds.
        torch.set_num_threads(1)
    threads = configure_threads()
    settings = {**copy.deepcopy(settings), "threads": threads, "device": "cpu", "dtype": "float32"}
    data = load_data(settings)
    settings["data"] = {"source": "Python 3.11 documentation sources (python_doc_files), via hf_ext.demo",
                        **data.report["text"], **data.report["data"],
                        "tokenizer": f"byte-level BPE, vocab {data.report['tokenizer']['vocab_size']}",
                        "train_tokens_per_run": settings["steps"] * settings["batch_size"] * settings["block_size"]}
    _log(f"data: {settings['data']} ({time.perf_counter() - started:.0f} s)")

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
    initial_loss = {seed: _mean_loss(model, data.eval_blocks, 2 * settings["batch_size"])
                    for seed, model in initial_models.items()}
    settings["parameters"] = parameters
    _log(f"model: {parameters / 1e6:.2f} M parameters; initial clean held-out loss {initial_loss}")

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
        # token_statistics and the demo's _mean_loss compute the same mean cross-entropy
        "final_eval_recomputed_max_abs_diff": max(abs(r["final_eval_loss"] - r["final_eval_loss_recomputed"])
                                                  for r in runs),
    }
    if not checks["same_data_order"]:
        raise AssertionError("The seed-0 runs did not see the same batches; the comparison would not be fair.")

    _log(f"\n{'run':<52}{'clean eval loss':>16}{'Δ vs AdamW CE clean':>22}{'accuracy %':>12}{'median':>9}")
    for r in runs:
        _log(f"{r['name']:<52}{r['final_eval_loss']:>16.4f}{r['final_eval_loss'] - runs[0]['final_eval_loss']:>+22.4f}"
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
    benchmarks_dir = Path(__file__).resolve().parent
    result["plots"] = []
    if save:
        results_dir = benchmarks_dir / "results" / ("quick" if quick else "")
        picture = plot(results_dir / f"{NAME}.png", runs, settings,
                       f"HfExt {parameters / 1e6:.2f} M on Python docs, {settings['steps']} steps of "
                       f"{settings['batch_size']}×{settings['block_size']} tokens: clean held-out loss")
        result["plots"] = [str(picture.relative_to(benchmarks_dir))] if picture and not quick else []
    result["total_seconds"] = time.perf_counter() - started
    if save:
        path = save_result(result, benchmarks_dir)
        _log(f"results in {path} ({result['total_seconds']:.0f} s in all)")
    return result


def main(quick: bool = False) -> dict:
    return run(QUICK if quick else FULL, quick=quick)


if __name__ == "__main__":
    main()
