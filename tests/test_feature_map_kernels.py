"""AT, NST and FSP: the Triton kernels (through the interpreter on CPU) and the torch CPU
path against fastkd.reference, loss and gradients of every input under a random upstream
gradient. AT also with normalize=True (F.normalize's clamp, RepDistiller's Attention map),
its clamp held by dead and near-1e-7 samples."""
import functools
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
import fastkd.autograd as fa
import test_adversarial_losses as adversarial
from fastkd import functional as FF
from fastkd import ops
from fastkd.kernels import feature_maps
from fastkd import reference as R
from helpers import TOLERANCE, assert_close, assert_within_reference_error, route_through_operators

LAYOUTS = ("contiguous", "channels_last", "strided")
SCALES = (1.0, 1.0, 0.0, 1e3, 1e-3)


def make_map(seed, shape, layout, scale, dtype=torch.float64, offset=0.0):
    """A (B, C, H, W) map in the given memory layout, values scale * N(offset, 1)."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if layout == "strided":  # every other channel of a larger map: a non-contiguous view
        x = (torch.randn(B, 2 * C, H, W, generator=g, dtype=torch.float64) + offset)[:, ::2]
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + offset
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return (x * scale).to(dtype)


@st.composite
def map_pair(draw, max_c=9, max_hw=7):
    """Student and teacher maps with their own channel counts, one (H, W)."""
    B = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    shapes = [(B, draw(st.integers(1, max_c)), H, W) for _ in range(2)]
    return [dict(seed=draw(st.integers(0, 2 ** 31)), shape=shape, layout=draw(st.sampled_from(LAYOUTS)),
                 scale=draw(st.sampled_from(SCALES))) for shape in shapes]


@st.composite
def fsp_maps(draw):
    """fm_s1, fm_s2, fm_t1, fm_t2: first maps equal to or twice their pair's (H, W)."""
    B, c1, c2 = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    specs = []
    for _ in range(2):  # student, teacher: their own spatial sizes
        H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        f = draw(st.sampled_from((1, 2)))
        specs += [(B, c1, f * H, f * W), (B, c2, H, W)]
    return [dict(seed=draw(st.integers(0, 2 ** 31)), shape=s, layout=draw(st.sampled_from(LAYOUTS)),
                 scale=draw(st.sampled_from((1.0, 1.0, 0.0, 1e2, 1e-2)))) for s in specs]


OPS = {
    "at_p2": (FF.at, R.at.at, (2,)),
    "at_p3": (FF.at, R.at.at, (3.0,)),
    "at_p1.5": (FF.at, R.at.at, (1.5,)),
    # normalize=True: F.normalize(mean_c |f|^p), RepDistiller's Attention map.
    "at_normalize_p2": (functools.partial(FF.at, normalize=True), functools.partial(R.at.at, normalize=True), (2,)),
    "at_normalize_p4": (functools.partial(FF.at, normalize=True), functools.partial(R.at.at, normalize=True), (4,)),
    "nst": (FF.nst, R.nst.nst, ()),
    "fsp": (FF.fsp, R.fsp.fsp, ()),
}


def loss_and_grads(fn, maps, extra, upstream, backend=None):
    xs = [m.detach().clone().requires_grad_() for m in maps]
    if backend is None:
        loss = fn(*xs, *extra)
    else:
        with fastkd.use_backend(backend):
            loss = fn(*xs, *extra)
    grads = torch.autograd.grad(loss, xs, upstream.to(loss.dtype))
    return loss, grads


def check_against_reference(op, specs, backend):
    fn, ref, extra = OPS[op]
    upstream = torch.randn((), generator=torch.Generator().manual_seed(specs[0]["seed"]), dtype=torch.float64)
    maps64 = [make_map(**s) for s in specs]
    loss, grads = loss_and_grads(fn, maps64, extra, upstream, backend)
    ref_loss, ref_grads = loss_and_grads(ref, maps64, extra, upstream)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, msg=f"{op} loss fp64")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_close(g, r, msg=f"{op} grad {i} fp64")
    B, C, H, W = specs[0]["shape"]
    if op.startswith("at") and H * W == 1:
        # One spatial position: the map is A / (|A| + 1e-6), 1 up to the epsilon, and its
        # gradient is O(1) terms cancelling to O(1e-6): there any fp32 route's error is luck,
        # whichever way the terms are grouped. The fp64 comparison above covers this shape.
        return
    # fp32: no further from the fp64 answer than 10x the reference's own fp32 error.
    maps32 = [m.float() for m in maps64]
    loss32, grads32 = loss_and_grads(fn, maps32, extra, upstream, backend)
    ref_loss32, ref_grads32 = loss_and_grads(ref, maps32, extra, upstream)
    assert loss32.dtype == torch.float32
    assert_within_reference_error(loss32, ref_loss32, ref_loss, msg=f"{op} loss fp32")
    for i, (g, r, e) in enumerate(zip(grads32, ref_grads32, ref_grads)):
        assert_within_reference_error(g, r, e, msg=f"{op} grad {i} fp32")


