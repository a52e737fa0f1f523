"""Run under `torchrun --nproc_per_node 2` by tests/test_lora_ga_integration.py (gloo, CPU).

Usage: lora_ga_ranks.py SCENARIO OUTPUT_JSON. Each rank estimates the LoRA-GA gradient on its own half of the
batches; rank 0 also runs a single process on all of them and writes the comparison to OUTPUT_JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared helpers

import hf_ext  # noqa: E402,F401
from peft import LoraConfig  # noqa: E402

from hf_ext.peft import get_lora_ga_model  # noqa: E402
from test_lora_ga import tiny_llama, token_batches  # noqa: E402


def _factors(peft_model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in sorted(peft_model.named_parameters()) if p.requires_grad])


def _run(batches) -> torch.Tensor:
    # hidden 256: q_proj (256×256) takes the one-pass sketch with k = 32r = 64 of 256 columns; v_proj (128×256) and
    # down_proj (256×48), whose sketch would be no smaller than their gradient, accumulate the gradient itself
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    return _factors(get_lora_ga_model(tiny_llama(torch.float64, hidden=256), config, batches, show_progress=False))


def ddp_lora_ga(rank: int, world: int) -> dict:
    batches = token_batches(count=4)
    share = len(batches) // world
    distributed = _run(batches[rank * share:(rank + 1) * share])
    gathered = [torch.empty_like(distributed) for _ in range(world)]
    dist.all_gather(gathered, distributed)
    result = {"ranks_identical": all(torch.equal(gathered[0], g) for g in gathered)}
    if rank == 0:
        dist.destroy_process_group()  # the single-process reference must not all-reduce
        single = _run(batches)
        # factors are singular vectors: compare up to sign, element-wise magnitudes and the Gram structure
        result["max_diff_vs_single_process"] = float((distributed.abs() - single.abs()).abs().max())
        result["num_values"] = distributed.numel()
    return result


def main() -> None:
    scenario, output = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"lora_ga": ddp_lora_ga}[scenario](rank, world)
    if rank == 0:
        output.write_text(json.dumps(result))
    elif dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
