"""RKD's angle term where reading angles from squared distances loses digits: float64 inputs
with a near-duplicate pair (an anchor whose distances spread over many decades), and
directions shorter than F.normalize's clamp but not zero (rows of magnitude 1e-15), on both
fast backends.

Float64 results are held to 10x the reference's own float64 error, both measured against
the same formula in numpy's long double (64-bit significand: 2^11 times float64's), for the
loss and the gradients of both inputs under an upstream gradient; float32 results as
test_adversarial_pairwise's `compare` holds them (the float64 reference on the same values).
"""
import itertools
import numpy as np
import pytest
import torch

from fastkd import backend
from helpers import assert_within_reference_error
from test_adversarial_pairwise import compare, loss_and_grads

LD = np.longdouble
IMPLS = ("torch", "triton")
GRAD_OUT = 0.75

pytestmark = pytest.mark.skipif(np.finfo(LD).eps > 1e-18, reason="numpy's long double is no wider than "
                                "float64 here: no oracle for float64's own error")


def _oracle(s, t):
    """The collection's angle loss and its gradients (s, t) at GRAD_OUT, in long double:
    e_ij = (x_j - x_i) / max(|x_j - x_i|, 1e-12), A = e_ij . e_ik, loss = mean h(A_s - A_t);
    the gradients by F.normalize's and the product's derivatives (autograd's)."""
    n = len(s)
    sides = []
    for x in (s, t):
        x = np.asarray(x.detach().numpy(), dtype=LD)
        d = x[None, :, :] - x[:, None, :]  # [i, j] = x_j - x_i
        norm = np.sqrt((d * d).sum(2))
        m = np.maximum(norm, LD(1e-12))
        e = d / m[..., None]
        sides.append((e, m, norm >= LD(1e-12), np.einsum("ijf,ikf->ijk", e, e)))
    diff = sides[0][3] - sides[1][3]
    loss = np.where(np.abs(diff) < 1, diff * diff / 2, np.abs(diff) - LD(0.5)).sum() / LD(n ** 3)
    u = np.clip(diff, -1, 1) * (LD(GRAD_OUT) / LD(n ** 3))
    grads = []
    for (e, m, live, _), sign in zip(sides, (1, -1)):
        g = 2 * sign * np.einsum("ijk,ikf->ijf", u, e)  # dL/de_ij
        dd = (g - live[..., None] * e * (e * g).sum(2)[..., None]) / m[..., None]  # dL/d(x_j - x_i)
        grads.append(dd.sum(0) - dd.sum(1))
    return loss, *grads


def _check_float64(op_impl, s, t, label):
    """op_impl's rkd_angle loss and gradients on the float64 s, t within 10x the float64
    reference's own error, both against _oracle, in the 2-norm (floors as
    helpers.assert_within_reference_error: eps |exact|, eps^2)."""
    exact = _oracle(s, t)
    grad_out = torch.tensor(GRAD_OUT, dtype=torch.float64)
    ref = loss_and_grads("rkd_angle", "reference", s, t, grad_out)
    fast = loss_and_grads("rkd_angle", op_impl, s, t, grad_out)
    eps = LD(np.finfo(np.float64).eps)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), fast, ref, exact):
        a, r = (np.asarray(v.detach().numpy(), dtype=LD) for v in (a, r))
        err, ref_err = np.sqrt(((a - e) ** 2).sum()), np.sqrt(((r - e) ** 2).sum())
        allowed = 10 * max(ref_err, eps * np.sqrt((e * e).sum()), eps ** 2)
        assert err <= allowed, (f"{label} {op_impl} {name}: error {float(err):.3e}, 10x the float64 "
                                f"reference's own {float(ref_err):.3e}")


def _spread(n, d, pairs, gap, seed):
    """The issue's rows: 1000 + 50 randn (n, d) float64, and for each (a, b) in pairs row b =
    row a + a random offset of norm about `gap`."""
    g = torch.Generator().manual_seed(seed)
    x = 1000 + 50 * torch.randn(n, d, generator=g, dtype=torch.float64)
    for a, b in pairs:
        x[b] = x[a] + gap * torch.randn(d, generator=g, dtype=torch.float64) / d ** 0.5
    return x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gap", [1e-9, 1e-8])
