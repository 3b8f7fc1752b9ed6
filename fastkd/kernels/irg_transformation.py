"""Triton kernels of IRG's transformation term: one squared distance per sample between two
maps of the same network, d_i = |a_i - b'_i|^2, read through the maps' strides.

It has a file of its own: it builds no (N, N) matrix (no Gram matrix, no squared distances
between samples), so it shares none of the tiles of IRG's edge term (fastkd/kernels/
distance.py) or of the other pairwise losses, only `_cast` (fastkd/kernels/gram.py).
Float64 maps: the distances and the loss in float64. Float32, bfloat16 and float16 maps:
float32 arithmetic, double-float where the loss cancels (see the float32 path below).
"""
import torch
import triton
import triton.language as tl

from .common import NO_FMA, cdiv, dd_div, dd_sum, two_prod, two_sum
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


# The float32 path (float32, bfloat16 and float16 maps): d = hi + lo, each difference
# a - b' carried exactly as a pair of float32 (b' = (b_even + b_odd) / 2 by two_sum, halved
# exactly), each square split exactly and the sum compensated (2^-48); then the loss as the
# float64 one, in float32 with double-float where it cancels (_transformation_split_loss_kernel).

@triton.jit
def _transformation_difference_split(a_ptr, a_strides, a_dims, b_ptr, b_strides, b_dims, i, f, ok,
                                     HALVE: tl.constexpr):
    """a_i[f] - b'_i[f] as (hi, lo) float32, exact but for lo's rounding (0 where not ok)."""
    sa_n, sa_c, sa_h, sa_w = a_strides
    sb_n, sb_c, sb_h, sb_w = b_strides
    a = tl.load(a_ptr + i * sa_n + _map_offset(f, a_dims[0], a_dims[1], sa_c, sa_h, sa_w),
                mask=ok, other=0.0).to(tl.float32)
    if HALVE:
        even = b_ptr + i * sb_n + _map_offset(f, b_dims[0], b_dims[1], 2 * sb_c, sb_h, sb_w)
        b, b_lo = two_sum(tl.load(even, mask=ok, other=0.0).to(tl.float32),
                          tl.load(even + sb_c, mask=ok, other=0.0).to(tl.float32))
        d, d_err = two_sum(a, -0.5 * b)
        return d, d_err - 0.5 * b_lo
    else:
        b = tl.load(b_ptr + i * sb_n + _map_offset(f, b_dims[0], b_dims[1], sb_c, sb_h, sb_w),
                    mask=ok, other=0.0).to(tl.float32)
        return two_sum(a, -b)


@triton.jit
def _transformation_split_distance_kernel(a_ptr, sa_n, sa_c, sa_h, sa_w, hw_a, w_a,
                                          b_ptr, sb_n, sb_c, sb_h, sb_w, hw_b, w_b, hi_ptr, lo_ptr, V,
                                          HALVE: tl.constexpr, BLOCK_V: tl.constexpr):
    """d[i] = hi[i] + lo[i] = sum_f (a_i[f] - b'_i[f])^2 for sample i = program 0, in float32
    arithmetic (see above), unclamped."""
    i = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        f = start + tl.arange(0, BLOCK_V).to(tl.int64)
        d, d_lo = _transformation_difference_split(a_ptr, (sa_n, sa_c, sa_h, sa_w), (hw_a, w_a),
                                                   b_ptr, (sb_n, sb_c, sb_h, sb_w), (hw_b, w_b), i, f, f < V,
                                                   HALVE)
        p, p_err = two_prod(d, d)
        acc, err = two_sum(acc, p)
        acc_lo += err + (p_err + 2 * d * d_lo)
    hi, lo = dd_sum(acc, acc_lo, 0)
    tl.store(hi_ptr + i, hi)
    tl.store(lo_ptr + i, lo)


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


@triton.jit
def _lex_max(a, a_lo, b, b_lo):
    """The larger of (a, a_lo) and (b, b_lo) by hi, then lo: a tl.reduce combine."""
    take = (b > a) | ((b == a) & (b_lo > a_lo))
    return tl.where(take, b, a), tl.where(take, b_lo, a_lo)


@triton.jit
def _clamped_split(hi_ptr, lo_ptr, i, ok):
    """(c, c_lo, d): c = max(d, 1e-12) for d = hi + lo at the samples i (0 where not ok), lo 0
    where clamped; d's hi part."""
    d = tl.load(hi_ptr + i, mask=ok, other=0.0)
    live = d >= 1e-12
    return tl.where(live, d, 1e-12), tl.where(live, tl.load(lo_ptr + i, mask=ok, other=0.0), 0.0), d


@triton.jit
def _split_ratio_diff(c_s, c_s_lo, top_s, top_s_lo, c_t, c_t_lo, top_t, top_t_lo):
    """c_s / top_s - c_t / top_t from double-float values, rounded once."""
    q_s, q_s_lo = dd_div(c_s, c_s_lo, top_s, top_s_lo)
    q_t, q_t_lo = dd_div(c_t, c_t_lo, top_t, top_t_lo)
    q, q_err = two_sum(q_s, -q_t)
    return q + (q_err + (q_s_lo - q_t_lo))


