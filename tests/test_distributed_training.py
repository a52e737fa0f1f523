"""Lion, GradientViewLoRA and the tail-capped loss under 2-process gloo DDP / FSDP2 (torchrun), against single-process runs."""

import pytest
from torchrun import torchrun


def _torchrun(scenario: str, tmp_path) -> dict:
    return torchrun("training_ranks.py", scenario, tmp_path)


@pytest.mark.smoke
def test_ddp_lion_ranks_agree_and_match_single_process(tmp_path):
    result = _torchrun("ddp_lion", tmp_path)
    assert result["ranks_identical"]
    assert result["moved"] > 0.05
    assert result["max_diff_vs_single_process"] < 1e-12  # float64: only the all-reduce's rounding differs


def test_fsdp2_lion_on_sharded_dtensors_matches_single_process(tmp_path):
    result = _torchrun("fsdp2_lion", tmp_path)
    assert result["params_are_dtensors"] and result["state_is_sharded"]
    assert result["max_diff_vs_single_process"] < 1e-12


def test_trainer_ddp_gradient_accumulation_with_tail_capped_loss_is_exact(tmp_path):
    result = _torchrun("trainer_tail_capped", tmp_path)
    assert result["world_size"] == 2
    assert result["relative_error"] < 1e-10


def test_ddp_gradient_view_lora_ranks_agree_and_match_single_process(tmp_path):
    result = _torchrun("ddp_gradient_view", tmp_path)  # mode "resample": crosses two resamplings in 12 steps
    assert result["ranks_identical"]
    assert result["moved"] > 1e-3
    assert result["max_diff_vs_single_process"] < 1e-12


def test_fsdp2_sharded_parameters_are_rejected_by_gradient_view_lora(tmp_path):
    result = _torchrun("fsdp2_gradient_view_rejected", tmp_path)
    assert result["error"] is not None and "FSDP2" in result["error"] and "use DDP" in result["error"]
