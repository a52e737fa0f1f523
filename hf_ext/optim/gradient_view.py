"""LoRA done in the optimizer (the gradient view of LoRA, kexue.fm post 9590).

The model keeps ordinary full weights W. For each weight matrix the optimizer holds low-rank factors and feeds a base
optimizer (AdamW, SGD, Lion…) their gradients, which are projections of the full gradient G = ∂L/∂W; after the step
it writes the change of the low-rank term back into W. Modes (PyTorch convention: W [m, n], B [m, r], A [r, n],
s = scaling):

- ``"lora"``:     W = W0 + s·B A, A and B trained (B starts at 0): ∂L/∂B = s·G Aᵀ, ∂L/∂A = s·Bᵀ G — exactly the
                  gradients a PEFT LoRA layer receives, so the trajectory equals PEFT LoRA's (tested, SGD and Adam).
- ``"fixed_a"``:  W = W0 + s·B A with A frozen at its random init (LoRA-FA): only ∂L/∂B = s·G Aᵀ.
- ``"resample"``: W = W_k + s·(B v + u A) with fresh Gaussian u [m, r], v [r, n] (entries N(0, 1/r), so E[uuᵀ] = I,
                  E[vᵀv] = I) every ``resample_every`` steps; B, A restart at 0 and their optimizer state is reset.
                  Each step and the state are rank-r, the accumulated update is not; in expectation a step moves W
                  along the full gradient (Monte-Carlo test).

Optimizer state is O(r(m+n)) per matrix instead of O(mn); W still receives a full gradient (what PEFT LoRA saves in
activation memory, this does not). Where a model layer holds the factors of a matrix (gradient-view LoRA as a PEFT
method, whose adapter saves them), the optimizer trains those tensors and keeps the matrix (ΔW) exactly s·B A.
Parameters that are not matrices (biases, norms) go to the base optimizer as they are. Because it only reads
``p.grad``, gradient accumulation and DDP (which averages ``p.grad``) are exact.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch

from .._validation import check_choice, check_integer, check_number
from ._dtensor import is_dtensor
from ._step_checks import NONFINITE_GRADS_OPTIONS, check_group_numbers, grads_are_finite
from .model_held_factors import held_factors

GRADIENT_VIEW_MODES = ("lora", "fixed_a", "resample")


def _check_base_kwargs(base_optimizer: type, base_kwargs: dict) -> None:
    """Refuse keywords the base optimizer does not take (torch would keep them in its groups and ignore them), and a
    non-finite or negative ``lr`` / ``weight_decay``."""
    for key in ("lr", "weight_decay"):
        if key in base_kwargs:
            check_number(key, base_kwargs[key], low=0)
    parameters = inspect.signature(base_optimizer).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # it takes any keyword
    accepted = sorted(p.name for p in parameters
                      if p.name != "params" and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    unknown = sorted(set(base_kwargs) - set(accepted))
    if unknown:
        own = sorted(set(inspect.signature(GradientViewLoRA).parameters) - {"params", "base_kwargs"})
        raise ValueError(f"GradientViewLoRA: unknown keyword argument(s) {unknown} for base_optimizer "
                         f"{base_optimizer.__name__}, which accepts {accepted}; GradientViewLoRA's own are {own}")


class GradientViewLoRA(torch.optim.Optimizer):
    """Low-rank training of the weight matrices in ``params``, stepping ``base_optimizer`` on the factors.

    Args:
        params: parameters or parameter groups (as for any torch optimizer; group options such as ``lr`` and
            ``weight_decay`` go to the base optimizer and may be changed by schedulers). 2-D parameters are trained
            through rank-``rank`` factors; others directly.
        rank: r of the factors (1 <= r <= min(m, n) for every matrix).
        mode: ``"lora"``, ``"fixed_a"`` or ``"resample"`` (see the module docstring).
        scaling: s of the low-rank term (PEFT LoRA's lora_alpha / r): finite and > 0 (at 0 nothing would train;
            a negative s only flips the factors' sign).
        resample_every: steps between fresh projections (mode ``"resample"``); skipped steps do not count.
        base_optimizer: the optimizer class stepping the factors (default `torch.optim.AdamW`).
        seed: seeds the random factors, per matrix and resampling period — identical on every DDP rank.
        nonfinite_grads: as `Lion`'s: when a gradient holds NaN or inf, ``"raise"`` (default) raises
            FloatingPointError before the factors' gradients are set and anything changes; ``"skip"`` skips the
            whole step with a RuntimeWarning. One fused reduction and one host sync per step.
        **base_kwargs: defaults for the base optimizer (``lr``, ``betas``, ``weight_decay``, …): keywords its
            constructor does not take are refused; ``lr`` and ``weight_decay`` must be finite and >= 0 (checked
            again at each step, where a scheduler may have set them).

    Example::

        optimizer = GradientViewLoRA(model.parameters(), rank=8, mode="resample", resample_every=100, lr=1e-3)
        # or with Trainer:
        # Trainer(..., optimizer_cls_and_kwargs=hf_ext.optim.gradient_view_optimizer_cls_and_kwargs(args, rank=8))
    """

    def __init__(self, params: Iterable, *, rank: int, mode: str = "lora", scaling: float = 1.0,
                 resample_every: int = 200, base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 seed: int = 0, nonfinite_grads: str = "raise", **base_kwargs):
        check_choice("mode", mode, GRADIENT_VIEW_MODES)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        check_integer("resample_every", resample_every, low=1)
        check_number("scaling", scaling, low=0, low_open=True, why="the low-rank term is scaling·B A: at 0 nothing "
                     "trains")
        self.nonfinite_grads = check_choice("nonfinite_grads", nonfinite_grads, NONFINITE_GRADS_OPTIONS)
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}")
        _check_base_kwargs(base_optimizer, base_kwargs)
        super().__init__(params, dict(base_kwargs))
        check_group_numbers("GradientViewLoRA", self.param_groups)
        self.rank, self.mode, self.scaling = rank, mode, float(scaling)
        self.resample_every, self.seed = resample_every, seed
        self.steps = 0
        self._held = {}  # id of a matrix whose factors a model layer holds -> those factors; kept at s·B A exactly
        base_groups = []
        for group in self.param_groups:
            base_params = []
            for param in group["params"]:
                if param.dim() == 2:
                    self._init_factors(param)
                    base_params.extend(self._trainable_factors(param))
                else:
                    base_params.append(param)
            base_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": base_params})
        self.base = base_optimizer(base_groups)

    # -- factors -------------------------------------------------------------------------------------------------

    def _matrix_index(self, param: torch.Tensor) -> int:
        return next(i for i, p in enumerate(p for g in self.param_groups for p in g["params"]) if p is param)

    def _generator(self, param: torch.Tensor, period: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self._matrix_index(param) * 10_007 + period)

    def _init_factors(self, param: torch.Tensor) -> None:
        if is_dtensor(param):
            raise TypeError("GradientViewLoRA projects whole weight matrices; FSDP2/DTensor-sharded parameters are "
                            "not supported (use DDP, or gather the parameters)")
        m, n = param.shape
        if self.rank > min(m, n):
            raise ValueError(f"rank={self.rank} is larger than min(m, n)={min(m, n)} of a {m}×{n} parameter")
        state = self.state[param]
        if self._tie_to_held_factors(param):
            return
        like = dict(dtype=param.dtype, device=param.device)
        state["lora_B"] = torch.zeros(m, self.rank, **like)
        if self.mode == "resample":
            state["lora_A"] = torch.zeros(self.rank, n, **like)
            self._draw_projections(param, period=0)
        else:
            # PEFT's LoRA init for A: kaiming-uniform(a=√5) of a Linear(n → r), i.e. U(-1/√n, 1/√n)
            bound = 1.0 / math.sqrt(n)
            state["lora_A"] = (torch.rand(self.rank, n, generator=self._generator(param, 0)) * 2 - 1).mul_(bound).to(**like)

    def _tie_to_held_factors(self, param: torch.Tensor) -> bool:
        """Train the factors a model layer holds for ``param`` (gradient-view LoRA's PEFT layers, whose adapter
        saves them), if it holds any; they must have been made with this optimizer's settings."""
        held = held_factors(param)
        if held is None:
            return False
        mine, theirs = (self.mode, self.rank, self.scaling), (held.mode, held.rank, held.scaling)
        if mine != theirs:
            raise ValueError(
                f"GradientViewLoRA(mode={self.mode!r}, rank={self.rank}, scaling={self.scaling}) cannot train "
                f"{held.owner}, made with mode={held.mode!r}, r={held.rank}, scaling={held.scaling}: build the "
                "optimizer with hf_ext.peft.gradient_view_optimizer(peft_model), which reads the adapter's config")
        self.state[param]["lora_B"], self.state[param]["lora_A"] = held.lora_B, held.lora_A
        self._held[id(param)] = held
        return True

    def _draw_projections(self, param: torch.Tensor, period: int) -> None:
        m, n = param.shape
        generator, std = self._generator(param, period), 1.0 / math.sqrt(self.rank)
        like = dict(dtype=param.dtype, device=param.device)
        self.state[param]["proj_u"] = (torch.randn(m, self.rank, generator=generator) * std).to(**like)
        self.state[param]["proj_v"] = (torch.randn(self.rank, n, generator=generator) * std).to(**like)

    def _trainable_factors(self, param: torch.Tensor) -> list[torch.Tensor]:
        state = self.state[param]
        return [state["lora_B"]] if self.mode == "fixed_a" else [state["lora_B"], state["lora_A"]]

    def _low_rank_term(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if self.mode == "resample":
            return self.scaling * (state["lora_B"] @ state["proj_v"] + state["proj_u"] @ state["lora_A"])
        return self.scaling * (state["lora_B"] @ state["lora_A"])

    def _set_factor_grads(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        state, s = self.state[param], self.scaling
        if self.mode == "resample":
            state["lora_B"].grad = s * grad @ state["proj_v"].T
            state["lora_A"].grad = s * state["proj_u"].T @ grad
        else:
            state["lora_B"].grad = s * grad @ state["lora_A"].T
            if self.mode == "lora":
                state["lora_A"].grad = s * state["lora_B"].T @ grad

    # -- the step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_group_numbers("GradientViewLoRA", self.param_groups)
        matrices = [p for g in self.param_groups for p in g["params"] if p.dim() == 2 and p.grad is not None]
        for param in matrices:
            if param.grad.is_sparse:
                raise RuntimeError("GradientViewLoRA does not support sparse gradients")
        # every gradient (matrices and the parameters the base optimizer steps as they are), before any is projected
        if not grads_are_finite("GradientViewLoRA", self, self.nonfinite_grads):
            return loss
        before = {}
        for param in matrices:
            self._set_factor_grads(param, param.grad)
            if id(param) not in self._held:
                before[param] = self._low_rank_term(param)
        for group, base_group in zip(self.param_groups, self.base.param_groups):
            base_group.update({k: v for k, v in group.items() if k != "params"})  # schedulers change the outer lr
        self.base.step()
        for param in matrices:
            if id(param) in self._held:
                param.copy_(self._low_rank_term(param))  # ΔW = s·B A exactly, as the adapter file will say
            else:
                param.add_(self._low_rank_term(param) - before[param])  # W = W0 + (the low-rank term)
            for factor in self._trainable_factors(param):
                factor.grad = None
        self.steps += 1
        if self.mode == "resample" and self.steps % self.resample_every == 0:
            self._resample()
        return loss

    def _resample(self) -> None:
        """Fresh projections; the factors restart at zero (their change is already in W) with a fresh state."""
        period = self.steps // self.resample_every
        for param in [p for g in self.param_groups for p in g["params"] if p.dim() == 2]:
            state = self.state[param]
            state["lora_B"].zero_()
            state["lora_A"].zero_()
            self._draw_projections(param, period)
            for factor in self._trainable_factors(param):
                self.base.state.pop(factor, None)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"gradient_view": super().state_dict(), "base": self.base.state_dict(), "steps": self.steps,
                "rank": self.rank, "mode": self.mode}

    def load_state_dict(self, state_dict: dict) -> None:
        if not {"gradient_view", "base", "steps"} <= set(state_dict) <= {"gradient_view", "base", "steps", "rank",
                                                                          "mode"}:
            raise ValueError("GradientViewLoRA.load_state_dict: expected a state dict saved by GradientViewLoRA")
        # The factors' shapes and meaning depend on rank and mode: loading another's would keep this optimizer's rank
        # with the other's factors. A state saved before rank and mode were recorded gives its rank by its factors.
        factors = (s["lora_B"] for s in state_dict["gradient_view"]["state"].values() if "lora_B" in s)
        saved_rank = state_dict.get("rank", next((b.shape[1] for b in factors), self.rank))
        saved_mode = state_dict.get("mode", self.mode)
        if (saved_rank, saved_mode) != (self.rank, self.mode):
            raise ValueError(f"GradientViewLoRA.load_state_dict: the state was saved with rank={saved_rank}, "
                             f"mode={saved_mode!r} but this optimizer has rank={self.rank}, mode={self.mode!r}; "
                             "build the optimizer with the saved rank and mode")
        super().load_state_dict(state_dict["gradient_view"])
        for param in (p for group in self.param_groups for p in group["params"] if id(p) in self._held):
            # the loaded factors are copies: put their values into the tensors the model holds (and saves)
            held = self._held[id(param)]
            held.lora_B.copy_(self.state[param]["lora_B"])
            held.lora_A.copy_(self.state[param]["lora_A"])
            self.state[param]["lora_B"], self.state[param]["lora_A"] = held.lora_B, held.lora_A
        # the base optimizer's parameters are the factor tensors: point it at the reloaded ones, in the same order
        for group, base_group in zip(self.param_groups, self.base.param_groups):
            base_group["params"] = [t for p in group["params"]
                                    for t in (self._trainable_factors(p) if p.dim() == 2 else [p])]
        self.base.load_state_dict(state_dict["base"])
        self.steps = state_dict["steps"]
