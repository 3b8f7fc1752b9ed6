"""Triton kernels of the pointwise-and-reduce losses, with their launchers.

Three kernel shapes, each a forward that reduces to small per-block or per-row sums and
a backward that reads the inputs once and writes the gradients:

flat        Hint / Logits (MSE) and AB over the elements in any order.
rows        OFD (per-channel margin) and VID (per-channel variance) over the rows
            (b, c) of maps seen as (B, C, HW) through their strides.
normalised  AFD (rows (b, c), f / (||f|| + eps), squared distance), FT and LwM
            (rows b, f / max(||f||, eps), L1 distance) and Sobolev (the same, squared).

Accumulation is in fp32, or fp64 for fp64 inputs (the compile-time switch ACC). Float
arguments are fp64 (``tl.float64``, converted to ACC by ``to_acc``): Triton would make a
Python float fp32 and fp64 runs would lose digits.

Error analysis: a flat program sums one block with tl.sum (a tree) and torch sums the
per-block partials, so no fp32 sum runs long. A row program instead walks its row in
BLOCK-wide steps, each lane adding L / BLOCK terms in sequence; on long rows (HW = 9e4:
350 steps) that serial run put OFD's loss at 5e-7 relative to fp64 where the reference's
own fp32 error is 9e-8. The row sums therefore carry a Kahan compensation per lane
(_kahan_add), which makes each lane's error independent of the row length, and then one
tl.sum tree over the lanes.
"""
import torch
import triton
import triton.language as tl

from ..common import accumulation_dtype
from .common import NO_FMA, as_3d, cdiv, chunked, div, sqrt, tl_acc, to_acc

MSE = tl.constexpr(0)
AB = tl.constexpr(1)

_BLOCK = 1024
_ROW_BLOCK = 256


# --- flat: Hint, Logits (MSE) and AB ----------------------------------------------------

