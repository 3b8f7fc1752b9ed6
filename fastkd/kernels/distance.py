"""Triton kernels of the losses on squared distances: RKD's distance term and IRG's edge
term, from E (N, N) of the student's and the teacher's rows (fastkd/kernels/gram.py); IRG's
float64 E is formed in its tiles from the centred Gram matrix (_gram_distance_tile).

Both read E through the same clamped tile (pdist2 = max(E, 1e-12) off the diagonal) and turn
W = N^2 dL/dp (p the squared distances) into M = -4 W, r = 4 rowsum(W) with one gradient
loop (`_distance_grad_kernel`), each loss giving W at a tile.

Numerics: RKD's E comes from the difference vectors (gram.py): `squared_distances` for
float64 inputs, for float32, bfloat16 and float16 inputs E = hi + lo in float32 arithmetic,
the kernels in float32 (see RKD's section). IRG reads E only through E / max(E): for float64 inputs the centred float64 Gram matrix is
accurate enough there (fastkd.common.squared_distances_from_gram) and far cheaper on wide
maps; for float32, bfloat16 and float16 inputs E = hi + lo from the difference vectors in
float32 arithmetic, the kernels in float32 (see IRG's section).
"""
import torch
import triton
import triton.language as tl

from .common import NO_FMA, cdiv, dd_div, dd_sqrt, dd_sum, sqrt, two_sum
from .gram import BLOCK, _load_tile, _smooth_l1, chunk_columns, chunk_total, column_chunks, grad_buffers


# --- shared: the clamped tiles and the gradient loop ---------------------------

@triton.jit
def _clamped(p, off):
    """pdist2 = max(p, 1e-12) where off (off the diagonal, inside), 0 elsewhere; and where the
    clamp lets the gradient through (off and p >= 1e-12). A NaN p (a NaN row, or E past
    float32's range on the float32 path) stays NaN, as through the reference's clamp; the
    GPU's and the interpreter's plain maximum would read it as a clamped 1e-12."""
    return tl.where(off, tl.maximum(p, 1e-12, propagate_nan=tl.PropagateNan.ALL), 0.0), off & (p >= 1e-12)


@triton.jit
def _squared_distance_tile(e_ptr, ra, rb, lo, R, N):
    """pdist2 = max(E, 1e-12) off the diagonal, 0 on it and outside; also whether E >= 1e-12
    (where the clamp lets the gradient through). e (R, N) holds the rows lo:lo + R of E (the
    whole (N, N) E for one process: lo 0, R = N); ra are rows of e, so the diagonal is at
    b = lo + a."""
    off = (ra[:, None] < R) & (rb[None, :] < N) & (lo + ra[:, None] != rb[None, :])
    p = tl.load(e_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], mask=off, other=0.0)
    return _clamped(p, off)


@triton.jit
def _gram_distance_tile(g_ptr, sq_ptr, sq_stride, ra, rb, lo, R, N):
    """_squared_distance_tile of E = (sq_b + sq_a) - 2 G_ab formed here, bit for bit
    fastkd.common.squared_distances_from_gram_rows: G (R, N) the rows lo:lo + R of a centred
    Gram matrix, sq_i at sq_ptr + i sq_stride every row's squared norm (G's own diagonal,
    stride N + 1, for one process)."""
    off = (ra[:, None] < R) & (rb[None, :] < N) & (lo + ra[:, None] != rb[None, :])
    g = tl.load(g_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], mask=off, other=0.0)
    sq_a = tl.load(sq_ptr + (lo + ra).to(tl.int64) * sq_stride, mask=ra < R, other=0.0)
    sq_b = tl.load(sq_ptr + rb.to(tl.int64) * sq_stride, mask=rb < N, other=0.0)
    return _clamped((sq_b[None, :] + sq_a[:, None]) - 2 * g, off)


@triton.jit
def _split_squared_distance_tile(e_ptr, l_ptr, ra, rb, lo, R, N):
    """(pdist2, live, l) from E's float32 parts (gram.squared_distances_parts): pdist2 and live
    as _squared_distance_tile of the hi part at e_ptr, l the lo part at l_ptr where the clamp
    lets E through, 0 elsewhere (clamped entries are exactly 1e-12)."""
    p, live = _squared_distance_tile(e_ptr, ra, rb, lo, R, N)
    return p, live, tl.where(live, _load_tile(l_ptr, ra, rb, R, N), 0.0)


