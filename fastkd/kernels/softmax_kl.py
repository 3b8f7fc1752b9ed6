"""Softmax-KL over logits: SoftTarget, DML and BSS.

    x_s = s / T, x_t = t / T (classes on dim 1), p = softmax(x_t), q = softmax(x_s)
    loss = scale / B * sum over rows of KL_row,  KL_row = sum_k p_k (log p_k - log q_k)
    d loss / d s_k = scale / (B T) * (q_k - p_k)
    d loss / d t_k = scale / (B T) * p_k (log p_k - log q_k - KL_row)

scale is T^2 (SoftTarget) or 1 (DML, BSS). Logits of shape (B, K, d1, ...) are read
as (B, K, S) through strides: a "row" is one (b, s) pair, so nothing is transposed.
Each program owns blocks of BLOCK_R rows and streams over the classes in blocks of BLOCK_K with
an online softmax, so any class count works without holding a row in registers.

Logits of at most FUSED_MAX values are one program's work (softmax_kl_fused): it walks
every row block, writes the loss itself (scaled, in the result dtype) and, in a second
pass over each row block, the gradients at grad_output 1. Larger logits take one program
per row block (softmax_kl_forward: per-program partial sums and the row statistics) and a
backward kernel that recomputes the softmaxes from those statistics.

Element rule, as torch's kl_div(log q, p) = xlogy(p, p) - p log q: a class with p = 0
adds 0, except where log q = -inf too (NaN, as in the reference).

KL_row is clamped at 0 (the reference's fp32 sum can round below 0 when q ~ p): the exact
KL_row is >= 0, so |max(x, 0) - KL| <= |x - KL| and the clamp never adds error; the
gradients are those of the unclamped formula.
"""
import torch
import triton
import triton.language as tl

from .common import as_3d, cdiv, next_power_of_2, num_warps, tl_acc, to_acc

# Elements per program tile (rows x classes) and widest class block. 2048 fp32 values per
# operand over 8 warps is 8 per thread: 4096 over 4 warps spilled at class counts <= 128.
TILE = 2048
MAX_BLOCK_K = 2048
# Logits of at most this many values per input are one program's work: the loss and the
# gradients in one launch (SoftmaxKLFunction). On an H100 such a program reads and writes
# ~0.5 MB in a few microseconds, less than a launch's host time.
FUSED_MAX = 32768


