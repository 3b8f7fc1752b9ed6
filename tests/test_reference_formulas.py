"""fastkd.reference checked against independent float64 formulas.

Each reference loss is compared with a numpy version of the formula in its docstring
that takes a deliberately different route (explicit loops, explicit sums,
direct differences instead of Gram matrices), and where feasible with a
small case worked out by hand (the answer is derived in the comment).
Module-bearing methods (VID, OFD, AFD, CRD) read the module's own weights
and recompute everything downstream of them in numpy.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from numpy.testing import assert_allclose

from fastkd.reference import (AB, AFD, AT, BSS, CC, CRD, DML, FSP, FT, IRG, NST, OFD, RKD, SP, VID,
                              BSSAttacker, Hint, Logits, LwM, Paraphraser, PKTCosSim, Sobolev,
                              SoftTarget, Translator)

RTOL = 1e-10
ATOL = 1e-14
FEW = settings(max_examples=8, deadline=None)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def T(x, requires_grad=False):
    """numpy -> float64 torch tensor (a copy, so numpy arrays stay untouched)."""
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64,
                        requires_grad=requires_grad)


def rng(seed):
    return np.random.default_rng(seed)


def check(loss, expected, rtol=RTOL, atol=ATOL):
    """The loss must be a float64 scalar equal to the independent value."""
    assert isinstance(loss, torch.Tensor)
    assert loss.dim() == 0, f"loss must be a scalar, got shape {tuple(loss.shape)}"
    assert loss.dtype == torch.float64
    assert np.isfinite(expected)
    assert_allclose(loss.detach().numpy(), expected, rtol=rtol, atol=atol)


def np_mean_sq(a, b):
    d = (np.asarray(a) - np.asarray(b)).ravel()
    return float(np.sum(d * d) / d.size)


def np_mean_abs(a, b):
    d = (np.asarray(a) - np.asarray(b)).ravel()
    return float(np.sum(np.abs(d)) / d.size)


def huber(d):
    # smooth_l1 elementwise, beta = 1
    a = abs(d)
    return 0.5 * d * d if a < 1.0 else a - 0.5


def np_normalize_rows(x):
    """Each row divided by max(||row||_2, 1e-12), row by row."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        n = math.sqrt(float(np.sum(x[i] * x[i])))
        out[i] = x[i] / max(n, 1e-12)
    return out


def np_log_softmax_row(z):
    m = float(np.max(z))
    return z - m - math.log(float(np.sum(np.exp(z - m))))


def np_kl_batchmean(logits_t, logits_s):
    """(1/B) sum_{b,k} p_t log(p_t / q_s), with 0 log 0 = 0, by explicit sums."""
    B, K = logits_t.shape
    total = 0.0
    for b in range(B):
        logp = np_log_softmax_row(logits_t[b])
        logq = np_log_softmax_row(logits_s[b])
        for k in range(K):
            p = math.exp(logp[k])
            if p > 0.0:
                total += p * (logp[k] - logq[k])
    return total / B


def np_block_mean(x, h, w):
    """adaptive_avg_pool2d to (h, w) when H, W are multiples of h, w: plain block means."""
    B, C, H, W = x.shape
    kh, kw = H // h, W // w
    assert kh * h == H and kw * w == W
    out = np.zeros((B, C, h, w))
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    return out


def np_pdist2_loops(x):
    """Squared distances from direct differences, clamped at 1e-12 off the diagonal."""
    x = x.reshape(x.shape[0], -1)
    N = x.shape[0]
    d = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            if i != j:
                diff = x[i] - x[j]
                d[i, j] = max(float(np.sum(diff * diff)), 1e-12)
    return d


# ----------------------------------------------------------------------------
# Logits, Hint
# ----------------------------------------------------------------------------

def test_logits_hand_case():
    # ((1-0)^2 + (2-0)^2) / 2 = 2.5
    check(Logits()(T([[1.0, 2.0]]), T([[0.0, 0.0]])), 2.5)


