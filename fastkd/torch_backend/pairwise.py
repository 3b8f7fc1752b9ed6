"""Pairwise losses (RKD, SP, PKT, CC, IRG) with torch ops: the CPU path.

Numerics. RKD's distances and angles and IRG's edges are functions of the squared distances
E_ab = |x_a - x_b|^2 (N, N). Formed from a Gram matrix, E_ab = G_aa + G_bb - 2 G_ab carries
an absolute error of about u |x|^2 (u the unit roundoff), which is all of E_ab for a pair much
closer than the rows' norms: float32 features spread over 5000 with two rows 0.3 apart give a
negative squared distance, a clamped norm of 1e-6 and angles of 1e9. Centring does not help
when the spread itself is large.

RKD reads E from the difference vectors themselves, in float64 (`squared_distances`): for
float32 (and bfloat16/float16) inputs every difference is then exact and E_ab has a relative
error of about D u64, whatever the pair's gap, and equal rows give exactly 0. Its angle at
anchor i comes from E by the law of cosines (polarisation):
    V_jk = (x_j - x_i).(x_k - x_i) = (E_ij + E_ik - E_jk) / 2,   A_jk = V_jk / (n_j n_k),
n_j = sqrt(E_ij). Each E carries a relative error of about u64, so A_jk carries about
u64 (E_ij + E_ik + E_jk) / (n_j n_k) <= 3 u64 max(n_j, n_k) / min(n_j, n_k): 1e-9 at a
gap/spread ratio of 1e-7, against the float32 reference's 1e-7 on every angle. The angles
are kept in float64, so that A_s - A_t of a near-zero loss keeps its digits. A direction
shorter than 1e-12 (E < 1e-24; exactly the equal rows for float32 features of ordinary
size) is taken as zero, as F.normalize makes a zero difference vector, with F.normalize's
gradient through its clamp.

The law of cosines is not the reference's arithmetic at two kinds of anchor, whose angles
come from the difference vectors instead (`_direct_term`: the reference's formula,
F.normalize and a batched product over a block of anchors (c, N, D), in float64, with
autograd's gradient of it formed on the same difference vectors): an anchor with a
direction shorter than 1e-12 but not zero (rows of magnitude 1e-15), which F.normalize
divides by 1e-12 where the law of cosines takes it as zero, for every dtype; and for float64
inputs, where u64 max(n_j, n_k) / min(n_j, n_k) is no longer small next to the reference's
own float64 error, an anchor whose live distances spread past a ratio of 4 (the law of
cosines is then at most 3.9x the reference's float64 gradient error, measured; 17x at 10; see
fastkd/kernels/angle.py), for the other dtypes past a ratio of 1e8 (rows of magnitude 1e-5
among rows of 1e10). Which anchors is read on the host (one sync, as the equal-row test
below makes); compiled, where nothing may branch on the data, every anchor takes the direct
path.

IRG reads E only through E / max(E), so an absolute error far below max(E) is all it needs,
and its E comes from a Gram matrix (`gram_squared_distances`, a matrix product, where wide
feature maps make difference vectors slow). Float64 products pay at no batch size on CPU
(1.6-2.6x a float32 product, measured N = 64..2048, D = 512..8192), so E is formed with the
reference's own float32 operations (16-bit inputs in float32) and rounds as its E does, with
an absolute error of about u (|x_a|^2 + |x_b|^2): at most about u max|x|^2, which is far
below max(E) unless the rows share an offset far larger than their spread. There (max|x|^2
> 16 max(E)) the reference loses the distances, and E comes from the centred float64 rows
instead, with an absolute error of about D u64 |x - mean|^2. (Float32 centred rows are no
cure: their errors, u |x - mean|^2, exceed the reference's on small rows beside large ones,
by up to 400x on a near-zero loss.)

Gradients: with W = dL/dE (N, N), dL/dx_a = 2 sum_b (W_ab + W_ba)(x_a - x_b), formed as one
product L X of the centred rows, L = -2 (W + W^T) with zero row sums, in E's precision
(`distance_grad`). Its rounding on a pair's term is about u |L_ab| (|x_a - mean| +
|x_b - mean|): in float32 (IRG's) the reference's, which sums the same terms; in float64
(RKD's, IRG's offset rows) the pairs where that is no longer small next to the term itself
(closer than 1.6e-8 of those norms for float32 inputs, 1/8 for float64 ones: near-duplicates,
small rows beside large ones) are left out of the product and formed from their differences
(`_close_pairs`; under torch.compile every pair is).

SP, PKT and CC read cosine-type similarities, which subtract nothing, but their losses are
near 0 exactly when student and teacher agree, where any float32 order of operations other
than the reference's leaves rounding of the loss's own size (the reference's rounds alike
on both sides). So their forward is the reference's own operations (16-bit inputs in
float32): their error is the reference's, with a finite gradient at a zero row. What differs
is the backward: X X^T's is one product, (dG + dG^T) X, where autograd makes two (at
N^2 D >= 2^21, where that outweighs a Python Function's cost), and against a fixed teacher
PKT and CC run as Functions (no autograd graph in forward, the gradient in a few passes).
RKD's angle term reads its N^3 angles one block of anchors at a time, so nothing of size
(N, N, D) or (N, N, N) is held; the loss comes back in the input dtype.
"""
import math

import torch
import torch.nn.functional as F

from ..common import (first_order, normalize_grad, normalized_rows, result_dtype, squared_distances_from_gram,
                      transformation_pool, zero_row_sums)
from ..distributed import all_gather_rows, all_reduce_max, all_reduce_sum
from .elementwise import hint

# (anchors per block) * N^2 entries of the angle term held at once: eagerly, blocks of 512 KiB
# (float64), which stay in cache between the block's dozen passes (measured on the CPU: N = 128,
# D = 64 took 42 ms a call with 2^20 entries, 18 ms with 2^16; N = 512 alike or better);
# compiled, fewer and larger blocks, each one more copy of the block's code in the graph.
_ANGLE_BLOCK_ENTRIES = 1 << 16
_ANGLE_BLOCK_ENTRIES_COMPILED = 1 << 20
# X X^T with _Gram's one-product backward from N^2 D of this size (_similarities).
_GRAM_FUNCTION_MIN = 1 << 21
# Directions shorter than this (E below its square) count as zero; F.normalize's clamp.
_NORM_EPS = 1e-12
# An anchor whose live squared distances spread past this (rho > 4 for float64 inputs, 1e8
# for the others) has its angles formed from the difference vectors (_direct_term; module
# docstring), as the Triton path's (fastkd/kernels/angle.py, DIRECT_RATIO_SQ and
# DIRECT_RATIO_SQ_FLOAT32).
_DIRECT_RATIO_SQ = 16.0
_DIRECT_RATIO_SQ_FLOAT32 = 1e16
# distance_grad: a pair closer than this fraction of its centred rows' norms has its gradient
# term formed from its difference: the product with the centred rows rounds the term by
# u64 / ratio of itself, 1/8 of float32's epsilon here (float32, bfloat16, float16 inputs);
# for float64 inputs 8 u64, past which the product's rounding would outgrow the reference's.
_CLOSE = 1.6e-8
_CLOSE_FLOAT64 = 0.125
# Products per block of distance_grad's correction of its close pairs.
_DIFFERENCE_ELEMENTS = 1 << 22
# IRG's E from the uncentred Gram matrix in the working precision while max|x|^2 is at most
# this many times max(E); past it (a common offset far larger than the spread) from the
# centred float64 rows (module docstring).
_OFFSET_RATIO = 16.0


