"""torch.compile and torch.export of the losses, on the auto backend and both fast backends.

torch.compile(fullgraph=True) of a call of each loss: no graph break, the eager loss and
gradients, and no recompilation on the next call with new inputs of the same shapes. Three
ways a loss compiles on CPU tensors: "torch", the torch path traced (what the auto backend
does on the CPU); "operators", the auto backend through fastkd.device_ops' operators (what
it does on CUDA, where their kernels run the Triton path; here their cpu kernels run the
torch path); "triton", fastkd.ops' per-Function operators (here through the interpreter). "aot_eager" runs TorchDynamo and AOTAutograd (fake tensors,
the operators' fake and autograd formulas) without generating code; one test per backend
goes through inductor too.

Sobolev and LwM differentiate the network's outputs with respect to its input inside the
loss (torch.autograd.grad, create_graph=True), which TorchDynamo does not trace: compiled,
they run with graph breaks, as the reference does.
"""
import pytest
import torch

import fastkd
from fastkd.bench import cases
from helpers import grad_leaves, route_through_operators

CPU = torch.device("cpu")
ONE_CASE_PER_LOSS = {c.loss: c for c in reversed(cases.cases("tiny", "cpu"))}
NEEDS_THE_NETWORK = {"Sobolev", "LwM"}  # torch.autograd.grad inside the loss
STATEFUL = {"CRD"}  # its memory banks change with every call, and Z with the first
WHOLE_GRAPH = sorted(set(ONE_CASE_PER_LOSS) - NEEDS_THE_NETWORK - STATEFUL)


def _inputs(case, seed, device=CPU):
    return case.inputs(device, torch.float32, torch.Generator(device=device).manual_seed(seed))


def _loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, list(grad_leaves(inputs)), allow_unused=True,
                                              materialize_grads=True)


BACKENDS = ["operators", "torch", "triton"]


def _use(backend, monkeypatch):
    """use_backend(backend), "operators" being the auto backend through the operators."""
    if backend == "operators":
        route_through_operators(monkeypatch)
        return fastkd.use_backend("auto")
    return fastkd.use_backend(backend)


