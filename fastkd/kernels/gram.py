"""Shared building blocks of the Triton kernels of the pairwise losses (RKD, SP, PKT, CC,
IRG edge: fastkd/kernels/distance.py, angle.py and cosine.py), built on (N, N) matrices of
the student's and the teacher's rows.

`prepare` (centre or normalise the features, in float64), `squared_distances` (E_ab =
|x_a - x_b|^2, float64), `gram` (G = X X^T float64, exactly symmetric) and `gram_grad`
(dL/dX = scale * (M X + r * X) from an (N, N) matrix M and an optional vector r); the last
three read X through its strides in any float dtype (converted exactly to float64 in the
kernel, so raw features need no prepare launch), with `grad_buffers` for the (M, r) each
loss's gradient kernel writes, and the small @triton.jit helpers several losses use. Each
loss then has its kernels over (N, N) tiles of the student's and the teacher's matrices,
both read by the same launch.

Global batch (fastkd/autograd.py's *_global): the kernels also run on a row block, the rows
lo:lo + R of the (N, N) matrices as an (R, N) matrix, given the row offset lo, the row count
R and the global N (columns, the diagonal at b = lo + a); one process's square case is lo 0,
R = N, with the code it had (SQUARE, ALL: the symmetric tiles, the loop over all rows).

Numerics (the CPU path, fastkd/torch_backend/pairwise.py, follows the same rules for RKD,
forms IRG's edges with the reference's own float32 operations unless a common offset would
swamp them, and runs the reference's own forward operations for SP, PKT and CC; its
docstring has the error analysis). For float64 inputs everything here and in the losses'
modules sums in float64. Formed from a Gram matrix, E_ab = G_aa + G_bb - 2 G_ab carries an
absolute error of about u |x|^2, which is all of E_ab for a pair much closer than the rows' norms (float32
features spread over 5000 with two rows 0.3 apart gave RKD 5e9 for 0.66; centring does not
help when the spread itself is large). So `squared_distances` sums E over the difference
vectors themselves: for float32, bfloat16 and float16 inputs each difference is exact, E_ab
has a relative error of about D u64 whatever the gap, and equal rows give exactly 0.
Gradients M X + r X are formed in float64 from the centred rows, whose rounding (u64 |M| |x|)
stays below the |M| gap of a near-duplicate pair down to gaps of about 1e-8 of the spread.
RKD on float32, bfloat16 and float16 inputs does both without float64:
`squared_distances_parts` carries E as two float32 sums (hi + lo, 2^-48) and
`difference_grad` forms sum_b M_ab (x_b - x_a) from the differences themselves (its terms'
r is minus M's row sums), whose float32 rounding is relative to each term, not to |x|.
SP, PKT, CC and IRG on those inputs also run without float64: `gram_split` (G = hi + lo
from int8 slices of the rows on the tensor cores, exact integer sums), `squared_norms_split`
(its diagonal for a global batch), `squared_distances_parts` (IRG's E too), and `gram_grad`
with a float32 M (`_product_grad_kernel`, tf32x3 products on the tensor cores).
Buffers are (N, N) at most.
"""
import torch
import triton
import triton.language as tl

from .common import NO_FMA, cdiv, chunked, dd_sum, dot_f32, sqrt, to_acc, two_prod, two_sum