@FEW
@given(B=st.integers(1, 4), K=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_logits_random(B, K, seed):
    r = rng(seed)
    s, t = r.normal(size=(B, K)), r.normal(size=(B, K))
    check(Logits()(T(s), T(t)), np_mean_sq(s, t))


def test_hint():
    # hand: (1 + 4 + 9 + 16) / 4 = 7.5
    check(Hint()(T([[[[1.0, 2.0], [3.0, 4.0]]]]), T(np.zeros((1, 1, 2, 2)))), 7.5)
    r = rng(1)
    s, t = r.normal(size=(2, 3, 4, 5)), r.normal(size=(2, 3, 4, 5))
    check(Hint()(T(s), T(t)), np_mean_sq(s, t))


# ----------------------------------------------------------------------------
# SoftTarget, BSS, DML: KL with explicit sums
# ----------------------------------------------------------------------------

def test_soft_target_hand_case():
    # T = 2: out_t = [0, 0] -> p = [1/2, 1/2]; out_s / T = [0, ln 3] -> q = [1/4, 3/4].
    # KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); times T^2 = 4 -> 2 ln(4/3).
    loss = SoftTarget(2.0)(T([[0.0, 2 * math.log(3.0)]]), T([[0.0, 0.0]]))
    check(loss, 2 * math.log(4.0 / 3.0))


@FEW
@given(B=st.integers(1, 4), K=st.integers(2, 6), temp=st.sampled_from([1.0, 3.0, 4.5]),
       seed=st.integers(0, 2**16))
def test_soft_target_random(B, K, temp, seed):
    r = rng(seed)
    s, t = 3 * r.normal(size=(B, K)), 3 * r.normal(size=(B, K))
    expected = np_kl_batchmean(t / temp, s / temp) * temp * temp
    check(SoftTarget(temp)(T(s), T(t)), expected)


def test_bss_loss_has_no_t_squared():
    # Same hand case as SoftTarget but without the T^2 factor: 1/2 ln(4/3).
    loss = BSS(2.0)(T([[0.0, 2 * math.log(3.0)]]), T([[0.0, 0.0]]))
    check(loss, 0.5 * math.log(4.0 / 3.0))
    r = rng(2)
    s, t = 2 * r.normal(size=(3, 5)), 2 * r.normal(size=(3, 5))
    check(BSS(3.0)(T(s), T(t)), np_kl_batchmean(t / 3.0, s / 3.0))


def test_dml():
    # out2 = [0, -1e4] -> p = [1, 0] (exp underflows to exactly 0, so 0 log 0 = 0 is used);
    # out1 = [0, 0] -> q = [1/2, 1/2]; KL = 1 * ln(1 / (1/2)) = ln 2.
    check(DML()(T([[0.0, 0.0]]), T([[0.0, -1e4]])), math.log(2.0))
    r = rng(3)
    o1, o2 = 2 * r.normal(size=(4, 6)), 2 * r.normal(size=(4, 6))
    check(DML()(T(o1), T(o2)), np_kl_batchmean(o2, o1))


# ----------------------------------------------------------------------------
# AT
# ----------------------------------------------------------------------------

def np_attention_map(f, p):
    B, C, H, W = f.shape
    A = np.zeros((B, H, W))
    for c in range(C):
        A += np.abs(f[:, c]) ** p
    out = np.empty_like(A)
    for b in range(B):
        out[b] = A[b] / (math.sqrt(float(np.sum(A[b] ** 2))) + 1e-6)  # eps added, not max
    return out


def test_at_hand_case():
    # p = 2, one channel, 1x2 map: A_s = [1, 0], A_t = [0, 1], both norms 1, so
    # am_s = [a, 0], am_t = [0, a] with a = 1 / (1 + 1e-6); mse = (a^2 + a^2) / 2 = a^2.
    loss = AT(2)(T([[[[1.0, 0.0]]]]), T([[[[0.0, 1.0]]]]))
    check(loss, 1.0 / (1.0 + 1e-6) ** 2)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_at_random_channels_differ(p):
    r = rng(10 + p)
    s, t = r.normal(size=(2, 3, 4, 5)), r.normal(size=(2, 6, 4, 5))
    check(AT(p)(T(s), T(t)), np_mean_sq(np_attention_map(s, p), np_attention_map(t, p)))


# ----------------------------------------------------------------------------
# NST
# ----------------------------------------------------------------------------

def np_nst(s, t):
    def feats(f):
        B, C = f.shape[:2]
        f = f.reshape(B, C, -1)
        return np.stack([np_normalize_rows(f[b]) for b in range(B)])

    def kernel_mean(X, Y):
        # mean over (b, j, i) of (Y[b, j] . X[b, i])^2, by loops
        total, n = 0.0, 0
        for b in range(X.shape[0]):
            for j in range(Y.shape[1]):
                for i in range(X.shape[1]):
                    total += float(np.sum(Y[b, j] * X[b, i])) ** 2
                    n += 1
        return total / n

    Fs, Ft = feats(s), feats(t)
    return kernel_mean(Ft, Ft) + kernel_mean(Fs, Fs) - 2 * kernel_mean(Fs, Ft)


def test_nst_random_with_zero_channel():
    r = rng(20)
    # channels differ, H*W equal (2x3 vs 3x2); one all-zero student channel hits the
    # max(norm, 1e-12) of normalize (its row stays 0, no NaN).
    s, t = r.normal(size=(2, 3, 2, 3)), r.normal(size=(2, 4, 3, 2))
    s[1, 2] = 0.0
    check(NST()(T(s), T(t)), np_nst(s, t), atol=1e-13)


def test_nst_identical_is_zero():
    # s = t: the three kernel means are equal, so the loss is 0 (up to rounding).
    x = rng(21).normal(size=(2, 3, 2, 2))
    check(NST()(T(x), T(x)), 0.0, atol=1e-14)


# ----------------------------------------------------------------------------
# PKT
# ----------------------------------------------------------------------------

def np_pkt(s, t, eps=1e-6):
    def cond_prob(x):
        N = x.shape[0]
        xh = np.empty_like(x)
        for i in range(N):
            xh[i] = x[i] / (math.sqrt(float(np.sum(x[i] ** 2))) + eps)
        xh[np.isnan(xh)] = 0.0
        C = np.empty((N, N))
        for i in range(N):
            for j in range(N):
                C[i, j] = (float(np.sum(xh[i] * xh[j])) + 1.0) / 2.0
        return C / C.sum(axis=1, keepdims=True)

    Ps, Pt = cond_prob(s), cond_prob(t)
    N = s.shape[0]
    total = 0.0
    for i in range(N):
        for j in range(N):
            total += Pt[i, j] * math.log((Pt[i, j] + eps) / (Ps[i, j] + eps))
    return total / (N * N)


def test_pkt_random_dims_differ_with_zero_row():
    r = rng(30)
    s, t = r.normal(size=(5, 3)), r.normal(size=(5, 7))
    s[2] = 0.0  # x / (0 + 1e-6) = 0: the row's similarities are all (0 + 1) / 2
    check(PKTCosSim()(T(s), T(t)), np_pkt(s, t))


def test_pkt_identical_is_zero():
    x = rng(31).normal(size=(4, 3))
    check(PKTCosSim()(T(x), T(x)), 0.0)


# ----------------------------------------------------------------------------
# FSP
# ----------------------------------------------------------------------------

def np_fsp_matrix(a, b):
    if a.shape[2] > b.shape[2]:
        a = np_block_mean(a, b.shape[2], b.shape[3])
    B, Ca = a.shape[:2]
    Cb = b.shape[1]
    a = a.reshape(B, Ca, -1)
    b = b.reshape(B, Cb, -1)
    HW = a.shape[2]
    G = np.zeros((B, Ca, Cb))
    for n in range(B):
        for i in range(Ca):
            for j in range(Cb):
                for k in range(HW):
                    G[n, i, j] += a[n, i, k] * b[n, j, k]
    return G / HW


def test_fsp_hand_case_with_pooling():
    # student: fm1 [[1,2],[3,4]] pooled to 1x1 -> 2.5; fm2 = 5; G = 2.5 * 5 / 1 = 12.5.
    # teacher: 1x1 maps 1 and 1 -> G = 1. mse = (12.5 - 1)^2 = 132.25.
    one = T([[[[1.0]]]])
    loss = FSP()(T([[[[1.0, 2.0], [3.0, 4.0]]]]), T([[[[5.0]]]]), one, one)
    check(loss, 132.25)


@pytest.mark.parametrize("pool", [False, True])
def test_fsp_random(pool):
    r = rng(40 + pool)
    # with pool: fm1 4x6 -> fm2's 2x3 (exact 2x2 block means), teacher likewise 6x6 -> 2x2.
    hs1, ws1 = (4, 6) if pool else (2, 3)
    ht1, wt1 = (6, 6) if pool else (2, 2)
    # G is (B, C1, C2) = (2, 2, 3) for both student and teacher
    s1, s2 = r.normal(size=(2, 2, hs1, ws1)), r.normal(size=(2, 3, 2, 3))
    t1, t2 = r.normal(size=(2, 2, ht1, wt1)), r.normal(size=(2, 3, 2, 2))
    expected = np_mean_sq(np_fsp_matrix(s1, s2), np_fsp_matrix(t1, t2))
    check(FSP()(T(s1), T(s2), T(t1), T(t2)), expected)


# ----------------------------------------------------------------------------
# FT, Paraphraser, Translator
# ----------------------------------------------------------------------------

def test_ft_hand_case():
    # sample 0: s = [3, 4] -> [0.6, 0.8], t = [0, 1]; |0.6| + |0.8 - 1| = 0.8.
    # sample 1: s = [0, 0] -> stays 0 (norm clamped at 1e-12), t = [1, 0]; |0 - 1| + 0 = 1.
    # l1 = (0.8 + 1) / 4 = 0.45.
    s = T(np.array([[3.0, 4.0], [0.0, 0.0]]).reshape(2, 2, 1, 1))
    t = T(np.array([[0.0, 1.0], [1.0, 0.0]]).reshape(2, 2, 1, 1))
    check(FT()(s, t), 0.45)


def test_ft_random():
    r = rng(50)
    s, t = r.normal(size=(3, 2, 3, 3)), r.normal(size=(3, 2, 3, 3))
    expected = np_mean_abs(np_normalize_rows(s.reshape(3, -1)), np_normalize_rows(t.reshape(3, -1)))
    check(FT()(T(s), T(t)), expected)


@pytest.mark.parametrize("use_bn", [True, False])
def test_paraphraser_translator_shapes_and_structure(use_bn):
    # k = 0.75: factor channels int(4 * 0.75) = 3.
    para = Paraphraser(4, 0.75, use_bn=use_bn).double()
    trans = Translator(2, 4, 0.75, use_bn=use_bn).double()
    x_t, x_s = T(rng(51).normal(size=(2, 4, 5, 6))), T(rng(52).normal(size=(2, 2, 5, 6)))
    factor, recon = para(x_t)
    assert tuple(factor.shape) == (2, 3, 5, 6)
    assert tuple(recon.shape) == (2, 4, 5, 6)
    assert tuple(trans(x_s).shape) == (2, 3, 5, 6)

    convs = [m for m in para.modules() if type(m) is nn.Conv2d]
    deconvs = [m for m in para.modules() if type(m) is nn.ConvTranspose2d]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(4, 4), (4, 3), (3, 3)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [(3, 3), (3, 4), (4, 4)]
    tconvs = [m for m in trans.modules() if type(m) is nn.Conv2d]
    assert [(m.in_channels, m.out_channels) for m in tconvs] == [(2, 2), (2, 3), (3, 3)]
    for m in convs + deconvs + tconvs:
        assert m.kernel_size == (3, 3) and m.padding == (1, 1) and m.stride == (1, 1)
        assert (m.bias is None) == use_bn  # conv bias only without BN
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in para.modules())
    assert n_bn == (6 if use_bn else 0)

    if not use_bn:
        # Zero weights, all biases -1: every block outputs LeakyReLU_0.1(-1) = -0.1.
        with torch.no_grad():
            for m in convs + deconvs + tconvs:
                m.weight.zero_()
                m.bias.fill_(-1.0)
        factor, recon = para(x_t)
        assert_allclose(factor.detach().numpy(), -0.1, rtol=RTOL)
        assert_allclose(recon.detach().numpy(), -0.1, rtol=RTOL)
        assert_allclose(trans(x_s).detach().numpy(), -0.1, rtol=RTOL)


