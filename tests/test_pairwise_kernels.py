"""Pairwise family (RKD distance and angle): Triton kernels (through the interpreter on CPU)
and the torch CPU path against fastkd.reference, loss and gradients of both inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import autograd
from fastkd.reference import rkd as ref_rkd
from fastkd.torch_backend import pairwise as torch_pairwise
from helpers import assert_close, assert_within_reference_error

OPS = {
    "rkd_distance": (ref_rkd.rkd_distance, autograd.rkd_distance, torch_pairwise.rkd_distance),
    "rkd_angle": (ref_rkd.rkd_angle, autograd.rkd_angle, torch_pairwise.rkd_angle),
}
KINDS = ("ordinary", "duplicates", "offset", "tiny", "large", "non-contiguous")


def make_pair(n, d_s, d_t, kind, seed):
    """fp64 (feat_s, feat_t) of one input family; duplicate rows differ between s and t."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d_s, generator=gen, dtype=torch.float64)
    t = torch.randn(n, d_t, generator=gen, dtype=torch.float64)
    if kind == "duplicates" and n >= 3:
        s[n - 1] = s[0]
        t[n - 2] = t[1]
        if n >= 5:
            s[2] = s[3]
            t[2] = t[3]
    elif kind == "offset":
        s, t = s + 20, t - 20
    elif kind == "tiny":
        s, t = s * 1e-3, t * 1e-3
    elif kind == "large":
        s, t = s * 1e3, t * 1e3
    elif kind == "non-contiguous":
        s = torch.randn(d_s, 2 * n, generator=gen, dtype=torch.float64).t()[::2]
        t = torch.randn(d_t, n, generator=gen, dtype=torch.float64).t()
    return s, t


def loss_and_grads(fn, s, t, grad_out):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    loss = fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t), grad_out.to(loss.dtype)))


def compare_with_reference(reference, fast, s, t, seed, label, loss_floor=None):
    """Loss and both gradients under a random upstream gradient: fp64 within TOLERANCE, fp32
    within 10x the reference's own fp32 error of the fp64 answer.

    loss_floor(exact_loss, n): where a loss carries a known rounding floor that the reference
    may undercut by luck, the fp32 loss is held to 10x the larger of the two instead.
    """
    grad_out = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3 - 1
    exact = loss_and_grads(reference, s, t, grad_out)
    for name, a, e in zip(("loss", "grad_s", "grad_t"), loss_and_grads(fast, s, t, grad_out), exact):
        assert a.dtype == torch.float64
        assert_close(a, e, msg=f"{label} float64 {name}")
    s32, t32 = s.float(), t.float()
    ref32 = loss_and_grads(reference, s32, t32, grad_out)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), loss_and_grads(fast, s32, t32, grad_out),
                             ref32, exact):
        assert a.dtype == torch.float32
        if not e.any():
            # For example D = 1, where every angle is exactly +-1 and the loss can be exactly
            # 0: no relative criterion holds at 0, so fp32's absolute tolerance applies.
            assert_close(a, e.float(), msg=f"{label} float32 {name}")
            continue
        if name == "loss" and loss_floor is not None:
            floor = loss_floor(e, len(s))
            err, ref_err = (a.double() - e).abs(), (r.double() - e).abs()
            assert err <= 10 * max(ref_err, floor), f"{label} float32 loss: error {err:.3e}"
            continue
        assert_within_reference_error(a, r, e, msg=f"{label} float32 {name}")


def check_against_reference(op, fast, n, d_s, d_t, kind, seed):
    if op == "rkd_angle":
        # With D = 1 every angle is exactly +-1 and its gradient exactly 0 in the reference,
        # which the Gram route meets only to rounding, far beyond 10x the reference's error.
        d_s, d_t = max(d_s, 2), max(d_t, 2)
    s, t = make_pair(n, d_s, d_t, kind, seed)
    compare_with_reference(OPS[op][0], fast, s, t, seed, f"{op} {kind}")


