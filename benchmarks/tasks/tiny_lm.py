"""Tiny HfExt language models of the `extrapolation_miniature` benchmark: a byte-level BPE tokenizer and token streams
of the Python documentation (split by file into training and held-out documents), the natural and repeated
evaluation texts, the model layouts (RoPE baseline, HWFA, HWFA+ReRoPE), their AdamW training loop, and the switch
that runs a trained model with another ReRoPE / log-n setting at inference.
"""

import contextlib
import math
import random
import time
from dataclasses import dataclass

import torch

from hf_ext.hwfa import hwfa_config
from hf_ext.models.hfext import HfExtConfig, HfExtForCausalLM

from ..harness import log
from .assets import python_doc_files


# ----------------------------------------------------------------------------------------------------------------
# Text: a tokenizer and token streams, built once per process (every row and every quick/full call reuses them)


@dataclass
class Corpus:
    tokenizer: object  # tokenizers.Tokenizer
    train_tokens: torch.Tensor  # [T] all training documents, an end-of-text token after each
    heldout: list[torch.Tensor]  # one tensor per held-out document
    train_documents: int
    heldout_documents: int


_CORPUS_CACHE: dict[tuple, Corpus] = {}
EOS_ID = 2  # "<pad>", "<s>", "</s>" are ids 0, 1, 2


def load_corpus(vocab_size: int, heldout_every: int, max_documents: int | None = None) -> Corpus:
    """Python documentation split by file: every `heldout_every`-th file held out, a BPE tokenizer on the rest."""
    key = (vocab_size, heldout_every, max_documents)
    if key in _CORPUS_CACHE:
        return _CORPUS_CACHE[key]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = python_doc_files(max_documents)
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    train_texts = [t for i, t in enumerate(texts) if i % heldout_every != 0]
    heldout_texts = [t for i, t in enumerate(texts) if i % heldout_every == 0]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Trained on the training files only, so held-out text is new to the tokenizer as well as to the models.
    tokenizer.train_from_iterator(train_texts, trainer=trainer)
    train_ids = [ids + [EOS_ID] for ids in (e.ids for e in tokenizer.encode_batch(train_texts))]
    corpus = Corpus(
        tokenizer=tokenizer,
        train_tokens=torch.tensor([token for ids in train_ids for token in ids], dtype=torch.long),
        heldout=[torch.tensor(e.ids, dtype=torch.long) for e in tokenizer.encode_batch(heldout_texts)],
        train_documents=len(train_texts),
        heldout_documents=len(heldout_texts),
    )
    _CORPUS_CACHE[key] = corpus
    return corpus