@triton.jit
def _distance_tile(e_ptr, ra, rb, lo, R, N):
    """d = sqrt(pdist2) (0 on the diagonal and outside) and where the clamp lets the gradient
    through, as _squared_distance_tile."""
    d2, live = _squared_distance_tile(e_ptr, ra, rb, lo, R, N)
    return sqrt(d2), live


@triton.jit
def _distance_grad_kernel(es_ptr, et_ptr, sqs_ptr, sqt_ptr, sq_stride, stats_ptr, ms_ptr, rs_ptr, mt_ptr,
                          rt_ptr, lo, R, N, COLS, TILE_W: tl.constexpr, BLOCK: tl.constexpr):
    """M = -4 W, r = 4 rowsum(W) (R, N) and (R,) for a block of the rows lo:lo + R and a chunk
    of the columns (r's part, a row of (chunks, R)) on each side, W = N^2 dL/dp (p the
    squared distances) from (W_s, W_t) = TILE_W(es_ptr, et_ptr,
    sqs_ptr, sqt_ptr, sq_stride, stats_ptr, ra, rb, lo, R, N) at each tile (a jit function:
    _rkd_distance_w, _irg_edge_w; the squared norms for IRG's E formed from G).
    W is symmetric, so these rows' M and r give these rows' whole gradient (RKD's distances;
    IRG's edge, whose maximum's share two ranks may round apart, adds W^T's instead:
    fastkd/autograd.py)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    r_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        w_s, w_t = TILE_W(es_ptr, et_ptr, sqs_ptr, sqt_ptr, sq_stride, stats_ptr, ra, rb, lo, R, N)
        r_s += tl.sum(w_s, 1)
        r_t += tl.sum(w_t, 1)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_s, mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], -4 * w_t, mask=ok)
    tl.store(rs_ptr + tl.program_id(1) * R + ra, 4 * r_s, mask=ra < R)
    tl.store(rt_ptr + tl.program_id(1) * R + ra, 4 * r_t, mask=ra < R)


def _distance_backward(e_s, e_t, stats, tile_w, lo, sq=None, options=None):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side (on the rows lo:lo + R
    of e_* (R, N)), W from tile_w; sq: IRG's (sq_s, sq_t) (E formed from G = e_*), or on its
    float32 path E's lo parts (e_* the hi parts); options: launch options (IRG's float32
    path: NO_FMA, its compensated arithmetic)."""
    rows, n = e_s.shape
    cols, chunks = column_chunks(rows, n)
    m_s, r_s, m_t, r_t = grad_buffers(e_s, e_t, chunks)
    sq_s, sq_t = (e_s, e_t) if sq is None else sq
    _distance_grad_kernel[(cdiv(rows, BLOCK), chunks)](e_s, e_t, sq_s, sq_t, sq_s.stride(0), stats, m_s, r_s, m_t,
                                                       r_t, lo, rows, n, cols, TILE_W=tile_w, BLOCK=BLOCK,
                                                       **(options or {}))
    return m_s, chunk_total(r_s), m_t, chunk_total(r_t)


def _tile_parts(kernel, width, e_s, e_t, *stats, lo=0, **flags):
    """part (tiles, width) in E's dtype: kernel(e_s, e_t, *stats, part, lo, R, N, **flags) over
    the tiles of e_* (R, N) (the rows lo:lo + R of E), each writing its row of part."""
    rows, n = e_s.shape
    grid = (cdiv(rows, BLOCK), cdiv(n, BLOCK))
    part = torch.empty((grid[0] * grid[1], width), dtype=e_s.dtype, device=e_s.device)
    kernel[grid](e_s, e_t, *stats, part, lo, rows, n, **flags, BLOCK=BLOCK)
    return part


def _local(x, op):
    """One process's stand-in for the all-reduce between passes: x itself."""
    return x


# --- RKD distance -------------------------------------------------------------
# d = sqrt(pdist2), m = sum(d) / (N (N - 1)) (the mean off the diagonal), loss = mean over
# the N^2 entries of h(d_s / m_s - d_t / m_t), h smooth_l1. Two forms of E, by the constexpr
# SPLIT of each kernel:
#   float64 inputs: E float64 (gram.squared_distances), the kernels in float64;
#   float32, bfloat16, float16 inputs: E = hi + lo, two float32 parts
#     (gram.squared_distances_parts; hi is E to 2^-24 relative whatever a pair's gap, and so
#     is d from it), the kernels in float32, double-float only where the loss cancels: near a
#     zero loss (teacher ~ student) d_s / m_s and d_t / m_t agree to 1e-3, and a float32
#     rounding of either mean puts the loss 31x the reference's own error off, of either
#     ratio 16x (tests/test_float32_relations.py). So the sums of d are double-float
#     (d = sqrt(hi + lo) by dd_sqrt, compensated tile sums, _dd_total_kernel over the tiles;
#     a global batch's ranks add their hi and lo parts apart) and the difference of the
#     ratios too (_rkd_distance_diff), rounded once. The rest, smooth_l1, its sums and the
#     gradient, is plain float32: each term rounded relative to its own size.


