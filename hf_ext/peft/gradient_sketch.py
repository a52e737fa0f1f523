"""Top singular vectors of many layers' mean weight gradients without ever forming a gradient.

For a linear layer the gradient of one batch is G_b = δᵀ X (X: the layer's inputs, δ: the gradients of its outputs,
tokens on rows), so G M = δᵀ (X M) and Gᵀ M = Xᵀ (δ M) for a thin M come straight from a forward hook and a tensor
hook on the output. `torch.svd_lowrank`'s randomized range finder only ever needs such thin products, so it runs
here as passes over the same batches: one pass per multiplication, all layers at once, each layer holding only
[dim, q] matrices. The result equals `torch.svd_lowrank(G, q, niter)` of the explicit mean gradient (same random
test matrix, up to float rounding; tested), the computation PEFT's built-in and the paper's code do on a resident G.
A two-sided sketch (`_LayerSinglePassSketch`) needs only products with fixed test matrices, G·Ω and Ψ·G, so it takes
one pass; it trades a wider sketch for the passes of the power iterations.
Quantized (bitsandbytes) layers work the same way: their weights never need a gradient.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm


def gradient_passes(power_iterations: int | None) -> int:
    """Forward/backward passes over the batches: one for the one-pass sketch (None), 2 + 2·niter for the range
    finder (T·R, then Tᵀ·Q and T·Q per power iteration, then Tᵀ·Q for the final small SVD)."""
    return 1 if power_iterations is None else 2 + 2 * power_iterations


def _gaussian(rows: int, cols: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A Gaussian test matrix drawn on the CPU (the same numbers on any device, those of svd_lowrank's CPU draw) in
    ``like``'s dtype, then moved to its device."""
    return torch.randn(rows, cols, generator=generator, dtype=like.dtype).to(like.device)


def _mean_over_batches_and_ranks(total: torch.Tensor | None, num_batches: int) -> torch.Tensor:
    """A pass's sum over batches as the mean over batches and, under torch.distributed, over ranks."""
    if total is None:
        raise RuntimeError("a LoRA-GA target layer received no gradient: it is not on the path from the "
                           "inputs to the loss (check target_modules and the loss function)")
    mean = total / num_batches
    if _is_distributed():
        torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.SUM)
        mean /= torch.distributed.get_world_size()
    return mean


def _factors(basis: torch.Tensor, small: torch.Tensor, transposed: bool):
    """(U, S, V) of G from T ≈ basis·small (T = G, or Gᵀ when ``transposed``): the SVD of the small factor."""
    u_small, singular_values, vh = torch.linalg.svd(small, full_matrices=False)
    left, right = basis @ u_small, vh.T
    return (right, singular_values, left) if transposed else (left, singular_values, right)


