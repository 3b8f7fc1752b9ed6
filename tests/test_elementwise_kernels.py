"""Hint, Logits, AB, FT, OFD, VID, AFD, Sobolev and LwM: the Triton kernels (through the
interpreter on CPU) and the torch CPU path against fastkd.reference, loss and gradients of
every input that requires grad (learned alpha and rho included) under a random upstream
gradient."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
import fastkd.autograd as fa
from fastkd.kernels import elementwise as ew
from fastkd import functional as FF
from fastkd import reference as R
from helpers import TOLERANCE, assert_close, assert_within_reference_error

LAYOUTS = ("contiguous", "channels_last", "strided")
SCALES = (1.0, 1.0, 0.0, 1e3, 1e-3)


def make_map(g, shape, layout, scale, offset=0.0):
    """A float64 (B, C, H, W) map in the given memory layout, values scale * N(offset, 1)."""
    B, C, H, W = shape
    if layout == "strided":  # every other channel of a larger map: a non-contiguous view
        return ((torch.randn(B, 2 * C, H, W, generator=g, dtype=torch.float64) + offset) * scale)[:, ::2]
    x = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + offset) * scale
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _rho(g, B, C):
    rho = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.1
    return rho / rho.sum(1, keepdim=True)


# op -> (functional, reference, inputs(g, shape, layouts, scales) -> (tensors, extra args),
#        indices of the tensors that get gradients)
OPS = {
    "hint": (FF.hint, R.fitnet.hint,
             lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1])], ()), (0, 1)),
    "logits": (FF.logits, R.logits.logits,
               lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0])[:, :, 0, 0],
                                       make_map(g, sh, ly[1], sc[1])[:, :, 0, 0]], ()), (0, 1)),
    "ab": (FF.ab, R.ab.ab,
           lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1])],
                                  (float(torch.rand((), generator=g) * 2),)), (0,)),
    "ft": (FF.ft, R.ft.ft,
           lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1])], ()), (0, 1)),
    "ofd": (FF.ofd, R.ofd.ofd,
            lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1], offset=-0.3)], ()),
            (0, 1)),
    "vid": (FF.vid, R.vid.vid,
            lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1]),
                                    torch.randn(sh[1], generator=g, dtype=torch.float64) * 2], (1e-6,)),
            (0, 1, 2)),
    "afd": (FF.afd, R.afd.afd,
            lambda g, sh, ly, sc: ([make_map(g, sh, ly[0], sc[0]), make_map(g, sh, ly[1], sc[1]),
                                    _rho(g, sh[0], sh[1])], (1e-6,)), (0, 1, 2)),
}


@st.composite
def cases(draw, max_c=7, max_hw=6):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_c)), draw(st.integers(1, max_hw)),
             draw(st.integers(1, max_hw)))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(2)]
    scales = [draw(st.sampled_from(SCALES)) for _ in range(2)]
    return draw(st.integers(0, 2 ** 31)), shape, layouts, scales


def loss_and_grads(fn, tensors, extra, need, upstream, backend=None):
    xs = [x.detach().clone().requires_grad_(i in need) for i, x in enumerate(tensors)]
    if backend is None:
        loss = fn(*xs, *extra)
    else:
        with fastkd.use_backend(backend):
            loss = fn(*xs, *extra)
    return loss, torch.autograd.grad(loss, [xs[i] for i in need], upstream.to(loss.dtype))


def check_against_reference(op, case, backend):
    fn, ref, make, need = OPS[op]
    seed, shape, layouts, scales = case
    if op == "ft" and shape[1] * shape[2] * shape[3] == 1:
        # One value per sample: normalize gives +-1, the exact gradient is 0 and a result
        # can only be compared by its rounding noise. Two values per sample instead.
        shape = (shape[0], 2, 1, 1)
    g = torch.Generator().manual_seed(seed)
    tensors, extra = make(g, shape, layouts, scales)
    upstream = torch.randn((), generator=g, dtype=torch.float64)
    loss, grads = loss_and_grads(fn, tensors, extra, need, upstream, backend)
    ref_loss, ref_grads = loss_and_grads(ref, tensors, extra, need, upstream)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, msg=f"{op} loss fp64")
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert_close(a, r, msg=f"{op} grad {need[i]} fp64")
    # fp32: no further from the fp64 answer than 10x the reference's own fp32 error.
    t32 = [x.float() for x in tensors]
    loss32, grads32 = loss_and_grads(fn, t32, extra, need, upstream, backend)
    ref_loss32, ref_grads32 = loss_and_grads(ref, t32, extra, need, upstream)
    assert loss32.dtype == torch.float32
    assert_within_reference_error(loss32, ref_loss32, ref_loss, msg=f"{op} loss fp32")
    for i, (a, r, e) in enumerate(zip(grads32, ref_grads32, ref_grads)):
        assert_within_reference_error(a, r, e, msg=f"{op} grad {need[i]} fp32")


@pytest.mark.parametrize("op", sorted(OPS))
@settings(max_examples=15)
@given(case=cases())
def test_triton_matches_reference(op, case):
    check_against_reference(op, case, "triton")


@pytest.mark.parametrize("op", sorted(OPS))
@given(case=cases(max_c=24, max_hw=12))
def test_torch_path_matches_reference(op, case):
    check_against_reference(op, case, "torch")


@pytest.mark.parametrize("op", ["hint", "ab", "ft", "ofd", "vid", "afd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(op, dtype):
    fn, ref, make, need = OPS[op]
    g = torch.Generator().manual_seed(3)
    tensors, extra = make(g, (2, 5, 6, 6), ("contiguous", "contiguous"), (1.0, 1.0))
    low = [x.to(dtype) if i < 2 else x.float() for i, x in enumerate(tensors)]  # alpha, rho stay fp32
    upstream = torch.tensor(0.7, dtype=torch.float64)
    loss, grads = loss_and_grads(fn, low, extra, need, upstream, "triton")
    ref_loss, _ = loss_and_grads(ref, low, extra, need, upstream)
    exact, exact_grads = loss_and_grads(ref, [x.to(dtype).double() for x in low], extra, need, upstream)
    assert loss.dtype == ref_loss.dtype
    assert_close(loss, exact, dtype=dtype)
    for a, x, e in zip(grads, [low[i] for i in need], exact_grads):
        assert a.dtype == x.dtype
        torch.testing.assert_close(a.double(), e, rtol=TOLERANCE[dtype]["rtol"],
                                   atol=TOLERANCE[dtype]["atol"] * e.abs().max().item())


def test_gradcheck():
    g = torch.Generator().manual_seed(0)

    def rand(*shape, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).requires_grad_()

    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    s, t = rand(2, 3, 2, 2), rand(2, 3, 2, 2)
    assert check(fa.MSEFunction.apply, (s, t))
    assert check(lambda a: fa.ABFunction.apply(a, t, 0.3), (s,))
    assert check(lambda a, b: fa.NormalizedRowsFunction.apply(a, b, True), (s, t))
    assert check(lambda a, b: fa.NormalizedRowsFunction.apply(a, b, False), (s, t))
    assert check(fa.OFDFunction.apply, (s, rand(2, 3, 2, 2, offset=-0.5)))
    assert check(lambda a, b, c: fa.VIDFunction.apply(a, b, c, 1e-6), (s, t, rand(3)))
    rho = torch.rand(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert check(lambda a, b, c: fa.AFDFunction.apply(a, b, c, 1e-6), (s, t, rho))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors: every output must be fully written."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", nan_empty)


def check_triton_on(op, seed, shape, layouts, scales, upstream):
    """The op's Triton loss and gradients against the reference, float64, on one draw."""
    fn, ref, make, need = OPS[op]
    tensors, extra = make(torch.Generator().manual_seed(seed), shape, layouts, scales)
    upstream = torch.tensor(upstream, dtype=torch.float64)
    loss, grads = loss_and_grads(fn, tensors, extra, need, upstream, "triton")
    ref_loss, ref_grads = loss_and_grads(ref, tensors, extra, need, upstream)
    assert_close(loss, ref_loss)
    for a, r in zip(grads, ref_grads):
        assert_close(a, r)


