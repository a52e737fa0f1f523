"""`hf-ext demo`: the main job, end to end on real English text, offline, in a few minutes on a laptop CPU.

The demo is a list of steps (`DEMO_STEPS`) sharing one `DemoRun`; each capability of hf_ext adds its own step.
Default run: train a byte-level BPE tokenizer on the Python documentation (Debian's python3.11-doc; the standard
library's docstrings where that is not installed), build an HfExt model from the `hfext-small` preset, train it briefly
with `Trainer` (Lion and the fused tail-capped loss), save it, reload it through
`AutoModelForCausalLM.from_pretrained`, generate a continuation and print a report.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_PROMPT = "The Python standard library"


@dataclass
class DemoSettings:
    text_files: list[Path] | None = None  # None: `assets.default_text_files`
    output_dir: Path = Path("hf_ext_demo_output")
    preset: str = "hfext-small"
    vocab_size: int = 4096
    block_size: int = 128
    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 2e-3  # an AdamW-scale rate; Lion trains with it ÷ 3 (and weight decay × 3)
    weight_decay: float = 0.1
    # The TaiLr paper's setting for training from scratch. A large γ from scratch collapses (γ = 0.1 ends worse than
    # the untrained model: benchmarks/training_quality): the weight p/γ starts near 0 for every token.
    tail_capped_gamma: float = 1e-7
    tail_capped_min_weight: float = 0.2
    max_characters: int = 3_000_000  # of the default corpus, enough for a few minutes of training
    eval_blocks: int = 64
    long_context_factor: int = 8  # the extrapolation step evaluates at this many times the training length
    lora_rank: int = 8
    lora_steps: int = 40  # fine-tuning steps of the LoRA and LoRA-GA step, each
    lora_learning_rate: float = 2e-3
    lora_gradient_batches: int = 4
    reflow_training_steps: int = 1500  # for each of 1-RF and 2-RF on the 2-D example
    reflow_pairs: int = 10_000
    prompt: str = DEFAULT_PROMPT
    new_tokens: int = 40
    seed: int = 0


@dataclass
class DemoRun:
    settings: DemoSettings
    report: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # what steps hand to later steps (dataset, tokenizer, model…)


@dataclass
class DemoStep:
    name: str
    run: Callable[[DemoRun], None]


# ---------------------------------------------------------------------------------------------------------------
# Steps


def load_text(run: DemoRun) -> None:
    """Real English text through `datasets`: the user's files, a slice of the Python documentation or, where that is
    not installed, the docstrings of Python's standard library."""
    from datasets import load_dataset

    from .assets import default_text_files

    files = run.settings.text_files
    if files:
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"`text_files`: not found: {missing}")
        source = "your text files"
    else:
        files, source = default_text_files(run.settings.max_characters, run.settings.output_dir)
    dataset = load_dataset("text", data_files=[str(f) for f in files], split="train", sample_by="paragraph")
    dataset = dataset.filter(lambda row: len(row["text"].strip()) > 0)
    if len(dataset) < 2:
        raise ValueError(f"`text_files` hold too little text for a demo ({len(dataset)} paragraphs).")
    run.artifacts["text"] = dataset
    run.report["text"] = {"source": source, "files": len(files), "paragraphs": len(dataset),
                          "characters": sum(len(t) for t in dataset["text"])}


