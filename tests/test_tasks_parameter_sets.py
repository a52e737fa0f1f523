"""The parameter sets and optimizer peers of the Lion step benchmark (benchmarks/tasks/parameter_sets.py)."""

import torch

from benchmarks.tasks.parameter_sets import (SMOLLM2_135M, build_parameters, check_identical, make_optimizer,
                                             momentum_of, parameter_shapes, state_bytes)

# Tensors on both sides of the fused Lion kernel's size threshold (32768 elements).
SMALL = {"vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 1, "kv_size": 64, "intermediate_size": 512}


def test_smollm2_parameter_count():
    shapes = parameter_shapes(SMOLLM2_135M)
    assert sum(torch.Size(shape).numel() for _, shape in shapes) == 134_515_008
    assert len(shapes) == 1 + 30 * 9 + 1 and shapes[0] == ("embed_tokens", (49152, 576))


def test_state_bytes_and_momentum():
    params = build_parameters(SMALL)
    numel = sum(p.numel() for p in params)
    lion, adamw = make_optimizer("lion_fused", params), make_optimizer("adamw_fused", params)
    lion.step(), adamw.step()
    assert state_bytes(lion) == 4 * numel
    assert state_bytes(adamw) == 8 * numel + 4 * len(params)  # exp_avg, exp_avg_sq, 0-d fp32 step
    assert momentum_of(lion, params[0]).shape == params[0].shape


def test_fused_lion_is_bit_identical_to_the_peers():
    checks = check_identical(SMALL)
    assert checks["passed"] is True
    for peer in ("lion_foreach", "lion_pytorch", "bitsandbytes"):
        assert checks[f"fused_vs_{peer}"]["params_bit_identical"] is True
        assert checks[f"fused_vs_{peer}"]["momenta_bit_identical"] is True
    assert checks["fused_vs_lion_pytorch_foreach"]["max_abs_param_diff"] < 1e-6  # lerp: close, maybe not equal
