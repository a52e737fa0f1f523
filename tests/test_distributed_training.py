"""Lion and the tail-capped loss under 2-process gloo DDP / FSDP2 (torchrun), against single-process runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed" / "training_ranks.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(scenario: str, tmp_path) -> dict:
    output = tmp_path / "result.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(SCRIPT.parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(SCRIPT), scenario, str(output)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())


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
