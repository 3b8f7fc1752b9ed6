"""Properties the math guarantees, checked on the references with hypothesis; gradcheck."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastkd import reference as R

sizes = st.integers(2, 7)
dims = st.integers(1, 6)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.05, 20.0)


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@given(seed=seeds, n=sizes, d_s=dims, d_t=dims, c=scales)
def test_relational_losses_ignore_feature_scale(seed, n, d_s, d_t, c):
    s, t = randn(seed, n, d_s), randn(seed + 1, n, d_t)
    for loss in (R.RKD(25, 50), R.CC(0.4, 2), R.SP()):
        close(loss(c * s, t), loss(s, t), rtol=1e-7, atol=1e-9)
        close(loss(s, c * t), loss(s, t), rtol=1e-7, atol=1e-9)
    # PKT adds 1e-6 to a norm, so it is scale-free only up to that epsilon, and only while no
    # two rows point in opposite directions (there (cos + 1) / 2 is itself of order 1e-6).
    s, t = randn(seed, n, d_s + 3), randn(seed + 1, n, d_t + 3)
    c = max(c, 1.0)  # shrinking rows would make the epsilon relatively larger
    close(R.PKTCosSim()(c * s, t), R.PKTCosSim()(s, t), rtol=1e-4, atol=1e-8)


@given(seed=seeds, n=sizes, c=scales)
def test_attention_transfer_ignores_map_scale(seed, n, c):
    s, t = randn(seed, n, 3, 4, 4), randn(seed + 1, n, 5, 4, 4)
    close(R.AT(2)(c * s, t), R.AT(2)(s, t), rtol=1e-4, atol=1e-9)


@given(seed=seeds, n=sizes, d=dims, shift=st.floats(-30, 30))
def test_rkd_ignores_translation(seed, n, d, shift):
    s, t = randn(seed, n, d), randn(seed + 1, n, d)
    offset = shift * randn(seed + 2, 1, d)
    close(R.RKD(25, 50)(s + offset, t), R.RKD(25, 50)(s, t), rtol=1e-6, atol=1e-8)


@given(seed=seeds, n=sizes, d=dims)
def test_symmetric_losses_are_symmetric(seed, n, d):
    a, b = randn(seed, n, d), randn(seed + 1, n, d)
    fa, fb = randn(seed + 2, n, 2, 3, 3), randn(seed + 3, n, 2, 3, 3)
    for loss in (R.Logits(), R.RKD(25, 50), R.CC(0.4, 3), R.SP()):
        close(loss(a, b), loss(b, a))
    for loss in (R.Hint(), R.AT(2), R.NST(), R.FT()):
        close(loss(fa, fb), loss(fb, fa))


@given(seed=seeds, n=sizes, k=st.integers(2, 9), T=st.floats(0.5, 20))
def test_kl_losses_are_zero_on_equal_logits_and_positive_otherwise(seed, n, k, T):
    a, b = randn(seed, n, k), randn(seed + 1, n, k)
    for loss in (R.SoftTarget(T), R.BSS(T), R.DML()):
        assert abs(loss(a, a).item()) < 1e-12
        assert loss(a, b).item() >= 0
    # Softmax ignores a per-row shift; the T^2 factor is the only difference from BSS.
    close(R.SoftTarget(T)(a + randn(seed + 2, n, 1), b), R.SoftTarget(T)(a, b))
    close(R.SoftTarget(T)(a, b), T * T * R.BSS(T)(a, b))


@given(seed=seeds, n=sizes, d=dims)
def test_losses_vanish_when_student_equals_teacher(seed, n, d):
    x = randn(seed, n, d)
    fm = randn(seed + 1, n, 3, 4, 4)
    for loss, args in ((R.RKD(25, 50), (x, x)), (R.PKTCosSim(), (x, x)), (R.CC(0.4, 2), (x, x)),
                       (R.SP(), (x, x)), (R.AT(2), (fm, fm)), (R.NST(), (fm, fm)), (R.FT(), (fm, fm)),
                       (R.FSP(), (fm, fm, fm, fm)), (R.Hint(), (fm, fm))):
        assert abs(loss(*args).item()) < 1e-10, type(loss).__name__


@given(seed=seeds, n=sizes, d=dims)
def test_gradients_are_finite_with_duplicate_rows(seed, n, d):
    s = randn(seed, n, d)
    s[-1] = s[0]  # a zero difference vector
    t = randn(seed + 1, n, d + 1)
    for loss in (R.RKD(25, 50), R.PKTCosSim(), R.CC(0.4, 2), R.SP()):
        x = s.clone().requires_grad_()
        g, = torch.autograd.grad(loss(x, t), x)
        assert torch.isfinite(g).all(), type(loss).__name__


def _gradcheck(fn, *shapes, seed=0):
    inputs = [randn(seed + i, *s).requires_grad_() for i, s in enumerate(shapes)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn,shapes", [
    (R.Logits(), [(3, 4), (3, 4)]),
    (R.SoftTarget(3.0), [(3, 4), (3, 4)]),
    (R.DML(), [(3, 4), (3, 4)]),
    (R.BSS(2.0), [(3, 4), (3, 4)]),
    (R.AT(2), [(2, 2, 3, 3), (2, 3, 3, 3)]),
    (R.AT(3), [(2, 2, 3, 3), (2, 3, 3, 3)]),
    (R.Hint(), [(2, 2, 3, 3), (2, 2, 3, 3)]),
    (R.NST(), [(2, 2, 3, 3), (2, 3, 3, 3)]),
    (R.FSP(), [(2, 2, 4, 4), (2, 3, 2, 2), (2, 2, 4, 4), (2, 3, 2, 2)]),
    (R.FT(), [(2, 2, 3, 3), (2, 2, 3, 3)]),
    (R.PKTCosSim(), [(4, 3), (4, 5)]),
    (R.RKD(25, 50), [(4, 3), (4, 5)]),
    (R.SP(), [(4, 2, 2), (4, 3, 2)]),
    (R.CC(0.4, 2), [(4, 3), (4, 5)]),
    (lambda a, b, c, d: R.IRG(0.1, 5, 5)((a, b, c, d), (a * 2, b + 1, c.sin(), d.cos())),
     [(4, 2, 4, 4), (4, 4, 2, 2), (4, 3), (4, 5)]),
    (lambda a, b, alpha: R.vid.vid(a, b, alpha), [(2, 3, 2, 2), (2, 3, 2, 2), (3,)]),
    (lambda a, b, rho: R.afd.afd(a, b, rho.softmax(1)), [(2, 3, 2, 2), (2, 3, 2, 2), (2, 3)]),
    (lambda e: R.crd.crd_contrast(e, randn(9, 3, 4), torch.tensor([[0, 1, 2], [2, 0, 1]]), 0.5, 3.0, 10),
     [(2, 4)]),
])
def test_gradcheck(fn, shapes):
    _gradcheck(fn, *shapes)


def test_gradcheck_ab_and_ofd_away_from_their_kinks():
    # AB and OFD are piecewise: keep samples off the mask boundaries.
    s = (randn(0, 2, 2, 3, 3) * 3).requires_grad_()
    t = randn(1, 2, 2, 3, 3).detach()
    assert torch.autograd.gradcheck(lambda x: R.ab.ab(x, t, 1.0), [s], eps=1e-7, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: R.ofd.ofd(x, t), [s], eps=1e-7, atol=1e-5)