def centred(x, dtype):
    """flat(x) (N, D) in dtype minus its column means: the distances' Gram matrices and
    gradients are formed from these rows (translation changes no distance)."""
    x = x.reshape(x.size(0), -1)
    # Any common translation keeps every distance exact, so the means may be rounded (taken
    # in the input's precision, at least float32); a converted copy is centred in place.
    mean = x.mean(dim=0, dtype=torch.promote_types(x.dtype, torch.float32))
    return x - mean if x.dtype == dtype else x.to(dtype).sub_(mean)


def squared_distances(x, rows=None):
    """E (N, N) float64, E_ab = |x_a - x_b|^2 summed over the difference vector itself (never
    G_aa + G_bb - 2 G_ab); exactly symmetric, exactly 0 on the diagonal and for equal rows.
    rows (a slice): only those rows of E, (n, N), each entry as in the whole matrix."""
    x = x.reshape(x.size(0), -1).to(torch.float64)
    return torch.cdist(x if rows is None else x[rows], x,
                       compute_mode="donot_use_mm_for_euclid_dist").square_()


def gram_squared_distances(x, rows=None):
    """E (N, N) from a Gram matrix (a matrix product, far faster than squared_distances for
    wide rows), for IRG's edges (module docstring): the uncentred rows' in the working
    precision (_working) where that is accurate, else (and under torch.compile, which cannot
    branch on data) the centred float64 rows' (fastkd.common.squared_distances_from_gram).
    rows (a slice lo:hi): only those rows of E, (n, N), from the centred float64 rows,
    E_ab = |x_a|^2 + |x_b|^2 - 2 x_a.x_b alike, 0 at b = a."""
    if rows is None and not torch.compiler.is_compiling():
        # The reference's own operations (reference.rkd.pdist), so that E rounds as its E.
        xw = _working(x.reshape(x.size(0), -1))
        sq = xw.pow(2).sum(dim=1)
        e = (sq.unsqueeze(0) + sq.unsqueeze(1)) - 2 * (xw @ xw.t())
        if sq.max() <= _OFFSET_RATIO * e.max():
            return e.fill_diagonal_(0)
    xc = centred(x, torch.float64)
    if rows is None:
        g = xc @ xc.t()
        return squared_distances_from_gram((g + g.t()) * 0.5)
    sq = torch.linalg.vecdot(xc, xc)
    e = (sq[rows].unsqueeze(1) + sq.unsqueeze(0)) - 2 * (xc[rows] @ xc.t())
    return _off_diagonal(e, rows.start)


def distance_grad(x, w, e, z=None):
    """dL/dX (N, D) in W's precision from W = dL/dE (N, N), the rows x (N, ...) and E their
    squared distances: sum_b L_ab (x_b - x_a), L = Z - 2 (W + W^T) (Z (N, N) optional, its
    diagonal free: RKD's angles), i.e. 2 sum_b (W_ab + W_ba)(x_a - x_b) + Z X. One product
    L' X_c with the centred rows X_c, L' = zero_row_sums(L), which rounds a pair's term by
    about u |L_ab| (|x_a - mean| + |x_b - mean|); with float64 W, the pairs too close for
    that next to their own term (_close_pairs: near-duplicates, small rows beside large
    ones) are left out of the product and formed from their differences instead."""
    xc = centred(x, w.dtype)
    lap = (w + w.t()).mul_(-2)
    if z is not None:
        lap.add_(z)
    if w.dtype != torch.float64:  # IRG's float32 edges: the reference's own rounding
        return zero_row_sums(lap) @ xc
    # The differences from the rows themselves (exact for float32 inputs; each rounded to
    # u64 of itself for float64 ones, where the centred rows' would carry u64 |x - mean|).
    rows = x.reshape(x.size(0), -1).to(torch.float64)
    if torch.compiler.is_compiling():  # no branch on the data: every pair from its difference
        return _difference_product(lap, rows)
    a, b = _close_pairs(x, xc, e)
    if not len(a):
        return zero_row_sums(lap) @ xc
    values = lap[a, b]
    lap[a, b] = 0
    g = zero_row_sums(lap) @ xc
    _add_pair_terms(g, a, b, values, rows)
    return g


def _close_pairs(x, xc, e, lo=0, rows=None):
    """(a, b) index tensors of the pairs a != b with sqrt(E_ab) < ratio (|xc_a| + |xc_b|), ratio
    _CLOSE_FLOAT64 for float64 rows x, else _CLOSE: where the product with the centred rows xc
    (N, D) rounds their gradient terms by more than u64 / ratio of themselves (distance_grad).
    E (N, N), or with rows (a global batch's) the rows lo:lo + rows of E (rows, N), a indexing
    them from lo. One host sync (the CPU path's)."""
    ratio = _CLOSE_FLOAT64 if x.dtype == torch.float64 else _CLOSE
    norms = torch.linalg.vector_norm(xc, dim=1)
    own = norms if rows is None else norms[lo:lo + rows]
    close = e < (ratio * (own.unsqueeze(1) + norms.unsqueeze(0))).square_()
    close.diagonal(lo).fill_(False)  # a = b
    return close.nonzero(as_tuple=True)


