"""Tail-capped (TaiLr) loss: float64 references, γ = 0 equals cross-entropy, fused path equals unfused."""

import pytest
import torch
import torch.nn.functional as F

import hf_ext
from hf_ext.losses import TailCappedLoss, disable_fused_loss, enable_fused_loss
from hf_ext.ops.tail_capped import fused_linear_tail_capped_loss, tail_capped_token_losses

from conftest import tiny_config


def _reference_losses(logits, targets, gamma, min_weight=0.0, ignore_index=-100, label_smoothing=0.0):
    """TaiLr written out in float64: −sg[clamp(p/(γ+(1−γ)p), b, 1)]·log p, plus ε·mean(−log p_v)."""
    logits = logits.double()
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    valid = targets != ignore_index
    target_log_probs = log_probs[torch.arange(len(targets)), targets.clamp(min=0)]
    p = target_log_probs.exp().detach()
    weight = (p / (gamma + (1 - gamma) * p)).clamp(min_weight, 1.0)
    losses = -(1 - label_smoothing) * weight * target_log_probs - label_smoothing * log_probs.mean(-1)
    return torch.where(valid, losses, 0.0)


def _case(n=37, vocab=53, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, vocab, generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[::5] = -100
    return logits, targets


@pytest.mark.parametrize("gamma,min_weight,smoothing", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.5, 0.2, 0.0),
                                                        (0.8, 0.3, 0.1), (0.999, 0.0, 0.0)])
@pytest.mark.smoke
def test_loss_and_gradient_equal_float64_reference(gamma, min_weight, smoothing):
    logits, targets = _case()
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.double().requires_grad_()
    ours, valid = tail_capped_token_losses(ours_in, targets, gamma, min_weight, label_smoothing=smoothing)
    reference = _reference_losses(ref_in, targets, gamma, min_weight, label_smoothing=smoothing)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(valid, targets != -100)
    ours.sum().backward(), reference.sum().backward()
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1e-7, 0.1, 0.5, 0.8, 0.999])
def test_gradient_is_that_of_the_closed_form(gamma):
    # Su's closed form L = −log(γ + (1−γ)p)/(1−γ) has gradient −w·∇log p with w = p/(γ + (1−γ)p).
    logits, targets = _case(n=11, vocab=7, seed=1)
    targets[targets == -100] = 3
    closed_in = logits.double().requires_grad_()
    p = closed_in.softmax(-1)[torch.arange(11), targets]
    (-torch.log(gamma + (1 - gamma) * p) / (1 - gamma)).sum().backward()
    ours_in = logits.double().requires_grad_()
    tail_capped_token_losses(ours_in, targets, gamma)[0].sum().backward()
    torch.testing.assert_close(ours_in.grad, closed_in.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gamma_zero_is_exactly_cross_entropy(smoothing):
    logits, targets = _case()
    loss = TailCappedLoss(gamma=0.0, label_smoothing=smoothing)
    expected = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=smoothing)
    torch.testing.assert_close(loss(logits[None], None, 53, shift_labels=targets[None]), expected, rtol=1e-6, atol=0)
    # unshifted labels: position i predicts label i + 1, as transformers' ForCausalLMLoss
    labels = torch.cat([torch.tensor([7]), targets])[None]
    padded_logits = torch.cat([logits, torch.zeros(1, 53)])[None]
    torch.testing.assert_close(loss(padded_logits, labels, 53), expected, rtol=1e-6, atol=0)


