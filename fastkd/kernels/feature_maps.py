"""Triton kernels of the feature-map losses AT, NST and FSP, with their launchers.

Every map is handled as (B, C, HW) through its strides (any layout whose H and W
merge into one stride, e.g. contiguous or channels_last, is read in place).
Accumulation is in fp32, or fp64 for fp64 inputs: the dtype of the fp32/fp64
buffer a kernel writes decides it. Float arguments are fp64 (``tl.float64``) so that
fp64 runs keep every digit; grids are 1-d (axis 0 allows 2^31 - 1 programs, axes 1
and 2 only 65535), each program finding its (sample, tile) from its id.

AT   A = sum_c |f|^p per (b, hw): one pass over each map (``at_maps``), then a small
     kernel over the (B, HW) maps for the norms and the squared difference
     (``at_loss``), each map divided by max(||A|| + eps, min_norm): the collection's
     ||A|| + 1e-6 (min_norm 0), or F.normalize's max(||A||, 1e-12) of the channel mean
     A / C, which is A / max(||A||, C 1e-12) (eps 0, min_norm C 1e-12 per side).
     Backward: ``at_grad_maps`` on the small maps, then one pass over each feature map
     (``at_grad_features``).
NST  and FSP start from batched Gram products S = X Y^T (``gram``); their backward is a
     batched product out = M X (``matrix_times_maps``): a (C x C) matrix times the maps
     for FSP and NST's (C x C) form, while NST's (HW x HW) form passes the normalised
     maps z (B, C, HW) as M and P (B, HW, HW) as X, for u = z P. The products run on the
     tensor cores in every dtype: bf16/fp16 operands of one dtype go to tl.dot as they are
     (exact products, fp32 sums), fp64 ones as fp64 products (DMMA), and fp32 ones through
     the tf32x3 split of ``common.dot_f32`` (a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, each part a
     tf32 value; error <= 3 * 2^-22 |a b| per product, docs/numerics.md).
"""
import os

import torch
import triton
import triton.language as tl

from .common import NO_FMA, as_3d, cdiv, chunked, div, dot_f32, sqrt, to_acc


# --- AT ----------------------------------------------------------------------------

