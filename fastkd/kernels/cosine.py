"""Triton kernels of the losses on similarities of the Gram matrix: SP (G itself, row
normalised), PKT (cosine similarities read from G) and CC (G of normalised rows), from
G (N, N) of the student's and the teacher's rows (fastkd/kernels/gram.py).

Numerics: cosine similarities subtract nothing, but these losses are near 0 exactly when
student and teacher agree, where plain float32 arithmetic would leave errors of the size of
the loss. Float64 inputs: G float64 (`gram`), everything in float64. Float32, bfloat16 and
float16 inputs: each loss's *_split kernels, float32 arithmetic from G = hi + lo
(`gram_split`), double-float only in the steps where a near-zero loss cancels (each
section's header says which, and why).
"""
import math

import torch
import triton
import triton.language as tl

from .common import NO_FMA, cdiv, dd_div, dd_sqrt, dd_sum, div, sqrt, to_acc, two_prod, two_sum
from .gram import (BLOCK, TILE_WARPS, _load_tile, chunk_columns, chunk_total, column_chunks, grad_buffers,
                   store_total)


@triton.jit
def _store_part_and_dots(part_ptr, dots_ptr, ra, R, loss, dot_s, dot_t):
    """A forward kernel's results for its block of rows ra (< R) (and column chunk,
    program_id(1)): part[program] = the sum of its rows' loss terms, dots (2, R) = each side's
    per-row dots."""
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(loss, 0))
    tl.store(dots_ptr + ra, dot_s, mask=ra < R)
    tl.store(dots_ptr + R + ra, dot_t, mask=ra < R)


@triton.jit
def _dd_chunks_kernel(part_ptr, out_ptr, M, chunks, BLOCK: tl.constexpr):
    """out (2, M) = hi and lo of the double-float sums over the chunks of part (chunks, 2, M)
    (each chunk's hi, then its lo), in chunk order."""
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = m < M
    hi = tl.zeros([BLOCK], dtype=tl.float32)
    lo = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, chunks):
        chunk = part_ptr + j * 2 * M
        hi, err = two_sum(hi, tl.load(chunk + m, mask=ok, other=0.0))
        lo += err + tl.load(chunk + M + m, mask=ok, other=0.0)
    hi, lo = two_sum(hi, lo)
    tl.store(out_ptr + m, hi, mask=ok)
    tl.store(out_ptr + M + m, lo, mask=ok)


# --- SP -----------------------------------------------------------------------
# G from the raw features (SP is not translation-invariant); n_i = max(||G_i||, 1e-12),
# G^ = G / n (rows), loss = mean (G^_s - G^_t)^2.

@triton.jit
def _sp_loss_kernel(gs_ptr, gt_ptr, norms_ptr, part_ptr, dots_ptr, R, N, BLOCK: tl.constexpr):
    """For a block of rows: norms (2, R) = the clamped row norms n of G_s and G_t (R, N), then
    part = sum (G^_s - G^_t)^2 and dots (2, R) = sum_j (G^_s - G^_t) G^ on each side (the
    norms' share of the gradient)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sq_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    sq_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        g_s = _load_tile(gs_ptr, ra, rb, R, N)
        g_t = _load_tile(gt_ptr, ra, rb, R, N)
        sq_s += tl.sum(g_s * g_s, 1)
        sq_t += tl.sum(g_t * g_t, 1)
    n_s = tl.where(ra < R, tl.maximum(sqrt(sq_s), 1e-12), 1.0)
    n_t = tl.where(ra < R, tl.maximum(sqrt(sq_t), 1e-12), 1.0)
    tl.store(norms_ptr + ra, n_s, mask=ra < R)
    tl.store(norms_ptr + R + ra, n_t, mask=ra < R)
    loss = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        h_s = _load_tile(gs_ptr, ra, rb, R, N) / n_s[:, None]
        h_t = _load_tile(gt_ptr, ra, rb, R, N) / n_t[:, None]
        diff = h_s - h_t
        loss += tl.sum(diff * diff, 1)
        dot_s += tl.sum(diff * h_s, 1)
        dot_t += tl.sum(diff * h_t, 1)
    _store_part_and_dots(part_ptr, dots_ptr, ra, R, loss, dot_s, dot_t)


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
def _sp_grad_kernel(gs_ptr, gt_ptr, norms_ptr, dots_ptr, ms_ptr, mt_ptr, part_ptr, n_parts,
                    divisor: tl.float64, loss_ptr, R, N, SQUARE: tl.constexpr, LOSS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """At the tile (a, b) on each side: SQUARE (G (N, N)), M = W + W^T, so that N^2 dL/dX = M X;
    else W itself, W = N^2 dL/dG on the rows of G (R, N) (a global batch's row block, whose
    W^T X the caller adds). With LOSS, program (0, 0) also writes the loss, the sum of the
    n_parts row blocks' parts over divisor (no launch of its own)."""
    if LOSS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            store_total(part_ptr, 1, n_parts, divisor, loss_ptr, BLOCK)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    na_s = tl.load(norms_ptr + ra, mask=ra < R, other=1.0)[:, None]
    na_t = tl.load(norms_ptr + R + ra, mask=ra < R, other=1.0)[:, None]
    nb_s = tl.load(norms_ptr + rb, mask=rb < N, other=1.0)[None, :]  # b's stats: SQUARE only
    nb_t = tl.load(norms_ptr + N + rb, mask=rb < N, other=1.0)[None, :]
    da_s = tl.load(dots_ptr + ra, mask=ra < R, other=0.0)[:, None]
    da_t = tl.load(dots_ptr + R + ra, mask=ra < R, other=0.0)[:, None]
    db_s = tl.load(dots_ptr + rb, mask=rb < N, other=0.0)[None, :]
    db_t = tl.load(dots_ptr + N + rb, mask=rb < N, other=0.0)[None, :]
    g_s = _load_tile(gs_ptr, ra, rb, R, N)
    g_t = _load_tile(gt_ptr, ra, rb, R, N)
    wab_s, wab_t = _sp_w(g_s, g_t, na_s, na_t, da_s, da_t)
    if SQUARE:
        # G is exactly symmetric: W at (b, a), transposed, is _sp_w on this tile with b's stats.
        wba_s, wba_t = _sp_w(g_s, g_t, nb_s, nb_t, db_s, db_t)
        m_s = wab_s + wba_s
        m_t = wab_t + wba_t
    else:
        m_s = wab_s
        m_t = wab_t
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], m_s, mask=ok)
    tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], m_t, mask=ok)


def sp_forward(g_s, g_t):
    """(part, stats) from the raw Gram matrices (R, N): all (N, N), or a global batch's rows
    of them (each row's terms are its own); part (row blocks,) sums to N^2 * loss, stats
    (2, 2, R) holds the row norms and dots."""
    rows = len(g_s)
    nb = cdiv(rows, BLOCK)
    stats = torch.empty((2, 2, rows), dtype=g_s.dtype, device=g_s.device)
    part = torch.empty(nb, dtype=g_s.dtype, device=g_s.device)
    _sp_loss_kernel[(nb,)](g_s, g_t, stats[0], part, stats[1], rows, g_s.shape[1], BLOCK=BLOCK)
    return part, stats


def sp_backward(g_s, g_t, stats, square=True, part=None, loss_dtype=None):
    """(M_s, M_t, loss) with N^2 dL/dX = M X on each side, for G (N, N); for a global batch's
    rows G (R, N) (square False), M = W = N^2 dL/dG on those rows (N^2 dL/dX = W X on the
    rows, + W^T X_rows on every row). With part (sp_forward's), loss is sp_forward's
    part.sum() / N^2 in loss_dtype, written by the same launch; else None."""
    rows, n = g_s.shape
    m_s, m_t = torch.empty_like(g_s), torch.empty_like(g_t)
    loss = None if part is None else torch.empty((), dtype=loss_dtype, device=g_s.device)
    _sp_grad_kernel[(cdiv(rows, BLOCK), cdiv(n, BLOCK))](
        g_s, g_t, stats[0], stats[1], m_s, m_t, m_s if part is None else part, 0 if part is None else len(part),
        float(n * n), m_s if loss is None else loss, rows, n, SQUARE=square, LOSS=part is not None, BLOCK=BLOCK)
    return m_s, m_t, loss