BLOCK = 32  # side of the (N, N) tiles
BLOCK_D = 32  # feature columns per step of a dot product
BLOCK_D_DIFF = 4  # feature columns per step of a (BLOCK, BLOCK, columns) difference tile
# difference_grad's (BLOCK, rows b, columns) tiles: 4,096 float32 values per step.
DIFF_BLOCK_B = 4
DIFF_BLOCK_D = 32
# _product_grad_kernel's (rows, K step, columns, launch options): feature_maps' float32 tiles
# for the same tf32x3 product (64-row tiles run as sm_90's wgmma; maxnreg, see there).
PRODUCT_TILES = (64, 16, 32, dict(num_warps=4, num_stages=3, maxnreg=200))
# Warps of the kernels that hold several float64 (BLOCK, BLOCK) tiles at once (both sides,
# both orientations): with four, sm_80/sm_90 spill their registers.
TILE_WARPS = 8


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
    tl.store(norms_ptr + rows, sqrt(tl.sum(sq, 1)), mask=rows < N)


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
        _row_norms_kernel[(cdiv(n, BLOCK),)](x, x.stride(0), x.stride(1), norms, n, d,
                                                    BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    _prepare_kernel[(cdiv(d, BLOCK_D),)](x, x.stride(0), x.stride(1), norms, out, n, d,
                                                CENTRE=centre, NORMALISE=normalise,
                                                BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    return (out, norms) if normalise else out


@triton.jit
def _tile_runs(pid_a, pid_b, SQUARE: tl.constexpr):
    """Whether program (a, b) computes its tile: for one process's square matrix (SQUARE)
    only b <= a, stored with its transpose; for a global batch's row block every tile."""
    if SQUARE:
        return pid_b <= pid_a
    else:
        return pid_b >= 0


@triton.jit
def _feature_column(row_a, row_b, ra, rb, R, N, f, stride_d):
    """Feature f of the tile's rows a (R of them) and b (N), float32, 0 past the ends."""
    col = tl.cast(f, tl.int64) * stride_d
    xa = tl.load(row_a + col, mask=ra < R, other=0.0).to(tl.float32)
    xb = tl.load(row_b + col, mask=rb < N, other=0.0).to(tl.float32)
    return xa, xb


@triton.jit
def _store_distance_tile(e_ptr, ra, rb, R, N, value, SQUARE: tl.constexpr):
    """The (a, b) tile of an (R, N) matrix of squared distances, and with SQUARE (one process's
    (N, N), symmetric) its transpose at (b, a)."""
    ok = (ra[:, None] < R) & (rb[None, :] < N)
    tl.store(e_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], value, mask=ok)
    if SQUARE:
        tl.store(e_ptr + rb[None, :].to(tl.int64) * N + ra[:, None], value, mask=ok)


@triton.jit
def _squared_distances_kernel(x_ptr, stride_n, stride_d, e_ptr, lo, R, N, D,
                              SQUARE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """E_ab = sum_f (x_a[f] - x_b[f])^2 in float64 for the rows a in lo:lo + R of x (N, D) and
    every b, stored at (a - lo, b) of e (R, N). Each difference is taken in float64 (exact for
    float32/bfloat16/float16 rows), so E does not cancel; (x_a - x_b)^2 = (x_b - x_a)^2 bit for
    bit, so E is exactly symmetric with an exactly zero diagonal. SQUARE (lo 0, R = N): only
    the tiles with b <= a are computed, each stored at (a, b) and transposed at (b, a)."""
    _tile(x_ptr, stride_n, stride_d, e_ptr, lo, R, N, D, DIFF=True, SQUARE=SQUARE, BLOCK=BLOCK, BLOCK_D=BLOCK_D)


@triton.jit
def _tile(x_ptr, stride_n, stride_d, out_ptr, lo, R, N, D, DIFF: tl.constexpr, SQUARE: tl.constexpr,
          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The body of _squared_distances_kernel (DIFF: sum_f (x_a[f] - x_b[f])^2) and _gram_kernel
    (sum_f x_a[f] x_b[f] by tl.dot) at the tile (a, b), in out's dtype; SQUARE: only b <= a,
    stored at (a, b) and transposed at (b, a)."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if _tile_runs(pid_a, pid_b, SQUARE):
        ra = pid_a * BLOCK + tl.arange(0, BLOCK)
        rb = pid_b * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=out_ptr.dtype.element_ty)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            xa = tl.load(x_ptr + (lo + ra[:, None]).to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d,
                         mask=(ra[:, None] < R) & (cols[None, :] < D), other=0.0).to(acc.dtype)
            xb = tl.load(x_ptr + rb[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d,
                         mask=(rb[:, None] < N) & (cols[None, :] < D), other=0.0).to(acc.dtype)
            if DIFF:
                diff = xa[:, None, :] - xb[None, :, :]
                acc += tl.sum(diff * diff, axis=2)
            else:
                acc = tl.dot(xa, tl.trans(xb), acc, input_precision="ieee", out_dtype=acc.dtype)
        if DIFF:
            _store_distance_tile(out_ptr, ra, rb, R, N, acc, SQUARE)
        else:
            ok = (ra[:, None] < R) & (rb[None, :] < N)
            if SQUARE:
                # A diagonal tile of G is made exactly symmetric too: (a + b) / 2 does not
                # depend on order (a difference's square is symmetric bit for bit already).
                acc = tl.where(pid_a == pid_b, (acc + tl.trans(acc)) * 0.5, acc)
                tl.store(out_ptr + rb[None, :].to(tl.int64) * N + ra[:, None], acc, mask=ok)
            tl.store(out_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], acc, mask=ok)


def squared_distances(x, lo=0, rows=None):
    """E (N, N) float64, E_ab = |flat(x)_a - flat(x)_b|^2 from the difference vectors (see the
    module docstring); x read through its strides in any float dtype. rows: only the rows
    lo:lo + rows of E, (rows, N), each entry as in the whole matrix (a global batch's
    row block)."""
    return _tiles(_squared_distances_kernel, x, lo, rows, torch.float64, 1, BLOCK_D=BLOCK_D_DIFF)[0]


def _tiles(kernel, x, lo, rows, dtype, count, **options):
    """`count` (rows, N) matrices in dtype written by a tile kernel (_tile, _split_tile) over
    X = flat(x) (N, D): all N rows when rows is None (the square case), else the rows
    lo:lo + rows."""
    x = flat(x)
    n, d = x.shape
    square = rows is None
    rows = n if square else rows
    out = tuple(torch.empty((rows, n), dtype=dtype, device=x.device) for _ in range(count))
    kernel[(cdiv(rows, BLOCK), cdiv(n, BLOCK))](x, x.stride(0), x.stride(1), *out, lo, rows, n, d, SQUARE=square,
                                               BLOCK=BLOCK, **options)
    return out


@triton.jit
def _squared_distances_split_kernel(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, lo, R, N, D,
                                    SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    """_squared_distances_kernel in float32 arithmetic only: E_ab = hi + lo (two float32 (R, N)
    matrices) to about 2^-48 relative. Each
    difference is split exactly (two_sum), each square exactly (its rounding error by a
    fused multiply-add), and the sum over the features carried as hi + lo (two_sum): every
    term is non-negative, so nothing cancels and the error stays about u32^2 E."""
    _split_tile(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, lo, R, N, D, DIFF=True, SQUARE=SQUARE, BLOCK=BLOCK)


def squared_distances_parts(x, lo=0, rows=None):
    """squared_distances with float32 arithmetic only, for float32, bfloat16 and float16 x:
    (hi, lo_part), hi + lo_part = E to about 2^-48 relative (two float32 (rows, N) matrices;
    their sum in float64 is exact); equal rows give exactly 0. A sum of squares past
    float32's range gives NaN there (hi and lo: the compensated sums meet inf - inf), as the
    reference's own float32 distances do; RKD's angle term scales such rows into range first
    (fastkd.autograd._in_range)."""
    return _tiles(_squared_distances_split_kernel, x, lo, rows, torch.float32, 2, **NO_FMA)


@triton.jit
def _split_tile(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, lo, R, N, D, DIFF: tl.constexpr, SQUARE: tl.constexpr,
                BLOCK: tl.constexpr):
    """The body of the two split kernels: hi + lo = sum_f t(x_a[f], x_b[f]) at the tile (a, b),
    each term t = (x_a - x_b)^2 (DIFF) or x_a x_b carried as an exact pair p + p_err and the
    sum compensated (two_sum); SQUARE: only b <= a, stored at (a, b) and transposed at (b, a)."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if _tile_runs(pid_a, pid_b, SQUARE):
        ra = pid_a * BLOCK + tl.arange(0, BLOCK)
        rb = pid_b * BLOCK + tl.arange(0, BLOCK)
        row_a = x_ptr + (lo + ra).to(tl.int64) * stride_n
        row_b = x_ptr + rb.to(tl.int64) * stride_n
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for f in range(0, D):
            xa, xb = _feature_column(row_a, row_b, ra, rb, R, N, f, stride_d)
            if DIFF:
                d, d_lo = two_sum(xa[:, None], -xb[None, :])
                p = d * d
                acc, err = two_sum(acc, p)
                acc_lo += err + (tl.fma(d, d, -p) + 2.0 * d * d_lo)
            else:
                p, p_err = two_prod(xa[:, None], xb[None, :])
                acc, err = two_sum(acc, p)
                acc_lo += err + p_err
        acc, acc_lo = two_sum(acc, acc_lo)
        _store_distance_tile(hi_ptr, ra, rb, R, N, acc, SQUARE)
        _store_distance_tile(lo_ptr, ra, rb, R, N, acc_lo, SQUARE)


@triton.jit
def _dd_gram_kernel(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, lo, R, N, D,
                       SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    """gram_split's vector path, in float32 arithmetic only: G = hi + lo (two float32 (R, N)
    matrices) for the tile (a, b). Each product x_a[f] x_b[f] is split exactly (two_prod:
    its rounding error by a fused multiply-add) and the sum over the features carried as
    hi + lo (two_sum), so G's error is about u32^2 sum_f |x_a[f] x_b[f]| (2^-48 relative
    where nothing cancels). The products commute bit for bit, so a diagonal tile is exactly
    symmetric; SQUARE: only b <= a, stored at (a, b) and transposed at (b, a)."""
    _split_tile(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, lo, R, N, D, DIFF=False, SQUARE=SQUARE, BLOCK=BLOCK)


@triton.jit
def _dd_norms_kernel(x_ptr, stride_n, stride_d, hi_ptr, lo_ptr, N, D, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """|x_i|^2 = hi + lo (N,) each float32 for a block of rows, as _dd_gram_kernel's diagonal:
    each square split exactly, the sums compensated."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d,
                    mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float32)
        p, p_err = two_prod(x, x)
        acc, err = two_sum(acc, p)
        acc_lo += err + p_err
    hi, lo = dd_sum(acc, acc_lo, 1)
    tl.store(hi_ptr + rows, hi, mask=rows < N)
    tl.store(lo_ptr + rows, lo, mask=rows < N)


