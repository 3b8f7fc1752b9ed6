"""Rows of FusedLinearSoftTarget: one chunk of logits in, per-row losses and (in place) the
logits' gradient out.

For a chunk of student logits z (R, V) (and dense teacher logits t, or none for a top-k
teacher, whose part fastkd/chunked_linear.py adds), with x = z / T:

    log q = (x - shift_s) - log z_s           shift_s = max(x), z_s = sum exp(x - shift_s)
    KL_row = sum_c p_c (log p_c - log q_c)    p = softmax(t / T)          (dense teacher)
    CE_row = logsumexp(z) - z[label]          (hard term; 0 where the label is ignored)
    dz = w_kl T (q - p) + w_ce hard_weight (softmax(z) - onehot(label))

w_kl, w_ce (R,) are the per-row weights of the reduction (0 on ignored rows, whose dz is 0).
One program owns BLOCK_R rows and streams over the vocabulary twice in blocks of BLOCK_V:
the first pass keeps the online softmax sums (shared with SoftTarget's kernel through
online_kl_step), the second writes dz over z, so a chunk needs no buffer of its own.
"""
import math

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2, num_warps, to_acc
from .softmax_kl import MAX_BLOCK_K, TILE, _shift, online_kl_step


@triton.jit
def _linear_kl_rows_kernel(
    z_ptr, t_ptr, label_ptr, w_kl_ptr, w_ce_ptr, stats_ptr, T: tl.float64, hard_weight: tl.float64,
    R, V, z_stride, t_stride,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, DENSE: tl.constexpr, HARD: tl.constexpr,
    GRAD: tl.constexpr,
):
    """stats (4, R) in the accumulation dtype: shift_s, log z_s (logsumexp(x) = shift_s +
    log z_s, kept apart so that log q = (x - shift_s) - log z_s loses no digits to a large
    max), KL_row (0 without a dense teacher), CE_row (0 without HARD)."""
    acc_t = stats_ptr.dtype.element_ty
    T = to_acc(T, acc_t)
    inv_T = 1.0 / T  # one division per program: a multiply per class instead
    hw = to_acc(hard_weight, acc_t)
    neg_inf = float("-inf")
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    z_row = z_ptr + rows * z_stride
    t_row = t_ptr + rows * t_stride
    if HARD:
        label = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        label_ok = row_ok & (label >= 0) & (label < V)
    m_s = tl.full((BLOCK_R,), neg_inf, acc_t)
    m_t = tl.full((BLOCK_R,), neg_inf, acc_t)
    m_1 = tl.full((BLOCK_R,), neg_inf, acc_t)
    z_s = tl.zeros((BLOCK_R,), acc_t)
    z_t = tl.zeros((BLOCK_R,), acc_t)
    z_1 = tl.zeros((BLOCK_R,), acc_t)
    d = tl.zeros((BLOCK_R,), acc_t)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = row_ok[:, None] & (cols < V)[None, :]
        zs = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t)
        if DENSE:
            xt = tl.load(t_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t) * inv_T
        else:  # student sums only: a teacher equal to the student leaves d at 0
            xt = zs * inv_T
        m_s, m_t, z_s, z_t, d = online_kl_step(zs * inv_T, xt, mask, m_s, m_t, z_s, z_t, d)
        if HARD:  # softmax at temperature 1, against its own max
            m_1_new = tl.maximum(m_1, tl.max(zs, axis=1))
            c_1_new = _shift(m_1_new)
            z_1 = z_1 * tl.exp(m_1 - c_1_new) + tl.sum(tl.exp(zs - c_1_new[:, None]), axis=1)
            m_1 = m_1_new
    c_s, log_z_s = _shift(m_s), tl.log(z_s)
    # Row j of stats (4, R) is reached by adding R j times (j * R in int32 could overflow).
    out = stats_ptr + rows
    tl.store(out, c_s, mask=row_ok)
    out += R
    tl.store(out, log_z_s, mask=row_ok)
    out += R
    kl = tl.zeros((BLOCK_R,), acc_t)
    if DENSE:
        kl = d / z_t + tl.log(z_s / z_t)
        kl = tl.where(kl < 0, 0.0, kl)  # as SoftTarget's kernel: the exact KL_row is >= 0
    tl.store(out, kl, mask=row_ok)
    out += R
    ce = tl.zeros((BLOCK_R,), acc_t)
    if HARD:
        c_1, log_z_1 = _shift(m_1), tl.log(z_1)
        z_label = tl.load(z_row + label, mask=label_ok, other=0.0).to(acc_t)
        ce = tl.where(label_ok, (c_1 - z_label) + log_z_1, 0.0)  # the small difference first
    tl.store(out, ce, mask=row_ok)

    if GRAD:
        w_kl = tl.load(w_kl_ptr + rows, mask=row_ok, other=0.0).to(acc_t) * T
        w_ce = tl.load(w_ce_ptr + rows, mask=row_ok, other=0.0).to(acc_t) * hw
        live = (w_kl != 0) | (w_ce != 0)
        c_t, log_z_t = _shift(m_t), tl.log(z_t)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask = row_ok[:, None] & (cols < V)[None, :]
            zs = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_t)
            dz = tl.exp((zs * inv_T - c_s[:, None]) - log_z_s[:, None])
            if DENSE:
                xt = tl.load(t_row[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_t) * inv_T
                dz -= tl.exp((xt - c_t[:, None]) - log_z_t[:, None])
            dz *= w_kl[:, None]
            if HARD:
                p_1 = tl.exp((zs - c_1[:, None]) - log_z_1[:, None])
                dz += w_ce[:, None] * (p_1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
            dz = tl.where(live[:, None], dz, 0.0)  # ignored rows: 0, whatever their logits
            tl.store(z_row[:, None] + cols[None, :], dz.to(z_ptr.dtype.element_ty), mask=mask)


def _blocks(R, V, dtype):
    """(BLOCK_R, BLOCK_V, num_warps): a tile of TILE / 2 values, TILE / 4 in float64 (whose
    values take two registers each): half SoftTarget's, as the hard term keeps more of the
    tile live (at TILE, float64 spilled and float32 used 247 registers at sm_80). A
    vocabulary of TILE classes or more gets one row of TILE per program over 4 warps (72
    registers at sm_90): on an H100, 9% faster than TILE / 2 over 2,048 x 128k bfloat16
    logits (benchmarks/results/gpu-NVIDIA-H100-80GB-HBM3-20261127)."""
    if dtype != torch.float64 and V >= TILE:
        return 1, TILE, 4
    tile = TILE // 4 if dtype == torch.float64 else TILE // 2
    block_v = min(next_power_of_2(V), MAX_BLOCK_K, tile)
    block_r = max(1, min(tile // block_v, next_power_of_2(R)))
    width = 2 if dtype == torch.float64 else 1  # registers per value
    return block_r, block_v, num_warps(block_r * block_v * width)


def linear_kl_rows(z, t, labels, w_kl, w_ce, T, hard_weight, grad):
    """stats (4, R) [shift_s, log z_s, KL_row, CE_row] of logits z (R, V), rows contiguous
    (logsumexp(z / T) = shift_s + log z_s); with grad, z is overwritten by dz (see the
    module docstring).

    t: dense teacher logits (R, V) or None; labels (R,) int64 or None (no hard term);
    w_kl, w_ce: (R,) row weights in the accumulation dtype (float32, float64 for float64
    inputs), which stats take; read only with grad.
    """
    R, V = z.shape
    stats = torch.empty((4, R), device=z.device, dtype=w_kl.dtype)
    block_r, block_v, warps = _blocks(R, V, w_kl.dtype)
    _linear_kl_rows_kernel[(cdiv(R, block_r),)](
        z, t if t is not None else z, labels if labels is not None else z, w_kl, w_ce, stats,
        float(T), float(hard_weight), R, V, z.stride(0), t.stride(0) if t is not None else 0,
        BLOCK_R=block_r, BLOCK_V=block_v, DENSE=t is not None, HARD=labels is not None, GRAD=grad,
        num_warps=warps)
    return stats


# --- FusedLinearDistillation's divergences (fastkd/chunked_linear.py, divergence_terms, has
# the table this kernel follows; fastkd/reference/divergences.py the math) ------------------

# Divergence name -> the DIV constant of the kernel below.
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5}


@triton.jit
def _online_step(m, s, x):
    """Running max m and sum s = sum exp(x - shift(m)) of a row, with one more block x."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    c_new = _shift(m_new)
    return m_new, s * tl.exp(m - c_new) + tl.sum(tl.exp(x - c_new[:, None]), axis=1)


@triton.jit
def _log_mix(la, lb):
    """log(exp(la) + exp(lb)), -inf where both are."""
    mx = tl.maximum(la, lb)
    mn = tl.minimum(la, lb)
    return tl.where(mx == float("-inf"), mx, mx + tl.log(1.0 + tl.exp(mn - mx)))


@triton.jit
def _divergence_terms(lp, lq, log_w, log_1mw, w, DIV: tl.constexpr):
    """(t, q g) per element of the teacher's and student's log-probabilities lp, lq: the
    term of D (D = sum t) and q times dD/dq (less a constant), formed without g where g is
    singular (chunked_linear.divergence_terms' table); w the mixing coefficient (beta for
    jsd, alpha for the skew divergences), log_w and log_1mw its log and log(1 - w)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == 0:
        t = tl.where(p > 0, p * (lp - lq), 0.0)
        qg = -p
    elif DIV == 1:
        t = tl.where(q > 0, q * (lq - lp), 0.0)
        qg = t
    elif DIV == 2:
        lm = _log_mix(lp + log_w, lq + log_1mw)
        q_part = tl.where(q > 0, q * (lq - lm), 0.0)
        t = w * tl.where(p > 0, p * (lp - lm), 0.0) + (1.0 - w) * q_part
        qg = (1.0 - w) * q_part
    elif DIV == 3:
        lm = _log_mix(lp + log_w, lq + log_1mw)
        t = tl.where(p > 0, p * (lp - lm), 0.0)
        qg = -(1.0 - w) * tl.where(p > 0, tl.exp(lq + lp - lm), 0.0)
    elif DIV == 4:
        lm = _log_mix(lq + log_w, lp + log_1mw)
        t = tl.where(q > 0, q * (lq - lm), 0.0)
        qg = t - w * tl.where(q > 0, tl.exp(2.0 * lq - lm), 0.0)
    else:
        t = 0.5 * tl.abs(p - q)
        qg = q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    return t, qg


@triton.jit
def _linear_divergence_rows_kernel(
    z_ptr, t_ptr, label_ptr, w_kl_ptr, w_ce_ptr, stats_ptr, T: tl.float64, hard_weight: tl.float64,
    w_mix: tl.float64, log_w: tl.float64, log_1mw: tl.float64, R, V, z_stride, t_stride,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, DIV: tl.constexpr, HARD: tl.constexpr, GRAD: tl.constexpr,
):
    """stats (4, R) as _linear_kl_rows_kernel's, D_row in KL_row's place, for a dense teacher
    t: three passes over the row's classes, the student's and teacher's (and with HARD the
    temperature-1) log-normalisers online, then D_row and S = sum q g, then (GRAD) dz =
    w_kl T (q g - q S) + w_ce hard_weight (softmax(z) - onehot(label)) written over z."""
    acc_t = stats_ptr.dtype.element_ty
    T = to_acc(T, acc_t)
    inv_T = 1.0 / T
    hw = to_acc(hard_weight, acc_t)
    w = to_acc(w_mix, acc_t)
    lw = to_acc(log_w, acc_t)
    l1w = to_acc(log_1mw, acc_t)
    neg_inf = float("-inf")
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    z_row = z_ptr + rows * z_stride
    t_row = t_ptr + rows * t_stride
    if HARD:
        label = tl.load(label_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        label_ok = row_ok & (label >= 0) & (label < V)
    m_s = tl.full((BLOCK_R,), neg_inf, acc_t)
    m_t = tl.full((BLOCK_R,), neg_inf, acc_t)
    m_1 = tl.full((BLOCK_R,), neg_inf, acc_t)
    z_s = tl.zeros((BLOCK_R,), acc_t)
    z_t = tl.zeros((BLOCK_R,), acc_t)
    z_1 = tl.zeros((BLOCK_R,), acc_t)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = row_ok[:, None] & (cols < V)[None, :]
        zs = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t)
        xt = tl.load(t_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t) * inv_T
        m_s, z_s = _online_step(m_s, z_s, zs * inv_T)
        m_t, z_t = _online_step(m_t, z_t, xt)
        if HARD:
            m_1, z_1 = _online_step(m_1, z_1, zs)
    c_s, log_z_s = _shift(m_s), tl.log(z_s)
    c_t, log_z_t = _shift(m_t), tl.log(z_t)
    d = tl.zeros((BLOCK_R,), acc_t)
    s = tl.zeros((BLOCK_R,), acc_t)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = row_ok[:, None] & (cols < V)[None, :]
        zs = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t)
        xt = tl.load(t_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t) * inv_T
        lq = (zs * inv_T - c_s[:, None]) - log_z_s[:, None]
        lp = (xt - c_t[:, None]) - log_z_t[:, None]
        term, qg = _divergence_terms(lp, lq, lw, l1w, w, DIV)
        d += tl.sum(tl.where(mask, term, 0.0), axis=1)
        if GRAD:
            s += tl.sum(tl.where(mask, qg, 0.0), axis=1)
    out = stats_ptr + rows
    tl.store(out, c_s, mask=row_ok)
    out += R
    tl.store(out, log_z_s, mask=row_ok)
    out += R
    tl.store(out, tl.where(d < 0, 0.0, d), mask=row_ok)  # the exact D_row is >= 0
    out += R
    ce = tl.zeros((BLOCK_R,), acc_t)
    if HARD:
        c_1, log_z_1 = _shift(m_1), tl.log(z_1)
        z_label = tl.load(z_row + label, mask=label_ok, other=0.0).to(acc_t)
        ce = tl.where(label_ok, (c_1 - z_label) + log_z_1, 0.0)
    tl.store(out, ce, mask=row_ok)

    if GRAD:
        w_kl = tl.load(w_kl_ptr + rows, mask=row_ok, other=0.0).to(acc_t) * T
        w_ce = tl.load(w_ce_ptr + rows, mask=row_ok, other=0.0).to(acc_t) * hw
        live = (w_kl != 0) | (w_ce != 0)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask = row_ok[:, None] & (cols < V)[None, :]
            zs = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t)
            xt = tl.load(t_row[:, None] + cols[None, :], mask=mask, other=neg_inf).to(acc_t) * inv_T
            lq = (zs * inv_T - c_s[:, None]) - log_z_s[:, None]
            lp = (xt - c_t[:, None]) - log_z_t[:, None]
            term, qg = _divergence_terms(lp, lq, lw, l1w, w, DIV)
            dz = w_kl[:, None] * (qg - tl.exp(lq) * s[:, None])
            if HARD:
                p_1 = tl.exp((zs - c_1[:, None]) - log_z_1[:, None])
                dz += w_ce[:, None] * (p_1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
            dz = tl.where(live[:, None], dz, 0.0)
            tl.store(z_row[:, None] + cols[None, :], dz.to(z_ptr.dtype.element_ty), mask=mask)


def linear_divergence_rows(z, t, labels, w_kl, w_ce, T, hard_weight, grad, spec):
    """linear_kl_rows for a chunked_linear.Divergence spec and a dense teacher t (R, V):
    stats (4, R) [shift_s, log z_s, D_row, CE_row]; with grad, z is overwritten by
    w_kl T dD/dx + the hard term's gradient."""
    R, V = z.shape
    stats = torch.empty((4, R), device=z.device, dtype=w_kl.dtype)
    block_r, block_v, warps = _blocks(R, V, w_kl.dtype)
    w = spec.beta if spec.name == "jsd" else spec.alpha
    log_w = math.log(w) if w > 0 else float("-inf")
    log_1mw = math.log1p(-w) if w < 1 else float("-inf")
    _linear_divergence_rows_kernel[(cdiv(R, block_r),)](
        z, t, labels if labels is not None else z, w_kl, w_ce, stats, float(T), float(hard_weight), float(w),
        log_w, log_1mw, R, V, z.stride(0), t.stride(0),
        BLOCK_R=block_r, BLOCK_V=block_v, DIV=DIVERGENCE_CODES[spec.name], HARD=labels is not None, GRAD=grad,
        num_warps=warps)
    return stats
