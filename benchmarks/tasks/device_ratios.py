"""Part B of `benchmarks.device_check`: hf_ext beside the implementation it replaces, in one process, on one device.

Each row times both sides interleaved (`device_common.time_pair`) and, on CUDA, measures each side's peak allocated
memory during one call. Ratios are candidate / peer (time × peer, memory × peer: < 1 means hf_ext needs less).
`GOALS` states each comparison's goal; a row says whether it is met (None where it cannot be judged, e.g. memory on
the CPU). Models are random: speed and memory do not depend on the weight values.
"""

import copy
import importlib.util
import statistics
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .device_common import Section, dtype_of, free_memory, peak_bytes, ratio_fields, time_pair, timed_with_peak

GOALS = {
    "rerope_prefill": {"max_time_ratio": 1.3, "max_memory_exponent": 1.2,
                       "text": "hfx_rerope prefill time <= 1.3x sdpa's; its peak memory linear in L "
                               "(log-log exponent <= 1.2)"},
    "lion_step": {"max_time_ratio": 0.8, "text": "Lion(fused=True) step time <= 0.8x AdamW(fused=True)'s"},
    "tailr_vs_liger": {"max_time_ratio": 1.2, "max_memory_ratio": 1.05,
                       "text": "fused TaiLr peak memory within 5% of Liger's fused linear CE, time <= 1.2x"},
    "tailr_vs_transformers": {"text": "informational: fused TaiLr vs full logits + ForCausalLMLoss"},
    "mla_decode": {"max_time_ratio": 1 / 3,
                   "text": "HfExt absorbed MLA decode >= 3x as fast as transformers' DeepseekV3 (time <= 0.333x)"},
    "lora_ga_memory": {"max_memory_ratio": 0.5,
                       "text": "get_lora_ga_model's extra peak memory <= 0.5x PEFT preprocess_loraga's"},
}


def _measure(section: Section, candidate_call, peer_call, goal: str, *, repeats: int, warmup: int, **fields) -> dict:
    """Time both sides, then (CUDA) their peak memory, and judge the goal; the row's fields."""
    timing = time_pair(candidate_call, peer_call, repeats=repeats, warmup=warmup)
    peaks = [peak_bytes(side, section.device) for side in (candidate_call, peer_call)]
    return {**fields, **ratio_fields(timing, *peaks, GOALS[goal])}


# ----------------------------------------------------------------------------------------------------------------
# ReRoPE prefill vs sdpa