@triton.jit
def _rkd_distance_diff(p_s, l_s, p_t, l_t, sums_ptr, lo_offset, N, SPLIT: tl.constexpr):
    """diff = d_s / m_s - d_t / m_t at a tile, m = sum(d) / count from sums = (sum d_s,
    sum d_t) at sums_ptr. Without SPLIT p = d (l unread); with SPLIT p and l are the hi and
    lo parts of pdist2 = d^2, and the sums' lo parts at sums_ptr + lo_offset, + 1: diff =
    count (d_s / sum_s - d_t / sum_t), d and the difference in double-float (dd_sqrt,
    dd_div, two_sum), rounded once."""
    count = N * (N - 1.0)
    sum_s = tl.load(sums_ptr)
    sum_t = tl.load(sums_ptr + 1)
    if SPLIT:
        d_s, d_s_lo = dd_sqrt(p_s, l_s)
        d_t, d_t_lo = dd_sqrt(p_t, l_t)
        q_s, q_s_lo = dd_div(d_s, d_s_lo, sum_s, tl.load(sums_ptr + lo_offset))
        q_t, q_t_lo = dd_div(d_t, d_t_lo, sum_t, tl.load(sums_ptr + lo_offset + 1))
        q, q_err = two_sum(q_s, -q_t)
        diff = count * (q + (q_err + (q_s_lo - q_t_lo)))
    else:
        diff = p_s / (sum_s / count) - p_t / (sum_t / count)
    return diff


@triton.jit
def _rkd_distance_tiles(es_ptr, et_ptr, ls_ptr, lt_ptr, sums_ptr, lo_offset, ra, rb, lo, R, N,
                        SPLIT: tl.constexpr):
    """(d_s, live_s, d_t, live_t, diff) at the tile (a, b): d = sqrt(pdist2) and live as
    _distance_tile, diff = d_s / m_s - d_t / m_t (_rkd_distance_diff). With SPLIT, E's float32
    hi parts at es_ptr, et_ptr (d from them) and lo parts at ls_ptr, lt_ptr (diff from hi +
    lo); without, ls_ptr and lt_ptr unread."""
    if SPLIT:
        p_s, live_s, l_s = _split_squared_distance_tile(es_ptr, ls_ptr, ra, rb, lo, R, N)
        p_t, live_t, l_t = _split_squared_distance_tile(et_ptr, lt_ptr, ra, rb, lo, R, N)
        diff = _rkd_distance_diff(p_s, l_s, p_t, l_t, sums_ptr, lo_offset, N, True)
        d_s, d_t = sqrt(p_s), sqrt(p_t)
    else:
        d_s, live_s = _distance_tile(es_ptr, ra, rb, lo, R, N)
        d_t, live_t = _distance_tile(et_ptr, ra, rb, lo, R, N)
        diff = _rkd_distance_diff(d_s, d_s, d_t, d_t, sums_ptr, lo_offset, N, False)
    return d_s, live_s, d_t, live_t, diff


@triton.jit
def _split_distance_sum(e_ptr, l_ptr, ra, rb, lo, R, N):
    """The sum of d = sqrt(pdist2) over the tile (a, b) as (hi, lo), pdist2 = hi + lo from E's
    float32 parts at e_ptr, l_ptr: d and the sum in double-float (dd_sqrt, dd_sum)."""
    p, _, l = _split_squared_distance_tile(e_ptr, l_ptr, ra, rb, lo, R, N)
    d, d_lo = dd_sqrt(p, l)
    rows, rows_lo = dd_sum(d, d_lo, 1)
    return dd_sum(rows, rows_lo, 0)