@triton.jit
def _row_offsets(rows, S, stride_b, stride_s):
    """Element offset of class 0 of each row; row = b * S + s."""
    rows = rows.to(tl.int64)
    return (rows // S) * stride_b + (rows % S) * stride_s


@triton.jit
def _shift(m):
    """The max that exponents are taken against: 0 while every class so far is -inf,
    so exp(-inf - shift) stays 0 rather than NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_kl_step(xs, xt, mask, m_s, m_t, z_s, z_t, d):
    """One block of classes (BLOCK_R, BLOCK_K) into the running row sums of the online
    softmax-KL: maxes m, normalisers z = sum exp(x - shift(m)), and d = sum w (u - v) with
    u = x_t - shift(m_t), v = x_s - shift(m_s), w = exp(u); KL_row = d / z_t + log(z_s / z_t).
    Like log_softmax, every log-probability is taken relative to the row max, so KL_row is
    summed from small differences; when a block raises a max, the sums move to the new
    shifts. Masked classes are -inf in both."""
    neg_inf = float("-inf")
    m_s_new = tl.maximum(m_s, tl.max(xs, axis=1))
    m_t_new = tl.maximum(m_t, tl.max(xt, axis=1))
    c_s, c_s_new = _shift(m_s), _shift(m_s_new)
    c_t, c_t_new = _shift(m_t), _shift(m_t_new)
    v = xs - c_s_new[:, None]
    u = xt - c_t_new[:, None]
    w = tl.exp(u)
    # kl_div's p = 0 rule: 0, or NaN where log q = -inf too (padding classes add 0).
    zero_p = tl.where(mask & (xs == neg_inf), float("nan"), 0.0)
    term = tl.where(w > 0, w * (u - v), zero_p)
    alpha_t = tl.exp(m_t - c_t_new)
    d = alpha_t * (d + z_t * ((c_t - c_t_new) - (c_s - c_s_new))) + tl.sum(term, axis=1)
    z_t = z_t * alpha_t + tl.sum(w, axis=1)
    z_s = z_s * tl.exp(m_s - c_s_new) + tl.sum(tl.exp(v), axis=1)
    m_s, m_t = m_s_new, m_t_new
    return m_s, m_t, z_s, z_t, d


@triton.jit
def _softmax_kl_forward_kernel(
    s_ptr, t_ptr, loss_ptr, stats_ptr, gs_ptr, gt_ptr, T: tl.float64, loss_scale: tl.float64,
    grad_scale: tl.float64, R, K, S, s_sb, s_sk, s_ss, t_sb, t_sk, t_ss, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STATS: tl.constexpr, STUDENT: tl.constexpr,
    TEACHER: tl.constexpr,
):
    """Program p takes the row blocks p, p + P, ... (P programs) and stores loss_scale times
    the sum of their KL_row at loss_ptr[p], in loss_ptr's dtype. With STATS, stats (5, R) in
    ACC: shift_s, log z_s, shift_t, log z_t, KL_row, where log softmax(x) = (x - shift) -
    log z (the sums as online_kl_step keeps them). With STUDENT / TEACHER, a second pass over
    each row block writes the gradients of the stored loss (grad_scale = scale / (B T)).
    """
    T = to_acc(T, ACC)
    total = tl.zeros((BLOCK_R,), ACC)
    for r0 in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = rows < R
        s_row = _row_offsets(rows, S, s_sb, s_ss)
        t_row = _row_offsets(rows, S, t_sb, t_ss)
        neg_inf = float("-inf")
        m_s = tl.full((BLOCK_R,), neg_inf, ACC)
        m_t = tl.full((BLOCK_R,), neg_inf, ACC)
        z_s = tl.zeros((BLOCK_R,), ACC)
        z_t = tl.zeros((BLOCK_R,), ACC)
        d = tl.zeros((BLOCK_R,), ACC)  # sum w (u - v)
        for k0 in range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask = row_ok[:, None] & (cols < K)[None, :]
            xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sk, mask=mask, other=neg_inf)
            xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sk, mask=mask, other=neg_inf)
            m_s, m_t, z_s, z_t, d = online_kl_step(xs.to(ACC) / T, xt.to(ACC) / T, mask, m_s, m_t, z_s, z_t, d)
        log_z_s = tl.log(z_s)
        log_z_t = tl.log(z_t)
        # log(z_s / z_t) rounds once where log z_s - log z_t would round two larger numbers.
        # KL_row >= 0, but when q ~ p its rounding can fall below 0; 0 is then nearer the exact
        # value, so the clamp only ever lowers the error (where keeps a NaN row NaN).
        kl = d / z_t + tl.log(z_s / z_t)
        kl = tl.where(kl < 0, 0.0, kl)
        total += tl.where(row_ok, kl, 0.0)
        if STATS:
            # Row j of stats (5, R) is reached by adding R j times: j * R in int32 overflows past 2^31.
            out = stats_ptr + rows
            tl.store(out, _shift(m_s), mask=row_ok)
            out += R
            tl.store(out, log_z_s, mask=row_ok)
            out += R
            tl.store(out, _shift(m_t), mask=row_ok)
            out += R
            tl.store(out, log_z_t, mask=row_ok)
            out += R
            tl.store(out, kl, mask=row_ok)
        if STUDENT or TEACHER:
            _write_gradients(s_ptr, t_ptr, gs_ptr, gt_ptr, rows, row_ok, K, S, s_row, t_row, s_sk, t_sk, T,
                             to_acc(grad_scale, ACC), _shift(m_s), log_z_s, _shift(m_t), log_z_t, kl,
                             BLOCK_K, STUDENT, TEACHER)
    tl.store(loss_ptr + tl.program_id(0), (tl.sum(total, axis=0) * to_acc(loss_scale, ACC)).to(
        loss_ptr.dtype.element_ty))


@triton.jit
def _write_gradients(s_ptr, t_ptr, gs_ptr, gt_ptr, rows, row_ok, K, S, s_row, t_row, s_sk, t_sk, T, g,
                     c_s, log_z_s, c_t, log_z_t, kl, BLOCK_K: tl.constexpr, STUDENT: tl.constexpr,
                     TEACHER: tl.constexpr):
    """The gradients of one row block, written as contiguous (B, K, S): g (q - p) and
    g p (log p - log q - KL), from the row statistics."""
    # (b, s) -> b K S + s, multiplied left to right in int64 (K * S alone is int32).
    g_row = (rows // S) * K * S + rows % S
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = row_ok[:, None] & (cols < K)[None, :]
        xs = tl.load(s_ptr + s_row[:, None] + cols[None, :] * s_sk, mask=mask, other=0.0)
        xt = tl.load(t_ptr + t_row[:, None] + cols[None, :] * t_sk, mask=mask, other=0.0)
        log_q = (xs.to(g.dtype) / T - c_s[:, None]) - log_z_s[:, None]
        log_p = (xt.to(g.dtype) / T - c_t[:, None]) - log_z_t[:, None]
        p = tl.exp(log_p)
        g_offs = g_row[:, None] + cols[None, :] * S
        if STUDENT:
            grad_s = g * (tl.exp(log_q) - p)
            tl.store(gs_ptr + g_offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            # A class with p = 0 contributes 0 (the limit of p log p); kl * 0 keeps a row
            # whose KL is inf or NaN non-finite, as the reference's is.
            grad_t = tl.where(p > 0, p * (log_p - log_q - kl[:, None]), kl[:, None] * 0.0)
            tl.store(gt_ptr + g_offs, (g * grad_t).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_kl_backward_kernel(
    s_ptr, t_ptr, stats_ptr, grad_ptr, gs_ptr, gt_ptr, T: tl.float64, grad_scale: tl.float64, R, K, S,
    s_sb, s_sk, s_ss, t_sb, t_sk, t_ss,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STUDENT: tl.constexpr, TEACHER: tl.constexpr,
):
    """The gradients from the forward's stats, at g = grad_output * grad_scale (grad_output
    read from grad_ptr)."""
    acc_t = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    stat = stats_ptr + rows  # row j of stats (5, R): R added j times, as in forward
    c_s = tl.load(stat, mask=row_ok, other=0.0)
    stat += R
    log_z_s = tl.load(stat, mask=row_ok, other=0.0)
    stat += R
    c_t = tl.load(stat, mask=row_ok, other=0.0)
    stat += R
    log_z_t = tl.load(stat, mask=row_ok, other=0.0)
    stat += R
    kl = tl.load(stat, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr).to(acc_t) * to_acc(grad_scale, acc_t)
    _write_gradients(s_ptr, t_ptr, gs_ptr, gt_ptr, rows, row_ok, K, S, _row_offsets(rows, S, s_sb, s_ss),
                     _row_offsets(rows, S, t_sb, t_ss), s_sk, t_sk, to_acc(T, acc_t), g,
                     c_s, log_z_s, c_t, log_z_t, kl, BLOCK_K, STUDENT, TEACHER)


def _blocks(R, K, dtype, tile=TILE):
    """(BLOCK_R, BLOCK_K, num_warps): a tile of about `tile` values (half that in fp64,
    whose values take two registers each), 8 per thread."""
    tile = tile // 2 if dtype == torch.float64 else tile
    block_k = min(next_power_of_2(K), MAX_BLOCK_K, tile)
    block_r = max(1, min(tile // block_k, next_power_of_2(R)))
    return block_r, block_k, num_warps(block_r * block_k)


def _gradients(s, t, out_s, out_t, student, teacher):
    """Contiguous (B, K, S) gradient buffers, in the inputs' dtypes; s itself where not asked
    (a pointer the kernels never write)."""
    return (torch.empty(s.shape, device=s.device, dtype=out_s.dtype) if student else s,
            torch.empty(t.shape, device=t.device, dtype=out_t.dtype) if teacher else s)


def softmax_kl_fused(out_s, out_t, T, scale, acc, dtype, student, teacher):
    """(loss, grad_s, grad_t) in one program: loss = scale / B * sum of KL_row, a 0-d tensor
    of dtype, and its gradients (None where not asked), for logits small enough
    (FUSED_MAX) that a launch costs more than the work."""
    s, t = as_3d(out_s), as_3d(out_t)
    B, K, S = s.shape
    loss = torch.empty((), device=s.device, dtype=dtype)
    grad_s, grad_t = _gradients(s, t, out_s, out_t, student, teacher)
    # Half a tile, 4 values per thread: the gradient pass keeps the row statistics live
    # beside its own values (8 per thread spilled at sm_80).
    block_r, block_k, _ = _blocks(B * S, K, acc, TILE // 2)
    warps = num_warps(2 * block_r * block_k)
    _softmax_kl_forward_kernel[(1,)](
        s, t, loss, s, grad_s, grad_t, T, scale / B, scale / (B * T), B * S, K, S, *s.stride(), *t.stride(),
        ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_K=block_k, STATS=False, STUDENT=student, TEACHER=teacher,
        num_warps=warps)
    return (loss, grad_s.view(out_s.shape) if student else None,
            grad_t.view(out_t.shape) if teacher else None)


def softmax_kl_forward(out_s, out_t, T, scale, acc):
    """(loss, stats): loss = scale / B * sum of KL_row, a 0-d tensor in acc, and the per-row
    statistics (5, R) [shift_s, log z_s, shift_t, log z_t, KL_row], R = B * prod(d_i)."""
    s, t = as_3d(out_s), as_3d(out_t)
    B, K, S = s.shape
    R = B * S
    block_r, block_k, warps = _blocks(R, K, acc)
    grid = cdiv(R, block_r)
    partial = torch.empty(grid, device=s.device, dtype=acc)
    stats = torch.empty((5, R), device=s.device, dtype=acc)
    _softmax_kl_forward_kernel[(grid,)](
        s, t, partial, stats, s, s, T, scale / B, 0.0, R, K, S, *s.stride(), *t.stride(),
        ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_K=block_k, STATS=True, STUDENT=False, TEACHER=False,
        num_warps=warps)
    return partial.sum(), stats


def softmax_kl_backward(out_s, out_t, T, scale, stats, grad_output, student, teacher):
    """(grad_s, grad_t) of grad_output * scale / B * sum of KL_row; None where not asked."""
    s, t = as_3d(out_s), as_3d(out_t)
    B, K, S = s.shape
    R = B * S
    grad_s, grad_t = _gradients(s, t, out_s, out_t, student, teacher)
    block_r, block_k, warps = _blocks(R, K, stats.dtype)
    _softmax_kl_backward_kernel[(cdiv(R, block_r),)](
        s, t, stats, grad_output, grad_s, grad_t, T, scale / (B * T), R, K, S, *s.stride(), *t.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k, STUDENT=student, TEACHER=teacher, num_warps=warps)
    return (grad_s.view(out_s.shape) if student else None,
            grad_t.view(out_t.shape) if teacher else None)
