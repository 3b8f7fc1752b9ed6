"""The pairwise losses on the inputs that break Gram-matrix arithmetic, every fast backend.

Each example draws features from tests/adversarial_rows.py (wide spread with a near-duplicate
pair at gap/spread ratios 1e-2..1e-7, two tight clusters, exact duplicates and a duplicate
block, dead rows, a large offset, tiny and huge scales), in float32, bfloat16 or float16, with
a teacher either independent or equal to the student up to a small relative noise (a
near-zero loss). The low-precision values are the inputs: the float64 answer is the
reference on exactly those values, so the comparison sees arithmetic error only, not the
rounding of the inputs.

Judged like this, for the loss and the gradient of every input under a random upstream
gradient: finite wherever the reference in the same dtype is finite, and within
helpers.ERROR_FACTOR times the reference's own error in that dtype
(helpers.assert_within_reference_error).
"""

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from fastkd import backend
from fastkd.kernels import angle, gram
from adversarial_rows import CASES, rows
from helpers import assert_within_reference_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _edge(f, x_s, x_t):
    # IRG's edge term over three graphs (fm1, fm2, feat); one input serves all three.
    return f((x_s, x_s, x_s, None), (x_t, x_t, x_t, None))


def _transformation(f, x_s, x_t):
    # IRG's transformation term from the rows: fm1 (N, C, 2, 2) and fm2 (N, 2C, 2, 2), whose
    # channels are averaged in pairs, cut from the same values.
    maps = []
    for x in (x_s, x_t):
        c = max(1, x.size(1) // 12)
        maps.append((x[:, :4 * c].reshape(-1, c, 2, 2), x[:, -8 * c:].reshape(-1, 2 * c, 2, 2)))
    return f(maps[0], maps[1])


# op -> how to call one of its implementations f on (x_s, x_t).
OPS = {
    "rkd": lambda f, s, t: f(s, t, 25.0, 50.0),  # both terms from one set of distances
    "rkd_distance": lambda f, s, t: f(s, t),
    "rkd_angle": lambda f, s, t: f(s, t),
    "sp": lambda f, s, t: f(s, t),
    "pkt_cos_sim": lambda f, s, t: f(s, t),
    "cc": lambda f, s, t: f(s, t, 0.4, 2),
    "irg_edge": _edge,
    "irg_transformation": _transformation,
}


def loss_and_grads(op, impl, s, t, grad_out):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    loss = OPS[op](backend.IMPLEMENTATIONS[op][impl], s, t)
    return (loss, *torch.autograd.grad(loss, (s, t), grad_out.to(loss.dtype)))


def inputs(n, d, case, gap_exp, near, dtype, seed):
    """(s, t) in dtype, exactly the values the float64 answer is computed on."""
    s = rows(n, d, case, seed, gap_exp)
    if near:
        noise = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed), dtype=s.dtype)
        t = s * (1 + 1e-3 * noise)
    else:
        t = rows(n, d + 5, case, seed + 1, gap_exp)
    return s.to(dtype), t.to(dtype)


def check(op, impl, n, d, case, gap_exp, near, dtype, seed):
    if op in ("rkd", "rkd_angle"):
        # With D = 1 every angle is exactly +-1 and its gradient exactly 0 in the reference;
        # angles read from distances meet that only to rounding (about 1e-10 here), which no
        # relative criterion at 0 admits.
        d = max(d, 2)
    if op == "irg_transformation":
        d = max(d, 8)  # the two maps are cut from 4 + 8 values of each row
    s, t = inputs(n, d, case, gap_exp, near, dtype, seed)
    if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
        reject()  # huge values in float16 (drawn only by the property tests)
    grad_out = torch.tensor(0.25 + seed % 7 / 4, dtype=torch.float64)
    compare(op, impl, s, t, grad_out, f"{op} {impl} {case} gap 1e-{gap_exp} near={near} {dtype} n={n} d={d}")


def compare(op, impl, s, t, grad_out, label):
    """op's loss and input gradients by impl on the low-precision s, t against the float64
    answer on exactly those values: finite where the reference in their dtype is, and within
    its own error."""
    exact = loss_and_grads(op, "reference", s.double(), t.double(), grad_out)
    ref = loss_and_grads(op, "reference", s, t, grad_out)
    fast = loss_and_grads(op, impl, s, t, grad_out)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), fast, ref, exact):
        assert a.dtype == r.dtype, f"{label} {name}: dtype {a.dtype}, reference {r.dtype}"
        finite = torch.isfinite(r)
        assert torch.isfinite(a[finite]).all(), f"{label} {name}: not finite where the reference is"
        if finite.all() and torch.isfinite(e).all():
            assert_within_reference_error(a, r, e, msg=f"{label} {name}")


