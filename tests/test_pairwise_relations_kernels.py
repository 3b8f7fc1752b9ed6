"""Pairwise family, the relation losses (SP, PKT, CC, IRG): Triton kernels (through the
interpreter on CPU) and the torch CPU path against fastkd.reference, loss and gradients of
every input."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import autograd
from fastkd.reference import cc as ref_cc, irg as ref_irg, pkt as ref_pkt, sp as ref_sp
from fastkd.torch_backend import pairwise as torch_pairwise
from helpers import assert_close, assert_within_reference_error
from test_pairwise_kernels import KINDS, compare_with_reference, loss_and_grads, make_pair

# op -> (reference, triton, torch), each a function of (s, t).
OPS = {
    "sp": (ref_sp.sp, autograd.sp, torch_pairwise.sp),
    "pkt_cos_sim": (ref_pkt.pkt_cos_sim, autograd.pkt_cos_sim, torch_pairwise.pkt_cos_sim),
    "cc": tuple(functools.partial(f, gamma=0.4, P_order=2)
                for f in (ref_cc.cc, autograd.cc, torch_pairwise.cc)),
    # IRG's edge term on (fm1, fm2, feat) = (x, x^2, x): three graphs, one input.
    "irg_edge": tuple(functools.partial(lambda s, t, f: f((s, s * s, s, None), (t, t * t, t, None)),
                                        f=f)
                      for f in (ref_irg.irg_edge, autograd.irg_edge, torch_pairwise.irg_edge)),
}
REGISTERED = {"sp": autograd.sp, "pkt_cos_sim": autograd.pkt_cos_sim, "cc": autograd.cc,
              "irg_edge": autograd.irg_edge}
FUNCTIONS = {"sp": autograd.SPFunction.apply,
             "pkt_cos_sim": lambda s, t: autograd.PKTFunction.apply(s, t, 1e-6),
             "cc": lambda s, t: autograd.CCFunction.apply(s, t, 0.7, 3),
             "irg_edge": autograd.IRGEdgeFunction.apply}


LOSS_FLOORS = {
    # mean (K_s - K_t)^2 of kernel values K = O(1), each rounded by about eps: the loss
    # carries about 2 eps sqrt(loss) of rounding, which the reference meets by luck far
    # below it on nearly equal K (offset rows).
    "cc": lambda loss, n: 2 * torch.finfo(torch.float32).eps * loss.sqrt(),
    # The loss is a KL divergence whose first-order terms sum_j (P_t - P_s) cancel only as
    # far as fp32 rows of P sum to 1: an error of about eps / N, which the reference meets
    # by luck far below it on nearly equal P (offset rows).
    "pkt_cos_sim": lambda loss, n: torch.finfo(torch.float32).eps / n,
}


def check_against_reference(op, impl, s, t, seed, **kwargs):
    reference = functools.partial(OPS[op][0], **kwargs)
    fast = functools.partial(OPS[op][impl], **kwargs)
    compare_with_reference(reference, fast, s, t, seed, op, LOSS_FLOORS.get(op))


def shaped(x, op, seed):
    """SP takes (N, ...) maps: give it some as (N, C, H) with the same values."""
    if op == "sp" and seed % 2 and x.size(1) % 2 == 0:
        return x.reshape(x.size(0), 2, -1)
    return x


def check(op, impl, n, d_s, d_t, kind, seed):
    if op == "cc":
        # With D = 1 every cosine is exactly +-1 and the gradient 0 to fp64's rounding, which
        # normalised fp32 rows meet only to fp32's rounding, far beyond 10x the reference's.
        d_s, d_t = max(d_s, 2), max(d_t, 2)
    s, t = make_pair(n, d_s, d_t, kind, seed)
    check_against_reference(op, impl, shaped(s, op, seed), shaped(t, op, seed + 1), seed)


# --- Triton kernels, through the interpreter ---------------------------------------

@pytest.mark.parametrize("op", OPS)
@settings(max_examples=6)
@given(n=st.integers(2, 12), d_s=st.integers(1, 24), d_t=st.integers(1, 24),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_triton_matches_reference(op, n, d_s, d_t, kind, seed):
    check(op, 1, n, d_s, d_t, kind, seed)


def test_triton_pkt_at_cosines_near_minus_one():
    # D = 1 student: its off-diagonal cosines are -1 + O(eps), and C' = (1 + C) / 2 near 0
    # carries the loss (a float32 C left it 22x the reference's error).
    check("pkt_cos_sim", 1, 2, 1, 2, "ordinary", 0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference_on_each_input_family(op, kind):
    check(op, 1, 9, 20, 6, kind, 7)


@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_past_one_tile(op):
    # 34 rows: a second, almost empty 32-wide tile whose masked rows must not count.
    check(op, 1, 34, 9, 20, "duplicates", 5)


@pytest.mark.parametrize("op", FUNCTIONS)
def test_gradcheck(op):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(FUNCTIONS[op], (s, t))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_low_precision_inputs(op, dtype, impl):
    s, t = make_pair(9, 12, 7, "ordinary", 3)
    s, t = s.to(dtype), t.to(dtype)
    loss, grad_s, grad_t = loss_and_grads(OPS[op][impl], s, t, torch.tensor(1.0))
    exact = loss_and_grads(OPS[op][0], s.double(), t.double(), torch.tensor(1.0))
    assert loss.dtype == dtype and grad_s.dtype == dtype and grad_t.dtype == dtype
    # Relative to the largest entry: small gradient entries carry the input's rounding.
    for a, e in zip((loss, grad_s, grad_t), exact):
        assert_close(a / e.abs().max(), e / e.abs().max(), dtype=dtype)


def poisoned_empty(monkeypatch):
    """torch.empty comes back NaN-filled: a result that reads an unwritten entry fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("op", OPS)