def train_tokenizer(run: DemoRun) -> None:
    """A byte-level BPE tokenizer trained on the same text (seconds), wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the presets' pad/bos/eos ids
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=run.settings.vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(run.artifacts["text"]["text"], trainer=trainer)
    run.artifacts["tokenizer"] = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    run.report["tokenizer"] = {"vocab_size": tokenizer.get_vocab_size()}


def build_model(run: DemoRun) -> None:
    """An HfExt model from a preset of `hub_configs/`, sized to the tokenizer."""
    from transformers import AutoModelForCausalLM

    from .hub import parameter_count, preset_path
    from .models.hfext import HfExtConfig

    tokenizer = run.artifacts["tokenizer"]
    config = HfExtConfig.from_pretrained(
        preset_path(run.settings.preset), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=run.settings.block_size,  # the length it is trained at
    )
    torch.manual_seed(run.settings.seed)
    run.artifacts["model"] = AutoModelForCausalLM.from_config(config)
    run.report["model"] = {"preset": run.settings.preset, "parameters": parameter_count(run.artifacts["model"]),
                           "layer_types": config.layer_types, "position_encodings": config.position_encodings}


def make_blocks(run: DemoRun) -> None:
    """Tokenize, concatenate with an end-of-text token between paragraphs, cut into fixed-length blocks."""
    tokenizer, size = run.artifacts["tokenizer"], run.settings.block_size

    def to_blocks(batch):
        ids = [token for text in batch["text"] for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        usable = len(ids) // size * size
        blocks = [ids[i : i + size] for i in range(0, usable, size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    blocks = run.artifacts["text"].map(to_blocks, batched=True, batch_size=2000,
                                       remove_columns=["text"], desc="Tokenizing")
    long_blocks = run.settings.long_context_factor
    if len(blocks) <= run.settings.eval_blocks + long_blocks:
        raise ValueError(
            f"The text yields {len(blocks)} blocks of {size} tokens; the demo needs more than `eval_blocks` + "
            f"`long_context_factor` ({run.settings.eval_blocks + long_blocks}). Give more text or lower `block_size`."
        )
    # The last blocks of the stream stay out of training as one contiguous long text for the extrapolation step.
    run.artifacts["long_text"] = [t for block in blocks.select(range(len(blocks) - long_blocks, len(blocks)))["input_ids"]
                                  for t in block]
    blocks = blocks.select(range(len(blocks) - long_blocks))
    split = blocks.train_test_split(test_size=run.settings.eval_blocks, seed=run.settings.seed)
    run.artifacts["train_blocks"], run.artifacts["eval_blocks"] = split["train"], split["test"]
    run.report["data"] = {"train_blocks": len(split["train"]), "eval_blocks": len(split["test"]), "block_size": size}


def _mean_loss(model, blocks, batch_size: int) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for start in tqdm(range(0, len(blocks), batch_size), desc="Evaluating", leave=False):
            ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
            losses.append(model(ids, labels=ids).loss.item() * len(ids))
    return sum(losses) / len(blocks)


def train(run: DemoRun) -> None:
    """A short `Trainer` run with Lion and the fused tail-capped loss; cross-entropy on held-out blocks before and
    after (the AdamW-scale learning rate and weight decay are converted with `adamw_to_lion`)."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from .losses import TailCappedLoss, disable_fused_loss, enable_fused_loss
    from .optim import adamw_to_lion, lion_optimizer_cls_and_kwargs

    settings, model = run.settings, run.artifacts["model"]
    loss_before = _mean_loss(model, run.artifacts["eval_blocks"], settings.batch_size)
    lion_settings = adamw_to_lion(settings.learning_rate, settings.weight_decay)
    args = TrainingArguments(
        output_dir=str(settings.output_dir / "trainer"), max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size, **lion_settings,
        lr_scheduler_type="cosine", warmup_steps=max(1, settings.max_steps // 10),
        logging_steps=max(1, settings.max_steps // 10), save_strategy="no", report_to=[], seed=settings.seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=False,
    )
    loss = TailCappedLoss(gamma=settings.tail_capped_gamma, min_weight=settings.tail_capped_min_weight, fused=True)
    enable_fused_loss(model, loss)  # lm_head + loss chunk by chunk: the [tokens, vocab] logits never exist
    trainer = Trainer(model=model, args=args, train_dataset=run.artifacts["train_blocks"],
                      data_collator=default_data_collator,
                      optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    disable_fused_loss(model)
    loss_after = _mean_loss(model, run.artifacts["eval_blocks"], settings.batch_size)
    trained_tokens = settings.max_steps * settings.batch_size * settings.block_size
    run.report["training"] = {
        "steps": settings.max_steps, "optimizer": f"Lion (lr {args.learning_rate:.3g}, weight decay "
        f"{args.weight_decay:.3g})", "loss": repr(loss), "eval_loss_before": loss_before,
        "eval_loss_after": loss_after, "eval_perplexity_after": math.exp(loss_after),
        "train_tokens_per_second": trained_tokens / seconds, "seconds": seconds,
    }


def save_and_reload(run: DemoRun) -> None:
    """save_pretrained, then load back through the Auto classes and check the logits are unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run.settings.output_dir / "model"
    model, tokenizer = run.artifacts["model"], run.artifacts["tokenizer"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    probe = torch.tensor(run.artifacts["eval_blocks"][:2]["input_ids"])
    with torch.no_grad():
        difference = (reloaded(probe).logits - model.eval()(probe).logits).abs().max().item()
    run.artifacts["model"], run.artifacts["tokenizer"] = reloaded, AutoTokenizer.from_pretrained(folder)
    run.report["checkpoint"] = {"path": str(folder.resolve()), "reload_max_abs_logit_difference": difference}


def generate(run: DemoRun) -> None:
    """Greedy continuation of the prompt with the reloaded model and its KV cache.

    A model this small and this briefly trained loops on frequent words under plain greedy search; blocking
    repeated 3-grams (transformers' `no_repeat_ngram_size`) keeps the continuation readable.
    """
    model, tokenizer = run.artifacts["model"], run.artifacts["tokenizer"]
    inputs = tokenizer(run.settings.prompt, return_tensors="pt")
    new = run.settings.new_tokens
    started = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            no_repeat_ngram_size=3, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    run.report["generation"] = {"prompt": run.settings.prompt, "continuation": continuation,
                                "decode_tokens_per_second": new / seconds}


def lora_ga_finetune(run: DemoRun) -> None:
    """Continue training the saved model with a rank-r adapter: LoRA vs LoRA-GA, same batches and learning rate.

    `get_lora_ga_model` estimates the gradient on a few batches and starts the adapter along its top singular
    directions; the adapter then saves as plain LoRA and is checked on a fresh copy of the untouched base model.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from .peft import get_lora_ga_model

    settings = run.settings
    folder = settings.output_dir / "model"
    blocks = run.artifacts["train_blocks"].with_format("torch")
    batches = [{"input_ids": blocks[i:i + settings.batch_size]["input_ids"],
                "labels": blocks[i:i + settings.batch_size]["labels"]}
               for i in range(0, min(settings.lora_steps * settings.batch_size, len(blocks)), settings.batch_size)]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules=targets)
    results = {}
    for method in ("lora", "lora_ga"):
        base = AutoModelForCausalLM.from_pretrained(folder)
        if method == "lora":
            model = get_peft_model(base, config)
        else:
            model = get_lora_ga_model(base, config, batches, num_gradient_batches=settings.lora_gradient_batches)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=settings.lora_learning_rate, weight_decay=0.0)
        model.train()
        for batch in tqdm(batches, desc=f"Fine-tuning ({method})", leave=False):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[f"{method}_eval_loss"] = _mean_loss(model, run.artifacts["eval_blocks"], settings.batch_size)
    adapter = settings.output_dir / "lora_ga_adapter"
    model.save_pretrained(adapter)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()
    probe = torch.tensor(run.artifacts["eval_blocks"][:2]["input_ids"])
    with torch.no_grad():
        difference = (reloaded(probe).logits - model.eval()(probe).logits).abs().max().item()
    run.report["lora_ga"] = {"rank": settings.lora_rank, "steps": settings.lora_steps,
                             "learning_rate": settings.lora_learning_rate, **results,
                             "adapter": str(adapter.resolve()), "reload_max_abs_logit_difference": difference}


def extrapolate(run: DemoRun) -> None:
    """Length extrapolation: loss on held-out text far beyond the training length, plain RoPE vs ReRoPE.

    The model was trained on `block_size` tokens. At `long_context_factor` times that length plain RoPE meets
    distances it never saw; ReRoPE (`rerope_mode="rerope"`, window = half the training length) caps them.
    The loss is measured on the last `block_size` − 1 tokens, so both lengths score the same tokens.
    """
    model, size = run.artifacts["model"], run.settings.block_size
    text = torch.tensor(run.artifacts["long_text"])[None]
    lengths = [size, size * run.settings.long_context_factor]
    saved = (model.config.rerope_mode, model.config.rerope_window)
    model.config.rerope_window = max(1, size // 2)
    results = {}
    with torch.no_grad():
        for mode in ("off", "rerope"):
            model.config.rerope_mode = mode
            for length in lengths:
                window = text[:, -length:]
                # the last size − 1 tokens, the most a context of `size` tokens can score
                logits = model(window, logits_to_keep=size).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1 - size :].flatten())
                results[f"{'rope' if mode == 'off' else 'rerope'}_loss_at_{length}"] = loss.item()
    model.config.rerope_mode, model.config.rerope_window = saved
    run.report["extrapolation"] = {"training_length": size, "lengths": lengths, **results}


def convert_to_mla(run: DemoRun) -> None:
    """GQA → MLA: the trained model converted exactly and compressed, with its cache size and decode speed.

    `to_mla` with its defaults keeps every rotary dimension and the full key/value rank, so the logits do not change;
    the compressed setting keeps half the rotary dimensions and a smaller latent (activation-aware, calibrated on
    training blocks, no fine-tuning). Decode speed: greedy tokens after a `long_text` prompt, MLA decoding in the
    absorbed form against the same MLA model forced to the expanded form (which re-expands the whole latent cache
    at every step, as transformers' DeepSeek attention does) and against the original GQA model.
    """
    from .convert import to_mla
    from .kv_cache import kv_cache_bytes_per_token

    model = run.artifacts["model"].eval()
    config, settings = model.config, run.settings
    eval_blocks = run.artifacts["eval_blocks"]
    calibration = torch.tensor(run.artifacts["train_blocks"][:16]["input_ids"])
    exact = to_mla(model)
    compressed = to_mla(model, qk_rope_head_dim=config.head_dim // 2, kv_lora_rank=config.num_key_value_heads *
                        config.head_dim * 3 // 4, calibration_input_ids=calibration)
    probe = torch.tensor(eval_blocks[:2]["input_ids"])
    with torch.no_grad():
        exact_gap = (exact(probe).logits - model(probe).logits).abs().max().item()
    report = {"exact_max_abs_logit_difference": exact_gap,
              "kv_bytes_per_token_bf16": {"gqa": kv_cache_bytes_per_token(config, torch.bfloat16),
                                          "mla_exact": kv_cache_bytes_per_token(exact.config, torch.bfloat16),
                                          "mla_compressed": kv_cache_bytes_per_token(compressed.config, torch.bfloat16)},
              "compressed_setting": {"qk_rope_head_dim": compressed.config.qk_rope_head_dim,
                                     "kv_lora_rank": compressed.config.kv_lora_rank},
              "eval_loss": {"gqa": _mean_loss(model, eval_blocks, settings.batch_size),
                            "mla_compressed": _mean_loss(compressed, eval_blocks, settings.batch_size)}}
    prompt = torch.tensor(run.artifacts["long_text"])[None]
    new = settings.new_tokens
    speeds = {}
    for name, candidate, implementation in [("gqa", model, None), ("mla_absorbed", compressed, "auto"),
                                            ("mla_expanded", compressed, "expanded")]:
        if implementation:
            candidate.config.mla_implementation = implementation
        started = time.perf_counter()
        candidate.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=config.pad_token_id)
        speeds[name] = new / (time.perf_counter() - started)
    compressed.config.mla_implementation = "auto"
    report["decode_tokens_per_second"] = {"context": prompt.shape[1], **speeds}
    run.report["mla"] = report


ROPE_TIE_EXAMPLE = "what is <image> left of 7"


def rope_tie_positions(run: DemoRun) -> None:
    """Rotary positions of a small interleaved example (text, a 2 × 3-cell digit canvas, text) in every layout.

    The canvas is made of scikit-learn's 8×8 digit images, one 8-pixel patch per cell, and goes through the
    processor as a user's image would. For each layout a tiny untrained image model checks the other half of the
    promise: greedy `generate()` after the image gives the logits of a full forward over the finished sequence.
    """
    from sklearn.datasets import load_digits

    from .digit_canvas import build_processor
    from .models.hfext import HfExtConfig, HfExtForCausalLM
    from .models.hfext.positions_hfext import POSITION_LAYOUTS

    digits = torch.tensor(load_digits().images[:6], dtype=torch.float32) / 16.0
    canvas = digits.reshape(2, 3, 8, 8).permute(0, 2, 1, 3).reshape(16, 24)  # 2 rows × 3 columns of digits
    processor = build_processor(patch_size=8, image_channels=1)
    inputs = processor(text=ROPE_TIE_EXAMPLE, images=canvas)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    markers = [processor.model_config_kwargs[key] for key in ("image_token_id", "image_start_token_id",
                                                              "image_end_token_id")]
    positions, gaps = {}, {}
    for layout in POSITION_LAYOUTS:
        torch.manual_seed(run.settings.seed)
        config = HfExtConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             position_layout=layout, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id, bos_token_id=None,
                             **processor.model_config_kwargs)
        model = HfExtForCausalLM(config).eval()
        positions[layout] = model.model.get_position_ids(inputs["input_ids"], inputs["image_grid_hw"])[:, 0].T.tolist()
        new = 4
        output = model.generate(**inputs, max_new_tokens=new, do_sample=False, suppress_tokens=markers,
                                output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            full = model(input_ids=output.sequences, pixel_values=inputs["pixel_values"],
                         image_grid_hw=inputs["image_grid_hw"]).logits[0, -new - 1 : -1]
        kept = torch.ones(full.shape[-1], dtype=torch.bool)
        kept[markers] = False  # suppressed: -inf in the scores
        gaps[layout] = (torch.stack(output.scores, dim=1)[0] - full)[:, kept].abs().max().item()
    run.report["rope_tie"] = {"text": ROPE_TIE_EXAMPLE, "image_grid": [2, 3], "tokens": tokens,
                              "positions": positions, "generate_vs_full_forward_max_abs_logit_difference": gaps}


def reflow_2d(run: DemoRun) -> None:
    """Rectified flow and reflow on a 2-D mixture of 8 Gaussians, with a picture.

    1-rectified flow is trained from data with independent noise; its ODE paths curve, so one Euler step lands
    near the mean of the data. Reflow retrains on its own (noise, sample) pairs: the paths straighten and one step
    is nearly as good as many. Distances are sliced Wasserstein to fresh data (two independent data samples of the
    same size are `data_floor` apart).
    """
    import copy

    from hf_ext.diffusion import (FlowTrainingArguments, VelocityMLP, eight_gaussians, generate_reflow_pairs,
                                  sliced_wasserstein, solve_flow, straightness, train_rectified_flow, train_reflow)

    settings = run.settings
    torch.manual_seed(settings.seed)
    data = eight_gaussians(settings.reflow_pairs, generator=torch.Generator().manual_seed(settings.seed))
    args = FlowTrainingArguments(max_steps=settings.reflow_training_steps, learning_rate=2e-3, lr_scheduler_type="cosine",
                                 seed=settings.seed)
    started = time.perf_counter()
    flows = {"1-RF": train_rectified_flow(VelocityMLP(), data, args).model}
    pairs = generate_reflow_pairs(flows["1-RF"], settings.reflow_pairs, (2,), num_inference_steps=32)
    flows["2-RF"] = train_reflow(copy.deepcopy(flows["1-RF"]), pairs, args).model
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(settings.seed + 1))
    target = eight_gaussians(2000, generator=torch.Generator().manual_seed(settings.seed + 2))
    report = {"seconds": time.perf_counter() - started,
              "data_floor": sliced_wasserstein(eight_gaussians(2000, generator=torch.Generator().manual_seed(
                  settings.seed + 3)), target)}
    for name, model in flows.items():
        report[name] = {"straightness": straightness(model, noise),
                        "distance_by_steps": {n: sliced_wasserstein(solve_flow(model, noise, n).samples, target)
                                              for n in (1, 2, 32)}}
    picture = _plot_reflow(flows, noise[:400], target, settings.output_dir / "reflow_2d.png")
    report["picture"] = str(picture) if picture else None
    run.report["reflow"] = report


