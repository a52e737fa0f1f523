"""Bad input to the flow trainers and the schedulers fails loudly (ValueError naming the argument, the value and what
is allowed), and valid input behaves exactly as before."""

import copy
import math
import re
import textwrap
import warnings

import pytest
import torch

from benchmarks.tasks.toy2d import VelocityMLP, eight_gaussians
from hf_ext.diffusion import (FlowTrainingArguments, ReflowPairs, distill, generate_reflow_pairs, rectified_flow_loss,
                              solve_flow, train_rectified_flow, train_reflow)
from hf_ext.diffusion.training import _learning_rate_factor, _step_seed
from hf_ext.schedulers import ReFlowScheduler, UDMScheduler
from torchrun import torchrun

QUIET = dict(show_progress=False)
NAN, INF = float("nan"), float("inf")


def _parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- case 1: FlowTrainingArguments and the counts of the flow functions ---------------------------------------------
def test_negative_max_grad_norm_is_refused_and_none_or_zero_still_mean_no_clipping():
    with pytest.raises(ValueError, match=re.escape(
            "max_grad_norm must be a finite number >= 0 or None (None or 0: no clipping), got -1")):
        FlowTrainingArguments(max_grad_norm=-1)
    FlowTrainingArguments(max_grad_norm=None)
    FlowTrainingArguments(max_grad_norm=0)


