"""The losses of the tail-capped loss benchmark (benchmarks/tasks/loss_peers.py): agreement and memory estimates."""

import torch

from benchmarks.tasks.loss_peers import (GRAD_TOLERANCE, check_agreement, estimated_peak_bytes, make_inputs,
                                         naive_tailr_loss, transformers_ce_loss)


def test_three_losses_agree_on_tiny_inputs():
    checks = check_agreement(tokens=40, vocab=300)
    assert checks["passed"] is True
    for name in ("fused_vs_naive_gamma_0.1", "fused_gamma_0_vs_transformers_ce"):
        for part in ("loss", "grad_hidden", "grad_weight"):
            assert checks[name][f"{part}_relative_difference"] <= GRAD_TOLERANCE
    low, high = checks["tailr_weight_range"]
    assert low < 0.1 < 0.9 < high  # the check covers small and large TaiLr weights


def test_naive_tailr_at_gamma_zero_is_cross_entropy():
    hidden, weight, targets = make_inputs(16, 50, torch.float32)
    naive = naive_tailr_loss(hidden, weight, targets, gamma=0.0)
    ce = transformers_ce_loss(hidden, weight, targets)
    torch.testing.assert_close(naive, ce, rtol=1e-6, atol=1e-6)


def test_memory_estimate_skips_what_does_not_fit():
    naive_16k = estimated_peak_bytes("naive", 16384, 49152, torch.float32)
    fused_16k = estimated_peak_bytes("fused", 16384, 49152, torch.float32)
    assert naive_16k > 9 * 2**30 > 2**30 > fused_16k
    assert fused_16k == estimated_peak_bytes("fused", 2048, 49152, torch.float32)  # flat in N
