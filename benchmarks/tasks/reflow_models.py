"""The models of ``reflow_quality``, trained on one of its tasks: 1-RF, the ε-model (same network, initial weights and
budget), 2-RF from 1-RF's reflow pairs and 2-RF's one-step distillation; the DDIM/UDM schedulers and sampling loop of
the ε-model, and the check that UDM reproduces diffusers' DDIM on it."""

import copy
import math
import time

import torch

from hf_ext.diffusion import (FlowTrainingArguments, distill, generate_reflow_pairs, predict_velocity, train_reflow,
                              train_rectified_flow)
from hf_ext.schedulers import UDMScheduler

from ..harness import log
from .reflow_tasks import Task


def flow_arguments(config: dict, stage: str, seed: int) -> FlowTrainingArguments:
    stage_config = config[stage]
    return FlowTrainingArguments(max_steps=stage_config["max_steps"], batch_size=config["batch_size"],
                                 learning_rate=stage_config["learning_rate"], weight_decay=config["weight_decay"],
                                 warmup_steps=stage_config["warmup_steps"], max_grad_norm=config["max_grad_norm"],
                                 seed=seed, show_progress=False)


def train_epsilon_model(model, data: torch.Tensor, args: FlowTrainingArguments, scheduler: UDMScheduler):
    """ε-prediction training with the settings of a flow run: AdamW, linear warm-up, clipping, a generator per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.warmup_steps + 1)))
    timesteps = scheduler.config.num_train_timesteps
    model.train()
    losses = []
    for step in range(args.max_steps):
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + 7)
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(timesteps, (args.batch_size,), generator=generator)
        prediction = predict_velocity(model, scheduler.add_noise(x0, noise, t), t)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def training_record(kind: str, args: FlowTrainingArguments, losses: list[float], seconds: float) -> dict:
    window = max(1, len(losses) // 20)
    curve = {str(start + window): sum(losses[start : start + window]) / len(losses[start : start + window])
             for start in range(0, len(losses), window)}
    head = losses[: max(1, len(losses) // 20)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"objective": kind, "steps": args.max_steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "seconds": seconds,
            "seconds_per_step": seconds / args.max_steps, "loss_first_5pct": sum(head) / len(head),
            "loss_last_10pct": sum(tail) / len(tail), "loss_curve": curve,
            "finite": all(math.isfinite(loss) for loss in losses)}


def reflow_pairs(model, config: dict, task: Task, steps: int, seed: int) -> tuple:
    """(``config["pairs"]`` reflow pairs of ``model`` by Heun with ``steps`` steps, their cost record)."""
    started = time.perf_counter()
    pairs = generate_reflow_pairs(model, config["pairs"], task.sample_shape, num_inference_steps=steps, solver="heun",
                                  seed=seed, show_progress=False)
    seconds = time.perf_counter() - started
    return pairs, {"pairs": config["pairs"], "solver": "heun", "steps": steps, "nfe_per_pair": 2 * steps - 1,
                   "seconds": seconds, "seed": seed}


def train_models(task: Task, config: dict, settings: dict, udm: UDMScheduler) -> tuple[dict, dict]:
    """1-RF, the ε-model (same initial weights and budget), 2-RF from 1-RF's pairs and its one-step distillation."""
    seed = settings["seed"]
    torch.manual_seed(seed)
    initial = task.make_model()
    parameters = sum(p.numel() for p in initial.parameters())
    models, training = {}, {"parameters": parameters}

    started = time.perf_counter()
    args = flow_arguments(config, "rf", seed)
    result = train_rectified_flow(copy.deepcopy(initial), task.train_data, args)
    models["rf1"] = result.model.eval()
    training["rf1"] = training_record("1-rectified flow (train_rectified_flow)", args, result.losses,
                                       time.perf_counter() - started)
    log(f"  1-RF: {args.max_steps} steps in {training['rf1']['seconds']:.0f} s, loss "
         f"{training['rf1']['loss_first_5pct']:.4f} → {training['rf1']['loss_last_10pct']:.4f}")

    started = time.perf_counter()
    model, losses = train_epsilon_model(copy.deepcopy(initial), task.train_data, args, udm)
    models["ddim"] = model.eval()
    training["ddim"] = training_record("ε-prediction (MSE to the noise)", args, losses, time.perf_counter() - started)
    log(f"  ε-model: {args.max_steps} steps in {training['ddim']['seconds']:.0f} s, loss "
         f"{training['ddim']['loss_first_5pct']:.4f} → {training['ddim']['loss_last_10pct']:.4f}")

    pairs, training["rf2_pairs"] = reflow_pairs(models["rf1"], config, task, config["pair_steps"], seed + 100)
    log(f"  1-RF pairs: {config['pairs']} × {training['rf2_pairs']['nfe_per_pair']} NFE in "
         f"{training['rf2_pairs']['seconds']:.0f} s")
    started = time.perf_counter()
    args = flow_arguments(config, "reflow", seed + 1)
    result = train_reflow(copy.deepcopy(models["rf1"]), pairs, args)
    models["rf2"] = result.model.eval()
    training["rf2"] = training_record("reflow (train_reflow) from 1-RF, on 1-RF's pairs", args, result.losses,
                                       time.perf_counter() - started)
    log(f"  2-RF: {args.max_steps} steps in {training['rf2']['seconds']:.0f} s, loss "
         f"{training['rf2']['loss_first_5pct']:.4f} → {training['rf2']['loss_last_10pct']:.4f}")

    pairs, training["rf2_distill_pairs"] = reflow_pairs(models["rf2"], config, task, config["distill_pair_steps"],
                                                  seed + 200)
    log(f"  2-RF pairs: {config['pairs']} × {training['rf2_distill_pairs']['nfe_per_pair']} NFE in "
         f"{training['rf2_distill_pairs']['seconds']:.0f} s")
    started = time.perf_counter()
    args = flow_arguments(config, "distill", seed + 2)
    result = distill(copy.deepcopy(models["rf2"]), pairs, args, num_steps=1)
    models["rf2_distill"] = result.model.eval()
    training["rf2_distill"] = training_record("1-step distillation (distill) from 2-RF, on 2-RF's pairs", args,
                                               result.losses, time.perf_counter() - started)
    log(f"  distill: {args.max_steps} steps in {training['rf2_distill']['seconds']:.0f} s, loss "
         f"{training['rf2_distill']['loss_first_5pct']:.4f} → {training['rf2_distill']['loss_last_10pct']:.4f}")
    return models, training