@triton.jit
def _rkd_distance_sum_kernel(es_ptr, et_ptr, ls_ptr, lt_ptr, part_ptr, lo, R, N, SPLIT: tl.constexpr,
                             BLOCK: tl.constexpr):
    """part[tile] = (sum of d_s, sum of d_t) over one tile, in E's dtype; with SPLIT (E's hi
    parts at es_ptr, et_ptr, lo parts at ls_ptr, lt_ptr) d = sqrt(hi + lo) and the sums in
    double-float: (sum_s, sum_t, their lo parts)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    if SPLIT:
        sum_s, sum_s_lo = _split_distance_sum(es_ptr, ls_ptr, ra, rb, lo, R, N)
        sum_t, sum_t_lo = _split_distance_sum(et_ptr, lt_ptr, ra, rb, lo, R, N)
        tl.store(part_ptr + 4 * tile, sum_s)
        tl.store(part_ptr + 4 * tile + 1, sum_t)
        tl.store(part_ptr + 4 * tile + 2, sum_s_lo)
        tl.store(part_ptr + 4 * tile + 3, sum_t_lo)
    else:
        d_s, _ = _distance_tile(es_ptr, ra, rb, lo, R, N)
        d_t, _ = _distance_tile(et_ptr, ra, rb, lo, R, N)
        tl.store(part_ptr + 2 * tile, tl.sum(tl.sum(d_s, 1), 0))
        tl.store(part_ptr + 2 * tile + 1, tl.sum(tl.sum(d_t, 1), 0))


@triton.jit
def _dd_total_kernel(part_ptr, n_parts, out_ptr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """out (2 WIDTH,) = the column sums of part (n_parts, 2 WIDTH), double-float values whose
    hi parts are the first WIDTH columns and lo parts the rest, as (hi..., lo...): one
    program, a compensated sum (two_sum, dd_sum)."""
    col = tl.arange(0, WIDTH)
    acc = tl.zeros([BLOCK, WIDTH], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK, WIDTH], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK):
        i = start + tl.arange(0, BLOCK)
        at = part_ptr + i[:, None].to(tl.int64) * (2 * WIDTH) + col[None, :]
        ok = (i[:, None] < n_parts) & (col[None, :] < WIDTH)
        acc, err = two_sum(acc, tl.load(at, mask=ok, other=0.0))
        acc_lo += err + tl.load(at + WIDTH, mask=ok, other=0.0)
    total, total_lo = dd_sum(acc, acc_lo, 0)
    tl.store(out_ptr + col, total)
    tl.store(out_ptr + WIDTH + col, total_lo)


@triton.jit
def _rkd_distance_loss_kernel(es_ptr, et_ptr, ls_ptr, lt_ptr, sums_ptr, part_ptr, lo, R, N,
                              SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """part[tile] = (sum h(diff), sum h' d_s, sum h' d_t) over one tile, diff = d_s / m_s -
    d_t / m_t (_rkd_distance_tiles), m = sum(d) / (N (N - 1)) from sums = (sum d_s, sum d_t),
    with SPLIT their lo parts after them."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    d_s, _, d_t, _, diff = _rkd_distance_tiles(es_ptr, et_ptr, ls_ptr, lt_ptr, sums_ptr, 2, ra, rb, lo, R, N,
                                               SPLIT)
    u = tl.minimum(tl.maximum(diff, -1.0), 1.0)
    tl.store(part_ptr + 3 * tile, tl.sum(tl.sum(_smooth_l1(diff), 1), 0))
    tl.store(part_ptr + 3 * tile + 1, tl.sum(tl.sum(u * d_s, 1), 0))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(tl.sum(u * d_t, 1), 0))


@triton.jit
def _rkd_distance_w_at(d_s, live_s, d_t, live_t, diff, sums_ptr, N):
    """(W_s, W_t) at a tile of d (diff: _rkd_distance_diff), W = N^2 dL/dp (p the squared
    distances), sums_ptr = (sum d_s, sum d_t, sum u d_s, sum u d_t) (on the float32 path the
    sums' lo parts after them, read by _rkd_distance_diff alone).

    With a = d / m, m = sum(d) / count, u = h'(a_s - a_t):
    N^2 dL/dd_s = (u - sum(u d_s) / sum(d_s)) / m_s; the teacher's with -u. dL/dp = dL/dd / (2 d).
    """
    count = N * (N - 1.0)
    sum_s = tl.load(sums_ptr)
    sum_t = tl.load(sums_ptr + 1)
    ud_s = tl.load(sums_ptr + 2)
    ud_t = tl.load(sums_ptr + 3)
    u = tl.minimum(tl.maximum(diff, -1.0), 1.0)
    w_s = tl.where(live_s, (u - ud_s / sum_s) / (sum_s / count) / (2 * tl.where(live_s, d_s, 1.0)), 0.0)
    w_t = tl.where(live_t, (ud_t / sum_t - u) / (sum_t / count) / (2 * tl.where(live_t, d_t, 1.0)), 0.0)
    return w_s, w_t