# ----------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------

def np_rkd_dist(s, t):
    def d(x):
        D = np.sqrt(np_pdist2_loops(x))  # 1e-6 for duplicate rows (clamp), 0 on the diagonal
        return D / D[D > 0].mean()

    ds, dt = d(s), d(t)
    N = s.shape[0]
    return sum(huber(ds[i, j] - dt[i, j]) for i in range(N) for j in range(N)) / (N * N)


def np_rkd_angle(s, t):
    def angles(x):
        N = x.shape[0]
        e = np.zeros((N, N, x.shape[1]))
        for i in range(N):
            for j in range(N):
                v = x[j] - x[i]
                e[i, j] = v / max(math.sqrt(float(np.sum(v * v))), 1e-12)
        A = np.zeros((N, N, N))
        for i in range(N):
            for j in range(N):
                for k in range(N):
                    A[i, j, k] = float(np.sum(e[i, j] * e[i, k]))
        return A

    As, At = angles(s), angles(t)
    return float(np.mean(np.vectorize(huber)(As - At)))


def test_rkd_hand_case():
    # 1-D points s = [0, 1, 2], t = [0, 2, 1].
    # Distance: s pairs (01, 02, 12) = (1, 2, 1), mean over the 6 off-diagonal = 4/3,
    #   normalised (3/4, 3/2, 3/4); t: (2, 1, 1) -> (3/2, 3/4, 3/4). Differences -3/4, 3/4, 0,
    #   each twice: 4 * (0.5 * 9/16) / 9 = 1/8.
    # Angle: e[i, j] = sign(x_j - x_i). i=0 agrees; i=1: s e = [-1, 0, 1], t e = [-1, 0, -1]
    #   -> A[1,0,2], A[1,2,0] differ by 2; i=2: s e = [-1, -1, 0], t e = [-1, 1, 0] -> A[2,0,1],
    #   A[2,1,0] differ by 2. smooth_l1(2) = 1.5, so 4 * 1.5 / 27 = 2/9.
    s, t = T([[0.0], [1.0], [2.0]]), T([[0.0], [2.0], [1.0]])
    check(RKD(1.0, 0.0)(s, t), 1.0 / 8.0)
    check(RKD(0.0, 1.0)(s, t), 2.0 / 9.0)
    check(RKD(25.0, 50.0)(s, t), 25.0 / 8.0 + 100.0 / 9.0)


