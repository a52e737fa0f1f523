"""Build a hybrid window/full HfExt model, train it a few steps on your text, save it and load it back.

    python -m examples.hybrid_model_quickstart [--text-file PATH] [--output-dir DIR] [--max-steps N]

It runs the main job of `hf-ext demo` (text, tokenizer, Trainer with Lion and the fused tail-capped loss, save,
reload, generate) with its model step replaced: three sliding-window RoPE layers and one full NoPE layer with log-n
scaling instead of a preset.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

import hf_ext
from hf_ext.demo import (DemoRun, DemoSettings, format_report, load_text, make_blocks, run_demo, save_reload_generate,
                         train, train_tokenizer)
from hf_ext.hub import parameter_count


def hybrid_model(vocab_size: int) -> torch.nn.Module:
    config = hf_ext.HfExtConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=32,
        position_encodings=["rope", "rope", "none", "rope"],
        logn_scaling=[False, False, True, False],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config)


def build_hybrid_model(run: DemoRun) -> None:
    """Takes the place of the demo's `build_model` step."""
    model = run.artifacts["model"] = hybrid_model(len(run.artifacts["tokenizer"]))
    run.report["model"] = {"parameters": parameter_count(model),
                           "summary": f"hybrid (examples/), {parameter_count(model) / 1e6:.2f}M parameters"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", action="append", default=None)
    parser.add_argument("--output-dir", default="hybrid_quickstart_output")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args(argv)

    settings = DemoSettings(text_files=args.text_file, output_dir=args.output_dir, max_steps=args.max_steps,
                            batch_size=8, max_characters=500_000)
    steps = [load_text, train_tokenizer, build_hybrid_model, make_blocks, train, save_reload_generate]
    report = run_demo(settings, steps)
    print(format_report(report))
    reloaded = AutoModelForCausalLM.from_pretrained(report["checkpoint"]["path"])
    report["layer_scheme"] = list(zip(reloaded.config.layer_types, reloaded.config.position_encodings))
    print("per-layer scheme:", report["layer_scheme"])
    return report


if __name__ == "__main__":
    main()
