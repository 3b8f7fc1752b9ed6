"""Softmax-KL family (SoftTarget, DML, BSS): Triton kernels and the CPU path against the reference."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastkd
from fastkd import autograd, reference
from fastkd.kernels import softmax_kl as kernels
from fastkd.torch_backend import softmax_kl as torch_path
from helpers import TOLERANCE, assert_close, assert_within_reference_error

NEG_INF = float("-inf")

# op -> (reference, triton, torch path, takes T)
OPS = {
    "soft_target": (reference.st.soft_target, autograd.soft_target, torch_path.soft_target, True),
    "dml": (reference.dml.dml, autograd.dml, torch_path.dml, False),
    "bss": (reference.bss.bss, autograd.bss, torch_path.bss, True),
}
# "streaming": the Triton path of logits larger than FUSED_MAX (stats in forward, a
# backward kernel), taken at the tests' sizes with FUSED_MAX=0 (the fixture below).
PATHS = {"triton": 1, "streaming": 1, "torch": 2}


@pytest.fixture(autouse=True)
def streaming_path(request, monkeypatch):
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("path") == "streaming":
        monkeypatch.setattr(kernels, "FUSED_MAX", 0)


def _call(op, path, s, t, T):
    fn = OPS[op][PATHS[path] if path != "reference" else 0]
    return fn(s, t, T) if OPS[op][3] else fn(s, t)


def _scale(op, T):
    return {"soft_target": T * T, "dml": 1.0, "bss": 1.0}[op]


def _T(op, T):
    return T if OPS[op][3] else 1.0


def _safe_oracle(s, t, T, scale):
    """The same loss written so that autograd gives the limit 0 for classes with p = 0
    (the reference's teacher gradient is NaN there: xlogy's derivative at 0)."""
    log_q = F.log_softmax(s / T, dim=1)
    log_p = F.log_softmax(t / T, dim=1)
    p = log_p.exp()
    live = p > 0
    terms = torch.where(live, p * (torch.where(live, log_p, 0.0) - log_q), 0.0)
    return terms.sum() / s.shape[0] * scale


def _loss_and_grads(fn, s, t, g):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t), g.to(loss.dtype))
    return loss.detach(), gs, gt


# Small tiles make the kernels stream over several class blocks and row blocks; FUSED_MAX=0
# takes the larger logits' path (stats in forward, a backward kernel) at the tests' sizes.
BLOCKS = pytest.mark.parametrize("blocks", [dict(TILE=64, MAX_BLOCK_K=16),
                                            dict(TILE=kernels.TILE, MAX_BLOCK_K=kernels.MAX_BLOCK_K),
                                            dict(TILE=64, MAX_BLOCK_K=16, FUSED_MAX=0)],
                                 ids=["small-blocks", "default-blocks", "streaming"])


@st.composite
def logits_pair(draw, max_rows=6, max_k=300, family=None, spreads=(0.1, 1.0, 5.0)):
    """(s, t) in fp64, classes on dim 1, from one of the value families of the issue."""
    B = draw(st.integers(1, max_rows))
    K = draw(st.sampled_from([2, 3, 10, 17, 64, 100, max_k]))
    extra = draw(st.sampled_from([(), (), (), (3,), (2, 3)]))
    family = family or draw(st.sampled_from(["normal", "equal", "shifted", "extreme"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (B, K) + extra
    spread = draw(st.sampled_from(spreads))
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    if family == "equal":
        s = torch.full(shape, 3.0, dtype=torch.float64)
        t = t if draw(st.booleans()) else torch.full(shape, -2.0, dtype=torch.float64)
    elif family == "shifted":
        s, t = s + 1e4, t - 1e4
    elif family == "extreme":
        s = torch.randint(-1, 2, shape, generator=gen).to(torch.float64) * 1e4 + s
        t = torch.randint(-1, 2, shape, generator=gen).to(torch.float64) * 1e4 + t
    return s, t


temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0]) | st.floats(0.5, 20.0)
upstream = st.floats(-3.0, 3.0).filter(lambda x: abs(x) > 1e-3)


def _check_fp64(op, path, s, t, T, g):
    g = torch.tensor(g, dtype=torch.float64)
    loss, gs, gt = _loss_and_grads(lambda a, b: _call(op, path, a, b, T), s, t, g)
    ref_loss, ref_gs, ref_gt = _loss_and_grads(lambda a, b: _call(op, "reference", a, b, T), s, t, g)
    _, _, safe_gt = _loss_and_grads(lambda a, b: _safe_oracle(a, b, _T(op, T), _scale(op, T)), s, t, g)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, msg=f"{op} loss")
    assert_close(gs, ref_gs, msg=f"{op} student gradient")
    # Where the reference's teacher gradient is finite it is the expected one; where
    # a teacher probability underflows to 0 it is NaN, and the limit is expected.
    assert_close(gt, torch.where(ref_gt.isfinite(), ref_gt, safe_gt), msg=f"{op} teacher gradient")


@BLOCKS
@pytest.mark.parametrize("op", OPS)
@given(pair=logits_pair(), T=temperatures, g=upstream)
def test_triton_matches_reference_fp64(blocks, op, pair, T, g):
    with mock.patch.multiple(kernels, **blocks):
        _check_fp64(op, "triton", *pair, T, g)


@pytest.mark.parametrize("op", OPS)
@given(pair=logits_pair(max_rows=40, max_k=3000), T=temperatures, g=upstream)
def test_torch_path_matches_reference_fp64(op, pair, T, g):
    _check_fp64(op, "torch", *pair, T, g)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Chunks of 256 elements: the hypothesis sizes reach both the one-chunk shortcut to the
    # reference's formula and the chunked Function over many chunks.
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 256)


def test_torch_path_takes_the_reference_formula_only_within_one_chunk():
    def path(shape, teacher_grad=False, dtype=torch.float64):
        s, t = torch.randn(2, *shape, dtype=dtype).unbind(0)
        loss = torch_path.soft_target(s.requires_grad_(), t.requires_grad_(teacher_grad), 2.0)
        return type(loss.grad_fn).__name__

    assert path((8, 32)) != "SoftmaxKLBackward"
    assert path((9, 32)) == "SoftmaxKLBackward"
    assert path((8, 32), teacher_grad=True) == "SoftmaxKLBackward"
    assert path((8, 32), dtype=torch.bfloat16) == "SoftmaxKLBackward"


def test_torch_path_over_several_chunks(monkeypatch):
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 50)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 37, 13, 3, generator=gen, dtype=torch.float64).unbind(0)
    _check_fp64("soft_target", "torch", s, t, 3.0, 0.7)


def _check_fp32(op, path, s, t, T, g):
    g = torch.tensor(g, dtype=torch.float64)
    s32, t32 = s.float(), t.float()
    loss, gs, gt = _loss_and_grads(lambda a, b: _call(op, path, a, b, T), s32, t32, g)
    ref = _loss_and_grads(lambda a, b: _call(op, "reference", a, b, T), s32, t32, g)
    exact = _loss_and_grads(lambda a, b: _call(op, "reference", a, b, T), s, t, g)
    assert loss.dtype == gs.dtype == gt.dtype == torch.float32
    for name, ours, low, hi in zip(("loss", "student gradient", "teacher gradient"), (loss, gs, gt), ref, exact):
        assert_within_reference_error(ours, low, hi, msg=f"{op} {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS)
@given(pair=logits_pair(family="normal", spreads=(1.0, 5.0)), T=temperatures, g=upstream)
def test_fp32_within_reference_error(op, path, pair, T, g):
    # Spread logits, scaled with T, keep the two distributions apart: where KL_row falls below about
    # 1e-3 log K, every fp32 evaluation (the reference's too) rounds it with an error of
    # about eps log K, and whether the reference's error comes out 10x smaller is luck.
    s, t = pair
    k = max(_T(op, T), 1.0)
    _check_fp32(op, path, s * k, t * k, T, g)


def _masked(shape, gen, where):
    """A -inf mask over (B, K, ...) that leaves class 0 of every row live for both inputs."""
    m = torch.rand(shape, generator=gen) < 0.3
    m[:, 0] = False
    return m if where else torch.zeros(shape, dtype=torch.bool)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["student", "teacher", "both-same", "independent"])
@given(pair=logits_pair(max_k=64, family="normal"), T=temperatures, g=upstream,
       seed=st.integers(0, 2**31 - 1))
def test_masked_classes_match_reference(path, case, pair, T, g, seed):
    """-inf logits: the reference's loss (inf or NaN included), student gradient and,
    per row, the teacher gradient (the limit where finite, non-finite where its KL is)."""
    s, t = pair
    gen = torch.Generator().manual_seed(seed)
    ms = _masked(s.shape, gen, case in ("student", "both-same", "independent"))
    mt = ms.clone() if case == "both-same" else _masked(s.shape, gen, case in ("teacher", "independent"))
    s, t = s.masked_fill(ms, NEG_INF), t.masked_fill(mt, NEG_INF)
    gt64 = torch.tensor(g, dtype=torch.float64)
    loss, gs, gt = _loss_and_grads(lambda a, b: _call("soft_target", path, a, b, T), s, t, gt64)
    ref_loss, ref_gs, _ = _loss_and_grads(lambda a, b: _call("soft_target", "reference", a, b, T), s, t, gt64)
    _, _, safe_gt = _loss_and_grads(lambda a, b: _safe_oracle(a, b, T, T * T), s, t, gt64)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, **TOLERANCE[torch.float64])
    assert_close(gs, ref_gs, msg="student gradient")
    rows = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1, keepdim=True)
    finite_row = rows.isfinite().expand_as(gt)
    assert_close(gt[finite_row], safe_gt[finite_row], msg="teacher gradient, finite rows")
    assert not gt[~finite_row].isfinite().any(), "rows with a non-finite KL must give a non-finite teacher gradient"


@pytest.mark.parametrize("path", PATHS)
def test_masked_cases_by_hand(path):
    """The three single-class cases written out: NaN and inf exactly where the reference has them."""
    T, g = 1.0, torch.tensor(1.0, dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    masked = x.clone()
    masked[0, 2] = NEG_INF
    cases = {"student": (masked, x, math.inf), "teacher": (x, masked, None), "both": (masked, masked, math.nan)}
    for name, (s, t, expected) in cases.items():
        loss, gs, gt = _loss_and_grads(lambda a, b: _call("soft_target", path, a, b, T), s, t, g)
        ref_loss, ref_gs, _ = _loss_and_grads(lambda a, b: _call("soft_target", "reference", a, b, T), s, t, g)
        torch.testing.assert_close(loss, ref_loss, equal_nan=True, msg=name)
        assert_close(gs, ref_gs, msg=f"{name}: student gradient")
        if expected is None:
            assert loss.isfinite() and gt.isfinite().all(), name
        elif math.isnan(expected):
            assert loss.isnan() and gt.isnan().all(), name
        else:
            assert loss == math.inf and not gt.isfinite().any(), name


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_row_is_nan_as_in_reference(path):
    s = torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    for a, b in ((s, t), (t, s)):
        assert _call("dml", path, a, b, 1.0).isnan()
        assert _call("dml", "reference", a, b, 1.0).isnan()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(pair=logits_pair(max_k=100, family="normal"), T=temperatures, g=upstream)
def test_low_precision_inputs(path, dtype, pair, T, g):
    s, t = pair
    g = torch.tensor(g, dtype=torch.float64)
    loss, gs, gt = _loss_and_grads(lambda a, b: _call("soft_target", path, a, b, T), s.to(dtype), t.to(dtype), g)
    exact = _loss_and_grads(lambda a, b: _call("soft_target", "reference", a, b, T),
                            s.to(dtype).double(), t.to(dtype).double(), g)
    assert loss.dtype == gs.dtype == gt.dtype == dtype
    for ours, hi in zip((loss, gs, gt), exact):
        # Gradients are rounded once to dtype: compare on the scale of the largest entry.
        atol = TOLERANCE[dtype]["atol"] * max(1.0, hi.abs().max().item())
        torch.testing.assert_close(ours.double(), hi, rtol=TOLERANCE[dtype]["rtol"], atol=atol)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(40, 6, generator=gen, dtype=torch.float64).t()  # (6, 40), classes 6 apart
    t = torch.randn(6, 80, generator=gen, dtype=torch.float64)[:, ::2]
    _check_fp64("bss", path, s, t, 2.0, -1.3)


@pytest.mark.parametrize("path", PATHS)
def test_teacher_without_grad(path):
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 33, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 33, generator=gen, dtype=torch.float64)
    gs, = torch.autograd.grad(_call("dml", path, s, t, 1.0) * 2.5, s)
    ref, = torch.autograd.grad(_call("dml", "reference", s, t, 1.0) * 2.5, s)
    assert_close(gs, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3)])
def test_gradcheck(path, shape):
    fn = torch_path.SoftmaxKL.apply if path == "torch" else autograd.SoftmaxKLFunction.apply
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, 1.7, 1.7 ** 2), (s, t))


@pytest.mark.parametrize("path", ["triton", "streaming"])
def test_poisoned_outputs(monkeypatch, path):
    """Every torch.empty the kernels allocate is fully written (NaN-filled here)."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(math.nan))
    monkeypatch.setattr(kernels, "TILE", 64)
    monkeypatch.setattr(kernels, "MAX_BLOCK_K", 16)
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 7, 37, 3, generator=gen, dtype=torch.float64).unbind(0)
    _check_fp64("soft_target", path, s, t, 1.5, 0.9)


@pytest.mark.parametrize("name, args", [("SoftTarget", (4.0,)), ("DML", ()), ("BSS", (2.0,))])
def test_modules_run_through_triton(name, args):
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(6, 10, generator=gen, requires_grad=True)
    t = torch.randn(6, 10, generator=gen, requires_grad=True)
    with fastkd.use_backend("triton"):
        loss = getattr(fastkd, name)(*args)(s, t)
    assert type(loss.grad_fn).__name__ == "SoftmaxKLFunctionBackward"
    expected = getattr(reference, {"SoftTarget": "st", "DML": "dml", "BSS": "bss"}[name])
    ref = getattr(expected, name)(*args)(s, t)
    assert_close(loss, ref)
    gs, gt = torch.autograd.grad(loss, (s, t))
    rs, rt = torch.autograd.grad(ref, (s, t))
    assert_close(gs, rs)
    assert_close(gt, rt)