CASE = dict(case=st.sampled_from(CASES), gap_exp=st.integers(2, 7), near=st.booleans(),
            dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=60)
@given(n=st.integers(2, 40), d=st.integers(1, 48), **CASE)
def test_torch_path(op, n, d, case, gap_exp, near, dtype, seed):
    check(op, "torch", n, d, case, gap_exp, near, dtype, seed)


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=12)
@given(n=st.integers(2, 12), d=st.integers(1, 24), **CASE)
def test_triton(op, n, d, case, gap_exp, near, dtype, seed):
    check(op, "triton", n, d, case, gap_exp, near, dtype, seed)


# The ops whose kernels sum along rows over chunks of the columns (gram.column_chunks).
CHUNKED = ("rkd_distance", "sp", "pkt_cos_sim", "cc", "irg_edge")


@pytest.mark.parametrize("op", CHUNKED)
@settings(max_examples=8)
@given(n=st.integers(33, 48), d=st.integers(1, 16), **CASE)
def test_triton_column_chunks(op, n, d, case, gap_exp, near, dtype, seed):
    """The same checks with every row's sums taken over two chunks of the columns, one program
    each, and added after, as a GPU runs them from N = 256 (gram.column_chunks)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gram, "CHUNK_PROGRAMS", 64)
        patch.setattr(gram, "CHUNK_MIN_TILES", 1)
        assert gram.column_chunks(n, n) == (32, 2)
        check(op, "triton", n, d, case, gap_exp, near, dtype, seed)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("gap_exp", [2, 4, 7])
def test_rkd_on_a_spread_batch_with_a_near_duplicate_pair(impl, gap_exp):
    """The case that diverged a training run: post-ReLU rows spread over ~5000, two of them
    close; float32 Gram arithmetic gave an angle loss of 1e9 here."""
    for op in ("rkd_distance", "rkd_angle", "rkd"):
        check(op, impl, 9, 16, "spread", gap_exp, False, torch.float32, 3)
        s, t = inputs(9, 16, "spread", gap_exp, False, torch.float32, 3)
        loss = loss_and_grads(op, impl, s, t, torch.tensor(1.0))[0]
        assert loss < 2 * (1 if op != "rkd" else 75), f"{op}: {loss}"  # smooth_l1 of unit-scale relations


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rkd_angle_on_rows_whose_squares_pass_float32(impl):
    """Rows of magnitude 1e22 and 1e33: their squared distances pass float32's range, where the
    reference's angles, from normalised difference vectors, stay finite (its overflowing norms
    make some of them 0). The float32 path scales each side's rows by a power of two first
    (fastkd.autograd._in_range): the angle term, alone or beside the distance term (whose
    reference is NaN here), within 10 eps of the float64 answer on the same values."""
    s = rows(12, 20, "spread", 3).float() * 1e19
    t = rows(12, 25, "spread", 4).float() * 1e30
    grad_out = torch.tensor(0.75, dtype=torch.float64)
    compare("rkd_angle", impl, s, t, grad_out, f"rkd_angle {impl} past float32's squares")
    for op in ("rkd_angle", "rkd"):
        exact = loss_and_grads(op, "reference", s.double(), t.double(), grad_out)
        for name, a, e in zip(("loss", "grad_s", "grad_t"), loss_and_grads(op, impl, s, t, grad_out), exact):
            assert_within_reference_error(a, e, e, msg=f"{op} {impl} past float32's squares {name}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1e12, 1e-13])
def test_sp_on_gram_rows_whose_squares_leave_float32(impl, scale):
    """Rows of magnitude 1e12 (G about 1e25, its squares past float32's range) and 1e-13 (G
    about 1e-25, its squares below it): SP's row norms of G are summed scaled by a power of
    two per row (the float32 path's _sp_split_norms), where they gave NaN (1e12) where the
    reference's loss and gradients are finite."""
    s = rows(12, 20, "spread", 3).float() * scale
    t = rows(12, 25, "spread", 4).float() * scale
    compare("sp", impl, s, t, torch.tensor(0.75, dtype=torch.float64), f"sp {impl} at {scale}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("seed", [0, 11, 13, 14])
def test_sp_small_rows_beside_large_ones(impl, seed):
    """Rows of magnitude 1e-6 beside rows of 1e6 (and zero rows): a small row's normalised G
    is near a unit vector, where W = 2 (diff - G^ dot) / n cancels a millionfold: formed in
    float32 it is 8% off and the gradients 20x the reference's error (seeds 11, 13, 14), so
    the float32 path forms the dots and W in double-float."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.tensor([1.0, 0.0, 1e-6, 1.0, 0.0, 1e6], dtype=torch.float64)
    s = (torch.randn(6, 8, generator=g, dtype=torch.float64) * mags[:, None]).float()
    t = (torch.randn(6, 8, generator=g, dtype=torch.float64) * mags.flip(0)[:, None]).float()
    compare("sp", impl, s, t, torch.tensor(0.75, dtype=torch.float64), f"sp {impl} small beside large, seed {seed}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1e10, 1e15])
def test_irg_edge_on_distances_whose_squares_leave_float32(impl, scale):
    """Rows of magnitude 1e10 and 1e15: max(E) past 1.8e19, whose square overflows float32,
    and at 1e15 near float32's largest. The maximum's share of IRG's edge gradient,
    -sum(diff E) / max^2 / count, read 0 at 1e10 on the float32 path (max * max = inf) and
    was NaN at 1e15 (sum(diff E) = inf), where the reference's division backward, (E / max)
    / max, keeps it finite: the kernels sum diff E / max instead."""
    s = rows(12, 20, "spread", 3).float() * scale
    t = rows(12, 25, "spread", 4).float() * scale
    compare("irg_edge", impl, s, t, torch.tensor(0.75, dtype=torch.float64), f"irg_edge {impl} at {scale}")


def _anchor_order(s, t, lo=0, anchors=None):
    """angle.anchor_order of RKD's float32 angle path on the rows s, t (as float32)."""
    parts = [p for x in (s, t) for p in gram.squared_distances_parts(x.float())]
    n = len(s)
    return angle.anchor_order(parts, n, lo, n - lo if anchors is None else anchors)


def _paths(s, t, lo=0, anchors=None):
    """(order, count) of RKD's float32 angle path on the float32 rows s, t: the anchors
    (offsets from lo) with those it hands over (to the exact or the direct path) first,
    count of them."""
    order, counts = _anchor_order(s, t, lo, anchors)[:2]
    return order, counts[1]


def _planted(n, d, pairs, gap, seed):
    """Spread rows (n, d) float64 with a near-duplicate of row a at row b for each (a, b) in
    pairs, gap/spread = gap: the anchors RKD's float32 angle path hands to its exact one."""
    x = rows(n, d, "spread", seed, gap_exp=2)
    gen = torch.Generator().manual_seed(seed + 1)
    spread = x.norm(dim=1).max()
    for a, b in pairs:
        x[b] = x[a] + torch.randn(d, generator=gen, dtype=x.dtype) * (spread * gap / d ** 0.5)
    return x


@pytest.mark.parametrize("near", [False, True])
def test_rkd_angle_exact_anchors_in_many_tiles(near):
    """Near-duplicate pairs in three of the three row blocks (N = 70, 32-row tiles) and across
    them: their anchors take the float64 path, every other one the float32 path, and the
    mix, loss and gradients, stays within the reference's own float32 error."""
    pairs = ((0, 1), (33, 34), (40, 66))
    s = _planted(70, 12, pairs, 1e-7, 5)
    t = s * (1 + 1e-3 * torch.randn(s.shape, generator=torch.Generator().manual_seed(9), dtype=s.dtype)) \
        if near else _planted(70, 15, pairs[1:], 1e-7, 6)
    order, count = _paths(s, t)
    assert sorted(order[:int(count)].tolist()) == [0, 1, 33, 34, 40, 66]
    assert sorted(order.tolist()) == list(range(70))
    compare("rkd_angle", "triton", s.float(), t.float(), torch.tensor(0.75, dtype=torch.float64),
            f"exact anchors in many tiles, near={near}")


@pytest.mark.parametrize("near", [False, True])
def test_rkd_angle_fast_path_on_distances_spread_over_thousands(near):
    """Every anchor on the float32 path (no close pair), with distances from one anchor
    spread over three decades: uncompensated float32 polarisation is 1e-4 off on an angle
    here (with every tile plain, angle.PLAIN_RATIO_SQ = inf, the gradients fail); the tiles'
    bounds hand such tiles to the compensated sums, which keep loss and gradients within the
    reference's own error."""
    s = rows(40, 12, "spread", 5, gap_exp=2)
    t = s * (1 + 1e-3 * torch.randn(s.shape, generator=torch.Generator().manual_seed(9), dtype=s.dtype)) \
        if near else rows(40, 15, "spread", 6, gap_exp=2)
    assert int(_paths(s, t)[1]) == 0
    compare("rkd_angle", "triton", s.float(), t.float(), torch.tensor(1.25, dtype=torch.float64),
            f"distances over three decades, near={near}")


def _plain_tiles(s, t):
    """(admitted, bounds): which (anchor, j block, k block) tiles of RKD's float32 angle path
    take plain polarisation (angle._plain_tile's test, on the bounds anchor_order forms)."""
    bounds = _anchor_order(s, t)[-1]
    r = angle.PLAIN_RATIO_SQ
    top, low = bounds[..., 0::2], bounds[..., 1::2]  # (anchors, blocks, side)
    ok = (top[:, :, None] <= r * low[:, None, :]) & (top[:, None, :] <= r * low[:, :, None])
    return ok.all(-1), bounds


def test_rkd_angle_plain_tile_bounds():
    """Per anchor and block of 32 directions, each side's largest and smallest live squared
    distance, (0, inf) where none is live (rows 32:40 equal to row 0 and to each other)."""
    s = rows(40, 6, "offset", 1).float()
    s[32:] = s[0]
    t = rows(40, 9, "spread", 2, gap_exp=2).float()
    bounds = _plain_tiles(s, t)[1]
    for side, x in enumerate((s, t)):
        e = gram.squared_distances_parts(x)[0].double()
        live = e >= angle.NORM_EPS ** 2
        for block in range(2):
            cols = slice(32 * block, 32 * block + 32)
            top = torch.where(live, e, 0)[:, cols].amax(1)
            low = torch.where(live, e, float("inf"))[:, cols].amin(1)
            assert torch.equal(bounds[:, block, 2 * side].double(), top)
            assert torch.equal(bounds[:, block, 2 * side + 1].double(), low)
    assert bounds[0, 1, 0] == 0 and bounds[0, 1, 1] == float("inf")


@pytest.mark.parametrize("near", [False, True])
def test_rkd_angle_plain_tiles_beside_compensated(near):
    """Gaussian rows (N = 70, three blocks) with rows 38 and 45 moved 4x farther out: the tiles
    of their block take the compensated sums at almost every anchor, the others plain
    polarisation (the forward's row-sum tiles included); the mix, loss and gradients, stays
    within the reference's own float32 error."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(70, 32, generator=gen, dtype=torch.float64)
    s[[38, 45]] *= 4
    t = s * (1 + 1e-3 * torch.randn(s.shape, generator=gen, dtype=s.dtype)) if near \
        else torch.randn(70, 37, generator=gen, dtype=torch.float64)
    admitted = _plain_tiles(s, t)[0].double().mean(0)  # the share of anchors, per tile
    assert (admitted[[0, 0, 2, 2], [0, 2, 0, 2]] > 0.9).all() and (admitted[1] < 0.1).all()
    compare("rkd_angle", "triton", s.float(), t.float(), torch.tensor(0.75, dtype=torch.float64),
            f"plain tiles beside compensated ones, near={near}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rkd_angle_rows_on_a_line(seed):
    """Rows on a line (D = 2, N = 40) and a teacher that scales and shifts them: every angle is
    +-1 on both sides, u is rounding alone and the angles' derivatives vanish, so the gradient
    is a difference of nearly equal terms. Row 0 sits apart from the others, whose distances
    from it spread less than 2x: its tiles take plain polarisation. The forward's row sums and
    the gradient's tiles must form u alike there (a plain u in one and a compensated one in the
    other measured 90-1,400x the reference's error on the gradients); as built 0.8-1.1x. (Seed
    3 reads 10.3x with every tile compensated too: a limit of the compensated path on a line.)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.zeros(1, 1, dtype=torch.float64),
                   1 + 0.9 * torch.rand(39, 1, generator=gen, dtype=torch.float64)])
    s = x * torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = 3 * s + 1
    assert _plain_tiles(s, t)[0][0].all()
    compare("rkd_angle", "triton", s.float(), t.float(), torch.tensor(0.75, dtype=torch.float64),
            f"rows on a line, seed {seed}")


def test_rkd_angle_paths_by_input():
    """Rows without a close pair take the fast path at every anchor, a NaN row's anchors the
    exact one (the reference's NaN); a global batch's share of the anchors keeps its own."""
    x = rows(20, 8, "offset", 0)
    assert int(_paths(x, x)[1]) == 0
    y = x.clone()
    y[3] = float("nan")
    order, count = _paths(x, y)
    assert int(count) == 20  # every anchor sees the NaN row
    # The anchors 5:12 only, as offsets from 5, with rows 6 and 9 a near-duplicate pair.
    z = _planted(20, 8, ((6, 9),), 1e-7, 0)
    order, count = _paths(z, z, lo=5, anchors=7)
    assert sorted(order.tolist()) == list(range(7)) and sorted(order[:int(count)].tolist()) == [1, 4]
    loss = backend.IMPLEMENTATIONS["rkd_angle"]["triton"](x.float(), y.float())
    assert torch.isnan(loss)
