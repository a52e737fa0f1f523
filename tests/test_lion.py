"""Lion: the update against a float64 oracle, kernel equality, parity with lion_pytorch and bitsandbytes, resume."""

import copy
import math
import io
import warnings

import pytest
import torch

import hf_ext.ops.lion as lion_ops
from hf_ext.ops import native
from hf_ext.ops.lion import (lion_reference_float64, lion_update_foreach, lion_update_fused, lion_update_native,
                             lion_update_single)
from hf_ext.optim import Lion, adamw_to_lion, lion_optimizer_cls_and_kwargs

SHAPES = [(40, 37), (200,), (48, 48, 20), (7,), (1, 40000)]  # the last two exercise both sides of FUSED_MIN_NUMEL


def _tensors(param_dtype=torch.float32, state_dtype=torch.float32):
    params = [torch.randn(s).to(param_dtype) for s in SHAPES]
    grads = [torch.randn(s).to(param_dtype) for s in SHAPES]
    momenta = [(0.1 * torch.randn(s)).to(state_dtype) for s in SHAPES]
    momenta[0][0, :5] = 0  # sign(0) = 0 rows: c = 0 exactly where grad and momentum are both 0
    grads[0][0, :5] = 0
    return params, grads, momenta


@pytest.mark.smoke
def test_single_step_matches_float64_formula():
    params, grads, momenta = _tensors(torch.float64, torch.float64)
    for p, g, m in zip(params, grads, momenta):
        expected_p, expected_m = lion_reference_float64(p, g, m, 0.01, 0.9, 0.99, 0.1)
        lion_update_single(p, g, m, 0.01, 0.9, 0.99, 0.1)
        torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-15)
        torch.testing.assert_close(m, expected_m, rtol=0, atol=1e-15)


@pytest.mark.parametrize("param_dtype,state_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.smoke
def test_kernels_are_bit_identical(param_dtype, state_dtype, monkeypatch):
    base = _tensors(param_dtype, state_dtype)
    results = {}
    for name in ("single", "foreach", "fused", "fused_torch_compile"):
        # float32: "fused" is the C kernel; "fused_torch_compile" the torch.compile form that CUDA runs
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0" if name == "fused_torch_compile" else "1")
        params, grads, momenta = (list(map(torch.clone, ts)) for ts in base)
        for step in range(5):
            lr = 1e-2 * (step + 1)  # a changing learning rate must not change the fused kernel's arithmetic
            if name == "single":
                for p, g, m in zip(params, grads, momenta):
                    lion_update_single(p, g, m, lr, 0.9, 0.99, 0.1)
            else:
                (lion_update_foreach if name == "foreach" else lion_update_fused)(params, grads, momenta,
                                                                                  lr, 0.9, 0.99, 0.1)
        results[name] = params + momenta
    for name in ("foreach", "fused", "fused_torch_compile"):
        for a, b in zip(results["single"], results[name]):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_weight_decay_drives_a_constant_sign_to_its_fixed_point():
    # With a gradient of constant sign and zero momentum noise, θ_t = −(sign/λ)(1 − (1 − ηλ)^t) from θ_0 = 0.
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = Lion([param], lr=0.05, weight_decay=0.5)
    for _ in range(40):
        param.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        optimizer.step()
    expected = -torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64) / 0.5 * (1 - (1 - 0.05 * 0.5) ** 40)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 12, generator=generator), torch.randint(0, 4, (16,), generator=generator)
        x = x.to(next(model.parameters()).dtype)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _groups(model, weight_decay=0.1):
    return [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.dim() == 1], "weight_decay": 0.0}]