@pytest.mark.parametrize("op", sorted(OPS))
def test_outputs_fully_written(op, poisoned_empty):
    # Sizes past one block (1024 flat elements, 256 per row) with ragged ends.
    check_triton_on(op, 5, (3, 37, 17, 19), ("channels_last", "contiguous"), (1.0, 1.0), 1.3)


@pytest.mark.parametrize("op", ["ft", "afd"])
def test_split_rows_fully_written(op, poisoned_empty, monkeypatch):
    # Rows cut into chunks of 512 (fastkd.kernels.elementwise.row_chunk), the last one ragged:
    # FT's 2 rows of 2001 values into 3 x 512 + 465, AFD's 6 rows of 667 into 512 + 155.
    monkeypatch.setattr(ew, "_SPLIT_PROGRAMS", 4096)
    monkeypatch.setattr(ew, "_SPLIT_MIN_CHUNK", 256)
    shape = (2, 3, 23, 29)
    rows, length = (6, 667) if op == "afd" else (2, 2001)
    assert ew.row_chunk(rows, length) == 512
    check_triton_on(op, 6, shape, ("channels_last", "strided"), (1.0, 1e3), 0.9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_afd_module_pooled_teacher(backend, teacher_grad, split, monkeypatch):
    # AFD's module against the reference's: loss and the gradients of fm_s, the attention's
    # parameters and (where it needs one) fm_t. On the Triton path with a teacher that needs
    # no gradient, the teacher's mean comes from the loss's forward kernel, and
    # adaptive_avg_pool2d is not called; split, from the rows' chunks (6 rows of 667 values
    # into 512 + 155).
    if split:
        monkeypatch.setattr(ew, "_SPLIT_MIN_CHUNK", 256)
    pools = []
    pool = torch.nn.functional.adaptive_avg_pool2d
    monkeypatch.setattr(torch.nn.functional, "adaptive_avg_pool2d", lambda *a: pools.append(1) or pool(*a))
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, 23, 29)
    s = make_map(g, shape, "channels_last", 1.0)
    t = make_map(g, shape, "strided", 1e3, offset=0.5)
    reference = R.AFD(3, 0.7).double()
    module = fastkd.AFD(3, 0.7).double()
    module.load_state_dict(reference.state_dict())
    upstream = torch.tensor(-1.7, dtype=torch.float64)

    def run(m, use):
        xs, xt = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
        with fastkd.use_backend(use):
            loss = m(xs, xt)
        inputs = [xs, *([xt] if teacher_grad else []), *m.parameters()]
        return loss, torch.autograd.grad(loss, inputs, upstream)

    ref_loss, ref_grads = run(reference, "reference")
    pools.clear()
    loss, grads = run(module, backend)
    assert len(pools) == (0 if backend == "triton" and not teacher_grad else 1)
    assert_close(loss, ref_loss)
    for a, r in zip(grads, ref_grads, strict=True):
        assert_close(a, r)