def _plot_reflow(flows: dict, noise: torch.Tensor, target: torch.Tensor, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf-ext[plot]'): no picture")
        return None
    from hf_ext.diffusion import solve_flow

    figure, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for row, (name, model) in enumerate(flows.items()):
        paths = torch.stack(solve_flow(model, noise[:60], 32, return_trajectory=True).trajectory)
        ax = axes[2 * row]
        ax.scatter(*target.T, s=2, c="lightgray")
        ax.plot(paths[..., 0], paths[..., 1], lw=0.6, alpha=0.7)
        ax.set_title(f"{name}: ODE paths (32 Euler steps)")
        ax = axes[2 * row + 1]
        ax.scatter(*target.T, s=2, c="lightgray", label="data")
        ax.scatter(*solve_flow(model, noise, 1).samples.T, s=3, c="tab:red", label="1 step")
        ax.set_title(f"{name}: samples after one Euler step")
        ax.legend(loc="lower right", markerscale=3)
    for ax in axes:
        ax.set_xlim(-6.5, 6.5)
        ax.set_ylim(-6.5, 6.5)
        ax.set_aspect("equal")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


DEMO_STEPS: list[DemoStep] = [
    DemoStep("load text", load_text),
    DemoStep("train tokenizer", train_tokenizer),
    DemoStep("build model", build_model),
    DemoStep("tokenize", make_blocks),
    DemoStep("train", train),
    DemoStep("save and reload", save_and_reload),
    DemoStep("generate", generate),
    DemoStep("LoRA-GA fine-tuning", lora_ga_finetune),
    DemoStep("length extrapolation", extrapolate),
    DemoStep("convert to MLA", convert_to_mla),
    DemoStep("RoPE-Tie positions", rope_tie_positions),
    DemoStep("reflow (2-D)", reflow_2d),
]


# ---------------------------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    training, generation, checkpoint = report["training"], report["generation"], report["checkpoint"]
    lines = [
        "hf_ext demo report",
        f"  text         : {report['text']['paragraphs']} paragraphs, {report['text']['characters']:,} characters "
        f"from {report['text']['files']} file(s) of {report['text']['source']}",
        f"  model        : {report['model']['preset']}, {report['model']['parameters'] / 1e6:.2f}M parameters",
        f"  eval loss    : {training['eval_loss_before']:.3f} before -> {training['eval_loss_after']:.3f} after "
        f"{training['steps']} steps (perplexity {training['eval_perplexity_after']:.1f})",
        f"  training     : {training['optimizer']}, {training['loss']}",
        f"                 {training['train_tokens_per_second']:,.0f} tokens/s ({training['seconds']:.0f} s)",
        f"  generation   : {generation['decode_tokens_per_second']:.1f} tokens/s",
        f"  checkpoint   : {checkpoint['path']} (reload max |Δlogit| {checkpoint['reload_max_abs_logit_difference']:.1e})",
        f"  continuation : {generation['prompt']!r} -> {generation['continuation']!r}",
    ]
    if "lora_ga" in report:
        lora = report["lora_ga"]
        lines.append(
            f"  LoRA-GA      : rank {lora['rank']}, {lora['steps']} steps at lr {lora['learning_rate']:g}: eval loss "
            f"LoRA {lora['lora_eval_loss']:.3f}, LoRA-GA {lora['lora_ga_eval_loss']:.3f}; adapter reloads on the "
            f"untouched base (max |Δlogit| {lora['reload_max_abs_logit_difference']:.1e})"
        )
    if "extrapolation" in report:
        ex = report["extrapolation"]
        short, long = ex["lengths"]
        lines.append(
            f"  extrapolation: loss on the same {short} tokens with {long} tokens of context (trained on {short}): "
            f"RoPE {ex[f'rope_loss_at_{short}']:.3f} -> {ex[f'rope_loss_at_{long}']:.3f}, "
            f"ReRoPE {ex[f'rerope_loss_at_{short}']:.3f} -> {ex[f'rerope_loss_at_{long}']:.3f}"
        )
    if "mla" in report:
        mla = report["mla"]
        kv, speed, loss = mla["kv_bytes_per_token_bf16"], mla["decode_tokens_per_second"], mla["eval_loss"]
        lines.append(
            f"  MLA          : exact conversion max |Δlogit| {mla['exact_max_abs_logit_difference']:.1e}; KV bytes/token "
            f"(bf16) GQA {kv['gqa']:,}, MLA exact {kv['mla_exact']:,}, compressed {kv['mla_compressed']:,} "
            f"({kv['mla_compressed'] / kv['gqa']:.0%}); eval loss {loss['gqa']:.3f} -> {loss['mla_compressed']:.3f} "
            f"(compressed, no fine-tuning)"
        )
        lines.append(
            f"                 decode after {speed['context']} tokens: MLA absorbed {speed['mla_absorbed']:.1f} tokens/s, "
            f"re-expanding {speed['mla_expanded']:.1f}, GQA {speed['gqa']:.1f}"
        )
    if "rope_tie" in report:
        lines.extend(_format_rope_tie(report["rope_tie"]))
    if "reflow" in report:
        flow = report["reflow"]
        one, two = flow["1-RF"], flow["2-RF"]
        lines.append(
            f"  reflow (2-D) : distance to data at 1/2/32 Euler steps: 1-RF "
            f"{'/'.join(f'{v:.2f}' for v in one['distance_by_steps'].values())}, 2-RF "
            f"{'/'.join(f'{v:.2f}' for v in two['distance_by_steps'].values())} (data vs data "
            f"{flow['data_floor']:.2f}); straightness {one['straightness']:.3f} -> {two['straightness']:.4f}"
            + (f"; picture {flow['picture']}" if flow["picture"] else "")
        )
    return "\n".join(lines)


def _format_rope_tie(rope_tie: dict) -> list[str]:
    def cell(values):
        text = [f"{v:g}" for v in values]
        return text[0] if len(text) == 1 else "(" + ", ".join(text) + ")"

    layouts = list(rope_tie["positions"])
    gaps = rope_tie["generate_vs_full_forward_max_abs_logit_difference"]
    lines = [f"  RoPE-Tie     : positions of {rope_tie['text']!r} with a {rope_tie['image_grid'][0]}×"
             f"{rope_tie['image_grid'][1]}-cell digit canvas (patches row by row); generate() after the image = full "
             f"forward (max |Δlogit| {max(gaps.values()):.1e})",
             "                 " + f"{'token':<14}" + "".join(f"{layout:<17}" for layout in layouts)]
    for index, token in enumerate(rope_tie["tokens"]):
        row = "".join(f"{cell(rope_tie['positions'][layout][index]):<17}" for layout in layouts)
        lines.append("                 " + f"{token:<14}" + row)
    return lines


def run_demo(settings: DemoSettings | None = None, steps: list[DemoStep] | None = None) -> dict:
    """Run every demo step, write `report.json` into the output folder and return the report."""
    run = DemoRun(settings or DemoSettings())
    run.settings.output_dir = Path(run.settings.output_dir)
    run.settings.output_dir.mkdir(parents=True, exist_ok=True)
    steps = DEMO_STEPS if steps is None else steps
    for number, step in enumerate(steps, start=1):
        print(f"[{number}/{len(steps)}] {step.name}", flush=True)
        step.run(run)
    (run.settings.output_dir / "report.json").write_text(json.dumps(run.report, indent=2))
    return run.report
