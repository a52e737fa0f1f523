"""Part A of `benchmarks.device_check`: each device path of hf_ext against a float64 reference on the CPU.

Every check builds its inputs on the CPU, runs hf_ext on the device in each dtype, and compares with the same
computation in float64 on the CPU (for low-precision rows: from the same low-precision weights, so the error is the
computation's, not the weights' rounding). Errors are max |x − ref| / max |ref| for logits and losses, and
‖x − ref‖ / ‖ref‖ over all tensors for gradients; `TOLERANCES` states the limit per quantity and dtype.
"""

import copy
import importlib.util
import math

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .device_common import Section, dtype_of, max_relative_error, norm_relative_error, parity_row

# (quantity, dtype) -> the largest error that passes. Logits of a 2-layer model with O(1) weights; bf16 keeps 8 bits
# of mantissa (relative rounding 2^-9 = 2e-3 per operation), so its limits are a few percent (on the CPU the bf16
# errors were 1.6-3.2e-2; the limits leave room for another device's rounding order).
TOLERANCES = {
    ("logits", "float32"): 1e-4, ("logits", "bfloat16"): 6e-2,
    ("gradients", "float32"): 1e-4, ("gradients", "bfloat16"): 6e-2,
    ("loss", "float32"): 1e-5, ("loss", "bfloat16"): 1e-2,
    ("absorbed_vs_expanded", "float32"): 1e-4, ("absorbed_vs_expanded", "bfloat16"): 6e-2,
}
# UDM/ReFlow against diffusers, max |ours − diffusers| of the final samples (the limits the README states).
SCHEDULER_TOLERANCES = {"udm_vs_ddpm": 2e-4, "udm_vs_ddim_eta0": 2e-5, "udm_vs_ddim_eta0.5": 2e-5,
                        "reflow_euler_vs_flow_match_euler": 1e-5}

REROPE_MODEL = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                "tie_word_embeddings": False}


def _spread_weights(model: torch.nn.Module, attention_std: float) -> None:
    """O(1) activations and logits instead of the 0.02-std default (which makes attention uniform and every error
    tiny): embeddings N(0, 1), linear layers N(0, 1/fan_in), query/key projections wider still."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() != 2:
                continue
            std = 1.0 if "embed" in name else parameter.shape[1] ** -0.5
            if any(part in name for part in ("q_proj", "k_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")):
                std = attention_std
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _to_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights (as the device model holds them) in float64 on the CPU."""
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64)


def _decode_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens into a cache, then one forward per remaining token; logits of those tokens."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
    steps = [model(input_ids=ids[:, t: t + 1], past_key_values=cache, use_cache=True).logits
             for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1)


def _rerope_kernels(device: torch.device, length: int) -> dict | None:
    """Which ReRoPE kernel hf_ext picks for a prefill and a decode step here, where the library says so."""
    try:
        from hf_ext.models.hfext import rerope_hfext

        chooser = getattr(rerope_hfext, "rerope_kernel_for", None)
        return None if chooser is None else {"prefill": str(chooser(device, length)), "decode": str(chooser(device, 1))}
    except Exception as error:  # noqa: BLE001 - only a note
        return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------------
# ReRoPE and Leaky ReRoPE


def rerope_llama(settings: dict, implementation: str) -> LlamaForCausalLM:
    """A random fp32 Llama behind ``implementation``, its window and log-n set through `hf_ext.rerope_config`."""
    import hf_ext

    config = LlamaConfig(**REROPE_MODEL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = hf_ext.rerope_config(config, rerope_window=settings["window"], logn_scaling=True,
                                  logn_training_length=settings["logn_training_length"])
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=implementation)
    _spread_weights(model, attention_std=0.15)
    return model.eval()