def _bitsandbytes_optimizers_run_on_cpu() -> bool:
    """Older bitsandbytes releases (0.48 among them) update 32-bit optimizer states with GPU kernels only."""
    import bitsandbytes

    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.ones(4)
    try:
        bitsandbytes.optim.Lion([weight], lr=1e-3, optim_bits=32).step()
    except (AssertionError, AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.smoke
@pytest.mark.parametrize("peer", ["lion_pytorch", "bitsandbytes"])
@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_trajectory_identical_to_peer_over_120_steps(peer, kernel):
    ours, theirs = _model(), _model()
    if peer == "lion_pytorch":
        from lion_pytorch import Lion as PeerLion

        peer_optimizer = PeerLion(_groups(theirs), lr=3e-3, betas=(0.9, 0.99))
    else:
        import bitsandbytes

        if not _bitsandbytes_optimizers_run_on_cpu():
            pytest.skip(f"bitsandbytes {bitsandbytes.__version__} has no CPU kernel for its 32-bit optimizers")
        peer_optimizer = bitsandbytes.optim.Lion(_groups(theirs), lr=3e-3, betas=(0.9, 0.99), optim_bits=32)
    _train(ours, Lion(_groups(ours), lr=3e-3, betas=(0.9, 0.99), **kernel), 120)
    _train(theirs, peer_optimizer, 120)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_state_is_one_momentum_per_parameter(kernel):
    # Lion's memory claim: one momentum per parameter, in the parameter's shape and dtype, and nothing else.
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    for param in params:
        param.grad = torch.randn(param.shape)
    optimizer = Lion(params, lr=1e-3, **kernel)
    optimizer.step()
    for param in params:
        tensors = {key: value for key, value in optimizer.state[param].items() if torch.is_tensor(value)}
        assert list(tensors) == ["exp_avg"]
        assert tensors["exp_avg"].shape == param.shape and tensors["exp_avg"].dtype == param.dtype


def test_parameter_groups_and_maximize():
    model = _model()
    optimizer = Lion([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=1e-2)
    before = copy.deepcopy(model)
    _train(model, optimizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), before[0].parameters()))
    assert not torch.equal(model[2].weight, before[2].weight)
    # maximize=True on g is exactly the minimising step on −g, and moves against the descent direction
    p1 = torch.randn(5, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    start = p1.detach().clone()
    o1, o2 = Lion([p1], lr=0.1, maximize=True), Lion([p2], lr=0.1)
    p1.grad, p2.grad = torch.ones(5), -torch.ones(5)
    o1.step(), o2.step()
    assert torch.equal(p1, p2) and torch.equal(p1.detach(), start + 0.1)


def test_fp32_state_keeps_the_momentum_of_bf16_parameters_exact():
    grads = [torch.randn(4096, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16) for step in range(50)]
    reference = torch.zeros(4096, dtype=torch.float64)
    for grad in grads:
        reference = 0.99 * reference + 0.01 * grad.double()
    errors = {}
    for state_dtype in (torch.float32, None):
        param = torch.randn(4096).to(torch.bfloat16).requires_grad_()
        optimizer = Lion([param], lr=1e-3, state_dtype=state_dtype)
        for grad in grads:
            param.grad = grad
            optimizer.step()
        momentum = optimizer.state[param]["exp_avg"]
        assert momentum.dtype == (state_dtype or torch.bfloat16) and param.dtype == torch.bfloat16
        errors[state_dtype] = ((momentum.double() - reference).abs().max() / reference.abs().max()).item()
    assert errors[torch.float32] < 1e-6 < 1e-3 < errors[None]


def test_bad_arguments_get_clear_errors():
    p = [torch.zeros(2, requires_grad=True)]
    for kwargs, word in [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas"),
                         ({"weight_decay": -0.1}, "weight_decay"), ({"state_dtype": torch.int8}, "state_dtype"),
                         ({"foreach": True, "fused": True}, "exclusive")]:
        with pytest.raises(ValueError, match=word):
            Lion(p, **kwargs)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = Lion(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_resume_from_state_dict_is_bit_identical(state_dtype):
    dtype = torch.float32 if state_dtype is None else torch.bfloat16
    uninterrupted = _model().to(dtype)
    _train(uninterrupted, Lion(_groups(uninterrupted), lr=3e-3, state_dtype=state_dtype), 30)

    model = _model().to(dtype)
    optimizer = Lion(_groups(model), lr=3e-3, state_dtype=state_dtype)
    _train(model, optimizer, 15)
    buffer_model, buffer_optimizer = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), buffer_model), torch.save(optimizer.state_dict(), buffer_optimizer)
    buffer_model.seek(0), buffer_optimizer.seek(0)

    resumed = _model().to(dtype)
    resumed.load_state_dict(torch.load(buffer_model, weights_only=True))
    resumed_optimizer = Lion(_groups(resumed), lr=3e-3, state_dtype=state_dtype)
    resumed_optimizer.load_state_dict(torch.load(buffer_optimizer, weights_only=True))
    momentum = next(iter(resumed_optimizer.state.values()))["exp_avg"]
    assert momentum.dtype == (state_dtype or dtype)  # torch's base class would have cast fp32 state to bf16
    _train(resumed, resumed_optimizer, 15, start=15)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_trainer_helper_respects_weight_decay_and_no_decay_groups(tmp_path):
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_config
    import hf_ext

    model = hf_ext.HfExtForCausalLM(tiny_config())
    args = TrainingArguments(tmp_path, learning_rate=3e-4, weight_decay=0.05, report_to=[], use_cpu=True)
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=lion_optimizer_cls_and_kwargs(args, fused=False))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, Lion)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.0 if ("norm" in name or "bias" in name) else 0.05
        assert decays[id(param)] == expected, name
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.99) for g in optimizer.param_groups)
    with pytest.raises(TypeError, match="TrainingArguments"):
        lion_optimizer_cls_and_kwargs({"learning_rate": 1e-3})