# --- Sobolev and LwM: losses of input gradients, differentiated twice ------------------------

class Net(nn.Module):
    """conv -> tanh (the feature map LwM uses) -> linear; smooth, so double backward is not 0."""

    def __init__(self, g, channels):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1).double()
        self.fc = nn.Linear(channels * 16, 5).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, img):
        fm = torch.tanh(self.conv(img))
        return fm, self.fc(fm.flatten(1))


@pytest.mark.parametrize("op", ["sobolev", "lwm"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_losses_double_backward(op, backend, seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = Net(g, 4), Net(g, 6)
    img = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (3,), generator=g)
    upstream = torch.randn((), generator=g, dtype=torch.float64)

    def run(fn, dtype):
        s, t = student.to(dtype), teacher.to(dtype)
        x = img.to(dtype).requires_grad_()
        fm_s, out_s = s(x)
        fm_t, out_t = t(x)
        loss = fn(out_s, out_t, x, target) if op == "sobolev" else fn(out_s, fm_s, out_t, fm_t, target)
        # The input gradient does not depend on the last bias: allow_unused, zeros for it.
        grads = torch.autograd.grad(loss, list(s.parameters()), upstream.to(dtype), allow_unused=True,
                                    materialize_grads=True)
        return loss, grads

    public = getattr(FF, op)
    reference = {"sobolev": R.sobolev.sobolev, "lwm": R.lwm.lwm}[op]
    with fastkd.use_backend(backend):
        loss, grads = run(public, torch.float64)
    ref_loss, ref_grads = run(reference, torch.float64)
    assert_close(loss, ref_loss)
    assert any(r.abs().max() > 0 for r in ref_grads)
    for a, r in zip(grads, ref_grads):
        assert_close(a, r)
    with fastkd.use_backend(backend):
        loss32, grads32 = run(public, torch.float32)
    ref_loss32, ref_grads32 = run(reference, torch.float32)
    assert_within_reference_error(loss32, ref_loss32, ref_loss)
    for a, r, e in zip(grads32, ref_grads32, ref_grads):
        assert_within_reference_error(a, r, e)


def test_ab_teacher_gets_no_gradient():
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = fa.ab(s, t, 0.5)
    ds, dt = torch.autograd.grad(loss, [s, t], allow_unused=True, materialize_grads=True)
    assert dt.abs().max() == 0 and ds.abs().max() > 0