@triton.jit
def _flat_loss_kernel(s, t, partial, N, margin: tl.float64, LOSS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    # partial[block] = sum over the block of (s - t)^2 (MSE) or
    # (s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0] (AB).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    margin = to_acc(margin, ACC)
    x = tl.load(s + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(t + offs, mask=mask, other=0.0).to(ACC)
    if LOSS == MSE:
        v = (x - y) * (x - y)
    else:
        v = tl.where((x > -margin) & (y <= 0), (x + margin) * (x + margin), 0.0)
        v += tl.where((x <= margin) & (y > 0), (x - margin) * (x - margin), 0.0)
    tl.store(partial + pid, tl.sum(tl.where(mask, v, 0.0), axis=0))


@triton.jit
def _flat_grad_kernel(s, t, grad_out, ds, dt, N, margin: tl.float64, scale: tl.float64, LOSS: tl.constexpr,
                      ACC: tl.constexpr,
                      WRITE_S: tl.constexpr, WRITE_T: tl.constexpr, BLOCK: tl.constexpr):
    # k = grad_out * scale (scale = 1 / N). MSE: ds = 2k (s - t), dt = -ds.
    # AB: ds = 2k ((s + m) [s > -m, t <= 0] + (s - m) [s <= m, t > 0]) (t only enters masks).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    margin = to_acc(margin, ACC)
    k = tl.load(grad_out).to(ACC) * to_acc(scale, ACC)
    x = tl.load(s + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(t + offs, mask=mask, other=0.0).to(ACC)
    if LOSS == MSE:
        g = 2.0 * k * (x - y)
    else:
        g = tl.where((x > -margin) & (y <= 0), x + margin, 0.0)
        g += tl.where((x <= margin) & (y > 0), x - margin, 0.0)
        g = 2.0 * k * g
    if WRITE_S:
        tl.store(ds + offs, g.to(ds.dtype.element_ty), mask=mask)
    if WRITE_T:
        tl.store(dt + offs, (-g).to(dt.dtype.element_ty), mask=mask)


def _flat(x):
    """x as a contiguous 1-D tensor in its logical element order. reshape alone can return
    a strided 1-D view (a (1, 1, 1, W) slice with last stride 2), which the flat kernels,
    indexing base + offs, would misread."""
    return x.reshape(-1).contiguous()


def flat_loss(s, t, loss, margin=0.0):
    """sum over all elements of the MSE or AB term, in the accumulation dtype (a 0-d tensor).

    s, t of one shape, read in their common element order (copied only where no contiguous
    flat view exists).
    """
    x, y = _flat(s), _flat(t)
    acc = accumulation_dtype(s, t)
    grid = (cdiv(x.numel(), _BLOCK),)
    partial = torch.empty(grid[0], dtype=acc, device=s.device)
    _flat_loss_kernel[grid](x, y, partial, x.numel(), float(margin), LOSS=loss, ACC=tl_acc(acc), BLOCK=_BLOCK)
    return partial.sum()


def flat_grad(s, t, grad_out, loss, margin, need_s, need_t):
    """(ds, dt) of grad_out * (MSE or AB loss), None where not needed (AB's dt is zero)."""
    x, y = _flat(s), _flat(t)
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_s else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_t else None
    grid = (cdiv(x.numel(), _BLOCK),)
    _flat_grad_kernel[grid](x, y, grad_out, x if ds is None else ds, x if dt is None else dt, x.numel(),
                            float(margin), 1.0 / x.numel(), LOSS=loss, ACC=tl_acc(accumulation_dtype(s, t)),
                            WRITE_S=need_s, WRITE_T=need_t, BLOCK=_BLOCK)
    return ds, dt


# --- rows (b, c) of (B, C, HW) maps: OFD, VID ---------------------------------------------

@triton.jit
def _kahan_add(acc, comp, v):
    # Compensated acc += v: comp holds the low-order bits that acc's rounding dropped.
    y = v - comp
    total = acc + y
    return total, (total - acc) - y


@triton.jit
def _ofd_margin_kernel(t, stats, C, L, stb, stc, stk, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # stats[r] = (sum of t [t < 0], count of t < 0) over row r = (b, c).
    r = tl.program_id(0).to(tl.int64)
    base = t + (r // C) * stb + (r % C) * stc
    neg = tl.zeros([BLOCK], dtype=ACC)
    neg_c = tl.zeros([BLOCK], dtype=ACC)
    cnt = tl.zeros([BLOCK], dtype=ACC)  # exact: whole numbers below 2^24
    for k0 in range(0, L, BLOCK):
        k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        y = tl.load(base + k * stk, mask=k < L, other=0.0).to(ACC)
        neg, neg_c = _kahan_add(neg, neg_c, tl.where(y < 0, y, 0.0))
        cnt += tl.where(y < 0, 1.0, 0.0)
    tl.store(stats + 2 * r, tl.sum(neg, axis=0))
    tl.store(stats + 2 * r + 1, tl.sum(cnt, axis=0))


@triton.jit
def _ofd_channel(mstats, c, B, C, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # (m_c, count_c): m_c = sum_b neg / (count_c + eps), count_c = sum_b count over channel c's
    # rows (b, c) of the margin kernel's stats; each program of a channel sums them alike.
    neg = tl.zeros([BLOCK], dtype=ACC)
    cnt = tl.zeros([BLOCK], dtype=ACC)
    for b0 in range(0, B, BLOCK):
        b = (b0 + tl.arange(0, BLOCK)).to(tl.int64)
        row = mstats + 2 * (b * C + c)
        neg += tl.load(row, mask=b < B, other=0.0)
        cnt += tl.load(row + 1, mask=b < B, other=0.0)
    cnt_c = tl.sum(cnt, axis=0)
    return tl.sum(neg, axis=0) / (cnt_c + to_acc(eps, ACC)), cnt_c


@triton.jit
def _ofd_difference(x, y, m):
    # e = (s - t') [not (s <= t' and t' <= 0)], t' = max(t, m_c).
    yp = tl.maximum(y, m)
    return tl.where((x <= yp) & (yp <= 0), 0.0, x - yp)


@triton.jit
def _ofd_loss_kernel(s, t, mstats, stats, ds, B, C, L, eps: tl.float64, scale: tl.float64,
                     ssb, ssc, ssk, stb, stc, stk,
                     ACC: tl.constexpr, WRITE_S: tl.constexpr, BLOCK: tl.constexpr):
    # Row r = (b, c), e as _ofd_difference: stats[r] = (sum e^2, sum e ([m_c > t] + [m_c == t]
    # / 2)); the second is what the teacher's gradient sends through the margin (it does not
    # depend on grad_out). WRITE_S: ds = 2 scale e, the student's gradient at grad_output 1.
    r = tl.program_id(0).to(tl.int64)
    b, c = r // C, r % C
    m, _ = _ofd_channel(mstats, c, B, C, eps, ACC, BLOCK)
    k2 = 2.0 * to_acc(scale, ACC)
    sq = tl.zeros([BLOCK], dtype=ACC)
    sq_c = tl.zeros([BLOCK], dtype=ACC)
    through = tl.zeros([BLOCK], dtype=ACC)
    through_c = tl.zeros([BLOCK], dtype=ACC)
    for k0 in range(0, L, BLOCK):
        k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        km = k < L
        x = tl.load(s + b * ssb + c * ssc + k * ssk, mask=km, other=0.0).to(ACC)
        y = tl.load(t + b * stb + c * stc + k * stk, mask=km, other=0.0).to(ACC)
        e = tl.where(km, _ofd_difference(x, y, m), 0.0)
        sq, sq_c = _kahan_add(sq, sq_c, e * e)
        through, through_c = _kahan_add(through, through_c, e * tl.where(m > y, 1.0, tl.where(m == y, 0.5, 0.0)))
        if WRITE_S:
            tl.store(ds + r * L + k, (k2 * e).to(ds.dtype.element_ty), mask=km)
    tl.store(stats + 2 * r, tl.sum(sq, axis=0))
    tl.store(stats + 2 * r + 1, tl.sum(through, axis=0))


@triton.jit
def _ofd_grad_kernel(s, t, mstats, stats, grad_out, dt, B, C, L, eps: tl.float64, scale: tl.float64,
                     ssb, ssc, ssk, stb, stc, stk, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # k = 2 grad_out scale; dt = -k (e ([t > m] + [t == m] / 2) + [t < 0] through_c),
    # through_c = sum over the channel of e ([m > t] + [m == t] / 2) / (count(t < 0) + eps).
    r = tl.program_id(0).to(tl.int64)
    b, c = r // C, r % C
    m, cnt = _ofd_channel(mstats, c, B, C, eps, ACC, BLOCK)
    q = tl.zeros([BLOCK], dtype=ACC)
    for b0 in range(0, B, BLOCK):
        bb = (b0 + tl.arange(0, BLOCK)).to(tl.int64)
        q += tl.load(stats + 2 * (bb * C + c) + 1, mask=bb < B, other=0.0)
    q = tl.sum(q, axis=0) / (cnt + to_acc(eps, ACC))
    k2 = 2.0 * tl.load(grad_out).to(ACC) * to_acc(scale, ACC)
    for k0 in range(0, L, BLOCK):
        k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        km = k < L
        x = tl.load(s + b * ssb + c * ssc + k * ssk, mask=km, other=0.0).to(ACC)
        y = tl.load(t + b * stb + c * stc + k * stk, mask=km, other=0.0).to(ACC)
        e = _ofd_difference(x, y, m)
        g = e * tl.where(y > m, 1.0, tl.where(y == m, 0.5, 0.0)) + tl.where(y < 0, q, 0.0)
        tl.store(dt + r * L + k, (-k2 * g).to(dt.dtype.element_ty), mask=km)


@triton.jit
def _vid_kernel(s, t, alpha, out, ds, dt, C, L, eps: tl.float64, inv_n: tl.float64,
                ssb, ssc, ssk, stb, stc, stk, ACC: tl.constexpr, WRITE_S: tl.constexpr,
                WRITE_T: tl.constexpr, BLOCK: tl.constexpr):
    # Row r = (b, c), var_c = log(1 + exp(alpha_c)) + eps, w = 1 / (var_c N), q = sum (s - t)^2:
    # ds = w (s - t), dt = -ds, written in the pass that sums q; out[r] = (the row's share of
    # the loss, of dL/dalpha_c): (0.5 w q, -0.5 w q sigmoid(alpha_c) / var_c), and row b = 0
    # adds the channel's own terms (0.5 log var_c / C, 0.5 sigmoid(alpha_c) / (C var_c)).
    r = tl.program_id(0).to(tl.int64)
    b, c = r // C, r % C
    a = tl.load(alpha + c).to(ACC)
    var = tl.log(1.0 + tl.exp(a)) + to_acc(eps, ACC)
    w = to_acc(inv_n, ACC) / var
    acc = tl.zeros([BLOCK], dtype=ACC)
    acc_c = tl.zeros([BLOCK], dtype=ACC)
    for k0 in range(0, L, BLOCK):
        k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        km = k < L
        d = (tl.load(s + b * ssb + c * ssc + k * ssk, mask=km, other=0.0).to(ACC)
             - tl.load(t + b * stb + c * stc + k * stk, mask=km, other=0.0).to(ACC))
        acc, acc_c = _kahan_add(acc, acc_c, d * d)
        if WRITE_S:
            tl.store(ds + r * L + k, (w * d).to(ds.dtype.element_ty), mask=km)
        if WRITE_T:
            tl.store(dt + r * L + k, (-w * d).to(dt.dtype.element_ty), mask=km)
    wq = 0.5 * w * tl.sum(acc, axis=0)
    sig = tl.sigmoid(a)
    first = tl.where(b == 0, to_acc(1.0, ACC) / C, 0.0)  # 1 / C on row b = 0, in ACC
    tl.store(out + 2 * r, wq + first * 0.5 * tl.log(var))
    tl.store(out + 2 * r + 1, (first * 0.5 / var - wq / var) * sig)


def _grads_like(s, t, need_s, need_t):
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_s else None
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_t else None
    return ds, dt


def ofd_margin(fm_t):
    """Per-row (sum t [t < 0], count(t < 0)) (B, C, 2), in the accumulation dtype: the
    channels' margins m_c = sum_b neg / (sum_b count + eps), which the later kernels form."""
    y = as_3d(fm_t)
    B, C, L = y.shape
    acc = accumulation_dtype(fm_t)
    stats = torch.empty((B, C, 2), dtype=acc, device=fm_t.device)
    _ofd_margin_kernel[(B * C,)](y, stats, C, L, *y.stride(), ACC=tl_acc(acc), BLOCK=_ROW_BLOCK)
    return stats


def ofd_loss(fm_s, fm_t, mstats, need_s, eps=1e-6):
    """(stats, ds): per-row (sum e^2, sum e [m > t] (1/2 at m = t)) (B, C, 2) of OFD's masked
    difference e, from ofd_margin's mstats; ds the student's gradient at grad_output 1 when
    need_s, else None."""
    x, y = as_3d(fm_s), as_3d(fm_t)
    B, C, L = x.shape
    stats = torch.empty((B, C, 2), dtype=mstats.dtype, device=fm_s.device)
    ds, _ = _grads_like(fm_s, fm_t, need_s, False)
    _ofd_loss_kernel[(B * C,)](x, y, mstats, stats, x if ds is None else ds, B, C, L, eps, 1.0 / fm_s.numel(),
                               *x.stride(), *y.stride(), ACC=tl_acc(mstats.dtype), WRITE_S=need_s,
                               BLOCK=_ROW_BLOCK)
    return stats, ds


def ofd_grad_t(fm_s, fm_t, mstats, stats, grad_out, eps=1e-6):
    """dt of grad_out * OFD from the two kernels' stats (_ofd_grad_kernel)."""
    x, y = as_3d(fm_s), as_3d(fm_t)
    B, C, L = x.shape
    _, dt = _grads_like(fm_s, fm_t, False, True)
    _ofd_grad_kernel[(B * C,)](x, y, mstats, stats, grad_out, dt, B, C, L, eps, 1.0 / fm_s.numel(),
                               *x.stride(), *y.stride(), ACC=tl_acc(mstats.dtype), BLOCK=_ROW_BLOCK)
    return dt


def vid(s, t, alpha, eps, need_s, need_t):
    """(stats (B, C, 2), ds, dt) of VID at grad_output 1 (_vid_kernel): stats[..., 0] sums to
    the loss and stats[..., 1] over b to dL/dalpha, in the accumulation dtype; ds, dt None
    where not needed."""
    x, y = as_3d(s), as_3d(t)
    B, C, L = x.shape
    acc = accumulation_dtype(s, t, alpha)
    stats = torch.empty((B, C, 2), dtype=acc, device=s.device)
    ds, dt = _grads_like(s, t, need_s, need_t)
    _vid_kernel[(B * C,)](x, y, alpha, stats, x if ds is None else ds, x if dt is None else dt, C, L, float(eps),
                          1.0 / s.numel(), *x.stride(), *y.stride(), ACC=tl_acc(acc), WRITE_S=need_s,
                          WRITE_T=need_t, BLOCK=_ROW_BLOCK)
    return stats, ds, dt


# --- normalised rows: AFD, FT, LwM, Sobolev ------------------------------------------------

@triton.jit
def _inverse_norm(n, eps, ADD_EPS: tl.constexpr):
    # r = 1 / (n + eps) (AFD) or 1 / max(n, eps) (F.normalize), and |dr/dn| / n for the
    # gradient (0 where the norm is 0 or clamped). r correctly rounded (div), as the tests'
    # interpreter forms it: it scales a whole row, so a GPU's approximate `/` would be one
    # error on all of it (LwM under autocast: 1.1e-5 against a bound of 1e-5 in
    # tests/gpu_division.py's model).
    if ADD_EPS:
        r = div(1.0, n + eps)
        slope = tl.where(n > 0, r * r / tl.where(n > 0, n, 1.0), 0.0)
    else:
        r = div(1.0, tl.maximum(n, eps))
        slope = tl.where(n >= eps, r * r * r, 0.0)
    return r, slope


@triton.jit
def _row_values(ps, pt, ssk, stk, k0, L, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # (k, k < L, s, t): a row's values k0:k0 + BLOCK on each side, in ACC (0 past L).
    k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
    km = k < L
    return k, km, tl.load(ps + k * ssk, mask=km, other=0.0).to(ACC), tl.load(pt + k * stk, mask=km, other=0.0).to(ACC)


# normalized_distance's statistics per row chunk: ||s||, ||t||, sum phi(d), sum phi'(d) s,
# sum phi'(d) t, sum t.
STATS = tl.constexpr(6)


@triton.jit
def _row_chunk(s, t, C, L, CHUNK, ssb, ssc, stb, stc):
    # Program -> (its row r, its chunk j, the row's chunk count n, the chunk's end, each
    # side's row start): rows (b, c) of L values, each cut into chunks of CHUNK.
    pid = tl.program_id(0).to(tl.int64)
    n = tl.cdiv(L, CHUNK)
    r, j = pid // n, pid % n
    b, c = r // C, r % C
    return r, j, n, tl.minimum(j * CHUNK + CHUNK, L), s + b * ssb + c * ssc, t + b * stb + c * stc


@triton.jit
def _row_squares(ps, pt, ssk, stk, k_lo, k_hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # (sum s^2, sum t^2) over a row's values k_lo:k_hi.
    ss = tl.zeros([BLOCK], dtype=ACC)
    tt = tl.zeros([BLOCK], dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK):
        k, km, x, y = _row_values(ps, pt, ssk, stk, k0, k_hi, ACC, BLOCK)
        ss += x * x
        tt += y * y
    return tl.sum(ss, axis=0), tl.sum(tt, axis=0)


@triton.jit
def _chunk_sums(part, r, n, col, width, BLOCK: tl.constexpr):
    # sum over the row's n chunks j of part[r, j, col], part (R, n, width): in the chunks' order,
    # so every program of a row forms the same sum.
    acc = tl.zeros([BLOCK], dtype=part.dtype.element_ty)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        acc += tl.load(part + (r * n + j) * width + col, mask=j < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _row_squares_kernel(s, t, squares, C, L, CHUNK, ssb, ssc, ssk, stb, stc, stk, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    # A split row's first pass: squares[r, j] = (sum s^2, sum t^2) over chunk j of row r.
    r, j, n, k_hi, ps, pt = _row_chunk(s, t, C, L, CHUNK, ssb, ssc, stb, stc)
    ss, tt = _row_squares(ps, pt, ssk, stk, j * CHUNK, k_hi, ACC, BLOCK)
    pid = r * n + j
    tl.store(squares + 2 * pid, ss)
    tl.store(squares + 2 * pid + 1, tt)


@triton.jit
def _normalized_distance_kernel(s, t, squares, stats, C, L, CHUNK, eps: tl.float64, ssb, ssc, ssk, stb, stc, stk,
                                ADD_EPS: tl.constexpr, L1: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
                                BLOCK: tl.constexpr):
    # Row r, chunk j: s' = s r_s, t' = t r_t, d = s' - t'; stats[r, j] = (||s||, ||t||, and over
    # the chunk sum phi(d), sum phi'(d) s, sum phi'(d) t, sum t) with phi = |.| (L1) or (.)^2,
    # phi' = sign or identity (sum t: AFD's pooled teacher, without a pass of its own). The
    # norms come from a pass over the whole row (one chunk: the second pass reads it again
    # from cache) or, SPLIT, from _row_squares_kernel's chunk sums.
    r, j, n, k_hi, ps, pt = _row_chunk(s, t, C, L, CHUNK, ssb, ssc, stb, stc)
    eps = to_acc(eps, ACC)
    if SPLIT:
        ss = _chunk_sums(squares, r, n, 0, 2, BLOCK)
        tt = _chunk_sums(squares, r, n, 1, 2, BLOCK)
    else:
        ss, tt = _row_squares(ps, pt, ssk, stk, 0, L, ACC, BLOCK)
    n_s = sqrt(ss)
    n_t = sqrt(tt)
    r_s, _ = _inverse_norm(n_s, eps, ADD_EPS)
    r_t, _ = _inverse_norm(n_t, eps, ADD_EPS)
    dist = tl.zeros([BLOCK], dtype=ACC)
    u_s = tl.zeros([BLOCK], dtype=ACC)
    u_t = tl.zeros([BLOCK], dtype=ACC)
    sum_t = tl.zeros([BLOCK], dtype=ACC)
    for k0 in range(j * CHUNK, k_hi, BLOCK):
        # k and km go unused, but not as `_`: that is a scalar here, and a loop-carried name keeps one type.
        k, km, x, y = _row_values(ps, pt, ssk, stk, k0, k_hi, ACC, BLOCK)
        d = x * r_s - y * r_t
        if L1:
            dist += tl.abs(d)
            d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        else:
            dist += d * d
        u_s += d * x
        u_t += d * y
        sum_t += y
    out = stats + STATS * (r * n + j)
    tl.store(out, n_s)
    tl.store(out + 1, n_t)
    tl.store(out + 2, tl.sum(dist, axis=0))
    tl.store(out + 3, tl.sum(u_s, axis=0))
    tl.store(out + 4, tl.sum(u_t, axis=0))
    tl.store(out + 5, tl.sum(sum_t, axis=0))


@triton.jit
def _normalized_distance_grad_kernel(s, t, stats, weight, ds, dt, C, L, CHUNK, eps: tl.float64,
                                     ssb, ssc, ssk, stb, stc, stk,
                                     ADD_EPS: tl.constexpr, L1: tl.constexpr, SPLIT: tl.constexpr,
                                     ACC: tl.constexpr, WRITE_S: tl.constexpr, WRITE_T: tl.constexpr,
                                     BLOCK: tl.constexpr):
    # For loss = sum_r w_r sum phi(d) / (2 if squared): with G = w_r phi'(d),
    # ds = r_s G - s (G . s) |dr/dn|_s / n_s and dt = -(r_t G - t (G . t) |dr/dn|_t / n_t),
    # over row r's chunk j; the dot products G . s, G . t are the sums of the row's chunks.
    r, j, n, k_hi, ps, pt = _row_chunk(s, t, C, L, CHUNK, ssb, ssc, stb, stc)
    w = tl.load(weight + r).to(ACC)
    eps = to_acc(eps, ACC)
    row = stats + STATS * r * n
    r_s, slope_s = _inverse_norm(tl.load(row).to(ACC), eps, ADD_EPS)
    r_t, slope_t = _inverse_norm(tl.load(row + 1).to(ACC), eps, ADD_EPS)
    if SPLIT:
        u_s = _chunk_sums(stats, r, n, 3, STATS, BLOCK).to(ACC)
        u_t = _chunk_sums(stats, r, n, 4, STATS, BLOCK).to(ACC)
    else:
        u_s = tl.load(row + 3).to(ACC)
        u_t = tl.load(row + 4).to(ACC)
    c_s = slope_s * u_s
    c_t = slope_t * u_t
    for k0 in range(j * CHUNK, k_hi, BLOCK):
        k, km, x, y = _row_values(ps, pt, ssk, stk, k0, k_hi, ACC, BLOCK)
        d = x * r_s - y * r_t
        if L1:
            d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        if WRITE_S:
            tl.store(ds + r * L + k, (w * (r_s * d - x * c_s)).to(ds.dtype.element_ty), mask=km)
        if WRITE_T:
            tl.store(dt + r * L + k, (-w * (r_t * d - y * c_t)).to(dt.dtype.element_ty), mask=km)


# A row is split into chunks, each its own program, where there are too few rows to keep a
# GPU's memory busy: FT's and Sobolev's rows are whole samples, B of them (256 rows of 400k
# values at FT's ImageNet shapes, a few programs per SM). Split, forward launches twice (each
# chunk's squares, then its sums), and its second pass reads the inputs again from memory
# unless the whole input fits in the cache (one program per row reads its own row again,
# which a cache holds while few rows run at once); so only rows of at least two chunks of
# _SPLIT_MIN_CHUNK values split, into about _SPLIT_PROGRAMS programs in all.
_SPLIT_PROGRAMS = 4096
_SPLIT_MIN_CHUNK = 16384


def row_chunk(R, L):
    """Values per program along R rows of L, a multiple of the kernels' block: the whole row,
    or for a split row a chunk of at least _SPLIT_MIN_CHUNK."""
    return chunked(R, L, _SPLIT_PROGRAMS, _SPLIT_MIN_CHUNK, _ROW_BLOCK)[0]


def normalized_distance(s, t, eps, add_eps, l1):
    """Per-row statistics (R, n, STATS), a row's n chunks each (n = 1 unless the row splits,
    row_chunk): ||s||, ||t||, and over the chunk sum phi(d), sum phi'(d) s, sum phi'(d) t, sum t.

    s, t (B, C, L) views (rows (b, c)); d = s / (n + eps) - t / (n + eps) when add_eps,
    else with max(n, eps); phi = |.| when l1, else (.)^2.
    """
    B, C, L = s.shape
    acc = accumulation_dtype(s, t)
    chunk = row_chunk(B * C, L)
    n = cdiv(L, chunk)
    stats = torch.empty((B * C, n, STATS.value), dtype=acc, device=s.device)
    squares = torch.empty((B * C, n, 2), dtype=acc, device=s.device) if n > 1 else stats
    if n > 1:
        _row_squares_kernel[(B * C * n,)](s, t, squares, C, L, chunk, *s.stride(), *t.stride(), ACC=tl_acc(acc),
                                          BLOCK=_ROW_BLOCK)
    _normalized_distance_kernel[(B * C * n,)](s, t, squares, stats, C, L, chunk, float(eps), *s.stride(),
                                              *t.stride(), ADD_EPS=add_eps, L1=l1, SPLIT=n > 1, ACC=tl_acc(acc),
                                              BLOCK=_ROW_BLOCK, **NO_FMA)
    return stats


def row_distance(stats):
    """sum phi(d) per row (R,), from normalized_distance's statistics."""
    return _row_total(stats, 2)


def row_sum_t(stats):
    """sum t per row (R,), from normalized_distance's statistics."""
    return _row_total(stats, 5)


def _row_total(stats, col):
    return stats[:, 0, col] if stats.shape[1] == 1 else stats[:, :, col].sum(1)


def normalized_distance_grad(s, t, stats, weight, eps, add_eps, l1, need_s, need_t):
    """(ds, dt) as contiguous (B, C, L) tensors; weight (R,) = dloss / d(sum phi) per row, with the
    factor 2 of the square folded in for the squared distance."""
    B, C, L = s.shape
    chunk = row_chunk(B * C, L)
    n = stats.shape[1]
    assert n == cdiv(L, chunk), "stats from normalized_distance of the same shapes"
    ds, dt = _grads_like(s, t, need_s, need_t)
    _normalized_distance_grad_kernel[(B * C * n,)](s, t, stats, weight, s if ds is None else ds,
                                                   s if dt is None else dt, C, L, chunk, float(eps), *s.stride(),
                                                   *t.stride(), ADD_EPS=add_eps, L1=l1, SPLIT=n > 1,
                                                   ACC=tl_acc(stats.dtype), WRITE_S=need_s, WRITE_T=need_t,
                                                   BLOCK=_ROW_BLOCK, **NO_FMA)
    return ds, dt