# SP's float32 path (float32, bfloat16 and float16 inputs): G = hi + lo from gram.gram_split
# (2^-48), and the steps where a float32 rounding would be the size of the loss in
# double-float: the row norms n = sqrt(sum_j G_ij^2) and the quotients G / n, whose
# difference G^_s - G^_t is near 0 exactly when the loss is (teacher ~ student). Rounding
# either side's G^ to float32 first leaves u |G^| in a difference of 1e-3 |G^| (22x the
# reference's own error in the tests); diff is exact to float32 rounding of itself here, and
# diff^2 plain float32, each term relative to its own size. W = 2 (diff - G^ dot) / n cancels
# where one entry dominates a row (G^ near a unit vector: a small row beside a large one,
# 1e6-fold for rows of 1e-6 beside rows of 1e6, where float32 left 8% in W and 20x the
# reference's error in the gradient): the dots and W are double-float, rounded once.
# stats (4, 2, R) float32: the clamped norms' hi and lo parts, the dots' hi and lo parts.

@triton.jit
def _power_of_two_below(top):
    """2^-e (float32, exact) with top 2^-e in [1, 2) for a float32 top > 0 (its biased exponent
    e_b: 2^(127 - (e_b - 127)), clamped into float32's normal range); 1 for top = 0."""
    biased = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale = (tl.minimum(tl.maximum(254 - biased, 1), 254) << 23).to(tl.float32, bitcast=True)
    return tl.where(top > 0, scale, 1.0)


@triton.jit
def _sp_split_squares(hi_ptr, lo_ptr, ra, R, N, first, end, BLOCK: tl.constexpr):
    """(scale, sq, sq_lo): the sums of squares of G = hi + lo (R, N) over the columns
    first:end for the rows ra, double-float, each row scaled by the power of two that brings
    its largest |G| there into [1, 2) (_power_of_two_below, exact): its squares neither
    overflow float32 (|G| past 1e19, where the reference's own norm is finite) nor underflow
    (a row of entries below 1e-19, which would read as a zero row)."""
    top = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.max(tl.abs(_load_tile(hi_ptr, ra, rb, R, N)), 1))
    scale = _power_of_two_below(top)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        g = _load_tile(hi_ptr, ra, rb, R, N) * scale[:, None]
        p, p_err = two_prod(g, g)
        acc, err = two_sum(acc, p)
        acc_lo += err + (p_err + 2 * g * (_load_tile(lo_ptr, ra, rb, R, N) * scale[:, None]))
    sq, sq_lo = dd_sum(acc, acc_lo, 1)
    return scale, sq, sq_lo


@triton.jit
def _sp_split_norm(scale, sq, sq_lo, ra, R):
    """(n, n_lo): a row norm, double-float, from its scaled sum of squares (_sp_split_squares),
    clamped at 1e-12 as F.normalize does (lo 0 there); 1 outside (ra >= R)."""
    n, n_lo = dd_sqrt(sq, sq_lo)
    n = n / scale
    n_lo = n_lo / scale
    small = n < 1e-12
    return tl.where(ra < R, tl.where(small, 1e-12, n), 1.0), tl.where((ra < R) & ~small, n_lo, 0.0)


@triton.jit
def _sp_split_norms(hi_ptr, lo_ptr, ra, R, N, BLOCK: tl.constexpr):
    """(n, n_lo): the row norms of G = hi + lo (R, N) for the rows ra (_sp_split_norm)."""
    scale, sq, sq_lo = _sp_split_squares(hi_ptr, lo_ptr, ra, R, N, 0, N, BLOCK)
    return _sp_split_norm(scale, sq, sq_lo, ra, R)


