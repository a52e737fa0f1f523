"""`hf-ext demo`, offline on a CPU in minutes: train a BPE tokenizer and an HfExt model on real English text with
`Trainer`, Lion and the fused tail-capped loss, save, reload and generate; then one short step per capability through
the public API. The steps (`DEMO_STEPS`) share a `DemoRun`. Longer showcases: the repository's examples/ folder."""

import ast
import copy
import itertools
import json
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Trainer, TrainingArguments

from . import HfExtConfig, HfExtForCausalLM, convert, diffusion, kv_cache_bytes_per_token, losses, optim
from .hub import parameter_count, preset_path
from .peft import get_lora_ga_model

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
LABELS = {"lora_ga": "LoRA-GA", "extrapolation": "ReRoPE", "mla": "MLA", "rope_tie": "RoPE-Tie", "reflow": "reflow 2-D"}


@dataclass
class DemoSettings:
    text_files: list[Path] | None = None  # None: the Python documentation, else the standard library's docstrings
    output_dir: Path = Path("hf_ext_demo_output")
    preset: str = "hfext-small"
    vocab_size: int = 4096
    block_size: int = 128
    max_steps: int = 300
    batch_size: int = 16
    max_characters: int = 3_000_000  # of the default text, enough for a few minutes of training
    eval_blocks: int = 64
    long_context_factor: int = 8  # the ReRoPE step reads this many times the training length
    reflow_training_steps: int = 1000  # for each of 1-RF and 2-RF
    prompt: str = "The Python standard library"
    seed: int = 0


@dataclass
class DemoRun:
    settings: DemoSettings
    report: dict = field(default_factory=dict)  # per step; each "summary" is a line of `format_report`
    artifacts: dict = field(default_factory=dict)  # what steps hand to later steps (text, tokenizer, model…)


def stdlib_docstrings(max_characters: int) -> str:
    """English prose every Python carries: the standard library's docstrings of 200 characters or more (modules,
    classes, functions), file by file in sorted order, about `max_characters` in all."""
    stdlib, parts, total = Path(sysconfig.get_paths()["stdlib"]), [], 0
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "dist-packages", "test", "tests", "idlelib"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for docstring in (ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(node, kinds)):
            if len(docstring) >= 200:
                parts.append(docstring)
                if (total := total + len(docstring)) >= max_characters:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


def load_text(run: DemoRun) -> None:
    """The user's files, else about `max_characters` of the Python documentation sources, else the standard library's
    docstrings (written to the output folder): paragraphs, through `datasets`."""
    files, source, limit = run.settings.text_files, "your text files", run.settings.max_characters
    if not files and PYTHON_DOC_SOURCES.is_dir():
        paths = sorted(PYTHON_DOC_SOURCES.rglob("*.rst.txt"))
        before = itertools.accumulate((path.stat().st_size for path in paths), initial=0)
        files, source = [p for p, size in zip(paths, before) if size < limit], "the Python 3.11 documentation"
    elif not files:
        files, source = [run.settings.output_dir / "python_stdlib_docstrings.txt"], "the standard library's docstrings"
        files[0].parent.mkdir(parents=True, exist_ok=True)
        files[0].write_text(stdlib_docstrings(limit), encoding="utf-8")
    dataset = load_dataset("text", data_files=[str(f) for f in files], split="train", sample_by="paragraph")
    run.artifacts["text"] = dataset = dataset.filter(lambda row: len(row["text"].strip()) > 0)
    characters = sum(map(len, dataset["text"]))
    run.report["text"] = {"source": source, "files": len(files), "paragraphs": len(dataset), "characters": characters,
                          "summary": f"{characters:,} characters of {source} ({len(files)} files)"}