def _assert_same(got, expected, rtol=1e-5, atol=1e-7):
    (loss, grads), (loss_e, grads_e) = got, expected
    torch.testing.assert_close(loss, loss_e, rtol=rtol, atol=atol)
    assert len(grads) == len(grads_e)
    for g, g_e in zip(grads, grads_e):
        torch.testing.assert_close(g, g_e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", WHOLE_GRAPH)
def test_fullgraph_compile_gives_the_eager_loss_and_does_not_recompile(loss, backend, monkeypatch):
    case = ONE_CASE_PER_LOSS[loss]
    module = case.build("fastkd", CPU, torch.float32)
    torch._dynamo.reset()
    with _use(backend, monkeypatch):
        compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
        for seed in (0, 1):
            inputs = _inputs(case, seed)
            if seed == 1:  # same shapes: the graph of the first call serves
                with torch.compiler.set_stance("fail_on_recompile"):
                    got = _loss_and_grads(compiled, inputs)
            else:
                got = _loss_and_grads(compiled, inputs)
            _assert_same(got, _loss_and_grads(module, inputs))


def _batch(loss, n, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"features": ((n, 16), (n, 24)), "logits": ((n, 10), (n, 10)), "maps": ((n, 8, 4, 4), (n, 8, 4, 4))}
    kind = ("features" if loss in ("RKD", "SP", "PKTCosSim", "CC") else
            "logits" if loss in ("Logits", "SoftTarget", "DML", "BSS") else "maps")
    (s, t) = shapes[kind]
    return torch.randn(s, generator=g, requires_grad=True), torch.randn(t, generator=g)


DYNAMIC = {"RKD": (25.0, 50.0), "SP": (), "PKTCosSim": (), "CC": (0.4, 2), "Logits": (), "SoftTarget": (4.0,),
           "DML": (), "BSS": (2.0,), "AT": (2.0,), "Hint": (), "NST": (), "FT": (), "AB": (1.0,)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(DYNAMIC))
def test_a_new_batch_size_compiles_once_with_a_dynamic_batch(loss, backend, monkeypatch):
    """torch.compile's default: a second batch size recompiles with the batch dynamic, and
    later sizes reuse that graph (RKD's torch path: those with as many blocks of anchors,
    test_rkd_compiles_once_per_number_of_anchor_blocks)."""
    module = getattr(fastkd, loss)(*DYNAMIC[loss])
    torch._dynamo.reset()
    with _use(backend, monkeypatch):
        compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
        for n in (5, 13):
            compiled(*_batch(loss, n, n)).backward()
        inputs = _batch(loss, 21, 21)
        with torch.compiler.set_stance("fail_on_recompile"):
            got = _loss_and_grads(compiled, inputs)
        _assert_same(got, _loss_and_grads(module, inputs))


def test_rkd_compiles_once_per_number_of_anchor_blocks():
    """RKD's torch path reads its N^3 angles in blocks of 2^20 (one block up to N = 101):
    with the batch dynamic, a graph serves every N with the same number of blocks, and is
    exact (float64) at every one."""
    module = fastkd.RKD(25.0, 50.0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
    with fastkd.use_backend("torch"):
        for n, stance in ((5, "default"), (13, "default"), (101, "fail_on_recompile"), (102, "default"),
                          (110, "fail_on_recompile")):
            g = torch.Generator().manual_seed(n)
            s = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
            t = torch.randn(n, 24, generator=g, dtype=torch.float64)
            with torch.compiler.set_stance(stance):
                got = _loss_and_grads(compiled, (s, t))
            _assert_same(got, _loss_and_grads(module, (s, t)), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fullgraph compile on CUDA: torch sees no CUDA GPU here "
                    "(benchmarks/gpu.sh runs it on one)")
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("loss", WHOLE_GRAPH)
def test_fullgraph_compile_on_cuda(loss, backend):
    """The custom operators over the Triton kernels compiled for the GPU (auto: the losses'
    fastkd.device_ops operators; triton: fastkd.ops' per-Function ones); inductor on the
    two losses of the inductor test below (a minute of code generation for all would not
    fit gpu.sh's time)."""
    case = ONE_CASE_PER_LOSS[loss]
    cuda = torch.device("cuda")
    module = case.build("fastkd", cuda, torch.float32)
    torch._dynamo.reset()
    with fastkd.use_backend(backend):
        compiled = torch.compile(lambda *x: module(*x), fullgraph=True,
                                 backend="inductor" if loss in ("RKD", "SoftTarget") else "aot_eager")
        for seed in (0, 1):
            inputs = _inputs(case, seed, cuda)
            with torch.compiler.set_stance("fail_on_recompile" if seed else "default"):
                got = _loss_and_grads(compiled, inputs)
            # Inductor's fused torch code sums in another order than eager's kernels.
            _assert_same(got, _loss_and_grads(module, inputs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiles_a_pairwise_and_a_logit_loss(backend, monkeypatch):
    for loss in ("RKD", "SoftTarget"):
        case = ONE_CASE_PER_LOSS[loss]
        module = case.build("fastkd", CPU, torch.float32)
        torch._dynamo.reset()
        with _use(backend, monkeypatch):
            compiled = torch.compile(lambda *x: module(*x), fullgraph=True)
            inputs = _inputs(case, 0)
            _assert_same(_loss_and_grads(compiled, inputs), _loss_and_grads(module, inputs))


@pytest.mark.parametrize("loss", sorted(NEEDS_THE_NETWORK))
def test_losses_of_input_gradients_compile_with_graph_breaks(loss):
    case = ONE_CASE_PER_LOSS[loss]
    module = case.build("fastkd", CPU, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: module(*x), backend="aot_eager")
    _assert_same(_loss_and_grads(compiled, _inputs(case, 0)), _loss_and_grads(module, _inputs(case, 0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", WHOLE_GRAPH)
def test_export_gives_the_eager_loss(loss, backend, monkeypatch):
    case = ONE_CASE_PER_LOSS[loss]
    module = case.build("fastkd", CPU, torch.float32)
    inputs = tuple(_inputs(case, 0))
    with _use(backend, monkeypatch):
        exported = torch.export.export(module, inputs)
        torch.testing.assert_close(exported.module()(*inputs), module(*inputs), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.export on CUDA: torch sees no CUDA GPU here "
                    "(benchmarks/gpu.sh runs it on one)")
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("loss", WHOLE_GRAPH)
def test_export_on_cuda(loss, backend):
    """torch.export of the custom operators over the Triton kernels, run on the GPU; the
    auto backend's graph (the losses' device-keyed operators) on the CPU too."""
    case = ONE_CASE_PER_LOSS[loss]
    cuda = torch.device("cuda")
    module = case.build("fastkd", cuda, torch.float32)
    inputs = tuple(_inputs(case, 0, cuda))
    with fastkd.use_backend(backend):
        exported = torch.export.export(module, inputs)
        torch.testing.assert_close(exported.module()(*inputs), module(*inputs), rtol=1e-5, atol=1e-7)
    if backend == "auto":  # the dispatcher runs the operators' cpu kernels (the torch path)
        on_cpu = tuple(x.cpu() for x in inputs)
        torch.testing.assert_close(exported.module().cpu()(*on_cpu), module.cpu()(*on_cpu), rtol=1e-5, atol=1e-7)


def test_a_compiled_call_follows_use_backend():
    """The backend is read while tracing and guarded: another backend recompiles for it."""
    case = ONE_CASE_PER_LOSS["RKD"]
    module = case.build("fastkd", CPU, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
    inputs = _inputs(case, 0)
    with fastkd.use_backend("torch"):
        compiled(*inputs)
    with fastkd.use_backend("reference"), torch.compiler.set_stance("fail_on_recompile"):
        with pytest.raises(RuntimeError, match="recompil"):
            compiled(*inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_crd_compiles_whole_and_keeps_its_state_as_eagerly(backend):
    """The first call fixes Z (one graph), later calls read it (a second graph, then no
    more); the compiled module's losses, gradients, banks and Z follow the eager twin's."""
    import copy
    case = ONE_CASE_PER_LOSS["CRD"]
    module = case.build("fastkd", CPU, torch.float32)
    twin = copy.deepcopy(module)
    torch._dynamo.reset()
    with fastkd.use_backend(backend):
        compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
        for call in range(3):
            inputs = _inputs(case, call)
            stance = "fail_on_recompile" if call == 2 else "default"
            with torch.compiler.set_stance(stance):
                got = _loss_and_grads(compiled, inputs)
            _assert_same(got, _loss_and_grads(twin, inputs))
            for (name, a), (_, b) in zip(module.state_dict().items(), twin.state_dict().items()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_crd_compiles_where_is_exporting_reads_true_under_compile():
    """TorchDynamo before torch 2.13 traced torch.compiler.is_exporting() as True under
    torch.compile too (seen on the GPU machine's torch 2.11): CRD's first compiled call must
    not take that for an export."""
    from unittest import mock
    case = ONE_CASE_PER_LOSS["CRD"]
    module = case.build("fastkd", CPU, torch.float32)
    torch._dynamo.reset()
    with mock.patch.object(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling()):
        compiled = torch.compile(lambda *x: module(*x), fullgraph=True, backend="aot_eager")
        compiled(*_inputs(case, 0)).backward()
    assert module.contrast.Z_s is not None


def test_crd_exports_once_its_normalisers_are_fixed():
    import copy
    case = ONE_CASE_PER_LOSS["CRD"]
    module = case.build("fastkd", CPU, torch.float32)
    inputs = tuple(_inputs(case, 0))
    with pytest.raises(RuntimeError, match="call it once"):
        torch.export.export(module, inputs)
    assert module.contrast.Z_s is None  # the refused export changed nothing
    module(*inputs)
    twin = copy.deepcopy(module)
    exported = torch.export.export(module, inputs)
    torch.testing.assert_close(exported.module()(*inputs), twin(*inputs), rtol=1e-6, atol=1e-7)