@triton.jit
def _sp_split_squares_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, part_ptr, R, N, COLS, BLOCK: tl.constexpr):
    """Split rows' first pass: (scale, sq, sq_lo) of _sp_split_squares over a chunk of the
    columns at part (chunks, 2 sides, 3, R)[chunk]."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    out = part_ptr + tl.program_id(1) * 6 * R
    scale, sq, sq_lo = _sp_split_squares(gs_ptr, gs_lo_ptr, ra, R, N, first, end, BLOCK)
    tl.store(out + ra, scale, mask=ra < R)
    tl.store(out + R + ra, sq, mask=ra < R)
    tl.store(out + 2 * R + ra, sq_lo, mask=ra < R)
    scale, sq, sq_lo = _sp_split_squares(gt_ptr, gt_lo_ptr, ra, R, N, first, end, BLOCK)
    tl.store(out + 3 * R + ra, scale, mask=ra < R)
    tl.store(out + 4 * R + ra, sq, mask=ra < R)
    tl.store(out + 5 * R + ra, sq_lo, mask=ra < R)


@triton.jit
def _sp_split_chunk_norms(part_ptr, side, ra, R, chunks):
    """A side's row norms (_sp_split_norm) from its chunks' scaled sums (part as
    _sp_split_squares_kernel's), rescaled to the smallest scale of the chunks that are not all
    zeros (the row's largest |G|; 1 for a zero row) by exact powers of two (<= 1, so nothing
    overflows), in chunk order; a chunk of zeros adds nothing."""
    ok = ra < R
    scale = tl.zeros(ra.shape, dtype=tl.float32)  # 0: no chunk that is not all zeros yet
    for j in range(0, chunks):
        chunk = part_ptr + (j * 2 + side) * 3 * R
        scale_j = tl.load(chunk + ra, mask=ok, other=1.0)
        live = tl.load(chunk + R + ra, mask=ok, other=0.0) != 0.0
        scale = tl.where(live, tl.where(scale == 0.0, scale_j, tl.minimum(scale, scale_j)), scale)
    scale = tl.where(scale == 0.0, 1.0, scale)
    sq = tl.zeros(ra.shape, dtype=tl.float32)
    sq_lo = tl.zeros(ra.shape, dtype=tl.float32)
    for j in range(0, chunks):
        chunk = part_ptr + (j * 2 + side) * 3 * R
        sq_j = tl.load(chunk + R + ra, mask=ok, other=0.0)
        f = div(scale, tl.load(chunk + ra, mask=ok, other=1.0))  # exact: powers of two
        f2 = tl.where(sq_j != 0.0, f * f, 0.0)
        sq, err = two_sum(sq, sq_j * f2)
        sq_lo += err + tl.load(chunk + 2 * R + ra, mask=ok, other=0.0) * f2
    sq, sq_lo = two_sum(sq, sq_lo)
    return _sp_split_norm(scale, sq, sq_lo, ra, R)


@triton.jit
def _sp_split_norms_kernel(part_ptr, stats_ptr, R, chunks, BLOCK: tl.constexpr):
    """Split rows: stats (4, 2, R)'s norms ([0]: hi, [1]: lo) from the chunks' sums."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_s, n_s_lo = _sp_split_chunk_norms(part_ptr, 0, ra, R, chunks)
    n_t, n_t_lo = _sp_split_chunk_norms(part_ptr, 1, ra, R, chunks)
    tl.store(stats_ptr + ra, n_s, mask=ra < R)
    tl.store(stats_ptr + R + ra, n_t, mask=ra < R)
    tl.store(stats_ptr + 2 * R + ra, n_s_lo, mask=ra < R)
    tl.store(stats_ptr + 3 * R + ra, n_t_lo, mask=ra < R)


@triton.jit
def _sp_split_diff(gs, gs_lo, gt, gt_lo, n_s, n_s_lo, n_t, n_t_lo):
    """(G^_s - G^_t, G^_s, G^_t) at a tile, each as double-float (hi, lo), G^ = G / n: the
    quotients double-float, their difference summed from them (hi = its float32 rounding)."""
    h_s, h_s_lo = dd_div(gs, gs_lo, n_s, n_s_lo)
    h_t, h_t_lo = dd_div(gt, gt_lo, n_t, n_t_lo)
    d, d_err = two_sum(h_s, -h_t)
    d, d_lo = two_sum(d, d_err + (h_s_lo - h_t_lo))
    return d, d_lo, h_s, h_s_lo, h_t, h_t_lo


@triton.jit
def _dd_product(a, a_lo, b, b_lo):
    """(a + a_lo)(b + b_lo) as an unevaluated pair (p, p_lo), to about u32^2."""
    p, p_err = two_prod(a, b)
    return p, p_err + (a * b_lo + a_lo * b)


@triton.jit
def _dd_row_sum(acc, acc_lo, p, p_lo):
    """(acc, acc_lo) (rows,) plus the row sums of the tile p + p_lo, compensated."""
    s, s_lo = dd_sum(p, p_lo, 1)
    acc, err = two_sum(acc, s)
    return acc, acc_lo + (err + s_lo)


@triton.jit
def _sp_split_loss_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, stats_ptr, part_ptr, dots_ptr, R, N, COLS,
                          SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """_sp_loss_kernel on G = hi + lo in float32 arithmetic, for a block of rows and a chunk of
    the columns: stats (4, 2, R) = the norms' hi and lo parts (formed here, or SPLIT read
    from _sp_split_norms_kernel), and the dots' hi and lo parts at dots (chunks, 2, 2, R)'s
    [chunk] (one chunk: stats[2:]), part[program] = sum (G^_s - G^_t)^2."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    if SPLIT:
        n_s = tl.load(stats_ptr + ra, mask=ra < R, other=1.0)
        n_t = tl.load(stats_ptr + R + ra, mask=ra < R, other=1.0)
        n_s_lo = tl.load(stats_ptr + 2 * R + ra, mask=ra < R, other=0.0)
        n_t_lo = tl.load(stats_ptr + 3 * R + ra, mask=ra < R, other=0.0)
    else:
        n_s, n_s_lo = _sp_split_norms(gs_ptr, gs_lo_ptr, ra, R, N, BLOCK)
        n_t, n_t_lo = _sp_split_norms(gt_ptr, gt_lo_ptr, ra, R, N, BLOCK)
        tl.store(stats_ptr + ra, n_s, mask=ra < R)
        tl.store(stats_ptr + R + ra, n_t, mask=ra < R)
        tl.store(stats_ptr + 2 * R + ra, n_s_lo, mask=ra < R)
        tl.store(stats_ptr + 3 * R + ra, n_t_lo, mask=ra < R)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    dot_s = tl.zeros([BLOCK], dtype=tl.float32)
    dot_s_lo = tl.zeros([BLOCK], dtype=tl.float32)
    dot_t = tl.zeros([BLOCK], dtype=tl.float32)
    dot_t_lo = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        d, d_lo, h_s, h_s_lo, h_t, h_t_lo = _sp_split_diff(
            _load_tile(gs_ptr, ra, rb, R, N), _load_tile(gs_lo_ptr, ra, rb, R, N), _load_tile(gt_ptr, ra, rb, R, N),
            _load_tile(gt_lo_ptr, ra, rb, R, N), n_s[:, None], n_s_lo[:, None], n_t[:, None], n_t_lo[:, None])
        loss += tl.sum(d * d, 1)
        dot_s, dot_s_lo = _dd_row_sum(dot_s, dot_s_lo, *_dd_product(d, d_lo, h_s, h_s_lo))
        dot_t, dot_t_lo = _dd_row_sum(dot_t, dot_t_lo, *_dd_product(d, d_lo, h_t, h_t_lo))
    out = dots_ptr + tl.program_id(1) * 4 * R
    _store_part_and_dots(part_ptr, out, ra, R, loss, dot_s, dot_t)
    tl.store(out + 2 * R + ra, dot_s_lo, mask=ra < R)
    tl.store(out + 3 * R + ra, dot_t_lo, mask=ra < R)


@triton.jit
def _sp_split_side_w(d, d_lo, h, h_lo, n, dot, dot_lo):
    """2 (diff - G^ dot) / n for one side (G^ dot only where n > 1e-12, F.normalize's clamp),
    the difference double-float, rounded once."""
    live = n > 1e-12
    q, q_lo = _dd_product(h, h_lo, tl.where(live, dot, 0.0), tl.where(live, dot_lo, 0.0))
    r, r_err = two_sum(d, -q)
    return 2 * (r + (r_err + (d_lo - q_lo))) / n


@triton.jit
def _sp_split_w(gs, gs_lo, gt, gt_lo, stats_ptr, rows, R, n_rows):
    """_sp_w on G = hi + lo at a tile, the stats of `rows` (< n_rows; broadcast shapes) read
    from stats (4, 2, R) (see _sp_split_loss_kernel)."""
    ok = rows < n_rows
    n_s = tl.load(stats_ptr + rows, mask=ok, other=1.0)
    n_t = tl.load(stats_ptr + R + rows, mask=ok, other=1.0)
    d, d_lo, h_s, h_s_lo, h_t, h_t_lo = _sp_split_diff(
        gs, gs_lo, gt, gt_lo, n_s, tl.load(stats_ptr + 2 * R + rows, mask=ok, other=0.0),
        n_t, tl.load(stats_ptr + 3 * R + rows, mask=ok, other=0.0))
    w_s = _sp_split_side_w(d, d_lo, h_s, h_s_lo, n_s, tl.load(stats_ptr + 4 * R + rows, mask=ok, other=0.0),
                           tl.load(stats_ptr + 6 * R + rows, mask=ok, other=0.0))
    w_t = -_sp_split_side_w(d, d_lo, h_t, h_t_lo, n_t, tl.load(stats_ptr + 5 * R + rows, mask=ok, other=0.0),
                            tl.load(stats_ptr + 7 * R + rows, mask=ok, other=0.0))
    return w_s, w_t


@triton.jit
def _sp_split_grad_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, stats_ptr, ms_ptr, mt_ptr, part_ptr, n_parts,
                          divisor, loss_ptr, R, N, SQUARE: tl.constexpr, LOSS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """_sp_grad_kernel on G = hi + lo in float32 arithmetic (divisor a float32 argument)."""
    if LOSS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            store_total(part_ptr, 1, n_parts, divisor, loss_ptr, BLOCK)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g_s = _load_tile(gs_ptr, ra, rb, R, N)
    g_s_lo = _load_tile(gs_lo_ptr, ra, rb, R, N)
    g_t = _load_tile(gt_ptr, ra, rb, R, N)
    g_t_lo = _load_tile(gt_lo_ptr, ra, rb, R, N)
    m_s, m_t = _sp_split_w(g_s, g_s_lo, g_t, g_t_lo, stats_ptr, ra[:, None], R, R)
    if SQUARE:
        # G is exactly symmetric: W at (b, a), transposed, is _sp_split_w on this tile with
        # b's stats.
        wba_s, wba_t = _sp_split_w(g_s, g_s_lo, g_t, g_t_lo, stats_ptr, rb[None, :], R, N)
        m_s += wba_s
        m_t += wba_t
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], m_s, mask=ok)
    tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], m_t, mask=ok)


def sp_split_forward(g_s, g_t):
    """sp_forward on the float32 path: g_* = (hi, lo) (gram.gram_split) each (R, N); part
    (row blocks x column chunks,) float32 sums to N^2 * loss, stats (4, 2, R) float32."""
    rows, n = g_s[0].shape
    cols, chunks = column_chunks(rows, n)
    grid = (cdiv(rows, BLOCK), chunks)
    device = g_s[0].device
    stats = torch.empty((4, 2, rows), dtype=torch.float32, device=device)
    if chunks > 1:  # the norms first, from each chunk's sums of squares
        squares = torch.empty((chunks, 2, 3, rows), dtype=torch.float32, device=device)
        _sp_split_squares_kernel[grid](*g_s, *g_t, squares, rows, n, cols, BLOCK=BLOCK, **NO_FMA)
        _sp_split_norms_kernel[(cdiv(rows, 1024),)](squares, stats, rows, chunks, BLOCK=1024, **NO_FMA)
    part = torch.empty(grid[0] * chunks, dtype=torch.float32, device=device)
    dots = stats[2:] if chunks == 1 else torch.empty((chunks, 2, 2, rows), dtype=torch.float32, device=device)
    _sp_split_loss_kernel[grid](*g_s, *g_t, stats, part, dots, rows, n, cols, SPLIT=chunks > 1, BLOCK=BLOCK,
                                **NO_FMA)
    if chunks > 1:
        _dd_chunks_kernel[(cdiv(2 * rows, 1024),)](dots, stats[2:], 2 * rows, chunks, BLOCK=1024, **NO_FMA)
    return part, stats


def sp_split_backward(g_s, g_t, stats, square=True, part=None, loss_dtype=None):
    """sp_backward on the float32 path (g_*, stats as sp_split_forward): M_s, M_t float32."""
    rows, n = g_s[0].shape
    m_s, m_t = torch.empty_like(g_s[0]), torch.empty_like(g_t[0])
    loss = None if part is None else torch.empty((), dtype=loss_dtype, device=m_s.device)
    _sp_split_grad_kernel[(cdiv(rows, BLOCK), cdiv(n, BLOCK))](
        *g_s, *g_t, stats, m_s, m_t, m_s if part is None else part, 0 if part is None else len(part),
        float(n * n), m_s if loss is None else loss, rows, n, SQUARE=square, LOSS=part is not None, BLOCK=BLOCK,
        **NO_FMA)
    return m_s, m_t, loss


# --- PKT and CC: cosine similarities -----------------------------------------------------
# PKT: C = G w w^T from the raw Gram matrix, x^ = w x with w_i = 1 / (n_i + eps), n_i = sqrt(G_ii).
# With V = N^2 dL/dC: N^2 dL/dX = M X + r * X, M = (V + V^T) w w^T (G enters C directly)
# and r_a = -(w_a / n_a) sum_b (V + V^T)_ab C_ab (G_aa enters w_a; 0 where w is constant).
# CC: S = G of the rows normalised first by prepare() (x^ = x / max(n, 1e-12) as the
# reference does), and the same M and r written on X^ (see _cc_grad_kernel).

@triton.jit
def _cosine_rows(d_ptr, d_stride, rows, n_rows, eps):
    """(w, rw) for these rows (< n_rows): w = 1 / (n + eps), rw = -w / n (0 where n = 0), with
    n^2 = G_rr read at d_ptr + r d_stride (G's diagonal: G itself with stride N + 1)."""
    n = sqrt(tl.load(d_ptr + rows.to(tl.int64) * d_stride, mask=rows < n_rows, other=0.0))
    live = n > 0
    # Correctly rounded (div): each weight scales a whole row and column of C, so a GPU's
    # approximate `/` would be one error on all of them (PKT's gradient at cosines near -1:
    # 11x the reference's error, tests/gpu_division.py's model).
    w = div(1.0, n + eps)
    return w, tl.where(live, -div(w, tl.where(live, n, 1.0)), 0.0)


@triton.jit
def _pkt_rows(ds_ptr, dt_ptr, d_stride, lo, R, eps, BLOCK: tl.constexpr):
    """(ra, w_s, rw_s, w_t, rw_t): this program's block of the rows lo:lo + R (indices ra from
    0) and their _cosine_rows on each side."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, rwa_s = _cosine_rows(ds_ptr, d_stride, lo + ra, lo + R, eps)
    wa_t, rwa_t = _cosine_rows(dt_ptr, d_stride, lo + ra, lo + R, eps)
    return ra, wa_s, rwa_s, wa_t, rwa_t


@triton.jit
def _pkt_columns(ds_ptr, dt_ptr, d_stride, ra, R, start, N, eps, BLOCK: tl.constexpr):
    """(rb, ok, w_s, w_t) of the block of columns from start: the tile's mask with the rows ra
    (< R), and the columns' w on each side."""
    rb = start + tl.arange(0, BLOCK)
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    wb_s, _ = _cosine_rows(ds_ptr, d_stride, rb, N, eps)
    wb_t, _ = _cosine_rows(dt_ptr, d_stride, rb, N, eps)
    return rb, ok, wb_s, wb_t


@triton.jit
def _pkt_probs(g, w_row, w_col, sums_row, eps):
    """C and P = ((C + 1) / 2) / rowsum at a tile, with the stats of its rows and columns."""
    c = g * w_row * w_col
    return c, (c + 1) * 0.5 / sums_row


# The PKT kernels run on the rows lo:lo + R of G (R, N) (lo 0, R = N for one process), with
# G's diagonal at ds_ptr / dt_ptr (stride d_stride) for every row.

@triton.jit
def _pkt_sums_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, d_stride, eps: tl.float64, sums_ptr, lo, R, N,
                     BLOCK: tl.constexpr):
    """sums (2, R) = the row sums of C' = (C + 1) / 2 on each side, for a block of rows."""
    eps = to_acc(eps, gs_ptr.dtype.element_ty)
    ra, wa_s, _, wa_t, _ = _pkt_rows(ds_ptr, dt_ptr, d_stride, lo, R, eps, BLOCK)
    sum_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    sum_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb, ok, wb_s, wb_t = _pkt_columns(ds_ptr, dt_ptr, d_stride, ra, R, start, N, eps, BLOCK)
        c_s = _load_tile(gs_ptr, ra, rb, R, N) * wa_s[:, None] * wb_s[None, :]
        c_t = _load_tile(gt_ptr, ra, rb, R, N) * wa_t[:, None] * wb_t[None, :]
        sum_s += tl.sum(tl.where(ok, (c_s + 1) * 0.5, 0.0), 1)
        sum_t += tl.sum(tl.where(ok, (c_t + 1) * 0.5, 0.0), 1)
    tl.store(sums_ptr + ra, sum_s, mask=ra < R)
    tl.store(sums_ptr + R + ra, sum_t, mask=ra < R)


@triton.jit
def _pkt_terms(g_s, g_t, ws_row, ws_col, wt_row, wt_col, sums_s, sums_t, eps):
    """(C_s, C_t, kl, A_s, A_t, P_s, P_t) at a tile: kl = P_t log((P_t + eps) / (P_s + eps)),
    A = N^2 dL/dP on each side, and the probabilities P."""
    c_s, p_s = _pkt_probs(g_s, ws_row, ws_col, sums_s, eps)
    c_t, p_t = _pkt_probs(g_t, wt_row, wt_col, sums_t, eps)
    log_ratio = tl.log((p_t + eps) / (p_s + eps))
    return c_s, c_t, p_t * log_ratio, -p_t / (p_s + eps), log_ratio + p_t / (p_t + eps), p_s, p_t


@triton.jit
def _pkt_loss_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, d_stride, eps: tl.float64, sums_ptr, part_ptr,
                     dots_ptr, lo, R, N, BLOCK: tl.constexpr):
    """For a block of rows: part = sum kl and dots (2, R) = sum_j A P on each side."""
    eps = to_acc(eps, gs_ptr.dtype.element_ty)
    ra, wa_s, _, wa_t, _ = _pkt_rows(ds_ptr, dt_ptr, d_stride, lo, R, eps, BLOCK)
    sa_s = tl.load(sums_ptr + ra, mask=ra < R, other=1.0)[:, None]
    sa_t = tl.load(sums_ptr + R + ra, mask=ra < R, other=1.0)[:, None]
    loss = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    dot_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb, ok, wb_s, wb_t = _pkt_columns(ds_ptr, dt_ptr, d_stride, ra, R, start, N, eps, BLOCK)
        # Named, not `_`: a loop-carried name must keep one type, and `_` is a (BLOCK,) vector
        # above.
        c_s, c_t, kl, a_s, a_t, p_s, p_t = _pkt_terms(
            _load_tile(gs_ptr, ra, rb, R, N), _load_tile(gt_ptr, ra, rb, R, N), wa_s[:, None],
            wb_s[None, :], wa_t[:, None], wb_t[None, :], sa_s, sa_t, eps)
        loss += tl.sum(tl.where(ok, kl, 0.0), 1)
        dot_s += tl.sum(tl.where(ok, a_s * p_s, 0.0), 1)
        dot_t += tl.sum(tl.where(ok, a_t * p_t, 0.0), 1)
    _store_part_and_dots(part_ptr, dots_ptr, ra, R, loss, dot_s, dot_t)


@triton.jit
def _pkt_v(g_s, g_t, ws_row, ws_col, wt_row, wt_col, sums_s, sums_t, dots_s, dots_t, eps):
    """(V_s, V_t, C_s, C_t) at a tile, V = N^2 dL/dC = (A - dot) / (2 rowsum)."""
    c_s, c_t, _, a_s, a_t, _, _ = _pkt_terms(g_s, g_t, ws_row, ws_col, wt_row, wt_col,
                                             sums_s, sums_t, eps)
    return (a_s - dots_s) * 0.5 / sums_s, (a_t - dots_t) * 0.5 / sums_t, c_s, c_t


@triton.jit
def _pkt_m_tile(m_ptr, ra, rb, N, ok, v_ab, v_ba, c, w_a, w_b):
    """One side at the tile (a, b): stores M = (V + V^T) w_a w_b and returns r's part before
    rw_a, sum_b (V + V^T)_ab C_ab over these columns (V_ba: V at (b, a), transposed)."""
    v = tl.where(ok, v_ab + v_ba, 0.0)
    tl.store(m_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v * w_a[:, None] * w_b[None, :], mask=ok)
    return tl.sum(v * c, 1)


@triton.jit
def _pkt_grad_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, d_stride, eps: tl.float64, sums_ptr, dots_ptr,
                     ms_ptr, rs_ptr, mt_ptr, rt_ptr, lo, R, N, BLOCK: tl.constexpr):
    """M and r (see the section's header) for a block of rows, on each side; sums and dots
    (2, N) of every row (V_ba needs row b's). M and r on these rows give their whole
    gradient: M holds V + V^T."""
    eps = to_acc(eps, gs_ptr.dtype.element_ty)
    ra, wa_s, rwa_s, wa_t, rwa_t = _pkt_rows(ds_ptr, dt_ptr, d_stride, lo, R, eps, BLOCK)
    sa_s = tl.load(sums_ptr + lo + ra, mask=ra < R, other=1.0)
    sa_t = tl.load(sums_ptr + N + lo + ra, mask=ra < R, other=1.0)
    da_s = tl.load(dots_ptr + lo + ra, mask=ra < R, other=0.0)
    da_t = tl.load(dots_ptr + N + lo + ra, mask=ra < R, other=0.0)
    r_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb, ok, wb_s, wb_t = _pkt_columns(ds_ptr, dt_ptr, d_stride, ra, R, start, N, eps, BLOCK)
        sb_s = tl.load(sums_ptr + rb, mask=rb < N, other=1.0)
        sb_t = tl.load(sums_ptr + N + rb, mask=rb < N, other=1.0)
        db_s = tl.load(dots_ptr + rb, mask=rb < N, other=0.0)
        db_t = tl.load(dots_ptr + N + rb, mask=rb < N, other=0.0)
        g_s = _load_tile(gs_ptr, ra, rb, R, N)
        g_t = _load_tile(gt_ptr, ra, rb, R, N)
        vab_s, vab_t, c_s, c_t = _pkt_v(g_s, g_t, wa_s[:, None], wb_s[None, :], wa_t[:, None],
                                        wb_t[None, :], sa_s[:, None], sa_t[:, None],
                                        da_s[:, None], da_t[:, None], eps)
        # G is symmetric: V at (b, a), transposed, is _pkt_v on this tile with b's stats as
        # the rows'.
        vba_s, vba_t, c_ba_s, c_ba_t = _pkt_v(g_s, g_t, wb_s[None, :], wa_s[:, None], wb_t[None, :],
                                    wa_t[:, None], sb_s[None, :], sb_t[None, :],
                                    db_s[None, :], db_t[None, :], eps)
        r_s += _pkt_m_tile(ms_ptr, ra, rb, N, ok, vab_s, vba_s, c_s, wa_s, wb_s)
        r_t += _pkt_m_tile(mt_ptr, ra, rb, N, ok, vab_t, vba_t, c_t, wa_t, wb_t)
    tl.store(rs_ptr + ra, rwa_s * r_s, mask=ra < R)
    tl.store(rt_ptr + ra, rwa_t * r_t, mask=ra < R)


