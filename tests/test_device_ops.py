"""The losses as PyTorch custom operators (fastkd.device_ops): torch.ops.fastkd.<op> exists
for every op with a torch and a triton path; its cpu kernel runs the torch path, its cuda
kernel the Triton one; its fake gives the result's shape and dtype; the auto backend calls
it compiled on CUDA (and, with helpers.route_through_operators, on CPU tensors: the tests
here), and a named backend still calls that backend's function directly."""
import functools

import pytest
import torch

import fastkd
from fastkd import backend, device_ops, functional
from fastkd.bench import cases
from helpers import grad_leaves, route_through_operators

CPU = torch.device("cpu")
ONE_CASE_PER_LOSS = {c.loss: c for c in reversed(cases.cases("tiny", "cpu"))}
NOT_OPERATORS = {"Sobolev", "LwM", "CRD"}  # device_ops.EXCEPTIONS' losses
WITH_OPERATORS = sorted(set(ONE_CASE_PER_LOSS) - NOT_OPERATORS)


def _both_paths():
    return sorted(op for op, impls in backend.IMPLEMENTATIONS.items() if {"torch", "triton"} <= set(impls))


def test_every_op_with_both_paths_is_an_operator_but_the_documented_exceptions():
    assert set(device_ops.EXCEPTIONS) == {"sobolev", "lwm", "crd_contrast"}
    for op in _both_paths():
        if op in device_ops.EXCEPTIONS:
            assert device_ops.operator(op) is None
            continue
        assert device_ops.operator(op) is not None and hasattr(torch.ops.fastkd, op), op
        for key in ("CPU", "CUDA", "Meta", "Autograd"):  # both devices, the fake, the gradient
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", key), (op, key)


def _inputs(case, seed=0, device=CPU):
    return case.inputs(device, torch.float32, torch.Generator(device=device).manual_seed(seed))


def _counting(monkeypatch, name):
    """Every op's `name` entry replaced by a wrapper that records the op's name."""
    calls = []
    for op, impls in backend.IMPLEMENTATIONS.items():
        if name in impls:
            def counted(*args, _op=op, _f=impls[name]):
                calls.append(_op)
                return _f(*args)
            monkeypatch.setitem(impls, name, counted)
    return calls