def test_triton_writes_every_output(op, monkeypatch):
    s, t = make_pair(11, 6, 5, "duplicates", 1)
    expected = loss_and_grads(OPS[op][0], s, t, torch.tensor(0.7))
    poisoned_empty(monkeypatch)
    for a, e in zip(loss_and_grads(OPS[op][1], s, t, torch.tensor(0.7)), expected):
        assert_close(a, e)


@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_pkt_other_eps(impl):
    s, t = make_pair(8, 5, 7, "tiny", 6)
    check_against_reference("pkt_cos_sim", impl, s, t, 6, eps=1e-2)


@pytest.mark.parametrize("gamma, order", [(0.4, 0), (0.0, 3), (-0.3, 1), (1.3, 6)])
@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_cc_any_order(impl, gamma, order):
    s, t = make_pair(7, 6, 9, "ordinary", order)
    check_against_reference("cc", impl, s, t, order, gamma=gamma, P_order=order)


@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_irg_edge_on_feature_maps(impl):
    gen = torch.Generator().manual_seed(3)
    irg_s = [torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64),
             torch.randn(6, 4, 2, 2, generator=gen, dtype=torch.float64)[..., ::2],
             torch.randn(6, 5, generator=gen, dtype=torch.float64), None]
    irg_t = [torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64),
             torch.randn(6, 2, 2, 2, generator=gen, dtype=torch.float64),
             torch.randn(6, 8, generator=gen, dtype=torch.float64), None]
    irg_s[2][4] = irg_s[2][1]
    inputs = [x.requires_grad_() for x in irg_s[:3] + irg_t[:3]]
    loss = OPS["irg_edge"][impl].keywords["f"](irg_s, irg_t)
    expected = ref_irg.irg_edge(irg_s, irg_t)
    assert_close(loss, expected)
    for a, e in zip(torch.autograd.grad(loss, inputs, torch.tensor(-1.3, dtype=torch.float64)),
                    torch.autograd.grad(expected, inputs, torch.tensor(-1.3, dtype=torch.float64))):
        assert_close(a, e)