def _pkt_diagonals(g_s, g_t, sq):
    """(d_s, d_t, stride): G's diagonal on each side, from G (N, N) itself, or sq = (sq_s,
    sq_t) (N,) each: every row's squared norm, for a global batch's rows of G."""
    if sq is None:
        return g_s, g_t, g_s.shape[1] + 1
    return sq[0], sq[1], 1


def pkt_forward(g_s, g_t, eps, lo=0, sq=None):
    """(N^2 * loss, stats (2, 2, R): the row sums of C' and the dots) from the raw Gram
    matrices (R, N): all (N, N), or a global batch's rows lo:lo + R of them with sq the
    squared norms of every row on each side (_pkt_diagonals)."""
    rows, n = g_s.shape
    nb = cdiv(rows, BLOCK)
    diag = _pkt_diagonals(g_s, g_t, sq)
    stats = torch.empty((2, 2, rows), dtype=g_s.dtype, device=g_s.device)
    _pkt_sums_kernel[(nb,)](g_s, g_t, *diag, eps, stats[0], lo, rows, n, BLOCK=BLOCK)
    part = torch.empty(nb, dtype=g_s.dtype, device=g_s.device)
    _pkt_loss_kernel[(nb,)](g_s, g_t, *diag, eps, stats[0], part, stats[1], lo, rows, n, BLOCK=BLOCK,
                            num_warps=TILE_WARPS)
    return part.sum(), stats


