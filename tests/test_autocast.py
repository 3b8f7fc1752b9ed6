"""Every loss under torch.autocast, forward and backward, on both fast backends: on the CPU
in bfloat16, and on CUDA in float16 and bfloat16 where there is a GPU (benchmarks/gpu.sh).
The result has the dtype the reference's result has under autocast, and the loss and
gradients are within 10x the reference's own error there (both measured against the
reference without autocast, in float64 where the inputs allow)."""
import pytest
import torch

import fastkd
from fastkd.bench import cases
from helpers import grad_leaves, route_through_operators

CPU = torch.device("cpu")
ONE_CASE_PER_LOSS = {c.loss: c for c in reversed(cases.cases("tiny", "cpu"))}
NEEDS_THE_NETWORK = {"Sobolev", "LwM"}  # their inputs come out of a network's graph


def _to64(inputs):
    return [type(x)(_to64(x)) if isinstance(x, (tuple, list)) else
            x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
            and x.is_floating_point() else x for x in inputs]


def _run(case, impl, backend, autocast, wide=False, device=CPU, low=torch.bfloat16, compiled=False):
    """(loss, gradients) of a fresh module on fresh inputs (seed 0), autocast to low; with
    compiled, the module called through torch.compile(fullgraph=True)."""
    dtype = torch.float64 if wide else torch.float32
    inputs = case.inputs(device, torch.float32, torch.Generator(device=device).manual_seed(0))
    if wide:
        inputs = _to64(inputs)
    module = case.build(impl, device, dtype)
    call = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager") if compiled else module
    with fastkd.use_backend(backend), torch.autocast(device.type, dtype=low, enabled=autocast):
        loss = call(*inputs)
    grads = torch.autograd.grad(loss, list(grad_leaves(inputs)), allow_unused=True, materialize_grads=True)
    return loss, grads


def _error(got, exact):
    loss, grads = got
    loss_e, grads_e = exact
    # Relative, but not to a loss that is zero up to float32 rounding (LwM's tiny case: 7e-9).
    errs = [abs(loss.double() - loss_e.double()).item() / max(abs(loss_e.double()).item(), 1e-3)]
    for g, g_e in zip(grads, grads_e):
        errs.append(((g.double() - g_e.double()).norm() / g_e.double().norm().clamp_min(1e-30)).item())
    return errs


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast on CUDA: torch sees no CUDA GPU here "
                          "(benchmarks/gpu.sh runs it on one)")
SETTINGS = [pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
            pytest.param("cuda", torch.float16, id="cuda-float16", marks=CUDA),
            pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=CUDA)]


@pytest.mark.parametrize("device,low", SETTINGS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", sorted(ONE_CASE_PER_LOSS))
def test_autocast_gives_the_reference_dtype_and_error(loss, backend, device, low):
    case = ONE_CASE_PER_LOSS[loss]
    device = torch.device(device)
    exact = _run(case, "reference", "reference", autocast=False, wide=loss not in NEEDS_THE_NETWORK,
                 device=device)
    expected = _run(case, "reference", "reference", autocast=True, device=device, low=low)
    got = _run(case, "fastkd", backend, autocast=True, device=device, low=low)
    assert got[0].dtype == expected[0].dtype
    for err, err_ref in zip(_error(got, exact), _error(expected, exact)):
        # A floor of a few float32 ulps: where the reference is exact to float32, so are we.
        assert err <= 10 * err_ref + 1e-5, (err, err_ref)


@pytest.mark.parametrize("backend", ["auto", "operators"])
@pytest.mark.parametrize("loss", sorted(set(ONE_CASE_PER_LOSS) - NEEDS_THE_NETWORK - {"CRD"}))
def test_compiled_under_autocast_gives_the_reference_dtype_and_error(loss, backend, monkeypatch):
    """The same, torch.compile(fullgraph=True) called inside the autocast block: the auto
    backend there calls fastkd.device_ops' operators (a traced torch path's backward would be
    traced with autocast on: NST's bmm in bfloat16, 7e-3 off where the reference is 3e-7);
    "operators" routes every call through them."""
    if backend == "operators":
        route_through_operators(monkeypatch)
    case = ONE_CASE_PER_LOSS[loss]
    exact = _run(case, "reference", "reference", autocast=False, wide=True)
    expected = _run(case, "reference", "reference", autocast=True)
    torch._dynamo.reset()
    got = _run(case, "fastkd", "auto" if backend == "operators" else backend, autocast=True, compiled=True)
    assert got[0].dtype == expected[0].dtype
    for err, err_ref in zip(_error(got, exact), _error(expected, exact)):
        assert err <= 10 * err_ref + 1e-5, (err, err_ref)