@triton.jit
def _at_map_kernel(f, a, B, C, HW, CHANNELS, sfb, sfc, sfk, p: tl.float64, P_IS_2: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # a[j, b, hw] = sum over chunk j's channels c of |f[b, c, hw]|^p, one program per (b, block
    # of hw) and chunk j of CHANNELS channels, program_id(1) (at_channel_chunks).
    tiles = tl.cdiv(HW, BLOCK_HW)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    hw = (tl.program_id(0) % tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    base = f + b * sfb + hw.to(tl.int64)[None, :] * sfk
    first = tl.program_id(1) * CHANNELS
    acc = tl.zeros([BLOCK_HW], dtype=a.dtype.element_ty)
    for c0 in range(first, tl.minimum(first + CHANNELS, C), BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & hw_mask[None, :]
        x = tl.abs(tl.load(base + c.to(tl.int64)[:, None] * sfc, mask=mask, other=0.0).to(acc.dtype))
        if P_IS_2:
            v = x * x
        else:
            # |x|^p = exp(p log|x|) in fp64: in fp32 the rounding of log|x| is amplified by p.
            x64 = tl.where(x > 0, x, 1.0).to(tl.float64)
            v = tl.where(x > 0, tl.exp(p * tl.log(x64)).to(acc.dtype), 0.0)
        acc += tl.sum(v, axis=0)
    tl.store(a + (tl.program_id(1) * B + b) * HW + hw, acc, mask=hw_mask)


@triton.jit
def _at_values(a_s, a_t, b, HW, k0, BLOCK_HW: tl.constexpr):
    # (k, k < HW, A_s, A_t): sample b's attention-map values k0:k0 + BLOCK_HW (0 past HW).
    k = k0 + tl.arange(0, BLOCK_HW)
    m = k < HW
    return k, m, tl.load(a_s + b * HW + k, mask=m, other=0.0), tl.load(a_t + b * HW + k, mask=m, other=0.0)


@triton.jit
def _at_difference(xs, xt, den_s, den_t):
    # G = A_s / d_s - A_t / d_t, each map divided as the reference divides it (correctly rounded,
    # common.div): by a rounded reciprocal instead, its rounding is one factor on a whole map,
    # which with maps near a common offset (1e3 + noise) left the loss 50x the reference's error.
    return div(xs, den_s) - div(xt, den_t)


@triton.jit
def _at_loss_kernel(a_s, a_t, norms, partial, HW, eps: tl.float64, min_s: tl.float64, min_t: tl.float64,
                    BLOCK_HW: tl.constexpr):
    # Per sample b: n = ||A||_2 over hw for s and t, then sum_hw (A_s / d_s - A_t / d_t)^2,
    # d = max(n + eps, min_norm) (n + eps where min_norm is 0).
    b = tl.program_id(0).to(tl.int64)
    eps = to_acc(eps, partial.dtype.element_ty)
    min_s = to_acc(min_s, partial.dtype.element_ty)
    min_t = to_acc(min_t, partial.dtype.element_ty)
    ss = tl.zeros([BLOCK_HW], dtype=partial.dtype.element_ty)
    tt = tl.zeros([BLOCK_HW], dtype=partial.dtype.element_ty)
    for k0 in range(0, HW, BLOCK_HW):
        _, _, xs, xt = _at_values(a_s, a_t, b, HW, k0, BLOCK_HW)
        ss += xs * xs
        tt += xt * xt
    n_s = sqrt(tl.sum(ss, axis=0))
    n_t = sqrt(tl.sum(tt, axis=0))
    d_s = n_s + eps
    d_t = n_t + eps
    den_s = tl.where(d_s < min_s, min_s, d_s)  # a NaN norm stays NaN, as clamp_min's
    den_t = tl.where(d_t < min_t, min_t, d_t)
    acc = tl.zeros([BLOCK_HW], dtype=partial.dtype.element_ty)
    for k0 in range(0, HW, BLOCK_HW):
        _, _, xs, xt = _at_values(a_s, a_t, b, HW, k0, BLOCK_HW)
        d = _at_difference(xs, xt, den_s, den_t)
        acc += d * d
    tl.store(partial + b, tl.sum(acc, axis=0))
    tl.store(norms + 2 * b, n_s)
    tl.store(norms + 2 * b + 1, n_t)


@triton.jit
def _at_grad_map_kernel(a_s, a_t, norms, grad_out, ga_s, ga_t, HW, eps: tl.float64, min_s: tl.float64,
                        min_t: tl.float64, scale: tl.float64, BLOCK_HW: tl.constexpr):
    # With G = am_s - am_t, d = max(n + eps, min_norm) and k = grad_out * scale (scale = 2 / (B HW)):
    #   dA_s = k (G / d_s - A_s (G . A_s) / (n_s d_s^2)), the second term 0 when n_s = 0 or the
    #   clamp holds (n_s + eps < min_s: clamp_min passes no gradient to the norm there);
    #   dA_t = -k (G / d_t - A_t (G . A_t) / (n_t d_t^2)), likewise.
    b = tl.program_id(0).to(tl.int64)
    eps = to_acc(eps, ga_s.dtype.element_ty)
    min_s = to_acc(min_s, ga_s.dtype.element_ty)
    min_t = to_acc(min_t, ga_s.dtype.element_ty)
    scale = to_acc(scale, ga_s.dtype.element_ty)
    n_s = tl.load(norms + 2 * b)
    n_t = tl.load(norms + 2 * b + 1)
    d_s = n_s + eps
    d_t = n_t + eps
    den_s = tl.where(d_s < min_s, min_s, d_s)
    den_t = tl.where(d_t < min_t, min_t, d_t)
    inv_s = 1.0 / den_s
    inv_t = 1.0 / den_t
    live_s = (n_s > 0) & (d_s >= min_s)
    live_t = (n_t > 0) & (d_t >= min_t)
    dot_s = tl.zeros([BLOCK_HW], dtype=ga_s.dtype.element_ty)
    dot_t = tl.zeros([BLOCK_HW], dtype=ga_s.dtype.element_ty)
    for k0 in range(0, HW, BLOCK_HW):
        _, _, xs, xt = _at_values(a_s, a_t, b, HW, k0, BLOCK_HW)
        g = _at_difference(xs, xt, den_s, den_t)
        dot_s += g * xs
        dot_t += g * xt
    k_out = tl.load(grad_out).to(ga_s.dtype.element_ty) * scale
    c_s = tl.where(live_s, tl.sum(dot_s, axis=0) * inv_s * inv_s / tl.where(live_s, n_s, 1.0), 0.0)
    c_t = tl.where(live_t, tl.sum(dot_t, axis=0) * inv_t * inv_t / tl.where(live_t, n_t, 1.0), 0.0)
    for k0 in range(0, HW, BLOCK_HW):
        k, m, xs, xt = _at_values(a_s, a_t, b, HW, k0, BLOCK_HW)
        g = _at_difference(xs, xt, den_s, den_t)
        tl.store(ga_s + b * HW + k, k_out * (g * inv_s - xs * c_s), mask=m)
        tl.store(ga_t + b * HW + k, -k_out * (g * inv_t - xt * c_t), mask=m)


@triton.jit
def _at_grad_feature_kernel(f, ga, df, C, HW, CHANNELS, sfb, sfc, sfk, p: tl.float64, P_IS_2: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # df = dA * d|f|^p/df = dA * p |f|^(p-1) sign(f) (0 where f = 0); df is contiguous (B, C, HW).
    # One program per (b, block of hw) and chunk of CHANNELS channels, program_id(1).
    tiles = tl.cdiv(HW, BLOCK_HW)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    hw = (tl.program_id(0) % tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    g = tl.load(ga + b * HW + hw, mask=hw_mask, other=0.0)
    first = tl.program_id(1) * CHANNELS
    for c0 in range(first, tl.minimum(first + CHANNELS, C), BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (c < C)[:, None] & hw_mask[None, :]
        x = tl.load(f + b * sfb + c[:, None] * sfc + hw.to(tl.int64)[None, :] * sfk,
                    mask=mask, other=0.0).to(g.dtype)
        if P_IS_2:
            d = 2.0 * x
        else:
            ax = tl.where(x != 0, tl.abs(x), 1.0).to(tl.float64)
            d = tl.where(x != 0, (p * tl.exp((p - 1.0) * tl.log(ax))).to(g.dtype) * tl.where(x > 0, 1.0, -1.0),
                         0.0)
        tl.store(df + (b * C + c[:, None]) * HW + hw[None, :], (g[None, :] * d).to(df.dtype.element_ty),
                 mask=mask)


_AT_BLOCK_C = 16
_AT_BLOCK_HW = 64
# The map kernels run a program per (sample, block of 64 positions), each over every channel:
# at ResNet's last layers (B = 256, 2048 x 7 x 7) that is 256 programs, a few per SM. The
# channels are then cut into chunks, a program each, for about _AT_PROGRAMS programs of at
# least _AT_MIN_CHANNELS channels; the maps' chunk sums are added after (in chunk order).
_AT_PROGRAMS = 2048
_AT_MIN_CHANNELS = 64


def at_channel_chunks(B, C, HW):
    """(channels per program, chunks) of the map kernels over (B, C, HW) maps."""
    return chunked(B * cdiv(HW, _AT_BLOCK_HW), C, _AT_PROGRAMS, _AT_MIN_CHANNELS, _AT_BLOCK_C)


def at_maps(fm, p, dtype):
    """A = sum_c |fm|^p as a (B, HW) tensor of dtype (fp32 or fp64); fm (B, C, H, W)."""
    x = as_3d(fm)
    B, C, HW = x.shape
    channels, chunks = at_channel_chunks(B, C, HW)
    a = torch.empty((chunks, B, HW), dtype=dtype, device=fm.device)
    grid = (B * cdiv(HW, _AT_BLOCK_HW), chunks)
    _at_map_kernel[grid](x, a, B, C, HW, channels, *x.stride(), float(p), P_IS_2=(p == 2),
                         BLOCK_C=_AT_BLOCK_C, BLOCK_HW=_AT_BLOCK_HW)
    return a[0] if chunks == 1 else a.sum(0)


def at_loss(a_s, a_t, eps=1e-6, min_norms=(0.0, 0.0)):
    """Per-sample sums of the squared difference of the normalised maps am = A / max(||A|| + eps,
    min_norm) (B,), and the norms (B, 2) of A_s and A_t; min_norms: (student's, teacher's)."""
    B, HW = a_s.shape
    partial = torch.empty(B, dtype=a_s.dtype, device=a_s.device)
    norms = torch.empty((B, 2), dtype=a_s.dtype, device=a_s.device)
    _at_loss_kernel[(B,)](a_s, a_t, norms, partial, HW, eps, *min_norms, BLOCK_HW=256, **NO_FMA)
    return partial, norms


def at_grad_maps(a_s, a_t, norms, grad_out, scale, eps=1e-6, min_norms=(0.0, 0.0)):
    """dL/dA_s and dL/dA_t (B, HW) of L = grad_out * (scale / 2) * sum (am_s - am_t)^2 (am as at_loss's)."""
    B, HW = a_s.shape
    ga_s = torch.empty_like(a_s)
    ga_t = torch.empty_like(a_t)
    _at_grad_map_kernel[(B,)](a_s, a_t, norms, grad_out, ga_s, ga_t, HW, eps, *min_norms, scale, BLOCK_HW=256,
                              **NO_FMA)
    return ga_s, ga_t


def at_grad_features(fm, ga, p):
    """dL/dfm (B, C, H, W) from dL/dA (B, HW)."""
    x = as_3d(fm)
    B, C, HW = x.shape
    df = torch.empty((B, C, HW), dtype=fm.dtype, device=fm.device)
    channels, chunks = at_channel_chunks(B, C, HW)
    grid = (B * cdiv(HW, _AT_BLOCK_HW), chunks)
    _at_grad_feature_kernel[grid](x, ga, df, C, HW, channels, *x.stride(), float(p), P_IS_2=(p == 2),
                                  BLOCK_C=_AT_BLOCK_C, BLOCK_HW=_AT_BLOCK_HW)
    return df.view(fm.shape)


# --- batched Gram products (NST, FSP) ---------------------------------------------------

@triton.jit
def _mat_tile(acc, m, x, b, i, k, CI, CJ, K, smb, smi, smj, sxb, sxj, sxk, BLOCK_J: tl.constexpr,
              DIRECT: tl.constexpr):
    # acc[i, k] += sum_j m[b, i, j] x[b, j, k]. With x's two strides swapped it is the Gram
    # tile acc[i, k] += sum_j m[b, i, j] x[b, k, j]. DIRECT: m and x are bf16/fp16 of one dtype
    # and acc fp32, so they go to tl.dot as they are (tensor cores; the products are exact).
    # Otherwise an fp32 acc takes the tf32x3 products of dot_f32 (a bf16/fp16 operand, exact
    # in tf32, without its lo part), an fp64 acc IEEE fp64 products (DMMA on sm_80/sm_90).
    mb = m + b * smb + i.to(tl.int64)[:, None] * smi
    xb = x + b * sxb + k.to(tl.int64)[None, :] * sxk
    for j0 in range(0, CJ, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        jm = j < CJ
        mt = tl.load(mb + j[None, :] * smj, mask=(i < CI)[:, None] & jm[None, :], other=0.0)
        xt = tl.load(xb + j[:, None] * sxj, mask=jm[:, None] & (k < K)[None, :], other=0.0)
        if DIRECT:
            acc = tl.dot(mt, xt, acc)
        elif acc.dtype == tl.float32:
            acc = dot_f32(mt.to(tl.float32), xt.to(tl.float32), acc, mt.dtype != tl.float32,
                           xt.dtype != tl.float32)
        else:
            acc += tl.dot(mt.to(acc.dtype), xt.to(acc.dtype), input_precision="ieee")
    return acc


@triton.jit
def _batch_tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(b, rows, cols) of the program's output tile on a 1-D grid over B x (R, C) tiles: one
    grid axis, whose 2^31 - 1 programs lift the 65,535 limit of axes 1 and 2."""
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles = tl.cdiv(R, BLOCK_R) * tiles_c
    b = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, rows, cols


@triton.jit
def _gram_kernel(x1, y1, x2, y2, out, partial, CX, CY, K1, K2, scale1: tl.float64, scale2: tl.float64,
                 sx1b, sx1c, sx1k, sy1b, sy1c, sy1k, sx2b, sx2c, sx2k, sy2b, sy2c, sy2k,
                 TWO: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                 DIRECT: tl.constexpr):
    # out[b] = scale1 x1[b] y1[b]^T (+ scale2 x2[b] y2[b]^T when TWO), out contiguous (B, CX, CY);
    # partial[b, tile] = the sum of out^2 over the tile (FSP's fused squared error).
    b, i, j = _batch_tile(CX, CY, BLOCK_I, BLOCK_J)
    acc_t = out.dtype.element_ty
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=acc_t)
    acc = _mat_tile(acc, x1, y1, b, i, j, CX, K1, CY, sx1b, sx1c, sx1k, sy1b, sy1k, sy1c, BLOCK_K, DIRECT) * to_acc(
        scale1, acc_t)
    if TWO:
        acc2 = tl.zeros([BLOCK_I, BLOCK_J], dtype=acc_t)
        acc += _mat_tile(acc2, x2, y2, b, i, j, CX, K2, CY, sx2b, sx2c, sx2k, sy2b, sy2k, sy2c, BLOCK_K, DIRECT) * to_acc(
            scale2, acc_t)
    mask = (i < CX)[:, None] & (j < CY)[None, :]
    tl.store(out + (b * CX + i.to(tl.int64)[:, None]) * CY + j[None, :], acc, mask=mask)
    # partial is (B, tiles): entry b * tiles + tile is this program's id.
    tl.store(partial + tl.program_id(0), tl.sum(tl.sum(acc * acc, axis=1), axis=0))


# Tiles by accumulation dtype: (BLOCK_I, BLOCK_J, BLOCK_K, launch options). fp32 (tf32x3, or
# bf16/fp16 products): 64-row tiles, which sm_90 runs as wgmma, 32 columns and K steps of 16:
# the hi and lo operand tiles and the per-step product tile beside the accumulator take up to
# ~185 registers on sm_80 and sm_90 (Triton 3.6 and 3.9; 64 x 64 tiles reach 255). maxnreg:
# without a cap ptxas picks a register count of its own, as low as 96 for some
# specializations, and spills; a cap of 200 leaves it room (at 168 it spilled too).
# fp64 (DMMA): 32 x 32, whose accumulator and operands already fill the registers.
_GRAM_TILES = {torch.float32: (64, 32, 16, dict(num_warps=4, num_stages=3, maxnreg=200)),
               torch.float64: (32, 32, 32, dict(num_warps=4, num_stages=3))}


def _direct_dot(dtype, *maps):
    """Whether bf16/fp16 maps of one dtype go to tl.dot as they are (fp32 accumulation).
    Not bf16 under the interpreter, whose tl.dot multiplies bf16 bit patterns as integers."""
    first = maps[0].dtype
    if dtype != torch.float32 or first not in (torch.float16, torch.bfloat16):
        return False
    if first == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return all(x.dtype == first for x in maps)


def gram(dtype, x1, y1, scale1=1.0, x2=None, y2=None, scale2=0.0):
    """S = scale1 x1 y1^T (+ scale2 x2 y2^T), batched: x* (B, CX, K*), y* (B, CY, K*).

    Returns S as a (B, CX, CY) tensor of dtype (fp32 or fp64) and sum(S^2) per sample (B,).
    """
    B, CX, K1 = x1.shape
    CY = y1.shape[1]
    two = x2 is not None
    if not two:
        x2, y2 = x1, y1
    out = torch.empty((B, CX, CY), dtype=dtype, device=x1.device)
    block_i, block_j, block_k, launch = _GRAM_TILES[dtype]
    tiles = cdiv(CX, block_i) * cdiv(CY, block_j)
    partial = torch.empty((B, tiles), dtype=out.dtype, device=x1.device)
    _gram_kernel[(B * tiles,)](x1, y1, x2, y2, out, partial, CX, CY, K1, x2.shape[2], float(scale1), float(scale2),
                       *x1.stride(), *y1.stride(), *x2.stride(), *y2.stride(), TWO=two,
                       BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k,
                       DIRECT=_direct_dot(dtype, x1, y1, x2, y2), **launch, **NO_FMA)
    return out, partial.sum(1)


@triton.jit
def _mat_map_kernel(m1, x1, m2, x2, diag, y, out, CI, CJ1, CJ2, K,
                    sm1b, sm1i, sm1j, sx1b, sx1j, sx1k, sm2b, sm2i, sm2j, sx2b, sx2j, sx2k,
                    syb, syi, syk,
                    TWO: tl.constexpr, HAS_DIAG: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[b] = m1[b] x1[b] (+ m2[b] x2[b]) (+ diag[b, :, None] * y[b]); out contiguous (B, CI, K).
    b, i, k = _batch_tile(CI, K, BLOCK_I, BLOCK_K)
    acc = tl.zeros([BLOCK_I, BLOCK_K], dtype=m1.dtype.element_ty)
    # m is fp32/fp64 (computed from the Gram blocks): x is brought to its dtype.
    acc = _mat_tile(acc, m1, x1, b, i, k, CI, CJ1, K, sm1b, sm1i, sm1j, sx1b, sx1j, sx1k, BLOCK_J, False)
    if TWO:
        acc = _mat_tile(acc, m2, x2, b, i, k, CI, CJ2, K, sm2b, sm2i, sm2j, sx2b, sx2j, sx2k, BLOCK_J, False)
    mask = (i < CI)[:, None] & (k < K)[None, :]
    if HAS_DIAG:
        d = tl.load(diag + b * CI + i, mask=i < CI, other=0.0)
        yt = tl.load(y + b * syb + i.to(tl.int64)[:, None] * syi + k.to(tl.int64)[None, :] * syk,
                     mask=mask, other=0.0)
        acc += d[:, None] * yt.to(acc.dtype)
    tl.store(out + (b * CI + i.to(tl.int64)[:, None]) * K + k[None, :], acc.to(out.dtype.element_ty), mask=mask)


# (BLOCK_I, BLOCK_J, BLOCK_K, launch options) by m's dtype, as _GRAM_TILES: out tiles of
# BLOCK_I x BLOCK_K, BLOCK_J the reduction step. fp32: 64 x 32 tiles in steps of 16 (up to
# ~170 registers on sm_80 and sm_90, NST's two products and diagonal term included; 64 x 64
# reaches 255); fp64: 32 x 64 in steps of 32.
_MAT_TILES = {torch.float32: (64, 16, 32, dict(num_warps=4, num_stages=3, maxnreg=200)),
              torch.float64: (32, 32, 64, dict(num_warps=4, num_stages=3))}


def matrix_times_maps(m1, x1, m2=None, x2=None, diag=None, y=None, out_dtype=None):
    """out = m1 x1 (+ m2 x2) (+ diag[..., None] * y), batched, as a contiguous (B, CI, K) tensor.

    m* (B, CI, CJ*) fp32/fp64 (any strides); x* (B, CJ*, K) and y (B, CI, K) maps; diag (B, CI).
    """
    B, CI, CJ1 = m1.shape
    K = x1.shape[2]
    two, has_diag = m2 is not None, diag is not None
    if not two:
        m2, x2 = m1, x1
    if not has_diag:
        diag, y = m1, x1
    out = torch.empty((B, CI, K), dtype=out_dtype or x1.dtype, device=x1.device)
    block_i, block_j, block_k, launch = _MAT_TILES[m1.dtype]
    grid = (B * cdiv(CI, block_i) * cdiv(K, block_k),)
    _mat_map_kernel[grid](m1, x1, m2, x2, diag, y, out, CI, CJ1, m2.shape[2], K,
                          *m1.stride(), *x1.stride(), *m2.stride(), *x2.stride(), *y.stride(),
                          TWO=two, HAS_DIAG=has_diag,
                          BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k, **launch)
    return out
