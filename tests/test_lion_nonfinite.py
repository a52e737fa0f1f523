"""Lion and non-finite gradients, on every kernel: "skip" changes nothing; "raise" changes nothing where the gradients
are checked first, and with the C kernel (which checks while it updates) leaves exactly the non-finite elements
unchanged; the check is exact; the torch.compile path reads one value on the host per step in "raise" mode and none
in "skip" mode.

The sync counts use `_host_sync_detector.HostSyncDetector` on the CPU. Compiled functions cannot run inside a
TorchDispatchMode (dynamo skips the frame), so the `outside_modes` fixture runs Lion's compiled update with the mode
suspended: it is built with ``fullgraph=True`` and no scalar capture, so its code cannot read a tensor value on the
host, and everything around it stays watched.
"""

import copy
import math
import warnings

import pytest
import torch
from _host_sync_detector import HostSyncDetector
from torch.utils._python_dispatch import _disable_current_modes

import hf_ext.ops.lion as lion_ops
import hf_ext.optim._step_checks as step_checks
from hf_ext.optim import _step_checks
from hf_ext.optim import Lion

NAN, INF = math.nan, math.inf
# (name, Lion options, whether the fused kernel may use its C form): fused=True, the default choice (fused), the
# fused kernel's torch.compile form (what CUDA runs), foreach, per tensor
KERNELS = [("fused", {"fused": True}, True), ("default", {}, True), ("torch_compile", {"fused": True}, False),
           ("foreach", {"foreach": True}, True), ("per_tensor", {"foreach": False}, True)]
CHECKED_IN_THE_UPDATE = {"fused", "default"}  # float32 CPU tensors, "raise": the C kernel checks as it updates
BIG = (256, 160)  # 40960 elements: the compiled kernels; (7,) and (3, 5) take the foreach side of the fused path
assert BIG[0] * BIG[1] >= lion_ops.FUSED_MIN_NUMEL


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(BIG)), torch.nn.Parameter(torch.randn(7)),
            torch.nn.Parameter(torch.randn(3, 5))]


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "weight_decay": 0.0}]


