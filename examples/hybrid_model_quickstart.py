"""Build a hybrid window/full HfExt model, train it a few steps on your text, save it and load it back.

    python examples/hybrid_model_quickstart.py [--text-file PATH] [--output-dir DIR] [--max-steps N]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

import hf_ext
from hf_ext.demo import DEMO_STEPS, DemoSettings, DemoStep, format_report, run_demo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", action="append", default=None)
    parser.add_argument("--output-dir", default="hybrid_quickstart_output")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args()

    settings = DemoSettings(text_files=args.text_file, output_dir=args.output_dir, max_steps=args.max_steps,
                            batch_size=8, max_characters=500_000)

    def build_hybrid(run):  # takes the place of the demo's preset model
        model = hybrid_model(len(run.artifacts["tokenizer"]))
        run.artifacts["model"] = model
        run.report["model"] = {"preset": "hybrid (examples/)", "parameters": parameter_count(model)}

    steps = [DemoStep("build hybrid model", build_hybrid) if step.name == "build model" else step
             for step in DEMO_STEPS]
    report = run_demo(settings, steps)
    print(format_report(report))
    reloaded = AutoModelForCausalLM.from_pretrained(report["checkpoint"]["path"])
    print("per-layer scheme:", list(zip(reloaded.config.layer_types, reloaded.config.position_encodings)))


if __name__ == "__main__":
    main()
