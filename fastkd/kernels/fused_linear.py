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