def _set_grads(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(optimizer, params, snapshot):
    weights, state = snapshot
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    now = optimizer.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        assert torch.equal(now["state"][index]["exp_avg"], entry["exp_avg"])


def _reference_after(steps):
    """Parameters after `steps` finite steps of the per-tensor kernel (the trajectory every kernel must follow)."""
    params = _params()
    optimizer = Lion(_groups(params), lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(steps):
        _set_grads(params, step)
        optimizer.step()
    return [p.detach().clone() for p in params]


def _use_c_kernel(monkeypatch, allowed: bool) -> None:
    monkeypatch.setenv("HF_EXT_NATIVE_KERNELS", "1" if allowed else "0")


@pytest.fixture
def outside_modes(monkeypatch):
    """Run Lion's compiled update with any TorchDispatchMode suspended (see the module docstring); counts its calls."""
    _use_c_kernel(monkeypatch, False)  # these tests watch the torch.compile path, the one CUDA takes
    update = lion_ops._compiled_update()
    calls = []

    def suspended(*args):
        calls.append(args[0].numel())
        with _disable_current_modes():
            return update(*args)

    monkeypatch.setattr(lion_ops, "_compiled_flat", suspended)
    return calls


class _QueuedEvent:
    """What `copy_done_event` gives on CUDA, under the test's control: done only once `finish()` is called."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def finish(self):
        self.done = True


@pytest.fixture
def queued_copies(monkeypatch):
    """The device-to-host copies of the skip flags take their CUDA form: they land when the test says so."""
    events = []

    def record(device):
        events.append(_QueuedEvent())
        return events[-1]

    monkeypatch.setattr(step_checks, "copy_done_event", record)
    return events


# ---- "raise" and "skip" keep non-finite values out, on every kernel ------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS, ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("where", [0, 1, 2])  # the compiled side, the foreach side, the second group
def test_raise_keeps_nonfinite_values_out_and_names_the_parameter(kernel, bad, where, monkeypatch):
    name, options, c_kernel = kernel
    _use_c_kernel(monkeypatch, c_kernel)
    params = _params()
    optimizer = Lion(_groups(params), lr=0.1, weight_decay=0.1, **options)
    _set_grads(params, 0)
    optimizer.step()
    _set_grads(params, 1)
    params[where].grad.view(-1)[-1] = bad  # the last element: the tail of a vectorised loop
    snapshot = _snapshot(optimizer, params)
    group, index = (0, where) if where < 2 else (1, 0)
    shape = tuple(params[where].shape)
    after = ("The elements whose gradient is not finite kept their parameter and state values; every other element "
             "took this step" if name in CHECKED_IN_THE_UPDATE else "before any parameter or state changed")
    with pytest.raises(FloatingPointError, match=rf"^Lion: the gradient of parameter {index} of param group {group} "
                                                 rf"\(shape {re_shape(shape)}\) is not finite .*{after}"):
        optimizer.step()
    if name not in CHECKED_IN_THE_UPDATE:
        _assert_unchanged(optimizer, params, snapshot)
        _set_grads(params, 1)
        optimizer.step()
        assert all(torch.equal(p, r) for p, r in zip(params, _reference_after(2)))
        return
    # the C kernel: every element took the step the foreach kernel takes, except the one whose gradient is bad
    weights, state = snapshot
    momenta = [state["state"][k]["exp_avg"].clone() for k in range(len(params))]
    expected = [w.clone() for w in weights]
    grads = [p.grad.clone() for p in params]
    grads[where].view(-1)[-1] = 0.0
    # the groups of `_groups`: parameters 0 and 1 with lr 0.1 and weight decay 0.1, parameter 2 with 0.05 and 0
    for chosen, lr, weight_decay in (([0, 1], 0.1, 0.1), ([2], 0.05, 0.0)):
        lion_ops.lion_update_foreach([expected[k] for k in chosen], [grads[k] for k in chosen],
                                     [momenta[k] for k in chosen], lr, 0.9, 0.99, weight_decay)
    expected[where].view(-1)[-1] = weights[where].view(-1)[-1]
    momenta[where].view(-1)[-1] = state["state"][where]["exp_avg"].view(-1)[-1]
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, momenta))


@pytest.mark.parametrize("kernel", KERNELS, ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_skip_warns_changes_nothing_and_trains_on_exactly(kernel, where, monkeypatch):
    _, options, c_kernel = kernel
    _use_c_kernel(monkeypatch, c_kernel)
    params = _params()
    optimizer = Lion(_groups(params), lr=0.1, weight_decay=0.1, nonfinite_grads="skip", **options)
    _set_grads(params, 0)
    optimizer.step()
    group, index = (0, where) if where < 2 else (1, 0)
    for bad in (INF, -INF, NAN):  # +inf then -inf would make an unmasked momentum inf - inf = NaN
        _set_grads(params, 1)
        params[where].grad.view(-1)[3] = bad
        snapshot = _snapshot(optimizer, params)
        with pytest.warns(RuntimeWarning, match=rf"^Lion: skipped a step \(no parameter or state changed\): the "
                                                rf"gradient of parameter {index} of param group {group} \(shape "
                                                rf"{re_shape(tuple(params[where].shape))}\) is not finite"):
            optimizer.step()
        _assert_unchanged(optimizer, params, snapshot)
    _set_grads(params, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert all(torch.equal(p, r) for p, r in zip(params, _reference_after(2)))


def re_shape(shape):
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_finite_steps_are_identical_on_every_kernel_and_mode(mode, monkeypatch):
    reference = _reference_after(4)
    for name, options, c_kernel in KERNELS:
        _use_c_kernel(monkeypatch, c_kernel)
        params = _params()
        optimizer = Lion(_groups(params), lr=0.1, weight_decay=0.1, nonfinite_grads=mode, **options)
        for step in range(4):
            _set_grads(params, step)
            optimizer.step()
        assert all(torch.equal(p, r) for p, r in zip(params, reference)), name


# ---- the compiled check and the masked kernels ---------------------------------------------------------------------

@pytest.fixture(params=["cpu", "cuda_route"])
def finite_flags(request):
    """`finite_flags` as the CPU computes it, and the multi-tensor form CUDA uses, run here on the CPU."""
    return _step_checks.finite_flags if request.param == "cpu" else _step_checks._flags_from_max_magnitudes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_flags_are_exact(dtype, finite_flags):
    sizes = [lion_ops.FUSED_MIN_NUMEL + 7, 100_003, 33, 5]
    big = {torch.float16: 60000.0, torch.float64: 1e305}.get(dtype, 1e36)  # finite; their sum and norm overflow
    grads = [torch.full((n,), big, dtype=dtype) for n in sizes]
    assert not torch.isfinite(grads[1].sum()) and not torch.isfinite(torch.linalg.vector_norm(grads[1]))
    assert finite_flags(grads).tolist() == [True] * 4
    for where in (0.0, 0.001, 0.5, 0.77, 1.0):  # first, near the start, the middle (threads split there), last
        for k, n in enumerate(sizes):
            for bad in (NAN, INF, -INF):
                poisoned = [g.clone() for g in grads]
                poisoned[k][round(where * (n - 1))] = bad
                flags = finite_flags(poisoned)
                assert flags.dtype == torch.bool and flags.tolist() == [j != k for j in range(4)], (k, where, bad)
    strided = torch.zeros(2 * lion_ops.FUSED_MIN_NUMEL, dtype=dtype)[::2]
    strided[-1] = NAN
    assert finite_flags([strided, grads[0], torch.zeros(0, dtype=dtype)]).tolist() == [False, True, True]


def test_finite_flags_of_mixed_dtypes_and_complex_gradients(finite_flags):
    grads = [torch.ones(3, dtype=torch.float16), torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.cfloat)]
    assert finite_flags(grads).tolist() == [True] * 3
    grads[0][1], grads[2][2] = INF, complex(1.0, NAN)
    assert finite_flags(grads).tolist() == [False, True, False]


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("c_kernel", [True, False])
def test_masked_fused_kernel_is_the_plain_one_or_nothing(param_dtype, state_dtype, c_kernel, monkeypatch):
    _use_c_kernel(monkeypatch, c_kernel)
    torch.manual_seed(1)
    shapes = [(1, 40000), (7,), (48, 48, 20)]
    base = ([torch.randn(s).to(param_dtype) for s in shapes], [torch.randn(s).to(param_dtype) for s in shapes],
            [(0.1 * torch.randn(s)).to(state_dtype) for s in shapes])
    results = {}
    for finite in (None, True, False):
        params, grads, momenta = (list(map(torch.clone, ts)) for ts in base)
        flag = None if finite is None else torch.tensor(finite)
        lion_ops.lion_update_fused(params, grads, momenta, 0.01, 0.9, 0.99, 0.1, finite=flag)
        results[finite] = params + momenta
    foreach = [list(map(torch.clone, ts)) for ts in base]
    lion_ops.lion_update_foreach(*foreach, 0.01, 0.9, 0.99, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(results[None], foreach[0] + foreach[2]))
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[None]))
    assert all(torch.equal(a, b) for a, b in zip(results[False], base[0] + base[2]))
    masked = [list(map(torch.clone, ts)) for ts in base]  # the foreach kernel's masked form
    lion_ops.lion_update_foreach(*masked, 0.01, 0.9, 0.99, 0.1, finite=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(masked[0] + masked[2], base[0] + base[2]))


# ---- host syncs of the fused path ----------------------------------------------------------------------------------

def test_fused_raise_mode_reads_exactly_one_value_per_step(outside_modes):
    params = _params()
    optimizer = Lion(_groups(params), lr=0.1, fused=True)
    for step in range(3):
        _set_grads(params, step)
        with HostSyncDetector(raise_on_sync=False) as detector:
            optimizer.step()
        assert len(detector.events) == 1 and "_local_scalar_dense" in detector.events[0][0], detector.events
        assert "hf_ext/optim/_step_checks.py" in detector.events[0][1]
    assert outside_modes == [BIG[0] * BIG[1]] * 3  # the compiled kernel ran, on the large tensor


def test_fused_skip_mode_makes_no_host_sync_and_reports_when_the_flags_land(outside_modes, queued_copies):
    params = _params()
    optimizer = Lion(_groups(params), lr=0.1, weight_decay=0.1, nonfinite_grads="skip", fused=True)
    _set_grads(params, 0)
    with HostSyncDetector(), warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # finite
        _set_grads(params, 1)
        params[0].grad[5, 5] = INF
        snapshot = _snapshot(optimizer, params)
        optimizer.step()  # skipped, and not reported yet: its flags are still "on the device"
    _assert_unchanged(optimizer, params, snapshot)
    assert len(queued_copies) == 2 and outside_modes == [BIG[0] * BIG[1]] * 2
    queued_copies[1].finish()  # the skipped step's copy has landed, but the one before it has not: reports keep order
    _set_grads(params, 1)
    with HostSyncDetector(), warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # the third step, finite
    for event in queued_copies:
        event.finish()
    _set_grads(params, 2)
    with pytest.warns(RuntimeWarning, match=r"^Lion: skipped a step \(no parameter or state changed\): the gradient "
                                            r"of parameter 0 of param group 0 \(shape \(256, 160\)\) is not finite "
                                            r"\(NaN or inf\).*That was step\(\) call 2, reported once the device had "
                                            r"run it$") as caught:
        optimizer.step()  # the fourth step reports the second (once) and steps
    assert len(caught) == 1
    assert all(torch.equal(p, r) for p, r in zip(params, _reference_after(3)))


def test_fused_skip_mode_warns_in_the_step_itself_on_the_cpu():
    params = _params()
    optimizer = Lion(params, lr=0.1, nonfinite_grads="skip")
    _set_grads(params, 0)
    params[1].grad[0] = NAN
    with pytest.warns(RuntimeWarning, match=r"parameter 1 of param group 0 \(shape \(7,\)\) is not finite \(NaN or "
                                            r"inf\); the loss"):
        optimizer.step()
    # a skipped first step leaves the momentum at zero, which is what the first real step starts from
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, [q.detach() for q in _params()]))
    assert all(not optimizer.state[p]["exp_avg"].any() for p in params)


def test_a_deep_copy_keeps_the_mode_and_steps():
    params = _params()
    optimizer = copy.deepcopy(Lion(params, lr=0.1, nonfinite_grads="skip"))
    assert optimizer.nonfinite_grads == "skip"
    _set_grads(optimizer.param_groups[0]["params"], 0)
    optimizer.param_groups[0]["params"][0].grad[0, 0] = NAN
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        optimizer.step()