def pkt_backward(g_s, g_t, eps, stats, lo=0, sq=None):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X + r * X on each side, on the rows lo:lo + R
    of G (R, N) (all N for one process: sq None); stats (2, 2, N) every row's (pkt_forward's,
    gathered from every rank for a global batch)."""
    rows, n = g_s.shape
    m_s, r_s, m_t, r_t = grad_buffers(g_s, g_t)
    _pkt_grad_kernel[(cdiv(rows, BLOCK),)](g_s, g_t, *_pkt_diagonals(g_s, g_t, sq), eps, stats[0],
                                                  stats[1], m_s, r_s, m_t, r_t, lo, rows, n, BLOCK=BLOCK,
                                                  num_warps=TILE_WARPS)
    return m_s, r_s, m_t, r_t


# PKT's float32 path (float32, bfloat16 and float16 inputs), from G = hi + lo
# (gram.gram_split) and the squared norms G_aa = hi + lo: C = G w_a w_b double-float, with
# w = 1 / (n + eps) and n = sqrt(G_aa) double-float, so that C' = (C + 1) / 2 keeps its
# digits where it is near 0 (cosines near -1: a float32 C leaves an error of u there, 22x
# the reference's own on one-dimensional rows). Each row of P sums to 1, so a row's
# first-order terms P_t log(P_t / P_s) ~ P_t - P_s cancel and the loss is of second order: a
# float32 row sum S (a common factor of the row) or a float32 P leaves errors of u per row,
# 100-1000x the reference's own. So S and P = C' / S are double-float too, delta = P_t - P_s
# is rounded once, and log((P_t + eps) / (P_s + eps)) = log1p(delta / (P_s + eps)) (_log1p:
# no rounding of the ratio near 1). The gradient's A = N^2 dL/dP is shifted by a constant per
# side (-1 for the student, +1 for the teacher; V = (A - sum_j A P) / (2 S) does not change
# as sum_j P = 1), so that A - sum_j A P subtracts no two numbers near 1. M and r take C's
# and w's hi parts: they are not differences of nearly equal numbers.
# stats (3, 2, R) float32: the row sums' hi and lo parts and the dots.

def _split_args(g_s, g_t, sq):
    """The G and squared-norm arguments of the PKT and CC float32 kernels: g_* = (hi, lo)
    (R, N); sq = ((hi, lo) of the student's, of the teacher's) every row's squared norms (N,),
    or None for G's own diagonals (one process's (N, N))."""
    if sq is None:
        sq = tuple(tuple(torch.diagonal(x) for x in g) for g in (g_s, g_t))
    return (*g_s, *g_t, *sq[0], *sq[1], sq[0][0].stride(0))


@triton.jit
def _split_norms(sq_ptr, sq_lo_ptr, sq_stride, rows, n_rows):
    """The rows' norms n = sqrt(G_rr) double-float, (n, n_lo), for these rows (< n_rows; 1
    outside), G_rr = hi + lo at sq_ptr, sq_lo_ptr + r sq_stride: PKT's and CC's float32 paths."""
    ok = rows < n_rows
    return dd_sqrt(tl.load(sq_ptr + rows.to(tl.int64) * sq_stride, mask=ok, other=1.0),
                   tl.load(sq_lo_ptr + rows.to(tl.int64) * sq_stride, mask=ok, other=0.0))


@triton.jit
def _log1p(q):
    """log(1 + q) for q > -1 to a few float32 ulps of itself, also where 1 + q rounds to
    near 1: log(v) q / (v - 1) with v = fl(1 + q) (v - 1 exact), q where v = 1."""
    v = 1.0 + q
    exact = v == 1.0
    return tl.where(exact, q, tl.log(v) * q / tl.where(exact, 1.0, v - 1.0))


@triton.jit
def _pkt_split_rows(sq_ptr, sq_lo_ptr, sq_stride, rows, n_rows, eps):
    """(w, w_lo, rw) for these rows (< n_rows): w = 1 / (n + eps) double-float, n =
    sqrt(G_rr) double-float (G_rr = hi + lo at sq_ptr, sq_lo_ptr + r sq_stride), and rw =
    -w / n float32 (0 where n = 0). dd_div corrects its quotient by an exact remainder, so a
    GPU's approximate `/` costs nothing here."""
    n, n_lo = _split_norms(sq_ptr, sq_lo_ptr, sq_stride, rows, n_rows)
    d, d_lo = two_sum(n, eps)
    w, w_lo = dd_div(1.0, 0.0, d, d_lo + n_lo)
    return w, w_lo, tl.where(n > 0, -div(w, tl.where(n > 0, n, 1.0)), 0.0)


@triton.jit
def _pkt_split_c(g, g_lo, w_row, w_row_lo, w_col, w_col_lo, ok):
    """(C'_hi, C'_lo) at a tile: C' = (C + 1) / 2 double-float with C = G w_row w_col, 0
    outside (not ok)."""
    p, p_lo = two_prod(g, w_row)
    p_lo += g_lo * w_row + g * w_row_lo
    c, c_lo = two_prod(p, w_col)
    c_lo += p_lo * w_col + p * w_col_lo
    hi, lo = two_sum(c, 1.0)
    # Renormalised: hi = fl(C + 1) also where c_lo, not c's rounding, carries the digits
    # (C near -1), since P's hi part alone enters the logarithm.
    hi, lo = two_sum(hi, lo + c_lo)
    return tl.where(ok, hi * 0.5, 0.0), tl.where(ok, lo * 0.5, 0.0)