@triton.jit
def _transformation_split_loss_kernel(ds_ptr, ds_lo_ptr, dt_ptr, dt_lo_ptr, loss_ptr, dds_ptr, ddt_ptr, N,
                                      scale, BLOCK: tl.constexpr):
    """_transformation_loss_kernel on the float32 path: d = hi + lo (N,) on each side, dd
    (N,) float32. The maxima by (hi, lo) (two distances that round to one float32 value are
    told apart, so the max's gradient goes where the reference's does) and T_s - T_t in
    double-float, rounded once (near a zero loss the ratios agree to 1e-3, and each one's
    float32 rounding would be the size of the loss's own error); the rest in float32."""
    top_s = tl.zeros([BLOCK], dtype=tl.float32)
    top_s_lo = tl.zeros([BLOCK], dtype=tl.float32)
    top_t = tl.zeros([BLOCK], dtype=tl.float32)
    top_t_lo = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        c_s, c_s_lo, d_s = _clamped_split(ds_ptr, ds_lo_ptr, i, i < N)
        c_t, c_t_lo, d_t = _clamped_split(dt_ptr, dt_lo_ptr, i, i < N)
        top_s, top_s_lo = _lex_max(top_s, top_s_lo, c_s, c_s_lo)
        top_t, top_t_lo = _lex_max(top_t, top_t_lo, c_t, c_t_lo)
    top_s, top_s_lo = tl.reduce((top_s, top_s_lo), 0, _lex_max)
    top_t, top_t_lo = tl.reduce((top_t, top_t_lo), 0, _lex_max)
    # The max's share of the gradient, -sum_i g_i c_i / top^2 / count, is summed apart at the
    # maxima (where c_i / top = 1) and elsewhere, so that at a maximum g / top and the share's
    # own g / top cancel exactly (as torch's division backward, (c / top) / top, has them),
    # not to the float32 rounding of their sum.
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    gm_s = tl.zeros([BLOCK], dtype=tl.float32)
    gm_t = tl.zeros([BLOCK], dtype=tl.float32)
    gc_s = tl.zeros([BLOCK], dtype=tl.float32)
    gc_t = tl.zeros([BLOCK], dtype=tl.float32)
    n_s = tl.zeros([BLOCK], dtype=tl.float32)
    n_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < N
        c_s, c_s_lo, d_s = _clamped_split(ds_ptr, ds_lo_ptr, i, ok)
        c_t, c_t_lo, d_t = _clamped_split(dt_ptr, dt_lo_ptr, i, ok)
        diff = tl.where(ok, _split_ratio_diff(c_s, c_s_lo, top_s, top_s_lo, c_t, c_t_lo, top_t, top_t_lo), 0.0)
        g = diff * scale
        sq += diff * diff
        max_s = ok & (c_s == top_s) & (c_s_lo == top_s_lo)
        max_t = ok & (c_t == top_t) & (c_t_lo == top_t_lo)
        gm_s += tl.where(max_s, g, 0.0)
        gm_t -= tl.where(max_t, g, 0.0)
        gc_s += tl.where(ok & ~max_s, g * (c_s / top_s), 0.0)
        gc_t -= tl.where(ok & ~max_t, g * (c_t / top_t), 0.0)
        n_s += tl.where(max_s, 1.0, 0.0)
        n_t += tl.where(max_t, 1.0, 0.0)
    tl.store(loss_ptr, _cast(tl.sum(sq, 0) / N, loss_ptr.dtype.element_ty))
    count_s = tl.sum(n_s, 0)
    count_t = tl.sum(n_t, 0)
    mean_s = tl.sum(gm_s, 0) / count_s
    mean_t = tl.sum(gm_t, 0) / count_t
    rest_s = tl.sum(gc_s, 0) / top_s / count_s
    rest_t = tl.sum(gc_t, 0) / top_t / count_t
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < N
        c_s, c_s_lo, d_s = _clamped_split(ds_ptr, ds_lo_ptr, i, ok)
        c_t, c_t_lo, d_t = _clamped_split(dt_ptr, dt_lo_ptr, i, ok)
        g = _split_ratio_diff(c_s, c_s_lo, top_s, top_s_lo, c_t, c_t_lo, top_t, top_t_lo) * scale
        dd_s = tl.where((c_s == top_s) & (c_s_lo == top_s_lo), (g - mean_s) / top_s - rest_s, g / top_s) \
            * (d_s >= 1e-12).to(tl.float32)
        dd_t = tl.where((c_t == top_t) & (c_t_lo == top_t_lo), (-g - mean_t) / top_t - rest_t, -g / top_t) \
            * (d_t >= 1e-12).to(tl.float32)
        tl.store(dds_ptr + i, dd_s, mask=ok)
        tl.store(ddt_ptr + i, dd_t, mask=ok)


def transformation_split_loss(d_s, d_t, dtype):
    """transformation_loss on the float32 path: d_* = (hi, lo) (N,) float32 each
    (transformation_distances_split); dd_* float32."""
    n = len(d_s[0])
    loss = torch.empty((), dtype=dtype, device=d_s[0].device)
    dd_s, dd_t = torch.empty_like(d_s[0]), torch.empty_like(d_t[0])
    _transformation_split_loss_kernel[(1,)](*d_s, *d_t, loss, dd_s, dd_t, n, 2.0 / n, BLOCK=BLOCK_N, **NO_FMA)
    return loss, dd_s, dd_t


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


def transformation_distances_split(a, b):
    """transformation_distances in float32 arithmetic, for float32, bfloat16 and float16
    maps: (hi, lo) (N,) float32 each, d = hi + lo to about 2^-48."""
    n, v = a.size(0), a[0].numel()
    hi = torch.empty(n, dtype=torch.float32, device=a.device)
    lo = torch.empty_like(hi)
    _transformation_split_distance_kernel[(n,)](*_map_args(a), *_map_args(b), hi, lo, v,
                                                HALVE=a.size(1) < b.size(1), BLOCK_V=BLOCK_V, **NO_FMA)
    return hi, lo


def transformation_grads(a, b, dd, a_grad, b_grad):
    """(dL/da or None, dL/db or None) from dd = dL/dd (N,), shaped and typed like a and b; in
    dd's dtype (float32 on the float32 path: float32 arithmetic)."""
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