class _LayerRangeFinder:
    """The state of `torch.svd_lowrank`'s algorithm for one layer's gradient G [out, in].

    svd_lowrank works on the tall orientation T (G, or Gᵀ when out < in): Q = orth(T R); `niter` times
    Q = orth(T·orth(Tᵀ Q)); then the small SVD of Qᵀ T. Each step here is one product with G or Gᵀ.
    """

    def __init__(self, out_features: int, in_features: int, q: int, seed: int):
        self.transposed = out_features < in_features
        self.tall_cols = out_features if self.transposed else in_features
        self.q, self.seed = q, seed
        self.probe: torch.Tensor | None = None  # R of svd_lowrank, drawn in the dtype of the first batch
        self.probe_side = "tall"  # the next product is T·probe ("tall") or Tᵀ·probe ("wide")
        self.product: torch.Tensor | None = None

    @property
    def multiplies_gradient(self) -> bool:
        """True when this pass computes G·probe (else Gᵀ·probe)."""
        return (self.probe_side == "tall") != self.transposed

    def accumulate(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        """Add one batch's G_b·probe = δᵀ(X·probe) (or G_bᵀ·probe = Xᵀ(δ·probe)); inputs [T, in], grads [T, out]."""
        if self.probe is None:
            self.probe = _gaussian(self.tall_cols, self.q, torch.Generator().manual_seed(self.seed), inputs)
        if self.multiplies_gradient:
            product = output_grads.T @ (inputs @ self.probe)
        else:
            product = inputs.T @ (output_grads @ self.probe)
        self.product = product if self.product is None else self.product.add_(product)

    def finish_pass(self, num_batches: int, final: bool, name: str = "", first: bool = False) -> None:
        """Average the pass's product over batches (and ranks), then orthonormalise it into the next probe."""
        product = _mean_over_batches_and_ranks(self.product, num_batches)
        self.product = None
        if first:  # G·R with a Gaussian R: non-finite iff G is, zero iff G is (almost surely)
            _check_gradient_product(product, name)
        if final:
            self.final_product = product  # Tᵀ Q, i.e. (Qᵀ T)ᵀ
        else:
            self.probe = torch.linalg.qr(product).Q
            self.probe_side = "wide" if self.probe_side == "tall" else "tall"

    def singular_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [out, q], S [q], V [in, q]) with G ≈ U diag(S) Vᵀ, as `torch.svd_lowrank` returns them."""
        return _factors(self.probe, self.final_product.T, self.transposed)  # final_product.T = Qᵀ T [q, tall_cols]


class _LayerSinglePassSketch:
    """A one-pass two-sided sketch of one layer's gradient (Tropp, Yurtsever, Udell & Cevher 2017, "Practical
    sketching algorithms for low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 38(4), §4).

    In the tall orientation T [long, short] (G, or Gᵀ when out < in), with Gaussian test matrices Ω [short, k] and
    Ψ [l, long], l = min(2k + 1, long): the range sketch Y = T·Ω [long, k] and the co-range sketch W = Ψ·T [l, short]
    are both linear in T, so one pass over the batches accumulates both. Then Q = orth(Y), X = argmin ‖(Ψ·Q)·X − W‖
    [k, short], T ≈ Q·X, and the SVD of the small X gives T's. Without power iterations to sharpen it, its accuracy
    comes from width alone, so k is many times the 2r vectors that LoRA-GA keeps (see get_lora_ga_model).
    The co-range sketch sits on the short side, so the memory is k·long + l·short per layer (Ψ and Ω are shared by
    the layers of one shape: a layer's guarantee needs its own matrices to be random, not different from others').
    """

    def __init__(self, out_features: int, in_features: int, k: int, seed: int, test_matrices: dict):
        self.transposed = out_features < in_features
        self.long, self.short, self.k, self.l = self.shape(out_features, in_features, k)
        self.seed, self.test_matrices = seed, test_matrices
        self.range_sketch: torch.Tensor | None = None  # Y = T·Ω
        self.corange_sketch: torch.Tensor | None = None  # W = Ψ·T

    @staticmethod
    def shape(out_features: int, in_features: int, k: int) -> tuple[int, int, int, int]:
        """(long, short, k, l): the tall orientation's sides and the two sketch widths."""
        long, short = max(out_features, in_features), min(out_features, in_features)
        k = min(k, short)
        return long, short, k, min(2 * k + 1, long)

    @classmethod
    def numel(cls, out_features: int, in_features: int, k: int) -> int:
        """How many numbers the sketch holds for a layer: k·long + l·short."""
        long, short, k, l = cls.shape(out_features, in_features, k)
        return k * long + l * short

    def _test_matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.long, self.short, self.k, like.dtype, like.device)
        if key not in self.test_matrices:
            generator = torch.Generator().manual_seed(self.seed)
            omega = _gaussian(self.short, self.k, generator, like)  # Ω first, then Ψ from the same generator
            self.test_matrices[key] = (omega, _gaussian(self.l, self.long, generator, like))
        return self.test_matrices[key]

    def accumulate(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        """Add one batch's T_b·Ω and Ψ·T_b, with T_b = longᵀ·short (G_b = δᵀX); inputs [T, in], grads [T, out]."""
        long_side, short_side = (inputs, output_grads) if self.transposed else (output_grads, inputs)
        omega, psi = self._test_matrices(inputs)
        range_part = long_side.T @ (short_side @ omega)
        corange_part = (long_side @ psi.T).T @ short_side
        if self.range_sketch is None:
            self.range_sketch, self.corange_sketch = range_part, corange_part
        else:
            self.range_sketch.add_(range_part)
            self.corange_sketch.add_(corange_part)

    def finish_pass(self, num_batches: int, final: bool, name: str = "", first: bool = False) -> None:
        """Average both sketches over batches (and ranks); there is only this one pass."""
        self.range_sketch = _mean_over_batches_and_ranks(self.range_sketch, num_batches)
        self.corange_sketch = _mean_over_batches_and_ranks(self.corange_sketch, num_batches)
        _check_gradient_product(self.range_sketch, name)

    def singular_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [out, k], S [k], V [in, k]) with G ≈ U diag(S) Vᵀ; the small algebra runs in float64."""
        dtype = self.range_sketch.dtype
        _, psi = self._test_matrices(self.range_sketch)
        basis = torch.linalg.qr(self.range_sketch.double()).Q  # [long, k]
        core = torch.linalg.lstsq(psi.double() @ basis, self.corange_sketch.double()).solution  # [k, short]
        return tuple(t.to(dtype) for t in _factors(basis, core, self.transposed))


class _LayerGradient:
    """The mean gradient G itself, accumulated in the same single pass as δᵀX, for a layer whose sketch would hold no
    fewer numbers than G (narrow layers, or a large rank): less memory and less arithmetic than the sketch there.
    Its top singular vectors come from `torch.svd_lowrank`'s algorithm on the resident G (q columns and the 4 power
    iterations PEFT's built-in uses), with the test matrix drawn from ``seed``, not from torch's global RNG.
    """

    POWER_ITERATIONS = 4

    def __init__(self, q: int, seed: int):
        self.q, self.seed = q, seed
        self.gradient: torch.Tensor | None = None

    def accumulate(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        """Add one batch's G_b = δᵀX; inputs [T, in], grads [T, out]."""
        part = output_grads.T @ inputs
        self.gradient = part if self.gradient is None else self.gradient.add_(part)

    def finish_pass(self, num_batches: int, final: bool, name: str = "", first: bool = False) -> None:
        self.gradient = _mean_over_batches_and_ranks(self.gradient, num_batches)
        _check_gradient_product(self.gradient, name)

    def singular_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [out, q], S [q], V [in, q]) of G, as `torch.svd_lowrank(G, q, niter=4)` computes them."""
        transposed = self.gradient.shape[0] < self.gradient.shape[1]
        tall = self.gradient.T if transposed else self.gradient
        probe = _gaussian(tall.shape[1], self.q, torch.Generator().manual_seed(self.seed), tall)
        basis = torch.linalg.qr(tall @ probe).Q
        for _ in range(self.POWER_ITERATIONS):
            basis = torch.linalg.qr(tall @ torch.linalg.qr(tall.T @ basis).Q).Q
        return _factors(basis, basis.T @ tall, transposed)


def _check_gradient_product(product: torch.Tensor, name: str) -> None:
    """Refuse a gradient that would give arbitrary singular vectors: QR of zeros or NaN is no subspace."""
    if not torch.isfinite(product).all():
        raise ValueError(f"the mean gradient of LoRA-GA target {name!r} is not finite (NaN or inf): check the "
                         "gradient batches for NaN/inf inputs and the loss for overflow (e.g. float16)")
    if not product.any():
        raise ValueError(f"the mean gradient of LoRA-GA target {name!r} is zero, so it has no singular vectors "
                         "to start from: most likely every label of the gradient batches is the ignore index "
                         "(-100), e.g. prompts masked out entirely; give batches with target tokens")


def _check_loss(loss: torch.Tensor, index: int) -> None:
    if not torch.isfinite(loss):
        raise ValueError(f"the loss of LoRA-GA gradient batch {index} is {loss.item()}: most likely every label of "
                         "the batch is the ignore index (-100), so the mean cross-entropy is 0/0, or the batch holds "
                         "NaN/inf; give batches with target tokens")


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _capture_products(layers: Mapping[str, nn.Module], finders: Mapping):
    """Forward hooks that hand each layer's (inputs, output gradients) of every call to its finder (range finder,
    one-pass sketch or resident gradient: each has ``accumulate(inputs, output_grads)``)."""

    def make_hook(finder):
        def hook(module, args, output):
            if not torch.is_grad_enabled():  # the no-grad first run of a recomputed block: its recompute counts
                return None
            inputs = args[0].detach()
            if not output.requires_grad:
                # The first targets see inputs that need no gradient (everything is frozen): start the graph here,
                # on a fresh leaf (quantized layers may return views, whose in-place requires_grad_ misbehaves).
                output = output.detach().requires_grad_()

            def on_output_grad(grad):
                dtype = torch.promote_types(grad.dtype, torch.float32)  # fp32 products for bf16/fp16 models
                finder.accumulate(inputs.reshape(-1, inputs.shape[-1]).to(dtype),
                                  grad.reshape(-1, grad.shape[-1]).to(dtype))

            output.register_hook(on_output_grad)
            return output

        return hook

    handles = [layer.register_forward_hook(make_hook(finders[name])) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder layers): modules of the classes transformers lists in
    `_no_split_modules`; none for models that list none."""
    classes = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in classes]