# --- the float32 path's Gram matrix on integer tensor cores --------------------------------
# G = X X^T as hi + lo (two float32 matrices) for SP, PKT and CC on float32, bfloat16 and
# float16 rows, by Ozaki's splitting (Ootomo, Ozaki and Yokota, "DGEMM on integer matrix
# multiplication unit", 2024): each row a is scaled by a power of two s_a with
# max |x_a| < s_a, and x_a / s_a is cut into SLICES integer slices,
# x_a / s_a = sum_i q_i 2^(-6 - 7 (i - 1)) + a remainder below 2^(-6 - 7 SLICES), each
# |q_i| <= 64 (an int8). Every product of two slices is then an integer the int8 tensor
# cores form and sum exactly in int32 (|q q'| <= 2^12, at most SLICES * SLICE_CHUNK of them
# per sum: below 2^29), so the only rounding is in combining the levels L = i + j (weight
# 2^(2 - 7 L)) in double-float (about 2^-46 |G|), and the only truncation the pairs with
# i + j > SLICES + 1 and the remainders: at most (SLICES + 1) 2^(-7 SLICES) D s_a s_b,
# 2^-46 D s_a s_b at 7 slices (s_a < 2 max |x_a|). The vector units' double-float sums,
# kept for D > SLICE_MAX_RATIO N, have about 2^-48 sum_f |x_a[f] x_b[f]| and cost about 11
# instructions per product. The sums are integers, so order does not matter: G is exactly
# symmetric, bit for bit the same in the interpreter as on the GPU, and a row's squared
# norm (`squared_norms_split`) is G's diagonal bit for bit.
SLICES = 7
SLICE_CHUNK = 16384  # features per int32 sum
SLICE_BLOCK_K = 32  # int8 tl.dot steps take K in multiples of 32; the slices' padding
# (tile side, launch options). Each level re-reads its slices' tiles, so the tile side is the
# kernel's arithmetic intensity (ops per byte read from L2): 64 x 64 tiles in K steps of 32,
# eight warps, three stages of the slices' int8 tiles in shared memory: 88 KB, inside
# sm_86/sm_89's 99 KB; 141-216 registers on sm_90 (wgmma), up to 220 on sm_80 (mma.sync), no
# spill. ptxas spills below a cap of 240 (at 200: 16 bytes on sm_80). 32 x 32 tiles need 57 KB
# and half the intensity.
SLICE_TILE = (64, dict(num_warps=8, num_stages=3, maxnreg=240))
# The slices take 7 N D bytes per side, alive while G is formed: past D = 2 N more than the
# (N, N) float32 matrices (hi, lo of both sides: 16 N^2 bytes) that the losses form anyway,
# which would make fastkd's peak memory heavier than the reference's where N is small and D
# large (SP at the collection's shapes: N = 128, D = 4096..16384). There gram_split forms G
# on the vector units (_dd_gram_kernel: no scratch; O(N^2 D) with N small).
SLICE_MAX_RATIO = 2
# Rows with a value past 2^125 (whose squares overflow float32) or not finite: their s is NaN,
# so G's row and column are NaN, as the reference's float32 products are not finite there.
_SLICE_MAX_EXP = tl.constexpr(125)