def _add_pair_terms(g, a, b, values, rows, both=False):
    """g[a] += values (x_b - x_a) for the pairs (a, b) of the rows (N, D) float64, from their
    differences (and with both g[b] -= the same), in chunks of at most _DIFFERENCE_ELEMENTS
    products."""
    step = max(1, _DIFFERENCE_ELEMENTS // rows.shape[1])
    for k in range(0, len(a), step):
        ka, kb = a[k:k + step], b[k:k + step]
        term = values[k:k + step, None] * (rows[kb] - rows[ka])
        g.index_add_(0, ka, term)
        if both:
            g.index_add_(0, kb, -term)


def _difference_product(lap, rows, others=None):
    """sum_b L_ab (y_b - x_a) (A, D) from the differences of the rows x (A, D) and y (B, D,
    others; the rows themselves by default), L (A, B), in the angle term's blocks of rows
    (_anchor_blocks: the same bounds on the batch under torch.compile)."""
    others = rows if others is None else others
    out = torch.empty_like(rows)
    for lo, hi in _anchor_blocks(len(rows), width=max(len(others), rows.shape[1])):
        diff = others.unsqueeze(0) - rows[lo:hi].unsqueeze(1)  # [a, b] = y_b - x_a
        out[lo:hi] = torch.bmm(lap[lo:hi].unsqueeze(1), diff).squeeze(1)
    return out


def _rows_grad(x, w, e, z=None):
    """distance_grad shaped and typed like x."""
    return distance_grad(x, w, e, z).reshape(x.shape).to(x.dtype)


def _angle_rows_grad(x, w, e, z, direct, scale):
    """RKD's _rows_grad plus scale * direct (N, D) float64 (the angle term's direct anchors,
    _direct_term; None for none), added before the cast to x's dtype."""
    g = distance_grad(x, w, e, z)
    if direct is not None:
        g = g + direct * scale
    return g.reshape(x.shape).to(x.dtype)


class SquaredDistanceLoss(torch.autograd.Function):
    """loss_of(E_s, E_t) for a loss of the two squared-distance matrices (N, N), in their
    precision: E built by `distances` (squared_distances or gram_squared_distances), dL/dE by
    autograd on the (N, N) matrices, dL/dX by distance_grad."""

    @staticmethod
    def forward(ctx, x_s, x_t, loss_of, distances):
        e_s, e_t = distances(x_s), distances(x_t)
        ctx.save_for_backward(x_s, x_t, e_s, e_t)
        ctx.loss_of = loss_of
        return loss_of(e_s, e_t)

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x_s, x_t, e_s, e_t = ctx.saved_tensors
        # torch.func.vjp rather than torch.autograd.grad: torch.compile traces it.
        loss, vjp = torch.func.vjp(ctx.loss_of, e_s, e_t)
        w = vjp(grad_out.to(loss.dtype))
        return (*(_rows_grad(x, g, e) if needed else None
                  for x, g, e, needed in zip((x_s, x_t), w, (e_s, e_t), ctx.needs_input_grad)), None, None)


def _off_diagonal(p, lo=0):
    """p (n, N) with the entries (i, lo + i) set to 0: the diagonal of the whole (N, N)
    matrix when p holds its rows lo:lo + n."""
    eye = torch.eye(*p.shape, dtype=p.dtype, device=p.device)
    if lo:
        eye = eye.roll(lo, dims=1)
    return p * (1 - eye)


# --- RKD distance -------------------------------------------------------------

def _rkd_distance_of(e_s, e_t):
    """smooth_l1(d_s / mean_s, d_t / mean_t) over N^2 entries, d = sqrt(max(E, 1e-12)) off the
    diagonal; the mean over the N(N-1) entries off it (each >= 1e-6, so exactly the
    reference's d[d > 0])."""
    n = len(e_s)
    d_s, d_t = (_off_diagonal(e.clamp(min=1e-12).sqrt()) for e in (e_s, e_t))
    off = n * (n - 1)
    return F.smooth_l1_loss(d_s / (d_s.sum() / off), d_t / (d_t.sum() / off))


# --- RKD angle ----------------------------------------------------------------

def _angle_block(e, lo, hi):
    """(A, inv) for anchors i in [lo, hi): A[i, j, k] = V_jk / (n_j n_k) (c, N, N) from E by
    polarisation (module docstring), and inv = 1 / n_j (c, N), 0 for a zero direction; in
    float64, as E: A_s - A_t of a near-zero loss keeps its digits. A_jj = 1 exactly for a
    live direction; A = 0 wherever j or k is a zero direction."""
    ei = e[lo:hi]
    live = ei >= _NORM_EPS ** 2
    inv = torch.where(live, ei, 1.0).rsqrt_() * live
    a = (ei.unsqueeze(2) + ei.unsqueeze(1)).sub_(e)
    a.mul_(0.5 * inv.unsqueeze(2)).mul_(inv.unsqueeze(1))
    torch.diagonal(a, dim1=1, dim2=2).copy_(live)
    return a, inv


def _anchor_blocks(n, first=0, end=None, width=0):
    """Blocks (lo, hi) of the anchors first:end (all N by default) of an (N, N) E; width: each
    anchor holds (N, max(N, width)) entries (the direct path's difference vectors, width D)."""
    entries = _ANGLE_BLOCK_ENTRIES_COMPILED if torch.compiler.is_compiling() else _ANGLE_BLOCK_ENTRIES
    c = max(1, entries // (n * max(n, width)))
    end = n if end is None else end
    # A while loop, not range(): traced with a dynamic batch (torch.compile), each test is a
    # bound on N, where range() would fix N's value (a graph per batch size).
    blocks, lo = [], first
    while lo < end:
        blocks.append((lo, min(lo + c, end)))
        lo = lo + c
    return blocks


def _angle_grad_block(a, inv, dead, u, sign, lo, hi, w, z):
    """Add one anchor block's share of the gradient into w and z (N, N): dL/dX = 2 sum_b
    (W_ab + W_ba)(x_a - x_b) + Z X. sign * u = dL/dA (c, N, N), u symmetric in (j, k) and
    0 on j = k (A_jj is constant); the sign (+1 student, -1 teacher) is folded into inv.

    Live directions, through E (W = dL/dE), with P = u inv_j inv_k:
    dL/dE_ij = sum_k P_ijk - inv_j^2 sum_k u_ijk A_ijk (E_ij enters V and n_j; E_ik alike),
    dL/dE_jk = -1/2 sum_i P_ijk.
    Zero directions (dead (c, N), or None when there are none): F.normalize divides them by
    its clamp 1e-12, so A_ijk = v_j . e_k / 1e-12 has dL/dv_j = 2e12 sum_k u_ijk e_k (both
    (j, k) and (k, j) entries), e_k = (x_k - x_i) inv_k; x_j gets it and x_i its negative.
    """
    ua = torch.einsum("cjk,cjk->cj", u, a).mul_(sign)
    signed = inv * sign
    p = (u * signed.unsqueeze(2)).mul_(inv.unsqueeze(1))
    w[lo:hi] += p.sum(dim=2) - inv * inv * ua
    w -= 0.5 * p.sum(dim=0)
    if dead is not None:
        c = (u * signed.unsqueeze(1)).mul_((2 / _NORM_EPS) * dead.unsqueeze(2))  # c_ijk
        z += c.sum(dim=0)
        z[:, lo:hi] -= c.sum(dim=2).t()  # s_ij
        z[lo:hi] -= c.sum(dim=1)
        # Z_ii += sum_j s_ij: left to zero_row_sums.


def _direct_anchors(e_s, e_t, first, end, spread):
    """(end - first,) bool: the anchors first:end whose angles need the difference vectors:
    on either side a squared distance in (0, NORM_EPS^2) (a direction F.normalize scales by
    1 / NORM_EPS, not a zero one), or live squared distances spread past `spread`
    (_DIRECT_RATIO_SQ for float64 inputs, else _DIRECT_RATIO_SQ_FLOAT32)."""
    flags = None
    for e in (e_s, e_t):
        ei = e[first:end]
        live = ei >= _NORM_EPS ** 2
        f = ((ei > 0) & ~live).any(dim=1)
        low = torch.where(live, ei, math.inf).amin(dim=1)
        f |= ei.amax(dim=1) > spread * low
        flags = f if flags is None else flags | f
    return flags


def _direct_block(x, idx):
    """(A, e, m, live) of the anchors idx (c,) from the rows x (N, D) float64, as the reference
    forms them: d = x_j - x_i (c, N, D), m = max(|d|, NORM_EPS) (c, N), e = d / m,
    A = e e^T (c, N, N), live = [|d| >= NORM_EPS]."""
    d = x.unsqueeze(0) - x[idx].unsqueeze(1)
    norm = torch.linalg.vector_norm(d, dim=2)
    m = norm.clamp(min=_NORM_EPS)
    e = d / m.unsqueeze(2)
    return torch.bmm(e, e.transpose(1, 2)), e, m, norm >= _NORM_EPS


def _direct_term(rows, needs, blocks):
    """(N^3 * loss, grads) of the angles at the anchors of each block (an index tensor) from
    the difference vectors, the reference's formula: grads[i] (N, D) float64 the N^3 dL/dX of
    a side that needs it (else None), by F.normalize's and bmm's backward: with
    g_j = dL/de_j = 2 sum_k U_jk e_k (U = dL/dA, symmetric; 0 on j = k for a live direction,
    where A_jj is constant), dL/dd_j = (g_j - live_j e_j (e_j . g_j)) / m_j, which x_j
    receives and x_i gives back. Every product is of a difference vector taken from the
    anchor, so nothing cancels that the reference keeps. No blocks: (0, [None, None])."""
    if not blocks:
        return 0.0, [None, None]
    x_s, x_t = (x.reshape(x.size(0), -1).to(torch.float64) for x in rows)
    total = x_s.new_zeros(())
    grads = [torch.zeros_like(x) if needed else None for x, needed in zip((x_s, x_t), needs)]
    for idx in blocks:
        a_s, e_s, m_s, live_s = _direct_block(x_s, idx)
        a_t, e_t, m_t, live_t = _direct_block(x_t, idx)
        total = total + F.smooth_l1_loss(a_s, a_t, reduction="sum")
        if not any(needs):
            continue
        u = (a_s - a_t).clamp_(-1, 1)  # smooth_l1's derivative, beta = 1
        for g, e, m, live, sign in ((grads[0], e_s, m_s, live_s, 2.0), (grads[1], e_t, m_t, live_t, -2.0)):
            if g is None:
                continue
            uj = u.clone()
            torch.diagonal(uj, dim1=1, dim2=2).mul_(~live)
            gj = torch.bmm(uj, e).mul_(sign)
            proj = torch.linalg.vecdot(e, gj).mul_(live)
            dd = gj.sub_(e * proj.unsqueeze(2)).div_(m.unsqueeze(2))
            g += dd.sum(dim=0)
            g.index_add_(0, idx, dd.sum(dim=1), alpha=-1)
    return total, grads


def _angle_term(e_s, e_t, needs, rows, anchors=(0, None)):
    """(N^3 * loss, sides, direct) of the angle term from E: sides[i] = (W, Z or None) (N, N)
    for a side that needs a gradient (else None), with N^3 dL/dX = 2 sum_b (W_ab + W_ba)
    (x_a - x_b) + Z X (_angle_grad_block) + direct[i], direct[i] (N, D) float64 the share of
    the anchors whose angles come from the difference vectors of rows = (x_s, x_t) (N, D_*)
    (_direct_anchors, _direct_term). anchors (first, end): only the angles at those anchors
    (first:end; end None for N), and their share of the gradient."""
    n = len(e_s)
    first, end = anchors[0], n if anchors[1] is None else anchors[1]
    width = max(x[0].numel() for x in rows)
    spread = (_DIRECT_RATIO_SQ if torch.float64 in (rows[0].dtype, rows[1].dtype)
              else _DIRECT_RATIO_SQ_FLOAT32)
    if torch.compiler.is_compiling():
        # No branch on the data (nor a sync): every anchor from the difference vectors.
        total, direct = _direct_term(rows, needs, [torch.arange(lo, hi, device=e_s.device)
                                                   for lo, hi in _anchor_blocks(n, first, end, width)])
        return total, [(torch.zeros_like(e_s), None) if needed else None for needed in needs], direct
    # The anchors for the difference vectors, read on the host: a sync (the CPU path's; on
    # CUDA, fastkd's Triton path decides on the device).
    flags = _direct_anchors(e_s, e_t, first, end, spread)
    chosen = (torch.nonzero(flags).flatten() + first).tolist()
    c = _anchor_blocks(n, 0, 1, width)[0][1]  # anchors per block
    total, direct = _direct_term(rows, needs, [torch.tensor(chosen[k:k + c], device=e_s.device)
                                               for k in range(0, len(chosen), c)])
    chosen = set(chosen)
    # Per side that needs a gradient: (E, W, Z or None when no pair of rows is closer than
    # the clamp, i.e. no equal rows: the direct anchors took the short, nonzero directions).
    sides = [(e, torch.zeros_like(e),
              torch.zeros_like(e) if int((e < _NORM_EPS ** 2).sum()) > n else None)
             if needed else None for e, needed in zip((e_s, e_t), needs)]
    for lo, hi in _anchor_blocks(n, first, end):
        a_s, inv_s = _angle_block(e_s, lo, hi)
        a_t, inv_t = _angle_block(e_t, lo, hi)
        mine = [a in chosen for a in range(lo, hi)]
        if any(mine):  # the direct anchors' angles are counted above: here A_s = A_t, u = 0
            keep = torch.tensor(mine, device=e_s.device).view(-1, 1, 1)
            a_s = torch.where(keep, a_t, a_s)
        total += F.smooth_l1_loss(a_s, a_t, reduction="sum")
        if not any(needs):
            continue
        u = (a_s - a_t).clamp_(-1, 1)  # smooth_l1's derivative, beta = 1
        torch.diagonal(u, dim1=1, dim2=2).zero_()
        for side, a, inv, sign in ((sides[0], a_s, inv_s, 1.0), (sides[1], a_t, inv_t, -1.0)):
            if side is not None:
                e, w, z = side
                dead = (e[lo:hi] < _NORM_EPS ** 2).double() if z is not None else None
                _angle_grad_block(a, inv, dead, u, sign, lo, hi, w, z)
    return total, [side[1:] if side is not None else None for side in sides], direct


# --- RKD: both terms ---------------------------------------------------------

class RKDLoss(torch.autograd.Function):
    """w_dist * distance term + w_angle * angle term, feat_* (N, D_*), a term whose weight is
    0 skipped: the distance term _rkd_distance_of, the angle term smooth_l1(A_s, A_t) over
    N^3 entries, block by block of anchors (_angle_term); both from one exact E (N, N) per
    side.

    The angle term's gradient is formed in forward, where the angles are at hand, as W = dL/dE
    and Z (N, N) per side: backward then only scales them, instead of building every angle
    again, adds the distance term's dL/dE and maps the sum onto the rows once per side."""

    @staticmethod
    def forward(ctx, feat_s, feat_t, w_dist, w_angle):
        ctx.weights = (w_dist, w_angle)
        e_s, e_t = squared_distances(feat_s), squared_distances(feat_t)
        loss = e_s.new_zeros(())
        sides = [None, None]
        if w_dist:
            loss = loss + w_dist * _rkd_distance_of(e_s, e_t)
        direct = [None, None]
        if w_angle:
            total, sides, direct = _angle_term(e_s, e_t, ctx.needs_input_grad[:2], (feat_s, feat_t))
            loss = loss + w_angle * (total / len(e_s) ** 3)
        ctx.save_for_backward(feat_s, feat_t, e_s, e_t,
                              *(t for side in sides for t in (side or (None, None))), *direct)
        return loss.to(result_dtype(feat_s, feat_t))

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        feat_s, feat_t, e_s, e_t, w_s, z_s, w_t, z_t, direct_s, direct_t = ctx.saved_tensors
        (w_dist, w_angle), grad = ctx.weights, grad_out.to(torch.float64)
        dist = (None, None)
        if w_dist:  # the distance term's dL/dE
            _, vjp = torch.func.vjp(_rkd_distance_of, e_s, e_t)
            dist = vjp(grad * w_dist)
        scale = grad * w_angle / len(feat_s) ** 3
        grads = []
        for x, e, w_d, w_a, z, direct, needed in zip((feat_s, feat_t), (e_s, e_t), dist, (w_s, w_t), (z_s, z_t),
                                                     (direct_s, direct_t), ctx.needs_input_grad):
            # Both terms are 2 sum_b (W_ab + W_ba)(x_a - x_b) (+ Z X): one map onto the rows.
            w = w_d
            if w_a is not None:  # scaled on the (N, N) matrices, not on the (N, D) result
                w_a, z = w_a * scale, None if z is None else z * scale
                w = w_a if w_d is None else w_a + w_d
            grads.append(_angle_rows_grad(x, w, e, z, direct, scale) if needed and w is not None else None)
        return (*grads, None, None)


def rkd(feat_s, feat_t, w_dist, w_angle):
    """w_dist * rkd_distance + w_angle * rkd_angle, a term whose weight is 0 skipped."""
    return RKDLoss.apply(feat_s, feat_t, w_dist, w_angle)


def rkd_distance(feat_s, feat_t):
    """smooth_l1(d_s / mean(d_s), d_t / mean(d_t)) over the N^2 pairwise distances."""
    return RKDLoss.apply(feat_s, feat_t, 1.0, 0.0)


def rkd_angle(feat_s, feat_t):
    """smooth_l1(A_s, A_t) over the N^3 angles, A[i, j, k] = e_ij . e_ik, without (N, N, N)."""
    return RKDLoss.apply(feat_s, feat_t, 0.0, 1.0)


# --- SP, PKT and CC: similarities, with the reference's own forward operations ------------
# Their losses are near 0 exactly when student and teacher agree, where any other order of
# operations leaves rounding of the loss's own size that the reference's, alike on both
# sides, does not: so the forward is the reference's operations (bfloat16/float16 in
# float32), and its error the reference's; a zero row's gradient is finite. The backwards are
# fastkd's (module docstring).

def _working(x):
    """float32 for 16-bit inputs, else the input's dtype."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _Gram(torch.autograd.Function):
    """X X^T (N, N), the reference's product, with the backward (dG + dG^T) X: one product
    where autograd's for x @ x.t() makes two (dG X and dG^T X, then added), the same terms
    summed. Differentiable again (its backward is torch ops on the saved X)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x @ x.t()

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return (grad + grad.t()) @ x


def _similarities(x, rows):
    """x[rows] x^T, the rows `rows` of X X^T (all by default: through _Gram where a backward
    follows and its one product saves more than a Python Function costs, N^2 D >= 2^21,
    measured)."""
    if rows is not None:
        return x[rows] @ x.t()
    if x.requires_grad and torch.is_grad_enabled() and x.shape[0] * x.numel() >= _GRAM_FUNCTION_MIN:
        return _Gram.apply(x)
    return x @ x.t()  # no backward to save a product in (a teacher's), or too small to pay


def _sp_similarity(fm, rows=None):
    """normalize(G, dim=1), G = flat(f) flat(f)^T, the rows `rows` of it (all by default)."""
    g = _working(fm.reshape(fm.size(0), -1))
    return normalized_rows(_similarities(g, rows))[0]


def sp(fm_s, fm_t):
    """mse(normalize(G_s, dim=1), normalize(G_t, dim=1)), G = flat(f) flat(f)^T, with the
    reference's operations (SPStudent against a fixed teacher)."""
    if not fm_t.requires_grad or not torch.is_grad_enabled():  # the teacher is a constant
        return SPStudent.apply(fm_s, _sp_similarity(fm_t.detach())).to(result_dtype(fm_s, fm_t))
    return F.mse_loss(_sp_similarity(fm_s), _sp_similarity(fm_t)).to(result_dtype(fm_s, fm_t))


class SPStudent(torch.autograd.Function):
    """SP's loss against a fixed teacher's normalised G_t (N, N), with a hand-written
    backward: the reference's forward operations without an autograd graph, and with
    H = normalize(G, dim=1), G = X X^T: dH = 2 (H - H_t) / N^2, dG by normalize's gradient
    (fastkd.common.normalize_grad), dX = (dG + dG^T) X."""

    @staticmethod
    def forward(ctx, fm, h_t):
        x = _working(fm.reshape(fm.size(0), -1))
        h, norm = normalized_rows(x @ x.t())
        ctx.save_for_backward(x, h, norm, h_t)
        ctx.shape, ctx.dtype = fm.shape, fm.dtype
        return hint(h, h_t)  # F.mse_loss without its Python wrapper (no grad here: ATen's op)

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x, h, norm, h_t = ctx.saved_tensors
        # In the loss's precision (a float64 teacher's), then H's, as autograd's promotion does.
        d_h = ((h - h_t) * (grad_out * (2.0 / h.numel()))).to(h.dtype)
        d_g = normalize_grad(h, norm, d_h)
        return ((d_g + d_g.t()) @ x).reshape(ctx.shape).to(ctx.dtype), None


def _pkt_unit_rows(x, eps):
    """(xw, sq, n, z): the rows in the working precision, their squared norms (N, 1),
    n = sqrt(sq) with sq clamped at the smallest normal number, z = xw / (n + eps) (NaN on a
    row with an Inf or a NaN)."""
    xw = _working(x)
    sq = torch.sum(xw ** 2, dim=1, keepdim=True)
    n = torch.sqrt(sq.clamp(min=torch.finfo(sq.dtype).tiny))
    return xw, sq, n, xw / (n + eps)


def _nan_to_zero(z):
    """NaN -> 0 in one pass, as the reference's where(isnan) in three; no finite row gives an
    Inf here (its norm is at least eps)."""
    return torch.nan_to_num(z, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _pkt_cond_prob(x, eps, rows=None):
    """P = C' / rowsum(C'), C' = (x^ x^T + 1) / 2, x^ = x / (||x|| + eps), NaN -> 0 as the
    reference; the norm's square is clamped at the smallest normal number, so a zero row has
    the same x^ = 0 but a finite gradient (the reference's sqrt at 0 gives an infinite one).
    The rows `rows` of P (all by default)."""
    x = _nan_to_zero(_pkt_unit_rows(x, eps)[3])
    cos = (_similarities(x, rows) + 1.0) / 2.0
    return cos / cos.sum(dim=1, keepdim=True)


def pkt_cos_sim(feat_s, feat_t, eps=1e-6):
    """mean P_t log((P_t + eps) / (P_s + eps)), P = C' / rowsum(C'), C' = (C + 1) / 2 and
    C the cosine similarities with the norms' eps added."""
    if not feat_t.requires_grad or not torch.is_grad_enabled():  # the teacher is a constant
        return PKTStudent.apply(feat_s, _pkt_cond_prob(feat_t.detach(), eps), eps).to(
            result_dtype(feat_s, feat_t))
    p_s, p_t = _pkt_cond_prob(feat_s, eps), _pkt_cond_prob(feat_t, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps))).to(result_dtype(feat_s, feat_t))


class PKTStudent(torch.autograd.Function):
    """PKT's loss against a fixed teacher P_t (N, N), with a hand-written backward: the
    reference's forward operations without an autograd graph (whose bookkeeping is most of
    the time at the collection's sizes), and dL/dx in a few passes. With G = dL/dP =
    -P_t / (N^2 (P + eps)), rho the row sums of C', z = x r, r = 1 / (n + eps), n = |x|:
        dC' = (G - rowsum(G P)) / rho,  dz = (dC + dC^T) z with dC = dC' / 2 (0 on a NaN row),
        dx = r dz - x r^2 (dz . x) / n  (no second term where n^2 is clamped)."""

    @staticmethod
    def forward(ctx, x, p_t, eps):
        xw, sq, n, z = _pkt_unit_rows(x, eps)
        finite = ~torch.isnan(z)
        z = _nan_to_zero(z)
        cos = (z @ z.t() + 1.0) / 2.0
        rho = cos.sum(dim=1, keepdim=True)
        p = cos / rho
        ctx.save_for_backward(xw, z, n, finite, rho, p, p_t, sq)
        ctx.eps, ctx.dtype = eps, x.dtype
        return torch.mean(p_t * torch.log((p_t + eps) / (p + eps)))

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        xw, z, n, finite, rho, p, p_t, sq = ctx.saved_tensors
        r = 1.0 / (n + ctx.eps)
        # In the loss's precision (a float64 teacher's), then P's, as autograd's promotion does.
        g = (p_t / (p + ctx.eps) * (-grad_out / p.numel())).to(p.dtype)
        dc = (g - (g * p).sum(dim=1, keepdim=True)) / (2 * rho)
        dz = ((dc + dc.t()) @ z) * finite
        # Through the norm only where n^2 is not clamped (as clamp's gradient).
        dr = (dz * xw).sum(dim=1, keepdim=True) * r * r / n * (sq >= torch.finfo(sq.dtype).tiny)
        return (dz * r - xw * dr).to(ctx.dtype), None, None


def _cc_coefficients(gamma, P_order):
    return [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(P_order + 1)]


def _cc_kernel(sim, coef):
    """sum_p c_p S^p, the reference's operations (its sum of powers, in its order: a near-zero
    loss rounds as the reference's)."""
    corr = torch.zeros_like(sim)
    for p, c in enumerate(coef):
        corr = corr + c * torch.pow(sim, p)
    return corr


def _cc_correlation(x, gamma, P_order, rows=None):
    """K = sum_{p<=P} e^{-2 gamma} (2 gamma)^p / p! S^p, S the cosines of F.normalize'd rows
    (finite gradient at a zero row); the rows `rows` of K (all by default)."""
    x = normalized_rows(_working(x))[0]
    return _cc_kernel(_similarities(x, rows), _cc_coefficients(gamma, P_order))


def cc(feat_s, feat_t, gamma, P_order):
    """mse(K_s, K_t), K the P-order Taylor Gaussian kernel of the cosine similarities."""
    if not feat_t.requires_grad or not torch.is_grad_enabled():  # the teacher is a constant
        k_t = _cc_correlation(feat_t.detach(), gamma, P_order)
        return CCStudent.apply(feat_s, k_t, _cc_coefficients(gamma, P_order)).to(result_dtype(feat_s, feat_t))
    return F.mse_loss(_cc_correlation(feat_s, gamma, P_order),
                      _cc_correlation(feat_t, gamma, P_order)).to(result_dtype(feat_s, feat_t))


class CCStudent(torch.autograd.Function):
    """CC's loss against a fixed teacher kernel K_t (N, N), with a hand-written backward: the
    reference's forward operations without an autograd graph, and dL/dx in a few passes.
    With z = x / max(|x|, 1e-12) (F.normalize) and S = z z^T:
        dK = 2 (K - K_t) / N^2,  dS = dK sum_{p>=1} p c_p S^(p-1),  dz = (dS + dS^T) z,
        dx = (dz - z (z . dz)) / |x| where |x| > 1e-12, else dz / 1e-12 (F.normalize's clamp)."""

    @staticmethod
    def forward(ctx, x, k_t, coef):
        z, norm = normalized_rows(_working(x))
        sim = z @ z.t()
        k = _cc_kernel(sim, coef)
        ctx.save_for_backward(x, z, norm, sim, k, k_t)
        ctx.coef = coef
        return F.mse_loss(k, k_t)

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x, z, norm, sim, k, k_t = ctx.saved_tensors
        # In the loss's precision (a float64 teacher's), then K's, as autograd's promotion does.
        d_k = ((k - k_t) * (2 * grad_out / k.numel())).to(k.dtype)
        slope = torch.zeros_like(sim)  # d K / d S, by Horner's rule
        for p in range(len(ctx.coef) - 1, 0, -1):
            slope = slope * sim + p * ctx.coef[p]
        d_s = d_k * slope
        return normalize_grad(z, norm, (d_s + d_s.t()) @ z).to(x.dtype), None, None


# --- IRG edge -----------------------------------------------------------------

def _edge_of(e_s, e_t):
    """mse(E_s, E_t), E = pdist2 / max(pdist2), pdist2 = max(E, 1e-12) off the diagonal; in
    the wider precision of the two."""
    dtype = torch.promote_types(e_s.dtype, e_t.dtype)
    p_s, p_t = (_off_diagonal(e.to(dtype).clamp(min=1e-12)) for e in (e_s, e_t))
    return F.mse_loss(p_s / p_s.max(), p_t / p_t.max())


def irg_edge(irg_s, irg_t):
    """The mean over feat, fm1 and fm2 of mse(E_s, E_t); irg_* = (fm1, fm2, feat, out)."""
    return (sum(SquaredDistanceLoss.apply(irg_s[i], irg_t[i], _edge_of, gram_squared_distances)
                for i in (2, 0, 1)) / 3.0).to(irg_s[2].dtype)


# --- IRG transformation -----------------------------------------------------------------

def _transformation_distances(fm1, fm2):
    """d' = max(d, 1e-12) (N,) float64, d_i = |a_i - b'_i|^2: a = fm1 pooled to fm2's (H, W)
    when larger, b' = fm2's channels averaged in pairs when a has fewer, paired by flat
    index. One reduction over each sample's values, summed in float64."""
    fm1 = transformation_pool(fm1, fm2)
    if fm1.size(1) < fm2.size(1):
        # In place on the sum: one (N, C2 / 2, H, W) temporary instead of two.
        fm2 = torch.add(fm2[:, 0::2], fm2[:, 1::2]).mul_(0.5)
    n = fm1.size(0)
    diff = fm1.reshape(n, -1).to(torch.float64, copy=True).sub_(fm2.reshape(n, -1))  # never on fm1
    return torch.linalg.vecdot(diff, diff).clamp(min=1e-12)


def _transformation(fm1, fm2):
    """T = d' / max(d') (N,), d' of _transformation_distances."""
    d = _transformation_distances(fm1, fm2)
    return d / d.max()


def irg_transformation(irg_s, irg_t):
    """mse(T(fm1_s, fm2_s), T(fm1_t, fm2_t)); irg_* = (fm1, fm2, feat, out)."""
    loss = F.mse_loss(_transformation(irg_s[0], irg_s[1]), _transformation(irg_t[0], irg_t[1]))
    return loss.to(result_dtype(*irg_s[:2], *irg_t[:2]))


# --- Global batch: each rank computes the relation rows of its own samples -------------
# With global_batch=True (fastkd.functional) the batch is the concatenation X (N, D) of every
# rank's rows in rank order, and this rank's samples are the rows lo:hi of it. Each function
# below gathers X (fastkd.distributed.all_gather_rows), computes only the rows lo:hi of the
# (N, N) relations (for RKD's angle, the anchors lo:hi), combines global statistics (means,
# maxima) with differentiable all-reduces, and returns all_reduce_sum of its part: the loss
# of the whole batch on every rank, with W times this rank's share of the gradient
# (fastkd/distributed.py says why DistributedDataParallel's average then gives the
# single-process gradient). Work and memory per rank: (n, N) relations, n N^2 angles (the
# angle term also holds E (N, N), as one anchor's angles do). The same numerics as above:
# exact squared distances for RKD, centred Gram rows for IRG's edges, the reference's
# operations for SP, PKT and CC. The torch backend's; the triton backend runs the same
# algorithm on the Triton kernels (fastkd/autograd.py's *_global), except for IRG's vertex
# term, which it takes from here.

def distance_grad_rows(x, w, e, lo):
    """dL/dX (N, D) in W's precision from W = dL/dE (n, N) of the rows lo:lo + n of E (e, n, N)
    and the rows x (N, ...): row a of them gets 2 sum_b W_ab (x_a - x_b), every row b gets
    2 sum_a W_ab (x_b - x_a); formed as distance_grad forms its sums (W square, lo 0, is its
    case): products with the centred rows, the close pairs from their differences."""
    xc = centred(x, w.dtype)
    own = slice(lo, lo + len(w))
    if w.dtype == torch.float64 and torch.compiler.is_compiling():
        rows = x.reshape(x.size(0), -1).to(torch.float64)
        g = -2 * _difference_product(w.t(), rows, rows[own])
        g[own] -= 2 * _difference_product(w, rows[own], rows)
        return g
    close = None
    if w.dtype == torch.float64:
        a, b = _close_pairs(x, xc, e, lo, len(w))
        if len(a):
            # (-2 W_ab)(x_b - x_a) = 2 W_ab (x_a - x_b), the pair's term on row a (and minus it on b).
            close, values, w = (a + lo, b), w[a, b] * -2, w.clone()
            w[a, b] = 0
    g = 2 * (w.sum(dim=0).unsqueeze(1) * xc - w.t() @ xc[own])
    g[own] += 2 * (w.sum(dim=1, keepdim=True) * xc[own] - w @ xc)
    if close is not None:
        _add_pair_terms(g, *close, values, x.reshape(x.size(0), -1).to(torch.float64), both=True)
    return g


class RowSquaredDistances(torch.autograd.Function):
    """E[lo:hi] (n, N) of the rows X (N, ...) by `distances` (squared_distances or
    gram_squared_distances, rows=slice(lo, hi)); backward maps dL/dE onto X with
    distance_grad_rows, from the centred rows, as SquaredDistanceLoss does."""

    @staticmethod
    def forward(ctx, x, lo, hi, distances):
        e = distances(x, slice(lo, hi))
        ctx.save_for_backward(x, e)
        ctx.lo = lo
        return e

    @staticmethod
    @first_order
    def backward(ctx, w):
        x, e = ctx.saved_tensors
        grad = distance_grad_rows(x, w, e, ctx.lo)
        return grad.reshape(x.shape).to(x.dtype), None, None, None


def _gather(x, group, sizes):
    """(X, rows): every rank's x concatenated (differentiable), and this rank's rows of it."""
    full, lo = all_gather_rows(x, group, sizes)
    return full, slice(lo, lo + x.shape[0])


def _rkd_distance_rows(e_s, e_t, lo, group):
    """This rank's part of _rkd_distance_of from the rows lo:lo + n of E (n, N): the means
    of the N(N-1) distances off the diagonal all-reduced, smooth_l1 summed over the rows,
    divided by N^2."""
    n = e_s.shape[1]
    d_s, d_t = (_off_diagonal(e.clamp(min=1e-12).sqrt(), lo) for e in (e_s, e_t))
    means = all_reduce_sum(torch.stack([d_s.sum(), d_t.sum()]), group) / (n * (n - 1))
    return F.smooth_l1_loss(d_s / means[0], d_t / means[1], reduction="sum") / n ** 2


def _rkd_distance_part(feat_s, feat_t, group, sizes):
    (x_s, rows), (x_t, _) = _gather(feat_s, group, sizes), _gather(feat_t, group, sizes)
    e_s, e_t = (RowSquaredDistances.apply(x, rows.start, rows.stop, squared_distances) for x in (x_s, x_t))
    return _rkd_distance_rows(e_s, e_t, rows.start, group)


def _angle_grads(saved, grad_out):
    """RKDAngleRows' input gradients from what its forward saved: (X_s, X_t, E_s, E_t, W_s,
    Z_s, W_t, Z_t, direct_s, direct_t)."""
    feat_s, feat_t, e_s, e_t, w_s, z_s, w_t, z_t, direct_s, direct_t = saved
    scale = grad_out.to(torch.float64) / len(feat_s) ** 3
    # Scaled on the (N, N) matrices, not on the (N, D) result.
    return tuple(None if w is None else _angle_rows_grad(x, w * scale, e, None if z is None else z * scale, direct,
                                                          scale)
                 for x, e, w, z, direct in ((feat_s, e_s, w_s, z_s, direct_s), (feat_t, e_t, w_t, z_t, direct_t)))


class RKDAngleRows(torch.autograd.Function):
    """This rank's part of RKDLoss's angle term: the N^2 angles at each anchor lo:hi of X
    (N, D) over N^3, from E (N, N) gathered from every rank's rows; float64. The gradient
    (W, Z) reaches every row of X; backward as RKDLoss's."""

    @staticmethod
    def forward(ctx, x_s, x_t, lo, hi, group, sizes):
        with torch.no_grad():
            e_s, e_t = (all_gather_rows(squared_distances(x, slice(lo, hi)), group, sizes)[0]
                        for x in (x_s, x_t))
        total, sides, direct = _angle_term(e_s, e_t, ctx.needs_input_grad[:2], (x_s, x_t), (lo, hi))
        ctx.save_for_backward(x_s, x_t, e_s, e_t, *(t for side in sides for t in (side or (None, None))), *direct)
        return total / len(e_s) ** 3

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        return (*_angle_grads(ctx.saved_tensors, grad_out), None, None, None, None)


def _rkd_angle_part(feat_s, feat_t, group, sizes):
    (x_s, rows), (x_t, _) = _gather(feat_s, group, sizes), _gather(feat_t, group, sizes)
    return RKDAngleRows.apply(x_s, x_t, rows.start, rows.stop, group, sizes)


def rkd_distance_global(feat_s, feat_t, *, group, sizes):
    """rkd_distance over every rank's batch (sizes: their local batch sizes), sharded."""
    return all_reduce_sum(_rkd_distance_part(feat_s, feat_t, group, sizes), group).to(
        result_dtype(feat_s, feat_t))


def rkd_angle_global(feat_s, feat_t, *, group, sizes):
    """rkd_angle over every rank's batch, the anchors sharded."""
    loss = all_reduce_sum(_rkd_angle_part(feat_s, feat_t, group, sizes), group)
    return loss.to(result_dtype(feat_s, feat_t))


def rkd_global(feat_s, feat_t, w_dist, w_angle, *, group, sizes):
    """rkd over every rank's batch, sharded (each term forms this rank's rows of E)."""
    loss = (w_dist * _rkd_distance_part(feat_s, feat_t, group, sizes)
            + w_angle * _rkd_angle_part(feat_s, feat_t, group, sizes))
    return all_reduce_sum(loss, group).to(result_dtype(feat_s, feat_t))


def sp_global(fm_s, fm_t, *, group, sizes):
    """sp over every rank's batch: this rank's rows of G^_s - G^_t."""
    (f_s, rows), (f_t, _) = (_gather(f.reshape(f.size(0), -1), group, sizes) for f in (fm_s, fm_t))
    n = f_s.shape[0]
    part = F.mse_loss(_sp_similarity(f_s, rows), _sp_similarity(f_t, rows), reduction="sum") / n ** 2
    return all_reduce_sum(part, group).to(result_dtype(fm_s, fm_t))


def pkt_cos_sim_global(feat_s, feat_t, eps=1e-6, *, group, sizes):
    """pkt_cos_sim over every rank's batch: this rank's rows of P (each row sums over all N)."""
    (x_s, rows), (x_t, _) = _gather(feat_s, group, sizes), _gather(feat_t, group, sizes)
    p_s, p_t = _pkt_cond_prob(x_s, eps, rows), _pkt_cond_prob(x_t, eps, rows)
    part = torch.sum(p_t * torch.log((p_t + eps) / (p_s + eps))) / x_s.shape[0] ** 2
    return all_reduce_sum(part, group).to(result_dtype(feat_s, feat_t))


def cc_global(feat_s, feat_t, gamma, P_order, *, group, sizes):
    """cc over every rank's batch: this rank's rows of K_s - K_t."""
    (x_s, rows), (x_t, _) = _gather(feat_s, group, sizes), _gather(feat_t, group, sizes)
    part = F.mse_loss(_cc_correlation(x_s, gamma, P_order, rows),
                      _cc_correlation(x_t, gamma, P_order, rows), reduction="sum") / x_s.shape[0] ** 2
    return all_reduce_sum(part, group).to(result_dtype(feat_s, feat_t))


def irg_vertex_global(out_s, out_t, *, group, sizes):
    """mse(out_s, out_t) over every rank's batch (a mean over all ranks' entries)."""
    diff = _working(out_s) - _working(out_t)
    part = diff.pow(2).sum() / (sum(sizes) * out_s[0].numel())
    return all_reduce_sum(part, group).to(result_dtype(out_s, out_t))


def irg_edge_global(irg_s, irg_t, *, group, sizes):
    """irg_edge over every rank's batch: this rank's rows of each E, max(E) all-reduced."""
    part = 0.0
    for i in (2, 0, 1):
        (x_s, rows), (x_t, _) = _gather(irg_s[i], group, sizes), _gather(irg_t[i], group, sizes)
        p_s, p_t = (_off_diagonal(RowSquaredDistances.apply(x, rows.start, rows.stop, gram_squared_distances)
                                  .clamp(min=1e-12), rows.start) for x in (x_s, x_t))
        part = part + F.mse_loss(p_s / all_reduce_max(p_s, group), p_t / all_reduce_max(p_t, group),
                                 reduction="sum") / x_s.shape[0] ** 2
    return (all_reduce_sum(part, group) / 3.0).to(irg_s[2].dtype)


def irg_transformation_global(irg_s, irg_t, *, group, sizes):
    """irg_transformation over every rank's batch: per sample, so nothing is gathered; only
    max(d') and the mean are global."""
    d_s, d_t = _transformation_distances(irg_s[0], irg_s[1]), _transformation_distances(irg_t[0], irg_t[1])
    part = F.mse_loss(d_s / all_reduce_max(d_s, group), d_t / all_reduce_max(d_t, group),
                      reduction="sum") / sum(sizes)
    return all_reduce_sum(part, group).to(result_dtype(*irg_s[:2], *irg_t[:2]))
