"""Triton kernels of the pairwise losses (RKD, SP, PKT, CC, IRG), built on (N, N) matrices of
the student's and the teacher's rows (but IRG's transformation term: one squared distance per
sample, see its section).

Shared building blocks come first: `prepare` (centre and convert the features),
`squared_distances` (E_ab = |x_a - x_b|^2, float64), `gram` (G = X X^T, exactly symmetric)
and `gram_grad` (dL/dX = scale * (M X + r * X) from an (N, N) matrix M and an optional vector
r). Each loss then has its kernels over (N, N) tiles of the student's and the teacher's
matrices, both read by the same launch.

Numerics (the CPU path, fastkd/torch_backend/pairwise.py, follows the same rules for RKD and
IRG, and runs the reference's own operations for SP, PKT and CC; its docstring has the error
analysis). Everything here sums in float64, whatever the input dtype.
RKD's distances and angles and IRG's edges are functions of E. Formed from a Gram matrix,
E_ab = G_aa + G_bb - 2 G_ab carries an absolute error of about u |x|^2, which is all of E_ab
for a pair much closer than the rows' norms (float32 features spread over 5000 with two rows
0.3 apart gave RKD 5e9 for 0.66; centring does not help when the spread itself is large).
So RKD's E is summed over the difference vectors themselves (`squared_distances`): for
float32, bfloat16 and float16 inputs each difference is exact, E_ab has a relative error of
about D u64 whatever the gap, and equal rows give exactly 0. RKD's angle at anchor i is read
from E by polarisation, V_jk = (x_j - x_i).(x_k - x_i) = (E_ij + E_ik - E_jk) / 2, whose
error is about u64 (E_ij + E_ik + E_jk) <= 3 u64 max(n_j, n_k)^2: relative to n_j n_k, 1e-9
at a gap/spread ratio of 1e-7 (the float32 reference: 1e-7 on every angle). IRG reads E only
through E / max(E): the centred float64 Gram matrix is accurate enough there
(fastkd.common.squared_distances_from_gram) and far cheaper on wide maps. Gradients
M X + r X are formed in float64 from the centred rows, whose rounding (u64 |M| |x|) stays
below the |M| gap of a near-duplicate pair down to gaps of about 1e-8 of the spread. SP, PKT and CC read cosine
similarities, which subtract nothing, but their losses are near 0 exactly when student and
teacher agree, where float32 sums would leave errors of the size of the loss. Buffers are
(N, N) at most: the angle term of RKD reads its N^3 angles from E one anchor at a time.
"""
import torch
import triton
import triton.language as tl

from ..common import zero_row_sums

BLOCK = 32  # side of the (N, N) tiles
BLOCK_D = 32  # feature columns per step of a dot product
BLOCK_D_DIFF = 4  # feature columns per step of a (BLOCK, BLOCK, columns) difference tile
# Warps of the kernels that hold several float64 (BLOCK, BLOCK) tiles at once (both sides,
# both orientations): with four, sm_80/sm_90 spill their registers.
TILE_WARPS = 8
# Directions shorter than this (E below its square) count as zero; F.normalize's clamp.
NORM_EPS = 1e-12
_NORM_EPS_SQ = tl.constexpr(NORM_EPS * NORM_EPS)  # kernels read only constexpr globals


# --- shared building blocks ---------------------------------------------------

@triton.jit
def _row_norms_kernel(x_ptr, stride_n, stride_d, norms_ptr, N, D,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """norms[i] = ||x_i|| (N,) in norms' dtype, for a block of rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=norms_ptr.dtype.element_ty)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d,
                    mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0)
        x = x.to(norms_ptr.dtype.element_ty)
        sq += x * x
    tl.store(norms_ptr + rows, tl.sqrt(tl.sum(sq, 1)), mask=rows < N)


@triton.jit
def _prepare_kernel(x_ptr, stride_n, stride_d, norms_ptr, out_ptr, N, D,
                    CENTRE: tl.constexpr, NORMALISE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """out (N, D) contiguous, out's dtype = x, minus its column means when CENTRE, or its rows
    divided by max(norms, 1e-12) when NORMALISE."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mean = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
    if CENTRE:
        for start in range(0, N, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            ok = (rows[:, None] < N) & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d,
                        mask=ok, other=0.0)
            mean += tl.sum(x.to(out_ptr.dtype.element_ty), axis=0)
        mean = mean / N
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < N) & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d,
                    mask=ok, other=0.0)
        x = x.to(out_ptr.dtype.element_ty) - mean[None, :]
        if NORMALISE:
            # As F.normalize: the division itself, not a product with a reciprocal.
            x = x / tl.maximum(tl.load(norms_ptr + rows, mask=rows < N, other=1.0), 1e-12)[:, None]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x, mask=ok)