def rerope(section: Section) -> None:
    settings, device = section.settings, section.device
    length, prompt = settings["length"], settings["prompt"]
    ids = torch.randint(REROPE_MODEL["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1))
    section.notes.update(model=REROPE_MODEL, length=length, decode_prompt=prompt, window=settings["window"],
                         logn_training_length=settings["logn_training_length"], batch=2,
                         kernels=_rerope_kernels(device, length))
    for implementation in ("hfx_rerope", "hfx_leaky_rerope"):
        base = rerope_llama(settings, implementation)
        # Not a tolerance: shows that the window changes the result, i.e. that the ReRoPE path ran.
        exact = _to_reference(base)
        sdpa = _to_reference(base)
        sdpa.set_attn_implementation("sdpa")
        with torch.no_grad():
            section.notes[f"{implementation}_vs_sdpa_float64"] = max_relative_error(exact(ids).logits,
                                                                                    sdpa(ids).logits)
        del exact, sdpa
        for dtype_name in settings["dtypes"]:
            dtype = dtype_of(dtype_name)
            model = copy.deepcopy(base).to(device=device, dtype=dtype)
            reference = _to_reference(model)
            with torch.no_grad():
                expected = reference(ids).logits
                device_ids = ids.to(device)
                section.guarded(f"{implementation} prefill {dtype_name}", lambda: parity_row(
                    f"{implementation} prefill logits ({length} tokens)", dtype,
                    max_relative_error(model(device_ids).logits, expected), TOLERANCES["logits", dtype_name]))
                section.guarded(f"{implementation} decode {dtype_name}", lambda: parity_row(
                    f"{implementation} decode logits ({length - prompt} steps after {prompt})", dtype,
                    max_relative_error(_decode_logits(model, device_ids, prompt), expected[:, prompt:]),
                    TOLERANCES["logits", dtype_name]))
            if implementation == "hfx_rerope":
                section.guarded(f"{implementation} backward {dtype_name}",
                                lambda: _rerope_backward(model, reference, ids, dtype_name))
    # Flex attention that failed (a compile error) falls back to the blockwise kernel with a warning: the parity
    # rows then check that kernel instead, and this note says so.
    from hf_ext.models.hfext import rerope_hfext

    section.notes["flex_failure"] = getattr(rerope_hfext, "flex_failure", None)


def _rerope_backward(model, reference, ids: torch.Tensor, dtype_name: str) -> dict:
    """Training mode: loss and every parameter's gradient on the device against float64 on the CPU."""
    grads = []
    for net, inputs in ((model, ids.to(next(model.parameters()).device)), (reference, ids)):
        net.train()
        net.zero_grad()
        loss = net(input_ids=inputs, labels=inputs).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in net.parameters()]))
        net.eval()
    (loss, ours), (reference_loss, theirs) = grads
    worst = max(((norm_relative_error([a], [b]), name) for (name, _), a, b in
                 zip(model.named_parameters(), ours, theirs)), key=lambda pair: pair[0])
    return parity_row("hfx_rerope training backward: gradients of all parameters", dtype_name,
                      norm_relative_error(ours, theirs), TOLERANCES["gradients", dtype_name],
                      loss_error=max_relative_error(loss, reference_loss),
                      worst_parameter={"name": worst[1], "error": worst[0]})


# ----------------------------------------------------------------------------------------------------------------
# MLA: absorbed vs expanded decoding


MLA_MODEL = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "attention_types": ["mla", "mla"], "kv_lora_rank": 32, "q_lora_rank": 48,
             "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "head_dim": 16, "v_head_dim": 24,
             "max_position_embeddings": 128}


