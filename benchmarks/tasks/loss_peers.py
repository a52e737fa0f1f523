"""The losses the tail-capped (TaiLr) loss benchmark compares at SmolLM2-135M's head shape: hf_ext's fused chunked
loss, the naive TaiLr computation on full logits and transformers' default cross-entropy; their inputs, the check
that they agree, and each one's estimated peak memory."""

import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_ext.ops.tail_capped import fused_linear_tail_capped_loss

GAMMA = 0.1
GRAD_TOLERANCE = 1e-5  # relative: max |a - b| / max |b|
HIDDEN_SIZE = 576
CANDIDATE_CHUNK = 1024  # fused_linear_tail_capped_loss's default
OTHER_CHUNK = 256
METHODS = ("fused", f"fused_chunk{OTHER_CHUNK}", "naive", "transformers_ce")
# Peak bytes per logit (N x V) of the full-logit paths, measured at 2048 tokens: fp32 12 (logits, log-softmax
# output, its gradient), bf16 14 (plus the bf16 logits).
BYTES_PER_LOGIT = {torch.float32: 12, torch.bfloat16: 14}


def naive_tailr_loss(hidden, weight, targets, gamma: float = GAMMA) -> torch.Tensor:
    """TaiLr as the fairseq criterion computes it: full logits, log-softmax for the loss, a second softmax for p."""
    logits = hidden @ weight.T
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    p = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    weights = (p / (gamma + (1 - gamma) * p)).clamp(min=0.0, max=1.0).detach()
    return -(weights * lprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()


def transformers_ce_loss(hidden, weight, targets) -> torch.Tensor:
    """transformers' default causal-LM loss on full logits (targets already shifted: every row is a target)."""
    logits = F.linear(hidden, weight)
    return ForCausalLMLoss(logits, None, vocab_size=weight.shape[0], shift_labels=targets)


def fused_loss(hidden, weight, targets, gamma: float = GAMMA, chunk_size: int = CANDIDATE_CHUNK) -> torch.Tensor:
    """hf_ext's fused, chunked TaiLr loss on hidden states and the output projection weight."""
    return fused_linear_tail_capped_loss(hidden, weight, targets, gamma=gamma, chunk_size=chunk_size)


def loss_functions(gamma: float = GAMMA) -> dict:
    """Each of `METHODS` as a function of (hidden, weight, targets)."""
    return {
        "fused": partial(fused_loss, gamma=gamma, chunk_size=CANDIDATE_CHUNK),
        f"fused_chunk{OTHER_CHUNK}": partial(fused_loss, gamma=gamma, chunk_size=OTHER_CHUNK),
        "naive": partial(naive_tailr_loss, gamma=gamma),
        "transformers_ce": transformers_ce_loss,
    }


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """hidden [tokens, 576] ~ N(0, 1), weight [vocab, 576] ~ N(0, 0.02²) (both requiring grad), random targets."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN_SIZE, generator=generator).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, HIDDEN_SIZE, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=generator)
    return hidden, weight, targets


# ---------------------------------------------------------------------------------------------------------------
# Agreement and memory estimates


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _loss_and_grads(loss_fn, hidden, weight, targets):
    loss = loss_fn(hidden, weight, targets)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def check_agreement(tokens: int, vocab: int, seed: int = 1) -> dict:
    """fused vs naive at γ = 0.1, fused at γ = 0 vs transformers' CE: relative loss and gradient differences, fp32."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN_SIZE, generator=generator).requires_grad_()
    weight = (0.2 * torch.randn(vocab, HIDDEN_SIZE, generator=generator)).requires_grad_()  # peaked softmax
    with torch.no_grad():
        targets = (hidden @ weight.T).argmax(-1)
    random_rows = torch.arange(tokens) % 2 == 1
    targets[random_rows] = torch.randint(vocab, (int(random_rows.sum()),), generator=generator)
    chunk = max(1, tokens // 3)  # several chunks, the last one partial
    pairs = {
        "fused_vs_naive_gamma_0.1": (partial(fused_loss, gamma=GAMMA, chunk_size=chunk),
                                     partial(naive_tailr_loss, gamma=GAMMA)),
        "fused_gamma_0_vs_transformers_ce": (partial(fused_loss, gamma=0.0, chunk_size=chunk), transformers_ce_loss),
    }
    checks = {"tokens": tokens, "vocab_size": vocab, "dtype": "float32", "chunk_size": chunk,
              "tolerance": f"max |a - b| / max |b| <= {GRAD_TOLERANCE} for the loss and both gradients"}
    passed = True
    for name, (ours, reference) in pairs.items():
        a, b = _loss_and_grads(ours, hidden, weight, targets), _loss_and_grads(reference, hidden, weight, targets)
        differences = {f"{part}_relative_difference": _relative_difference(x, y)
                       for part, x, y in zip(("loss", "grad_hidden", "grad_weight"), a, b)}
        ok = all(value <= GRAD_TOLERANCE for value in differences.values())
        checks[name] = {"loss": a[0].item(), "reference_loss": b[0].item(), **differences, "passed": ok}
        passed = passed and ok
    with torch.no_grad():  # the spread of TaiLr weights the check covered
        log_p = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
        p = log_p.exp()
        weights = (p / (GAMMA + (1 - GAMMA) * p)).clamp(0, 1)
    checks["tailr_weight_range"] = [weights.min().item(), weights.max().item()]
    checks["passed"] = passed
    return checks


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unreadable)."""
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def estimated_peak_bytes(method: str, tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Rough peak of one call: the full-logit paths hold ~BYTES_PER_LOGIT per logit; fused holds 3 fp32 chunks."""
    weight_grads = 2 * 4 * vocab * HIDDEN_SIZE
    if method in ("naive", "transformers_ce"):
        return BYTES_PER_LOGIT[dtype] * tokens * vocab + weight_grads
    chunk = CANDIDATE_CHUNK if method == "fused" else OTHER_CHUNK
    return 3 * 4 * min(chunk, tokens) * vocab + weight_grads