@triton.jit
def _slices_kernel(x_ptr, stride_n, stride_d, q_ptr, scale_ptr, N, D, DP, SLICES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """q (SLICES, N, DP) int8 (0 past D; DP a multiple of BLOCK_D) and s (N,) float32 (see the
    section's header) for a block of rows of X (N, D), read through its strides in any
    float dtype. Each step is exact: x / s and the scalings by 2^6 and 2^7 are by powers of
    two, v - rint(v) is exact, and rint is the float32 add and subtract of 1.5 * 2^23
    (|v| <= 64)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_n
    top = tl.zeros([BLOCK_N], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_d, mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.max(tl.abs(x), 1))
        bad = tl.maximum(bad, tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1))
    # top in [2^(E - 127), 2^(E - 126)) for its biased exponent E (subnormal: below 2^-126).
    e = tl.maximum(((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, -_SLICE_MAX_EXP)
    bad = bad | (e > _SLICE_MAX_EXP)
    e = tl.minimum(e, _SLICE_MAX_EXP)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e
    up = ((127 + e) << 23).to(tl.float32, bitcast=True)
    tl.store(scale_ptr + rows, tl.where(bad != 0, float("nan"), up), mask=row_ok)
    plane = N.to(tl.int64) * DP
    for start in range(0, DP, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_d, mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0).to(tl.float32)
        v = tl.where(bad[:, None] != 0, 0.0, x * down[:, None]) * 64.0
        out = q_ptr + rows[:, None].to(tl.int64) * DP + cols[None, :]
        for i in tl.static_range(SLICES):
            q = (v + 12582912.0) - 12582912.0
            tl.store(out + i * plane, q.to(tl.int8), mask=row_ok[:, None])
            v = (v - q) * 128.0


def slices(x):
    """(q, s): X = flat(x) (N, D) in any float dtype but float64 as SLICES int8 slices q
    (SLICES, N, D') and per-row powers of two s (N,) float32 (see the section's header), D'
    = D rounded up to SLICE_BLOCK_K with zero columns: the products' loads are then aligned
    and need no column mask. None past D = SLICE_MAX_RATIO N: gram_split takes its vector
    path there."""
    x = flat(x)
    n, d = x.shape
    if d > SLICE_MAX_RATIO * n:
        return None
    q = torch.empty((SLICES, n, cdiv(d, SLICE_BLOCK_K) * SLICE_BLOCK_K), dtype=torch.int8, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    _slices_kernel[(cdiv(n, BLOCK),)](x, x.stride(0), x.stride(1), q, scale, n, d, q.shape[2], SLICES=SLICES,
                                      BLOCK_N=BLOCK, BLOCK_D=SLICE_BLOCK_K, **NO_FMA)
    return q, scale


@triton.jit
def _add_level(g, g_lo, acc):
    """(g, g_lo) + acc in double-float, acc an int32 sum (|acc| < 2^29): acc's float32
    rounding and its remainder (exact) are both added."""
    p = acc.to(tl.float32)
    p_lo = (acc - p.to(tl.int32)).to(tl.float32)
    g, err = two_sum(g, p)
    return g, g_lo + (err + p_lo)


@triton.jit
def _level_sums(rows_a, ok_a, rows_b, ok_b, plane, D, zero, SLICES: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """g + g_lo = sum_L 2^(-7 (L - 2)) P_L, P_L = sum_{i + j = L} q_i(a) . q_j(b) over the D
    (padded) features of the slices at rows_a and rows_b (slice planes `plane` apart): level
    by level from the smallest (L = SLICES + 1) up, Horner's scheme g = 2^-7 g + P_L, each
    P_L an exact int32 sum per CHUNK features added in double-float (_add_level). DOT: the
    tiles' products on the tensor cores, g shaped like zero (A, B); else each row of rows_a
    with itself, elementwise, g (A,): the same integers by the same steps, so the same bits
    as a DOT tile's diagonal."""
    g, g_lo = zero, zero
    for level in tl.static_range(SLICES + 1, 1, -1):
        g, g_lo = g * 0.0078125, g_lo * 0.0078125
        for chunk in range(0, D, CHUNK):
            if DOT:
                acc = tl.zeros(zero.shape, dtype=tl.int32)
            else:
                acc = tl.zeros([zero.shape[0], BLOCK_K], dtype=tl.int32)
            for start in range(chunk, tl.minimum(chunk + CHUNK, D), BLOCK_K):
                cols = (start + tl.arange(0, BLOCK_K))[None, :]
                for i in tl.static_range(1, level):
                    qa = tl.load(rows_a + (i - 1) * plane + cols, mask=ok_a, other=0)
                    qb = tl.load(rows_b + (level - i - 1) * plane + cols, mask=ok_b, other=0)
                    if DOT:
                        acc = tl.dot(qa, tl.trans(qb), acc, out_dtype=tl.int32)
                    else:
                        acc += qa.to(tl.int32) * qb.to(tl.int32)
            if DOT:
                g, g_lo = _add_level(g, g_lo, acc)
            else:
                g, g_lo = _add_level(g, g_lo, tl.sum(acc, 1))
    return g, g_lo


@triton.jit
def _scaled(g, g_lo, s_a, s_b):
    """(g, g_lo) 2^-12 s_a s_b as (hi, lo), the larger power of two first: an intermediate
    under- or overflows only where G itself does."""
    g, g_lo = two_sum(g, g_lo)
    big = tl.maximum(s_a, s_b) * 0.000244140625
    small = tl.minimum(s_a, s_b)
    # A NaN s (a row past range) makes G NaN; maximum/minimum would drop it.
    nan = (s_a != s_a) | (s_b != s_b)
    return tl.where(nan, float("nan"), (g * big) * small), tl.where(nan, float("nan"), (g_lo * big) * small)


@triton.jit
def _sliced_gram_kernel(q_ptr, scale_ptr, hi_ptr, lo_ptr, lo, R, N, D, SQUARE: tl.constexpr, SLICES: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """G = hi + lo for the tile (a, b) of the rows lo:lo + R against all N, from the slices q
    (SLICES, N, D), D a multiple of BLOCK_K (gram_split): level by level, from the smallest
    (L = SLICES + 1) up, Horner's scheme g = 2^-7 g + P_L with
    P_L = sum_{i + j = L} q_i(a) . q_j(b) in int32 per CHUNK features; then
    G = 2^-12 s_a s_b g. SQUARE: only b <= a, stored at (a, b) and transposed at (b, a)."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if _tile_runs(pid_a, pid_b, SQUARE):
        ra = pid_a * BLOCK + tl.arange(0, BLOCK)
        rb = pid_b * BLOCK + tl.arange(0, BLOCK)
        g, g_lo = _level_sums(q_ptr + (lo + ra[:, None]).to(tl.int64) * D, ra[:, None] < R,
                              q_ptr + rb[:, None].to(tl.int64) * D, rb[:, None] < N, N.to(tl.int64) * D, D,
                              tl.zeros([BLOCK, BLOCK], dtype=tl.float32), SLICES, CHUNK, BLOCK_K, DOT=True)
        s_a = tl.load(scale_ptr + lo + ra, mask=ra < R, other=1.0)
        s_b = tl.load(scale_ptr + rb, mask=rb < N, other=1.0)
        hi, g_lo = _scaled(g, g_lo, s_a[:, None], s_b[None, :])
        _store_distance_tile(hi_ptr, ra, rb, R, N, hi, SQUARE)
        _store_distance_tile(lo_ptr, ra, rb, R, N, g_lo, SQUARE)


def gram_split(x, lo=0, rows=None, sliced=None):
    """G = X X^T as (hi, lo_part), two float32 (rows, N) matrices, G = hi + lo_part to about
    2^-46 (D s_a s_b + |G|) (hi = fl(G) but where G cancels that far), for float32, bfloat16
    and float16 x, on the int8 tensor cores (see the section's header): exactly
    symmetric for one process's (N, N). X = flat(x); rows: only the rows lo:lo + rows of G
    (a global batch's row block); sliced: slices(x), if already formed. Past D = SLICE_MAX_RATIO
    N on the vector units instead (_dd_gram_kernel: double-float sums, about 2^-48
    sum_f |x_a[f] x_b[f]|)."""
    sliced = slices(x) if sliced is None else sliced
    if sliced is None:
        return _tiles(_dd_gram_kernel, x, lo, rows, torch.float32, 2, **NO_FMA)
    q, scale = sliced
    _, n, d = q.shape
    square = rows is None
    rows = n if square else rows
    hi, lo_part = (torch.empty((rows, n), dtype=torch.float32, device=q.device) for _ in range(2))
    block, launch = SLICE_TILE
    _sliced_gram_kernel[(cdiv(rows, block), cdiv(n, block))](q, scale, hi, lo_part, lo, rows, n, d, SQUARE=square,
                                                           SLICES=SLICES, CHUNK=SLICE_CHUNK, BLOCK=block,
                                                           BLOCK_K=SLICE_BLOCK_K, **launch, **NO_FMA)
    return hi, lo_part


@triton.jit
def _sliced_norms_kernel(q_ptr, scale_ptr, hi_ptr, lo_ptr, N, D, SLICES: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """G's diagonal |x_a|^2 = hi + lo (N,) for a block of rows, from the slices: the same
    integer sums as _sliced_gram_kernel's (elementwise, no tensor core, _level_sums) combined
    by the same steps, so bit for bit its diagonal."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = q_ptr + rows[:, None].to(tl.int64) * D
    g, g_lo = _level_sums(base, rows[:, None] < N, base, rows[:, None] < N, N.to(tl.int64) * D, D,
                          tl.zeros([BLOCK_N], dtype=tl.float32), SLICES, CHUNK, BLOCK_K, DOT=False)
    s = tl.load(scale_ptr + rows, mask=rows < N, other=1.0)
    hi, g_lo = _scaled(g, g_lo, s, s)
    tl.store(hi_ptr + rows, hi, mask=rows < N)
    tl.store(lo_ptr + rows, g_lo, mask=rows < N)


def squared_norms_split(x, sliced=None):
    """(hi, lo) (N,) float32 each, |flat(x)_i|^2 = hi + lo: gram_split's diagonal (bit for bit
    on its int8 path), for every row (a global batch's rows); sliced: slices(x), if already
    formed."""
    sliced = slices(x) if sliced is None else sliced
    if sliced is None:
        x = flat(x)
        n, d = x.shape
        hi = torch.empty(n, dtype=torch.float32, device=x.device)
        lo = torch.empty_like(hi)
        _dd_norms_kernel[(cdiv(n, BLOCK),)](x, x.stride(0), x.stride(1), hi, lo, n, d, BLOCK_N=BLOCK,
                                            BLOCK_D=BLOCK_D, **NO_FMA)
        return hi, lo
    q, scale = sliced
    _, n, d = q.shape
    hi = torch.empty(n, dtype=torch.float32, device=q.device)
    lo = torch.empty_like(hi)
    _sliced_norms_kernel[(cdiv(n, BLOCK),)](q, scale, hi, lo, n, d, SLICES=SLICES, CHUNK=SLICE_CHUNK,
                                            BLOCK_N=BLOCK, BLOCK_K=SLICE_BLOCK_K, **NO_FMA)
    return hi, lo


@triton.jit
def _gram_kernel(x_ptr, stride_n, stride_d, g_ptr, lo, R, N, D, SQUARE: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """G = X[lo:lo + R] X^T (R, N) in G's dtype (float64) for the tile (a, b), X (N, D) read
    through its strides in any float dtype (the conversion is exact). SQUARE (lo 0, R = N):
    only b <= a, stored at (a, b) and transposed at (b, a), a diagonal tile made exactly
    symmetric."""
    _tile(x_ptr, stride_n, stride_d, g_ptr, lo, R, N, D, DIFF=False, SQUARE=SQUARE, BLOCK=BLOCK, BLOCK_D=BLOCK_D)


def flat(x):
    """x as (N, D) rows, a view where its dims merge (the kernels read it through its strides)."""
    return x.reshape(x.size(0), -1)


def gram(x, lo=0, rows=None):
    """G = X X^T (N, N) float64, exactly symmetric, X = flat(x) in any float dtype (the raw
    features: read and converted in the kernel), or from prepare(). rows: only the rows
    lo:lo + rows of G, (rows, N) (a global batch's row block)."""
    return _tiles(_gram_kernel, x, lo, rows, torch.float64, 1, BLOCK_D=BLOCK_D)[0]


@triton.jit
def _gram_grad_kernel(m_ptr, stride_ma, stride_mb, r_ptr, y_ptr, stride_yk, stride_yd, z_ptr, stride_zr,
                      stride_zd, scale_ptr, divisor: tl.float64, out_ptr, R, K, D,
                      HAS_R: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """out = s * (M Y + r * Z) for a (BLOCK, BLOCK_D) tile of out (R, D) (contiguous), in M's
    dtype: M (R, K), Y (K, D) and Z (R, D) read through their strides, Y and Z in any float
    dtype; s = scale / divisor, scale a 0-dim tensor (1 without HAS_SCALE: a gradient at
    grad_output 1, written in forward), r = 0 without HAS_R. One process's square case is
    Y = Z = X, M (N, N)."""
    # Column blocks on grid axis 0 (up to 2^31 - 1): flattened maps reach D > 2 M, past the
    # 65,535 of axis 1.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ra = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < D
    acc_type = m_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=acc_type)
    for start in range(0, K, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        m = tl.load(m_ptr + ra[:, None].to(tl.int64) * stride_ma + rb[None, :].to(tl.int64) * stride_mb,
                    mask=(ra[:, None] < R) & (rb[None, :] < K), other=0.0)
        yb = tl.load(y_ptr + rb[:, None].to(tl.int64) * stride_yk + cols[None, :].to(tl.int64) * stride_yd,
                     mask=(rb[:, None] < K) & col_ok[None, :], other=0.0).to(acc_type)
        acc = tl.dot(m, yb, acc, input_precision="ieee", out_dtype=acc_type)
    ok = (ra[:, None] < R) & col_ok[None, :]
    if HAS_R:
        za = tl.load(z_ptr + ra[:, None].to(tl.int64) * stride_zr + cols[None, :].to(tl.int64) * stride_zd,
                     mask=ok, other=0.0).to(acc_type)
        acc += tl.load(r_ptr + ra, mask=ra < R, other=0.0)[:, None] * za
    # One scalar division, then products: a float64 division per entry costs registers.
    if HAS_SCALE:
        acc = acc * (tl.load(scale_ptr).to(acc_type) / to_acc(divisor, acc_type))
    else:
        acc = acc * (1.0 / to_acc(divisor, acc_type))
    tl.store(out_ptr + ra[:, None].to(tl.int64) * D + cols[None, :],
             _cast(acc, out_ptr.dtype.element_ty), mask=ok)


def gram_grad(m, r, x, scale, like, lo=0, z=None, divisor=1.0):
    """dL/dX = scale / divisor * (M X + r * Z) (R, D) typed like `like`, Z = X[lo:lo + R] unless
    given (R, D); X = flat(x) (K, D) in any float dtype (the raw features, or from prepare()),
    M (R, K) (any strides: a transposed view is read as such), r (R,) or None for 0, scale
    a 0-dim tensor (the upstream gradient) or None for 1 (a gradient written in forward),
    divisor a number (the loss's count). Shaped like `like` when R is its batch (one
    process: M (N, N), lo 0), else (R, D): a global batch's rows lo:lo + R of the gradient,
    from M's rows. A float32 M (a float32 path's; r float32 too) takes _product_grad_kernel:
    float32 arithmetic, no float64."""
    x = flat(x)
    rows, k = m.shape
    d = x.shape[1]
    z = x[lo:] if z is None else flat(z)
    out = torch.empty((rows, d), dtype=like.dtype, device=x.device)
    if m.dtype == torch.float32:  # a float32 path's M (and r): float32 arithmetic throughout
        block_i, block_k, block_d, launch = PRODUCT_TILES
        _product_grad_kernel[(cdiv(d, block_d), cdiv(rows, block_i))](
            m, m.stride(0), m.stride(1), m if r is None else r, x, x.stride(0), x.stride(1), z, z.stride(0),
            z.stride(1), m if scale is None else scale.to(torch.float32), 1.0 / divisor, out, rows, k, d,
            HAS_R=r is not None, HAS_SCALE=scale is not None, BLOCK_I=block_i, BLOCK_K=block_k,
            BLOCK_D=block_d, **launch)
        return out.reshape(like.shape) if rows == len(like) else out
    # 16-bit rows converted to float64 in the loop: with the default three stages sm_90
    # spills registers at large D.
    stages = 2 if x.element_size() == 2 else 3
    _gram_grad_kernel[(cdiv(d, BLOCK_D), cdiv(rows, BLOCK))](
        m, m.stride(0), m.stride(1), m if r is None else r, x, x.stride(0), x.stride(1), z, z.stride(0),
        z.stride(1), m if scale is None else scale, float(divisor), out, rows, k, d,
        HAS_R=r is not None, HAS_SCALE=scale is not None, BLOCK=BLOCK, BLOCK_D=BLOCK_D, num_stages=stages)
    return out.reshape(like.shape) if rows == len(like) else out


@triton.jit
def _product_grad_kernel(m_ptr, stride_ma, stride_mb, r_ptr, y_ptr, stride_yk, stride_yd, z_ptr, stride_zr,
                         stride_zd, scale_ptr, inv_divisor, out_ptr, R, K, D, HAS_R: tl.constexpr,
                         HAS_SCALE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """_gram_grad_kernel's out = s * (M Y + r * Z) in float32 arithmetic, for a (BLOCK_I,
    BLOCK_D) tile of out (R, D); M (R, K) float32, s = scale * inv_divisor (a float32
    argument), scale the float32 0-dim tensor at scale_ptr (1 without HAS_SCALE). M Y on
    the tensor cores at float32 accuracy (the tf32x3 split, common.dot_f32; a bfloat16 or
    float16 Y is exact in tf32), K steps of BLOCK_K."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ra = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < D
    m_rows = m_ptr + ra[:, None].to(tl.int64) * stride_ma
    y_cols = y_ptr + cols[None, :].to(tl.int64) * stride_yd
    acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        m = tl.load(m_rows + k[None, :] * stride_mb, mask=(ra[:, None] < R) & (k[None, :] < K), other=0.0)
        y = tl.load(y_cols + k[:, None] * stride_yk, mask=(k[:, None] < K) & col_ok[None, :], other=0.0)
        acc = dot_f32(m, y.to(tl.float32), acc, False, y.dtype != tl.float32)
    ok = (ra[:, None] < R) & col_ok[None, :]
    if HAS_R:
        za = tl.load(z_ptr + ra[:, None].to(tl.int64) * stride_zr + cols[None, :].to(tl.int64) * stride_zd,
                     mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(r_ptr + ra, mask=ra < R, other=0.0)[:, None] * za
    if HAS_SCALE:
        acc = acc * (tl.load(scale_ptr) * inv_divisor)
    else:
        acc = acc * inv_divisor
    tl.store(out_ptr + ra[:, None].to(tl.int64) * D + cols[None, :], _cast(acc, out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _difference_grad_kernel(m_ptr, stride_ma, stride_mb, x_ptr, stride_n, stride_d, scale_ptr, out_ptr,
                            lo, R, N, D, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_a = s * sum_b M_ab (x_b - x_a) in M's dtype (float32, or float64 for float64 rows)
    for a (BLOCK, BLOCK_D) tile of out (R, D), rows a in lo:lo + R of X (N, D) (M (R, N));
    s a 0-dim tensor in M's dtype. Each difference is taken before its product, so the
    rounding is u |M_ab| |x_b - x_a| whatever the rows' offset, a pair's gap, or rows of
    very different magnitudes."""
    dtype = m_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ra = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < D
    xa = tl.load(x_ptr + (lo + ra[:, None]).to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d,
                 mask=(ra[:, None] < R) & col_ok[None, :], other=0.0).to(dtype)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=dtype)
    for start in range(0, N, BLOCK_B):
        rb = start + tl.arange(0, BLOCK_B)
        m = tl.load(m_ptr + ra[:, None].to(tl.int64) * stride_ma + rb[None, :].to(tl.int64) * stride_mb,
                    mask=(ra[:, None] < R) & (rb[None, :] < N), other=0.0)
        xb = tl.load(x_ptr + rb[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_d,
                     mask=(rb[:, None] < N) & col_ok[None, :], other=0.0).to(dtype)
        acc += tl.sum(m[:, :, None] * (xb[None, :, :] - xa[:, None, :]), axis=1)
    acc = acc * tl.load(scale_ptr)
    tl.store(out_ptr + ra[:, None].to(tl.int64) * D + cols[None, :], _cast(acc, out_ptr.dtype.element_ty),
             mask=(ra[:, None] < R) & col_ok[None, :])


def difference_grad(m, r, x, scale, like, lo=0, divisor=1.0):
    """dL/dX = scale / divisor * sum_b M_ab (x_b - x_a) (R, D) typed like `like`: the gradient
    M X + r * X of the losses whose r is minus M's row sums (RKD's terms; r, gram_grad's
    argument, is not read), formed on the differences themselves (_difference_grad_kernel):
    in float32 arithmetic for rows in any float dtype but float64 (no float64 at all), in
    float64 for float64 rows. X = flat(x) (N, D) the raw rows, M (R, N) (cast to that
    dtype), scale a 0-dim tensor; the rows lo:lo + R (R = N for one process, shaped like
    `like`)."""
    x = flat(x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = m.to(dtype)
    rows = m.shape[0]
    n, d = x.shape
    out = torch.empty((rows, d), dtype=like.dtype, device=x.device)
    # On the device, no host sync; one scalar in M's dtype.
    s = scale.to(dtype) / divisor
    _difference_grad_kernel[(cdiv(d, DIFF_BLOCK_D), cdiv(rows, BLOCK))](
        m, m.stride(0), m.stride(1), x, x.stride(0), x.stride(1), s, out, lo, rows, n, d,
        BLOCK=BLOCK, BLOCK_B=DIFF_BLOCK_B, BLOCK_D=DIFF_BLOCK_D)
    return out.reshape(like.shape) if rows == len(like) else out


@triton.jit
def _cast(x, ty: tl.constexpr):
    """x in ty, through float32 when ty is a 16-bit type: float64 does not convert to bfloat16
    or float16 directly everywhere (Triton's interpreter gives 0)."""
    if ty == tl.float64:
        return x.to(ty)
    return x.to(tl.float32).to(ty)


@triton.jit
def store_total(part_ptr, stride, n_parts, divisor, out_ptr, BLOCK: tl.constexpr):
    """out[0] = (sum of the n_parts float64 values part[i * stride]) / divisor, in out's dtype:
    a loss written by the program of a later launch that runs anyway (no sum, division and
    cast of its own)."""
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for start in range(0, n_parts, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + i.to(tl.int64) * stride, mask=i < n_parts, other=0.0)
    tl.store(out_ptr, _cast(tl.sum(acc, 0) / to_acc(divisor, acc.dtype), out_ptr.dtype.element_ty))


@triton.jit
def _smooth_l1(d):
    """h(d) = 0.5 d^2 if |d| < 1 else |d| - 0.5 (beta = 1)."""
    ad = tl.abs(d)
    return tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


@triton.jit
def _load_tile(ptr, ra, rb, R, N):
    """The (ra, rb) tile of an (R, N) matrix (contiguous rows of N), 0 outside."""
    return tl.load(ptr + ra[:, None].to(tl.int64) * N + rb[None, :],
                   mask=(ra[:, None] < R) & (rb[None, :] < N), other=0.0)


# The kernels that sum along the rows of (R, N) matrices (a row's statistics, a gradient's
# r) would run one program per block of BLOCK rows: N / 32 programs, 32 at N = 1024, for GPUs
# of 100+ SMs. So each takes a chunk of the columns, program_id(1), and the chunks' row sums
# are added after, in chunk order: about CHUNK_PROGRAMS programs, each at least
# CHUNK_MIN_TILES column tiles.
CHUNK_PROGRAMS = 1024
CHUNK_MIN_TILES = 4


def column_chunks(rows, n):
    """(columns per program, chunks) over the columns of an (rows, n) matrix; 1 chunk (every
    column) at the collection's N = 128."""
    tiles, chunks = chunked(cdiv(rows, BLOCK), cdiv(n, BLOCK), CHUNK_PROGRAMS, CHUNK_MIN_TILES)
    return tiles * BLOCK, chunks


@triton.jit
def chunk_columns(COLS, N):
    """(first, end): this program's columns, chunk program_id(1) of COLS (column_chunks)."""
    first = tl.program_id(1) * COLS
    return first, tl.minimum(first + COLS, N)


def chunk_total(part):
    """Row sums (R,) from each column chunk's (chunks, R), added in chunk order."""
    return part[0] if len(part) == 1 else part.sum(0)


def grad_buffers(a_s, a_t, chunks=1):
    """Empty (M_s, r_s, M_t, r_t) for a gradient kernel: M like the (R, N) matrices a_s and
    a_t (R = N for one process), r (chunks, R) in their dtype, a row of r's parts per column
    chunk (chunk_total adds them)."""
    m_s, m_t = torch.empty_like(a_s), torch.empty_like(a_t)
    r_s = torch.empty((chunks, len(a_s)), dtype=a_s.dtype, device=a_s.device)
    return m_s, r_s, m_t, torch.empty_like(r_s)