def mla(section: Section) -> None:
    import hf_ext

    from .mla_models import AbsorbedCallCounter

    settings, device = section.settings, section.device
    length, prompt = settings["length"], settings["prompt"]
    torch.manual_seed(0)
    base = hf_ext.HfExtForCausalLM(hf_ext.HfExtConfig(**MLA_MODEL)).eval()
    _spread_weights(base, attention_std=0.3)
    ids = torch.randint(MLA_MODEL["vocab_size"], (2, length), generator=torch.Generator().manual_seed(2))
    section.notes.update(model=MLA_MODEL, length=length, decode_prompt=prompt, batch=2,
                         reference="float64 CPU, mla_implementation='expanded', one forward over all tokens")
    for dtype_name in settings["dtypes"]:
        dtype = dtype_of(dtype_name)
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
        reference = _to_reference(model)
        reference.config.mla_implementation = "expanded"
        decoded, calls = {}, {}
        with torch.no_grad():
            expected = reference(ids).logits[:, prompt:]
            for form in ("absorbed", "expanded"):
                model.config.mla_implementation = form
                with AbsorbedCallCounter() as counter:
                    decoded[form] = _decode_logits(model, ids.to(device), prompt)
                calls[form] = counter.calls
        tolerance = TOLERANCES["logits", dtype_name]
        for form in ("absorbed", "expanded"):
            section.add(parity_row(f"MLA {form} decode logits vs float64", dtype,
                                   max_relative_error(decoded[form], expected), tolerance,
                                   absorbed_kernel_calls=calls[form], name=f"mla {form} decode {dtype_name}"))
        section.add(parity_row("MLA absorbed vs expanded decode logits (same device and dtype)", dtype,
                               max_relative_error(decoded["absorbed"], decoded["expanded"]),
                               TOLERANCES["absorbed_vs_expanded", dtype_name],
                               name=f"mla absorbed vs expanded {dtype_name}"))
        del model, reference


# ----------------------------------------------------------------------------------------------------------------
# Fused tail-capped (TaiLr) loss


def tailr(section: Section) -> None:
    from hf_ext.ops.tail_capped import fused_linear_tail_capped_loss, tail_capped_token_losses

    settings, device = section.settings, section.device
    tokens, vocab, hidden_size, gamma = settings["tokens"], settings["vocab_size"], settings["hidden_size"], 0.1
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = 3 * torch.randn(vocab, hidden_size, generator=generator) / math.sqrt(hidden_size)  # peaked softmax
    targets = torch.randint(vocab, (tokens,), generator=generator)
    targets[::7] = -100
    divisor = float((targets != -100).sum())
    section.notes.update(tokens=tokens, vocab_size=vocab, hidden_size=hidden_size, gamma=gamma,
                         chunk_size=settings["chunk_size"], ignored_targets=int((targets == -100).sum()))
    for dtype_name in settings["dtypes"]:
        dtype = dtype_of(dtype_name)

        def check():
            inputs = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (hidden, weight)]
            loss = fused_linear_tail_capped_loss(*inputs, targets.to(device), gamma=gamma,
                                                 chunk_size=settings["chunk_size"], divisor=divisor)
            loss.backward()
            exact = [t.detach().to(dtype).cpu().double().requires_grad_() for t in (hidden, weight)]
            losses, _ = tail_capped_token_losses(exact[0] @ exact[1].T, targets, gamma)
            reference = losses.sum() / divisor
            reference.backward()
            row = parity_row("fused TaiLr loss (error: gradients of hidden and lm_head weight; passes only if the "
                             "loss is within loss_tolerance too)", dtype,
                             norm_relative_error([t.grad for t in inputs], [t.grad for t in exact]),
                             TOLERANCES["gradients", dtype_name], loss_error=max_relative_error(loss, reference),
                             loss_tolerance=TOLERANCES["loss", dtype_name])
            row["passed"] = row["passed"] and row["loss_error"] <= row["loss_tolerance"]
            return row

        section.guarded(f"tailr fused {dtype_name}", check)


# ----------------------------------------------------------------------------------------------------------------
# Lion: fused kernel bit for bit against lion_pytorch's formula


