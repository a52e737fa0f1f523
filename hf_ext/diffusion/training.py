"""Rectified-flow training with accelerate: 1-rectified flow from data, reflow on coupled pairs, k-step distillation.

All three minimise the same regression (Liu et al. 2023; kexue.fm post 9497), in diffusers' σ convention:

    L = E ‖v_θ(x_σ, σ·T) − (noise − data)‖²,   x_σ = σ·noise + (1 − σ)·data

and differ only in where (noise, data) and σ come from:

* `train_rectified_flow` — independent coupling: data from your dataset, fresh Gaussian noise, σ ~ U[0, 1];
* `train_reflow` — the deterministic coupling (z0, z1) of `generate_reflow_pairs`: paths of the new flow do not cross,
  so it straightens (2-rectified flow; repeat for k-rectified);
* `distill` — pairs again, σ restricted to the grid of a k-step Euler sampler (k = 1: σ = 1 only, so one step
  x − v(x, T) is trained to land on the pair's sample). The paper's best one-step results use LPIPS here; that needs
  a pretrained network, so this L2 version is what runs offline.

Every step draws its batch indices, noise and σ from a generator seeded by (seed, step, process), so a run resumed
from a checkpoint continues exactly as if it had not stopped. Checkpoints are accelerate states (model, optimizer,
learning-rate schedule) plus ``flow_training_state.json``, written to a temporary folder and renamed when complete.

A step whose loss is NaN or inf (a NaN in the data, or a diverging run) makes no update: by default training stops
there with an error; ``nonfinite_loss="skip"`` warns and goes on with the next batch.
"""

import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._device import to_device
from .._validation import check_choice, check_integer, check_number
from ..ops import flow
from .pairs import ReflowPairs
from .sampling import predict_velocity

STATE_FILE = "flow_training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class FlowTrainingArguments:
    """Settings of `train_rectified_flow`, `train_reflow` and `distill` (names follow transformers' TrainingArguments).

    ``optimizer_cls_and_kwargs`` replaces AdamW, e.g. ``(hf_ext.optim.Lion, {"lr": 3e-4})``.

    ``nonfinite_loss``: what a step whose loss is NaN or inf does. ``"raise"`` (default): stop with a
    FloatingPointError naming the step, before the batch reaches the weights. ``"skip"``: warn (RuntimeWarning), make
    no update for that batch and go on; the step still counts (max_steps, learning-rate schedule) and its loss is
    recorded as it was. The values and error types are those of the optimizers' ``nonfinite_grads`` (`hf_ext.optim.
    Lion`), which checks gradients; this checks the loss, which is read for logging anyway, so it adds no host sync.
    With several processes they agree: a non-finite loss on any of them stops or skips the step on all (their
    gradients are averaged). A finite loss with non-finite gradients is left to the optimizer (or fp16's scaler).
    """

    output_dir: str | None = None  # checkpoints go to output_dir/checkpoint-STEP; None: no checkpoints
    max_steps: int = 1000
    batch_size: int = 256  # per process
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"  # after warm-up: "constant", "linear" or "cosine" decay to 0 at max_steps
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    save_steps: int = 0  # 0: one checkpoint at the end (when output_dir is set)
    save_total_limit: int | None = 2  # None or 0: keep every checkpoint
    logging_steps: int = 50
    seed: int = 0
    num_train_timesteps: int = 1000  # the model's time input is σ·num_train_timesteps
    mixed_precision: str = "no"  # accelerate's: "no", "bf16", "fp16"
    resume_from_checkpoint: bool | str | None = None  # True: the latest checkpoint in output_dir
    overwrite_output_dir: bool = False
    show_progress: bool = True
    optimizer_cls_and_kwargs: tuple | None = None
    nonfinite_loss: str = "raise"  # a NaN/inf loss: "raise" stops training, "skip" warns and skips that batch

    def __post_init__(self):
        # Counts are ints (2.5 or 2.0 would reach torch as a shape or a seed). Their range errors keep the wording
        # "max_steps must be >= 1" that callers already match.
        for name, low in (("max_steps", 1), ("batch_size", 1), ("num_train_timesteps", 1), ("save_steps", 0),
                          ("warmup_steps", 0), ("logging_steps", 0)):
            if check_integer(name, getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        check_integer("seed", self.seed)
        check_integer("save_total_limit", self.save_total_limit, low=0, allow_none=True,
                      why="None or 0: keep every checkpoint")
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        # A negative norm would flip the clipped gradient (ascent), a NaN one poison every weight.
        check_number("max_grad_norm", self.max_grad_norm, low=0, allow_none=True, why="None or 0: no clipping")
        check_choice("nonfinite_loss", self.nonfinite_loss, ("raise", "skip"))
        if self.lr_scheduler_type not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}; choose one of 'constant', 'linear', "
                             "'cosine'")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose one of 'no', 'bf16', 'fp16'")
        if self.resume_from_checkpoint is True and self.output_dir is None:
            raise ValueError("resume_from_checkpoint=True needs output_dir (where the checkpoints are)")