def rerope_prefill(section: Section) -> None:
    from ..rerope_speed_memory import fit_growth
    from .rerope_models import MODEL, ROPE_THETA

    settings, device = section.settings, section.device
    dtype = dtype_of(settings["dtype"])
    shapes = dict(MODEL, num_hidden_layers=settings["layers"], vocab_size=settings["vocab_size"])
    torch.manual_seed(0)
    config = LlamaConfig(**shapes, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    sdpa = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
    rerope = copy.deepcopy(sdpa)
    rerope.set_attn_implementation("hfx_rerope")
    rerope.config.logn_scaling = True
    section.notes.update(model=dict(shapes, rope_theta=ROPE_THETA, architecture="LlamaForCausalLM"),
                         layers_note=f"{settings['layers']} of SmolLM2-135M's 30 layers (time budget)",
                         dtype=settings["dtype"], batch=1, window="L / 4", logn_scaling=True,
                         call="one forward, use_cache=False, logits_to_keep=1, inference_mode (no_grad if "
                              "hfx_rerope fails under it)")

    no_grad = _gradient_free_mode(section, rerope, shapes["vocab_size"])

    def prefill(model, ids):
        with no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    lengths, peaks = [], {"hfx_rerope": [], "sdpa": []}
    for length in settings["lengths"]:
        rerope.config.rerope_window = length // 4
        ids = torch.randint(shapes["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(device)
        row = section.guarded(f"rerope_prefill_{length}", lambda: _measure(
            section, partial(prefill, rerope, ids), partial(prefill, sdpa, ids), "rerope_prefill",
            repeats=settings["repeats"], warmup=settings["warmup"], tokens=length, candidate="hfx_rerope",
            peer="sdpa", what=f"prefill of {length} tokens (window {length // 4})"))
        if row and row["status"] == "ok" and row["candidate_peak_bytes"] is not None:
            lengths.append(length)
            peaks["hfx_rerope"].append(row["candidate_peak_bytes"])
            peaks["sdpa"].append(row["peer_peak_bytes"])
    fits = {name: fit_growth(lengths, values) for name, values in peaks.items()}
    if fits["hfx_rerope"] is None:
        section.skip("rerope_prefill_memory_growth", "fewer than two lengths with a peak-memory figure "
                     "(memory is measured on CUDA only)")
        return
    exponent = fits["hfx_rerope"]["loglog_exponent"]
    limit = GOALS["rerope_prefill"]["max_memory_exponent"]
    section.add({"name": "rerope_prefill_memory_growth", "kind": "growth", "candidate": "hfx_rerope",
                 "peer": "sdpa", "lengths": lengths, "loglog_exponent": exponent,
                 "peer_loglog_exponent": fits["sdpa"]["loglog_exponent"], "fits": fits,
                 "max_exponent": limit, "goal": f"hfx_rerope peak memory linear in L (log-log exponent <= {limit})",
                 "met": bool(exponent <= limit)})


def _gradient_free_mode(section: Section, rerope, vocab_size: int):
    """torch.inference_mode, unless hfx_rerope fails under it: then an error row says so and the timing runs under
    torch.no_grad, so that the numbers still come back."""
    # 32 tokens, window 8: the ReRoPE path runs, on CUDA without compiling flex attention for one more shape.
    ids = torch.randint(vocab_size, (1, 32), generator=torch.Generator().manual_seed(5)).to(section.device)
    rerope.config.rerope_window = 8
    try:
        with torch.inference_mode():
            rerope(input_ids=ids, use_cache=False, logits_to_keep=1)
        return torch.inference_mode
    except RuntimeError as error:
        section.add({"name": "rerope_prefill_inference_mode", "status": "error",
                     "error": f"hfx_rerope fails under torch.inference_mode(): {type(error).__name__}: {error}; "
                              "timed under torch.no_grad() instead"})
        return torch.no_grad


# ----------------------------------------------------------------------------------------------------------------
# Lion vs AdamW(fused=True)


def lion_step(section: Section) -> None:
    from .parameter_sets import build_parameters, make_optimizer, state_bytes

    settings, device = section.settings, section.device
    params = []
    for p in build_parameters(settings["model"]):
        moved = torch.nn.Parameter(p.detach().to(device))
        moved.grad = p.grad.to(device)
        params.append(moved)
    numel = sum(p.numel() for p in params)
    optimizers = {name: make_optimizer(name, params) for name in ("lion_fused", "adamw_fused")}
    section.notes.update(parameters=numel, tensors=len(params), dtype="float32", model=settings["model"],
                         call="one optimizer.step() over fixed gradients (both optimizers step the same tensors)")

    def row():
        fields = _measure(section, optimizers["lion_fused"].step, optimizers["adamw_fused"].step, "lion_step",
                          repeats=settings["repeats"], warmup=settings["warmup"], candidate="hf_ext Lion(fused=True)",
                          peer="torch.optim.AdamW(fused=True)", what=f"one step over {numel:,} fp32 parameters",
                          size=f"{numel / 1e6:.1f}M params")
        return {**fields, "candidate_state_bytes": state_bytes(optimizers["lion_fused"]),
                "peer_state_bytes": state_bytes(optimizers["adamw_fused"])}
    section.guarded("lion_step", row)


# ----------------------------------------------------------------------------------------------------------------
# Fused TaiLr vs Liger's fused linear cross-entropy and transformers' loss on full logits


def _liger_loss():
    """Liger's fused linear cross-entropy as a function of (hidden, weight, targets), or the reason it is missing."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger_kernel not importable"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as error:  # noqa: BLE001 - a broken install is a finding, not a crash
        return None, f"liger_kernel not importable: {type(error).__name__}: {error}"

    loss = LigerFusedLinearCrossEntropyLoss()
    return (lambda hidden, weight, targets: loss(weight, hidden, targets)), None


def tailr_loss(section: Section) -> None:
    from .loss_peers import CANDIDATE_CHUNK, GAMMA, fused_loss, make_inputs, transformers_ce_loss

    settings, device = section.settings, section.device
    dtype = dtype_of(settings["dtype"])
    liger, liger_missing = _liger_loss()
    if liger is not None and device.type != "cuda":
        liger, liger_missing = None, "Liger's Triton kernels need a GPU"
    section.notes.update(vocab_size=settings["vocab_size"], hidden_size=576, dtype=settings["dtype"], gamma=GAMMA,
                         chunk_size=CANDIDATE_CHUNK, liger=liger_missing or "LigerFusedLinearCrossEntropyLoss()",
                         call="loss forward + torch.autograd.grad(loss, (hidden, weight))")

    def forward_backward(loss_fn, hidden, weight, targets):
        torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))

    for tokens in settings["tokens"]:
        hidden, weight, targets = (t.to(device) for t in make_inputs(tokens, settings["vocab_size"], dtype))
        hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        call = {name: partial(forward_backward, fn, hidden, weight, targets) for name, fn in
                (("fused", fused_loss), ("transformers", transformers_ce_loss), ("liger", liger)) if fn is not None}
        peers = {"tailr_vs_liger": ("liger", "Liger LigerFusedLinearCrossEntropyLoss"),
                 "tailr_vs_transformers": ("transformers", "full logits + transformers ForCausalLMLoss")}
        for goal, (peer, label) in peers.items():
            name = f"{goal}_{tokens}"
            if peer not in call:
                section.skip(name, liger_missing, tokens=tokens)
                continue
            section.guarded(name, lambda: _measure(
                section, call["fused"], call[peer], goal, repeats=settings["repeats"], warmup=settings["warmup"],
                tokens=tokens, candidate=f"hf_ext fused TaiLr (chunk {CANDIDATE_CHUNK})", peer=label,
                what=f"{tokens} tokens, vocab {settings['vocab_size']}, {settings['dtype']}, forward + backward"))


# ----------------------------------------------------------------------------------------------------------------
# MLA absorbed decode vs transformers DeepseekV3


def mla_decode(section: Section) -> None:
    from .mla_models import MODEL, Decoder, build_models, max_diff

    settings, device = section.settings, section.device
    dtype = dtype_of(settings["dtype"])
    hfext, deepseek = (model.to(device=device, dtype=dtype) for model in build_models(MODEL, seed=0))
    steps, batch = settings["decode_steps"], settings["batch"]
    section.notes.update(model=MODEL, dtype=settings["dtype"], batch=batch, decode_steps=steps,
                         candidate_mla_implementation=hfext.config.mla_implementation,
                         call=f"crop the prefilled cache back to the context, then {steps} greedy single-token steps")
    for context in settings["contexts"]:
        ids = torch.randint(MODEL["vocab_size"], (batch, context), generator=torch.Generator().manual_seed(context))

        def row(ids=ids.to(device), context=context):
            with torch.inference_mode():
                ours, theirs = Decoder(hfext, ids, steps), Decoder(deepseek, ids, steps)
                first = [decoder.run() for decoder in (ours, theirs)]  # untimed: same tokens?
                fields = _measure(section, ours, theirs, "mla_decode", repeats=settings["repeats"], warmup=0,
                                  context=context, candidate="HfExt MLA (from_deepseek, absorbed decode)",
                                  peer="transformers DeepseekV3ForCausalLM (sdpa)",
                                  what=f"{steps} decode steps from a {context}-token cache, batch {batch}")
            fields.update(greedy_tokens_equal=bool(torch.equal(first[0][0], first[1][0])),
                          max_abs_logit_diff=max_diff(first[0][1], first[1][1]))
            return fields
        section.guarded(f"mla_decode_{context}", row)


# ----------------------------------------------------------------------------------------------------------------
# LoRA-GA initialisation memory vs PEFT


def lora_ga_memory(section: Section) -> None:
    from ..lora_ga_init_memory import FULL as LORA_GA_SETTINGS, SIDES, TINY_MODEL
    from .finetuning_data import random_batches, tiny_llama
    from .parameter_sets import SMOLLM2_135M

    settings, device = section.settings, section.device
    model_config = TINY_MODEL if settings["model"] == "tiny" else {
        "vocab_size": SMOLLM2_135M["vocab_size"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "tie_word_embeddings": True}
    init_settings = dict(LORA_GA_SETTINGS, seed=0)
    reference = tiny_llama(model_config, seed=0).to(device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in random_batches(
        model_config["vocab_size"], settings["batches"], settings["batch_size"], settings["sequence_length"])]
    section.notes.update(model=model_config, dtype="float32", rank=init_settings["rank"],
                         target_modules=init_settings["target_modules"], batches=settings["batches"],
                         batch_size=settings["batch_size"], sequence_length=settings["sequence_length"],
                         call="the whole initialisation of a fresh copy of the model (copied outside the call)")
    if device.type == "cuda":  # first calls of both paths (cuBLAS/cuSOLVER handles, workspaces) outside the peaks
        tiny = tiny_llama(TINY_MODEL, seed=123).to(device)
        tiny_batches = [{k: v.to(device) for k, v in batch.items()} for batch in
                        random_batches(TINY_MODEL["vocab_size"], 1, 2, 16, seed=123)]
        for init in SIDES.values():
            init(copy.deepcopy(tiny), tiny_batches, init_settings)

    def row():
        seconds, peaks = {"candidate": [], "peer": []}, {"candidate": [], "peer": []}
        for repeat in range(settings["repeats"]):
            for side in (("candidate", "peer") if repeat % 2 == 0 else ("peer", "candidate")):
                call = partial(SIDES[side], copy.deepcopy(reference), batches, init_settings)
                elapsed, peak = timed_with_peak(call, device)
                seconds[side].append(elapsed)
                peaks[side].append(peak)
                del call
                free_memory()
        seconds = {side: statistics.median(values) for side, values in seconds.items()}
        memory = {side: None if None in values else int(statistics.median(values)) for side, values in peaks.items()}
        fields = ratio_fields({"candidate_seconds": seconds["candidate"], "peer_seconds": seconds["peer"],
                               "time_ratio": seconds["candidate"] / seconds["peer"], "rounds": settings["repeats"]},
                              memory["candidate"], memory["peer"], GOALS["lora_ga_memory"])
        return {**fields, "candidate": "hf_ext get_lora_ga_model", "peer": "PEFT preprocess_loraga + get_peft_model",
                "what": "extra peak memory of the LoRA-GA initialisation (time informational)",
                "size": f"{settings['batches']} x {settings['batch_size']} x {settings['sequence_length']} tokens",
                "candidate_peak_samples": peaks["candidate"], "peer_peak_samples": peaks["peer"]}
    section.guarded("lora_ga_memory", row)