@pytest.mark.parametrize("duplicates", [False, True])
def test_rkd_random(duplicates):
    r = rng(60 + duplicates)
    s, t = r.normal(size=(5, 3)), 2 * r.normal(size=(5, 4))
    if duplicates:
        # x_2 = x_0 in s and x_3 = x_1 in t: zero difference vectors (e = 0, no NaN) and
        # distance sqrt(1e-12) = 1e-6, which counts as > 0 in the mean.
        s[2] = s[0]
        t[3] = t[1]
    check(RKD(1.0, 0.0)(T(s), T(t)), np_rkd_dist(s, t))
    check(RKD(0.0, 1.0)(T(s), T(t)), np_rkd_angle(s, t))
    check(RKD(25.0, 50.0)(T(s), T(t)), 25 * np_rkd_dist(s, t) + 50 * np_rkd_angle(s, t))


def test_rkd_duplicate_distance_counts_in_mean():
    # x = [0, 0, 3] (1-D): pdist2 of the duplicate pair is clamped to 1e-12, so d = 1e-6 > 0
    # and it enters the mean: off-diagonal d = (1e-6, 3, 3) twice, mean = (6 + 1e-6) / 3.
    # t = [0, 1, 3]: d = (1, 3, 2), mean 2 -> (1/2, 3/2, 1).
    m = (6.0 + 1e-6) / 3.0
    ds = np.array([1e-6 / m, 3 / m, 3 / m])
    dt = np.array([0.5, 1.5, 1.0])
    expected = 2 * sum(huber(a - b) for a, b in zip(ds, dt)) / 9.0
    check(RKD(1.0, 0.0)(T([[0.0], [0.0], [3.0]]), T([[0.0], [1.0], [3.0]])), expected)


# ----------------------------------------------------------------------------
# AB
# ----------------------------------------------------------------------------

