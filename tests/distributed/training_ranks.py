"""Run under `torchrun --nproc_per_node 2` by tests/test_distributed_training.py (gloo, CPU).

Usage: training_ranks.py SCENARIO OUTPUT_JSON. Every rank trains; rank 0 also trains a single-process reference on
the whole global batch and writes what the test asserts to OUTPUT_JSON.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared helpers

import hf_ext  # noqa: E402
from hf_ext.optim import GradientViewLoRA, Lion  # noqa: E402

STEPS, GLOBAL_BATCH = 12, 8


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(GLOBAL_BATCH, 12, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator))


def _train(model, optimizer, rank: int | None, world: int):
    for step in range(STEPS):
        x, y = _batch(step)
        if rank is not None:  # this rank's equal share of the global batch
            share = GLOBAL_BATCH // world
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _lion(params):
    return Lion(params, lr=1e-2, weight_decay=0.1)


def _gradient_view(params):
    return GradientViewLoRA(params, rank=2, mode="resample", resample_every=5, lr=1e-2, weight_decay=0.1)


def _single_process_reference(model, make_optimizer=_lion) -> torch.Tensor:
    reference = copy.deepcopy(model)
    _train(reference, make_optimizer(reference.parameters()), None, 1)
    return torch.cat([p.detach().flatten() for p in reference.parameters()])


def _ddp(rank: int, world: int, make_optimizer) -> dict:
    model = _mlp()
    expected = _single_process_reference(model, make_optimizer)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _train(ddp, make_optimizer(ddp.parameters()), rank, world)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {"ranks_identical": all(torch.equal(gathered[0], g) for g in gathered),
            "max_diff_vs_single_process": (flat - expected).abs().max().item(),
            "moved": (flat - torch.cat([p.flatten() for p in _mlp().parameters()])).abs().max().item()}


def ddp_lion(rank: int, world: int) -> dict:
    return _ddp(rank, world, _lion)


def ddp_gradient_view(rank: int, world: int) -> dict:
    return _ddp(rank, world, _gradient_view)


def fsdp2_gradient_view_rejected(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model)
    try:
        _gradient_view(model.parameters())
    except TypeError as error:
        return {"error": str(error)}
    return {"error": None}


def fsdp2_lion(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _mlp()
    expected = _single_process_reference(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)  # created after sharding
    _train(model, optimizer, rank, world)
    momenta = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    full = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])
    return {"params_are_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
            "state_is_sharded": all(isinstance(m, DTensor) and m.to_local().shape[0] < m.shape[0]
                                    for m in momenta if m.dim() == 2),
            "max_diff_vs_single_process": (full - expected).abs().max().item()}


def trainer_tail_capped(rank: int, world: int, output_dir: str) -> dict:
    """One SGD step (lr 1) of Trainer with TailCappedLoss, 1 row per rank × 2 accumulation steps × 2 ranks."""
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_config
    from training_data import RaggedLabelRows

    torch.manual_seed(0)
    model = hf_ext.HfExtForCausalLM(tiny_config()).double()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    loss = hf_ext.losses.TailCappedLoss(gamma=0.3, min_weight=0.1)
    args = TrainingArguments(output_dir, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                             learning_rate=1.0, lr_scheduler_type="constant", disable_tqdm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    Trainer(model, args, train_dataset=RaggedLabelRows(4), optimizers=(optimizer, None),
            compute_loss_func=loss).train()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    ids, labels = RaggedLabelRows(4).stacked()
    reference.loss_function = loss
    reference(ids, labels=labels).loss.backward()
    expected = -torch.cat([p.grad.flatten() for p in reference.parameters()])
    return {"world_size": world, "relative_error": ((update - expected).norm() / expected.norm()).item()}


def main() -> None:
    scenario, output = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "trainer_tail_capped":
        result = trainer_tail_capped(rank, world, str(output.parent / "trainer"))
    else:
        scenarios = {"ddp_lion": ddp_lion, "fsdp2_lion": fsdp2_lion, "ddp_gradient_view": ddp_gradient_view,
                     "fsdp2_gradient_view_rejected": fsdp2_gradient_view_rejected}
        result = scenarios[scenario](rank, world)
    if rank == 0:
        output.write_text(json.dumps(result))
    dist.barrier()
    # Past the barrier both ranks are done; end the process directly rather than through destroy_process_group or
    # the interpreter's shutdown. destroy_process_group can wait forever for a peer that has already exited (seen
    # once with torch 2.6: rank 0 idle in it for 10 minutes after rank 1 left), and FSDP2 leaves a gloo worker
    # thread that occasionally aborts the shutdown ("terminate called without an active exception", 1 run in 8).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
