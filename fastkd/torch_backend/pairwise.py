"""Pairwise losses (RKD, SP, PKT, CC, IRG) from Gram matrices, with torch ops: the CPU path.

Every loss here but IRG's transformation term starts from G = X X^T (N, N). RKD's angle
term reads its N^3 angles from G one block of anchors at a time, so nothing of size (N, N, D)
or (N, N, N) is held; its backward is written by hand (RKDAngle) so that autograd does not
keep every block.
Sums run in float32 (float64 for float64 inputs); the loss comes back in the input dtype.
"""
import functools
import math

import torch
import torch.nn.functional as F

# (anchors per block) * N^2 entries of the angle term held at once.
_ANGLE_BLOCK_ENTRIES = 1 << 20


def acc_dtype(x):
    """float64 stays float64; float32, bfloat16 and float16 are summed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def centred_gram(x):
    """(Xc, G, same): Xc = X - column means, G = Xc Xc^T made exactly symmetric, in
    acc_dtype(x); same (N, N) bool marks pairs of equal rows, or is None when all differ.

    Distances and angles are translation-invariant; centring keeps G's entries near the
    size of the spread, so G_ii + G_jj - 2 G_ij loses fewer digits. Equal rows have a
    difference vector of exactly 0, which rounding in G cannot be trusted to show.
    """
    x = x.to(acc_dtype(x))
    xc = x - x.mean(dim=0)
    g = xc @ xc.t()
    rows, label = torch.unique(xc, dim=0, return_inverse=True)
    same = label.unsqueeze(0) == label.unsqueeze(1) if len(rows) < len(xc) else None
    return xc, (g + g.t()) * 0.5, same


# --- RKD distance -------------------------------------------------------------

def _clamped_squared(g, same):
    """max(G_ii + G_jj - 2 G_ij, 1e-12), exactly 1e-12 for equal rows; (N, N)."""
    sq = torch.diagonal(g)
    p = (sq.unsqueeze(0) + sq.unsqueeze(1)) - 2 * g
    if same is not None:
        p = p.masked_fill(same, 0)
    return p.clamp(min=1e-12)


def _off_diagonal(p):
    return p * (1 - torch.eye(len(p), dtype=p.dtype, device=p.device))


def distances(g, same):
    """d = sqrt(max(G_ii + G_jj - 2 G_ij, 1e-12)) off the diagonal, 0 on it; (N, N)."""
    return _off_diagonal(_clamped_squared(g, same).sqrt())


def rkd_distance(feat_s, feat_t):
    """smooth_l1(d_s / mean_s, d_t / mean_t) over N^2 entries; mean over the N(N-1) entries
    off the diagonal (each >= 1e-6, so exactly the reference's d[d > 0])."""
    n = feat_s.size(0)
    d_s = distances(*centred_gram(feat_s)[1:])
    d_t = distances(*centred_gram(feat_t)[1:])
    off = n * (n - 1)
    loss = F.smooth_l1_loss(d_s / (d_s.sum() / off), d_t / (d_t.sum() / off))
    return loss.to(feat_s.dtype)


# --- RKD angle ----------------------------------------------------------------

def _angle_block(g, same, lo, hi):
    """For anchors i in [lo, hi): A[i, j, k] = V_jk / (n_j n_k) as (c, N, N), c = hi - lo.

    V_jk = (x_j - x_i).(x_k - x_i) = (G_jk + G_ii) - (G_ij + G_ik), summed in this order so
    that V is exactly symmetric in (j, k) and exactly 0 when j = i; rows equal to x_i are
    set to 0 from `same`. n_j = max(sqrt(V_jj), 1e-12) like F.normalize; A_jj = 1 exactly
    unless n_j is clamped. Also returns
    sq = V_jj (c, N) and 1 / n (c, N).
    """
    gi = g[lo:hi]
    gii = torch.diagonal(g)[lo:hi].unsqueeze(1)
    v = torch.add(g, gii.unsqueeze(2)).sub_(gi.unsqueeze(2) + gi.unsqueeze(1))
    sq = (torch.diagonal(g).unsqueeze(0) + gii) - 2 * gi
    if same is not None:
        zero = same[lo:hi]
        sq.masked_fill_(zero, 0)
        v.masked_fill_(zero.unsqueeze(2) | zero.unsqueeze(1), 0)
    root = sq.clamp(min=0).sqrt_()
    inv = root.clamp(min=1e-12).reciprocal_()
    a = v.mul_(inv.unsqueeze(2)).mul_(inv.unsqueeze(1))
    # e . e of a unit vector: exactly 1 on j = k (0 for a clamped v_j).
    torch.diagonal(a, dim1=1, dim2=2).copy_(root >= 1e-12)
    return a, sq, inv


def _anchor_blocks(n):
    c = max(1, _ANGLE_BLOCK_ENTRIES // (n * n))
    return [(lo, min(lo + c, n)) for lo in range(0, n, c)]


def _angle_grad_terms(g, a, u, sq, inv, lo, hi, m_acc, r_acc):
    """Add one anchor block's share of dL/dX = M X + r * X into m_acc (N, N), r_acc (N,).

    u = dL/dA (c, N, N), symmetric in (j, k). With v_j = x_j - x_i, P = u / (n_j n_k) and
    q_j = dL/d|v_j|^2 = -sum_k u_jk A_jk / |v_j|^2 (0 where the norm is clamped):
    dL/dv_j = sum_k 2 P_jk v_k [k not clamped] + 2 q_j v_j, and x_j gets +dL/dv_j, x_i gets
    -sum_j dL/dv_j. A clamped v_k is exactly 0 (j = i, or a duplicate row), so its terms
    are left out rather than summed as huge numbers that cancel.
    """
    live = sq.clamp(min=0).sqrt() >= 1e-12
    q = torch.linalg.vecdot(u, a).div_(sq.where(live, 1.0)).mul_(-live.to(g.dtype))
    inv_live = inv * live
    f = 2 * inv * torch.bmm(u, inv.unsqueeze(2)).squeeze(2)   # sum_k 2 P_jk
    t = 2 * inv * torch.bmm(u, inv_live.unsqueeze(2)).squeeze(2)  # sum_k 2 P_jk [k live]
    m_acc += u.mul_(inv.unsqueeze(2)).mul_(2 * inv_live.unsqueeze(1)).sum(0)
    m_acc[:, lo:hi] -= (t + 2 * q).t()
    m_acc[lo:hi, :] -= live * f + 2 * q
    r_acc += 2 * q.sum(0)
    r_acc[lo:hi] += (t + 2 * q).sum(1)


class RKDAngle(torch.autograd.Function):
    """smooth_l1(A_s, A_t) over N^3 entries, block by block of anchors."""

    @staticmethod
    def forward(ctx, feat_s, feat_t):
        n = feat_s.size(0)
        xc_s, g_s, same_s = centred_gram(feat_s)
        xc_t, g_t, same_t = centred_gram(feat_t)
        total = torch.zeros((), dtype=g_s.dtype, device=g_s.device)
        for lo, hi in _anchor_blocks(n):
            total += F.smooth_l1_loss(_angle_block(g_s, same_s, lo, hi)[0],
                                      _angle_block(g_t, same_t, lo, hi)[0], reduction="sum")
        ctx.save_for_backward(xc_s, g_s, xc_t, g_t)
        ctx.same = same_s, same_t
        ctx.dtypes = feat_s.dtype, feat_t.dtype
        return (total / n ** 3).to(feat_s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc_s, g_s, xc_t, g_t = ctx.saved_tensors
        n = len(g_s)
        m_s, m_t = torch.zeros_like(g_s), torch.zeros_like(g_t)
        r_s, r_t = g_s.new_zeros(n), g_t.new_zeros(n)
        for lo, hi in _anchor_blocks(n):
            a_s, sq_s, inv_s = _angle_block(g_s, ctx.same[0], lo, hi)
            a_t, sq_t, inv_t = _angle_block(g_t, ctx.same[1], lo, hi)
            u = (a_s - a_t).clamp_(-1, 1)  # smooth_l1's derivative, beta = 1
            _angle_grad_terms(g_s, a_s, u.clone(), sq_s, inv_s, lo, hi, m_s, r_s)
            _angle_grad_terms(g_t, a_t, u.neg_(), sq_t, inv_t, lo, hi, m_t, r_t)
        scale = grad_out.to(g_s.dtype) / n ** 3
        grads = []
        for m, r, xc, dtype, needed in ((m_s, r_s, xc_s, ctx.dtypes[0], ctx.needs_input_grad[0]),
                                        (m_t, r_t, xc_t, ctx.dtypes[1], ctx.needs_input_grad[1])):
            if not needed:
                grads.append(None)
                continue
            # Every term is a difference x_b - x_i, so this is also dL/dX (no un-centring,
            # whose column means would spread the huge duplicate-row terms over every row).
            grads.append(((m @ xc + r.unsqueeze(1) * xc) * scale).to(dtype))
        return tuple(grads)


def rkd_angle(feat_s, feat_t):
    """smooth_l1(A_s, A_t) over the N^3 angles, A[i, j, k] = e_ij . e_ik, without (N, N, N)."""
    return RKDAngle.apply(feat_s, feat_t)


# --- SP -----------------------------------------------------------------------

def sp(fm_s, fm_t):
    """mse(normalize(G_s, dim=1), normalize(G_t, dim=1)), G = flat(f) flat(f)^T, summed in
    acc_dtype."""
    h = [F.normalize(g @ g.t(), dim=1) for g in
         (f.reshape(f.size(0), -1).to(acc_dtype(f)) for f in (fm_s, fm_t))]
    return F.mse_loss(h[0], h[1]).to(fm_s.dtype)


# --- PKT and CC: cosine similarities from the Gram matrix ------------------------------

def _cosine(x, weight):
    """C = G w w^T, G = X X^T in acc_dtype, w = weight(row norms): C_ij = x^_i . x^_j with
    x^ = w x, without an (N, D) copy of the normalised rows."""
    x = x.to(acc_dtype(x))
    g = x @ x.t()
    w = weight(torch.diagonal(g).sqrt())
    return g * w.unsqueeze(1) * w.unsqueeze(0)


def _pkt_cond_prob(x, eps):
    c = (_cosine(x, lambda n: 1 / (n + eps)) + 1) / 2
    return c / c.sum(dim=1, keepdim=True)


def pkt_cos_sim(feat_s, feat_t, eps=1e-6):
    """mean P_t log((P_t + eps) / (P_s + eps)), P = C' / rowsum(C'), C' = (C + 1) / 2 and
    C the cosine similarities with the norms' eps added."""
    p_s, p_t = _pkt_cond_prob(feat_s, eps), _pkt_cond_prob(feat_t, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps))).to(feat_s.dtype)


def _cc_correlation(x, gamma, P_order):
    """K = e^{-2 gamma} sum_{p<=P} y^p / p!, y = 2 gamma S, by Horner: 1 + y (1 + y/2 (...))."""
    y = _cosine(x, lambda n: 1 / n.clamp(min=1e-12)) * (2 * gamma)
    # From y, not a fresh tensor of ones, so that P = 0 still gives a (zero) gradient.
    k = 1 + y / P_order if P_order > 0 else 1 + 0 * y
    for p in range(P_order - 1, 0, -1):
        k = 1 + k * y / p
    return k * math.exp(-2 * gamma)


def cc(feat_s, feat_t, gamma, P_order):
    """mse(K_s, K_t), K the P-order Taylor Gaussian kernel of the cosine similarities."""
    return F.mse_loss(_cc_correlation(feat_s, gamma, P_order),
                      _cc_correlation(feat_t, gamma, P_order)).to(feat_s.dtype)


# --- IRG edge -----------------------------------------------------------------

def _edge(x):
    """E = pdist2 / max(pdist2) of flat(x), from the centred Gram matrix."""
    d = _off_diagonal(_clamped_squared(*centred_gram(x.reshape(x.size(0), -1))[1:]))
    return d / d.max()


def irg_edge(irg_s, irg_t):
    """The mean over feat, fm1 and fm2 of mse(E_s, E_t); irg_* = (fm1, fm2, feat, out)."""
    return (sum(F.mse_loss(_edge(irg_s[i]), _edge(irg_t[i])) for i in (2, 0, 1)) / 3.0
            ).to(irg_s[2].dtype)


# --- IRG transformation -----------------------------------------------------------------

def transformation_pool(fm1, fm2):
    """fm1 average-pooled to fm2's (H, W) when it is larger, as adaptive_avg_pool2d does;
    with whole windows (the sizes divide) that is avg_pool2d, which runs faster."""
    if fm1.size(2) <= fm2.size(2):
        return fm1
    (h1, w1), (h2, w2) = fm1.shape[2:], fm2.shape[2:]
    if h1 % h2 == 0 and w1 % w2 == 0:
        return F.avg_pool2d(fm1, (h1 // h2, w1 // w2))
    return F.adaptive_avg_pool2d(fm1, (h2, w2))


def _transformation(fm1, fm2):
    """T = d' / max(d') (N,), d' = max(d, 1e-12), d_i = |a_i - b'_i|^2: a = fm1 pooled to
    fm2's (H, W) when larger, b' = fm2's channels averaged in pairs when a has fewer,
    paired by flat index. One reduction over each sample's values, summed in acc_dtype."""
    fm1 = transformation_pool(fm1, fm2)
    if fm1.size(1) < fm2.size(1):
        # In place on the sum: one (N, C2 / 2, H, W) temporary instead of two.
        fm2 = torch.add(fm2[:, 0::2], fm2[:, 1::2]).mul_(0.5)
    n, dtype = fm1.size(0), torch.promote_types(acc_dtype(fm1), acc_dtype(fm2))
    diff = fm1.reshape(n, -1).to(dtype) - fm2.reshape(n, -1).to(dtype)
    d = torch.linalg.vecdot(diff, diff).clamp(min=1e-12)
    return d / d.max()


def irg_transformation(irg_s, irg_t):
    """mse(T(fm1_s, fm2_s), T(fm1_t, fm2_t)); irg_* = (fm1, fm2, feat, out)."""
    loss = F.mse_loss(_transformation(irg_s[0], irg_s[1]), _transformation(irg_t[0], irg_t[1]))
    dtypes = [x.dtype for x in (*irg_s[:2], *irg_t[:2])]
    return loss.to(functools.reduce(torch.promote_types, dtypes))