@triton.jit
def _pkt_split_weights(sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, rows, n_rows, eps):
    """_pkt_split_rows on each side: (w_s, w_s_lo, rw_s, w_t, w_t_lo, rw_t)."""
    w_s, w_s_lo, rw_s = _pkt_split_rows(sqs_ptr, sqs_lo_ptr, sq_stride, rows, n_rows, eps)
    w_t, w_t_lo, rw_t = _pkt_split_rows(sqt_ptr, sqt_lo_ptr, sq_stride, rows, n_rows, eps)
    return w_s, w_s_lo, rw_s, w_t, w_t_lo, rw_t


@triton.jit
def _pkt_split_tile(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, ra,
                    rb, R, N, ws_a, ws_a_lo, wt_a, wt_a_lo, eps):
    """(ok, C'_s, C'_s_lo, C'_t, C'_t_lo, w_s, w_t) at the tile (ra, rb) of G (R, N) (see
    _pkt_split_c), from w of its rows a on each side; w_* (hi parts) those of its columns b."""
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    ws_b, ws_b_lo, _, wt_b, wt_b_lo, _ = _pkt_split_weights(sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, rb,
                                                            N, eps)
    cp_s, cp_s_lo = _pkt_split_c(_load_tile(gs_ptr, ra, rb, R, N), _load_tile(gs_lo_ptr, ra, rb, R, N),
                                 ws_a[:, None], ws_a_lo[:, None], ws_b[None, :], ws_b_lo[None, :], ok)
    cp_t, cp_t_lo = _pkt_split_c(_load_tile(gt_ptr, ra, rb, R, N), _load_tile(gt_lo_ptr, ra, rb, R, N),
                                 wt_a[:, None], wt_a_lo[:, None], wt_b[None, :], wt_b_lo[None, :], ok)
    return ok, cp_s, cp_s_lo, cp_t, cp_t_lo, ws_b, wt_b


@triton.jit
def _pkt_split_sums_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                           sq_stride, eps: tl.float64, sums_ptr, lo, R, N, COLS, BLOCK: tl.constexpr):
    """_pkt_sums_kernel in float32 arithmetic: the row sums S of C' double-float over a chunk
    of the columns, for a block of the rows lo:lo + R: their hi parts at sums (chunks, 2, 2,
    R)'s [chunk, 0], the lo parts at [chunk, 1] (one chunk: stats (3, 2, R)'s [0] and [1])."""
    eps = tl.cast(eps, tl.float32)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    wa_s, wa_s_lo, _, wa_t, wa_t_lo, _ = _pkt_split_weights(sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride,
                                                            lo + ra, lo + R, eps)
    acc_s = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_s_lo = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc_t_lo = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        # Named, not `_`: a loop-carried name keeps one type, and `_` is a (BLOCK,) vector here.
        ok, c_s, c_s_lo, c_t, c_t_lo, wb_s, wb_t = _pkt_split_tile(
            gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, ra,
            start + tl.arange(0, BLOCK), R, N, wa_s, wa_s_lo, wa_t, wa_t_lo, eps)
        acc_s, err_s = two_sum(acc_s, c_s)
        acc_s_lo += err_s + c_s_lo
        acc_t, err_t = two_sum(acc_t, c_t)
        acc_t_lo += err_t + c_t_lo
    sum_s, sum_s_lo = dd_sum(acc_s, acc_s_lo, 1)
    sum_t, sum_t_lo = dd_sum(acc_t, acc_t_lo, 1)
    out = sums_ptr + tl.program_id(1) * 4 * R
    tl.store(out + ra, sum_s, mask=ra < R)
    tl.store(out + R + ra, sum_t, mask=ra < R)
    tl.store(out + 2 * R + ra, sum_s_lo, mask=ra < R)
    tl.store(out + 3 * R + ra, sum_t_lo, mask=ra < R)


@triton.jit
def _pkt_split_terms(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, rows, n_rows, stride, ok, eps):
    """(kl, A_s, A_t, P_s, P_t) at a tile as _pkt_terms, on the float32 path: from C' = hi +
    lo on each side (_pkt_split_tile), the row sums of `rows` (< n_rows; broadcast shape)
    read from stats (3, 2, stride), A shifted (see the section's header); 0 outside (not
    ok)."""
    live = rows < n_rows
    p_s, p_s_lo = dd_div(cp_s, cp_s_lo, tl.load(stats_ptr + rows, mask=live, other=1.0),
                         tl.load(stats_ptr + 2 * stride + rows, mask=live, other=0.0))
    p_t, p_t_lo = dd_div(cp_t, cp_t_lo, tl.load(stats_ptr + stride + rows, mask=live, other=1.0),
                         tl.load(stats_ptr + 3 * stride + rows, mask=live, other=0.0))
    d, d_err = two_sum(p_t, -p_s)
    delta = d + (d_err + (p_t_lo - p_s_lo))
    log_ratio = _log1p(delta / (p_s + eps))
    a_s = tl.where(ok, (eps - delta) / (p_s + eps), 0.0)
    a_t = tl.where(ok, log_ratio - eps / (p_t + eps), 0.0)
    return tl.where(ok, p_t * log_ratio, 0.0), a_s, a_t, p_s, p_t


@triton.jit
def _pkt_split_loss_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                           sq_stride, eps: tl.float64, stats_ptr, part_ptr, dots_ptr, lo, R, N, COLS,
                           BLOCK: tl.constexpr):
    """_pkt_loss_kernel in float32 arithmetic, for a block of the rows lo:lo + R and a chunk
    of the columns: part[program] = sum kl, and the dots sum_j A P (shifted A) at dots
    (chunks, 2, R)'s [chunk] (one chunk: stats (3, 2, R)'s [2])."""
    eps = tl.cast(eps, tl.float32)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    wa_s, wa_s_lo, _, wa_t, wa_t_lo, _ = _pkt_split_weights(sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride,
                                                            lo + ra, lo + R, eps)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    dot_s = tl.zeros([BLOCK], dtype=tl.float32)
    dot_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        ok, cp_s, cp_s_lo, cp_t, cp_t_lo, wb_s, wb_t = _pkt_split_tile(
            gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, ra,
            start + tl.arange(0, BLOCK), R, N, wa_s, wa_s_lo, wa_t, wa_t_lo, eps)
        kl, a_s, a_t, p_s, p_t = _pkt_split_terms(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, ra[:, None], R, R, ok,
                                                  eps)
        loss += tl.sum(kl, 1)
        dot_s += tl.sum(a_s * p_s, 1)
        dot_t += tl.sum(a_t * p_t, 1)
    _store_part_and_dots(part_ptr, dots_ptr + tl.program_id(1) * 2 * R, ra, R, loss, dot_s, dot_t)


@triton.jit
def _pkt_split_v(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, rows, n_rows, stride, ok, eps):
    """(V_s, V_t) at a tile as _pkt_v, on the float32 path (arguments as _pkt_split_terms')."""
    _, a_s, a_t, _, _ = _pkt_split_terms(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, rows, n_rows, stride, ok, eps)
    live = rows < n_rows
    v_s = (a_s - tl.load(stats_ptr + 4 * stride + rows, mask=live, other=0.0)) * 0.5 \
        / tl.load(stats_ptr + rows, mask=live, other=1.0)
    v_t = (a_t - tl.load(stats_ptr + 5 * stride + rows, mask=live, other=0.0)) * 0.5 \
        / tl.load(stats_ptr + stride + rows, mask=live, other=1.0)
    return v_s, v_t


@triton.jit
def _pkt_split_grad_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                           sq_stride, eps: tl.float64, stats_ptr, ms_ptr, rs_ptr, mt_ptr, rt_ptr, lo, R, N, COLS,
                           BLOCK: tl.constexpr):
    """_pkt_grad_kernel in float32 arithmetic, stats (3, 2, N) of every row, for a block of
    the rows and a chunk of the columns (r's part: a row of (chunks, R))."""
    eps = tl.cast(eps, tl.float32)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    wa_s, wa_s_lo, rwa_s, wa_t, wa_t_lo, rwa_t = _pkt_split_weights(sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                                                                    sq_stride, lo + ra, lo + R, eps)
    r_s = tl.zeros([BLOCK], dtype=tl.float32)
    r_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok, cp_s, cp_s_lo, cp_t, cp_t_lo, wb_s, wb_t = _pkt_split_tile(
            gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, ra, rb, R, N,
            wa_s, wa_s_lo, wa_t, wa_t_lo, eps)
        vab_s, vab_t = _pkt_split_v(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, lo + ra[:, None], lo + R, N, ok, eps)
        # C is symmetric: V at (b, a), transposed, is _pkt_split_v on this tile's C' with the
        # stats of the rows b.
        vba_s, vba_t = _pkt_split_v(cp_s, cp_s_lo, cp_t, cp_t_lo, stats_ptr, rb[None, :], N, N, ok, eps)
        # C = 2 C' - 1 (its float32 part): r is no difference of nearly equal numbers.
        r_s += _pkt_m_tile(ms_ptr, ra, rb, N, ok, vab_s, vba_s, 2 * cp_s - 1, wa_s, wb_s)
        r_t += _pkt_m_tile(mt_ptr, ra, rb, N, ok, vab_t, vba_t, 2 * cp_t - 1, wa_t, wb_t)
    tl.store(rs_ptr + tl.program_id(1) * R + ra, rwa_s * r_s, mask=ra < R)
    tl.store(rt_ptr + tl.program_id(1) * R + ra, rwa_t * r_t, mask=ra < R)


