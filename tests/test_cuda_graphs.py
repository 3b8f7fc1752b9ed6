"""CUDA graphs (GPU only; benchmarks/gpu.sh runs them): every loss at the collection's
shapes is captured whole, forward and backward, in a torch.cuda.CUDAGraph, and runs under
torch.compile(mode="reduce-overhead") without a cudagraph skip; a replay gives what an eager
call gives (CRD's memory banks included, after its first call has fixed Z).

A capture fails on any host sync or host-to-device copy in the call; on the CPU,
tests/test_host_cost.py checks the same path for syncs.
"""
import copy

import pytest
import torch

from fastkd.bench import cases
from helpers import grad_leaves

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: torch sees no CUDA GPU "
                                "here (benchmarks/gpu.sh runs it on one)")

CASES = {c.name: c for c in cases.collection_cases()}
NETS = {"Sobolev", "LwM"}  # the loss differentiates a network's outputs: the network is in the step


def _setup(case, device):
    """(module, nets, inputs): the fastkd module, the case's networks (Sobolev, LwM) and its
    static inputs (for those two, the image and targets the networks read)."""
    gen = torch.Generator(device=device).manual_seed(0)
    module = case.build("fastkd", device, torch.float32)
    if case.loss not in NETS:
        return module, [], case.inputs(device, torch.float32, gen)
    b, _, size, _ = case.params["shape"]
    torch.manual_seed(1)
    nets = [cases.TinyNet(16).to(device) for _ in range(2)]
    img = torch.randn((b, 3, size, size), device=device, generator=gen).requires_grad_(case.loss == "Sobolev")
    return module, nets, (img, torch.randint(0, 10, (b,), device=device, generator=gen))


def _call(case, module, nets, inputs):
    if case.loss not in NETS:
        return module(*inputs)
    img, target = inputs
    (fm_s, out_s), (fm_t, out_t) = nets[0](img), nets[1](img)
    return module(out_s, out_t, img, target) if case.loss == "Sobolev" else module(out_s, fm_s, out_t, fm_t, target)


def _leaves(module, nets, inputs):
    return [*grad_leaves(inputs), *module.parameters(), *(p for n in nets for p in n.parameters())]


def _eager_step(case, module, nets, inputs):
    """The eager loss and gradients on copies of the inputs (the module's state changes as a
    replay changes it)."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
              else [y.detach().clone().requires_grad_(y.requires_grad) for y in x] for x in inputs]
    leaves = _leaves(module, nets, inputs)
    for x in leaves:
        x.grad = None
    loss = _call(case, module, nets, inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _assert_close(got, expected):
    (loss, grads), (loss_e, grads_e) = got, expected
    torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, grads_e):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cuda_graph_holds_forward_and_backward(name):
    case, cuda = CASES[name], torch.device("cuda")
    module, nets, inputs = _setup(case, cuda)
    leaves = _leaves(module, nets, inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            for x in leaves:
                x.grad = None
            _call(case, module, nets, inputs).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy((module, nets))
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _call(case, module, nets, inputs)
        loss.backward()
    grads = [x.grad for x in leaves]
    for _ in range(2):  # a second replay: the state a replay leaves (CRD's banks) is an eager call's
        graph.replay()
        torch.cuda.synchronize()
        _assert_close((loss.clone(), [g.clone() for g in grads]), _eager_step(case, *eager, inputs))
    if case.loss == "CRD":
        torch.testing.assert_close(module.contrast.memory_s, eager[0].contrast.memory_s)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.loss not in NETS))
def test_reduce_overhead_compiles_into_cuda_graphs(name):
    """Sobolev and LwM are left out: torch.compile does not take the double backward their
    create_graph=True needs (their reference neither)."""
    from torch._dynamo.utils import counters
    case, cuda = CASES[name], torch.device("cuda")
    module, nets, inputs = _setup(case, cuda)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, mode="reduce-overhead")
    leaves = _leaves(module, nets, inputs)
    for _ in range(4):  # CRD compiles again on its second call (Z fixed); the trees record, then replay
        eager = copy.deepcopy(module)
        for x in leaves:
            x.grad = None
        loss = compiled(*inputs)
        loss.backward()
        got = loss.detach().clone(), [x.grad.clone() for x in leaves]
        _assert_close(got, _eager_step(case, eager, [], inputs))
    assert sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)) == 0, dict(counters["inductor"])