def prepare(x, centre, normalise=False):
    """x as a contiguous (N, D) float64 tensor, centred (column means 0) if asked. With normalise (and not centre): (x^, norms), x^ = x / max(||x||, 1e-12) row
    by row as F.normalize does, and norms (N,) the rows' norms, unclamped."""
    x = x.reshape(x.size(0), -1)
    n, d = x.shape
    out = torch.empty((n, d), dtype=torch.float64, device=x.device)
    norms = torch.empty(n if normalise else 1, dtype=out.dtype, device=x.device)
    if normalise:
        _row_norms_kernel[(triton.cdiv(n, BLOCK),)](x, x.stride(0), x.stride(1), norms, n, d,
                                                    BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    _prepare_kernel[(triton.cdiv(d, BLOCK_D),)](x, x.stride(0), x.stride(1), norms, out, n, d,
                                                CENTRE=centre, NORMALISE=normalise,
                                                BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    return (out, norms) if normalise else out


@triton.jit
def _squared_distances_kernel(x_ptr, stride_n, stride_d, e_ptr, N, D,
                              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """E_ab = sum_f (x_a[f] - x_b[f])^2 in float64 for the tile (a, b) with b <= a, stored at
    (a, b) and transposed at (b, a). Each difference is taken in float64 (exact for
    float32/bfloat16/float16 rows), so E does not cancel; (x_a - x_b)^2 = (x_b - x_a)^2 bit
    for bit, so E is exactly symmetric with an exactly zero diagonal."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if pid_b <= pid_a:
        ra = pid_a * BLOCK + tl.arange(0, BLOCK)
        rb = pid_b * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            xa = tl.load(x_ptr + ra[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d,
                         mask=(ra[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float64)
            xb = tl.load(x_ptr + rb[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d,
                         mask=(rb[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float64)
            diff = xa[:, None, :] - xb[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        tl.store(e_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], acc, mask=ok)
        tl.store(e_ptr + rb[None, :].to(tl.int64) * N + ra[:, None], acc, mask=ok)


def squared_distances(x):
    """E (N, N) float64, E_ab = |flat(x)_a - flat(x)_b|^2 from the difference vectors (see the
    module docstring); x read through its strides in any float dtype."""
    x = x.reshape(x.size(0), -1)
    n, d = x.shape
    e = torch.empty((n, n), dtype=torch.float64, device=x.device)
    nb = triton.cdiv(n, BLOCK)
    _squared_distances_kernel[(nb, nb)](x, x.stride(0), x.stride(1), e, n, d, BLOCK=BLOCK,
                                        BLOCK_D=BLOCK_D_DIFF)
    return e


@triton.jit
def _gram_kernel(x_ptr, g_ptr, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """G = X X^T for the tile (a, b) with b <= a, stored at (a, b) and transposed at (b, a)."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if pid_b <= pid_a:
        ra = pid_a * BLOCK + tl.arange(0, BLOCK)
        rb = pid_b * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=g_ptr.dtype.element_ty)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            xa = tl.load(x_ptr + ra[:, None].to(tl.int64) * D + cols[None, :],
                         mask=(ra[:, None] < N) & (cols[None, :] < D), other=0.0)
            xb = tl.load(x_ptr + rb[:, None].to(tl.int64) * D + cols[None, :],
                         mask=(rb[:, None] < N) & (cols[None, :] < D), other=0.0)
            acc = tl.dot(xa, tl.trans(xb), acc, input_precision="ieee", out_dtype=acc.dtype)
        # A diagonal tile is made exactly symmetric too: (a + b) / 2 does not depend on order.
        acc = tl.where(pid_a == pid_b, (acc + tl.trans(acc)) * 0.5, acc)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        tl.store(g_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], acc, mask=ok)
        tl.store(g_ptr + rb[None, :].to(tl.int64) * N + ra[:, None], acc, mask=ok)


def gram(x):
    """G = X X^T (N, N), exactly symmetric; x from prepare()."""
    n, d = x.shape
    g = torch.empty((n, n), dtype=x.dtype, device=x.device)
    nb = triton.cdiv(n, BLOCK)
    _gram_kernel[(nb, nb)](x, g, n, d, BLOCK=BLOCK, BLOCK_D=BLOCK_D)
    return g


@triton.jit
def _gram_grad_kernel(m_ptr, r_ptr, x_ptr, scale_ptr, out_ptr, N, D,
                      HAS_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = scale * (M X + r * X) for a (BLOCK, BLOCK_D) tile of out (r = 0 without HAS_R)."""
    # Column blocks on grid axis 0 (up to 2^31 - 1): flattened maps reach D > 2 M, past the
    # 65,535 of axis 1.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ra = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < D
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=x_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        m = tl.load(m_ptr + ra[:, None].to(tl.int64) * N + rb[None, :],
                    mask=(ra[:, None] < N) & (rb[None, :] < N), other=0.0)
        xb = tl.load(x_ptr + rb[:, None].to(tl.int64) * D + cols[None, :],
                     mask=(rb[:, None] < N) & col_ok[None, :], other=0.0)
        acc = tl.dot(m, xb, acc, input_precision="ieee", out_dtype=acc.dtype)
    ok = (ra[:, None] < N) & col_ok[None, :]
    if HAS_R:
        xa = tl.load(x_ptr + ra[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0)
        acc += tl.load(r_ptr + ra, mask=ra < N, other=0.0)[:, None] * xa
    out = acc * tl.load(scale_ptr)
    tl.store(out_ptr + ra[:, None].to(tl.int64) * D + cols[None, :],
             _cast(out, out_ptr.dtype.element_ty), mask=ok)


def gram_grad(m, r, x, scale, like):
    """dL/dX = scale * (M X + r * X) shaped and typed like `like`; x (N, D) from prepare(),
    M (N, N), r (N,) or None for 0, scale a 0-dim tensor (the upstream gradient over the
    loss's count)."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=like.dtype, device=x.device)
    _gram_grad_kernel[(triton.cdiv(d, BLOCK_D), triton.cdiv(n, BLOCK))](
        m, m if r is None else r, x, scale, out, n, d, HAS_R=r is not None, BLOCK=BLOCK,
        BLOCK_D=BLOCK_D)
    return out.reshape(like.shape)


@triton.jit
def _cast(x, ty: tl.constexpr):
    """x in ty, through float32 when ty is a 16-bit type: float64 does not convert to bfloat16
    or float16 directly everywhere (Triton's interpreter gives 0)."""
    if ty == tl.float64:
        return x.to(ty)
    return x.to(tl.float32).to(ty)


@triton.jit
def _smooth_l1(d):
    """h(d) = 0.5 d^2 if |d| < 1 else |d| - 0.5 (beta = 1)."""
    ad = tl.abs(d)
    return tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


@triton.jit
def _load_tile(ptr, ra, rb, N):
    """The (ra, rb) tile of an (N, N) matrix, 0 outside."""
    return tl.load(ptr + ra[:, None].to(tl.int64) * N + rb[None, :],
                   mask=(ra[:, None] < N) & (rb[None, :] < N), other=0.0)


@triton.jit
def _diagonal(g_ptr, rows, N):
    """G[rows, rows] of an (N, N) matrix, 0 outside."""
    return tl.load(g_ptr + rows.to(tl.int64) * (N + 1), mask=rows < N, other=0.0)


# --- RKD distance -------------------------------------------------------------

@triton.jit
def _squared_distance_tile(e_ptr, ra, rb, N):
    """pdist2 = max(E, 1e-12) off the diagonal, 0 on it and outside; also whether E >= 1e-12
    (where the clamp lets the gradient through)."""
    off = (ra[:, None] < N) & (rb[None, :] < N) & (ra[:, None] != rb[None, :])
    p = tl.load(e_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], mask=off, other=0.0)
    return tl.where(off, tl.maximum(p, 1e-12), 0.0), off & (p >= 1e-12)


@triton.jit
def _distance_tile(e_ptr, ra, rb, N):
    """d = sqrt(pdist2) (0 on the diagonal and outside) and where the clamp lets the gradient
    through, as _squared_distance_tile."""
    d2, live = _squared_distance_tile(e_ptr, ra, rb, N)
    return tl.sqrt(d2), live


@triton.jit
def _rkd_distance_sum_kernel(es_ptr, et_ptr, part_ptr, N, BLOCK: tl.constexpr):
    """part[tile] = (sum of d_s, sum of d_t) over one tile."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    d_s, _ = _distance_tile(es_ptr, ra, rb, N)
    d_t, _ = _distance_tile(et_ptr, ra, rb, N)
    tl.store(part_ptr + 2 * tile, tl.sum(tl.sum(d_s, 1), 0))
    tl.store(part_ptr + 2 * tile + 1, tl.sum(tl.sum(d_t, 1), 0))


@triton.jit
def _rkd_distance_loss_kernel(es_ptr, et_ptr, sums_ptr, part_ptr, N, BLOCK: tl.constexpr):
    """part[tile] = (sum h(d_s / m_s - d_t / m_t), sum h' d_s, sum h' d_t) over one tile;
    m = sum(d) / (N (N - 1)) from sums = (sum d_s, sum d_t)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    count = N * (N - 1.0)
    d_s, _ = _distance_tile(es_ptr, ra, rb, N)
    d_t, _ = _distance_tile(et_ptr, ra, rb, N)
    diff = d_s / (tl.load(sums_ptr) / count) - d_t / (tl.load(sums_ptr + 1) / count)
    u = tl.minimum(tl.maximum(diff, -1.0), 1.0)
    tl.store(part_ptr + 3 * tile, tl.sum(tl.sum(_smooth_l1(diff), 1), 0))
    tl.store(part_ptr + 3 * tile + 1, tl.sum(tl.sum(u * d_s, 1), 0))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(tl.sum(u * d_t, 1), 0))


@triton.jit
def _rkd_distance_grad_kernel(es_ptr, et_ptr, sums_ptr, ms_ptr, rs_ptr, mt_ptr, rt_ptr, N,
                              BLOCK: tl.constexpr):
    """M = -4 W, r = 4 rowsum(W) for a block of rows, W = N^2 dL/dp (p the squared distances).

    With a = d / m, m = sum(d) / count, u = h'(a_s - a_t):
    N^2 dL/dd_s = (u - sum(u d_s) / sum(d_s)) / m_s; the teacher's with -u. dL/dp = dL/dd / (2 d).
    """
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    count = N * (N - 1.0)
    sum_s = tl.load(sums_ptr)
    sum_t = tl.load(sums_ptr + 1)
    ud_s = tl.load(sums_ptr + 2)
    ud_t = tl.load(sums_ptr + 3)
    r_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        d_s, live_s = _distance_tile(es_ptr, ra, rb, N)
        d_t, live_t = _distance_tile(et_ptr, ra, rb, N)
        u = tl.minimum(tl.maximum(d_s / (sum_s / count) - d_t / (sum_t / count), -1.0), 1.0)
        w_s = tl.where(live_s, (u - ud_s / sum_s) / (sum_s / count) / (2 * tl.where(live_s, d_s, 1.0)), 0.0)
        w_t = tl.where(live_t, (ud_t / sum_t - u) / (sum_t / count) / (2 * tl.where(live_t, d_t, 1.0)), 0.0)
        r_s += tl.sum(w_s, 1)
        r_t += tl.sum(w_t, 1)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_s, mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_t, mask=ok)
    tl.store(rs_ptr + ra, 4 * r_s, mask=ra < N)
    tl.store(rt_ptr + ra, 4 * r_t, mask=ra < N)