def pkt_split_forward(g_s, g_t, eps, lo=0, sq=None):
    """pkt_forward on the float32 path: g_* = (hi, lo) (gram.gram_split) each (R, N) float32,
    sq as _split_args; (N^2 * loss, stats (3, 2, R)) float32."""
    rows, n = g_s[0].shape
    cols, chunks = column_chunks(rows, n)
    grid = (cdiv(rows, BLOCK), chunks)
    args = _split_args(g_s, g_t, sq)
    device = g_s[0].device
    stats = torch.empty((3, 2, rows), dtype=torch.float32, device=device)
    # Each column chunk's row sums (and dots), added after (in chunk order); one chunk writes stats.
    sums = stats if chunks == 1 else torch.empty((chunks, 2, 2, rows), dtype=torch.float32, device=device)
    _pkt_split_sums_kernel[grid](*args, eps, sums, lo, rows, n, cols, BLOCK=BLOCK, **NO_FMA)
    if chunks > 1:
        _dd_chunks_kernel[(cdiv(2 * rows, 1024),)](sums, stats, 2 * rows, chunks, BLOCK=1024, **NO_FMA)
    part = torch.empty(grid[0] * chunks, dtype=torch.float32, device=device)
    dots = stats[2] if chunks == 1 else torch.empty((chunks, 2, rows), dtype=torch.float32, device=device)
    _pkt_split_loss_kernel[grid](*args, eps, stats, part, dots, lo, rows, n, cols, BLOCK=BLOCK,
                                 num_warps=TILE_WARPS, **NO_FMA)
    if chunks > 1:
        torch.sum(dots, 0, out=stats[2])
    return part.sum(), stats


def pkt_split_backward(g_s, g_t, eps, stats, lo=0, sq=None):
    """pkt_backward on the float32 path (g_*, sq as pkt_split_forward's; stats (3, 2, N) of
    every row): M, r float32."""
    rows, n = g_s[0].shape
    cols, chunks = column_chunks(rows, n)
    m_s, r_s, m_t, r_t = grad_buffers(g_s[0], g_t[0], chunks)
    _pkt_split_grad_kernel[(cdiv(rows, BLOCK), chunks)](*_split_args(g_s, g_t, sq), eps, stats, m_s, r_s, m_t, r_t,
                                                        lo, rows, n, cols, BLOCK=BLOCK, num_warps=TILE_WARPS,
                                                        **NO_FMA)
    return m_s, chunk_total(r_s), m_t, chunk_total(r_t)


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
def _cc_tile(gs_ptr, gt_ptr, ra, rb, R, N, two_gamma, P):
    """(K_s - K_t, K'_s, K'_t, S_s, S_t) over e^{-2 gamma}, at the tile (a, b) of S (R, N), the
    G of the normalised rows (all N, or a global batch's rows of it)."""
    s_s = _load_tile(gs_ptr, ra, rb, R, N)
    s_t = _load_tile(gt_ptr, ra, rb, R, N)
    k_s, dk_s = _cc_kernel_values(s_s, two_gamma, P)
    k_t, dk_t = _cc_kernel_values(s_t, two_gamma, P)
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    return tl.where(ok, k_s - k_t, 0.0), dk_s, dk_t, s_s, s_t


@triton.jit
def _cc_loss_kernel(gs_ptr, gt_ptr, c0: tl.float64, two_gamma: tl.float64, part_ptr, R, N, P,
                    BLOCK: tl.constexpr):
    """part = sum (K_s - K_t)^2 over one tile of S (R, N); c0 = e^{-2 gamma}."""
    c0 = to_acc(c0, gs_ptr.dtype.element_ty)
    two_gamma = to_acc(two_gamma, gs_ptr.dtype.element_ty)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    diff, _, _, _, _ = _cc_tile(gs_ptr, gt_ptr, ra, rb, R, N, two_gamma, P)
    diff = diff * c0
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(diff * diff, 1), 0))


@triton.jit
def _cc_grad_kernel(gs_ptr, gt_ptr, ns_ptr, nt_ptr, c0: tl.float64, two_gamma: tl.float64, ms_ptr, rs_ptr,
                    mt_ptr, rt_ptr, lo, R, N, P, BLOCK: tl.constexpr):
    """M and r with N^2 dL/dX = M X^ + r * X^ on each side, X^ the normalised rows, for a block
    of the rows lo:lo + R of S (R, N) (lo 0, R = N for one process): V = 2 (K_s - K_t) K' is
    symmetric, so V + V^T = 2 V, and these rows' M = 2 V w_a (x^ = w x) and r_a = rw_a sum_b
    2 V_ab S_ab (the norm's share, see _normalised_rows) give their whole gradient."""
    c0 = to_acc(c0, gs_ptr.dtype.element_ty)
    two_gamma = to_acc(two_gamma, gs_ptr.dtype.element_ty)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    wa_s, rwa_s = _normalised_rows(ns_ptr, lo + ra, lo + R)
    wa_t, rwa_t = _normalised_rows(nt_ptr, lo + ra, lo + R)
    r_s = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    r_t = tl.zeros([BLOCK], dtype=gs_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        diff, dk_s, dk_t, s_s, s_t = _cc_tile(gs_ptr, gt_ptr, ra, rb, R, N, two_gamma, P)
        v_s = 4 * c0 * c0 * diff * dk_s
        v_t = -4 * c0 * c0 * diff * dk_t
        r_s += tl.sum(v_s * s_s, 1)
        r_t += tl.sum(v_t * s_t, 1)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_s * wa_s[:, None], mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_t * wa_t[:, None], mask=ok)
    tl.store(rs_ptr + ra, rwa_s * r_s, mask=ra < R)
    tl.store(rt_ptr + ra, rwa_t * r_t, mask=ra < R)


def cc_forward(g_s, g_t, gamma, p_order):
    """N^2 * loss from the Gram matrices of the normalised rows, S (R, N): all (N, N), or a
    global batch's rows (their part of the loss)."""
    rows, n = g_s.shape
    grid = (cdiv(rows, BLOCK), cdiv(n, BLOCK))
    part = torch.empty(grid[0] * grid[1], dtype=g_s.dtype, device=g_s.device)
    _cc_loss_kernel[grid](g_s, g_t, math.exp(-2 * gamma), 2 * gamma, part, rows, n, p_order, BLOCK=BLOCK)
    return part.sum()


def cc_backward(g_s, g_t, norms_s, norms_t, gamma, p_order, lo=0):
    """(M_s, r_s, M_t, r_t) with N^2 dL/dX = M X^ + r * X^ on each side, X^ the normalised
    rows and norms (N,) the rows' norms before; for a global batch's rows lo:lo + R of S
    (R, N), M (R, N) and r (R,) give those rows' whole gradient."""
    rows, n = g_s.shape
    m_s, r_s, m_t, r_t = grad_buffers(g_s, g_t)
    _cc_grad_kernel[(cdiv(rows, BLOCK),)](g_s, g_t, norms_s, norms_t, math.exp(-2 * gamma),
                                                 2 * gamma, m_s, r_s, m_t, r_t, lo, rows, n, p_order,
                                                 BLOCK=BLOCK, num_warps=TILE_WARPS)
    return m_s, r_s, m_t, r_t



# CC's float32 path (float32, bfloat16 and float16 inputs), from the raw rows' G = hi + lo
# (gram.gram_split) and squared norms G_aa = hi + lo: S = G / (n_a n_b) double-float (n =
# max(sqrt(G_aa), 1e-12) double-float), so that S_s - S_t, near 0 where the loss is, is
# rounded once; then K_s - K_t = e^{-2 gamma} (S_s - S_t) sum_{p=1..P} (2 gamma)^p / p!
# h_p(S_s, S_t), h_p = sum_{k<p} S_s^k S_t^(p-1-k), in float32: no difference of two
# float32 K (each rounded at u |K|, 27x the reference's own error at cosines near 1, where
# S_s - S_t is tiny). The gradient is written on the raw rows: M = 2 V w_a w_b and
# r_a = rw_a w_a sum_b 2 V_ab S_ab (rw_a = -w_a where n_a is not clamped), so
# N^2 dL/dX = M X + r * X with no normalised copy of X.