def test_ab_hand_case():
    # margin 1, elementwise (s, t):
    # (-2, -1): s > -1 fails, t > 0 fails -> 0
    # (-0.5, -1): s > -1, t <= 0 -> (0.5)^2 = 0.25
    # (0.5, 1): s <= 1, t > 0 -> (0.5 - 1)^2 = 0.25
    # (2, 1): s <= 1 fails -> 0
    # (0, 0): t = 0 counts as t <= 0 -> (0 + 1)^2 = 1
    # mean = 1.5 / 5 = 0.3
    s = T(np.array([-2.0, -0.5, 0.5, 2.0, 0.0]).reshape(1, 1, 1, 5))
    t = T(np.array([-1.0, -1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 5))
    check(AB(1.0)(s, t), 0.3)


def test_ab_random():
    r = rng(70)
    m = 0.7
    s, t = r.normal(size=(2, 3, 3, 3)), r.normal(size=(2, 3, 3, 3))
    total = 0.0
    for a, b in zip(s.ravel(), t.ravel()):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    check(AB(m)(T(s), T(t)), total / s.size)


# ----------------------------------------------------------------------------
# SP
# ----------------------------------------------------------------------------

def test_sp_hand_case():
    # fm_s rows orthogonal: G_s = I. fm_t rows equal: G_t = ones -> rows (1/sqrt2, 1/sqrt2).
    # diffs: diagonal 1 - 1/sqrt2, off-diagonal -1/sqrt2;
    # mse = ((1 - 1/sqrt2)^2 + 1/2) / 2 = 1 - 1/sqrt2.
    check(SP()(T([[1.0, 0.0], [0.0, 1.0]]), T([[1.0, 0.0], [1.0, 0.0]])), 1 - 1 / math.sqrt(2))


def test_sp_random():
    r = rng(80)
    s, t = r.normal(size=(4, 2, 3, 3)), r.normal(size=(4, 5, 2, 2))

    def gram_hat(f):
        f = f.reshape(f.shape[0], -1)
        N = f.shape[0]
        G = np.array([[float(np.sum(f[i] * f[j])) for j in range(N)] for i in range(N)])
        return np_normalize_rows(G)

    check(SP()(T(s), T(t)), np_mean_sq(gram_hat(s), gram_hat(t)))


# ----------------------------------------------------------------------------
# Sobolev: linear models, gradient known in closed form
# ----------------------------------------------------------------------------

def test_sobolev_linear_models():
    r = rng(90)
    B, C, H, W, K = 3, 2, 2, 2, 4
    D = C * H * W
    img_np = r.normal(size=(B, C, H, W))
    Ws, Wt = r.normal(size=(D, K)), r.normal(size=(D, K))
    target = np.array([1, 3, 1])
    img = T(img_np, requires_grad=True)
    out_s = img.flatten(1) @ T(Ws)
    out_t = img.flatten(1) @ T(Wt)
    loss = Sobolev()(out_s, out_t, img, torch.tensor(target))
    # d out[i, y_i] / d img_i = W[:, y_i]
    gs = np.stack([Ws[:, y] for y in target])
    gt = np.stack([Wt[:, y] for y in target])
    check(loss, np_mean_sq(np_normalize_rows(gs), np_normalize_rows(gt)))


# ----------------------------------------------------------------------------
# BSSAttacker: tiny linear model, steps recomputed in numpy
# ----------------------------------------------------------------------------

class _LinearNet(nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = T(W), T(b)

    def forward(self, x):
        return x.flatten(1) @ self.W + self.b


def np_softmax_row(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_bss_attack(W, bias, x, y, a, step_alpha, num_steps, eps):
    x = x.copy()
    B = x.shape[0]
    K = W.shape[1]
    for _ in range(num_steps):
        flat = x.reshape(B, -1)
        z = flat @ W + bias
        alpha = [step_alpha if int(np.argmax(z[i])) == y[i] else 0.0 for i in range(B)]
        if sum(alpha) == 0:
            break
        new = flat.copy()
        for i in range(B):
            p = np_softmax_row(z[i])
            eye = np.eye(K)
            # d p_k / d z = p_k (e_k - p); g = W (d p_a/dz - d p_y/dz)
            dz = p[a[i]] * (eye[a[i]] - p) - p[y[i]] * (eye[y[i]] - p)
            g = W @ dz
            step = alpha[i] * (p[y[i]] - p[a[i]] + eps) * g / math.sqrt(float(np.sum(g * g)))
            new[i] = np.clip(flat[i] + step, -2.5, 2.5)
        x = new.reshape(x.shape)
    return x


def _bss_setup():
    r = rng(100)
    W = r.normal(size=(4, 3))
    bias = r.normal(size=3)
    x = r.uniform(-1, 1, size=(3, 1, 2, 2))
    x[1] = 2.5  # sits on the clamp: every outward step component is cut back to 2.5
    return W, bias, x


@pytest.mark.parametrize("num_steps", [1, 3])
def test_bss_attacker_steps(num_steps):
    W, bias, x = _bss_setup()
    z = x.reshape(3, -1) @ W + bias
    pred = z.argmax(axis=1)
    # samples 0 and 1 are still predicted as their target (they move); sample 2 is not
    target = np.array([pred[0], pred[1], (pred[2] + 1) % 3])
    attack_class = np.array([(pred[0] + 1) % 3, (pred[1] + 2) % 3, pred[2]])
    img = T(x)
    out = BSSAttacker(0.3, num_steps, eps=1e-4).attack(
        _LinearNet(W, bias), img, torch.tensor(target), torch.tensor(attack_class))
    expected = np_bss_attack(W, bias, x, target, attack_class, 0.3, num_steps, 1e-4)
    assert_allclose(out.detach().numpy(), expected, rtol=RTOL, atol=1e-13)
    # the attack really moved the correctly predicted samples, left sample 2 alone,
    # and sample 1 (sitting at 2.5) was clamped
    assert not np.allclose(expected[0], x[0])
    assert np.array_equal(expected[2], x[2])
    assert np.all(np.abs(expected) <= 2.5)
    assert np.any(np.abs(expected[1]) == 2.5) and not np.array_equal(expected[1], x[1])
    # the caller's image is not modified in place
    assert np.array_equal(img.numpy(), x)


def test_bss_attacker_one_step_unclamped_by_hand_formula():
    # One step, no clamp involved: x' = x + alpha (p_y - p_a + eps) g / ||g||.
    W, bias, x = _bss_setup()
    x = x[:1] * 0.1
    z = x.reshape(1, -1) @ W + bias
    y = int(z.argmax())
    a = (y + 1) % 3
    out = BSSAttacker(0.5, 1).attack(_LinearNet(W, bias), T(x), torch.tensor([y]),
                                     torch.tensor([a]))
    p = np_softmax_row(z[0])
    g = W @ (p[a] * (np.eye(3)[a] - p) - p[y] * (np.eye(3)[y] - p))
    expected = x.reshape(-1) + 0.5 * (p[y] - p[a] + 1e-4) * g / np.linalg.norm(g)
    assert np.all(np.abs(expected) < 2.5)
    assert_allclose(out.detach().numpy().reshape(-1), expected, rtol=RTOL, atol=1e-13)


def test_bss_attacker_stops_when_nothing_is_predicted_as_target():
    W, bias, x = _bss_setup()
    pred = (x.reshape(3, -1) @ W + bias).argmax(axis=1)
    x[2, 0, 0, 0] = 3.0  # outside [-2.5, 2.5]: a step (even a zero one) would clamp it
    pred = (x.reshape(3, -1) @ W + bias).argmax(axis=1)
    target = (pred + 1) % 3  # every sample already off its target: alpha = 0, stop at once
    out = BSSAttacker(0.3, 5).attack(_LinearNet(W, bias), T(x), torch.tensor(target),
                                     torch.tensor(pred))
    assert np.array_equal(out.detach().numpy(), x)


# ----------------------------------------------------------------------------
# CC
# ----------------------------------------------------------------------------

def np_cc_kernel(x, gamma, P):
    xh = np_normalize_rows(x)
    N = x.shape[0]
    K = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            s = float(np.sum(xh[i] * xh[j]))
            K[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * s ** p
                          for p in range(P + 1))
    return K


def test_cc_hand_case():
    # gamma = 1/2, P = 1: K = e^-1 (1 + S). S_s = I (orthogonal rows), S_t = ones (equal rows):
    # off-diagonal differences e^-1 at 2 of 4 entries -> mse = 2 e^-2 / 4 = e^-2 / 2.
    loss = CC(0.5, 1)(T([[2.0, 0.0], [0.0, 3.0]]), T([[1.0, 0.0], [5.0, 0.0]]))
    check(loss, math.exp(-2.0) / 2.0)


@pytest.mark.parametrize("P", [0, 1, 2, 3])
def test_cc_random(P):
    r = rng(110 + P)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 6))
    expected = np_mean_sq(np_cc_kernel(s, 0.4, P), np_cc_kernel(t, 0.4, P))
    if P > 0:
        assert expected > 1e-4  # a real difference to detect
    check(CC(0.4, P)(T(s), T(t)), expected)


# ----------------------------------------------------------------------------
# LwM: models whose gradient w.r.t. the feature map is known in closed form
# ----------------------------------------------------------------------------

def test_lwm_closed_form_gradients():
    r = rng(120)
    B, K = 3, 4
    fs_np, ft_np = r.normal(size=(B, 2, 3, 3)), r.normal(size=(B, 3, 3, 3))
    Vs, Vt = r.normal(size=(K, 2, 3, 3)), r.normal(size=(K, 3, 3, 3))
    target = np.array([2, 0, 3])
    fm_s, fm_t = T(fs_np, requires_grad=True), T(ft_np, requires_grad=True)
    # student: out[i, k] = 1/2 sum V_s[k] * fm_s[i]^2  ->  d out[i, y_i] / d fm_s[i] = V_s[y_i] * fm_s[i]
    out_s = 0.5 * torch.einsum("bchw,kchw->bk", fm_s ** 2, T(Vs))
    # teacher: out[i, k] = sum V_t[k] * fm_t[i]       ->  gradient V_t[y_i]
    out_t = torch.einsum("bchw,kchw->bk", fm_t, T(Vt))
    loss = LwM()(out_s, fm_s, out_t, fm_t, torch.tensor(target))

    def cam(g):
        out = np.zeros((B, g.shape[2] * g.shape[3]))
        for i in range(B):
            acc = np.zeros(g.shape[2:])
            for c in range(g.shape[1]):
                acc += g[i, c].mean() * g[i, c]  # the gradient weighted by its own mean
            out[i] = np.maximum(acc, 0.0).ravel()
        return np_normalize_rows(out)

    gs = np.stack([Vs[y] * fs_np[i] for i, y in enumerate(target)])
    gt = np.stack([Vt[y] for y in target])
    cs, ct = cam(gs), cam(gt)
    assert np.any(cs > 0) and np.any(ct > 0)
    check(loss, np_mean_abs(cs, ct))


# ----------------------------------------------------------------------------
# IRG
# ----------------------------------------------------------------------------

def np_irg_parts(irg_s, irg_t):
    (s1, s2, fs, os_), (t1, t2, ft, ot) = irg_s, irg_t

    def E(x):
        d = np_pdist2_loops(x)
        return d / d.max()

    def Tr(a, b):
        if a.shape[2] > b.shape[2]:
            a = np_block_mean(a, b.shape[2], b.shape[3])
        if a.shape[1] < b.shape[1]:
            b = np.stack([(b[:, 2 * c] + b[:, 2 * c + 1]) / 2 for c in range(b.shape[1] // 2)], 1)
        d = np.array([max(float(np.sum((a[i] - b[i]) ** 2)), 1e-12) for i in range(a.shape[0])])
        return d / d.max()

    vert = np_mean_sq(os_, ot)
    edge = (np_mean_sq(E(fs), E(ft)) + np_mean_sq(E(s1), E(t1)) + np_mean_sq(E(s2), E(t2))) / 3
    tran = np_mean_sq(Tr(s1, s2), Tr(t1, t2))
    return vert, edge, tran


@pytest.mark.parametrize("w", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.1, 5.0, 5.0)])
def test_irg(w):
    r = rng(130)
    B = 4
    # student: fm1 (C=2, 4x4) -> pooled to fm2's 2x2, and fm2 (C=4) halved to 2 channels;
    # teacher: fm1 and fm2 of one shape, so neither transform applies.
    s1, s2 = r.normal(size=(B, 2, 4, 4)), r.normal(size=(B, 4, 2, 2))
    t1, t2 = r.normal(size=(B, 3, 2, 2)), r.normal(size=(B, 3, 2, 2))
    fs, ft = r.normal(size=(B, 5)), r.normal(size=(B, 7))
    os_, ot = r.normal(size=(B, 6)), r.normal(size=(B, 6))
    ft[3] = ft[0]  # a duplicate sample: its squared distance is clamped at 1e-12, no NaN
    vert, edge, tran = np_irg_parts((s1, s2, fs, os_), (t1, t2, ft, ot))
    assert min(vert, edge, tran) > 1e-4  # each part is nonzero, so its weight is tested
    loss = IRG(*w)((T(s1), T(s2), T(fs), T(os_)), (T(t1), T(t2), T(ft), T(ot)))
    check(loss, w[0] * vert + w[1] * edge + w[2] * tran)


def test_irg_channel_halving_pairs_neighbours():
    # Hand case, B = 2, 1x1 maps: fm1 has 1 channel, fm2 has 2 -> fm2 becomes (c0 + c1) / 2.
    # student sample 0: fm1 = 0, fm2 = (2, 4) -> 3, d = 9; sample 1: fm1 = 1, fm2 = (1, 1) -> 1, d
    # clamped to 1e-12. T_s = (1, 1e-12/9). Teacher: fm1 = fm2 = 1 channel: d = (1, 4) -> (1/4, 1).
    # Only the transformation part is weighted: mse = ((1 - 1/4)^2 + (1e-12/9 - 1)^2) / 2.
    s1 = T(np.array([0.0, 1.0]).reshape(2, 1, 1, 1))
    s2 = T(np.array([[2.0, 4.0], [1.0, 1.0]]).reshape(2, 2, 1, 1))
    t1 = T(np.array([0.0, 0.0]).reshape(2, 1, 1, 1))
    t2 = T(np.array([1.0, 2.0]).reshape(2, 1, 1, 1))
    feat = T([[0.0], [1.0]])
    expected = ((1 - 0.25) ** 2 + (1e-12 / 9 - 1) ** 2) / 2
    check(IRG(0.0, 0.0, 1.0)((s1, s2, feat, feat), (t1, t2, feat, feat)), expected)


def test_irg_transformation_all_zero_distances():
    # Student fm1 == fm2 for every sample: each d_i is clamped to 1e-12, so T_s = (1, 1)
    # (0 / 0 without the clamp). Teacher as above: T_t = (1/4, 1). mse = (3/4)^2 / 2 = 0.28125.
    s1 = T(np.array([1.0, 2.0]).reshape(2, 1, 1, 1))
    t1 = T(np.array([0.0, 0.0]).reshape(2, 1, 1, 1))
    t2 = T(np.array([1.0, 2.0]).reshape(2, 1, 1, 1))
    feat = T([[0.0], [1.0]])
    check(IRG(0.0, 0.0, 1.0)((s1, s1, feat, feat), (t1, t2, feat, feat)), 0.28125)


def test_irg_edge_hand_case_identical_samples():
    # feat_s: three identical samples -> every off-diagonal pdist2 is clamped to 1e-12 and
    # E_s = 1 off the diagonal (0 / 0 without the clamp). feat_t = (0, 1, 3): pdist2
    # (01, 02, 12) = (1, 9, 4) -> E_t = (1/9, 1, 4/9). Off-diagonal differences 8/9, 0, 5/9,
    # each twice: mse = 2 (64 + 25) / 81 / 9 = 178/729. The fm terms are 0 (s = t there),
    # so the edge loss is 178/729 / 3 = 178/2187.
    fm1 = T(rng(135).normal(size=(3, 2, 2, 2)))
    fm2 = T(rng(136).normal(size=(3, 2, 2, 2)))
    out = T(np.zeros((3, 2)))
    feat_s, feat_t = T([[1.0], [1.0], [1.0]]), T([[0.0], [1.0], [3.0]])
    check(IRG(0.0, 1.0, 0.0)((fm1, fm2, feat_s, out), (fm1, fm2, feat_t, out)), 178.0 / 2187.0)


# ----------------------------------------------------------------------------
# VID: regressor weights read from the module, the rest in numpy
# ----------------------------------------------------------------------------

def test_vid():
    r = rng(140)
    vid = VID(3, 4, 5, init_var=2.0).double()
    convs = [m for m in vid.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 4), (4, 4), (4, 5)]
    assert all(m.bias is None and m.kernel_size == (1, 1) for m in convs)
    alpha = dict(vid.named_parameters())["alpha"]
    assert tuple(alpha.shape) == (5,)
    # alpha = log(exp(init_var - eps) - 1): softplus(alpha) + eps starts at init_var
    a0 = alpha.detach().numpy()
    assert_allclose(np.log1p(np.exp(a0)) + 1e-6, 2.0, rtol=1e-6)
    # small init_var, where forgetting the eps in the inverse (var = init_var + eps) shows
    a_small = dict(VID(3, 4, 5, init_var=0.01).double().named_parameters())["alpha"]
    assert_allclose(np.log1p(np.exp(a_small.detach().numpy())) + 1e-6, 0.01, rtol=1e-6)

    with torch.no_grad():
        alpha.copy_(T(r.uniform(-1.5, 1.5, size=5)))
    W = [m.weight.detach().numpy()[:, :, 0, 0] for m in convs]
    a = alpha.detach().numpy()
    fs, ft = r.normal(size=(2, 3, 2, 3)), r.normal(size=(2, 5, 2, 3))

    total, n = 0.0, 0
    for b in range(2):
        for h in range(2):
            for w in range(3):
                mu = W[2] @ np.maximum(W[1] @ np.maximum(W[0] @ fs[b, :, h, w], 0), 0)
                for c in range(5):
                    var = math.log1p(math.exp(a[c])) + 1e-6
                    total += 0.5 * (math.log(var) + (mu[c] - ft[b, c, h, w]) ** 2 / var)
                    n += 1
    check(vid(T(fs), T(ft)), total / n)


# ----------------------------------------------------------------------------
# OFD: connector weights read from the module; conv, batch-norm, margin, mask in numpy
# ----------------------------------------------------------------------------

def test_ofd():
    r = rng(150)
    torch.manual_seed(150)  # the connector's initial weights: the mask cases below depend on them
    ofd = OFD(3, 4).double()
    conv = [m for m in ofd.modules() if isinstance(m, nn.Conv2d)]
    bn = [m for m in ofd.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(conv) == 1 and len(bn) == 1
    conv, bn = conv[0], bn[0]
    assert conv.bias is None and conv.kernel_size == (1, 1)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    with torch.no_grad():  # as after some training: the affine part must be applied too
        bn.weight.copy_(T(r.uniform(0.5, 1.5, size=4)))
        bn.bias.copy_(T(r.normal(size=4) * 0.3))

    B, H, W = 3, 2, 2
    fs = r.normal(size=(B, 3, H, W))
    ft = r.normal(size=(B, 4, H, W))
    ft[:, 1] = np.abs(ft[:, 1]) + 0.1  # a channel without negatives: margin 0 / (0 + 1e-6) = 0
    # exact zeros: not counted as negatives in the margin, and t' = 0 satisfies t' <= 0
    ft[:, 1, 0, :] = 0.0
    ft[0, 2, 1, 1] = 0.0
    loss = ofd(T(fs), T(ft))

    Wc = conv.weight.detach().numpy()[:, :, 0, 0]
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    y = np.einsum("oc,bchw->bohw", Wc, fs)
    s = np.empty_like(y)
    for c in range(4):  # training-mode batch norm: batch mean, biased variance
        mean = y[:, c].mean()
        var = ((y[:, c] - mean) ** 2).mean()
        s[:, c] = (y[:, c] - mean) / math.sqrt(var + bn.eps) * gamma[c] + beta[c]

    # the t' = 0 entries include both masked (s' <= 0) and unmasked (s' > 0) ones
    zero_pos = ft[:, 1, 0, :] == 0.0
    assert np.any(s[:, 1, 0, :][zero_pos] <= 0) and np.any(s[:, 1, 0, :][zero_pos] > 0)

    total = 0.0
    for c in range(4):
        neg = [v for v in ft[:, c].ravel() if v < 0]
        m = sum(neg) / (len(neg) + 1e-6)
        for b in range(B):
            for h in range(H):
                for w in range(W):
                    tt = max(ft[b, c, h, w], m)
                    ss = s[b, c, h, w]
                    if not (ss <= tt and tt <= 0):
                        total += (ss - tt) ** 2
    check(loss, total / ft.size)


# ----------------------------------------------------------------------------
# AFD: attention weights read from the module, rho and the loss in numpy
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 3])  # fastkd: batch size 1 works
def test_afd(B):
    r = rng(160 + B)
    C = 4
    afd = AFD(C, 0.6).double()  # mid = int(4 * 0.6) = 2
    convs = [m for m in afd.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(4, 2), (2, 4)]
    assert all(m.bias is not None and torch.all(m.bias == 0) for m in convs)
    with torch.no_grad():  # nonzero biases, so that they are checked as well
        for m in convs:
            m.bias.copy_(T(r.normal(size=m.out_channels)))
    W1, b1 = convs[0].weight.detach().numpy()[:, :, 0, 0], convs[0].bias.detach().numpy()
    W2, b2 = convs[1].weight.detach().numpy()[:, :, 0, 0], convs[1].bias.detach().numpy()

    fs, ft = r.normal(size=(B, C, 3, 2)), r.normal(size=(B, C, 3, 2))
    loss = afd(T(fs), T(ft))

    total = 0.0
    for b in range(B):
        pooled = np.array([ft[b, c].mean() for c in range(C)])
        hid = np.maximum(W1 @ pooled + b1, 0.0)
        rho = 1.0 / (1.0 + np.exp(-(W2 @ hid + b2)))
        rho = rho / rho.sum()
        for c in range(C):
            sn = fs[b, c] / (math.sqrt(float(np.sum(fs[b, c] ** 2))) + 1e-6)
            tn = ft[b, c] / (math.sqrt(float(np.sum(ft[b, c] ** 2))) + 1e-6)
            total += rho[c] * float(np.mean((sn - tn) ** 2))
    check(loss, total / B)