@dataclass
class FlowTrainingResult:
    """The trained (unwrapped) model, the loss at every step run in this call, and the last checkpoint written."""

    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    last_checkpoint: str | None = None


def rectified_flow_loss(model, data: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                        num_train_timesteps: int = 1000) -> torch.Tensor:
    """Mean squared error between v(x_σ, σ·T) and noise − data; ``sigma`` is a tensor [batch].

    The model's output must have the sample's shape (`predict_velocity` refuses another: the loss would broadcast).
    """
    noisy = flow.add_flow_noise(data, noise, sigma)
    velocity = predict_velocity(model, noisy, sigma * num_train_timesteps)
    dtype = torch.promote_types(velocity.dtype, torch.float32)  # bf16/fp16 outputs: the loss in fp32
    return torch.nn.functional.mse_loss(velocity.to(dtype), flow.flow_velocity_target(data, noise).to(dtype))


def train_rectified_flow(model, dataset, args: FlowTrainingArguments, accelerator=None) -> FlowTrainingResult:
    """1-rectified flow: regress v on noise − data with independent Gaussian noise.

    ``dataset``: a tensor [N, ...] of training samples, or any indexable dataset whose items are tensors (or dicts
    with a ``"sample"`` or ``"pixel_values"`` tensor).
    """
    _check_dataset(dataset, "dataset")
    dtype = _take(dataset, torch.zeros(1, dtype=torch.long)).dtype
    if not dtype.is_floating_point:  # the Gaussian noise would be cast to it (randn → 0, ±1, ±2 …)
        raise ValueError(f"dataset holds {dtype} samples; rectified flow needs floating-point data (its noise is "
                         "Gaussian): convert it with .float()")

    def batch(generator, device):
        data = to_device(_take(dataset, _indices(len(dataset), args.batch_size, generator)), device)
        noise = to_device(torch.randn(data.shape, generator=generator), device, data.dtype)
        return data, noise, to_device(torch.rand(data.shape[0], generator=generator), device)

    return _train(model, args, batch, accelerator, "1-rectified flow")


def train_reflow(model, pairs: ReflowPairs, args: FlowTrainingArguments, accelerator=None) -> FlowTrainingResult:
    """k+1-rectified flow: the same regression on the coupling (noise, sample) of `generate_reflow_pairs`.

    Start from the k-rectified model (the paper initialises reflow from it), and pass its own pairs.
    """
    pairs = ReflowPairs.coerce(pairs)

    def batch(generator, device):
        index = _indices(len(pairs), args.batch_size, generator)
        noise, data = _rows(pairs.noise, index, device), _rows(pairs.samples, index, device)
        return data, noise, to_device(torch.rand(data.shape[0], generator=generator), device)

    return _train(model, args, batch, accelerator, "reflow")