@pytest.mark.parametrize("name, value, message", [
    ("learning_rate", NAN, "learning_rate must be a finite number > 0, got nan"),
    ("learning_rate", INF, "learning_rate must be a finite number > 0, got inf"),
    ("max_grad_norm", NAN, "max_grad_norm must be a finite number >= 0 or None (None or 0: no clipping), got nan"),
    ("max_grad_norm", INF, "max_grad_norm must be a finite number >= 0 or None (None or 0: no clipping), got inf"),
    ("weight_decay", NAN, "weight_decay must be a finite number >= 0, got nan"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0, got -0.1"),
    ("num_train_timesteps", NAN, "num_train_timesteps must be an integer, got nan"),
    ("num_train_timesteps", 1000.0, "num_train_timesteps must be an integer, got 1000.0"),
    ("max_steps", 2.5, "max_steps must be an integer, got 2.5"),
    ("batch_size", 2.0, "batch_size must be an integer, got 2.0"),
    ("warmup_steps", 1.5, "warmup_steps must be an integer, got 1.5"),
    ("save_steps", INF, "save_steps must be an integer, got inf"),
    ("logging_steps", True, "logging_steps must be an integer, got True"),
    ("seed", 0.5, "seed must be an integer, got 0.5"),
    ("save_total_limit", -1, "save_total_limit must be an integer >= 0 or None (None or 0: keep every checkpoint), "
                             "got -1"),
    ("nonfinite_loss", "ignore", "nonfinite_loss must be one of 'raise', 'skip', got 'ignore'"),
])
def test_training_arguments_refuse_non_finite_numbers_and_non_integer_counts(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FlowTrainingArguments(**{name: value})


def test_counts_of_the_flow_functions_must_be_integers():
    model = VelocityMLP(hidden_size=8, num_layers=1)
    pairs = ReflowPairs(torch.randn(4, 2), torch.randn(4, 2))
    cases = [
        (lambda: generate_reflow_pairs(model, 2.5, (2,), **QUIET), "num_pairs must be an integer >= 1, got 2.5"),
        (lambda: generate_reflow_pairs(model, 4, (2,), batch_size=2.5, **QUIET),
         "batch_size must be an integer >= 1, got 2.5"),
        (lambda: generate_reflow_pairs(model, 4, (2,), num_inference_steps=4.0, **QUIET),
         "num_inference_steps must be an integer >= 1, got 4.0"),
        (lambda: generate_reflow_pairs(model, 4, (2,), seed=NAN, **QUIET), "seed must be an integer, got nan"),
        (lambda: solve_flow(model, torch.randn(4, 2), 2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
        (lambda: solve_flow(model, torch.randn(4, 2), 2, batch_size=0),
         "batch_size must be an integer >= 1 or None, got 0"),
        (lambda: distill(model, pairs, FlowTrainingArguments(max_steps=1, **QUIET), num_steps=1.5),
         "num_steps must be an integer, got 1.5"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


# ---- case 2: integer data, misaligned model output ------------------------------------------------------------------
def test_integer_dataset_is_refused_with_its_dtype():
    message = ("dataset holds torch.int64 samples; rectified flow needs floating-point data (its noise is Gaussian): "
               "convert it with .float()")
    args = FlowTrainingArguments(max_steps=1, batch_size=4, **QUIET)
    with pytest.raises(ValueError, match=re.escape(message)):
        train_rectified_flow(VelocityMLP(hidden_size=8), torch.arange(20).reshape(10, 2), args)
    with pytest.raises(ValueError, match=re.escape(message)):  # an indexable dataset of integer items
        train_rectified_flow(VelocityMLP(hidden_size=8), [{"sample": torch.tensor([i, i])} for i in range(10)], args)


def test_integer_pairs_are_refused():
    message = ("noise and samples must be floating-point tensors, got torch.float32 and torch.int64: convert them "
               "with .float()")
    with pytest.raises(ValueError, match=re.escape(message)):
        ReflowPairs(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(message)):  # a (noise, samples) tuple goes the same way
        train_reflow(VelocityMLP(hidden_size=8), (torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int64)),
                     FlowTrainingArguments(max_steps=1, **QUIET))


def test_model_output_of_another_shape_than_the_sample_is_refused():
    def one_channel(sample, timesteps):  # broadcasts against the [batch, 2] target: a silently misaligned loss
        return sample[:, :1]

    message = ("the model's output has shape (8, 1) but the sample has shape (8, 2): a velocity model must return one "
               "value per sample value")
    data, noise = torch.randn(8, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match=re.escape(message)):
        rectified_flow_loss(one_channel, data, noise, torch.rand(8))
    with pytest.raises(ValueError, match=re.escape(message)):
        solve_flow(one_channel, noise, 2)


# ---- case 3: a non-finite loss ---------------------------------------------------------------------------------------
def _data_with_one_nan(size=64, index=5):
    data = eight_gaussians(size, generator=torch.Generator().manual_seed(0))
    data[index, 0] = NAN
    return data


def test_a_nan_sample_stops_training_before_it_reaches_the_weights():
    model = VelocityMLP(hidden_size=8, num_layers=1)
    before = _parameters(model)
    args = FlowTrainingArguments(max_steps=5, batch_size=64, **QUIET)  # step 1 draws the NaN sample (64 of 64)
    with pytest.raises(FloatingPointError, match=re.escape(
            "step 1 of 5: the loss is nan (non-finite), likely a NaN or inf in the data (or a diverging run); "
            "no update was made. Check the data with torch.isfinite, or pass nonfinite_loss='skip' to skip such "
            "batches")):
        train_rectified_flow(model, _data_with_one_nan(), args)
    assert torch.equal(_parameters(model), before)


def test_skip_leaves_out_the_batches_with_a_non_finite_loss_and_warns_for_each():
    model = VelocityMLP(hidden_size=8, num_layers=1)
    args = FlowTrainingArguments(max_steps=30, batch_size=8, nonfinite_loss="skip", **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_rectified_flow(model, _data_with_one_nan(), args)
    skipped = [step + 1 for step, loss in enumerate(result.losses) if not math.isfinite(loss)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert 0 < len(skipped) < 30
    assert messages == [f"step {n} of 30: the loss is nan (non-finite), likely a NaN or inf in the data (or a "
                        "diverging run); skipped this batch's update (nonfinite_loss='skip')" for n in skipped]
    assert torch.isfinite(_parameters(result.model)).all()
    assert len(result.losses) == 30


def test_valid_training_is_unchanged_step_by_step():
    """The loop replayed by hand (AdamW, clipping, warm-up and decay): the same weights and losses, bit for bit."""
    data = eight_gaussians(256, generator=torch.Generator().manual_seed(0)).double()
    args = FlowTrainingArguments(max_steps=4, batch_size=16, learning_rate=1e-2, warmup_steps=1,
                                 lr_scheduler_type="linear", max_grad_norm=0.5, **QUIET)
    torch.manual_seed(0)
    reference = VelocityMLP(hidden_size=16, num_layers=1).double()
    trained = train_rectified_flow(copy.deepcopy(reference), data, args)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(args, step))
    losses = []
    for step in range(args.max_steps):
        generator = torch.Generator().manual_seed(_step_seed(args.seed, step, 0))
        batch = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator).double()
        loss = rectified_flow_loss(reference, batch, noise, torch.rand(args.batch_size, generator=generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert trained.losses == losses
    assert torch.equal(_parameters(trained.model), _parameters(reference))


DDP_SCRIPT = textwrap.dedent('''
    """Two ranks, one NaN sample drawn by one rank at a time: both skip the same steps and stay identical."""
    import json, math, os, sys, warnings
    import torch
    import torch.distributed as dist
    from benchmarks.tasks.toy2d import VelocityMLP, eight_gaussians
    from hf_ext.diffusion import FlowTrainingArguments, train_rectified_flow
    from hf_ext.diffusion.training import _step_seed

    data = eight_gaussians(64, generator=torch.Generator().manual_seed(0)).double()
    data[5, 0] = float("nan")
    args = FlowTrainingArguments(max_steps=12, batch_size=4, nonfinite_loss="skip", max_grad_norm=None,
                                 show_progress=False)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_rectified_flow(VelocityMLP(hidden_size=8, num_layers=1).double(), data, args)
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    warned = [str(w.message).split(" of ")[0] for w in caught if issubclass(w.category, RuntimeWarning)]
    all_warned = [None, None]
    dist.all_gather_object(all_warned, warned)
    if dist.get_rank() == 0:
        drawn = []  # per step: which ranks drew the NaN sample
        for step in range(args.max_steps):
            ranks = [p for p in (0, 1) if 5 in torch.randint(64, (4,), generator=torch.Generator().manual_seed(
                _step_seed(args.seed, step, p))).tolist()]
            drawn.append(ranks)
        json.dump({"ranks_identical": bool(torch.equal(gathered[0], gathered[1])),
                   "finite": bool(torch.isfinite(flat).all()),
                   "warned": all_warned,
                   "expected": [f"step {s + 1}" for s, ranks in enumerate(drawn) if ranks],
                   "one_rank_only": sum(len(ranks) == 1 for ranks in drawn)}, open(sys.argv[2], "w"))
    dist.barrier()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
''')


def test_with_several_processes_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    script = tmp_path / "nan_ranks.py"
    script.write_text(DDP_SCRIPT)
    result = torchrun(str(script), "skip", tmp_path)
    assert result["one_rank_only"] >= 1  # the case that needs agreement: only one rank sees the NaN
    assert result["warned"] == [result["expected"], result["expected"]]
    assert result["ranks_identical"] and result["finite"]


# ---- case 4: schedulers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(shift=NAN), "shift must be a finite number > 0, got nan"),
    (dict(shift=INF), "shift must be a finite number > 0, got inf"),
    (dict(shift=0.0), "shift must be a finite number > 0, got 0.0"),
    (dict(num_train_timesteps=1000.5), "num_train_timesteps must be an integer >= 1, got 1000.5"),
    (dict(base_shift=NAN), "base_shift must be a finite number or None, got nan"),
    (dict(max_shift=INF), "max_shift must be a finite number or None, got inf"),
    (dict(base_image_seq_len=0), "base_image_seq_len must be an integer >= 1 or None, got 0"),
    (dict(max_image_seq_len=4096.5), "max_image_seq_len must be an integer >= 1 or None, got 4096.5"),
    (dict(shift_terminal=NAN), "shift_terminal must be a finite number in [0, 1) or None, got nan"),
])
def test_reflow_scheduler_refuses_non_finite_or_out_of_range_numbers(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ReFlowScheduler(**kwargs)


def test_reflow_set_shift_refuses_nan():
    with pytest.raises(ValueError, match=re.escape("shift must be a finite number > 0, got nan")):
        ReFlowScheduler().set_shift(NAN)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigmas=[]), "sigmas is empty: pass at least one value"),
    (dict(timesteps=[]), "timesteps is empty: pass at least one value"),
    (dict(sigmas=[1.0, 0.5, 0.8]), "sigmas must be strictly decreasing (from noise towards data), got sigmas[2] = 0.8 "
                                   "after sigmas[1] = 0.5"),
    (dict(sigmas=[1.0, 0.5, 0.5]), "sigmas must be strictly decreasing (from noise towards data), got sigmas[2] = 0.5 "
                                   "after sigmas[1] = 0.5"),
    (dict(timesteps=[200.0, 800.0]), "timesteps must be strictly decreasing (from noise towards data), got "
                                     "timesteps[1] = 800 after timesteps[0] = 200"),
    (dict(sigmas=[1.0, NAN, 0.2]), "sigmas must be finite, got sigmas[1] = nan"),
    (dict(sigmas=[1.0, 0.5], timesteps=[1000.0, NAN]), "timesteps must be finite, got timesteps[1] = nan"),
    (dict(sigmas=[1.0, 0.5], timesteps=[500.0, 1000.0]), "timesteps must be strictly decreasing (from noise towards "
                                                         "data), got timesteps[1] = 1000 after timesteps[0] = 500"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
])
def test_reflow_set_timesteps_names_the_bad_argument_and_position(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ReFlowScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta=NAN), "eta must be in [0, 1] (0 = DDIM, 1 = DDPM), got nan"),
    (dict(num_train_timesteps=10.5), "num_train_timesteps must be an integer >= 1, got 10.5"),
    (dict(beta_start=NAN), "beta_start must be a finite number >= 0, got nan"),
    (dict(beta_end=INF), "beta_end must be a finite number >= 0, got inf"),
    (dict(clip_sample_range=NAN), "clip_sample_range must be a finite number > 0, got nan"),
    (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio must be a finite number in [0, 1], got 1.5"),
    (dict(sample_max_value=0.0), "sample_max_value must be a finite number > 0, got 0.0"),
    (dict(steps_offset=0.5), "steps_offset must be an integer >= 0, got 0.5"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, NAN, 0.3]), "trained_betas must be finite numbers in [0, 1], "
                                                                  "got trained_betas[1] = nan"),
])
def test_udm_scheduler_refuses_non_finite_or_out_of_range_numbers(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        UDMScheduler(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer, got 2.5"),
    (dict(timesteps=[900.0, NAN, 100.0]), "timesteps must be finite, got timesteps[1] = nan"),
    (dict(timesteps=[900.0, 100.0, 500.0]), "timesteps must be strictly decreasing (from noise towards data), got "
                                            "timesteps[2] = 500 after timesteps[1] = 100"),
    (dict(timesteps=[]), "timesteps is empty: pass at least one value"),
])
def test_udm_set_timesteps_names_the_bad_argument_and_position(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        UDMScheduler(time_type="continuous").set_timesteps(**kwargs)