def rkd_distance_forward(e_s, e_t):
    """(N^2 * loss, stats): stats = (sum d_s, sum d_t, sum h' d_s, sum h' d_t) for backward;
    e_* the squared distances."""
    n = len(e_s)
    nb = triton.cdiv(n, BLOCK)
    part = torch.empty((nb * nb, 2), dtype=e_s.dtype, device=e_s.device)
    _rkd_distance_sum_kernel[(nb, nb)](e_s, e_t, part, n, BLOCK=BLOCK)
    sums = part.sum(0)
    part = torch.empty((nb * nb, 3), dtype=e_s.dtype, device=e_s.device)
    _rkd_distance_loss_kernel[(nb, nb)](e_s, e_t, sums, part, n, BLOCK=BLOCK)
    part = part.sum(0)
    return part[0], torch.cat([sums, part[1:]])


def rkd_distance_backward(e_s, e_t, stats):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side."""
    n = len(e_s)
    m_s, m_t = torch.empty_like(e_s), torch.empty_like(e_t)
    r_s = torch.empty(n, dtype=e_s.dtype, device=e_s.device)
    r_t = torch.empty_like(r_s)
    _rkd_distance_grad_kernel[(triton.cdiv(n, BLOCK),)](e_s, e_t, stats, m_s, r_s, m_t, r_t, n,
                                                        BLOCK=BLOCK)
    return m_s, r_s, m_t, r_t


# --- RKD angle ----------------------------------------------------------------
# For anchor i: V_jk = (E_ij + E_ik - E_jk) / 2, n_j = sqrt(E_ij), A_jk = V_jk / (n_j n_k),
# loss = mean over (i, j, k) of h(A_s - A_t). A direction with E_ij < NORM_EPS^2 (j = i, an
# equal row) is zero, as F.normalize makes it: A = 0 along it. Its gradient is F.normalize's
# through the clamp, v_j / NORM_EPS: dL/dv_j = (2 / NORM_EPS) sum_k u_ijk e_k.
#
# With u = h'(A_s - A_t) (0 on j = k, where A_jj is constant; -u for the teacher),
# inv_j = 1 / n_j (0 for a zero direction) and dead_j = [zero direction], each side's
# gradient is dL/dX = 2 sum_b (S_ab)(x_a - x_b) + Z X, S = W + W^T, W = dL/dE:
#   W_ij += sum_k u_ijk inv_j inv_k - inv_j^2 sum_k u_ijk A_ijk      (per anchor: w1)
#   W_jk -= 1/2 sum_i u_ijk inv_j inv_k                              (over anchors: w2)
#   Z_jk += c sum_i u_ijk dead_j inv_k                                (over anchors: z2)
#   Z_ji -= s_ij = c dead_j sum_k u_ijk inv_k,  Z_ii += sum_j s_ij   (per anchor)
#   Z_ik -= q_ik = c inv_k sum_j u_ijk dead_j                         (per anchor, u symmetric)
# with c = 2 / NORM_EPS, applied on the host side in float64 (a Python float constant in a
# kernel is a float32, 4e-9 off here). The per-anchor terms are row sums over k that the
# forward kernel takes while the angles are at hand; the rest is one tile kernel over all
# anchors.

@triton.jit
def _directions(e_ptr, row_i, rows, N):
    """E[i, rows], inv = 1 / n (0 for a zero direction) and dead = [zero direction] (0
    outside) for anchor i; row_i = i * N in int64."""
    ok = rows < N
    e = tl.load(e_ptr + row_i + rows, mask=ok, other=0.0)
    live = e >= _NORM_EPS_SQ
    inv = tl.where(live, 1.0 / tl.sqrt(tl.where(live, e, 1.0)), 0.0)
    return e, inv, (ok & ~live).to(e.dtype)


@triton.jit
def _angle_tile(ejk, eij, eik, inv_j, inv_k, rj, rk, ok):
    """A_jk; on j = k exactly 1 for a live direction (inv_j > 0), 0 for a zero one."""
    a = 0.5 * ((eij[:, None] + eik[None, :]) - ejk) * inv_j[:, None] * inv_k[None, :]
    a = tl.where(rj[:, None] == rk[None, :], (inv_j > 0).to(a.dtype)[:, None], a)
    return tl.where(ok, a, 0.0)


@triton.jit
def _angle_u(a_s, a_t, rj, rk):
    """h'(A_s - A_t), 0 on j = k."""
    u = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
    return tl.where(rj[:, None] == rk[None, :], 0.0, u)


@triton.jit
def _store_angle_stats(out, plane, ok, u_inv, u_a, u_dead, inv, dead):
    """w1, s / c, q / c (see the section's header) for anchor i and these rows j, at
    out + k plane."""
    tl.store(out, inv * u_inv - inv * inv * u_a, mask=ok)
    tl.store(out + plane, dead * u_inv, mask=ok)
    tl.store(out + 2 * plane, inv * u_dead, mask=ok)


@triton.jit
def _rkd_angle_fwd_kernel(es_ptr, et_ptr, part_ptr, stats_ptr, N,
                          STATS: tl.constexpr, BLOCK: tl.constexpr):
    """Anchor i = program 0, rows j of one block, all k: part = sum h(A_s - A_t).

    With STATS, per side and row j the row sums sum_k u inv_k, sum_k u A and sum_k u dead_k,
    stored as w1, s, q at [stat, i, j] of stats (6, N, N): student 0-2, teacher 3-5."""
    i = tl.program_id(0)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_i = i.to(tl.int64) * N
    eij_s, invj_s, deadj_s = _directions(es_ptr, row_i, rj, N)
    eij_t, invj_t, deadj_t = _directions(et_ptr, row_i, rj, N)
    loss = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ui_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ua_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ud_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ui_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ua_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ud_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rk = start + tl.arange(0, BLOCK)
        ok = (rj[:, None] < N) & (rk[None, :] < N)
        eik_s, invk_s, deadk_s = _directions(es_ptr, row_i, rk, N)
        eik_t, invk_t, deadk_t = _directions(et_ptr, row_i, rk, N)
        a_s = _angle_tile(_load_tile(es_ptr, rj, rk, N), eij_s, eik_s, invj_s, invk_s, rj, rk, ok)
        a_t = _angle_tile(_load_tile(et_ptr, rj, rk, N), eij_t, eik_t, invj_t, invk_t, rj, rk, ok)
        loss += tl.sum(_smooth_l1(a_s - a_t), 1)
        if STATS:
            u = _angle_u(a_s, a_t, rj, rk)
            ui_s += tl.sum(u * invk_s[None, :], 1)
            ua_s += tl.sum(u * a_s, 1)
            ud_s += tl.sum(u * deadk_s[None, :], 1)
            ui_t -= tl.sum(u * invk_t[None, :], 1)
            ua_t -= tl.sum(u * a_t, 1)
            ud_t -= tl.sum(u * deadk_t[None, :], 1)
    tl.store(part_ptr + i.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(loss, 0))
    if STATS:
        plane = N.to(tl.int64) * N
        out = stats_ptr + row_i + rj
        _store_angle_stats(out, plane, rj < N, ui_s, ua_s, ud_s, invj_s, deadj_s)
        _store_angle_stats(out + 3 * plane, plane, rj < N, ui_t, ua_t, ud_t, invj_t, deadj_t)