def test_float64_near_duplicate_pair(impl, gap):
    """The reported case: 16 x 32 rows spread over 50 around 1000, two of them `gap` apart;
    by the law of cosines the loss was 3e-7 (1e-9) / 9e-8 (1e-8) relative off and the student
    gradient 4e-5 / 5e-6, where the reference is within 1e-16."""
    s = _spread(16, 32, ((3, 7),), gap, 0)
    t = _spread(16, 35, ((3, 7),), gap, 1)
    _check_float64(impl, s, t, f"gap {gap}")


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_near_duplicates_in_many_tiles(impl):
    """Near-duplicate pairs within and across the three 32-row blocks of N = 70 (and on one
    side only): their anchors take the direct path, the rest the law of cosines."""
    s = _spread(70, 6, ((0, 1), (33, 34), (40, 66)), 1e-9, 2)
    t = _spread(70, 7, ((0, 1), (40, 66), (20, 69)), 1e-8, 3)
    if impl == "triton":
        from fastkd.kernels import angle, gram
        order, counts = angle.exact_anchor_order(gram.squared_distances(s), gram.squared_distances(t), 0, 70)
        direct = set(order[:int(counts[0])].tolist())
        assert {0, 1, 33, 34, 40, 66, 20, 69} <= direct and len(direct) < 70
        assert sorted(order.tolist()) == list(range(70)) and int(counts[1]) == 70
    _check_float64(impl, s, t, "many tiles")


