"""HfExt decoder vs transformers' LlamaForCausalLM with identical weights (fp32, sdpa, CPU).

* prefill: one forward pass over batch x prompt tokens (no cache), in tokens/s;
* decode: greedy `generate` with the KV cache, exactly `new_tokens` tokens per sequence, in new tokens/s.

Goal: speed_ratio = Llama time / HfExt time >= 0.95 for both; the logits must agree to 1e-4 first.
Run with ``python -m benchmarks.decoder_vs_llama`` (about 1-2 minutes on 2 CPU cores) or ``--quick`` (seconds).
"""

import copy
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext.convert import from_llama

from .harness import compare, compare_peak_memory, configure_threads, log, main, make_result, save_result

NAME = "decoder_vs_llama"
GOAL = 0.95
LOGIT_TOLERANCE = 1e-4

FULL = {
    "model": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 8192},
    "prefill_batch": 4, "prefill_tokens": 512,
    "decode_batch": 1, "decode_prompt_tokens": 32, "new_tokens": 64,
    "prefill_repeats": 7, "decode_repeats": 15, "warmup": 1,
}
QUICK = {
    "model": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1024},
    "prefill_batch": 2, "prefill_tokens": 128,
    "decode_batch": 1, "decode_prompt_tokens": 16, "new_tokens": 16,
    "prefill_repeats": 10, "decode_repeats": 10, "warmup": 1,  # calls of a few milliseconds: many rounds are cheap
}


def build_models(model_settings: dict, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(hfext, llama) with the same random weights, fp32, sdpa, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **model_settings,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(config).to(torch.float32).eval()
    # from_llama takes over the source's tensors, so it gets a copy and the original Llama stays usable.
    hfext = from_llama(copy.deepcopy(llama)).eval()
    return hfext, llama


def run(settings: dict, quick: bool = False) -> dict:
    threads = configure_threads()  # one thread count for both models, recorded with the results
    settings.update({"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu", "threads": threads, "seed": 0})

    hfext, llama = build_models(settings["model"])
    generator = torch.Generator().manual_seed(1)
    vocab = settings["model"]["vocab_size"]
    prefill_ids = torch.randint(vocab, (settings["prefill_batch"], settings["prefill_tokens"]), generator=generator)
    prompt_ids = torch.randint(vocab, (settings["decode_batch"], settings["decode_prompt_tokens"]), generator=generator)
    new_tokens = settings["new_tokens"]

    def prefill(model):
        return model(input_ids=prefill_ids, use_cache=False).logits

    def decode(model):
        return model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

    with torch.no_grad():
        # Validity first: same computation, or the timings mean nothing.
        max_abs_diff = (prefill(hfext) - prefill(llama)).abs().max().item()
        if max_abs_diff > LOGIT_TOLERANCE:
            raise AssertionError(f"HfExt and Llama logits differ by {max_abs_diff:.3g} > {LOGIT_TOLERANCE}.")
        hfext_tokens, llama_tokens = decode(hfext), decode(llama)
        if hfext_tokens.shape[1] != llama_tokens.shape[1] or hfext_tokens.shape[1] != prompt_ids.shape[1] + new_tokens:
            raise AssertionError(f"generate produced {hfext_tokens.shape} vs {llama_tokens.shape} tokens.")
        tokens_identical = torch.equal(hfext_tokens, llama_tokens)

        timing = {"warmup": settings["warmup"], "min_speed_ratio": GOAL}
        metrics = {
            "prefill": compare(
                lambda: prefill(hfext), lambda: prefill(llama),
                work=settings["prefill_batch"] * settings["prefill_tokens"], unit="tokens/s",
                description=f"forward, batch {settings['prefill_batch']} x {settings['prefill_tokens']} tokens",
                repeats=settings["prefill_repeats"], **timing,
            ),
            "decode": compare(
                lambda: decode(hfext), lambda: decode(llama),
                work=settings["decode_batch"] * new_tokens, unit="tokens/s",
                description=f"greedy generate, {new_tokens} new tokens after a "
                f"{settings['decode_prompt_tokens']}-token prompt, batch {settings['decode_batch']}",
                repeats=settings["decode_repeats"], **timing,
            ),
        }
        # Memory last: measuring it changes the allocator's settings for the rest of the process.
        for metric_name, run in (("prefill", prefill), ("decode", decode)):
            metrics[metric_name].update(
                compare_peak_memory(partial(run, hfext), partial(run, llama), description=metric_name)
            )

    result = make_result(
        NAME,
        candidate="HfExtForCausalLM",
        peer="transformers LlamaForCausalLM",
        settings=settings,
        metrics=metrics,
        checks={
            "max_abs_logit_diff": max_abs_diff,
            "logit_tolerance": LOGIT_TOLERANCE,
            "greedy_tokens_identical": tokens_identical,
        },
        quick=quick,
    )
    for metric_name, metric in metrics.items():
        log(
            f"{metric_name}: HfExt {metric['candidate']:,.0f} {metric['unit']}, Llama {metric['peer']:,.0f} "
            f"{metric['unit']}, speed_ratio {metric['speed_ratio']:.3f} (goal >= {GOAL}); peak memory HfExt "
            f"{metric['candidate_peak_bytes'] / 2**20:.1f} MiB, Llama {metric['peer_peak_bytes'] / 2**20:.1f} MiB"
        )
    log(f"max |logit diff| {max_abs_diff:.2e}")
    save_result(result)
    return result


if __name__ == "__main__":
    main()