@triton.jit
def _rkd_angle_grad_kernel(es_ptr, et_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """The (j, k) tile of w2 and z2 / c (see the section's header) on each side, summed over
    all anchors i; out (4, N, N) = (w2_s, z2_s / c, w2_t, z2_t / c)."""
    rj = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rj[:, None] < N) & (rk[None, :] < N)
    ejk_s = _load_tile(es_ptr, rj, rk, N)
    ejk_t = _load_tile(et_ptr, rj, rk, N)
    w_s = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    z_s = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    w_t = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    z_t = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    for i in range(0, N):
        row_i = tl.cast(i, tl.int64) * N
        eij_s, invj_s, deadj_s = _directions(es_ptr, row_i, rj, N)
        eik_s, invk_s, _ = _directions(es_ptr, row_i, rk, N)
        eij_t, invj_t, deadj_t = _directions(et_ptr, row_i, rj, N)
        eik_t, invk_t, _ = _directions(et_ptr, row_i, rk, N)
        a_s = _angle_tile(ejk_s, eij_s, eik_s, invj_s, invk_s, rj, rk, ok)
        a_t = _angle_tile(ejk_t, eij_t, eik_t, invj_t, invk_t, rj, rk, ok)
        u = _angle_u(a_s, a_t, rj, rk)
        w_s += u * invj_s[:, None] * invk_s[None, :]
        z_s += u * deadj_s[:, None] * invk_s[None, :]
        w_t -= u * invj_t[:, None] * invk_t[None, :]
        z_t -= u * deadj_t[:, None] * invk_t[None, :]
    plane = N.to(tl.int64) * N
    out = out_ptr + rj[:, None].to(tl.int64) * N + rk[None, :]
    tl.store(out, -0.5 * w_s, mask=ok)
    tl.store(out + plane, z_s, mask=ok)
    tl.store(out + 2 * plane, -0.5 * w_t, mask=ok)
    tl.store(out + 3 * plane, z_t, mask=ok)


def rkd_angle_forward(e_s, e_t, with_stats):
    """(N^3 * loss, stats (6, N, N) for backward, or None); e_* the squared distances."""
    n = len(e_s)
    nb = triton.cdiv(n, BLOCK)
    part = torch.empty(n * nb, dtype=e_s.dtype, device=e_s.device)
    stats = torch.empty((6, n, n) if with_stats else (1,), dtype=e_s.dtype, device=e_s.device)
    _rkd_angle_fwd_kernel[(n, nb)](e_s, e_t, part, stats, n, STATS=with_stats, BLOCK=BLOCK,
                                   num_warps=TILE_WARPS)
    return part.sum(), (stats if with_stats else None)


def rkd_angle_backward(e_s, e_t, stats):
    """(M_s, r_s, M_t, r_t) with N^3 dL/dX = M X + r * X on each side: M = Z - 2 S,
    r = 2 rowsum(S), from the forward's per-anchor stats and the tile kernel's sums."""
    n = len(e_s)
    nb = triton.cdiv(n, BLOCK)
    tiles = torch.empty((4, n, n), dtype=e_s.dtype, device=e_s.device)
    _rkd_angle_grad_kernel[(nb, nb)](e_s, e_t, tiles, n, BLOCK=BLOCK, num_warps=TILE_WARPS)
    out = []
    for (w1, s, q), (w2, z2) in ((stats[:3], tiles[:2]), (stats[3:], tiles[2:])):
        w = w1 + w2
        sym = w + w.t()
        # c scales here, in float64: a kernel's Python float constant is a float32 there.
        z = (z2 - s.t() - q) * (2.0 / NORM_EPS)
        # Z_ii = sum_j s_ij, set as minus the rest of row i (see zero_row_sums).
        out += [zero_row_sums(z) - 2 * sym, 2 * sym.sum(1)]
    return tuple(out)


# --- SP -----------------------------------------------------------------------
# G from the raw features (SP is not translation-invariant); n_i = max(||G_i||, 1e-12),
# G^ = G / n (rows), loss = mean (G^_s - G^_t)^2.