def natural_eval_tokens(corpus: Corpus, length: int, documents: int) -> torch.Tensor:
    """[documents, length]: the middle `length` tokens of the longest-enough held-out documents, in file order."""
    long_enough = [doc for doc in corpus.heldout if len(doc) >= length]
    if len(long_enough) < documents:
        raise ValueError(f"only {len(long_enough)} held-out documents have {length} tokens; {documents} needed.")
    # Spread the picks over the documentation rather than taking its first few files (one topic each).
    step = len(long_enough) / documents
    picks = [long_enough[int(i * step)] for i in range(documents)]
    return torch.stack([doc[(len(doc) - length) // 2 :][:length] for doc in picks])


def repeated_eval_tokens(corpus: Corpus, length: int, count: int, training_length: int, seed: int) -> torch.Tensor:
    """[count, length]: held-out chunks of N/2 … N tokens, each tiled by repetition to `length` tokens.

    The chunks depend on (seed, i) only, so sequence i uses the same chunk at every length.
    """
    rows = []
    for i in range(count):
        rng = random.Random(f"{seed}-repeated-{i}")
        doc = rng.choice([d for d in corpus.heldout if len(d) > training_length])
        size = rng.randint(training_length // 2, training_length)
        start = rng.randrange(len(doc) - size + 1)
        chunk = doc[start : start + size]
        rows.append(chunk.repeat(math.ceil(length / size))[:length])
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Models


def model_config(kind: str, settings: dict) -> HfExtConfig:
    """The HfExt layout of one trained model: "baseline", "hwfa", "hwfa_rerope_f1", "hwfa_rerope_f2"."""
    common = dict(
        settings["model"],
        vocab_size=settings["vocab_size"],
        max_position_embeddings=settings["training_length"],  # also the log-n base N and ReRoPE defaults
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=EOS_ID,
    )
    if kind == "baseline":
        config = HfExtConfig(**common)
    elif kind == "hwfa":
        config = hwfa_config("hwfa", **common)
    elif kind.startswith("hwfa_rerope_f"):
        # Trained with plain RoPE in the full layers ("off"); switched to ReRoPE (window N/2) for evaluation.
        config = hwfa_config("hwfa_rerope", num_full_layers=int(kind[-1]), **common)
        config.rerope_mode = "off"
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    config._attn_implementation = "sdpa"
    return config


def describe_layout(config: HfExtConfig) -> list[str]:
    """One word per layer, e.g. "window42/rope", "full/none+logn"."""
    words = []
    for i, kind in enumerate(config.layer_types):
        span = f"window{config.sliding_window}" if kind == "sliding_attention" else "full"
        words.append(f"{span}/{config.position_encodings[i]}{'+logn' if config.logn_scaling[i] else ''}")
    return words


def train_model(kind: str, corpus: Corpus, settings: dict) -> tuple[HfExtForCausalLM, dict]:
    """AdamW from scratch on random N-token windows of the training stream; same seed and batches for every kind."""
    config = model_config(kind, settings)
    torch.manual_seed(settings["seed"])
    model = HfExtForCausalLM(config)
    # Weight decay on matrices only (norm gains and the tied embedding stay undecayed), the usual GPT recipe.
    decayed = [p for name, p in model.named_parameters() if p.dim() >= 2 and "embed" not in name]
    others = [p for name, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in name)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": settings["weight_decay"]}, {"params": others, "weight_decay": 0.0}],
        lr=settings["learning_rate"], betas=(0.9, 0.95),
    )
    steps, warmup = settings["steps"], max(1, int(settings["warmup_fraction"] * settings["steps"]))

    def learning_rate_factor(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    length, batch = settings["training_length"], settings["batch_size"]
    generator = torch.Generator().manual_seed(settings["seed"])  # the same batches for every model
    offsets_limit = len(corpus.train_tokens) - length
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        starts = torch.randint(offsets_limit, (batch,), generator=generator)
        ids = torch.stack([corpus.train_tokens[s : s + length] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            recent = losses[-max(1, steps // 10):]
            log(f"  [{kind}] step {step + 1}/{steps}: train loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return model, {
        "seconds": time.perf_counter() - started,
        "final_train_loss": sum(tail) / len(tail),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": describe_layout(config),
        "sliding_window": config.sliding_window if "sliding_attention" in config.layer_types else None,
        "rerope_window": config.rerope_window,
    }


# ----------------------------------------------------------------------------------------------------------------
# Inference-time variants of a trained model


@dataclass(frozen=True)
class Inference:
    """How a trained model is run: its `rerope_mode`, window, Leaky factor and the log-n retro-fit."""

    rerope_mode: str = "off"
    window: int | None = None  # None: the config's own `rerope_window`
    leaky_factor: float | None = None
    logn_dagger: bool = False  # retro-fit log-n scaling on every layer at inference ("log n†")


@contextlib.contextmanager
def inference_variant(model: HfExtForCausalLM, variant: Inference):
    """Switch `model` to `variant` for the duration of the block and restore it exactly afterwards."""
    config = model.config
    attentions = [layer.self_attn for layer in model.model.layers]
    saved = (config.rerope_mode, config.rerope_window, config.rerope_leaky_factor, list(config.logn_scaling))
    try:
        config.rerope_mode = variant.rerope_mode
        if variant.window is not None:
            config.rerope_window = variant.window
        if variant.leaky_factor is not None:
            config.rerope_leaky_factor = variant.leaky_factor
        if variant.logn_dagger:
            config.logn_scaling = [True] * len(attentions)
        yield model
    finally:
        config.rerope_mode, config.rerope_window, config.rerope_leaky_factor = saved[:3]
        config.logn_scaling = saved[3]