@triton.jit
def _rkd_distance_w(es_ptr, et_ptr, sqs_ptr, sqt_ptr, sq_stride, sums_ptr, ra, rb, lo, R, N):
    """_rkd_distance_w_at at the tile (a, b) of E (float64); the sq arguments unused."""
    d_s, live_s, d_t, live_t, diff = _rkd_distance_tiles(es_ptr, et_ptr, sqs_ptr, sqt_ptr, sums_ptr, 4, ra, rb,
                                                         lo, R, N, False)
    return _rkd_distance_w_at(d_s, live_s, d_t, live_t, diff, sums_ptr, N)


@triton.jit
def _rkd_distance_split_w(es_ptr, et_ptr, ls_ptr, lt_ptr, sq_stride, sums_ptr, ra, rb, lo, R, N):
    """_rkd_distance_w_at at the tile (a, b), from E's float32 parts: hi at es_ptr, et_ptr and
    lo at ls_ptr, lt_ptr (sq_stride unused)."""
    d_s, live_s, d_t, live_t, diff = _rkd_distance_tiles(es_ptr, et_ptr, ls_ptr, lt_ptr, sums_ptr, 4, ra, rb,
                                                         lo, R, N, True)
    return _rkd_distance_w_at(d_s, live_s, d_t, live_t, diff, sums_ptr, N)


def rkd_distance_forward(e_s, e_t, lo=0, reduce=_local, parts_lo=None):
    """(N^2 * loss, stats): stats = (sum d_s, sum d_t, sum h' d_s, sum h' d_t) for backward;
    e_* the squared distances (N, N). A global batch's rank passes its rows lo:lo + R of E,
    (R, N), and reduce(partial, "sum"), an all-reduce over the ranks: the sums of each pass
    are then every rank's, and the loss this rank's rows' part. With parts_lo = (lo_s, lo_t),
    e_* are E's float32 hi parts (gram.squared_distances_parts) and parts_lo their lo parts:
    loss and stats float32, the sums of d double-float, their lo parts appended to stats."""
    if parts_lo is None:
        sums = reduce(_tile_parts(_rkd_distance_sum_kernel, 2, e_s, e_t, e_s, e_t, lo=lo, SPLIT=False).sum(0),
                      "sum")
        part = _tile_parts(_rkd_distance_loss_kernel, 3, e_s, e_t, e_s, e_t, sums, lo=lo, SPLIT=False).sum(0)
        return part[0], torch.cat([sums, reduce(part[1:], "sum")])
    tiles = _tile_parts(_rkd_distance_sum_kernel, 4, e_s, e_t, *parts_lo, lo=lo, SPLIT=True, **NO_FMA)
    sums = torch.empty(4, dtype=e_s.dtype, device=e_s.device)
    _dd_total_kernel[(1,)](tiles, len(tiles), sums, WIDTH=2, BLOCK=BLOCK, **NO_FMA)
    sums = reduce(sums, "sum")
    part = _tile_parts(_rkd_distance_loss_kernel, 3, e_s, e_t, *parts_lo, sums, lo=lo, SPLIT=True,
                       **NO_FMA).sum(0)
    return part[0], torch.cat([sums[:2], reduce(part[1:], "sum"), sums[2:]])


