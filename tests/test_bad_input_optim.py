"""Bad input to the optimizers fails loudly: non-finite gradients and hyper-parameters, foreign state dicts, unknown
keywords (Lion, GradientViewLoRA, their Trainer helpers, adamw_to_lion, GradientViewLoraConfig)."""

import copy
import math
import types
import warnings

import pytest
import torch

from hf_ext.optim import (GradientViewLoRA, Lion, adamw_to_lion, gradient_view_optimizer_cls_and_kwargs,
                          lion_optimizer_cls_and_kwargs)

NAN, INF = math.nan, math.inf
KERNELS = [{"foreach": False}, {"foreach": True}]  # the check runs before any kernel is chosen


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def _snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def _same(a, b) -> bool:
    """Equal state dicts: the same keys and values, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def _assert_unchanged(optimizer, params, snapshot):
    weights, state = snapshot
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert _same(optimizer.state_dict(), state)


def _lion_after_one_step(**options):
    """A Lion over `_params()` that has taken one finite step, so its momentum exists."""
    params = _params()
    optimizer = Lion(params, lr=0.1, **options)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return params, optimizer


# -- Lion: non-finite gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_lion_nonfinite_gradient_raises_before_changing_anything(kernel, bad):
    params, optimizer = _lion_after_one_step(**kernel)
    params[1].grad = torch.tensor([1.0, bad, 1.0])
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(FloatingPointError, match=r"^Lion: the gradient of parameter 1 of param group 0 \(shape "
                                                 r"\(3,\)\) is not finite \(NaN or inf\).*before any parameter or "
                                                 r"state changed.*clip.*nonfinite_grads=\"skip\""):
        optimizer.step()
    _assert_unchanged(optimizer, params, snapshot)


@pytest.mark.parametrize("kernel", [*KERNELS, {}])
def test_lion_nonfinite_gradient_on_the_first_step_leaves_the_start_intact(kernel):
    """Checked first (foreach, per tensor): no state is created. Checked in the update (the default's C kernel on
    float32 CPU tensors): the momentum exists, all zeros, which is what the first real step starts from anyway."""
    params = _params()
    start = [p.detach().clone() for p in params]
    optimizer = Lion(params, lr=0.1, **kernel)
    params[0].grad = torch.full((4, 3), NAN)
    with pytest.raises(FloatingPointError, match="parameter 0 of param group 0"):
        optimizer.step()
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    if kernel:
        assert len(optimizer.state) == 0
    else:
        assert [p for p in params if p in optimizer.state] == params[:1]
        assert not optimizer.state[params[0]]["exp_avg"].any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_lion_skip_mode_skips_plus_then_minus_inf_with_a_warning_and_trains_on(kernel):
    """+inf then -inf would make the momentum inf - inf = NaN, which freezes the tensor for ever; "skip" drops both
    steps whole and the next finite step moves every weight by exactly lr."""
    params, optimizer = _lion_after_one_step(nonfinite_grads="skip", **kernel)
    for bad in (INF, -INF):
        params[0].grad = torch.full((4, 3), 1.0).index_fill_(0, torch.tensor([2]), bad)
        snapshot = _snapshot(optimizer, params)
        with pytest.warns(RuntimeWarning, match=r"^Lion: skipped a step \(no parameter or state changed\): the "
                                                r"gradient of parameter 0 of param group 0 \(shape \(4, 3\)\) is not "
                                                r"finite"):
            optimizer.step()
        _assert_unchanged(optimizer, params, snapshot)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.1, rtol=0, atol=1e-6)
        assert torch.isfinite(optimizer.state[p]["exp_avg"]).all()


def test_lion_maximize_and_several_groups_are_checked_too():
    params = _params()
    optimizer = Lion([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], lr=0.1, maximize=True)
    params[0].grad = torch.ones(4, 3)
    params[1].grad = torch.tensor([0.0, 0.0, NAN])
    with pytest.raises(FloatingPointError, match=r"parameter 0 of param group 1 \(shape \(3,\)\)"):
        optimizer.step()


@pytest.mark.parametrize("dtype, value", [(torch.float16, 300.0), (torch.float32, 1e20)])
def test_lion_steps_on_finite_gradients_whose_norm_overflows(dtype, value):
    """The fast check is a norm, which overflows for large finite values (fp16 beyond 65504): those tensors are then
    checked value by value, and the step goes on."""
    param = torch.nn.Parameter(torch.zeros(100_000, dtype=dtype))
    param.grad = torch.full_like(param, value)
    assert not torch.isfinite(torch.linalg.vector_norm(param.grad))
    Lion([param], lr=0.1).step()
    assert torch.all(param == -0.1)


# -- Lion: hyper-parameters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"lr": NAN}, "lr must be a finite number >= 0, got nan"),
    ({"lr": INF}, "lr must be a finite number >= 0, got inf"),
    ({"lr": -1e-3}, "lr must be a finite number >= 0, got -0.001"),
    ({"lr": torch.tensor(1e-3)}, "lr must be a Python number"),
    ({"weight_decay": NAN}, "weight_decay must be a finite number >= 0, got nan"),
    ({"weight_decay": INF}, "weight_decay must be a finite number >= 0, got inf"),
    ({"betas": (NAN, 0.99)}, r"betas\[0\] must be a finite number in \[0, 1\), got nan"),
    ({"betas": (0.9, INF)}, r"betas\[1\] must be a finite number in \[0, 1\), got inf"),
    ({"betas": (-0.1, 0.99)}, r"betas\[0\] must be a finite number in \[0, 1\), got -0.1"),
    ({"nonfinite_grads": "ignore"}, "nonfinite_grads must be one of 'raise', 'skip', got 'ignore'"),
])
def test_lion_refuses_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lion(_params(), **kwargs)


def test_lion_refuses_a_bad_group_value_at_construction_and_at_step():
    params = _params()
    with pytest.raises(ValueError, match=r"Lion param_groups\[1\]\['lr'\] must be a finite number >= 0, got nan"):
        Lion([{"params": [params[0]]}, {"params": [params[1]], "lr": NAN}])
    optimizer = Lion(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    snapshot = _snapshot(optimizer, params)
    for key, value in (("lr", NAN), ("lr", INF), ("weight_decay", NAN)):
        optimizer.param_groups[0][key] = value  # a scheduler (or the caller) set it after construction
        with pytest.raises(ValueError, match=rf"Lion param_groups\[0\]\['{key}'\] must be a finite number >= 0"):
            optimizer.step()
        optimizer.param_groups[0].update(lr=0.1, weight_decay=0.0)
        _assert_unchanged(optimizer, params, snapshot)


# -- Lion: foreign state dicts -------------------------------------------------------------------------------------

def test_lion_refuses_an_adamw_state_dict():
    params = _params()
    adamw = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    optimizer = Lion(params)
    with pytest.raises(ValueError, match=r"^Lion.load_state_dict: not a Lion state dict: the state of parameter 0 "
                                         r"has keys \['exp_avg', 'exp_avg_sq', 'step'\]; Lion's has exactly "
                                         r"\['exp_avg'\]"):
        optimizer.load_state_dict(adamw.state_dict())
    assert len(optimizer.state) == 0
    with pytest.raises(ValueError, match=r"not a Lion state dict: param group 0 lacks Lion's options "
                                         r"\['state_dtype'\]"):
        optimizer.load_state_dict(torch.optim.AdamW(params, lr=1e-3).state_dict())  # never stepped: no state yet
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    sgd.step()
    state = sgd.state_dict()
    state["param_groups"][0].update(Lion(params).param_groups[0] | {"params": state["param_groups"][0]["params"]})
    with pytest.raises(ValueError, match=r"has keys \['momentum_buffer'\]; Lion's has exactly \['exp_avg'\]"):
        optimizer.load_state_dict(state)


def test_lion_refuses_a_state_dict_of_another_shape_before_loading_it():
    """Parameters in another order (or of another model) would give the fused kernel a momentum of the wrong size,
    which its C form, reading raw memory, must never see; the load is refused with nothing loaded."""
    params, optimizer = _lion_after_one_step()
    state = optimizer.state_dict()
    swapped = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))]
    other = Lion(swapped, lr=0.1)
    with pytest.raises(ValueError, match=r"^Lion.load_state_dict: the momentum of parameter 0 has shape \(4, 3\), "
                                         r"but the parameter has shape \(3,\)"):
        other.load_state_dict(state)
    assert len(other.state) == 0


# -- adamw_to_lion and the Lion Trainer helper ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ((NAN, 0.01), "learning_rate must be a finite number >= 0, got nan"),
    ((INF, 0.01), "learning_rate must be a finite number >= 0, got inf"),
    ((1e-3, NAN), "weight_decay must be a finite number >= 0, got nan"),
    ((1e-3, 0.01, NAN), r"factor must be a finite number in \[1, 30\] \(the Lion paper uses 3-10\), got nan"),
    ((1e-3, 0.01, INF), r"factor must be a finite number in \[1, 30\]"),
])
def test_adamw_to_lion_refuses_nonfinite_numbers(args, message):
    with pytest.raises(ValueError, match=message):
        adamw_to_lion(*args)


def test_lion_trainer_helper_validates_through_the_same_checks():
    args = types.SimpleNamespace(learning_rate=NAN, weight_decay=0.0)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        lion_optimizer_cls_and_kwargs(args)
    with pytest.raises(ValueError, match=r"weight_decay \(TrainingArguments\) must be a finite number >= 0, got inf"):
        lion_optimizer_cls_and_kwargs(types.SimpleNamespace(learning_rate=1e-3, weight_decay=INF))
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0, 1\), got nan"):
        lion_optimizer_cls_and_kwargs(types.SimpleNamespace(learning_rate=1e-3, weight_decay=0.0), betas=(0.9, NAN))
    cls, kwargs = lion_optimizer_cls_and_kwargs(types.SimpleNamespace(learning_rate=1e-3, weight_decay=0.0),
                                                nonfinite_grads="skip")
    assert cls(_params(), **kwargs).nonfinite_grads == "skip"
    with pytest.raises(ValueError, match="nonfinite_grads must be one of"):
        lion_optimizer_cls_and_kwargs(types.SimpleNamespace(learning_rate=1e-3, weight_decay=0.0),
                                      nonfinite_grads="zero")


# -- GradientViewLoRA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"scaling": NAN}, "scaling must be a finite number > 0"),
    ({"scaling": INF}, "scaling must be a finite number > 0"),
    ({"scaling": 0.0}, r"scaling must be a finite number > 0 \(the low-rank term is scaling·B A.*\), got 0.0"),
    ({"scaling": -1.0}, "scaling must be a finite number > 0"),
    ({"lr": NAN}, "lr must be a finite number >= 0, got nan"),
    ({"lr": -1e-3}, "lr must be a finite number >= 0, got -0.001"),
    ({"lr": INF}, "lr must be a finite number >= 0, got inf"),
    ({"weight_decay": NAN}, "weight_decay must be a finite number >= 0, got nan"),
    ({"nonfinite_grads": "zero"}, "nonfinite_grads must be one of 'raise', 'skip', got 'zero'"),
    ({"resample_every": True}, "resample_every must be an integer >= 1, got True"),
    ({"bogus": 1}, r"^GradientViewLoRA: unknown keyword argument\(s\) \['bogus'\] for base_optimizer AdamW, which "
                   r"accepts \[.*'lr'.*'weight_decay'.*\]; GradientViewLoRA's own are \['base_optimizer', 'mode', "
                   r"'nonfinite_grads', 'rank', 'resample_every', 'scaling', 'seed'\]"),
    ({"base_optimizer": torch.optim.SGD, "betas": (0.9, 0.99)}, r"\['betas'\] for base_optimizer SGD"),
])
def test_gradient_view_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientViewLoRA([torch.nn.Parameter(torch.randn(4, 3))], **{"rank": 2, "lr": 1e-3, **kwargs})


def _gradient_view(rank=2, mode="lora", **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    return model, GradientViewLoRA(model.parameters(), rank=rank, mode=mode, lr=1e-2, **kwargs)


def _backward(model, poison=None):
    model(torch.randn(3, 6, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
    if poison is not None:
        model[2].weight.grad[1, 3] = poison


@pytest.mark.parametrize("mode", ["lora", "resample"])
def test_gradient_view_nonfinite_gradient_raises_before_setting_factor_gradients(mode):
    model, optimizer = _gradient_view(mode=mode)
    _backward(model)
    optimizer.step()
    optimizer.zero_grad()
    _backward(model, poison=NAN)
    params = list(model.parameters())
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(FloatingPointError, match=r"^GradientViewLoRA: the gradient of parameter 2 of param group 0 "
                                                 r"\(shape \(4, 5\)\) is not finite"):
        optimizer.step()
    _assert_unchanged(optimizer, params, snapshot)
    assert all(t.grad is None for state in optimizer.state.values() for t in state.values())
    assert optimizer.steps == 1


def test_gradient_view_skip_mode_skips_the_step_with_a_warning():
    model, optimizer = _gradient_view(mode="resample", resample_every=2, nonfinite_grads="skip")
    _backward(model)
    optimizer.step()
    optimizer.zero_grad()
    params = list(model.parameters())
    snapshot = _snapshot(optimizer, params)
    _backward(model, poison=-INF)
    with pytest.warns(RuntimeWarning, match=r"^GradientViewLoRA: skipped a step \(no parameter or state changed\)"):
        optimizer.step()
    _assert_unchanged(optimizer, params, snapshot)
    assert optimizer.steps == 1  # the resampling schedule counts only the steps taken
    optimizer.zero_grad()
    _backward(model)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()) and optimizer.steps == 2


def test_gradient_view_refuses_a_bad_lr_set_after_construction():
    model, optimizer = _gradient_view()
    _backward(model)
    optimizer.param_groups[0]["lr"] = NAN
    with pytest.raises(ValueError, match=r"GradientViewLoRA param_groups\[0\]\['lr'\] must be a finite number >= 0"):
        optimizer.step()


@pytest.mark.parametrize("saved, loading, message", [
    ({"rank": 3}, {"rank": 2}, r"saved with rank=3, mode='lora' but this optimizer has rank=2, mode='lora'"),
    ({"mode": "fixed_a"}, {"mode": "lora"}, r"saved with rank=2, mode='fixed_a' but this optimizer has rank=2, "
                                            r"mode='lora'"),
])
def test_gradient_view_refuses_a_state_saved_with_another_rank_or_mode(saved, loading, message):
    model, optimizer = _gradient_view(**saved)
    _backward(model)
    optimizer.step()
    state = optimizer.state_dict()
    _, other = _gradient_view(**loading)
    with pytest.raises(ValueError, match=rf"^GradientViewLoRA.load_state_dict: the state was {message}"):
        other.load_state_dict(state)
    # a state dict saved before rank and mode were recorded: the rank is read off the factors
    del state["rank"], state["mode"]
    if "rank" in saved:
        with pytest.raises(ValueError, match="saved with rank=3"):
            other.load_state_dict(state)


def test_gradient_view_trainer_helper_validates_through_the_same_checks():
    args = types.SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    with pytest.raises(ValueError, match="scaling must be a finite number > 0 .*got nan"):
        gradient_view_optimizer_cls_and_kwargs(args, rank=2, scaling=NAN)
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['bogus'\]"):
        gradient_view_optimizer_cls_and_kwargs(args, rank=2, bogus=1)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        gradient_view_optimizer_cls_and_kwargs(types.SimpleNamespace(**{**vars(args), "learning_rate": NAN}), rank=2)
    cls, kwargs = gradient_view_optimizer_cls_and_kwargs(args, rank=2, nonfinite_grads="skip")
    assert cls([torch.nn.Parameter(torch.randn(4, 3))], **kwargs).nonfinite_grads == "skip"


# -- GradientViewLoraConfig ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"lora_alpha": NAN}, r"lora_alpha must be a finite number > 0 \(scaling = lora_alpha / r\), got nan"),
    ({"lora_alpha": INF}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
    ({"resample_every": True}, "resample_every must be an integer >= 1, got True"),
    ({"resample_every": 0}, "resample_every must be an integer >= 1, got 0"),
    ({"r": True}, "r must be a positive int, got True"),
])
def test_gradient_view_config_refuses_bad_fields(fields, message):
    from hf_ext.peft import GradientViewLoraConfig

    with pytest.raises(ValueError, match=message):
        GradientViewLoraConfig(target_modules=["q_proj"], **fields)