def _operators_called(fn):
    """The fastkd:: operators dispatched while fn runs (from the profiler's record)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fastkd::")}


def test_by_default_the_auto_backend_calls_the_operators_compiled_on_cuda_only():
    """Eagerly, and compiled on the CPU, it calls the torch path itself (module docstring)."""
    assert device_ops.OPERATOR_ROUTES == {("cuda", True)}
    case = ONE_CASE_PER_LOSS["RKD"]
    module = case.build("fastkd", CPU, torch.float32)
    inputs = _inputs(case)
    assert _operators_called(lambda: module(*inputs)) == set()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
    compiled(*inputs)
    assert _operators_called(lambda: compiled(*inputs)) == set()
    route = functools.partial(device_ops.routes, "rkd", name="triton")
    with torch.device("meta"):
        assert not route(torch.empty(0).device)
    assert not route(torch.device("cuda")) and not route(CPU)


def _assert_through_the_operator(monkeypatch, run, inputs, expected, expected_grads, kernel_backend):
    """run() dispatches the operators of the ops it computes, and their kernels run
    kernel_backend's implementations (never the other fast backend's): the loss and
    gradients expected."""
    other = {"torch": "triton", "triton": "torch"}[kernel_backend]
    kernel_calls = _counting(monkeypatch, kernel_backend)
    other_calls = _counting(monkeypatch, other)
    got = {}
    called = _operators_called(lambda: got.update(loss=run()))
    ops = sorted(set(kernel_calls))
    assert ops and other_calls == [], (kernel_calls, other_calls)
    assert called == {f"fastkd::{op}" for op in ops}
    torch.testing.assert_close(got["loss"], expected, rtol=1e-6, atol=1e-7)
    for g, e in zip(torch.autograd.grad(got["loss"], list(grad_leaves(inputs))), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", WITH_OPERATORS)
def test_auto_on_cpu_goes_through_the_operator_to_the_torch_path(loss, monkeypatch):
    route_through_operators(monkeypatch)
    case = ONE_CASE_PER_LOSS[loss]
    module = case.build("fastkd", CPU, torch.float32)
    inputs = _inputs(case)
    with fastkd.use_backend("torch"):
        expected = module(*inputs)
        expected_grads = torch.autograd.grad(expected, list(grad_leaves(inputs)))
    _assert_through_the_operator(monkeypatch, lambda: module(*inputs), inputs, expected, expected_grads, "torch")


def test_a_named_backend_calls_its_function_directly(monkeypatch):
    route_through_operators(monkeypatch)
    case = ONE_CASE_PER_LOSS["RKD"]
    module = case.build("fastkd", CPU, torch.float32)
    inputs = _inputs(case)
    for name in ("torch", "triton", "reference"):
        calls = _counting(monkeypatch, name)
        with fastkd.use_backend(name):
            assert _operators_called(lambda: module(*inputs)) == set(), name
        assert calls == ["rkd"], name
    assert _operators_called(lambda: module(*inputs)) == {"fastkd::rkd"}


def test_the_loss_s_graph_is_the_operator_s_and_no_grad_computes_no_gradient(monkeypatch):
    route_through_operators(monkeypatch)
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    loss = functional.soft_target(s, t, 4.0)
    assert "fastkd_soft_target" in type(loss.grad_fn).__name__
    op = torch.ops.fastkd.soft_target
    outputs = op(s, t, [4.0], [], "ttf", [True, False])
    assert [tuple(x.shape) for x in outputs] == [(), (6, 5), (0,)]
    torch.testing.assert_close(outputs[1], torch.autograd.grad(loss, s)[0])
    with torch.no_grad():
        assert functional.soft_target(s, t, 4.0).grad_fn is None
    assert [tuple(x.shape) for x in op(s, t, [4.0], [], "ttf", [False, False])] == [(), (0,), (0,)]


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_the_fake_gives_the_shapes_and_the_reference_s_dtype(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    context = FakeTensorMode() if device == "fake" else torch.device("meta")
    with context:
        s = torch.empty(7, 16, dtype=torch.float32)
        t = torch.empty(7, 24, dtype=torch.float64)
        loss, g_s, g_t = torch.ops.fastkd.rkd(s, t, [25.0, 50.0], [], "ttff", [True, False])
        fm = torch.empty(3, 4, 5, 5, dtype=torch.bfloat16)
        irg = torch.ops.fastkd.irg_transformation(*([fm] * 8), [], [], "(tttt)(tttt)", [True] * 8)
    assert loss.shape == () and loss.dtype == torch.float64  # the reference's promotion
    assert g_s.shape == s.shape and g_s.dtype == torch.float32 and g_t.shape == (0,)
    assert irg[0].dtype == torch.bfloat16 and all(g.shape == fm.shape for g in irg[1:])


def test_the_argument_layout_round_trips():
    from fastkd.ops import flatten, unflatten
    a, b = torch.zeros(1), torch.ones(2)
    args = ((a, b, a, b), (b, a, b, a), 2.5, 3, True, None)
    tensors, floats, ints, layout = flatten(args)
    assert layout == "(tttt)(tttt)fibn" and floats == [2.5] and ints == [3, 1]
    back = unflatten(tensors, floats, ints, layout)
    assert back[2:] == [2.5, 3, True, None] and all(x is y for x, y in zip(back[0] + back[1], args[0] + args[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled on CUDA through the operator: torch sees no "
                    "CUDA GPU here (benchmarks/gpu.sh runs it on one)")
@pytest.mark.parametrize("loss", WITH_OPERATORS)
def test_compiled_on_cuda_auto_goes_through_the_operator_to_the_triton_path(loss, monkeypatch):
    case = ONE_CASE_PER_LOSS[loss]
    cuda = torch.device("cuda")
    module = case.build("fastkd", cuda, torch.float32)
    inputs = _inputs(case, device=cuda)
    with fastkd.use_backend("triton"):
        expected = module(*inputs)
        expected_grads = torch.autograd.grad(expected, list(grad_leaves(inputs)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
    compiled(*inputs)
    _assert_through_the_operator(monkeypatch, lambda: compiled(*inputs), inputs, expected, expected_grads, "triton")


@pytest.mark.parametrize("op", sorted(device_ops.TENSOR_ARGUMENTS))
def test_second_derivative_through_the_operator_is_the_reference_s_or_refused(op, monkeypatch):
    """create_graph=True through the operator: its backward differentiates the torch path
    again (its second derivatives, or its own refusal)."""
    route_through_operators(monkeypatch)
    from test_second_order import _inputs as second_order_inputs
    leaves, need, call = second_order_inputs(op)
    auto = functools.partial(functional._call, op, CPU)
    loss = call(auto, leaves)
    assert f"fastkd_{op}" in type(loss.grad_fn).__name__
    try:
        grads = torch.autograd.grad(loss, need, create_graph=True, allow_unused=True)
        total = sum(g.sum() for g in grads if g is not None and g.requires_grad)
        fast = None if not isinstance(total, torch.Tensor) else torch.autograd.grad(
            total, need, allow_unused=True, materialize_grads=True)
    except RuntimeError as e:
        assert "first-order backward only" in str(e), f"{op}: unclear refusal: {e}"
        return
    leaves, need, call = second_order_inputs(op)
    loss = call(backend.IMPLEMENTATIONS[op]["reference"], leaves)
    grads = torch.autograd.grad(loss, need, create_graph=True, allow_unused=True)
    total = sum(g.sum() for g in grads if g is not None and g.requires_grad)
    exact = None if not isinstance(total, torch.Tensor) else torch.autograd.grad(
        total, need, allow_unused=True, materialize_grads=True)
    assert (fast is None) == (exact is None), f"{op}: second derivative dropped"
    for a, e in zip(fast or (), exact or ()):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10, msg=op)


def test_the_gradient_formula_scales_by_the_incoming_gradient_and_survives_retain_graph(monkeypatch):
    """Backward scales the kernel's dL/dx by grad_output: weighted, retained and repeated
    backwards give the torch path's gradients."""
    route_through_operators(monkeypatch)
    s, t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(6, 5, dtype=torch.float64)
    with fastkd.use_backend("torch"):
        expected, = torch.autograd.grad(functional.soft_target(s, t, 4.0), s)
    loss = functional.soft_target(s, t, 4.0)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, expected)
    s.grad.zero_()  # the gradient handed to s must not be what the retained graph reads again
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(s.grad, 2.5 * expected)
    s.grad = None
    loss.backward()
    torch.testing.assert_close(s.grad, expected)