def rkd_distance_backward(e_s, e_t, stats, lo=0, parts_lo=None):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side (on the rows lo:lo + R
    for a global batch's e_* (R, N): their whole gradient); with parts_lo, from E's float32
    parts (as rkd_distance_forward), r = -rowsum(M): the gradient is gram.difference_grad's
    sum_b M_ab (x_b - x_a)."""
    if parts_lo is not None:
        return _distance_backward(e_s, e_t, stats, _rkd_distance_split_w, lo, parts_lo, NO_FMA)
    return _distance_backward(e_s, e_t, stats, _rkd_distance_w, lo)


# --- IRG edge -----------------------------------------------------------------
# E' = pdist2 / max(pdist2), pdist2 = max(E, 1e-12) off the diagonal, loss = mean (E'_s -
# E'_t)^2. The max is a reduction over tiles kept on the device; its gradient is shared evenly
# among the entries equal to it, as torch's max() does (equal rows give bit-equal E). Two
# forms of E, by the constexpr FROM_GRAM of each kernel (the tile at _irg_edge_tiles):
#   float64 inputs: E is never stored; each tile forms it from the centred float64 Gram
#     matrix G and the squared norms sq (_gram_distance_tile), the kernels in float64;
#   float32, bfloat16, float16 inputs: E itself, float32, the hi part of
#     gram.squared_distances_parts (E to 2^-24 relative whatever a pair's gap), read by
#     _squared_distance_tile, and its lo part (at the sq arguments) where it matters: the
#     kernels run in float32, with E'_s - E'_t from E = hi + lo and the maxima's hi + lo in
#     double-float (_irg_edge_diff: near a zero loss the two ratios agree to 1e-3, and each
#     one's float32 rounding is 20x the reference's own error in the loss), and the maximum
#     ordered by (hi, lo) (a near-duplicate pair's distances to a far row round to one
#     float32 value). The gradient takes the difference form sum_b M_ab (x_b - x_a)
#     (gram.difference_grad).


@triton.jit
def _irg_edge_tiles(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, ra, rb, lo, R, N, FROM_GRAM: tl.constexpr):
    """(pdist2_s, live_s, l_s, pdist2_t, live_t, l_t) at the tile (a, b): pdist2 from the Gram
    matrices with FROM_GRAM (_gram_distance_tile; l = 0), else from E's hi parts at gs_ptr,
    gt_ptr with l E's lo parts at sqs_ptr, sqt_ptr (_split_squared_distance_tile)."""
    if FROM_GRAM:
        d_s, live_s = _gram_distance_tile(gs_ptr, sqs_ptr, sq_stride, ra, rb, lo, R, N)
        d_t, live_t = _gram_distance_tile(gt_ptr, sqt_ptr, sq_stride, ra, rb, lo, R, N)
        l_s = tl.zeros_like(d_s)
        l_t = tl.zeros_like(d_t)
    else:
        d_s, live_s, l_s = _split_squared_distance_tile(gs_ptr, sqs_ptr, ra, rb, lo, R, N)
        d_t, live_t, l_t = _split_squared_distance_tile(gt_ptr, sqt_ptr, ra, rb, lo, R, N)
    return d_s, live_s, l_s, d_t, live_t, l_t


@triton.jit
def _tile_top(d, l):
    """(max d, max l where d is max) over a tile: its lexicographic maximum (hi, lo)."""
    top = tl.max(tl.max(d, 1), 0)
    return top, tl.max(tl.max(tl.where(d == top, l, -float("inf")), 1), 0)


@triton.jit
def _irg_edge_max_kernel(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, part_ptr, lo, R, N,
                         FROM_GRAM: tl.constexpr, BLOCK: tl.constexpr):
    """part[tile] = (max pdist2_s, max pdist2_t) over one tile; without FROM_GRAM the
    lexicographic maxima of (hi, lo), (max_s, its lo_s, max_t, its lo_t): float32 rounds
    E's of a near-duplicate pair to one value, whose exact order decides where the max's
    gradient goes."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    d_s, _, l_s, d_t, _, l_t = _irg_edge_tiles(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, ra, rb, lo, R, N,
                                               FROM_GRAM)
    if FROM_GRAM:
        tl.store(part_ptr + 2 * tile, tl.max(tl.max(d_s, 1), 0))
        tl.store(part_ptr + 2 * tile + 1, tl.max(tl.max(d_t, 1), 0))
    else:
        top_s, top_lo_s = _tile_top(d_s, l_s)
        top_t, top_lo_t = _tile_top(d_t, l_t)
        tl.store(part_ptr + 4 * tile, top_s)
        tl.store(part_ptr + 4 * tile + 1, top_lo_s)
        tl.store(part_ptr + 4 * tile + 2, top_t)
        tl.store(part_ptr + 4 * tile + 3, top_lo_t)


@triton.jit
def _irg_edge_is_max(d_s, l_s, d_t, l_t, max_ptr, lo_offset, FROM_GRAM: tl.constexpr):
    """Where pdist2 equals its maximum on each side (max at max_ptr, max_ptr + 1; without
    FROM_GRAM the lo parts too, the maxima's at max_ptr + lo_offset, + 1)."""
    is_s = d_s == tl.load(max_ptr)
    is_t = d_t == tl.load(max_ptr + 1)
    if not FROM_GRAM:
        is_s = is_s & (l_s == tl.load(max_ptr + lo_offset))
        is_t = is_t & (l_t == tl.load(max_ptr + lo_offset + 1))
    return is_s, is_t


@triton.jit
def _irg_edge_diff(d_s, l_s, d_t, l_t, max_ptr, lo_offset, FROM_GRAM: tl.constexpr):
    """(diff, q_s, q_t) at a tile: the ratios q = pdist2 / max and diff = q_s - q_t. Without
    FROM_GRAM from E = hi + lo and the maxima's hi + lo in double-float, diff rounded once
    (q_* the ratios' hi parts): near a zero loss (teacher ~ student) the two ratios agree to
    1e-3, and each one's float32 rounding would be 20x the reference's own error in the loss."""
    m_s = tl.load(max_ptr)
    m_t = tl.load(max_ptr + 1)
    if FROM_GRAM:
        q_s = d_s / m_s
        q_t = d_t / m_t
        diff = q_s - q_t
    else:
        q_s, q_s_lo = dd_div(d_s, l_s, m_s, tl.load(max_ptr + lo_offset))
        q_t, q_t_lo = dd_div(d_t, l_t, m_t, tl.load(max_ptr + lo_offset + 1))
        q, q_err = two_sum(q_s, -q_t)
        diff = q + (q_err + (q_s_lo - q_t_lo))
    return diff, q_s, q_t


@triton.jit
def _irg_edge_loss_kernel(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, max_ptr, part_ptr, lo, R, N,
                          FROM_GRAM: tl.constexpr, BLOCK: tl.constexpr):
    """part[tile] = (sum diff^2, sum diff q_s, sum diff q_t, count of d_s = max_s, count of
    d_t = max_t) over one tile, q = d / max (at most 1: sums of diff d would overflow float32
    from E past 1e36), diff = q_s - q_t; max = (max_s, max_t), and without FROM_GRAM their lo
    parts after them."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    d_s, _, l_s, d_t, _, l_t = _irg_edge_tiles(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, ra, rb, lo, R, N,
                                               FROM_GRAM)
    diff, q_s, q_t = _irg_edge_diff(d_s, l_s, d_t, l_t, max_ptr, 2, FROM_GRAM)
    out = part_ptr + 5 * tile
    tl.store(out, tl.sum(tl.sum(diff * diff, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(diff * q_s, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(diff * q_t, 1), 0))
    # Entries outside and on the diagonal are 0 < max (off-diagonal entries are >= 1e-12).
    is_s, is_t = _irg_edge_is_max(d_s, l_s, d_t, l_t, max_ptr, 2, FROM_GRAM)
    tl.store(out + 3, tl.sum(tl.sum(is_s.to(d_s.dtype), 1), 0))
    tl.store(out + 4, tl.sum(tl.sum(is_t.to(d_t.dtype), 1), 0))


@triton.jit
def _irg_edge_w_at(d_s, live_s, is_s, d_t, live_t, is_t, diff, stats_ptr):
    """(W_s, W_t) at a tile of pdist2 (see _irg_edge_tiles; is_*: where it is the maximum;
    diff: _irg_edge_diff), W = N^2 dL/dp (p the squared distances): W_s = 2 diff / m_s +
    [is_s] (-2 sum(diff q_s) / m_s) / count_s where the clamp lets the gradient through
    (q = d / m); the teacher's with -diff. (Not sum(diff d) / m^2: m^2 overflows float32 from
    E past 1.8e19, rows of magnitude 1e9, which took the maximum's share to 0.)"""
    m_s = tl.load(stats_ptr)
    m_t = tl.load(stats_ptr + 1)
    top_s = -2 * tl.load(stats_ptr + 2) / m_s / tl.load(stats_ptr + 4)
    top_t = 2 * tl.load(stats_ptr + 3) / m_t / tl.load(stats_ptr + 5)
    w_s = tl.where(live_s, 2 * diff / m_s + tl.where(is_s, top_s, 0.0), 0.0)
    w_t = tl.where(live_t, -2 * diff / m_t + tl.where(is_t, top_t, 0.0), 0.0)
    return w_s, w_t


@triton.jit
def _irg_edge_w(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, stats_ptr, ra, rb, lo, R, N):
    """_irg_edge_w_at at the tile (a, b), E formed from the centred Gram matrices."""
    d_s, live_s, l_s, d_t, live_t, l_t = _irg_edge_tiles(gs_ptr, gt_ptr, sqs_ptr, sqt_ptr, sq_stride, ra, rb,
                                                         lo, R, N, True)
    is_s, is_t = _irg_edge_is_max(d_s, l_s, d_t, l_t, stats_ptr, 6, True)
    diff, _, _ = _irg_edge_diff(d_s, l_s, d_t, l_t, stats_ptr, 6, True)
    return _irg_edge_w_at(d_s, live_s, is_s, d_t, live_t, is_t, diff, stats_ptr)


@triton.jit
def _irg_edge_split_w(es_ptr, et_ptr, ls_ptr, lt_ptr, sq_stride, stats_ptr, ra, rb, lo, R, N):
    """_irg_edge_w_at at the tile (a, b), from E's float32 parts: hi at es_ptr, et_ptr and lo
    at ls_ptr, lt_ptr (sq_stride unused); the maxima's lo parts at stats_ptr + 6, + 7."""
    d_s, live_s, l_s, d_t, live_t, l_t = _irg_edge_tiles(es_ptr, et_ptr, ls_ptr, lt_ptr, sq_stride, ra, rb,
                                                         lo, R, N, False)
    is_s, is_t = _irg_edge_is_max(d_s, l_s, d_t, l_t, stats_ptr, 6, False)
    diff, _, _ = _irg_edge_diff(d_s, l_s, d_t, l_t, stats_ptr, 6, False)
    return _irg_edge_w_at(d_s, live_s, is_s, d_t, live_t, is_t, diff, stats_ptr)


def _squared_norms(g, sq):
    """(sq_s, sq_t) as given, or G's diagonals (views: the kernels read them with stride N + 1);
    both with one stride."""
    sq = tuple(torch.diagonal(x) for x in g) if sq is None else sq
    if sq[0].stride(0) != sq[1].stride(0):
        raise ValueError("the squared norms of both sides need one stride")
    return sq


def irg_edge_forward(g_s, g_t, lo=0, reduce=_local, sq=None, parts_lo=None):
    """(N^2 * loss, stats): stats = (max_s, max_t, sum diff q_s, sum diff q_t, count_s, count_t),
    q = pdist2 / max;
    g_* the centred Gram matrices (N, N), whose diagonals give sq; or a global batch's rows
    lo:lo + R of them with sq = (sq_s, sq_t) (N,) every row's squared norm and reduce the
    all-reduce (as rkd_distance_forward; the maxima with "max"). With parts_lo = (lo_s, lo_t),
    g_* are E's float32 hi parts themselves (R, N) and parts_lo their lo parts
    (gram.squared_distances_parts; sq not read): loss and stats float32, the maxima
    lexicographic in (hi, lo), their lo parts appended to stats."""
    if parts_lo is None:
        sq_s, sq_t = _squared_norms((g_s, g_t), sq)
        maxima = reduce(_tile_parts(_irg_edge_max_kernel, 2, g_s, g_t, sq_s, sq_t, sq_s.stride(0), lo=lo,
                                    FROM_GRAM=True).amax(0), "max")
        part = _tile_parts(_irg_edge_loss_kernel, 5, g_s, g_t, sq_s, sq_t, sq_s.stride(0), maxima, lo=lo,
                           FROM_GRAM=True).sum(0)
        return part[0], torch.cat([maxima, reduce(part[1:], "sum")])
    tops = _tile_parts(_irg_edge_max_kernel, 4, g_s, g_t, *parts_lo, 1, lo=lo, FROM_GRAM=False, **NO_FMA)
    top = reduce(tops[:, 0::2].amax(0), "max")
    top_lo = reduce(torch.where(tops[:, 0::2] == top, tops[:, 1::2], -float("inf")).amax(0), "max")
    part = _tile_parts(_irg_edge_loss_kernel, 5, g_s, g_t, *parts_lo, 1, torch.cat([top, top_lo]), lo=lo,
                       FROM_GRAM=False, **NO_FMA).sum(0)
    return part[0], torch.cat([top, reduce(part[1:], "sum"), top_lo])


def irg_edge_backward(g_s, g_t, stats, lo=0, sq=None, parts_lo=None):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side (for a global batch's
    g_* (R, N), M and r of the rows lo:lo + R: M = -4 W, r = 4 rowsum(W) there); with
    parts_lo, from E's float32 parts (as irg_edge_forward): r = -rowsum(M), so the gradient
    is gram.difference_grad's sum_b M_ab (x_b - x_a)."""
    if parts_lo is not None:
        return _distance_backward(g_s, g_t, stats, _irg_edge_split_w, lo, parts_lo, NO_FMA)
    return _distance_backward(g_s, g_t, stats, _irg_edge_w, lo, _squared_norms((g_s, g_t), sq))
