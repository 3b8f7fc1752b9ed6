"""Triton kernels of IRG's transformation term: one squared distance per sample between two
maps of the same network, d_i = |a_i - b'_i|^2, read through the maps' strides.

It has a file of its own: it builds no (N, N) matrix (no Gram matrix, no squared distances
between samples), so it shares none of the tiles of IRG's edge term (fastkd/kernels/
distance.py) or of the other pairwise losses, only `_cast` (fastkd/kernels/gram.py).
Its distances sum in float64, as every pairwise sum.
"""
import torch
import triton
import triton.language as tl

from .common import cdiv
from .gram import _cast


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


BLOCK_N = 1024  # samples per step of the one-program loss kernel


@triton.jit
def _transformation_loss_kernel(ds_ptr, dt_ptr, loss_ptr, dds_ptr, ddt_ptr, N, scale: tl.float64,
                                BLOCK: tl.constexpr):
    """One program over the N distances of each side (float64): with c = max(d, 1e-12),
    top = max(c) and T = c / top, loss = mean (T_s - T_t)^2 in loss's dtype, and at
    grad_output 1 dd = dL/dd (N,) on each side: with g = +-scale (T_s - T_t) (scale = 2 / N),
    dd = (g / top - [c = top] sum(g c) / top^2 / count(c = top)) [d >= 1e-12] (max()'s
    gradient shared evenly among the entries equal to it, as torch's)."""
    top_s = tl.zeros([BLOCK], dtype=tl.float64)
    top_t = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        top_s = tl.maximum(top_s, tl.maximum(tl.load(ds_ptr + i, mask=i < N, other=0.0), 1e-12))
        top_t = tl.maximum(top_t, tl.maximum(tl.load(dt_ptr + i, mask=i < N, other=0.0), 1e-12))
    top_s = tl.max(top_s, 0)
    top_t = tl.max(top_t, 0)
    sq = tl.zeros([BLOCK], dtype=tl.float64)
    gc_s = tl.zeros([BLOCK], dtype=tl.float64)
    gc_t = tl.zeros([BLOCK], dtype=tl.float64)
    n_s = tl.zeros([BLOCK], dtype=tl.float64)
    n_t = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < N
        c_s = tl.maximum(tl.load(ds_ptr + i, mask=ok, other=0.0), 1e-12)
        c_t = tl.maximum(tl.load(dt_ptr + i, mask=ok, other=0.0), 1e-12)
        diff = tl.where(ok, c_s / top_s - c_t / top_t, 0.0)
        g = diff * scale
        sq += diff * diff
        gc_s += g * c_s
        gc_t -= g * c_t
        n_s += tl.where(ok & (c_s == top_s), 1.0, 0.0)
        n_t += tl.where(ok & (c_t == top_t), 1.0, 0.0)
    tl.store(loss_ptr, _cast(tl.sum(sq, 0) / N, loss_ptr.dtype.element_ty))
    share_s = tl.sum(gc_s, 0) / (top_s * top_s) / tl.sum(n_s, 0)
    share_t = tl.sum(gc_t, 0) / (top_t * top_t) / tl.sum(n_t, 0)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < N
        d_s = tl.load(ds_ptr + i, mask=ok, other=0.0)
        d_t = tl.load(dt_ptr + i, mask=ok, other=0.0)
        c_s = tl.maximum(d_s, 1e-12)
        c_t = tl.maximum(d_t, 1e-12)
        g = (c_s / top_s - c_t / top_t) * scale
        dd_s = (g / top_s - tl.where(c_s == top_s, share_s, 0.0)) * (d_s >= 1e-12).to(tl.float64)
        dd_t = (-g / top_t - tl.where(c_t == top_t, share_t, 0.0)) * (d_t >= 1e-12).to(tl.float64)
        tl.store(dds_ptr + i, dd_s, mask=ok)
        tl.store(ddt_ptr + i, dd_t, mask=ok)


def transformation_loss(d_s, d_t, dtype):
    """(loss in dtype, dd_s, dd_t): mse(T_s, T_t), T = max(d, 1e-12) / max(max(d, 1e-12)), from
    the distances d_* (N,) float64, and its gradients dL/dd_* at grad_output 1 (one launch)."""
    n = len(d_s)
    loss = torch.empty((), dtype=dtype, device=d_s.device)
    dd_s, dd_t = torch.empty_like(d_s), torch.empty_like(d_t)
    _transformation_loss_kernel[(1,)](d_s, d_t, loss, dd_s, dd_t, n, 2.0 / n, BLOCK=BLOCK_N)
    return loss, dd_s, dd_t


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
    _transformation_grad_kernel[(cdiv(v, BLOCK_V), n)](
        *_map_args(a), *_map_args(b), dd, dd if da is None else da, dd if db is None else db, v,
        HALVE=a.size(1) < b.size(1), A_GRAD=a_grad, B_GRAD=b_grad, BLOCK_V=BLOCK_V)
    return da, db