def distill(model, pairs: ReflowPairs, args: FlowTrainingArguments, num_steps: int = 1,
            accelerator=None) -> FlowTrainingResult:
    """Distil into a ``num_steps``-step Euler sampler: σ only at that sampler's grid 1, (k−1)/k, …, 1/k."""
    if check_integer("num_steps", num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    pairs = ReflowPairs.coerce(pairs)
    grid = torch.arange(num_steps, 0, -1, dtype=torch.float32) / num_steps

    def batch(generator, device):
        index = _indices(len(pairs), args.batch_size, generator)
        noise, data = _rows(pairs.noise, index, device), _rows(pairs.samples, index, device)
        sigma = to_device(grid[torch.randint(num_steps, (len(index),), generator=generator)], device)
        return data, noise, sigma

    return _train(model, args, batch, accelerator, f"{num_steps}-step distillation")


# ---- the shared loop ----------------------------------------------------------------------------------------------
def _train(model, args: FlowTrainingArguments, make_batch: Callable, accelerator, description: str):
    from accelerate import Accelerator

    # cpu=True on a machine without an accelerator: only then does accelerate pick up torchrun's processes (gloo).
    accelerator = accelerator or Accelerator(mixed_precision=args.mixed_precision,
                                             cpu=not torch.accelerator.is_available())
    resume_dir = _resume_dir(args)
    optimizer_cls, optimizer_kwargs = args.optimizer_cls_and_kwargs or (
        torch.optim.AdamW, {"lr": args.learning_rate, "weight_decay": args.weight_decay})
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(args, step))
    was_training = model.training
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would step a prepared schedule once per process per step (it assumes the data is split
    # across processes); here every process takes max_steps steps. Registered, so that checkpoints still hold it.
    accelerator.register_for_checkpointing(schedule)

    start_step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        start_step = json.loads((resume_dir / STATE_FILE).read_text())["step"]
    result = FlowTrainingResult(model=model)
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc=description,
                    disable=not args.show_progress or not accelerator.is_main_process)
    for step in progress:
        generator = torch.Generator().manual_seed(_step_seed(args.seed, step, accelerator.process_index))
        data, noise, sigma = make_batch(generator, accelerator.device)
        with accelerator.autocast():
            loss = rectified_flow_loss(model, data, noise, sigma, args.num_train_timesteps)
        # The step's one host sync (the loss is logged anyway), before the batch can reach the weights: skipping or
        # refusing a non-finite step must be decided on the host. Nothing else in a step waits for the device
        # (tests/test_host_syncs.py). With several processes their summed loss comes along (a sum keeps NaN, where
        # max/min would drop it): a NaN on any of them would be in everyone's averaged gradient.
        checked = loss.detach().reshape(1)
        if accelerator.num_processes > 1:
            checked = torch.cat([checked, accelerator.reduce(checked, "sum")])
        loss_value, *summed = checked.tolist()
        nonfinite = next((value for value in (loss_value, *summed) if not math.isfinite(value)), None)
        if nonfinite is None:
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
        else:
            _nonfinite_loss(args, step, nonfinite)  # raises, or warns and leaves this batch out
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_value)
        if args.logging_steps and (step + 1) % args.logging_steps == 0:
            progress.set_postfix(loss=f"{sum(result.losses[-args.logging_steps:]) / args.logging_steps:.4f}")
        last = step + 1 == args.max_steps
        if args.output_dir and ((args.save_steps and (step + 1) % args.save_steps == 0) or last):
            result.last_checkpoint = _save_checkpoint(accelerator, args, step + 1, description)
    result.model = accelerator.unwrap_model(model)
    result.model.train(was_training)
    return result


def _nonfinite_loss(args: FlowTrainingArguments, step: int, value: float) -> None:
    problem = (f"step {step + 1} of {args.max_steps}: the loss is {value} (non-finite), likely a NaN or inf in the "
               "data (or a diverging run)")
    if args.nonfinite_loss == "raise":
        raise FloatingPointError(f"{problem}; no update was made. Check the data with torch.isfinite, or pass "
                                 "nonfinite_loss='skip' to skip such batches")
    warnings.warn(f"{problem}; skipped this batch's update (nonfinite_loss='skip')", RuntimeWarning, stacklevel=4)


def _learning_rate_factor(args: FlowTrainingArguments, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or a linear / cosine decay reaching 0 at max_steps."""
    if step < args.warmup_steps:
        return (step + 1) / (args.warmup_steps + 1)
    if args.lr_scheduler_type == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    if args.lr_scheduler_type == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_seed(seed: int, step: int, process: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + process


def _indices(size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(size, (batch_size,), generator=generator)


def _rows(tensor: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
    """tensor[index] on ``device``; the index goes to the tensor's device first without waiting, where indexing a
    device tensor with a host index would copy it with a wait."""
    return to_device(tensor[to_device(index, tensor.device)], device)


def _take(dataset, index: torch.Tensor) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        return dataset[to_device(index, dataset.device)]
    items = [dataset[i] for i in index.tolist()]
    if isinstance(items[0], dict):
        key = "sample" if "sample" in items[0] else "pixel_values"
        items = [item[key] for item in items]
    return torch.stack([torch.as_tensor(item) for item in items])


def _check_dataset(dataset, name: str) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name} must be a tensor or an indexable dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _resume_dir(args: FlowTrainingArguments) -> Path | None:
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint is True:
            found = _checkpoints(Path(args.output_dir))
            if not found:
                raise ValueError(f"resume_from_checkpoint=True but {args.output_dir} holds no checkpoint")
            return found[-1]
        path = Path(args.resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint folder (no {STATE_FILE})")
        return path
    if args.output_dir and _checkpoints(Path(args.output_dir)) and not args.overwrite_output_dir:
        raise ValueError(f"output_dir {args.output_dir} already holds checkpoints; pass resume_from_checkpoint=True "
                         "to continue from them or overwrite_output_dir=True to replace them")
    return None


def _save_checkpoint(accelerator, args: FlowTrainingArguments, step: int, description: str) -> str:
    output_dir = Path(args.output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f".{CHECKPOINT_PREFIX}{step}.partial"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        state = {"step": step, "stage": description, "arguments": _jsonable(asdict(args))}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # a checkpoint folder exists only once it is complete
        if args.save_total_limit:
            for old in _checkpoints(output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return str(final)


def _jsonable(values: dict) -> dict:
    return {key: value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
            for key, value in values.items()}