@triton.jit
def _sp_norms_kernel(gs_ptr, gt_ptr, norms_ptr, N, BLOCK: tl.constexpr):
    """norms (2, N) = the clamped row norms of G_s and G_t for a block of rows."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sq_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    sq_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        g_s = _load_tile(gs_ptr, ra, rb, N)
        g_t = _load_tile(gt_ptr, ra, rb, N)
        sq_s += tl.sum(g_s * g_s, 1)
        sq_t += tl.sum(g_t * g_t, 1)
    tl.store(norms_ptr + ra, tl.maximum(tl.sqrt(sq_s), 1e-12), mask=ra < N)
    tl.store(norms_ptr + N + ra, tl.maximum(tl.sqrt(sq_t), 1e-12), mask=ra < N)


@triton.jit
def _sp_loss_kernel(gs_ptr, gt_ptr, norms_ptr, part_ptr, dots_ptr, N, BLOCK: tl.constexpr):
    """For a block of rows: part = sum (G^_s - G^_t)^2 and dots (2, N) = sum_j (G^_s - G^_t) G^
    on each side (the norms' share of the gradient)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_s = tl.load(norms_ptr + ra, mask=ra < N, other=1.0)
    n_t = tl.load(norms_ptr + N + ra, mask=ra < N, other=1.0)
    loss = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        h_s = _load_tile(gs_ptr, ra, rb, N) / n_s[:, None]
        h_t = _load_tile(gt_ptr, ra, rb, N) / n_t[:, None]
        diff = h_s - h_t
        loss += tl.sum(diff * diff, 1)
        dot_s += tl.sum(diff * h_s, 1)
        dot_t += tl.sum(diff * h_t, 1)
    tl.store(part_ptr + tl.program_id(0), tl.sum(loss, 0))
    tl.store(dots_ptr + ra, dot_s, mask=ra < N)
    tl.store(dots_ptr + N + ra, dot_t, mask=ra < N)


@triton.jit
def _sp_w(g_s, g_t, n_s, n_t, dot_s, dot_t):
    """N^2 dL/dG on each side at one tile, from the stats of its rows (broadcast shapes):
    W = +-2 (diff - G^ dot [n not clamped]) / n, diff = G^_s - G^_t."""
    h_s = g_s / n_s
    h_t = g_t / n_t
    diff = h_s - h_t
    w_s = 2 * (diff - tl.where(n_s > 1e-12, h_s * dot_s, 0.0)) / n_s
    w_t = -2 * (diff - tl.where(n_t > 1e-12, h_t * dot_t, 0.0)) / n_t
    return w_s, w_t


@triton.jit
def _sp_grad_kernel(gs_ptr, gt_ptr, norms_ptr, dots_ptr, ms_ptr, mt_ptr, N, BLOCK: tl.constexpr):
    """M = W + W^T at the tile (a, b) on each side, so that N^2 dL/dX = M X."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    na_s = tl.load(norms_ptr + ra, mask=ra < N, other=1.0)[:, None]
    na_t = tl.load(norms_ptr + N + ra, mask=ra < N, other=1.0)[:, None]
    nb_s = tl.load(norms_ptr + rb, mask=rb < N, other=1.0)[None, :]
    nb_t = tl.load(norms_ptr + N + rb, mask=rb < N, other=1.0)[None, :]
    da_s = tl.load(dots_ptr + ra, mask=ra < N, other=0.0)[:, None]
    da_t = tl.load(dots_ptr + N + ra, mask=ra < N, other=0.0)[:, None]
    db_s = tl.load(dots_ptr + rb, mask=rb < N, other=0.0)[None, :]
    db_t = tl.load(dots_ptr + N + rb, mask=rb < N, other=0.0)[None, :]
    g_s = _load_tile(gs_ptr, ra, rb, N)
    g_t = _load_tile(gt_ptr, ra, rb, N)
    # G is exactly symmetric: W at (b, a), transposed, is _sp_w on this tile with b's stats.
    wab_s, wab_t = _sp_w(g_s, g_t, na_s, na_t, da_s, da_t)
    wba_s, wba_t = _sp_w(g_s, g_t, nb_s, nb_t, db_s, db_t)
    ok = (ra[:, None] < N) & (rb[None, :] < N)
    tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], wab_s + wba_s, mask=ok)
    tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], wab_t + wba_t, mask=ok)


def sp_forward(g_s, g_t):
    """(N^2 * loss, stats (2, 2, N): the row norms and dots) from the raw Gram matrices."""
    n = len(g_s)
    nb = triton.cdiv(n, BLOCK)
    stats = torch.empty((2, 2, n), dtype=g_s.dtype, device=g_s.device)
    _sp_norms_kernel[(nb,)](g_s, g_t, stats[0], n, BLOCK=BLOCK)
    part = torch.empty(nb, dtype=g_s.dtype, device=g_s.device)
    _sp_loss_kernel[(nb,)](g_s, g_t, stats[0], part, stats[1], n, BLOCK=BLOCK)
    return part.sum(), stats


def sp_backward(g_s, g_t, stats):
    """(M_s, M_t) with N^2 dL/dX = M X on each side."""
    n = len(g_s)
    nb = triton.cdiv(n, BLOCK)
    m_s, m_t = torch.empty_like(g_s), torch.empty_like(g_t)
    _sp_grad_kernel[(nb, nb)](g_s, g_t, stats[0], stats[1], m_s, m_t, n, BLOCK=BLOCK)
    return m_s, m_t


# --- PKT and CC: cosine similarities -----------------------------------------------------
# PKT: C = G w w^T from the raw Gram matrix, x^ = w x with w_i = 1 / (n_i + eps), n_i = sqrt(G_ii).
# With V = N^2 dL/dC: N^2 dL/dX = M X + r * X, M = (V + V^T) w w^T (G enters C directly)
# and r_a = -(w_a / n_a) sum_b (V + V^T)_ab C_ab (G_aa enters w_a; 0 where w is constant).
# CC: S = G of the rows normalised first by prepare() (x^ = x / max(n, 1e-12) as the
# reference does), and the same M and r written on X^ (see _cc_grad_kernel).

@triton.jit
def _cosine_rows(g_ptr, rows, N, eps):
    """(w, rw) for these rows: w = 1 / (n + eps), rw = -w / n (0 where n = 0)."""
    n = tl.sqrt(_diagonal(g_ptr, rows, N))
    live = n > 0
    w = 1.0 / (n + eps)
    return w, tl.where(live, -w / tl.where(live, n, 1.0), 0.0)


@triton.jit
def _pkt_probs(g, w_row, w_col, sums_row, eps):
    """C and P = ((C + 1) / 2) / rowsum at a tile, with the stats of its rows and columns."""
    c = g * w_row * w_col
    return c, (c + 1) * 0.5 / sums_row


@triton.jit
def _pkt_sums_kernel(gs_ptr, gt_ptr, params_ptr, sums_ptr, N, BLOCK: tl.constexpr):
    """sums (2, N) = the row sums of C' = (C + 1) / 2 on each side, for a block of rows."""
    eps = tl.load(params_ptr)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, _ = _cosine_rows(gs_ptr, ra, N, eps)
    wa_t, _ = _cosine_rows(gt_ptr, ra, N, eps)
    sum_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    sum_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        wb_s, _ = _cosine_rows(gs_ptr, rb, N, eps)
        wb_t, _ = _cosine_rows(gt_ptr, rb, N, eps)
        c_s = _load_tile(gs_ptr, ra, rb, N) * wa_s[:, None] * wb_s[None, :]
        c_t = _load_tile(gt_ptr, ra, rb, N) * wa_t[:, None] * wb_t[None, :]
        sum_s += tl.sum(tl.where(ok, (c_s + 1) * 0.5, 0.0), 1)
        sum_t += tl.sum(tl.where(ok, (c_t + 1) * 0.5, 0.0), 1)
    tl.store(sums_ptr + ra, sum_s, mask=ra < N)
    tl.store(sums_ptr + N + ra, sum_t, mask=ra < N)


@triton.jit
def _pkt_terms(g_s, g_t, ws_row, ws_col, wt_row, wt_col, sums_s, sums_t, eps):
    """(C_s, C_t, kl, A_s, A_t, P_s, P_t) at a tile: kl = P_t log((P_t + eps) / (P_s + eps)),
    A = N^2 dL/dP on each side, and the probabilities P."""
    c_s, p_s = _pkt_probs(g_s, ws_row, ws_col, sums_s, eps)
    c_t, p_t = _pkt_probs(g_t, wt_row, wt_col, sums_t, eps)
    log_ratio = tl.log((p_t + eps) / (p_s + eps))
    return c_s, c_t, p_t * log_ratio, -p_t / (p_s + eps), log_ratio + p_t / (p_t + eps), p_s, p_t


@triton.jit
def _pkt_loss_kernel(gs_ptr, gt_ptr, params_ptr, sums_ptr, part_ptr, dots_ptr, N,
                     BLOCK: tl.constexpr):
    """For a block of rows: part = sum kl and dots (2, N) = sum_j A P on each side."""
    eps = tl.load(params_ptr)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, _ = _cosine_rows(gs_ptr, ra, N, eps)
    wa_t, _ = _cosine_rows(gt_ptr, ra, N, eps)
    sa_s = tl.load(sums_ptr + ra, mask=ra < N, other=1.0)[:, None]
    sa_t = tl.load(sums_ptr + N + ra, mask=ra < N, other=1.0)[:, None]
    loss = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        wb_s, _ = _cosine_rows(gs_ptr, rb, N, eps)
        wb_t, _ = _cosine_rows(gt_ptr, rb, N, eps)
        # Named, not `_`: a loop-carried name must keep one type, and `_` is a (BLOCK,) vector
        # above.
        c_s, c_t, kl, a_s, a_t, p_s, p_t = _pkt_terms(
            _load_tile(gs_ptr, ra, rb, N), _load_tile(gt_ptr, ra, rb, N), wa_s[:, None],
            wb_s[None, :], wa_t[:, None], wb_t[None, :], sa_s, sa_t, eps)
        loss += tl.sum(tl.where(ok, kl, 0.0), 1)
        dot_s += tl.sum(tl.where(ok, a_s * p_s, 0.0), 1)
        dot_t += tl.sum(tl.where(ok, a_t * p_t, 0.0), 1)
    tl.store(part_ptr + tl.program_id(0), tl.sum(loss, 0))
    tl.store(dots_ptr + ra, dot_s, mask=ra < N)
    tl.store(dots_ptr + N + ra, dot_t, mask=ra < N)


@triton.jit
def _pkt_v(g_s, g_t, ws_row, ws_col, wt_row, wt_col, sums_s, sums_t, dots_s, dots_t, eps):
    """(V_s, V_t, C_s, C_t) at a tile, V = N^2 dL/dC = (A - dot) / (2 rowsum)."""
    c_s, c_t, _, a_s, a_t, _, _ = _pkt_terms(g_s, g_t, ws_row, ws_col, wt_row, wt_col,
                                             sums_s, sums_t, eps)
    return (a_s - dots_s) * 0.5 / sums_s, (a_t - dots_t) * 0.5 / sums_t, c_s, c_t


@triton.jit
def _pkt_grad_kernel(gs_ptr, gt_ptr, params_ptr, sums_ptr, dots_ptr, ms_ptr, rs_ptr, mt_ptr,
                     rt_ptr, N, BLOCK: tl.constexpr):
    """M and r (see the section's header) for a block of rows, on each side."""
    eps = tl.load(params_ptr)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, rwa_s = _cosine_rows(gs_ptr, ra, N, eps)
    wa_t, rwa_t = _cosine_rows(gt_ptr, ra, N, eps)
    sa_s = tl.load(sums_ptr + ra, mask=ra < N, other=1.0)
    sa_t = tl.load(sums_ptr + N + ra, mask=ra < N, other=1.0)
    da_s = tl.load(dots_ptr + ra, mask=ra < N, other=0.0)
    da_t = tl.load(dots_ptr + N + ra, mask=ra < N, other=0.0)
    r_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        wb_s, _ = _cosine_rows(gs_ptr, rb, N, eps)
        wb_t, _ = _cosine_rows(gt_ptr, rb, N, eps)
        sb_s = tl.load(sums_ptr + rb, mask=rb < N, other=1.0)
        sb_t = tl.load(sums_ptr + N + rb, mask=rb < N, other=1.0)
        db_s = tl.load(dots_ptr + rb, mask=rb < N, other=0.0)
        db_t = tl.load(dots_ptr + N + rb, mask=rb < N, other=0.0)
        g_s = _load_tile(gs_ptr, ra, rb, N)
        g_t = _load_tile(gt_ptr, ra, rb, N)
        vab_s, vab_t, c_s, c_t = _pkt_v(g_s, g_t, wa_s[:, None], wb_s[None, :], wa_t[:, None],
                                        wb_t[None, :], sa_s[:, None], sa_t[:, None],
                                        da_s[:, None], da_t[:, None], eps)
        # G is exactly symmetric: V at (b, a), transposed, is _pkt_v on this tile with b's
        # stats as the rows'.
        vba_s, vba_t, c_ba_s, c_ba_t = _pkt_v(g_s, g_t, wb_s[None, :], wa_s[:, None], wb_t[None, :],
                                    wa_t[:, None], sb_s[None, :], sb_t[None, :],
                                    db_s[None, :], db_t[None, :], eps)
        v_s = tl.where(ok, vab_s + vba_s, 0.0)
        v_t = tl.where(ok, vab_t + vba_t, 0.0)
        r_s += tl.sum(v_s * c_s, 1)
        r_t += tl.sum(v_t * c_t, 1)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :],
                 v_s * wa_s[:, None] * wb_s[None, :], mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :],
                 v_t * wa_t[:, None] * wb_t[None, :], mask=ok)
    tl.store(rs_ptr + ra, rwa_s * r_s, mask=ra < N)
    tl.store(rt_ptr + ra, rwa_t * r_t, mask=ra < N)