# ----------------------------------------------------------------------------
# CRD: embeddings read from the module; scores, Z, contrast loss, memory update in numpy
# ----------------------------------------------------------------------------

def np_contrast(x, n_data, eps=1e-7):
    B, N1 = x.shape
    c = (N1 - 1) / n_data
    total = 0.0
    for b in range(B):
        total += math.log(x[b, 0] / (x[b, 0] + c + eps))
        for k in range(1, N1):
            total += math.log(c / (x[b, k] + c + eps))
    return -total / B


def test_crd_two_calls():
    r = rng(170)
    # momentum 0.3, not 0.5, so that swapping mom and 1 - mom shows
    s_dim, t_dim, feat_dim, nce_n, nce_t, mom, n_data = 6, 5, 4, 3, 0.1, 0.3, 10
    crd = CRD(s_dim, t_dim, feat_dim, nce_n, nce_t, mom, n_data).double()
    buffers = dict(crd.named_buffers())
    mem_s_buf = next(v for k, v in buffers.items() if k.endswith("memory_s"))
    mem_t_buf = next(v for k, v in buffers.items() if k.endswith("memory_t"))
    stdv = 1.0 / math.sqrt(feat_dim / 3.0)
    for buf in (mem_s_buf, mem_t_buf):
        assert tuple(buf.shape) == (n_data, feat_dim)
        assert float(buf.abs().max()) <= stdv
    lin = {m.in_features: m for m in crd.modules() if isinstance(m, nn.Linear)}
    Ws, bs = lin[s_dim].weight.detach().numpy(), lin[s_dim].bias.detach().numpy()
    Wt, bt = lin[t_dim].weight.detach().numpy(), lin[t_dim].bias.detach().numpy()
    mem_s, mem_t = mem_s_buf.numpy().copy(), mem_t_buf.numpy().copy()

    calls = [
        (np.array([2, 5, 7]), np.array([[2, 0, 3, 9], [5, 1, 2, 8], [7, 4, 6, 0]])),
        (np.array([1, 5, 9]), np.array([[1, 2, 7, 3], [5, 9, 0, 6], [9, 5, 4, 8]])),
    ]
    Z_s = Z_t = None
    for n_call, (idx, sidx) in enumerate(calls):
        feat_s = r.normal(size=(3, 2, 3))  # flattened to s_dim = 6 by the embedding
        feat_t = r.normal(size=(3, t_dim))
        loss = crd(T(feat_s), T(feat_t), torch.tensor(idx), torch.tensor(sidx))

        e_s = np_normalize_rows(feat_s.reshape(3, -1) @ Ws.T + bs)
        e_t = np_normalize_rows(feat_t @ Wt.T + bt)
        out_t = np.empty(sidx.shape)
        out_s = np.empty(sidx.shape)
        for b in range(3):
            for k in range(nce_n + 1):
                out_t[b, k] = math.exp(float(np.sum(mem_s[sidx[b, k]] * e_t[b])) / nce_t)
                out_s[b, k] = math.exp(float(np.sum(mem_t[sidx[b, k]] * e_s[b])) / nce_t)
        if Z_t is None:  # fixed on the first call only
            Z_t = out_t.mean() * n_data
            Z_s = out_s.mean() * n_data
        expected = np_contrast(out_s / Z_s, n_data) + np_contrast(out_t / Z_t, n_data)
        check(loss, expected, rtol=1e-9)

        # momentum update of the rows idx, after the scores were taken
        for b, i in enumerate(idx):
            mem_t[i] = np_normalize_rows((mom * mem_t[i] + (1 - mom) * e_t[b])[None])[0]
            mem_s[i] = np_normalize_rows((mom * mem_s[i] + (1 - mom) * e_s[b])[None])[0]
        assert_allclose(mem_t_buf.numpy(), mem_t, rtol=RTOL, atol=1e-14)
        assert_allclose(mem_s_buf.numpy(), mem_s, rtol=RTOL, atol=1e-14)
        if n_call == 1:
            # with a recomputed Z the second loss would differ
            Zt2, Zs2 = out_t.mean() * n_data, out_s.mean() * n_data
            other = np_contrast(out_s / Zs2, n_data) + np_contrast(out_t / Zt2, n_data)
            assert abs(other - expected) > 1e-6


def test_crd_contrast_hand_case():
    # With N = 1 negative and M = 2 data: N/M = 1/2. x = [[1/2, 1/2]]:
    # pos: log((1/2) / (1 + 1e-7)); neg: log((1/2) / (1 + 1e-7)); loss = 2 log(2 (1 + 1e-7)).
    from fastkd.reference import ContrastLoss
    check(ContrastLoss(2)(T([[0.5, 0.5]])), 2 * math.log(2 * (1 + 1e-7)))