@pytest.mark.parametrize("op", ["at_p2", "at_p3", "nst"])
@given(specs=map_pair())
def test_triton_matches_reference(op, specs):
    check_against_reference(op, specs, "triton")


@given(specs=fsp_maps())
def test_triton_fsp_matches_reference(specs):
    check_against_reference("fsp", specs, "triton")


@given(specs=map_pair(), seed=st.integers(0, 2 ** 31))
def test_triton_at_general_p_matches_reference(specs, seed):
    # p < 2 has an infinite-slope |f|^(p-1) term near 0: keep the values away from 0.
    for s in specs:
        s["scale"] = 1.0
    fn, ref, extra = OPS["at_p1.5"]
    maps = [make_map(**s, offset=3.0) for s in specs]
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss, grads = loss_and_grads(fn, maps, extra, upstream, "triton")
    ref_loss, ref_grads = loss_and_grads(ref, maps, extra, upstream)
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("op", ["at_p2", "at_p3", "at_normalize_p2"])
@settings(max_examples=10)
@given(specs=map_pair(max_c=50))
def test_triton_at_channel_chunks(op, specs):
    """AT with its map kernels over chunks of 16 channels, a program each, and the chunks'
    maps added after (feature_maps.at_channel_chunks), as at ResNet's last layers on a GPU."""
    for s in specs:
        B, C, H, W = s["shape"]
        s["shape"] = (B, max(C, 33), H, W)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feature_maps, "_AT_PROGRAMS", 4096)
        patch.setattr(feature_maps, "_AT_MIN_CHANNELS", 16)
        assert all(feature_maps.at_channel_chunks(B, s["shape"][1], H * W)[1] >= 2 for s in specs)
        check_against_reference(op, specs, "triton")


@pytest.mark.parametrize("op", ["at_p2", "at_p3", "nst"])
@given(specs=map_pair(max_c=40, max_hw=12))
def test_torch_path_matches_reference(op, specs):
    check_against_reference(op, specs, "torch")


@given(specs=fsp_maps())
def test_torch_fsp_matches_reference(specs):
    check_against_reference("fsp", specs, "torch")


@pytest.mark.parametrize("shapes,form", [(((2, 30, 2, 3), (2, 25, 3, 2)), "NSTSpatialFunctionBackward"),
                                         (((2, 3, 4, 4), (2, 5, 2, 8)), "NSTFunctionBackward")])
def test_nst_triton_takes_the_smaller_form(shapes, form):
    # Many channels and few positions: the (HW x HW) Gram matrices are the smaller ones.
    specs = [dict(seed=i, shape=shape, layout=layout, scale=1.0)
             for i, (shape, layout) in enumerate(zip(shapes, ("contiguous", "channels_last")))]
    maps = [make_map(**spec).requires_grad_() for spec in specs]
    assert type(fa.nst(*maps).grad_fn).__name__ == form
    check_against_reference("nst", specs, "triton")


def test_nst_torch_path_hw_form():
    # Many channels, few positions: the (HW x HW) form is the cheaper one and is taken.
    specs = [dict(seed=1, shape=(2, 30, 2, 3), layout="contiguous", scale=1.0),
             dict(seed=2, shape=(2, 25, 3, 2), layout="channels_last", scale=1.0)]
    check_against_reference("nst", specs, "torch")