@contextmanager
def _recomputed_blocks(model: nn.Module):
    """Run every repeated block under reentrant activation checkpointing, with the KV cache off.

    A block's first run keeps nothing (no grad); backward re-runs it just before going through it, and only then do
    the capture hooks see its layers' inputs. So the activations, and the inputs the products need, are held for one
    block at a time instead of for the whole model: the price is one more forward per pass. The reentrant variant is
    the one whose re-run builds a graph that backward then walks, so the output-gradient hooks registered during the
    re-run fire. The cache must be off: a re-run would append the block's keys to it a second time.
    """
    blocks = _repeated_blocks(model)
    configs = [config for config in {id(m.config): m.config for m in model.modules()
                                      if hasattr(getattr(m, "config", None), "use_cache")}.values()]
    saved_use_cache = [config.use_cache for config in configs]
    for config in configs:
        config.use_cache = False
    # accelerate's device-map hooks may already have set an instance `forward`: it is wrapped and put back after.
    instance_forwards = [vars(block).get("forward") for block in blocks]
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block, instance_forward in zip(blocks, instance_forwards):
            if instance_forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = instance_forward
        for config, use_cache in zip(configs, saved_use_cache):
            config.use_cache = use_cache


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            hidden_states = kwargs.pop("hidden_states")
        # Reentrant checkpointing passes gradients only through inputs that need them: in a frozen model the block's
        # input does not, so it becomes a fresh leaf that does (its own gradient is discarded with it).
        if not hidden_states.requires_grad:
            hidden_states = hidden_states.detach().requires_grad_()
        return checkpoint(functools.partial(forward, **kwargs), hidden_states, *args, use_reentrant=True)

    return run