def _dead(n, d, seed, dtype):
    """Rows (n, d) of unit scale with row 1 zero and rows 2 and 5 of magnitude 1e-15: the
    directions among rows 1, 2, 5 are shorter than F.normalize's clamp (1e-12) but not zero
    (but 1 to itself), which the reference scales by 1e12."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1] = 0
    x[2] = 1e-15 * torch.randn(d, generator=g, dtype=torch.float64)
    x[5] = 2e-15 * torch.randn(d, generator=g, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1.0, 1e-15])
def test_float64_short_directions(impl, scale):
    """Directions in (0, 1e-12): at scale 1e-15 every row is tiny (every anchor)."""
    s, t = _dead(9, 6, 0, torch.float64) * scale, _dead(9, 8, 1, torch.float64) * scale
    _check_float64(impl, s, t, f"short directions, scale {scale}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1.0, 1e-15, 1e10])
def test_float32_short_directions(impl, scale):
    """The same in float32 (the Triton path's float32 kernels hand these anchors over too).
    At scale 1e10 the directions among rows 1, 2 and 5 are live (1e-5 long) but 1e15 times
    shorter than the others from the same anchor, where the law of cosines in float64 loses
    every digit: those anchors take the direct path by their spread (DIRECT_RATIO_SQ_FLOAT32)."""
    s, t = _dead(9, 6, 0, torch.float32) * scale, _dead(9, 8, 1, torch.float32) * scale
    compare("rkd_angle", impl, s, t, torch.tensor(GRAD_OUT, dtype=torch.float64), f"float32 short, scale {scale}")


@pytest.mark.parametrize("impl", IMPLS)
def test_short_directions_with_both_terms(impl):
    """rkd with both terms: the direct path's gradient is added to the distance term's."""
    s, t = _dead(9, 6, 0, torch.float32), _dead(9, 8, 1, torch.float32)
    compare("rkd", impl, s, t, torch.tensor(GRAD_OUT, dtype=torch.float64), "rkd, float32 short")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_anchors_in_chunks(dtype, monkeypatch):
    """The direct path's gradient launched DIRECT_CHUNK anchors at a time (2 here: several
    launches for these rows' direct anchors, the last ones past the count) gives the
    gradients one launch gives, to the order of the additions."""
    from fastkd.kernels import angle
    s, t = _dead(20, 6, 5, dtype), _dead(20, 8, 6, dtype)
    grad_out = torch.tensor(GRAD_OUT, dtype=torch.float64)
    whole = loss_and_grads("rkd_angle", "triton", s, t, grad_out)
    monkeypatch.setattr(angle, "DIRECT_CHUNK", 2)
    chunked = loss_and_grads("rkd_angle", "triton", s, t, grad_out)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for name, a, b in zip(("loss", "grad_s", "grad_t"), chunked, whole):
        assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())), name
    assert not torch.equal(whole[1], torch.zeros_like(whole[1]))


def test_paths_by_input():
    """Float64 rows without a close pair or a short direction keep the law of cosines at every
    anchor; the direct path's anchors come first in the order, chosen on the device."""
    from fastkd.kernels import angle, gram
    x = _spread(20, 16, (), 0, 4)
    e = gram.squared_distances(x)
    order, counts = angle.exact_anchor_order(e, e, 0, 20)
    assert counts.tolist() == [0, 20, 20]
    y = _dead(20, 6, 5, torch.float64)  # rows 1, 2, 5 close to each other
    e = gram.squared_distances(y)
    order, counts = angle.exact_anchor_order(e, e, 0, 20)
    assert int(counts[0]) >= 3 and {1, 2, 5} <= set(order[:int(counts[0])].tolist())
    # float32 rows: only short directions leave the float32 path for the direct one.
    parts = [p for z in (y.float(), y.float()) for p in gram.squared_distances_parts(z)]
    order, counts = angle.anchor_order(parts, 20, 0, 20)[:2]
    assert sorted(order[:int(counts[0])].tolist()) == [1, 2, 5]


def _sharded(impl, monkeypatch, s, t, bounds):
    """The angle term of a global batch (s, t) as ranks owning the rows bounds[r]:bounds[r + 1]
    compute it (RKDRowsFunction / RKDAngleRows, this rank's anchors from every rank's E), with
    the gather of E standing in for the collective: (loss, grad_s, grad_t) summed over ranks."""
    from fastkd import autograd as triton_path
    from fastkd.kernels import gram
    from fastkd.torch_backend import pairwise as torch_path
    if impl == "torch":
        distances = torch_path.squared_distances
    elif s.dtype == torch.float64:
        distances = gram.squared_distances
    else:  # as the float32 path forms E: float32 parts, gathered hi and lo apart
        distances = gram.squared_distances_parts
    full = [part for x in (s, t) for part in ((distances(x),) if impl == "torch" or s.dtype == torch.float64
                                               else distances(x))]
    gathered = itertools.cycle(full)  # the gathers come in this order: student first, hi before lo

    def gather(e, group, sizes):  # E's rows lo:lo + n (of one side, or one part) -> all of them
        whole = next(gathered)
        assert torch.equal(whole[lo:lo + len(e)], e)
        return whole, lo

    monkeypatch.setattr(triton_path if impl == "triton" else torch_path, "all_gather_rows", gather)
    total = [0, 0, 0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x_s, x_t = s.detach().requires_grad_(), t.detach().requires_grad_()
        if impl == "triton":
            part = triton_path.RKDRowsFunction.apply(x_s, x_t, lo, hi - lo, 0.0, 1.0, None, None)
        else:
            part = torch_path.RKDAngleRows.apply(x_s, x_t, lo, hi, None, None)
        got = (part, *torch.autograd.grad(part, (x_s, x_t), torch.tensor(GRAD_OUT, dtype=part.dtype)))
        total = [a + b for a, b in zip(total, got)]
    return total


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_sharded_anchors(impl, monkeypatch):
    """A global batch's ranks: the direct path's anchors (near-duplicate pairs within a rank's
    rows and across two ranks, short directions) at offsets lo > 0, the sum over the ranks
    within 10x the float64 reference's error."""
    s = _spread(20, 8, ((3, 14), (6, 9)), 1e-9, 6)
    t = _spread(20, 9, ((3, 14), (15, 16)), 1e-8, 7)
    s[18], s[19] = 1e-15, -1e-15  # rows 18, 19: a short direction from each other
    loss, g_s, g_t = _sharded(impl, monkeypatch, s, t, (0, 5, 12, 20))
    exact = _oracle(s, t)
    ref = loss_and_grads("rkd_angle", "reference", s, t, torch.tensor(GRAD_OUT, dtype=torch.float64))
    eps = LD(np.finfo(np.float64).eps)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), (loss, g_s, g_t), ref, exact):
        a, r = (np.asarray(v.detach().numpy(), dtype=LD) for v in (a, r))
        err, ref_err = np.sqrt(((a - e) ** 2).sum()), np.sqrt(((r - e) ** 2).sum())
        assert err <= 10 * max(ref_err, eps * np.sqrt((e * e).sum()), eps ** 2), (impl, name, float(err),
                                                                                 float(ref_err))


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_sharded_short_directions(impl, monkeypatch):
    """Float32 rows with short directions across two ranks' rows: the sharded float32 path
    hands those anchors (at lo > 0 too) to the direct path."""
    s, t = _dead(14, 6, 8, torch.float32), _dead(14, 8, 9, torch.float32)
    s[11], t[12] = s[2] * 3, t[5] * 0.5  # short directions from rows 11 and 12 (the last rank)
    got = _sharded(impl, monkeypatch, s, t, (0, 4, 14))
    grad_out = torch.tensor(GRAD_OUT, dtype=torch.float64)
    exact = loss_and_grads("rkd_angle", "reference", s.double(), t.double(), grad_out)
    ref = loss_and_grads("rkd_angle", "reference", s, t, grad_out)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), got, ref, exact):
        assert_within_reference_error(a, r, e, msg=f"sharded float32 {impl} {name}")