@pytest.mark.parametrize("op", ["at_p2", "nst", "fsp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(op, dtype):
    fn, ref, extra = OPS[op]
    shapes = ([(2, 5, 6, 6), (2, 7, 3, 3), (2, 5, 4, 4), (2, 7, 4, 4)] if op == "fsp"
              else [(2, 5, 6, 6), (2, 7, 6, 6)])
    maps = [make_map(i, s, "contiguous", 1.0) for i, s in enumerate(shapes)]
    upstream = torch.tensor(0.7, dtype=torch.float64)
    loss, grads = loss_and_grads(fn, [m.to(dtype) for m in maps], extra, upstream, "triton")
    exact, exact_grads = loss_and_grads(ref, maps, extra, upstream)
    assert loss.dtype == dtype
    assert_close(loss, exact, dtype=dtype)
    for g, e in zip(grads, exact_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=TOLERANCE[dtype]["rtol"],
                                   atol=TOLERANCE[dtype]["atol"] * e.abs().max().item())


def test_gradcheck():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    s, t = rand(2, 2, 3, 2), rand(2, 3, 3, 2)
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    assert check(lambda a, b: fa.ATFunction.apply(a, b, 2), (s, t))
    assert check(lambda a, b: fa.ATFunction.apply(a, b, 3.0), (s, t))
    assert check(fa.NSTFunction.apply, (s, rand(2, 3, 2, 3)))
    assert check(fa.NSTSpatialFunction.apply, (rand(2, 4, 1, 2), rand(2, 3, 2, 1)))
    assert check(fa.FSPFunction.apply, (rand(2, 2, 2, 2), rand(2, 3, 2, 2), rand(2, 2, 3, 1), rand(2, 3, 3, 1)))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors: every output must be fully written."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    def nan_empty_like(*args, **kwargs):
        x = empty_like(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


@pytest.mark.parametrize("op", ["at_p2", "at_p3", "nst", "fsp"])
def test_outputs_fully_written(op, poisoned_empty):
    fn, ref, extra = OPS[op]
    shapes = ([(3, 5, 10, 6), (3, 37, 5, 3), (3, 5, 5, 3), (3, 37, 5, 3)] if op == "fsp"
              else [(3, 35, 9, 9), (3, 7, 9, 9)])
    maps = [make_map(i, s, "channels_last", 1.0) for i, s in enumerate(shapes)]
    upstream = torch.tensor(1.3, dtype=torch.float64)
    loss, grads = loss_and_grads(fn, maps, extra, upstream, "triton")
    ref_loss, ref_grads = loss_and_grads(ref, maps, extra, upstream)
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def test_teacher_without_grad():
    s = make_map(0, (2, 3, 4, 4), "contiguous", 1.0).requires_grad_()
    t = make_map(1, (2, 5, 4, 4), "contiguous", 1.0)
    for fn in (lambda: fa.at(s, t, 2), lambda: fa.nst(s, t)):
        (g,) = torch.autograd.grad(fn(), [s])
        assert torch.isfinite(g).all()


# --- AT with normalize=True: M / max(||M||, 1e-12), M = mean_c |f|^p (F.normalize) ------------
# The clamp holds for a map whose channel mean has a norm below 1e-12: a dead (all-zero) sample,
# or values near 1e-7 (M ~ 1e-14). Such samples sit beside ordinary ones in one batch.
ROW_SCALES = (1.0, 1.0, 0.0, 1e-7, 3e-8, 1e-3, 1e4)


@st.composite
def clamped_map_pair(draw):
    """map_pair's student and teacher, each sample scaled by one of ROW_SCALES."""
    specs = draw(map_pair())
    for spec in specs:
        rows = draw(st.lists(st.sampled_from(ROW_SCALES), min_size=spec["shape"][0], max_size=spec["shape"][0]))
        spec["scale"] = torch.tensor(rows, dtype=torch.float64).view(-1, 1, 1, 1)
    return specs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["at_normalize_p2", "at_normalize_p4"])
@given(specs=map_pair())
def test_normalized_at_matches_reference(backend, op, specs):
    check_against_reference(op, specs, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@given(specs=clamped_map_pair())
def test_normalized_at_dead_and_sub_clamp_samples(backend, specs):
    check_against_reference("at_normalize_p2", specs, backend)


def test_normalized_at_clamp_gradient_is_autograd_s():
    # Sample 0 below the clamp (its map is M / 1e-12, no gradient to the norm), sample 1 dead,
    # sample 2 ordinary: autograd's F.normalize on the same float64 values, to rounding.
    s = make_map(0, (3, 4, 3, 5), "strided", 1.0)
    t = make_map(1, (3, 6, 3, 5), "channels_last", 1.0)
    s[0] *= 1e-7
    s[1] = 0
    t[2] *= 1e-7
    upstream = torch.tensor(0.9, dtype=torch.float64)
    ref_loss, ref_grads = loss_and_grads(R.at.at, [s, t], (2, True), upstream)
    assert s[0].square().mean(0).norm() < 0.5e-12  # the clamp holds there
    for backend in ("torch", "triton"):
        loss, grads = loss_and_grads(functools.partial(FF.at, normalize=True), [s, t], (2,), upstream, backend)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12 * r.abs().max().item())
        assert grads[0][1].abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@given(case=adversarial.cases())
def test_normalized_at_adversarial(backend, case):
    """test_adversarial_losses' inputs (spread, offset, tiny, huge, dead, duplicate rows; strided;
    float32, bfloat16, float16): within 10x the reference's own error in that dtype."""
    def make(g, c):
        tensors, cast, need, _ = adversarial.make_at(g, c)
        return tensors, cast, need, lambda impl, xs: impl(*xs, 2, True)
    with mock.patch.dict(adversarial.OPS, at=make):
        adversarial.check("at", backend, case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalized_at_half_inputs(backend, dtype):
    fn, ref, extra = OPS["at_normalize_p2"]
    maps = [make_map(i, s, layout, 1.0) for i, (s, layout) in enumerate([((3, 5, 6, 6), "strided"),
                                                                         ((3, 7, 6, 6), "channels_last")])]
    maps[0][2] = 0
    if dtype == torch.bfloat16:  # bfloat16 has float32's range: a sample below the clamp too
        maps[1][0] *= 1e-7
    upstream = torch.tensor(0.7, dtype=torch.float64)
    low = [m.to(dtype) for m in maps]
    loss, grads = loss_and_grads(fn, low, extra, upstream, backend)
    exact, exact_grads = loss_and_grads(ref, [m.double() for m in low], extra, upstream)
    assert loss.dtype == dtype
    assert_close(loss, exact, dtype=dtype)
    for g, e in zip(grads, exact_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=TOLERANCE[dtype]["rtol"],
                                   atol=TOLERANCE[dtype]["atol"] * e.abs().max().item())


def test_normalized_at_gradcheck():
    g = torch.Generator().manual_seed(2)
    # Away from the clamp: finite differences across it are meaningless (the clamp's gradient
    # is held to autograd's in test_normalized_at_clamp_gradient_is_autograd_s).
    s = torch.randn(3, 2, 3, 2, generator=g, dtype=torch.float64)
    t = torch.randn(3, 3, 3, 2, generator=g, dtype=torch.float64)
    inputs = (s.requires_grad_(), t.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: fa.ATFunction.apply(a, b, 2, True), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: fa.ATFunction.apply(a, b, 3.0, True), inputs, fast_mode=True)


def test_normalized_at_through_the_operators(monkeypatch):
    # The normalize flag through fastkd.device_ops' operator (the auto backend compiled on CUDA)
    # and through fastkd.ops' operator of ATFunction (the triton backend compiled).
    s, t = make_map(0, (2, 3, 4, 4), "contiguous", 1.0), make_map(1, (2, 5, 4, 4), "contiguous", 1.0)
    s[1] *= 1e-7
    upstream = torch.tensor(1.1, dtype=torch.float64)
    ref_loss, ref_grads = loss_and_grads(R.at.at, [s, t], (2, True), upstream)
    route_through_operators(monkeypatch)
    loss, grads = loss_and_grads(functools.partial(FF.at, normalize=True), [s, t], (2,), upstream)
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
    xs = [m.clone().requires_grad_() for m in (s, t)]
    tensors, floats, ints, layout = ops.flatten((*xs, 2.0, True))
    loss = ops._REGISTRY["ATFunction"][1](tensors, floats, ints, layout, [True, True, False, False])[0]
    assert_close(loss, ref_loss)
    for g, r in zip(torch.autograd.grad(loss, xs, upstream), ref_grads):
        assert_close(g, r)


def test_normalized_at_launches_nothing_new_and_syncs_nothing():
    # On meta tensors (no values: a host sync would raise) normalize runs the collection's
    # kernels, with other float arguments only: the compile check's AT specializations.
    meta = [torch.empty(s, device="meta", requires_grad=True) for s in ((2, 3, 5, 4), (2, 7, 5, 4))]
    launched = {}
    for normalize in (False, True):
        with ops.no_launches() as names:
            ctx = ops._Ctx([True, True, False, False])
            fa.ATFunction.forward(ctx, *meta, 2.0, normalize)
            fa.ATFunction.backward.__wrapped__(ctx, torch.ones((), device="meta"))
        launched[normalize] = names
    assert launched[True] == launched[False]


def test_normalize_must_be_a_bool():
    s, t = make_map(0, (2, 3, 4, 4), "contiguous", 1.0), make_map(1, (2, 5, 4, 4), "contiguous", 1.0)
    with pytest.raises(TypeError, match="normalize must be True or False"):
        FF.at(s, t, 2, normalize=1)
