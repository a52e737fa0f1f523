"""SmolLM2-135M-shaped parameter sets with fixed gradients, and the optimizers a Lion step is timed against
(hf_ext's Lion kernels, torch's AdamW, lion_pytorch, bitsandbytes), with their state sizes and a bit-identity check."""

from collections.abc import Callable

import torch

from hf_ext.ops.native import kernels_disabled
from hf_ext.optim import Lion

# SmolLM2-135M (its config.json): hidden 576, 9 query / 3 key-value heads of 64, SwiGLU 1536, tied embeddings.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "kv_size": 192,
                "intermediate_size": 1536}
LION_HYPER = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
ADAMW_HYPER = {"lr": 3e-4, "betas": (0.9, 0.999), "weight_decay": 0.01}
CHECK_STEPS = 3


def parameter_shapes(model: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a Llama-style decoder with tied embeddings, in model order."""
    hidden, kv, inter = model["hidden_size"], model["kv_size"], model["intermediate_size"]
    shapes = [("embed_tokens", (model["vocab_size"], hidden))]
    for layer in range(model["num_hidden_layers"]):
        prefix = f"layers.{layer}."
        shapes += [(prefix + name, shape) for name, shape in (
            ("q_proj", (hidden, hidden)), ("k_proj", (kv, hidden)), ("v_proj", (kv, hidden)),
            ("o_proj", (hidden, hidden)), ("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)), ("input_layernorm", (hidden,)),
            ("post_attention_layernorm", (hidden,)))]
    shapes.append(("norm", (hidden,)))
    return shapes


def build_parameters(model: dict, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 parameters of ``parameter_shapes(model)`` with fixed random gradients (N(0, 1e-3²)) in ``.grad``."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in parameter_shapes(model):
        param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        param.grad = 1e-3 * torch.randn(shape, generator=generator)
        params.append(param)
    return params


def _lion_pytorch(params):
    from lion_pytorch import Lion as LionPytorch  # per-tensor class; no foreach argument

    return LionPytorch(params, **LION_HYPER)


def _lion_pytorch_foreach(params):
    from lion_pytorch.foreach import Lion as LionPytorchForeach

    return LionPytorchForeach(params, **LION_HYPER)


def _bitsandbytes(params):
    import bitsandbytes

    return bitsandbytes.optim.Lion(params, optim_bits=32, **LION_HYPER)


class _TorchCompileForm:
    """Lion(fused=True) with its C kernel off: the torch.compile form of the fused kernel (what CUDA runs)."""

    def __init__(self, params):
        self.optimizer = Lion(params, fused=True, **LION_HYPER)
        self.state = self.optimizer.state

    def step(self):
        with kernels_disabled():
            self.optimizer.step()


# name -> (factory, nominal tensors of traffic per step, what it is)
OPTIMIZERS: dict[str, tuple[Callable, int, str]] = {
    "lion_fused": (lambda params: Lion(params, fused=True, **LION_HYPER), 5, "hf_ext Lion(fused=True)"),
    "lion_default": (lambda params: Lion(params, **LION_HYPER), 5, "hf_ext Lion(params), default kernel choice"),
    "lion_torch_compile": (_TorchCompileForm, 5, "hf_ext Lion(fused=True), its torch.compile form (C kernel off)"),
    "lion_foreach": (lambda params: Lion(params, foreach=True, **LION_HYPER), 5, "hf_ext Lion(foreach=True)"),
    "adamw_fused": (lambda params: torch.optim.AdamW(params, fused=True, **ADAMW_HYPER), 7,
                    "torch.optim.AdamW(fused=True)"),
    "adamw_foreach": (lambda params: torch.optim.AdamW(params, foreach=True, **ADAMW_HYPER), 7,
                      "torch.optim.AdamW(foreach=True)"),
    "lion_pytorch": (_lion_pytorch, 5, "lion_pytorch.Lion (per tensor)"),
    "lion_pytorch_foreach": (_lion_pytorch_foreach, 5, "lion_pytorch.foreach.Lion (lerp)"),
    "bitsandbytes": (_bitsandbytes, 5, "bitsandbytes.optim.Lion(optim_bits=32)"),
}


def make_optimizer(name: str, params) -> torch.optim.Optimizer | None:
    """The optimizer ``name`` of `OPTIMIZERS` over ``params``; None if its package is not installed."""
    try:
        return OPTIMIZERS[name][0](params)
    except ImportError as error:
        print(f"{name}: not available ({error})")
        return None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer's per-parameter state (non-tensor entries such as int steps: 0)."""
    return sum(value.nbytes for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))


def momentum_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """The momentum tensor of ``param`` (``exp_avg``, or bitsandbytes' ``state1``)."""
    state = optimizer.state[param]
    return state.get("exp_avg", state.get("state1"))


def _clone_with_grads(params) -> list[torch.nn.Parameter]:
    clones = []
    for param in params:
        clone = torch.nn.Parameter(param.detach().clone())
        clone.grad = param.grad  # shared, read-only for every optimizer here
        clones.append(clone)
    return clones


def check_identical(model: dict, steps: int = CHECK_STEPS, seed: int = 1) -> dict:
    """Run `steps` steps of each Lion on parameters and gradients of ``model``'s shapes (`build_parameters`) from
    the same start and compare parameters and momenta with the fused kernel's: bit equality and largest difference.
    """
    params = build_parameters(model, seed)
    reference = None
    checks = {"steps": steps, "parameters": sum(p.numel() for p in params), "model": model,
              "hyper_parameters": dict(LION_HYPER, betas=list(LION_HYPER["betas"]))}
    for name in ("lion_fused", "lion_foreach", "lion_pytorch", "bitsandbytes", "lion_pytorch_foreach"):
        clones = _clone_with_grads(params)
        optimizer = make_optimizer(name, clones)
        if optimizer is None:
            checks[f"fused_vs_{name}"] = "not installed"
            continue
        for _ in range(steps):
            optimizer.step()
        momenta = [momentum_of(optimizer, p) for p in clones]
        if reference is None:
            reference = ([p.detach() for p in clones], momenta)
            continue
        checks[f"fused_vs_{name}"] = {
            "params_bit_identical": all(torch.equal(a, b) for a, b in zip(reference[0], clones)),
            "momenta_bit_identical": all(torch.equal(a, b) for a, b in zip(reference[1], momenta)),
            "max_abs_param_diff": max((a - b).abs().max().item() for a, b in zip(reference[0], clones)),
            "max_abs_momentum_diff": max((a - b).abs().max().item() for a, b in zip(reference[1], momenta)),
        }
        del optimizer, clones, momenta
    required = [checks.get(f"fused_vs_{name}") for name in ("lion_foreach", "lion_pytorch")]
    checks["passed"] = all(isinstance(c, dict) and c["params_bit_identical"] and c["momenta_bit_identical"]
                           for c in required)
    checks["passed_means"] = ("fused Lion bit-identical (params and momenta) to foreach Lion and lion_pytorch.Lion "
                              f"after {steps} steps")
    return checks