def test_only_the_student_needs_grad():
    s, t = make_pair(7, 5, 4, "ordinary", 4)
    s.requires_grad_()
    for op in OPS:
        (grad,) = torch.autograd.grad(OPS[op][1](s, t), s)
        (expected,) = torch.autograd.grad(OPS[op][0](s, t), s)
        assert_close(grad, expected, msg=op)


# --- torch CPU path, at larger sizes --------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@settings(max_examples=10)
@given(n=st.integers(2, 64), d_s=st.integers(1, 96), d_t=st.integers(1, 96),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_torch_path_matches_reference(op, n, d_s, d_t, kind, seed):
    check(op, 2, n, d_s, d_t, kind, seed)


@pytest.mark.parametrize("op", OPS)
def test_backends_are_registered(op):
    assert fastkd.backend.resolve(op, torch.device("cpu"), "auto") == "torch"
    assert fastkd.backend.IMPLEMENTATIONS[op]["triton"] is REGISTERED[op]


# --- IRG transformation: (fm1, fm2) per side, four maps -----------------------------------

# (fm1 shape, fm2 shape) per sample, from a channel count c: pooled and/or halved, or paired
# by flat index only (the last: same count of values, different shapes).
TRANSFORMATION_SHAPES = {
    "pool+halve": lambda c: ((c, 4, 6), (2 * c, 2, 3)),
    "halve": lambda c: ((c, 3, 2), (2 * c, 3, 2)),
    "pool": lambda c: ((c, 4, 4), (c, 2, 2)),
    "adaptive pool": lambda c: ((c, 5, 4), (2 * c, 3, 3)),
    "same": lambda c: ((c, 2, 3), (c, 2, 3)),
    "flat": lambda c: ((2 * c, 2, 3), (c, 3, 4)),
}
TRANSFORMATION_KINDS = ("ordinary", "duplicates", "clamped sample", "all clamped", "offset", "tiny",
                        "large", "non-contiguous")


def make_maps(n, shapes, c, kind, gen, offset):
    """fp64 (fm1, fm2) of one side."""
    (c1, h1, w1), (c2, h2, w2) = TRANSFORMATION_SHAPES[shapes](c)
    if kind == "non-contiguous":
        fm1 = torch.randn(n, h1, w1, c1, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2)
        fm2 = torch.randn(n, c2, h2, 2 * w2, generator=gen, dtype=torch.float64)[..., ::2]
        return fm1, fm2
    fm1 = torch.randn(n, c1, h1, w1, generator=gen, dtype=torch.float64)
    fm2 = torch.randn(n, c2, h2, w2, generator=gen, dtype=torch.float64)
    if kind == "duplicates" and n >= 3:
        # Sample 0, the largest, twice: a tie in the max; the last sample at d = 0, clamped.
        fm1[0], fm2[0] = 3 * fm1[0], 3 * fm2[0]
        fm1[1], fm2[1] = fm1[0], fm2[0]
        fm1[n - 1], fm2[n - 1] = 0, 0
    elif kind == "clamped sample":
        # d ~ 1e-10 but for the last sample, d ~ 1e-14 < 1e-12: clamped, so no gradient,
        # though its difference is not 0 and 1 / max(d) is large.
        fm1, fm2 = fm1 * 1e-5, fm2 * 1e-5
        fm1[n - 1], fm2[n - 1] = fm1[n - 1] * 1e-2, 0
    elif kind == "all clamped":
        fm1, fm2 = fm1 * 0, fm2 * 0
    elif kind == "offset":
        fm1, fm2 = fm1 + offset, fm2 + offset
    elif kind == "tiny":
        fm1, fm2 = fm1 * 1e-3, fm2 * 1e-3
    elif kind == "large":
        fm1, fm2 = fm1 * 1e3, fm2 * 1e3
    return fm1, fm2


def make_irg_pair(n, shapes_s, shapes_t, kind, seed):
    """fp64 (irg_s, irg_t) as [fm1, fm2]; "all clamped" zeroes the student's only."""
    gen = torch.Generator().manual_seed(seed)
    s = make_maps(n, shapes_s, 1 + seed % 3, kind, gen, 20.0)
    t = make_maps(n, shapes_t, 2, "ordinary" if kind == "all clamped" else kind, gen, -20.0)
    return list(s), list(t)


def transformation_loss_and_grads(fn, irg_s, irg_t, grad_out):
    maps = [x.detach().requires_grad_() for x in (*irg_s, *irg_t)]
    loss = fn(maps[:2], maps[2:])
    return (loss, *torch.autograd.grad(loss, maps, grad_out.to(loss.dtype)))


TRANSFORMATION = (ref_irg.irg_transformation, autograd.irg_transformation,
                  torch_pairwise.irg_transformation)
NAMES = ("loss", "grad fm1_s", "grad fm2_s", "grad fm1_t", "grad fm2_t")


def check_transformation(impl, n, shapes_s, shapes_t, kind, seed):
    irg_s, irg_t = make_irg_pair(n, shapes_s, shapes_t, kind, seed)
    grad_out = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3 - 1
    exact = transformation_loss_and_grads(TRANSFORMATION[0], irg_s, irg_t, grad_out)
    for name, a, e in zip(NAMES, transformation_loss_and_grads(TRANSFORMATION[impl], irg_s, irg_t,
                                                               grad_out), exact):
        assert a.dtype == torch.float64
        assert_close(a, e, msg=f"irg_transformation {kind} float64 {name}")
    low = [[x.float() for x in side] for side in (irg_s, irg_t)]
    ref32 = transformation_loss_and_grads(TRANSFORMATION[0], *low, grad_out)
    for name, a, r, e in zip(NAMES, transformation_loss_and_grads(TRANSFORMATION[impl], *low, grad_out),
                             ref32, exact):
        assert a.dtype == torch.float32
        if not e.any():
            assert_close(a, e.float(), msg=f"irg_transformation {kind} float32 {name}")
            continue
        assert_within_reference_error(a, r, e, msg=f"irg_transformation {kind} float32 {name}")


@settings(max_examples=12)
@given(n=st.integers(2, 12), shapes_s=st.sampled_from(list(TRANSFORMATION_SHAPES)),
       shapes_t=st.sampled_from(list(TRANSFORMATION_SHAPES)),
       kind=st.sampled_from(TRANSFORMATION_KINDS), seed=st.integers(0, 2 ** 16))
def test_triton_transformation_matches_reference(n, shapes_s, shapes_t, kind, seed):
    check_transformation(1, n, shapes_s, shapes_t, kind, seed)


@pytest.mark.parametrize("kind", TRANSFORMATION_KINDS)
def test_triton_transformation_on_each_input_family(kind):
    check_transformation(1, 7, "pool+halve", "halve", kind, 4)


@pytest.mark.parametrize("shapes", TRANSFORMATION_SHAPES)
def test_triton_transformation_on_each_pairing(shapes):
    check_transformation(1, 5, shapes, "same", "duplicates", 2)


def test_triton_transformation_past_one_block():
    # 1200 values a sample: a second, partly masked block of irg_transformation.BLOCK_V = 1024 values.
    gen = torch.Generator().manual_seed(8)
    irg_s = [torch.randn(3, 12, 20, 10, generator=gen, dtype=torch.float64),
             torch.randn(3, 24, 10, 5, generator=gen, dtype=torch.float64)]
    irg_t = [torch.randn(3, 48, 5, 5, generator=gen, dtype=torch.float64),
             torch.randn(3, 48, 5, 5, generator=gen, dtype=torch.float64)]
    exact = transformation_loss_and_grads(TRANSFORMATION[0], irg_s, irg_t, torch.tensor(1.7))
    for name, a, e in zip(NAMES, transformation_loss_and_grads(TRANSFORMATION[1], irg_s, irg_t,
                                                               torch.tensor(1.7)), exact):
        assert_close(a, e, msg=name)


@pytest.mark.parametrize("halve", [True, False])
def test_transformation_gradcheck(halve):
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(4, 2, 2, 3, generator=gen, dtype=torch.float64),
            torch.randn(4, 4 if halve else 2, 2, 3, generator=gen, dtype=torch.float64),
            torch.randn(4, 3, 2, 1, generator=gen, dtype=torch.float64),
            torch.randn(4, 3, 1, 2, generator=gen, dtype=torch.float64).transpose(2, 3)]
    maps[1][3] = maps[1][0]  # duplicates on the student's fm2 only: no tie in d
    maps = [x.requires_grad_() for x in maps]
    assert torch.autograd.gradcheck(autograd.IRGTransformationFunction.apply, maps, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", [1, 2], ids=["triton", "torch"])
def test_transformation_low_precision_inputs(dtype, impl):
    irg_s, irg_t = make_irg_pair(9, "pool+halve", "flat", "ordinary", 3)
    low = [[x.to(dtype) for x in side] for side in (irg_s, irg_t)]
    results = transformation_loss_and_grads(TRANSFORMATION[impl], *low, torch.tensor(1.0))
    exact = transformation_loss_and_grads(TRANSFORMATION[0], *[[x.to(dtype).double() for x in side]
                                                                for side in low], torch.tensor(1.0))
    for a, e in zip(results, exact):
        assert a.dtype == dtype
        assert_close(a / e.abs().max(), e / e.abs().max(), dtype=dtype)


def test_triton_transformation_writes_every_output(monkeypatch):
    irg_s, irg_t = make_irg_pair(6, "pool+halve", "flat", "duplicates", 1)
    expected = transformation_loss_and_grads(TRANSFORMATION[0], irg_s, irg_t, torch.tensor(0.7))
    poisoned_empty(monkeypatch)
    for a, e in zip(transformation_loss_and_grads(TRANSFORMATION[1], irg_s, irg_t,
                                                  torch.tensor(0.7)), expected):
        assert_close(a, e)


@pytest.mark.parametrize("needs", [(0,), (1,), (0, 1), (3,)])
def test_triton_transformation_some_maps_need_grad(needs):
    irg_s, irg_t = make_irg_pair(5, "halve", "pool", "ordinary", 6)
    maps = [x.requires_grad_(i in needs) for i, x in enumerate(irg_s + irg_t)]
    wanted = [maps[i] for i in needs]
    grads = torch.autograd.grad(TRANSFORMATION[1](maps[:2], maps[2:]), wanted)
    expected = torch.autograd.grad(TRANSFORMATION[0](maps[:2], maps[2:]), wanted)
    for a, e in zip(grads, expected):
        assert_close(a, e)


@settings(max_examples=15)
@given(n=st.integers(2, 40), shapes_s=st.sampled_from(list(TRANSFORMATION_SHAPES)),
       shapes_t=st.sampled_from(list(TRANSFORMATION_SHAPES)),
       kind=st.sampled_from(TRANSFORMATION_KINDS), seed=st.integers(0, 2 ** 16))
def test_torch_path_transformation_matches_reference(n, shapes_s, shapes_t, kind, seed):
    check_transformation(2, n, shapes_s, shapes_t, kind, seed)


def test_transformation_backends_are_registered():
    assert fastkd.backend.resolve("irg_transformation", torch.device("cpu"), "auto") == "torch"
    assert fastkd.backend.IMPLEMENTATIONS["irg_transformation"]["triton"] is autograd.irg_transformation
    assert fastkd.backend.IMPLEMENTATIONS["irg_transformation"]["torch"] is torch_pairwise.irg_transformation


def test_triton_pkt_at_cosines_near_minus_one_in_many_tiles():
    # 40 one-dimensional student rows: every off-diagonal cosine is +-1 + O(eps), about half
    # of them near -1, across both 32-wide tiles of P and its transpose (a float32 C left the
    # loss 41x the reference's error).
    check("pkt_cos_sim", 1, 40, 1, 3, "ordinary", 2)