@triton.jit
def _cc_split_rows(sq_ptr, sq_lo_ptr, sq_stride, rows, n_rows):
    """(n, n_lo, w, rw) for these rows (< n_rows): n = max(sqrt(G_rr), 1e-12) double-float
    (G_rr = hi + lo at sq_ptr, sq_lo_ptr + r sq_stride), w = 1 / n, rw = -w where the clamp
    lets the gradient through, else 0."""
    n, n_lo = _split_norms(sq_ptr, sq_lo_ptr, sq_stride, rows, n_rows)
    live = n >= 1e-12
    n = tl.where(live, n, 1e-12)
    w = 1.0 / n
    return n, tl.where(live, n_lo, 0.0), w, tl.where(live, -w, 0.0)


@triton.jit
def _cc_split_s(g, g_lo, n_a, n_a_lo, n_b, n_b_lo):
    """S = G / (n_a n_b) double-float at a tile."""
    nn, nn_lo = two_prod(n_a, n_b)
    return dd_div(g, g_lo, nn, nn_lo + (n_a * n_b_lo + n_a_lo * n_b))


@triton.jit
def _cc_split_tile(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride,
                   ra, rb, lo, R, N, two_gamma, P):
    """(K_s - K_t, K'_s, K'_t, S_s, S_t, w_s, w_t, rw_s, rw_t) over e^{-2 gamma} at the tile
    (a, b) of the rows lo:lo + R (G (R, N)), in float32 (see the section's header); w and rw
    of the rows a, (BLOCK,)."""
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    na_s, na_s_lo, wa_s, rwa_s = _cc_split_rows(sqs_ptr, sqs_lo_ptr, sq_stride, lo + ra, lo + R)
    na_t, na_t_lo, wa_t, rwa_t = _cc_split_rows(sqt_ptr, sqt_lo_ptr, sq_stride, lo + ra, lo + R)
    nb_s, nb_s_lo, _, _ = _cc_split_rows(sqs_ptr, sqs_lo_ptr, sq_stride, rb, N)
    nb_t, nb_t_lo, _, _ = _cc_split_rows(sqt_ptr, sqt_lo_ptr, sq_stride, rb, N)
    s_s, s_s_lo = _cc_split_s(_load_tile(gs_ptr, ra, rb, R, N), _load_tile(gs_lo_ptr, ra, rb, R, N),
                              na_s[:, None], na_s_lo[:, None], nb_s[None, :], nb_s_lo[None, :])
    s_t, s_t_lo = _cc_split_s(_load_tile(gt_ptr, ra, rb, R, N), _load_tile(gt_lo_ptr, ra, rb, R, N),
                              na_t[:, None], na_t_lo[:, None], nb_t[None, :], nb_t_lo[None, :])
    d, d_err = two_sum(s_s, -s_t)
    delta = d + (d_err + (s_s_lo - s_t_lo))
    # sum_{p=1..P} (2 gamma)^p / p! h_p, h_1 = 1, h_{p+1} = S_s h_p + S_t^p.
    h = tl.full(s_s.shape, 1.0, tl.float32)
    t_pow = tl.full(s_s.shape, 1.0, tl.float32)
    coef = tl.full(s_s.shape, 1.0, tl.float32)
    fac = tl.zeros(s_s.shape, tl.float32)
    for q in range(0, P):
        coef = coef * two_gamma / (q + 1.0)
        fac += coef * h
        t_pow = t_pow * s_t
        h = s_s * h + t_pow
    _, dk_s = _cc_kernel_values(s_s, two_gamma, P)
    _, dk_t = _cc_kernel_values(s_t, two_gamma, P)
    return (tl.where(ok, delta * fac, 0.0), dk_s, dk_t, s_s, s_t, wa_s, wa_t, rwa_s, rwa_t)


@triton.jit
def _cc_split_loss_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                          sq_stride, c0: tl.float64, two_gamma: tl.float64, part_ptr, lo, R, N, P,
                          BLOCK: tl.constexpr):
    """_cc_loss_kernel in float32 arithmetic: part = sum (K_s - K_t)^2 over one tile."""
    c0 = tl.cast(c0, tl.float32)
    two_gamma = tl.cast(two_gamma, tl.float32)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    diff, _, _, _, _, _, _, _, _ = _cc_split_tile(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr,
                                                  sqt_ptr, sqt_lo_ptr, sq_stride, ra, rb, lo, R, N, two_gamma, P)
    diff = diff * c0
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(diff * diff, 1), 0))


@triton.jit
def _cc_split_grad_kernel(gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr,
                          sq_stride, c0: tl.float64, two_gamma: tl.float64, ms_ptr, rs_ptr, mt_ptr, rt_ptr, lo,
                          R, N, P, COLS, BLOCK: tl.constexpr):
    """_cc_grad_kernel in float32 arithmetic, M and r on the raw rows (see the section's
    header): N^2 dL/dX = M X + r * X for a block of the rows lo:lo + R and a chunk of the
    columns (r's part: a row of (chunks, R))."""
    c0 = tl.cast(c0, tl.float32)
    two_gamma = tl.cast(two_gamma, tl.float32)
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first, end = chunk_columns(COLS, N)
    r_s = tl.zeros([BLOCK], dtype=tl.float32)
    r_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, end, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        diff, dk_s, dk_t, s_s, s_t, wa_s, wa_t, rwa_s, rwa_t = _cc_split_tile(
            gs_ptr, gs_lo_ptr, gt_ptr, gt_lo_ptr, sqs_ptr, sqs_lo_ptr, sqt_ptr, sqt_lo_ptr, sq_stride, ra, rb, lo,
            R, N, two_gamma, P)
        _, _, wb_s, _ = _cc_split_rows(sqs_ptr, sqs_lo_ptr, sq_stride, rb, N)
        _, _, wb_t, _ = _cc_split_rows(sqt_ptr, sqt_lo_ptr, sq_stride, rb, N)
        v_s = 4 * c0 * c0 * diff * dk_s
        v_t = -4 * c0 * c0 * diff * dk_t
        r_s += tl.sum(v_s * s_s, 1)
        r_t += tl.sum(v_t * s_t, 1)
        tl.store(ms_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_s * wa_s[:, None] * wb_s[None, :],
                 mask=ok)
        tl.store(mt_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], v_t * wa_t[:, None] * wb_t[None, :],
                 mask=ok)
    _, _, wa_s, rwa_s = _cc_split_rows(sqs_ptr, sqs_lo_ptr, sq_stride, lo + ra, lo + R)
    _, _, wa_t, rwa_t = _cc_split_rows(sqt_ptr, sqt_lo_ptr, sq_stride, lo + ra, lo + R)
    tl.store(rs_ptr + tl.program_id(1) * R + ra, rwa_s * wa_s * r_s, mask=ra < R)
    tl.store(rt_ptr + tl.program_id(1) * R + ra, rwa_t * wa_t * r_t, mask=ra < R)


def cc_split_forward(g_s, g_t, gamma, p_order, lo=0, sq=None):
    """cc_forward on the float32 path (g_*, sq: _split_args): N^2 * loss float32 (this
    block of rows' part)."""
    rows, n = g_s[0].shape
    grid = (cdiv(rows, BLOCK), cdiv(n, BLOCK))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=g_s[0].device)
    _cc_split_loss_kernel[grid](*_split_args(g_s, g_t, sq), math.exp(-2 * gamma), 2 * gamma, part, lo, rows, n,
                                p_order, BLOCK=BLOCK, **NO_FMA)
    return part.sum()


def cc_split_backward(g_s, g_t, gamma, p_order, lo=0, sq=None):
    """(M_s, r_s, M_t, r_t) float32 with N^2 dL/dX = M X + r * X on the raw rows, for the
    rows lo:lo + R (their whole gradient, as cc_backward)."""
    rows, n = g_s[0].shape
    cols, chunks = column_chunks(rows, n)
    m_s, r_s, m_t, r_t = grad_buffers(g_s[0], g_t[0], chunks)
    _cc_split_grad_kernel[(cdiv(rows, BLOCK), chunks)](*_split_args(g_s, g_t, sq), math.exp(-2 * gamma), 2 * gamma,
                                                       m_s, r_s, m_t, r_t, lo, rows, n, p_order, cols, BLOCK=BLOCK,
                                                       num_warps=TILE_WARPS, **NO_FMA)
    return m_s, chunk_total(r_s), m_t, chunk_total(r_t)