def gradient_singular_vectors(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: list,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    q: Mapping[str, int],
    keep: Mapping[str, int] | None = None,
    power_iterations: int | None = 4,
    seed: int = 0,
    show_progress: bool = True,
    recompute_blocks: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, (U, S, V) of the mean over ``batches`` of d loss_fn(model, batch) / d layer.weight.

    ``layers`` maps names to modules called as ``layer(x)`` with x [..., in] and output [..., out]; ``q`` gives the
    number of singular triplets per layer. With an int ``power_iterations``, `torch.svd_lowrank`'s range finder runs
    as 2 + 2·power_iterations passes over ``batches``, which must all see the same function: call it with dropout off
    (eval mode). With ``power_iterations=None``, one pass builds a two-sided sketch of width q
    (`_LayerSinglePassSketch`), or accumulates the layer's gradient itself where that holds fewer numbers
    (`_LayerGradient`). ``keep`` (default: all q) is how many leading triplets to return per layer: each
    layer's sketch is freed once its vectors are taken, so the peak holds the sketches or the results, not both.
    Under torch.distributed the products are averaged across ranks after each pass, so every rank gets the factors of
    the globally averaged gradient.
    ``recompute_blocks`` re-runs each repeated block (decoder layer) during backward instead of keeping its
    activations (`_recomputed_blocks`): the same numbers, about one block's activations instead of all of them, one
    more forward per pass.
    """
    finders, test_matrices = {}, {}
    for name, layer in layers.items():
        out_features, in_features = _layer_shape(layer)
        sketch_numel = _LayerSinglePassSketch.numel(out_features, in_features, q[name])
        if power_iterations is None and sketch_numel >= out_features * in_features:
            # on a resident G the range finder needs no wide sketch: 2·keep columns (PEFT's 4r for LoRA-GA)
            finders[name] = _LayerGradient(q[name] if keep is None else min(q[name], 2 * keep[name]), seed)
        elif power_iterations is None:
            finders[name] = _LayerSinglePassSketch(out_features, in_features, q[name], seed, test_matrices)
        else:
            finders[name] = _LayerRangeFinder(out_features, in_features, q[name], seed)
    num_passes = gradient_passes(power_iterations)
    is_main = not _is_distributed() or torch.distributed.get_rank() == 0
    progress = tqdm(total=num_passes * len(batches), desc="LoRA-GA gradient passes",
                    disable=not (show_progress and is_main))
    try:
        recompute = _recomputed_blocks(model) if recompute_blocks else contextlib.nullcontext()
        with torch.enable_grad(), _capture_products(layers, finders), recompute:
            for pass_index in range(num_passes):
                for index, batch in enumerate(batches):
                    loss = loss_fn(model, batch)
                    if pass_index == 0:  # the later passes see the same batches and function
                        _check_loss(loss, index)
                    loss.backward()
                    progress.update()
                for name, finder in finders.items():
                    finder.finish_pass(len(batches), final=pass_index == num_passes - 1, name=name,
                                       first=pass_index == 0)
    finally:
        progress.close()
    vectors = {}
    for name in list(finders):
        count = keep[name] if keep is not None else q[name]
        # copies, so that neither the sketch nor the full-width factors outlive this layer
        vectors[name] = tuple(t[..., :count].clone(memory_format=torch.contiguous_format)
                              for t in finders.pop(name).singular_vectors())
    if _is_distributed():
        # Every rank holds the same averaged products, but LAPACK may round the small factorisations differently
        # from one process to the next (buffer alignment picks the code path); rank 0's result is sent to all.
        for triple in vectors.values():
            for tensor in triple:
                torch.distributed.broadcast(tensor, src=0)
    return vectors


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like layer (nn.Linear, bitsandbytes Linear4bit/8bitLt, Conv1D)."""
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return int(layer.out_features), int(layer.in_features)
    if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
        return int(layer.nf), int(layer.weight.shape[0])
    raise TypeError(f"{type(layer).__name__} is not a linear layer (needs in_features/out_features)")


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """The model's own loss: ``model(**batch).loss`` on the model's device."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must be mappings of model inputs (with labels), got {type(batch).__name__}; "
                        "pass loss_fn=callable(model, batch) for other batch types")
    outputs = model(**_on_model_device(model, batch))
    if getattr(outputs, "loss", None) is None:
        raise ValueError("the model returned no loss for a gradient batch: include labels in the batches or pass "
                         "loss_fn=callable(model, batch)")
    return outputs.loss


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _on_model_device(model: nn.Module, batch: Mapping) -> dict:
    device = next(model.parameters()).device
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


LOSS_CHUNK_TOKENS = 128  # one [128, vocab] float32 block at a time: 24 MiB for a 49k vocabulary


def chunked_causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """`default_loss` of a Llama-style causal LM without its logits: the decoder's last hidden states go through
    ``lm_head`` and the cross-entropy (labels shifted, -100 ignored, mean over targets: transformers' causal-LM
    loss) in chunks of `LOSS_CHUNK_TOKENS` tokens. The [tokens, vocab] logits, their log-softmax and their gradient
    are the largest tensors of a small model's backward; here one chunk's block exists at a time."""
    from ..losses import TailCappedLoss  # γ = 0: plain cross-entropy

    if not isinstance(batch, Mapping) or "labels" not in batch:
        return default_loss(model, batch)  # its error names what is missing
    causal_lm = _unwrapped(model)
    inputs = _on_model_device(model, batch)
    labels = inputs.pop("labels")
    hidden_states = causal_lm.model(**inputs).last_hidden_state
    loss = TailCappedLoss(gamma=0.0, fused=True, chunk_size=LOSS_CHUNK_TOKENS)
    return loss.loss_from_hidden_states(hidden_states, causal_lm.lm_head, labels)


def model_loss_for(model: nn.Module) -> Callable[[nn.Module, object], torch.Tensor]:
    """`chunked_causal_lm_loss` where it equals the model's own loss (logits = lm_head(decoder output), nothing
    after), else `default_loss`."""
    from ..losses.fused_lm_head import why_logits_are_not_lm_head_of_decoder

    causal_lm = _unwrapped(model)
    if type(causal_lm).__name__.endswith("ForCausalLM") and why_logits_are_not_lm_head_of_decoder(causal_lm) is None:
        return chunked_causal_lm_loss
    return default_loss


def take_batches(dataloader: Iterable, num_batches: int) -> list:
    """The first ``num_batches`` batches of ``dataloader`` (every pass must see the same ones)."""
    batches = []
    for batch in dataloader:
        batches.append(batch)
        if len(batches) == num_batches:
            break
    if not batches:
        raise ValueError("dataloader yielded no batches for the LoRA-GA gradient estimate")
    return batches