def pkt_forward(g_s, g_t, params):
    """(N^2 * loss, stats (2, 2, N): the row sums of C' and the dots); params = [eps]."""
    n = len(g_s)
    nb = triton.cdiv(n, BLOCK)
    stats = torch.empty((2, 2, n), dtype=g_s.dtype, device=g_s.device)
    _pkt_sums_kernel[(nb,)](g_s, g_t, params, stats[0], n, BLOCK=BLOCK)
    part = torch.empty(nb, dtype=g_s.dtype, device=g_s.device)
    _pkt_loss_kernel[(nb,)](g_s, g_t, params, stats[0], part, stats[1], n, BLOCK=BLOCK,
                            num_warps=TILE_WARPS)
    return part.sum(), stats


def pkt_backward(g_s, g_t, params, stats):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side."""
    n = len(g_s)
    m_s, m_t = torch.empty_like(g_s), torch.empty_like(g_t)
    r_s = torch.empty(n, dtype=g_s.dtype, device=g_s.device)
    r_t = torch.empty_like(r_s)
    _pkt_grad_kernel[(triton.cdiv(n, BLOCK),)](g_s, g_t, params, stats[0], stats[1],
                                               m_s, r_s, m_t, r_t, n, BLOCK=BLOCK,
                                               num_warps=TILE_WARPS)
    return m_s, r_s, m_t, r_t


@triton.jit
def _cc_kernel_values(s, two_gamma, P):
    """(K / e^{-2 gamma}, dK/dS / e^{-2 gamma}) with K = e^{-2 gamma} sum_{p<=P} y^p / p!,
    y = 2 gamma S, by Horner: 1 + y (1 + y/2 (... (1 + y/P))); the derivative is 2 gamma
    times the same sum to P - 1."""
    y = two_gamma * s
    k = tl.full(s.shape, 1.0, s.dtype)
    dk = tl.full(s.shape, 1.0, s.dtype)
    for q in range(0, P):
        p = (P - q).to(s.dtype)
        k = 1 + k * y / p
        dk = tl.where(q > 0, 1 + dk * y / p, dk)
    return k, tl.where(P > 0, two_gamma * dk, 0.0)


@triton.jit
def _normalised_rows(norms_ptr, rows, N):
    """(w, rw) for these rows of x^ = w x: w = 1 / max(n, 1e-12) and rw = -w where
    n >= 1e-12 (the norm's share of the gradient), else 0."""
    n = tl.load(norms_ptr + rows, mask=rows < N, other=1.0)
    w = 1.0 / tl.maximum(n, 1e-12)
    return w, tl.where(n >= 1e-12, -w, 0.0)


@triton.jit
def _cc_tile(gs_ptr, gt_ptr, ra, rb, N, two_gamma, P):
    """(K_s - K_t, K'_s, K'_t, S_s, S_t) over e^{-2 gamma}, at the tile (a, b); S = G of the
    normalised rows."""
    s_s = _load_tile(gs_ptr, ra, rb, N)
    s_t = _load_tile(gt_ptr, ra, rb, N)
    k_s, dk_s = _cc_kernel_values(s_s, two_gamma, P)
    k_t, dk_t = _cc_kernel_values(s_t, two_gamma, P)
    ok = (ra[:, None] < N) & (rb[None, :] < N)
    return tl.where(ok, k_s - k_t, 0.0), dk_s, dk_t, s_s, s_t


@triton.jit
def _cc_loss_kernel(gs_ptr, gt_ptr, params_ptr, part_ptr, N, P, BLOCK: tl.constexpr):
    """part = sum (K_s - K_t)^2 over one tile; params = [e^{-2 gamma}, 2 gamma]."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    diff, _, _, _, _ = _cc_tile(gs_ptr, gt_ptr, ra, rb, N, tl.load(params_ptr + 1), P)
    diff = diff * tl.load(params_ptr)
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(diff * diff, 1), 0))


@triton.jit
def _cc_grad_kernel(gs_ptr, gt_ptr, ns_ptr, nt_ptr, params_ptr, ms_ptr, rs_ptr, mt_ptr, rt_ptr,
                    N, P, BLOCK: tl.constexpr):
    """M and r with N^2 dL/dX = M X^ + r * X^ on each side, X^ the normalised rows, for a block
    of rows: V = 2 (K_s - K_t) K' is symmetric, so V + V^T = 2 V; M = 2 V w_a (x^ = w x) and
    r_a = rw_a sum_b 2 V_ab S_ab (the norm's share, see _normalised_rows)."""
    c0 = tl.load(params_ptr)
    two_gamma = tl.load(params_ptr + 1)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, rwa_s = _normalised_rows(ns_ptr, ra, N)
    wa_t, rwa_t = _normalised_rows(nt_ptr, ra, N)
    r_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        diff, dk_s, dk_t, s_s, s_t = _cc_tile(gs_ptr, gt_ptr, ra, rb, N, two_gamma, P)
        v_s = 4 * c0 * c0 * diff * dk_s
        v_t = -4 * c0 * c0 * diff * dk_t
        r_s += tl.sum(v_s * s_s, 1)
        r_t += tl.sum(v_t * s_t, 1)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_s * wa_s[:, None], mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_t * wa_t[:, None], mask=ok)
    tl.store(rs_ptr + ra, rwa_s * r_s, mask=ra < N)
    tl.store(rt_ptr + ra, rwa_t * r_t, mask=ra < N)


def cc_forward(g_s, g_t, params, p_order):
    """N^2 * loss from the Gram matrices of the normalised rows; params = [e^{-2 gamma}, 2 gamma]."""
    n = len(g_s)
    nb = triton.cdiv(n, BLOCK)
    part = torch.empty(nb * nb, dtype=g_s.dtype, device=g_s.device)
    _cc_loss_kernel[(nb, nb)](g_s, g_t, params, part, n, p_order, BLOCK=BLOCK)
    return part.sum()


def cc_backward(g_s, g_t, norms_s, norms_t, params, p_order):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X^ + r * X^ on each side, X^ the normalised
    rows and norms the rows' norms before."""
    n = len(g_s)
    m_s, m_t = torch.empty_like(g_s), torch.empty_like(g_t)
    r_s = torch.empty(n, dtype=g_s.dtype, device=g_s.device)
    r_t = torch.empty_like(r_s)
    _cc_grad_kernel[(triton.cdiv(n, BLOCK),)](g_s, g_t, norms_s, norms_t, params, m_s, r_s, m_t,
                                              r_t, n, p_order, BLOCK=BLOCK, num_warps=TILE_WARPS)
    return m_s, r_s, m_t, r_t


# --- IRG edge -----------------------------------------------------------------
# E' = pdist2 / max(pdist2), pdist2 = max(E, 1e-12) off the diagonal, loss = mean (E'_s -
# E'_t)^2. The max is a reduction over tiles kept on the device; its gradient is shared evenly
# among the entries equal to it, as torch's max() does (equal rows give bit-equal E).

@triton.jit
def _irg_edge_max_kernel(es_ptr, et_ptr, part_ptr, N, BLOCK: tl.constexpr):
    """part[tile] = (max pdist2_s, max pdist2_t) over one tile."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    d_s, _ = _squared_distance_tile(es_ptr, ra, rb, N)
    d_t, _ = _squared_distance_tile(et_ptr, ra, rb, N)
    tl.store(part_ptr + 2 * tile, tl.max(tl.max(d_s, 1), 0))
    tl.store(part_ptr + 2 * tile + 1, tl.max(tl.max(d_t, 1), 0))


@triton.jit
def _irg_edge_loss_kernel(es_ptr, et_ptr, max_ptr, part_ptr, N, BLOCK: tl.constexpr):
    """part[tile] = (sum diff^2, sum diff d_s, sum diff d_t, count of d_s = max_s, count of
    d_t = max_t) over one tile, diff = d_s / max_s - d_t / max_t."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    m_s = tl.load(max_ptr)
    m_t = tl.load(max_ptr + 1)
    d_s, _ = _squared_distance_tile(es_ptr, ra, rb, N)
    d_t, _ = _squared_distance_tile(et_ptr, ra, rb, N)
    diff = d_s / m_s - d_t / m_t
    out = part_ptr + 5 * tile
    tl.store(out, tl.sum(tl.sum(diff * diff, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(diff * d_s, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(diff * d_t, 1), 0))
    # Entries outside and on the diagonal are 0 < max (off-diagonal entries are >= 1e-12).
    tl.store(out + 3, tl.sum(tl.sum((d_s == m_s).to(d_s.dtype), 1), 0))
    tl.store(out + 4, tl.sum(tl.sum((d_t == m_t).to(d_t.dtype), 1), 0))


@triton.jit
def _irg_edge_grad_kernel(es_ptr, et_ptr, stats_ptr, ms_ptr, rs_ptr, mt_ptr, rt_ptr, N,
                          BLOCK: tl.constexpr):
    """M = -4 W, r = 4 rowsum(W) for a block of rows, W = N^2 dL/dp (p the squared distances):
    W_s = 2 diff / m_s + [d_s = m_s] (-2 sum(diff d_s) / m_s^2) / count_s where the clamp lets
    the gradient through; the teacher's with -diff."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_s = tl.load(stats_ptr)
    m_t = tl.load(stats_ptr + 1)
    top_s = -2 * tl.load(stats_ptr + 2) / (m_s * m_s) / tl.load(stats_ptr + 4)
    top_t = 2 * tl.load(stats_ptr + 3) / (m_t * m_t) / tl.load(stats_ptr + 5)
    r_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        d_s, live_s = _squared_distance_tile(es_ptr, ra, rb, N)
        d_t, live_t = _squared_distance_tile(et_ptr, ra, rb, N)
        diff = d_s / m_s - d_t / m_t
        w_s = tl.where(live_s, 2 * diff / m_s + tl.where(d_s == m_s, top_s, 0.0), 0.0)
        w_t = tl.where(live_t, -2 * diff / m_t + tl.where(d_t == m_t, top_t, 0.0), 0.0)
        r_s += tl.sum(w_s, 1)
        r_t += tl.sum(w_t, 1)
        ok = (ra[:, None] < N) & (rb[None, :] < N)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_s, mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_t, mask=ok)
    tl.store(rs_ptr + ra, 4 * r_s, mask=ra < N)
    tl.store(rt_ptr + ra, 4 * r_t, mask=ra < N)


def irg_edge_forward(e_s, e_t):
    """(N^2 * loss, stats): stats = (max_s, max_t, sum diff d_s, sum diff d_t, count_s, count_t);
    e_* the squared distances."""
    n = len(e_s)
    nb = triton.cdiv(n, BLOCK)
    part = torch.empty((nb * nb, 2), dtype=e_s.dtype, device=e_s.device)
    _irg_edge_max_kernel[(nb, nb)](e_s, e_t, part, n, BLOCK=BLOCK)
    maxima = part.amax(0)
    part = torch.empty((nb * nb, 5), dtype=e_s.dtype, device=e_s.device)
    _irg_edge_loss_kernel[(nb, nb)](e_s, e_t, maxima, part, n, BLOCK=BLOCK)
    part = part.sum(0)
    return part[0], torch.cat([maxima, part[1:]])


def irg_edge_backward(e_s, e_t, stats):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side."""
    n = len(e_s)
    m_s, m_t = torch.empty_like(e_s), torch.empty_like(e_t)
    r_s = torch.empty(n, dtype=e_s.dtype, device=e_s.device)
    r_t = torch.empty_like(r_s)
    _irg_edge_grad_kernel[(triton.cdiv(n, BLOCK),)](e_s, e_t, stats, m_s, r_s, m_t, r_t, n,
                                                    BLOCK=BLOCK)
    return m_s, r_s, m_t, r_t


# --- IRG transformation -------------------------------------------------------
# d_i = sum_f (a_i[f] - b'_i[f])^2 over the V values of sample i, a and b' paired by flat
# index; b' = (b[:, 0::2] + b[:, 1::2]) / 2 (HALVE) is read from b's even and odd channels
# rather than built. Maps are read through their strides, so no copy is made.

BLOCK_V = 1024  # values per step


@triton.jit
def _map_offset(f, HW, W, s_c, s_h, s_w):
    """Offset of the flat index f (int64) of a (C, H, W) map with strides (s_c, s_h, s_w)."""
    c = f // HW
    hw = f - c * HW
    h = hw // W
    return c * s_c + h * s_h + (hw - h * W) * s_w


@triton.jit
def _transformation_difference(a_ptr, a_strides, a_dims, b_ptr, b_strides, b_dims, i, f, ok,
                               HALVE: tl.constexpr, acc_type: tl.constexpr):
    """a_i[f] - b'_i[f] in acc_type (0 where not ok); strides = (n, c, h, w), dims = (H W, W)."""
    sa_n, sa_c, sa_h, sa_w = a_strides
    sb_n, sb_c, sb_h, sb_w = b_strides
    a = tl.load(a_ptr + i * sa_n + _map_offset(f, a_dims[0], a_dims[1], sa_c, sa_h, sa_w),
                mask=ok, other=0.0).to(acc_type)
    if HALVE:
        # b' channel c reads b's channels 2c and 2c + 1.
        even = b_ptr + i * sb_n + _map_offset(f, b_dims[0], b_dims[1], 2 * sb_c, sb_h, sb_w)
        b = (tl.load(even, mask=ok, other=0.0).to(acc_type)
             + tl.load(even + sb_c, mask=ok, other=0.0).to(acc_type)) / 2
    else:
        b = tl.load(b_ptr + i * sb_n + _map_offset(f, b_dims[0], b_dims[1], sb_c, sb_h, sb_w),
                    mask=ok, other=0.0).to(acc_type)
    return a - b


@triton.jit
def _transformation_distance_kernel(a_ptr, sa_n, sa_c, sa_h, sa_w, hw_a, w_a,
                                    b_ptr, sb_n, sb_c, sb_h, sb_w, hw_b, w_b, d_ptr, V,
                                    HALVE: tl.constexpr, BLOCK_V: tl.constexpr):
    """d[i] = sum_f (a_i[f] - b'_i[f])^2 for sample i = program 0, unclamped."""
    i = tl.program_id(0).to(tl.int64)
    acc_type = d_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_V], dtype=acc_type)
    for start in range(0, V, BLOCK_V):
        f = start + tl.arange(0, BLOCK_V).to(tl.int64)
        diff = _transformation_difference(a_ptr, (sa_n, sa_c, sa_h, sa_w), (hw_a, w_a),
                                          b_ptr, (sb_n, sb_c, sb_h, sb_w), (hw_b, w_b),
                                          i, f, f < V, HALVE, acc_type)
        acc += diff * diff
    tl.store(d_ptr + i, tl.sum(acc, 0))


@triton.jit
def _transformation_grad_kernel(a_ptr, sa_n, sa_c, sa_h, sa_w, hw_a, w_a,
                                b_ptr, sb_n, sb_c, sb_h, sb_w, hw_b, w_b, dd_ptr, da_ptr, db_ptr, V,
                                HALVE: tl.constexpr, A_GRAD: tl.constexpr, B_GRAD: tl.constexpr,
                                BLOCK_V: tl.constexpr):
    """da_i[f] = 2 (a_i[f] - b'_i[f]) dd_i, and db = -da through b' (halved onto both of
    b's channels with HALVE), for one block of sample i's values; da, db contiguous."""
    i = tl.program_id(1).to(tl.int64)
    f = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    ok = f < V
    acc_type = dd_ptr.dtype.element_ty
    diff = _transformation_difference(a_ptr, (sa_n, sa_c, sa_h, sa_w), (hw_a, w_a),
                                      b_ptr, (sb_n, sb_c, sb_h, sb_w), (hw_b, w_b),
                                      i, f, ok, HALVE, acc_type)
    da = 2 * diff * tl.load(dd_ptr + i)
    if A_GRAD:
        tl.store(da_ptr + i * V + f, _cast(da, da_ptr.dtype.element_ty), mask=ok)
    if B_GRAD:
        if HALVE:
            c = f // hw_b
            even = db_ptr + i * 2 * V + 2 * c * hw_b + (f - c * hw_b)
            db = _cast(-0.5 * da, db_ptr.dtype.element_ty)
            tl.store(even, db, mask=ok)
            tl.store(even + hw_b, db, mask=ok)
        else:
            tl.store(db_ptr + i * V + f, _cast(-da, db_ptr.dtype.element_ty), mask=ok)


def _map_args(x):
    """(x, its 4 strides, H W, W) for the kernels' strided reads of a (N, C, H, W) map."""
    return (x, *x.stride(), x.size(2) * x.size(3), x.size(3))


def transformation_distances(a, b, dtype):
    """d (N,) in dtype = sum of (a_i - b'_i)^2 over each sample's values, unclamped;
    a (N, C, H, W), b (N, C2, H2, W2) with b' = b's channels averaged in pairs when a has
    fewer channels, else b."""
    n, v = a.size(0), a[0].numel()
    d = torch.empty(n, dtype=dtype, device=a.device)
    _transformation_distance_kernel[(n,)](*_map_args(a), *_map_args(b), d, v,
                                          HALVE=a.size(1) < b.size(1), BLOCK_V=BLOCK_V)
    return d


def transformation_grads(a, b, dd, a_grad, b_grad):
    """(dL/da or None, dL/db or None) from dd = dL/dd (N,), shaped and typed like a and b."""
    if not (a_grad or b_grad):
        return None, None
    n, v = a.size(0), a[0].numel()
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device) if a_grad else None
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device) if b_grad else None
    # Value blocks on grid axis 0 (up to 2^31 - 1), samples on axis 1 (65,535).
    _transformation_grad_kernel[(triton.cdiv(v, BLOCK_V), n)](
        *_map_args(a), *_map_args(b), dd, dd if da is None else da, dd if db is None else db, v,
        HALVE=a.size(1) < b.size(1), A_GRAD=a_grad, B_GRAD=b_grad, BLOCK_V=BLOCK_V)
    return da, db