def train_tokenizer(run: DemoRun) -> None:
    """A byte-level BPE tokenizer trained on the text in seconds; <pad>, <s>, </s> get the presets' ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=run.settings.vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(run.artifacts["text"]["text"], trainer=trainer)
    run.artifacts["tokenizer"] = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                         bos_token="<s>", eos_token="</s>")
    run.report["tokenizer"] = {"vocab_size": tokenizer.get_vocab_size()}


def build_model(run: DemoRun) -> None:
    """An HfExt model from a preset of `hub_configs/`, sized to the tokenizer, trained at `block_size` tokens."""
    tok, s = run.artifacts["tokenizer"], run.settings
    config = HfExtConfig.from_pretrained(preset_path(s.preset), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         max_position_embeddings=s.block_size)
    torch.manual_seed(s.seed)
    run.artifacts["model"] = AutoModelForCausalLM.from_config(config)
    count = parameter_count(run.artifacts["model"])
    run.report["model"] = {"parameters": count, "summary": f"{s.preset}, {count / 1e6:.2f}M parameters"}


def make_blocks(run: DemoRun) -> None:
    """Tokenize the paragraphs joined by </s>, cut into blocks; the last `long_context_factor` blocks stay out of
    training as one long text for the ReRoPE step, `eval_blocks` random others are held out."""
    s, tokenizer, n_long = run.settings, run.artifacts["tokenizer"], run.settings.long_context_factor
    ids = tokenizer(tokenizer.eos_token.join(run.artifacts["text"]["text"]))["input_ids"]
    blocks = [ids[i : i + s.block_size] for i in range(0, len(ids) - s.block_size + 1, s.block_size)]
    run.artifacts["long_text"] = sum(blocks[-n_long:], [])
    split = Dataset.from_dict({"input_ids": blocks[:-n_long], "labels": blocks[:-n_long]}).train_test_split(
        s.eval_blocks, seed=s.seed)
    run.artifacts["train_blocks"], run.artifacts["eval_blocks"] = split["train"], split["test"]
    run.report["data"] = {"train_blocks": len(split["train"]), "eval_blocks": s.eval_blocks, "block_size": s.block_size}


@torch.no_grad()
def _mean_loss(model, blocks, batch_size: int) -> float:
    """Mean cross-entropy of `model` over the `input_ids` of `blocks` (a datasets.Dataset)."""
    batches = [torch.tensor(blocks[i : i + batch_size]["input_ids"]) for i in range(0, len(blocks), batch_size)]
    return sum(model.eval()(ids, labels=ids).loss.item() * len(ids) for ids in batches) / len(blocks)


@torch.no_grad()
def _max_logit_gap(run: DemoRun, model, other) -> float:
    probe = torch.tensor(run.artifacts["eval_blocks"][:2]["input_ids"])
    return (model.eval()(probe).logits - other.eval()(probe).logits).abs().max().item()


def train(run: DemoRun) -> None:
    """`Trainer` with Lion (AdamW-scale lr 2e-3 and weight decay 0.1 converted by `adamw_to_lion`) and the fused
    tail-capped loss (no [tokens, vocab] logits; γ = 1e-7 as TaiLr from scratch); eval loss before and after."""
    s, model, eval_blocks = run.settings, run.artifacts["model"], run.artifacts["eval_blocks"]
    before = _mean_loss(model, eval_blocks, s.batch_size)
    args = TrainingArguments(str(s.output_dir / "trainer"), max_steps=s.max_steps, seed=s.seed, use_cpu=True,
                             per_device_train_batch_size=s.batch_size, **optim.adamw_to_lion(2e-3, 0.1),
                             lr_scheduler_type="cosine", warmup_steps=max(1, s.max_steps // 10),
                             logging_steps=max(1, s.max_steps // 10), save_strategy="no", report_to=[])
    losses.enable_fused_loss(model, losses.TailCappedLoss(gamma=1e-7, min_weight=0.2, fused=True))
    seconds = Trainer(model=model, args=args, optimizer_cls_and_kwargs=optim.lion_optimizer_cls_and_kwargs(args),
                      train_dataset=run.artifacts["train_blocks"]).train().metrics["train_runtime"]
    losses.disable_fused_loss(model)
    after, speed = _mean_loss(model, eval_blocks, s.batch_size), s.max_steps * s.batch_size * s.block_size / seconds
    lion = f"Lion (lr {args.learning_rate:.3g}, weight decay {args.weight_decay:.3g})"
    run.report["training"] = {"eval_loss_before": before, "eval_loss_after": after, "seconds": seconds,
                              "summary": f"{s.max_steps} steps, {lion}, fused tail-capped loss, {speed:,.0f} tokens/s "
                              f"({seconds:.0f} s)\neval loss {before:.3f} before -> {after:.3f} after (perplexity "
                              f"{math.exp(after):.1f})"}


def save_reload_generate(run: DemoRun) -> None:
    """save_pretrained, load back through the Auto classes (same logits), then a greedy continuation of the prompt
    (blocking repeated 3-grams keeps a model this small readable)."""
    folder = run.settings.output_dir / "model"
    run.artifacts["model"].save_pretrained(folder)
    run.artifacts["tokenizer"].save_pretrained(folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    gap = _max_logit_gap(run, model, run.artifacts["model"])
    run.artifacts["model"], run.artifacts["tokenizer"] = model, tokenizer
    run.report["checkpoint"] = {"path": str(folder.resolve()), "reload_max_abs_logit_difference": gap,
                                "summary": f"{folder.resolve()} (reload max |Δlogit| {gap:.1e})"}
    inputs = tokenizer(run.settings.prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False, no_repeat_ngram_size=3,
                            pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    run.report["generation"] = {"continuation": text, "summary": f"{run.settings.prompt!r} -> {text!r}"}


def lora_ga_finetune(run: DemoRun) -> None:
    """`get_lora_ga_model` starts a PEFT LoRA adapter (rank 8) along the top singular directions of the gradient,
    estimated on 4 batches; after a short fine-tune it saves as plain LoRA and reloads on the untouched base."""
    s, folder, blocks = run.settings, run.settings.output_dir / "model", run.artifacts["train_blocks"]
    loader = torch.utils.data.DataLoader(blocks.with_format("torch", ["input_ids", "labels"]), batch_size=s.batch_size)
    model = get_lora_ga_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=8, lora_alpha=16,
                              target_modules="all-linear"), loader, num_gradient_batches=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for batch in itertools.islice(loader, 40):
        model.train()(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(s.output_dir / "lora_ga_adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), s.output_dir / "lora_ga_adapter")
    loss, gap = _mean_loss(model, run.artifacts["eval_blocks"], s.batch_size), _max_logit_gap(run, reloaded, model)
    run.report["lora_ga"] = {"eval_loss": loss, "reload_max_abs_logit_difference": gap, "summary": f"rank 8, "
                             f"{min(40, len(loader))} steps: eval loss {run.report['training']['eval_loss_after']:.3f} "
                             f"-> {loss:.3f}; the adapter reloads on the base: max |Δlogit| {gap:.1e}"}


def extrapolate(run: DemoRun) -> None:
    """Loss on the last `block_size` − 1 held-out tokens after `block_size` or `long_context_factor` times as many
    tokens: plain RoPE meets distances not seen in training, ReRoPE (`rerope_mode`, window ½ that length) caps them."""
    model, size, text = run.artifacts["model"], run.settings.block_size, torch.tensor(run.artifacts["long_text"])
    model.config.rerope_window, report = max(1, size // 2), {}
    with torch.no_grad():
        for mode, name in (("rerope", "rerope"), ("off", "rope")):
            model.config.rerope_mode = mode
            for length in (size, len(text)):
                logits = model(text[None, -length:], logits_to_keep=size).logits[0, :-1]
                report[f"{name}_loss_at_{length}"] = torch.nn.functional.cross_entropy(logits, text[1 - size :]).item()
    rope, rerope = ("{:.3f} / {:.3f}".format(*(report[f"{name}_loss_at_{n}"] for n in (size, len(text))))
                    for name in ("rope", "rerope"))
    run.report["extrapolation"] = {**report, "summary": f"loss on the same {size - 1} tokens after {size} / "
                                   f"{len(text)} tokens (trained on {size}): RoPE {rope}, ReRoPE {rerope}"}


def convert_to_mla(run: DemoRun) -> None:
    """`to_mla`: GQA → MLA, exact with its defaults; compressed (half the rotary dimensions, a ¾-size latent,
    calibrated on 16 training blocks, no fine-tuning) for a smaller KV cache. Decode speeds: examples/mla_conversion."""
    model, c = run.artifacts["model"], run.artifacts["model"].config
    calibration = torch.tensor(run.artifacts["train_blocks"][:16]["input_ids"])
    compressed = convert.to_mla(model, qk_rope_head_dim=c.head_dim // 2, calibration_input_ids=calibration,
                                kv_lora_rank=c.num_key_value_heads * c.head_dim * 3 // 4)
    gap = _max_logit_gap(run, convert.to_mla(model), model)
    kv = {name: kv_cache_bytes_per_token(m.config, torch.bfloat16) for name, m in (("gqa", model), ("mla", compressed))}
    loss = _mean_loss(compressed, run.artifacts["eval_blocks"], run.settings.batch_size)
    run.report["mla"] = {"exact_max_abs_logit_difference": gap, "kv_bytes_per_token_bf16": kv, "eval_loss": loss,
                         "summary": f"exact conversion max |Δlogit| {gap:.1e}; compressed: KV cache {kv['mla']:,} "
                         f"bytes/token in bf16 (GQA {kv['gqa']:,}), eval loss "
                         f"{run.report['training']['eval_loss_after']:.3f} -> {loss:.3f} without fine-tuning"}


def rope_tie_positions(run: DemoRun) -> None:
    """Rotary positions of "what is <image> left of 7" (a 2 × 3-patch image) in each `position_layout`, from
    `model.model.get_position_ids` of a tiny vision HfExt model (ids by hand: 1 patch, 2 / 3 image start / end)."""
    ids, positions = torch.tensor([[4, 5, 2, 1, 1, 1, 1, 1, 1, 3, 6, 7, 8]]), {}
    for layout in ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2"):
        model = HfExtForCausalLM(HfExtConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, position_layout=layout, image_patch_size=8,
                                             image_token_id=1, image_start_token_id=2, image_end_token_id=3))
        positions[layout] = model.model.get_position_ids(ids, torch.tensor([[[2, 3]]]))[:, 0].T.tolist()
    tokens = "what is <image_start> patch0,0 patch0,1 patch0,2 patch1,0 patch1,1 patch1,2 <image_end> left of 7".split()
    rows = [["token", *positions]] + [[token, *(", ".join(f"{v:g}" for v in p[i]) for p in positions.values())]
                                      for i, token in enumerate(tokens)]
    table = "\n".join("".join(f"{cell:<15}" for cell in row) for row in rows)
    run.report["rope_tie"] = {"positions": positions, "summary": f"positions around a 2 × 3-patch image\n{table}"}


class Velocity2D(torch.nn.Sequential):
    """A velocity model v(x, σ·1000) for 2-D points: its layers map the concatenation (x, σ) to v."""

    def forward(self, sample, timestep):
        sigma = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1).expand(len(sample), 1) / 1000
        return super().forward(torch.cat([sample, sigma], dim=1))


def reflow_2d(run: DemoRun) -> None:
    """Rectified flow from data (1-RF), then reflow on its own (noise, sample) pairs (2-RF), on 8 Gaussians (std 0.25,
    radius 4): 1-RF's paths curve, so one Euler step lands between the modes; 2-RF's are nearly straight."""
    s, generator, angles = run.settings, torch.Generator().manual_seed(run.settings.seed), torch.arange(8) * math.pi / 4
    centres = 4 * torch.stack([angles.cos(), angles.sin()], dim=1)
    data = centres[torch.randint(8, (12_000,), generator=generator)] + torch.randn(12_000, 2, generator=generator) / 4
    torch.manual_seed(s.seed)
    model = Velocity2D(torch.nn.Linear(3, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                       torch.nn.Linear(256, 256), torch.nn.SiLU(), torch.nn.Linear(256, 2))
    args = diffusion.FlowTrainingArguments(max_steps=s.reflow_training_steps, learning_rate=2e-3, seed=s.seed,
                                           lr_scheduler_type="cosine")
    flows = {"1-RF": diffusion.train_rectified_flow(model, data[:10_000], args).model}
    pairs = diffusion.generate_reflow_pairs(flows["1-RF"], 10_000, (2,), num_inference_steps=32)
    flows["2-RF"] = diffusion.train_reflow(copy.deepcopy(flows["1-RF"]), pairs, args).model
    noise, points = torch.randn(2000, 2, generator=generator), {"data": [data[10_000:]]}
    points |= {name: [diffusion.solve_flow(flow, noise, n).samples for n in (1, 2, 32)] for name, flow in flows.items()}
    off = {name: [torch.cdist(p, centres).min(dim=1).values.mean().item() for p in ps] for name, ps in points.items()}
    straight = {name: diffusion.straightness(flow, noise) for name, flow in flows.items()}
    one, two = ("/".join(f"{v:.2f}" for v in off[name]) for name in flows)
    run.report["reflow"] = {"off_mode": off, "straightness": straight, "summary": f"mean distance to the nearest mode "
                            f"after 1/2/32 Euler steps: 1-RF {one}, 2-RF {two} (data {off['data'][0]:.2f}); "
                            f"straightness {straight['1-RF']:.3f} -> {straight['2-RF']:.4f}"}


DEMO_STEPS = [load_text, train_tokenizer, build_model, make_blocks, train, save_reload_generate, lora_ga_finetune,
              extrapolate, convert_to_mla, rope_tie_positions, reflow_2d]


def format_report(report: dict) -> str:
    """The report as text: the summary of every step that ran, one line (or more) each."""
    return "\n".join(["hf_ext demo report"] + [f"  {LABELS.get(name, name):<11}: " + part["summary"].replace(
        "\n", "\n" + " " * 15) for name, part in report.items() if "summary" in part])


def run_demo(settings: DemoSettings | None = None, steps: list | None = None) -> dict:
    """Run the steps (`DEMO_STEPS` by default), write `report.json` into the output folder and return the report."""
    run = DemoRun(settings or DemoSettings())
    run.settings.output_dir = Path(run.settings.output_dir)
    run.settings.output_dir.mkdir(parents=True, exist_ok=True)
    for number, step in enumerate(steps := DEMO_STEPS if steps is None else steps, start=1):
        print(f"[{number}/{len(steps)}] {step.__name__.replace('_', ' ')}", flush=True)
        step(run)
    (run.settings.output_dir / "report.json").write_text(json.dumps(run.report, indent=2))
    return run.report
