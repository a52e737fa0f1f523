"""Launch a script under `torchrun --nproc_per_node 2` (gloo, CPU) and read the JSON result rank 0 writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

DISTRIBUTED = Path(__file__).resolve().parent / "distributed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, scenario: str, tmp_path) -> dict:
    """Run tests/distributed/SCRIPT SCENARIO OUTPUT_JSON on two processes; return the parsed OUTPUT_JSON."""
    output = tmp_path / "result.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(DISTRIBUTED.parent), str(DISTRIBUTED.parents[1])]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(DISTRIBUTED / script), scenario, str(output)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())
