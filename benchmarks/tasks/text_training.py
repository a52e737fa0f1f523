"""Data, model and training runs of ``training_quality``: Python-documentation blocks and their tokenizer, noisy
training labels, the HfExt model config, one `Trainer` run per `RunSpec` (AdamW or Lion, cross-entropy or TaiLr,
clean or noisy labels) with its held-out loss curve, and the held-out token statistics."""

import copy
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_ext.hub import preset_path
from hf_ext.losses import TailCappedLoss
from hf_ext.models.hfext import HfExtConfig, HfExtForCausalLM
from hf_ext.optim import adamw_to_lion, lion_optimizer_cls_and_kwargs

from ..harness import log
from .assets import default_text_files

IGNORE_INDEX = -100
NUM_SPECIAL_TOKENS = 3  # "<pad>", "<s>", "</s>" (ids 0, 1, 2); random replacement tokens are drawn above them


DROPPED_TAIL_BLOCKS = 8  # the demo kept the stream's last 8 blocks for its long-context step; they stay unused here


@dataclass
class Data:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train_input_ids: torch.Tensor  # [N, block_size]
    eval_blocks: object  # datasets.Dataset with "input_ids" (what `mean_loss` takes)
    report: dict


def load_data(settings: dict) -> Data:
    """About ``max_characters`` of the Python documentation (`default_text_files`) as paragraphs, a byte-level BPE
    tokenizer of ``vocab_size`` trained on them, and blocks of ``block_size`` tokens, ``eval_blocks`` of them held out.

    This is ``hf-ext demo``'s pipeline as it was when the benchmark was written (paragraphs tokenized 2000 at a time,
    each followed by </s>, and each batch's tail that fills no block dropped), kept here so that the numbers stay put.
    """
    from datasets import load_dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as scratch:  # written to only where python3.11-doc is missing
        files, source = default_text_files(settings["max_characters"], Path(scratch))
        text = load_dataset("text", data_files=[str(f) for f in files], split="train", sample_by="paragraph")
        text = text.filter(lambda row: len(row["text"].strip()) > 0)
    report = {"text": {"source": source, "files": len(files), "paragraphs": len(text),
                       "characters": sum(len(t) for t in text["text"])}}

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text["text"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    report["tokenizer"] = {"vocab_size": bpe.get_vocab_size()}

    size = settings["block_size"]

    def to_blocks(batch):
        ids = [token for paragraph in batch["text"] for token in tokenizer(paragraph)["input_ids"]
               + [tokenizer.eos_token_id]]
        return {"input_ids": [ids[i : i + size] for i in range(0, len(ids) // size * size, size)]}

    blocks = text.map(to_blocks, batched=True, batch_size=2000, remove_columns=["text"], desc="Tokenizing")
    if len(blocks) <= settings["eval_blocks"] + DROPPED_TAIL_BLOCKS:
        raise ValueError(f"The text gives {len(blocks)} blocks of {size} tokens, too few for {settings['eval_blocks']} "
                         "held-out blocks.")
    blocks = blocks.select(range(len(blocks) - DROPPED_TAIL_BLOCKS))
    split = blocks.train_test_split(test_size=settings["eval_blocks"], seed=settings["seed"])
    report["data"] = {"train_blocks": len(split["train"]), "eval_blocks": len(split["test"]), "block_size": size}
    train_input_ids = torch.tensor(split["train"]["input_ids"], dtype=torch.long)
    return Data(tokenizer=tokenizer, train_input_ids=train_input_ids, eval_blocks=split["test"], report=report)


def mean_loss(model, blocks, batch_size: int) -> float:
    """Mean next-token cross-entropy of ``model`` over the ``input_ids`` of ``blocks`` (a datasets.Dataset), batch by
    batch: each batch's mean loss weighted by its number of blocks."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
            losses.append(model(ids, labels=ids).loss.item() * len(ids))
    return sum(losses) / len(blocks)


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


def model_config(settings: dict, tokenizer) -> HfExtConfig:
    """The preset's config (`hub_configs/`) with the benchmark's overrides, sized to the tokenizer."""
    config = HfExtConfig.from_pretrained(
        preset_path(settings["model"]["preset"]), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=settings["block_size"], **settings["model"]["overrides"],
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass(frozen=True)
class RunSpec:
    """One training of the benchmark: optimizer (with Lion's factor), loss, label noise and seed."""

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
    """The loss's name in run names and tables, e.g. ``TaiLr γ=0.1 min_weight=0.2``."""
    return f"TaiLr γ={gamma:g}" + (f" min_weight={min_weight:g}" if min_weight else "")


def factor_label(value: float) -> str:
    """Lion's adamw_to_lion factor as run names write it (``3``, ``10``)."""
    return f"{value:g}"


def run_specs(settings: dict) -> list[RunSpec]:
    """The trainings, reference first: AdamW / cross-entropy / clean labels / seed 0."""
    seed, noise = settings["seed"], settings["label_noise"]
    pct = f"{noise * 100:g}%"
    specs = [RunSpec("AdamW, CE, clean", seed=seed)]
    specs += [RunSpec(f"Lion ×{factor_label(f)}, CE, clean", optimizer="lion", lion_factor=f, seed=seed)
              for f in settings["lion_factors"]]
    skip = {tuple(pair) for pair in settings["clean_skip"]}
    specs += [RunSpec(f"AdamW, {tailr_name(g, b)}, clean", gamma=g, min_weight=b, seed=seed)
              for g, b in settings["tailr"] if (g, b) not in skip]
    specs += [RunSpec(f"AdamW, CE, {pct} noisy labels", label_noise=noise, seed=seed)]
    specs += [RunSpec(f"AdamW, {tailr_name(g, b)}, {pct} noisy labels", gamma=g, min_weight=b, label_noise=noise,
                      seed=seed) for g, b in settings["tailr"]]
    specs += [RunSpec(f"AdamW, CE, clean, seed {s}", seed=s) for s in settings["spread_seeds"]]
    return specs


def eval_steps(settings: dict) -> list[int]:
    """The steps after which the held-out loss is measured: every ``eval_every`` steps and the last."""
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
    measured_steps = set(eval_steps(settings))
    curve: dict[int, float] = {}

    class EvalCurve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in measured_steps:
                curve[state.global_step] = mean_loss(model, data.eval_blocks, 2 * batch_size)
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
    log(f"\n=== {spec.name}: {'Lion' if spec.optimizer == 'lion' else 'AdamW'} lr {hyper['learning_rate']:.3g} "
         f"weight decay {hyper['weight_decay']:.3g}, loss {spec.loss_name}, label noise {spec.label_noise:g}, "
         f"seed {spec.seed}")
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    final = curve[steps]
    final_eval = token_statistics(model, data.eval_blocks, 2 * batch_size)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    train_log = [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]
    log(f"=== {spec.name}: clean held-out loss {final:.4f} ({seconds:.0f} s)")
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
    """Over every predicted position of the held-out blocks: mean cross-entropy (the same number as `mean_loss`),
    next-token accuracy (%) and the median token loss (a mean far above the median: a few tokens with huge losses)."""
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