TRITON_CALLS = {  # op -> a call of it: one op of each kernel family
    "soft_target": lambda g: ((torch.randn(6, 10, generator=g, requires_grad=True), torch.randn(6, 10, generator=g)), 4.0),
    "rkd": lambda g: ((torch.randn(7, 16, generator=g, requires_grad=True), torch.randn(7, 24, generator=g)), 25.0, 50.0),
    "at": lambda g: ((torch.randn(3, 4, 5, 5, generator=g, requires_grad=True), torch.randn(3, 4, 5, 5, generator=g)), 2.0),
}


@pytest.mark.skipif(backend.autograd is None,
                    reason="the Triton path inside the operator: triton is not installed")
@pytest.mark.parametrize("op", sorted(TRITON_CALLS))
def test_the_cuda_kernel_s_triton_path_inside_the_operator(op, monkeypatch):
    """What the cuda kernel runs (the Triton Functions and their hand-written backwards,
    under the operator's autograd), here on CPU tensors through Triton's interpreter:
    eagerly and compiled, the loss and gradients of the triton backend called directly."""
    monkeypatch.setitem(device_ops.KERNEL_BACKENDS, "cpu", "triton")
    (s, t), *rest = TRITON_CALLS[op](torch.Generator().manual_seed(0))
    with fastkd.use_backend("triton"):
        expected = backend.IMPLEMENTATIONS[op]["triton"](s, t, *rest)
        expected_grad, = torch.autograd.grad(expected, s)
    triton_calls = _counting(monkeypatch, "triton")
    torch._dynamo.reset()
    def call(a, b):
        return device_ops.call(op, a, b, *rest)
    for fn in (call, torch.compile(call, fullgraph=True, backend="aot_eager")):
        loss = fn(s, t)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(loss, s)[0], expected_grad, rtol=1e-6, atol=1e-7)
    assert triton_calls == [op, op]
