"""RoPE-Tie with a real image: a canvas of digits through `HfExtProcessor`, its rotary positions in every layout, and
greedy `generate()` checked against a full forward.

    python -m examples.ropetie_digit_canvas [--rows R] [--cols C] [--new-tokens N]

The canvas holds R × C of scikit-learn's 8×8 digit images, one 8-pixel patch per cell, and goes through the processor
of the repository's digit-canvas task (benchmarks/tasks/digit_canvas: a word-level tokenizer, no download) as a user's
image would. For each `position_layout` a tiny untrained vision HfExt model prints the (row, column) positions of
"what is <image> left of 7" and checks that `generate()` after the image gives the logits of one forward pass over
the finished sequence (positions are recomputed from the tokens, nothing is stored between steps).
"""

import argparse

import torch
from sklearn.datasets import load_digits

from benchmarks.tasks.digit_canvas import build_processor
from hf_ext import HfExtConfig, HfExtForCausalLM

LAYOUTS = ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2")
TEXT = "what is <image> left of 7"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--cols", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    rows, cols = options.rows, options.cols

    digits = torch.tensor(load_digits().images[: rows * cols], dtype=torch.float32) / 16.0
    canvas = digits.reshape(rows, cols, 8, 8).permute(0, 2, 1, 3).reshape(8 * rows, 8 * cols)
    processor = build_processor(patch_size=8, image_channels=1)
    inputs = processor(text=TEXT, images=canvas)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    cells = iter(f"patch {r},{c}" for r in range(rows) for c in range(cols))
    tokens = [next(cells) if token == "<image_patch>" else token for token in tokens]
    markers = [processor.model_config_kwargs[key] for key in ("image_token_id", "image_start_token_id",
                                                              "image_end_token_id")]
    positions, gaps = {}, {}
    for layout in LAYOUTS:
        torch.manual_seed(options.seed)
        config = HfExtConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             position_layout=layout, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id, bos_token_id=None,
                             **processor.model_config_kwargs)
        model = HfExtForCausalLM(config).eval()
        positions[layout] = model.model.get_position_ids(inputs["input_ids"], inputs["image_grid_hw"])[:, 0].T.tolist()
        output = model.generate(**inputs, max_new_tokens=options.new_tokens, do_sample=False, suppress_tokens=markers,
                                output_scores=True, return_dict_in_generate=True)
        new = len(output.scores)  # fewer than asked for if it ends with </s>
        with torch.no_grad():
            full = model(input_ids=output.sequences, pixel_values=inputs["pixel_values"],
                         image_grid_hw=inputs["image_grid_hw"]).logits[0, -new - 1 : -1]
        kept = torch.ones(full.shape[-1], dtype=torch.bool)
        kept[markers] = False  # suppressed in generation: -inf in its scores
        gaps[layout] = (torch.stack(output.scores, dim=1)[0] - full)[:, kept].abs().max().item()

    print(f"rotary positions of {TEXT!r} with a {rows}×{cols}-cell digit canvas (patches row by row):")
    print(f"{'token':<15}" + "".join(f"{layout:<17}" for layout in LAYOUTS))
    for index, token in enumerate(tokens):
        cells = (", ".join(f"{v:g}" for v in positions[layout][index]) for layout in LAYOUTS)
        print(f"{token:<15}" + "".join(f"{cell:<17}" for cell in cells))
    print("generate() after the image vs one full forward, max |Δlogit|: "
          + ", ".join(f"{layout} {gap:.1e}" for layout, gap in gaps.items()))
    return {"tokens": tokens, "positions": positions, "generate_vs_full_forward_max_abs_logit_difference": gaps}


if __name__ == "__main__":
    main()