def _distance_oracle(s, t):
    """The collection's distance loss and its gradients (s, t) at GRAD_OUT, in long double:
    d = sqrt(max(E, 1e-12)) off the diagonal (E from the difference vectors), each side over
    its mean off the diagonal, loss = mean h(d_s / m_s - d_t / m_t); the gradients by hand
    (the clamp's is 0)."""
    n = len(s)
    off = ~np.eye(n, dtype=bool)
    sides = []
    for x in (s, t):
        x = np.asarray(x.detach().numpy(), dtype=LD)
        diff = x[:, None, :] - x[None, :, :]  # [a, b] = x_a - x_b
        e = (diff * diff).sum(2)
        d = np.where(off, np.sqrt(np.maximum(e, LD(1e-12))), 0)
        sides.append((diff, d, off & (e > LD(1e-12)), d.sum() / LD(off.sum())))
    q = sides[0][1] / sides[0][3] - sides[1][1] / sides[1][3]
    loss = np.where(np.abs(q) < 1, q * q / 2, np.abs(q) - LD(0.5)).sum() / LD(n * n)
    u = np.clip(q, -1, 1) * (LD(GRAD_OUT) / LD(n * n))
    grads = []
    for (diff, d, live, m), sign in zip(sides, (1, -1)):
        gd = sign * (u / m - (u * d).sum() / (m * m * LD(off.sum())) * off)  # dL/dd_ab
        c = np.where(live, gd / np.where(live, d, 1), 0)
        grads.append(((c + c.T)[:, :, None] * diff).sum(1))
    return loss, *grads


def _mixed(mags, d, seed, dtype):
    """Rows (len(mags), d): randn times each row's magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(mags), d, generator=g, dtype=torch.float64)
    return (x * torch.tensor(mags, dtype=torch.float64)[:, None]).to(dtype)


MIXED = ((1e-5, 1e-20, 1e8, 0.0, 1e3, 1e-20, 1e-20, 1e8), (1e8, 1e-20, 1e-5, 1e-20, 1.0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mags", MIXED)
def test_distance_term_on_rows_of_mixed_magnitudes(impl, dtype, mags):
    """Small rows (1e-20..1e-5) beside rows of 1e8: the gradient of a small pair's distance,
    formed as a product with the centred rows, kept about 1e-8 |x - mean| of absolute
    rounding: 4e-4 of itself (the CPU path 42x the float32 reference's error, 1e15x the
    float64 one's; the Triton path on float64 alike). Both backends form such pairs from
    their differences: within 10x the reference's own error, both against a long-double
    oracle, loss and gradients."""
    s, t = _mixed(mags, 5, 1, dtype), _mixed(mags[::-1], 7, 2, dtype)
    exact = _distance_oracle(s, t)
    grad_out = torch.tensor(GRAD_OUT, dtype=torch.float64)
    ref = loss_and_grads("rkd_distance", "reference", s, t, grad_out)
    fast = loss_and_grads("rkd_distance", impl, s, t, grad_out)
    eps = LD(np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps)
    for name, a, r, e in zip(("loss", "grad_s", "grad_t"), fast, ref, exact):
        a, r = (np.asarray(v.detach().double().numpy(), dtype=LD) for v in (a, r))
        err, ref_err = np.sqrt(((a - e) ** 2).sum()), np.sqrt(((r - e) ** 2).sum())
        allowed = 10 * max(ref_err, eps * np.sqrt((e * e).sum()), eps ** 2)
        assert err <= allowed, f"{impl} {dtype} {name}: error {float(err):.3e}, reference's {float(ref_err):.3e}"


def test_distance_grad_by_rows_on_rows_of_mixed_magnitudes():
    """The CPU path's gradient map, whole (distance_grad) and by a global batch's row blocks
    (distance_grad_rows, summed over the blocks), on small rows beside large ones: each row's
    2 sum_b (W_ab + W_ba)(x_a - x_b) to 1e-13 of the sum of its terms' sizes."""
    from fastkd.torch_backend import pairwise
    x = _mixed(MIXED[0], 5, 3, torch.float32)
    e = pairwise.squared_distances(x)
    w = torch.randn(len(x), len(x), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xs, ws = np.asarray(x.double().numpy(), dtype=LD), np.asarray(w.numpy(), dtype=LD)
    terms = 2 * (ws + ws.T)[:, :, None] * (xs[:, None, :] - xs[None, :, :])
    exact, size = terms.sum(1), np.abs(terms).sum(1)
    whole = pairwise.distance_grad(x, w, e)
    blocks = sum(pairwise.distance_grad_rows(x, w[lo:hi], e[lo:hi], lo) for lo, hi in ((0, 3), (3, 8)))
    for name, g in (("whole", whole), ("row blocks", blocks)):
        err = np.abs(np.asarray(g.numpy(), dtype=LD) - exact)
        assert (err <= LD(1e-13) * size).all(), f"{name}: worst {float((err / size).max()):.3e} of its terms"