@pytest.mark.smoke
def test_fused_loss_and_gradients_equal_unfused():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(70, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(91, 24, generator=generator, dtype=torch.float64) / 3
    bias = torch.randn(91, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 91, (70,), generator=generator)
    targets[3:20] = -100  # a whole chunk of ignored targets is skipped
    for gamma, min_weight, smoothing in [(0.0, 0.0, 0.0), (0.3, 0.1, 0.1)]:
        inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        fused = fused_linear_tail_capped_loss(*inputs[:2], targets, inputs[2], gamma=gamma, min_weight=min_weight,
                                              label_smoothing=smoothing, chunk_size=16, divisor=50.0)
        fused.backward()
        plain_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        losses, _ = tail_capped_token_losses(plain_inputs[0] @ plain_inputs[1].T + plain_inputs[2], targets, gamma,
                                             min_weight, label_smoothing=smoothing)
        plain = losses.sum() / 50.0
        plain.backward()
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
        for a, b in zip(inputs, plain_inputs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_fused_path_in_fp32_matches_unfused_within_1e_5_relative():
    model = hf_ext.HfExtForCausalLM(tiny_config(vocab_size=211))
    tokens = torch.randint(3, 211, (3, 40))
    labels = tokens.clone()
    labels[0, :7] = -100
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        model.loss_function = TailCappedLoss(gamma=0.2, min_weight=0.1, fused=fused, chunk_size=32)
        output = model(tokens, labels=labels)
        assert (output.logits is None) == fused
        output.loss.backward()
        grads[fused] = torch.cat([p.grad.flatten() for p in model.parameters()])
    error = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    assert error <= 1e-5
    model.eval()  # eval returns logits even with the fused loss
    assert model(tokens, labels=labels).logits is not None


@pytest.mark.smoke
def test_enable_fused_loss_on_llama_matches_unfused_and_is_reversible():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=150, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    tokens = torch.randint(0, 150, (2, 30))
    loss = TailCappedLoss(gamma=0.3, fused=True, chunk_size=16)
    plain = TailCappedLoss(gamma=0.3)(model(tokens).logits, tokens, vocab_size=150)
    enable_fused_loss(model, loss)
    fused_output = model(tokens, labels=tokens)
    assert fused_output.logits is None
    torch.testing.assert_close(fused_output.loss, plain, rtol=1e-5, atol=0)
    fused_output.loss.backward()
    fused_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    plain.backward()
    torch.testing.assert_close(fused_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-7)
    disable_fused_loss(model)
    assert "forward" not in model.__dict__ and model(tokens, labels=tokens).logits is not None


def test_bad_arguments_get_clear_errors():
    for kwargs, word in [({"gamma": 1.0}, "gamma"), ({"gamma": -0.1}, "gamma"),
                         ({"gamma": 0.1, "min_weight": 2}, "min_weight"),
                         ({"gamma": 0.1, "label_smoothing": 1.0}, "label_smoothing"),
                         ({"gamma": 0.1, "chunk_size": 0}, "chunk_size")]:
        with pytest.raises(ValueError, match=word):
            TailCappedLoss(**kwargs)
    with pytest.raises(ValueError, match="fused=True"):
        enable_fused_loss(torch.nn.Linear(2, 2), TailCappedLoss(gamma=0.1))
    with pytest.raises(ValueError, match="lm_head"):
        enable_fused_loss(torch.nn.Linear(2, 2), TailCappedLoss(gamma=0.1, fused=True))
    with pytest.raises(ValueError, match="targets"):
        fused_linear_tail_capped_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long), gamma=0)


def test_fused_path_with_bf16_weights_tracks_the_float64_gradients():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(50, 32, generator=generator)
    weight = torch.randn(120, 32, generator=generator) / 4
    targets = torch.randint(0, 120, (50,), generator=generator)
    inputs = [hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()]
    fused_linear_tail_capped_loss(*inputs, targets, gamma=0.2, chunk_size=16).backward()
    reference = [hidden.bfloat16().double().requires_grad_(), weight.bfloat16().double().requires_grad_()]
    losses, _ = tail_capped_token_losses(reference[0] @ reference[1].T, targets, 0.2)
    (losses.sum() / 50).backward()
    for ours, expected in zip(inputs, reference):
        assert ours.grad.dtype == torch.bfloat16
        error = ((ours.grad.double() - expected.grad).norm() / expected.grad.norm()).item()
        assert error < 2e-2