# --- Triton kernels, through the interpreter ---------------------------------------

@pytest.mark.parametrize("op", OPS)
@settings(max_examples=10)
@given(n=st.integers(2, 13), d_s=st.integers(1, 40), d_t=st.integers(1, 40),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_triton_matches_reference(op, n, d_s, d_t, kind, seed):
    check_against_reference(op, OPS[op][1], n, d_s, d_t, kind, seed)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference_on_each_input_family(op, kind):
    check_against_reference(op, OPS[op][1], 11, 64, 17, kind, 7)


@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_past_one_tile(op):
    # 33 rows: a second, almost empty 32-wide tile whose masked rows must not count.
    check_against_reference(op, OPS[op][1], 33, 9, 20, "duplicates", 5)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0)], ids=["distance", "angle", "both"])
def test_gradcheck(weights):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    # Each term's full Jacobian is checked alone; their sum (a linear combination of the two)
    # by gradcheck's random projections, at a tenth of the interpreter's time.
    fast = 0 not in weights
    assert torch.autograd.gradcheck(lambda s, t: autograd.RKDFunction.apply(s, t, *weights), (s, t),
                                    fast_mode=fast)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_low_precision_inputs(op, dtype, impl):
    s, t = make_pair(9, 12, 7, "ordinary", 3)
    s, t = s.to(dtype), t.to(dtype)
    loss, grad_s, grad_t = loss_and_grads(OPS[op][impl], s, t, torch.tensor(1.0))
    exact = loss_and_grads(OPS[op][0], s.double(), t.double(), torch.tensor(1.0))
    assert loss.dtype == dtype and grad_s.dtype == dtype and grad_t.dtype == dtype
    assert_close(loss, exact[0], dtype=dtype)
    assert_close(grad_s, exact[1], dtype=dtype)
    assert_close(grad_t, exact[2], dtype=dtype)


@pytest.mark.parametrize("op", OPS)
def test_triton_writes_every_output(op, monkeypatch):
    """Buffers from torch.empty come back NaN-filled: a result that reads an unwritten one fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)

    s, t = make_pair(11, 6, 5, "duplicates", 1)
    expected = loss_and_grads(OPS[op][0], s, t, torch.tensor(0.7))
    monkeypatch.setattr(torch, "empty", poisoned)
    for a, e in zip(loss_and_grads(OPS[op][1], s, t, torch.tensor(0.7)), expected):
        assert_close(a, e)


def test_triton_backend_dispatch():
    s, t = make_pair(6, 5, 4, "ordinary", 2)
    with fastkd.use_backend("triton"):
        loss = fastkd.functional.rkd(s, t, 25, 50)
    assert_close(loss, ref_rkd.rkd(s, t, 25, 50))


def test_only_the_student_needs_grad():
    s, t = make_pair(7, 5, 4, "ordinary", 4)
    s.requires_grad_()
    loss = autograd.rkd_angle(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    (expected,) = torch.autograd.grad(ref_rkd.rkd_angle(s, t), s)
    assert_close(grad, expected)


# --- torch CPU path, at larger sizes --------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@settings(max_examples=15)
@given(n=st.integers(2, 64), d_s=st.integers(1, 96), d_t=st.integers(1, 96),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_torch_path_matches_reference(op, n, d_s, d_t, kind, seed):
    with pytest.MonkeyPatch.context() as patch:
        # Small anchor blocks, so that the angle term runs over several of them.
        patch.setattr(torch_pairwise, "_ANGLE_BLOCK_ENTRIES", 3000)
        check_against_reference(op, OPS[op][2], n, d_s, d_t, kind, seed)


def test_auto_on_cpu_is_the_torch_path():
    assert fastkd.backend.resolve("rkd_angle", torch.device("cpu"), "auto") == "torch"
    assert fastkd.backend.resolve("rkd_distance", torch.device("cpu"), "auto") == "torch"