def make_schedulers(config: dict):
    """(UDMScheduler η = 0, diffusers DDIMScheduler) on the same schedule, both without clipping."""
    from diffusers import DDIMScheduler

    common = dict(config, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    return UDMScheduler(**common, eta=0.0), DDIMScheduler(**common)


@torch.no_grad()
def sample_epsilon_model(model, scheduler, noise: torch.Tensor, num_steps: int, trajectory: bool = False):
    """The pipeline loop: set_timesteps(N), then model output → scheduler.step for each timestep (η = 0)."""
    scheduler.set_timesteps(num_steps)
    sample, states = noise, [noise]
    for t in scheduler.timesteps:
        output = predict_velocity(model, sample, t.expand(sample.shape[0]))
        sample = scheduler.step(output, t, sample).prev_sample
        if trajectory:
            states.append(sample)
    return sample, (states if trajectory else None)


def ddim_check(model, config: dict, noise: torch.Tensor, steps) -> dict:
    """UDM (η = 0) against diffusers' DDIMScheduler on the same ε-model and noise, for every N of the grid."""
    udm, ddim = make_schedulers(config)
    udm_ddim_form = UDMScheduler.from_config(ddim.config, use_clipped_model_output=False, eta=0.0)
    per_steps = {}
    for num_steps in steps:
        reference, _ = sample_epsilon_model(model, ddim, noise, num_steps)
        ours, _ = sample_epsilon_model(model, udm, noise, num_steps)
        same_form, _ = sample_epsilon_model(model, udm_ddim_form, noise, num_steps)
        udm.set_timesteps(num_steps)
        ddim.set_timesteps(num_steps)
        scale = max(1.0, reference.abs().max().item())
        per_steps[num_steps] = {
            "timesteps": ddim.timesteps.tolist(),
            "timesteps_equal": bool(torch.equal(udm.timesteps, ddim.timesteps)),
            "bit_identical_udm_from_ddim_config": bool(torch.equal(same_form, reference)),
            "udm_default_max_abs_diff": (ours - reference).abs().max().item(),
            "udm_default_max_relative_diff": (ours - reference).abs().max().item() / scale,
        }
    return {
        "samples": len(noise),
        "alphas_cumprod_equal": bool(torch.equal(udm.alphas_cumprod, ddim.alphas_cumprod)),
        "per_steps": per_steps,
        "identical": all(r["timesteps_equal"] and r["bit_identical_udm_from_ddim_config"] for r in per_steps.values()),
        "udm_default_within_1e-4": all(r["udm_default_max_relative_diff"] <= 1e-4 for r in per_steps.values()),
        "definition": "identical: for every N the timesteps agree and UDMScheduler.from_config(ddim.config, "
                      "use_clipped_model_output=False) gives bit-identical samples to DDIMScheduler; "
                      "udm_default_*: the table's UDM sampler (use_clipped_model_output=True), "
                      "max |Δ| / max(1, max|x|)",
    }
