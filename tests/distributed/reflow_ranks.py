"""Run under `torchrun --nproc_per_node 2` by tests/test_reflow_training.py (gloo, CPU, through accelerate).

Usage: reflow_ranks.py SCENARIO OUTPUT_JSON. Both ranks train a float64 1-rectified flow with
hf_ext.diffusion.train_rectified_flow; rank 0 replays the same two per-rank batches in one process (same warm-up and linear decay)
and writes the comparison.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from benchmarks.tasks.toy2d import VelocityMLP, eight_gaussians
from hf_ext.diffusion import FlowTrainingArguments, rectified_flow_loss, train_rectified_flow
from hf_ext.diffusion.training import _learning_rate_factor, _step_seed

STEPS = 6


def _model():
    torch.manual_seed(0)
    return VelocityMLP(hidden_size=32, num_layers=2).double()


def main(output: str) -> None:
    data = eight_gaussians(512, generator=torch.Generator().manual_seed(0)).double()
    args = FlowTrainingArguments(max_steps=STEPS, batch_size=16, learning_rate=1e-2, max_grad_norm=None,
                                 warmup_steps=2, lr_scheduler_type="linear", show_progress=False)
    trained = train_rectified_flow(_model(), data, args).model
    flat = torch.cat([p.detach().flatten() for p in trained.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        reference = _model()
        optimizer = torch.optim.AdamW(reference.parameters(), lr=args.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(args, step))
        for step in range(STEPS):
            losses = []
            for process in (0, 1):  # what each rank drew at this step
                generator = torch.Generator().manual_seed(_step_seed(args.seed, step, process))
                batch = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
                noise = torch.randn(batch.shape, generator=generator).double()
                sigma = torch.rand(batch.shape[0], generator=generator)
                losses.append(rectified_flow_loss(reference, batch, noise, sigma))
            (sum(losses) / 2).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        expected = torch.cat([p.detach().flatten() for p in reference.parameters()])
        initial = torch.cat([p.detach().flatten() for p in _model().parameters()])
        result = {"world_size": dist.get_world_size(),
                  "ranks_identical": bool(torch.equal(gathered[0], gathered[1])),
                  "moved": (flat - initial).abs().max().item(),
                  "max_diff_vs_single_process": (flat - expected).abs().max().item()}
        with open(output, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    # Both ranks are done: leave without the process group's teardown, which can wait for a peer that has already
    # exited or abort at interpreter shutdown (see training_ranks.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[2])