def test_adamw_to_lion():
    assert adamw_to_lion(3e-4, 0.01) == pytest.approx({"learning_rate": 1e-4, "weight_decay": 0.03})
    assert adamw_to_lion(1e-3, 0.1, factor=10) == pytest.approx({"learning_rate": 1e-4, "weight_decay": 1.0})
    with pytest.raises(ValueError, match="factor"):
        adamw_to_lion(1e-3, 0.1, factor=0.5)
    with pytest.raises(ValueError, match="learning_rate"):
        adamw_to_lion(-1e-3, 0.1)


def test_fused_kernel_build_failure_names_the_fallback(monkeypatch):
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")  # the torch.compile form: float32 CPU tensors take the C kernel

    def broken(*args):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(lion_ops, "_compiled_flat", broken)
    param = torch.zeros(lion_ops.FUSED_MIN_NUMEL, requires_grad=True)
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match="fused=False"):
        Lion([param], fused=True).step()


def test_dtensor_parameters_are_recognised_by_both_optimizers():
    """One `is_dtensor` (hf_ext/optim/_dtensor.py) serves Lion and GradientViewLoRA; a one-rank gloo group makes a
    real DTensor on CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from hf_ext.optim import GradientViewLoRA

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        param = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), init_device_mesh("cpu", (1,))))
        with pytest.raises(ValueError, match="DTensor"):
            Lion([param], fused=True)
        param.grad = torch.ones_like(param)
        Lion([param], lr=0.1).step()  # foreach=None falls back to the per-tensor kernel for DTensors
        with pytest.raises(TypeError, match="DTensor"):
            GradientViewLoRA([param], rank=1, base_optimizer=torch.optim.SGD, lr=0.1)
    finally:
        dist.destroy_process_group()


def _one_step(**options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p)
    Lion(params, lr=1e-2, weight_decay=0.1, **options).step()
    return [p.detach() for p in params]


def test_the_default_kernel_is_the_fused_one_with_identical_results(monkeypatch):
    calls = []
    for name in ("lion_update_fused", "lion_update_native"):  # the fused kernel, and its C form that Lion calls
        real = getattr(lion_ops, name)
        monkeypatch.setattr(f"hf_ext.optim.lion.{name}",
                            lambda *a, real=real, name=name, **k: calls.append((name, k)) or real(*a, **k))
    default = _one_step()
    # Lion(params) as users write it takes the fused kernel, in its C form (float32 on the CPU)
    assert calls == [("lion_update_native", {})]
    calls.clear()
    with native.kernels_disabled():  # and its torch.compile form where the C kernel is off
        assert all(torch.equal(a, b) for a, b in zip(default, _one_step()))
    assert calls == [("lion_update_fused", {"fallback": True, "finite": None})]
    for chosen in (dict(fused=True), dict(fused=False), dict(foreach=True), dict(foreach=False)):
        assert all(torch.equal(a, b) for a, b in zip(default, _one_step(**chosen)))
    calls.clear()
    _one_step(foreach=True)  # an explicit foreach (or fused=False) is not overridden
    _one_step(fused=False)
    assert calls == []


def test_the_default_kernel_falls_back_to_foreach_once_when_compiling_fails(monkeypatch):
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")  # the torch.compile form: float32 CPU tensors take the C kernel
    expected = _one_step(fused=False)

    def broken(*args):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(lion_ops, "_compiled_flat", broken)
    monkeypatch.setattr(lion_ops, "_compile_failure", None)
    with pytest.warns(RuntimeWarning, match="could not build the fused update kernel .*no C\\+\\+ compiler.*foreach"):
        fallen_back = _one_step()
    assert all(torch.equal(a, b) for a, b in zip(fallen_back, expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next steps neither warn again nor try to compile
        assert all(torch.equal(a, b) for a, b in zip(_one_step(), expected))
    with pytest.raises(RuntimeError, match="fused=False"):  # asked for explicitly, it raises, then as before
        _one_step(fused=True)


# ---- the C kernel (float32 on the CPU) -------------------------------------------------------------------------------

def test_the_c_kernel_is_built_here():
    """CI machines have a C compiler, as torch.compile on the CPU needs one: the fast path must not silently vanish."""
    assert lion_ops.native_kernel_available(), native.failure("lion_fp32")


@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_matches_foreach_across_chunk_boundaries(threads, monkeypatch):
    """Small chunks, so that tensors span several, end mid-chunk or are empty, and chunks of one tensor meet those of
    the next on one thread and on two."""
    monkeypatch.setattr(lion_ops, "NATIVE_CHUNK_NUMEL", 64)
    sizes = [0, 1, 63, 64, 65, 200, 7, 1000, 128]
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=generator) for n in sizes]
    grads = [torch.randn(n, generator=generator) for n in sizes]
    momenta = [0.1 * torch.randn(n, generator=generator) for n in sizes]
    grads[2][:5] = 0
    momenta[2][:5] = 0  # the interpolation is exactly 0 there: sign 0, no move
    expected = [list(map(torch.clone, ts)) for ts in (params, grads, momenta)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(4):
            lr = 1e-2 * (step + 1)
            assert lion_update_native(params, grads, momenta, lr, 0.9, 0.99, 0.1) == []
            lion_update_foreach(*expected, lr, 0.9, 0.99, 0.1)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(params + momenta, expected[0] + expected[2]))


def test_c_kernel_leaves_nonfinite_elements_unchanged_and_names_their_tensors(monkeypatch):
    monkeypatch.setattr(lion_ops, "NATIVE_CHUNK_NUMEL", 64)
    params, grads, momenta = ([torch.randn(n) for n in (300, 10, 500)] for _ in range(3))
    grads[0][130], grads[2][0], grads[2][499] = math.nan, math.inf, -math.inf
    before = [list(map(torch.clone, ts)) for ts in (params, momenta)]
    expected = [list(map(torch.clone, ts)) for ts in (params, grads, momenta)]
    for g in expected[1]:
        g[~torch.isfinite(g)] = 0
    lion_update_foreach(*expected, 0.01, 0.9, 0.99, 0.1)
    assert lion_update_native(params, grads, momenta, 0.01, 0.9, 0.99, 0.1) == [0, 2]
    for k in range(3):
        bad = ~torch.isfinite(grads[k])
        for now, old, new in ((params[k], before[0][k], expected[0][k]), (momenta[k], before[1][k], expected[2][k])):
            assert torch.equal(now[bad], old[bad]) and torch.equal(now[~bad], new[~bad])


def test_c_kernel_tells_autograd_about_the_in_place_change():
    param = torch.nn.Parameter(torch.randn(100))
    loss = (param ** 2).sum()  # saves param for the backward
    param.grad = torch.ones(100)
    Lion([param], lr=0.1, fused=True).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_a_c_compiler_lion_takes_the_torch_compile_form(monkeypatch, caplog):
    expected = _one_step(fused=False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_failures", {})
    calls = []
    real = lion_ops._compiled_update_or_foreach
    monkeypatch.setattr(lion_ops, "_compiled_update_or_foreach", lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level("INFO", logger="hf_ext.ops.native"):
        assert all(torch.equal(a, b) for a, b in zip(_one_step(), expected))
    assert calls and not lion_ops.native_kernel_available()
    assert "no C compiler found" in native.failure("lion_fp32") and "no C compiler found" in caplog.text


def test_c_kernel_refuses_tensors_of_other_sizes():
    params, grads, momenta = ([torch.zeros(n) for n in (5, 6)] for _ in range(3))
    with pytest.raises(ValueError, match=r"momenta must match params in number and size, got sizes \[5, 7\]"):
        lion_update_native(params, grads, [momenta[0], torch.zeros(7)], 0.1, 0.9, 0.99, 0.0)


def test_one_group_split_between_the_c_kernel_and_the_torch_compile_form():
    """A group mixing float32 contiguous tensors (C kernel), a transposed one and a bf16 one (torch.compile form and
    its foreach side) gives the foreach kernel's numbers, and a NaN in a tensor the C kernel does not take is still
    refused before anything changes."""
    def make():
        torch.manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(8, 6).t()),
                  torch.nn.Parameter(torch.randn(50).bfloat16()), torch.nn.Parameter(torch.randn(40000))]
        for p in params:
            p.grad = torch.randn(p.shape).to(p.dtype)
        return params

    assert not make()[1].is_contiguous()
    mixed, reference = make(), make()
    for params, options in ((mixed, {}), (reference, {"foreach": True})):
        optimizer = Lion(params, lr=0.01, weight_decay=0.1, **options)
        for _ in range(3):
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(mixed, reference))
    optimizer = Lion(mixed, lr=0.01)
    mixed[2].grad[0] = math.nan
    before = [p.detach().clone() for p in mixed]
    with pytest.raises(FloatingPointError, match=r"parameter 2 of param group 0 .*before any parameter"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(mixed, before))