def _formula_lion_step(params, momenta, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Lion's update as lion_pytorch writes it, in eager torch ops (used when lion_pytorch is not installed)."""
    beta1, beta2 = betas
    for param, momentum in zip(params, momenta):
        param.data.mul_(1 - lr * weight_decay)
        direction = momentum.clone().mul_(beta1).add(param.grad, alpha=1 - beta1).sign_()
        param.data.add_(direction, alpha=-lr)
        momentum.mul_(beta2).add_(param.grad, alpha=1 - beta2)


def lion(section: Section) -> None:
    from hf_ext.ops.lion import lion_reference_float64

    from .parameter_sets import LION_HYPER, build_parameters, make_optimizer, momentum_of

    settings, device = section.settings, section.device
    source = build_parameters(settings["model"], seed=1)
    steps = settings["steps"]
    have_lion_pytorch = importlib.util.find_spec("lion_pytorch") is not None
    section.notes.update(parameters=sum(p.numel() for p in source), tensors=len(source), steps=steps,
                         dtype="float32", hyper_parameters=dict(LION_HYPER, betas=list(LION_HYPER["betas"])),
                         reference="lion_pytorch.Lion" if have_lion_pytorch else
                         "lion_pytorch not importable: a hand-written eager Lion step in lion_pytorch's op order")

    def fresh():
        params = []
        for p in source:
            clone = torch.nn.Parameter(p.detach().to(device, copy=True))
            clone.grad = p.grad.to(device)
            params.append(clone)
        return params

    def run(name: str):
        params = fresh()
        if name == "formula":
            momenta = [torch.zeros_like(p) for p in params]
            for _ in range(steps):
                _formula_lion_step(params, momenta, **LION_HYPER)
            return params, momenta
        optimizer = make_optimizer(name, params)
        for _ in range(steps):
            optimizer.step()
        return params, [momentum_of(optimizer, p) for p in params]

    fused = run("lion_fused")
    peers = ["lion_pytorch" if have_lion_pytorch else "formula", "lion_foreach"]
    for peer in peers:
        def compare(peer=peer):
            params, momenta = run(peer)
            identical = (all(torch.equal(a, b) for a, b in zip(fused[0], params))
                         and all(torch.equal(a, b) for a, b in zip(fused[1], momenta)))
            difference = max((a - b).abs().max().item() for a, b in zip(fused[0] + fused[1], params + momenta))
            return {"check": f"Lion(fused=True) vs {peer}: parameters and momenta after {steps} steps, bit for bit",
                    "dtype": "float32", "bit_identical": identical, "max_abs_difference": difference,
                    "error_value": difference, "tolerance": 0.0, "passed": identical}
        section.guarded(f"lion fused vs {peer}", compare)

    def against_float64():  # informational: a sign that flips near 0 moves a weight by 2·lr
        params, momenta = [p.detach().cpu().double() for p in source], [torch.zeros_like(p).double() for p in source]
        for _ in range(steps):
            stepped = [lion_reference_float64(p, s.grad, m, LION_HYPER["lr"], *LION_HYPER["betas"],
                                              LION_HYPER["weight_decay"]) for p, s, m in zip(params, source, momenta)]
            params, momenta = [pair[0] for pair in stepped], [pair[1] for pair in stepped]
        return {"check": "Lion(fused=True) vs the float64 formula (informational)", "dtype": "float32",
                "max_abs_param_difference": max((a.cpu().double() - b).abs().max().item()
                                                for a, b in zip(fused[0], params)),
                "max_abs_momentum_difference": max((a.cpu().double() - b).abs().max().item()
                                                   for a, b in zip(fused[1], momenta))}
    section.guarded("lion fused vs float64", against_float64)


# ----------------------------------------------------------------------------------------------------------------
# Schedulers: UDM vs DDPM/DDIM, ReFlow vs FlowMatchEuler


def schedulers(section: Section) -> None:
    if importlib.util.find_spec("diffusers") is None:
        raise ModuleNotFoundError("diffusers not installed")
    from ..scheduler_step_overhead import PAIRS
    from .scheduler_loops import SamplingRun, make_inputs

    settings, device = section.settings, section.device
    initial, output = (t.to(device) for t in make_inputs(settings["shape"]))
    section.notes.update(shape=settings["shape"], steps=settings["steps"],
                         error="max |ours − diffusers| of the final sample (absolute)")
    for pair, tolerance in SCHEDULER_TOLERANCES.items():
        spec = PAIRS[pair]

        def check(spec=spec, pair=pair, tolerance=tolerance):
            ours, theirs = spec["make"]()
            samples = [SamplingRun(scheduler, output, initial, settings["steps"], loop=spec["loop"],
                                   step_kwargs=spec["step_kwargs"])() for scheduler in (ours, theirs)]
            return parity_row(f"{spec['candidate']} vs {spec['peer']}, {settings['steps']} steps",
                              samples[0].dtype, (samples[0] - samples[1]).abs().max().item(), tolerance)
        section.guarded(pair, check)
