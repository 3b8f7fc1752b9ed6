"""Triton kernels of RKD's angle term, from the squared distances E (N, N) of the student's
and the teacher's rows (fastkd/kernels/gram.py: `squared_distances`, float64, for float64
inputs; for the others `squared_distances_parts`, E = hi + lo in two float32 matrices, which
the float64 paths below sum as they load them: no float64 E is stored), and, at the anchors
that need it, from the rows themselves.

The angle at anchor i is read from E by polarisation (the law of cosines), V_jk =
(x_j - x_i).(x_k - x_i) = (E_ij + E_ik - E_jk) / 2, A_jk = V_jk / (n_j n_k), n_j = sqrt(E_ij).
Buffers are (N, N) at most: the N^3 angles are read from E one anchor at a time. V's
rounding is relative to E_ij + E_ik + E_jk, so the angle's error is about
u (rho + 1 + 1/rho), rho = n_j / n_k the ratio of two distances from the anchor: far past the
reference's own at an anchor with a near-duplicate row (rho = 1e11 for a gap of 1e-9 of the
spread). And polarisation takes a direction shorter than NORM_EPS as zero, where the
reference's F.normalize divides it by NORM_EPS: the same only for an exactly zero one.

Three paths, each in kernels of its own:
  direct (`_rkd_angle_fwd_direct_kernel`, `_rkd_angle_grad_direct_kernel`,
         `_rkd_angle_grad_direct_anchor_kernel`) in float64 whatever the input dtype: the
         collection's formula itself, e_j = d_j / max(|d_j|, NORM_EPS) with d_j = x_j - x_i,
         A_jk = e_j . e_k, V_jk = d_j . d_k summed over the difference vectors, and its
         gradient autograd's (F.normalize's backward, through the clamp) formed on the same
         difference vectors (see its section). The error is the reference's own, about
         u64 per angle whatever rho. O(N^2 D) work per anchor, O(N^2) memory: its backward's
         scratch, u (N, N) (float32 for float32, bfloat16 and float16 inputs: its rounding
         adds about u32 inv_j |g_j| to a direction's gradient, what the float32 reference's
         own arithmetic carries there; float64 otherwise) and r (2, min(R, DIRECT_CHUNK), N)
         float64, is allocated whether or not an anchor takes the path (their count is on
         the device), once the other paths' (N, N) M are mapped onto the rows; past
         DIRECT_CHUNK anchors the gradient kernels launch once per chunk of them, those past
         the count returning at once. Its gradient kernel runs a program per 32 rows, each over
         every direct anchor in turn: ample for the few anchors a near-duplicate pair flags,
         a small part of the GPU where most anchors of float64 inputs take the path.
         It takes, for every input dtype, the anchors with a squared distance in
         (0, NORM_EPS^2); for float64 inputs also those whose live squared distances spread
         past DIRECT_RATIO_SQ = 16 (rho > 4) on either side. Why 4: polarisation's
         u64 (rho + 1 + 1/rho) against the reference's few u64 per angle; measured on the
         gradients (rows 1000 + 50 randn, a pair at distance 1/rho of the others) the
         law of cosines is about 0.7 rho times the reference's float64 error here and
         1.7 rho on the CPU path (fastkd/torch_backend/pairwise.py, whose gradient map adds
         its own), 17x at rho = 10, at most 2.4x and 3.9x with rho <= 4: inside the 10x the
         tests allow. Float32 (and 16-bit) inputs take it past rho = 1e8
         (DIRECT_RATIO_SQ_FLOAT32 = 1e16): the law of cosines' error, about 1.3e-9 rho times
         the float32 reference's own on the gradients (0.7 rho u64 / u32), is 0.13x there and
         grows without bound past it (rows of magnitude 1e-5 among rows of 1e10: 1e6x).
  exact  (`_rkd_angle_fwd_kernel`, `_rkd_angle_grad_kernel`) in float64 by polarisation: V's
         error is about u64 (E_ij + E_ik + E_jk) <= 3 u64 max(n_j, n_k)^2, relative to
         n_j n_k 1e-9 at a gap/spread ratio of 1e-7 (the float32 reference: about 1e-7 on
         every angle). Float64 inputs take it at every anchor the direct path does not.
  fast   (`_rkd_angle_fwd_fast_kernel`, `_rkd_angle_grad_fast_kernel`) in float32 only, for
         float32, bfloat16 and float16 inputs. E arrives as two float32 matrices, E = hi + lo
         to 2^-48 (gram.squared_distances_parts), and V is summed compensated:
         hi_ij + hi_ik - hi_jk with its rounding errors kept (Knuth's two-sum), plus the lo
         terms. V's error is then about u32 |V| + 4 u32^2 (E_ij + E_ik + E_jk), relative to
         n_j n_k about 1e-7 + 1e-14 (rho + 1/rho + 1). An anchor whose distances (live ones,
         E >= NORM_EPS^2) spread over more than FAST_RATIO_SQ (rho up to 1e5: 1e-9 on an
         angle) on either side, or whose E could overflow float32, takes the exact path;
         every other anchor the fast one (but those of the direct path). A near-duplicate
         pair flags just its two anchors. The loss reads A_s - A_t off the diagonal as the
         difference of each side's angle in double-float (v + v_lo times the double-float
         inverse norms), rounded once: an error about u32 |A_s - A_t|, where the difference
         of the rounded angles has u32 |A|, 10x the reference's error on the loss with a
         teacher near the student (tests/test_float32_relations.py). The gradient's u keeps
         the rounded angles, as the tile kernel forms it again. For u, a tile whose distances
         from the anchor spread at most 2x on both sides (PLAIN_RATIO_SQ, per-block bounds
         from `_fast_rows_kernel`) sums V in plain float32 from the hi parts (_plain_angle):
         an error of at most about 7 u32 n_j n_k (docs/numerics.md), and fewer instructions
         (docs/gpu.md); the loss's difference stays compensated there too. Both kernels form
         the same u, bitwise: where the angles' derivatives cancel (rows on a line) u's
         rounding must cancel with them. Each tests a tile (or program) at once for every
         anchor (or k block) first, and tile by tile only where that fails.
The anchors are ordered direct first, then exact, then fast (`anchor_order`, one kernel that
also forms the fast path's inverse norms; `exact_anchor_order` for float64 inputs), the fast
ones with a zero direction besides their own (a duplicate row) before the others: counts =
(direct, direct + exact, direct + exact + fast with a duplicate) of them, read on the device,
so choosing a path costs no host sync. The sums over zero directions of the gradient are
taken only at the anchors with a duplicate: along the anchor's own zero direction both sides'
angles are 0, and so is u.
Each kernel takes its own anchors from the order. The direct path's gradient is added to the
rows' gradient the other paths' M, r give (`rkd_angle_direct_grad`): as an (N, N) M its
terms would be multiplied by differences between rows other than the anchor, which cancel
to the very error the path avoids.
"""
import torch
import triton
import triton.language as tl

from .common import NO_FMA, cdiv, dd_div, dd_sqrt, sqrt, two_prod, two_sum
from .gram import BLOCK, TILE_WARPS, _cast, _load_tile, _smooth_l1

# Every kernel here is launched with NO_FMA (fastkd/kernels/common.py): the student's and the
# teacher's angles round alike, and the fast path's compensated sums stay error-free, as in
# Triton's interpreter, which never contracts a product into a sum.

# The exact and direct paths' kernels: float64 on purpose, for float64 inputs and the anchors
# the fast path cannot hold (fastkd.kernels.resources lets them do float64 for any input dtype).
EXACT_FLOAT64_KERNELS = {"_rkd_angle_fwd_kernel", "_rkd_angle_grad_kernel", "_rkd_angle_fwd_direct_kernel",
                         "_rkd_angle_grad_direct_kernel", "_rkd_angle_grad_direct_anchor_kernel"}

# Directions shorter than this (E below its square) count as zero; F.normalize's clamp.
NORM_EPS = 1e-12
_NORM_EPS_SQ = tl.constexpr(NORM_EPS * NORM_EPS)  # kernels read only constexpr globals
# The fast path's limits, per anchor and side: the largest over the smallest live squared
# distance (rho^2, see the module docstring), and the largest squared distance whose sums
# of three stay finite in float32.
FAST_RATIO_SQ = 1e10
FAST_MAX = 1e37
_FAST_RATIO_SQ = tl.constexpr(FAST_RATIO_SQ)
_FAST_MAX = tl.constexpr(FAST_MAX)
# A fast-path tile of anchor i, rows j of one block and k of another, takes plain float32
# polarisation (_plain_angle) where on both sides E_ij / E_ik <= PLAIN_RATIO_SQ for every
# pair of its live directions (per block, the largest and the smallest live E_ij:
# _fast_rows_kernel's bounds), so rho <= 2: V's error is then about u32 (E_ij + E_ik + E_jk)
# <= u32 (2 (rho + 1/rho) + 2) n_j n_k, at most 7 u32 of n_j n_k, where the reference's own
# normalise-and-dot carries a few u32 per angle. The loss's angle difference stays compensated
# (the module docstring).
PLAIN_RATIO_SQ = 4.0
_PLAIN_RATIO_SQ = tl.constexpr(PLAIN_RATIO_SQ)
# An anchor whose live squared distances spread past this (rho > 4 for float64 inputs, 1e8
# for the others, see the module docstring) takes the direct path.
DIRECT_RATIO_SQ = 16.0
DIRECT_RATIO_SQ_FLOAT32 = 1e16
_DIRECT_RATIO_SQ = tl.constexpr(DIRECT_RATIO_SQ)
_DIRECT_RATIO_SQ_FLOAT32 = tl.constexpr(DIRECT_RATIO_SQ_FLOAT32)
# Feature columns per step of the direct path's (BLOCK, BLOCK, columns) difference products.
DIRECT_BLOCK_F = 4
# Feature columns per program of the direct path's anchor-row kernel.
DIRECT_ANCHOR_F = 32
# Direct anchors per launch of the direct path's gradient kernels (their r scratch is
# (2, DIRECT_CHUNK, N) float64): one launch each up to N = DIRECT_CHUNK.
DIRECT_CHUNK = 1024


# --- RKD angle ----------------------------------------------------------------
# For anchor i: V_jk = (E_ij + E_ik - E_jk) / 2, n_j = sqrt(E_ij), A_jk = V_jk / (n_j n_k),
# loss = mean over (i, j, k) of h(A_s - A_t). A direction with E_ij < NORM_EPS^2 (j = i, an
# equal row) is zero, as F.normalize makes it: A = 0 along it. Its gradient is F.normalize's
# through the clamp, v_j / NORM_EPS: dL/dv_j = (2 / NORM_EPS) sum_k u_ijk e_k.
#
# With u = h'(A_s - A_t) (0 on j = k, where A_jj is constant; -u for the teacher),
# inv_j = 1 / n_j (0 for a zero direction) and dead_j = [zero direction], each side's
# gradient is dL/dX = 2 sum_b (S_ab)(x_a - x_b) + Z X, S = W + W^T, W = dL/dE:
#   W_ij += sum_k u_ijk inv_j inv_k - inv_j^2 sum_k u_ijk A_ijk      (per anchor: w1)
#   W_jk -= 1/2 sum_i u_ijk inv_j inv_k                              (over anchors: w2)
#   Z_jk += c sum_i u_ijk dead_j inv_k                                (over anchors: z2)
#   Z_ji -= s_ij = c dead_j sum_k u_ijk inv_k,  Z_ii += sum_j s_ij   (per anchor)
#   Z_ik -= q_ik = c inv_k sum_j u_ijk dead_j                         (per anchor, u symmetric)
# with c = 2 / NORM_EPS, applied on the host side in float64 (a Python float constant in a
# kernel is a float32, 4e-9 off here). The per-anchor terms are row sums over k that the
# forward kernels take while the angles are at hand; the rest is one tile kernel per path
# over its anchors.
#
# A side's E reaches the shared pieces below as (hi, lo) pointers. The exact and direct
# paths read E in float64: E itself (float64 inputs; lo = hi, never read) or, for the
# anchors they take from the fast path (PARTS), hi + lo summed on load (_exact_load), exact
# in float64 (|lo| <= ulp(hi) / 2: 48 bits at most), so no float64 E is ever stored there.

@triton.jit
def _exact_load(h_ptr, l_ptr, offsets, mask, PARTS: tl.constexpr):
    """E at offsets in float64 (0 outside mask): E itself, or with PARTS hi + lo."""
    e = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    if PARTS:
        e += tl.load(l_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    return e


@triton.jit
def _directions(h_ptr, l_ptr, v_ptr, row_i, v_row, rows, N, EXACT: tl.constexpr, PARTS: tl.constexpr):
    """E[i, rows] (for EXACT float64, _exact_load; else its hi part: the lo part is
    _lo_parts'), inv = 1 / n (0 for a zero direction) and dead = [zero direction] (0 outside)
    for anchor i; row_i = i * N in int64, v_row = (i - lo) * N its row of the anchors' inverse
    norms. The fast path reads inv from that matrix (`_fast_rows_kernel`): a division and a
    square root per direction and anchor cost more instructions than the angles read from them."""
    ok = rows < N
    if EXACT:
        e = _exact_load(h_ptr, l_ptr, row_i + rows, ok, PARTS)
        live = e >= _NORM_EPS_SQ
        inv = tl.where(live, 1.0 / sqrt(tl.where(live, e, 1.0)), 0.0)
    else:
        # (pointer + rows) first: the part a loop over the anchors holds (the compiler hoists it).
        e = tl.load((h_ptr + rows) + row_i, mask=ok, other=0.0)
        inv = tl.load((v_ptr + rows) + v_row, mask=ok, other=0.0)
        live = inv > 0
    return e, inv, (ok & ~live).to(e.dtype)


@triton.jit
def _lo_parts(l_ptr, row_i, rows, N):
    """The fast path's lo parts of E[i, rows] (0 outside)."""
    return tl.load(l_ptr + row_i + rows, mask=rows < N, other=0.0)


@triton.jit
def _tile(h_ptr, l_ptr, rj, rk, N, PARTS: tl.constexpr):
    """The (rj, rk) tile of E in float64 (_exact_load), for the exact path."""
    return _exact_load(h_ptr, l_ptr, rj[:, None].to(tl.int64) * N + rk[None, :],
                       (rj[:, None] < N) & (rk[None, :] < N), PARTS)


@triton.jit
def _admits(pj, pk, live):
    """_plain_tile's test from the bounds pj of block j and pk of block k (4 floats each;
    scalars or vectors of pointers), True where not live."""
    ok = (tl.load(pj, mask=live, other=0.0) <= _PLAIN_RATIO_SQ * tl.load(pk + 1, mask=live, other=0.0)) & (
        tl.load(pk, mask=live, other=0.0) <= _PLAIN_RATIO_SQ * tl.load(pj + 1, mask=live, other=0.0))
    return ok & (tl.load(pj + 2, mask=live, other=0.0) <= _PLAIN_RATIO_SQ * tl.load(pk + 3, mask=live, other=0.0)) & (
        tl.load(pk + 2, mask=live, other=0.0) <= _PLAIN_RATIO_SQ * tl.load(pj + 3, mask=live, other=0.0))


@triton.jit
def _plain_tile(b_ptr, jb, kb):
    """Whether the fast path's tile of rows j in block jb and k in block kb takes plain
    polarisation (PLAIN_RATIO_SQ), from b_ptr, the anchor's (blocks, 4) bounds (per block:
    the student's largest and smallest live E, the teacher's). A block with no live direction
    reads (0, inf): it admits any other."""
    return _admits(b_ptr + jb * 4, b_ptr + kb * 4, True)


@triton.jit
def _plain_at_every_anchor(b_ptr, order_ptr, first, end, jb, kb, BLOCK: tl.constexpr):
    """Whether _plain_tile admits the tile (jb, kb) at every anchor order[first:end] (bounds
    b_ptr (R, blocks, 4)), BLOCK anchors a step: a test per tile instead of per anchor."""
    bad = 0
    for start in range(first, end, BLOCK):
        t = start + tl.arange(0, BLOCK)
        live = t < end
        row = b_ptr + tl.load(order_ptr + t, mask=live, other=0).to(tl.int64) * tl.num_programs(1) * 4
        bad += tl.sum((~_admits(row + jb * 4, row + kb * 4, live)).to(tl.int32), 0)
    return bad == 0


@triton.jit
def _plain_in_every_block(b_ptr, jb, blocks, BLOCK: tl.constexpr):
    """Whether _plain_tile admits the tiles (jb, kb) of one anchor (bounds b_ptr (blocks, 4))
    for every k block, BLOCK blocks a step: a test per program instead of per tile."""
    bad = 0
    for start in range(0, blocks, BLOCK):
        kb = start + tl.arange(0, BLOCK)
        pj = b_ptr + jb * 4 + tl.zeros_like(kb)  # a block of pointers, as a block mask needs
        bad += tl.sum((~_admits(pj, b_ptr + kb * 4, kb < blocks)).to(tl.int32), 0)
    return bad == 0


@triton.jit
def _plain_angle(ejk, eij, eik, inv_j, inv_k):
    """(A_jk, p) of a tile _plain_tile admits: v = (E_ij + E_ik) - E_jk of E's hi parts in
    plain float32, A = v p, p = inv_j inv_k / 2 (as _angle_tile's, 0 along a zero direction)."""
    p = (0.5 * inv_j)[:, None] * inv_k[None, :]
    return ((eij[:, None] + eik[None, :]) - ejk) * p, p


@triton.jit
def _angle_tile(ejk, ejk_lo, eij, eij_lo, eik, eik_lo, inv_j, inv_k, EXACT: tl.constexpr):
    """(A_jk, v, v_lo, p) with v = 2 V_jk = E_ij + E_ik - E_jk and p = inv_j inv_k / 2: for
    EXACT v alone (v_lo = v, unused); else v the rounded sum of the hi parts and v_lo its
    rounding errors (two-sum) plus the lo parts, v + v_lo = 2 V to about u32^2 (E_ij + E_ik +
    E_jk). A = (v + v_lo) p is 0 along a zero direction (inv = 0) and outside the matrix
    (E and inv read as 0 there), but on the diagonal j = k only about 1 for a live direction:
    where the diagonal counts (the loss) it is set there; u is 0 on it (_angle_u)."""
    if EXACT:
        v = (eij[:, None] + eik[None, :]) - ejk
        v_lo = v
        whole = v
    else:
        s, err = two_sum(eij[:, None], eik[None, :])
        v, err2 = two_sum(s, -ejk)
        v_lo = (err + err2) + ((eij_lo[:, None] + eik_lo[None, :]) - ejk_lo)
        whole = v + v_lo
    p = (0.5 * inv_j)[:, None] * inv_k[None, :]
    return whole * p, v, v_lo, p


@triton.jit
def _doubled_angle(v, v_lo, inv_j, w_j, inv_k, w_k):
    """2 A_jk = v inv_j inv_k (fast path) in double-float, (a, a_lo) to about u32^2 |A|, from
    v + v_lo (_angle_tile) and the inverse norms inv + w; formed as (v inv_j) inv_k, so that
    no intermediate is as small as 1 / E, the small terms by multiply-adds."""
    q, q_lo = two_prod(v, inv_j[:, None])
    q_lo = tl.fma(v, w_j[:, None], tl.fma(v_lo, inv_j[:, None], q_lo))
    a, a_lo = two_prod(q, inv_k[None, :])
    return a, tl.fma(q, w_k[None, :], tl.fma(q_lo, inv_k[None, :], a_lo))


@triton.jit
def _angle_u(d, rj, rk):
    """h'(d), d = A_s - A_t, 0 on j = k."""
    u = tl.minimum(tl.maximum(d, -1.0), 1.0)
    return tl.where(rj[:, None] == rk[None, :], 0.0, u)


@triton.jit
def _store_angle_stats(out, plane, ok, u_inv, u_a, u_dead, inv, dead):
    """w1, s / c, q / c (see the section's header) for anchor i and these rows j, at
    out + k plane."""
    tl.store(out, inv * u_inv - inv * inv * u_a, mask=ok)
    tl.store(out + plane, dead * u_inv, mask=ok)
    tl.store(out + 2 * plane, inv * u_dead, mask=ok)


@triton.jit
def _fast_angles(ls_ptr, lt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t, invk_t, row_i,
                 rk, N, ljk_s, ljk_t, lij_s, lij_t):
    """Both sides' (A_jk, v, v_lo, p) on the fast path, compensated (_angle_tile) from E's hi
    parts and the lo parts: those of the directions k loaded here, of the directions j
    (lij_*) and of the tile (ljk_*) given."""
    a_s, v_s, vlo_s, p_s = _angle_tile(ejk_s, ljk_s, eij_s, lij_s, eik_s, _lo_parts(ls_ptr, row_i, rk, N), invj_s,
                                       invk_s, False)
    a_t, v_t, vlo_t, p_t = _angle_tile(ejk_t, ljk_t, eij_t, lij_t, eik_t, _lo_parts(lt_ptr, row_i, rk, N), invj_t,
                                       invk_t, False)
    return a_s, v_s, vlo_s, p_s, a_t, v_t, vlo_t, p_t


@triton.jit
def _doubled_difference(ws_ptr, wt_ptr, v_s, vlo_s, v_t, vlo_t, invj_s, invk_s, invj_t, invk_t, wj_s, wj_t, v_row,
                        rk, N):
    """A_s - A_t for the loss from the compensated v + v_lo of each side (_angle_tile): each
    side's angle rounded to float32 leaves an error of u32 |A| in the difference, large next
    to the difference itself when the teacher is near the student, so the angles are taken
    in double-float (_doubled_angle) and their difference rounded once."""
    ok = rk < N
    as_hi, as_lo = _doubled_angle(v_s, vlo_s, invj_s, wj_s, invk_s, tl.load(ws_ptr + v_row + rk, mask=ok, other=0.0))
    at_hi, at_lo = _doubled_angle(v_t, vlo_t, invj_t, wj_t, invk_t, tl.load(wt_ptr + v_row + rk, mask=ok, other=0.0))
    return 0.5 * ((as_hi - at_hi) + (as_lo - at_lo))


@triton.jit
def _loss_difference(ls_ptr, lt_ptr, ws_ptr, wt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t,
                     invk_t, wj_s, wj_t, row_i, v_row, rj, rk, N, lij_s, lij_t):
    """_doubled_difference from E's hi parts and the lo parts, compensated (_fast_angles)."""
    _, v_s, vlo_s, _, _, v_t, vlo_t, _ = _fast_angles(
        ls_ptr, lt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t, invk_t, row_i, rk, N,
        _load_tile(ls_ptr, rj, rk, N, N), _load_tile(lt_ptr, rj, rk, N, N), lij_s, lij_t)
    return _doubled_difference(ws_ptr, wt_ptr, v_s, vlo_s, v_t, vlo_t, invj_s, invk_s, invj_t, invk_t, wj_s, wj_t,
                               v_row, rk, N)


@triton.jit
def _add_loss(loss, diff, start, j0, diagonal, diagonal_diff):
    """loss plus h(diff) over the k block from start: the program's own block (j0) once, with
    the diagonal's difference diagonal_diff, the blocks past it twice (the angle is symmetric
    in j, k)."""
    if start == j0:
        loss += _smooth_l1(tl.where(diagonal, diagonal_diff, diff))
    else:
        loss += 2.0 * _smooth_l1(diff)
    return loss


@triton.jit
def _angle_fwd(hs_ptr, ls_ptr, vs_ptr, ws_ptr, ht_ptr, lt_ptr, vt_ptr, wt_ptr, bounds_ptr, order_ptr, count_ptr,
               part_ptr, stats_ptr, lo, N, EXACT: tl.constexpr, PARTS: tl.constexpr, STATS: tl.constexpr,
               DEAD: tl.constexpr, BLOCK: tl.constexpr):
    """The forward kernels' body (see _rkd_angle_fwd_kernel), over this path's anchors; w_*
    the lo parts of the fast path's inverse norms and bounds its tiles' (_plain_tile) (none
    read for EXACT). DEAD: the sums over zero directions k (q); without it they are taken as
    0, as they are at an anchor whose only zero direction is its own (u = 0 along it)."""
    t = tl.program_id(0)
    # counts = (direct anchors, direct and exact anchors, and the fast anchors with a zero
    # direction besides their own): order[:counts[0]] is the direct path's,
    # order[counts[0]:counts[1]] the exact one's, the rest the fast one's.
    count = tl.load(count_ptr + 1)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    part = part_ptr + t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    if EXACT:
        mine = (t >= tl.load(count_ptr)) & (t < count)
    else:
        mine = t >= count
    if mine:
        i = lo + tl.load(order_ptr + t)
        row_i = i.to(tl.int64) * N
        v_row = (i - lo).to(tl.int64) * N
        eij_s, invj_s, deadj_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rj, N, EXACT, PARTS)
        eij_t, invj_t, deadj_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rj, N, EXACT, PARTS)
        if not EXACT:
            lij_s = _lo_parts(ls_ptr, row_i, rj, N)
            lij_t = _lo_parts(lt_ptr, row_i, rj, N)
            wj_s = tl.load(ws_ptr + v_row + rj, mask=rj < N, other=0.0)
            wj_t = tl.load(wt_ptr + v_row + rj, mask=rj < N, other=0.0)
            b_row = bounds_ptr + (i - lo).to(tl.int64) * tl.num_programs(1) * 4
            # One test for the anchor's whole row of tiles first: where it passes, none per tile.
            every = _plain_in_every_block(b_row, tl.program_id(1), tl.num_programs(1), BLOCK)
        # Summed elementwise over the k blocks and reduced over k once at the end: a reduction
        # per block costs cross-thread shuffles, about as many instructions as the angles.
        loss = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ui_s = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ua_s = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ud_s = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ui_t = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ua_t = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        ud_t = tl.zeros([BLOCK, BLOCK], dtype=eij_s.dtype)
        # The angle is symmetric in (j, k), so the loss is summed over the k blocks from this
        # program's own (j0) on, the blocks past it counted twice; the blocks before it are
        # read only for the row sums of STATS.
        j0 = tl.program_id(1) * BLOCK
        diagonal = rj[:, None] == (j0 + tl.arange(0, BLOCK))[None, :]
        # On the diagonal A_jj is 1 along a live direction, 0 along a zero one.
        diagonal_diff = (invj_s > 0).to(eij_s.dtype)[:, None] - (invj_t > 0).to(eij_s.dtype)[:, None]
        for start in range(0 if STATS else j0, N, BLOCK):
            rk = start + tl.arange(0, BLOCK)
            eik_s, invk_s, deadk_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rk, N, EXACT, PARTS)
            eik_t, invk_t, deadk_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rk, N, EXACT, PARTS)
            if EXACT:
                ejk_s = _tile(hs_ptr, ls_ptr, rj, rk, N, PARTS)
                ejk_t = _tile(ht_ptr, lt_ptr, rj, rk, N, PARTS)
                a_s, _, _, _ = _angle_tile(ejk_s, ejk_s, eij_s, eij_s, eik_s, eik_s, invj_s, invk_s, True)
                a_t, _, _, _ = _angle_tile(ejk_t, ejk_t, eij_t, eij_t, eik_t, eik_t, invj_t, invk_t, True)
                if start >= j0:
                    loss = _add_loss(loss, a_s - a_t, start, j0, diagonal, diagonal_diff)
            else:
                ejk_s = _load_tile(hs_ptr, rj, rk, N, N)
                ejk_t = _load_tile(ht_ptr, rj, rk, N, N)
                # u must be the gradient kernel's, bitwise (its tiles hold k < j as well as k >= j):
                # where the derivatives of the angles cancel (rows on a line) a difference in
                # u's rounding would not. So the angles are plain wherever _plain_tile admits the
                # tile, as there, and compensated elsewhere.
                plain = every
                if not every:
                    plain = _plain_tile(b_row, tl.program_id(1), start // BLOCK)
                if plain:
                    a_s, _ = _plain_angle(ejk_s, eij_s, eik_s, invj_s, invk_s)
                    a_t, _ = _plain_angle(ejk_t, eij_t, eik_t, invj_t, invk_t)
                    if start >= j0:
                        loss = _add_loss(loss, _loss_difference(
                            ls_ptr, lt_ptr, ws_ptr, wt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s,
                            invk_s, invj_t, invk_t, wj_s, wj_t, row_i, v_row, rj, rk, N, lij_s, lij_t),
                            start, j0, diagonal, diagonal_diff)
                elif start >= j0:
                    a_s, v_s, vlo_s, _, a_t, v_t, vlo_t, _ = _fast_angles(
                        ls_ptr, lt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t, invk_t,
                        row_i, rk, N, _load_tile(ls_ptr, rj, rk, N, N), _load_tile(lt_ptr, rj, rk, N, N), lij_s,
                        lij_t)
                    loss = _add_loss(loss, _doubled_difference(
                        ws_ptr, wt_ptr, v_s, vlo_s, v_t, vlo_t, invj_s, invk_s, invj_t, invk_t, wj_s, wj_t, v_row,
                        rk, N), start, j0, diagonal, diagonal_diff)
                else:
                    a_s, _, _, _, a_t, _, _, _ = _fast_angles(
                        ls_ptr, lt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t, invk_t,
                        row_i, rk, N, _load_tile(ls_ptr, rj, rk, N, N), _load_tile(lt_ptr, rj, rk, N, N), lij_s,
                        lij_t)
            if STATS:
                # The sums' products by explicit multiply-adds (the kernels run NO_FMA).
                u = _angle_u(a_s - a_t, rj, rk)
                ui_s = tl.fma(u, invk_s[None, :], ui_s)
                ua_s = tl.fma(u, a_s, ua_s)
                ui_t = tl.fma(-u, invk_t[None, :], ui_t)
                ua_t = tl.fma(-u, a_t, ua_t)
                if DEAD:
                    ud_s += u * deadk_s[None, :]
                    ud_t -= u * deadk_t[None, :]
        tl.store(part, tl.sum(tl.sum(loss, 1), 0))
        if STATS:
            plane = tl.num_programs(0).to(tl.int64) * N
            out = stats_ptr + (i - lo).to(tl.int64) * N + rj
            _store_angle_stats(out, plane, rj < N, tl.sum(ui_s, 1), tl.sum(ua_s, 1), tl.sum(ud_s, 1),
                               invj_s, deadj_s)
            _store_angle_stats(out + 3 * plane, plane, rj < N, tl.sum(ui_t, 1), tl.sum(ua_t, 1),
                               tl.sum(ud_t, 1), invj_t, deadj_t)


@triton.jit
def _rkd_angle_fwd_kernel(es_ptr, ls_ptr, et_ptr, lt_ptr, order_ptr, count_ptr, part_ptr, stats_ptr, lo, N,
                          PARTS: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The exact path (float64 E: e_* itself, or with PARTS E's float32 parts e_* + l_*).
    Program (t, b): anchor i = lo + order[t] if counts[0] <= t < counts[1] (else nothing: the
    direct or the fast kernel's), rows j of block b: part = sum h(A_s - A_t) over the k of
    block b once and of the blocks past it twice (A is symmetric in j, k), so that the parts
    of all b sum over every (j, k).

    With STATS, per side and row j the row sums sum_k u inv_k, sum_k u A and sum_k u dead_k,
    stored as w1, s, q at [stat, i - lo, j] of stats (6, R, N) (the anchors lo:lo + R, R
    programs): student 0-2, teacher 3-5."""
    _angle_fwd(es_ptr, ls_ptr, es_ptr, es_ptr, et_ptr, lt_ptr, et_ptr, et_ptr, es_ptr, order_ptr, count_ptr,
               part_ptr, stats_ptr, lo, N, EXACT=True, PARTS=PARTS, STATS=STATS, DEAD=True, BLOCK=BLOCK)


@triton.jit
def _rkd_angle_fwd_fast_kernel(hs_ptr, ls_ptr, vs_ptr, ws_ptr, ht_ptr, lt_ptr, vt_ptr, wt_ptr, bounds_ptr, order_ptr,
                               count_ptr, part_ptr, stats_ptr, lo, N, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The fast path (float32, E = hi + lo, v + w = 1 / sqrt(E), bounds (R, blocks, 4) the
    tiles' (_plain_tile)): _rkd_angle_fwd_kernel for the anchors order[t], t >= counts[1]; the
    sums over zero directions only at those before counts[2]."""
    if tl.program_id(0) < tl.load(count_ptr + 2):
        _angle_fwd(hs_ptr, ls_ptr, vs_ptr, ws_ptr, ht_ptr, lt_ptr, vt_ptr, wt_ptr, bounds_ptr, order_ptr, count_ptr,
                   part_ptr, stats_ptr, lo, N, EXACT=False, PARTS=True, STATS=STATS, DEAD=True, BLOCK=BLOCK)
    else:
        _angle_fwd(hs_ptr, ls_ptr, vs_ptr, ws_ptr, ht_ptr, lt_ptr, vt_ptr, wt_ptr, bounds_ptr, order_ptr, count_ptr,
                   part_ptr, stats_ptr, lo, N, EXACT=False, PARTS=True, STATS=STATS, DEAD=False, BLOCK=BLOCK)


@triton.jit
def _add_tile(out, rows, cols, N, ok, value, ADD: tl.constexpr):
    """out[rows, cols] = value, or += value with ADD."""
    ptr = out + rows[:, None].to(tl.int64) * N + cols[None, :]
    if ADD:
        value += tl.load(ptr, mask=ok, other=0.0)
    tl.store(ptr, value, mask=ok)


@triton.jit
def _store_grad_tile(out, plane, rj, rk, N, ok, w, z, z_t, ADD: tl.constexpr):
    """One side's w2 (symmetric) and z2 at the (j, k) tile and, off the diagonal, at the
    (k, j) one (z_t: z2's (k, j) entries, indexed (j, k))."""
    _add_tile(out, rj, rk, N, ok, w, ADD)
    _add_tile(out + plane, rj, rk, N, ok, z, ADD)
    if tl.program_id(0) != tl.program_id(1):
        _add_tile(out, rk, rj, N, tl.trans(ok), tl.trans(w), ADD)
        _add_tile(out + plane, rk, rj, N, tl.trans(ok), tl.trans(z_t), ADD)


@triton.jit
def _angle_grad_anchors(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, first, end, lo, N,
                        rj, rk, ejk_s, ljk_s, ejk_t, ljk_t, w_s, z_s, zt_s, w_t, z_t, zt_t, EXACT: tl.constexpr,
                        PARTS: tl.constexpr, DEAD: tl.constexpr):
    """The sums of _angle_grad over the anchors order[first:end], added to (w_s, z_s, zt_s,
    w_t, z_t, zt_t); w holds sum_i u inv_j inv_k / 2. Without DEAD the z sums are left as
    they are: at an anchor whose only zero direction is its own, u is 0 along it. The fast
    path takes plain polarisation at the anchors whose bounds admit the tile: at every one,
    untested, where _plain_at_every_anchor admits it for all of them, else by _plain_tile."""
    # E's rows from lo on, as v's: one offset (the anchor's local row) serves both.
    hs_ptr += lo.to(tl.int64) * N
    ls_ptr += lo.to(tl.int64) * N
    ht_ptr += lo.to(tl.int64) * N
    lt_ptr += lo.to(tl.int64) * N
    if not EXACT:
        # One test for the tile at every anchor first: where it passes, none per anchor.
        every = _plain_at_every_anchor(bounds_ptr, order_ptr, first, end, tl.program_id(0), tl.program_id(1),
                                       rj.shape[0])
    for t in range(first, end):
        local = tl.load(order_ptr + t).to(tl.int64)
        row_i = local * N
        eij_s, invj_s, deadj_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, row_i, rj, N, EXACT, PARTS)
        eik_s, invk_s, deadk_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, row_i, rk, N, EXACT, PARTS)
        eij_t, invj_t, deadj_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, row_i, rj, N, EXACT, PARTS)
        eik_t, invk_t, deadk_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, row_i, rk, N, EXACT, PARTS)
        if EXACT:
            a_s, _, _, p_s = _angle_tile(ejk_s, ejk_s, eij_s, eij_s, eik_s, eik_s, invj_s, invk_s, True)
            a_t, _, _, p_t = _angle_tile(ejk_t, ejk_t, eij_t, eij_t, eik_t, eik_t, invj_t, invk_t, True)
        else:
            plain = every
            if not every:
                plain = _plain_tile(bounds_ptr + local * tl.num_programs(1) * 4, tl.program_id(0), tl.program_id(1))
            if plain:
                a_s, p_s = _plain_angle(ejk_s, eij_s, eik_s, invj_s, invk_s)
                a_t, p_t = _plain_angle(ejk_t, eij_t, eik_t, invj_t, invk_t)
            else:
                lij_s = _lo_parts(ls_ptr, row_i, rj, N)
                lij_t = _lo_parts(lt_ptr, row_i, rj, N)
                a_s, _, _, p_s, a_t, _, _, p_t = _fast_angles(
                    ls_ptr, lt_ptr, ejk_s, ejk_t, eij_s, eik_s, eij_t, eik_t, invj_s, invk_s, invj_t, invk_t, row_i,
                    rk, N, ljk_s, ljk_t, lij_s, lij_t)
        u = _angle_u(a_s - a_t, rj, rk)
        w_s = tl.fma(u, p_s, w_s)  # explicit multiply-adds: the kernels run NO_FMA
        w_t = tl.fma(-u, p_t, w_t)
        if DEAD:
            z_s += u * deadj_s[:, None] * invk_s[None, :]
            zt_s += u * invj_s[:, None] * deadk_s[None, :]
            z_t -= u * deadj_t[:, None] * invk_t[None, :]
            zt_t -= u * invj_t[:, None] * deadk_t[None, :]
    return w_s, z_s, zt_s, w_t, z_t, zt_t


@triton.jit
def _angle_grad(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                EXACT: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """The tile kernels' body (see _rkd_angle_grad_kernel), over this path's anchors.
    u is symmetric in (j, k), so only the tiles on and above the diagonal are computed, each
    giving its transpose too: w2 is symmetric, z2's (k, j) entries are sum_i u dead_k inv_j.
    The fast path's anchors with no zero direction besides their own (order[counts[2]:])
    skip the z sums (_angle_grad_anchors)."""
    if tl.program_id(0) <= tl.program_id(1):
        rj = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (rj[:, None] < N) & (rk[None, :] < N)
        count = tl.load(count_ptr + 1)
        if EXACT:
            ejk_s = _tile(hs_ptr, ls_ptr, rj, rk, N, PARTS)
            ejk_t = _tile(ht_ptr, lt_ptr, rj, rk, N, PARTS)
            zero = tl.zeros([BLOCK, BLOCK], dtype=ejk_s.dtype)
            w_s, z_s, zt_s, w_t, z_t, zt_t = _angle_grad_anchors(
                hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, tl.load(count_ptr), count, lo,
                N, rj, rk, ejk_s, ejk_s, ejk_t, ejk_t, zero, zero, zero, zero, zero, zero, EXACT, PARTS, True)
        else:
            ejk_s = _load_tile(hs_ptr, rj, rk, N, N)
            ejk_t = _load_tile(ht_ptr, rj, rk, N, N)
            ljk_s = _load_tile(ls_ptr, rj, rk, N, N)
            ljk_t = _load_tile(lt_ptr, rj, rk, N, N)
            zero = tl.zeros([BLOCK, BLOCK], dtype=ejk_s.dtype)
            dead = tl.load(count_ptr + 2)
            w_s, z_s, zt_s, w_t, z_t, zt_t = _angle_grad_anchors(
                hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, count, dead, lo, N, rj, rk,
                ejk_s, ljk_s, ejk_t, ljk_t, zero, zero, zero, zero, zero, zero, EXACT, PARTS, True)
            w_s, z_s, zt_s, w_t, z_t, zt_t = _angle_grad_anchors(
                hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, dead, R, lo, N, rj, rk,
                ejk_s, ljk_s, ejk_t, ljk_t, w_s, z_s, zt_s, w_t, z_t, zt_t, EXACT, PARTS, False)
        plane = N.to(tl.int64) * N
        # w holds half of w2's sum (p = inv_j inv_k / 2). Not EXACT: the exact kernel ran first
        # and left its anchors' sums in out.
        _store_grad_tile(out_ptr, plane, rj, rk, N, ok, -w_s, z_s, zt_s, not EXACT)
        _store_grad_tile(out_ptr + 2 * plane, plane, rj, rk, N, ok, -w_t, z_t, zt_t, not EXACT)


@triton.jit
def _rkd_angle_grad_kernel(es_ptr, ls_ptr, et_ptr, lt_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                           PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """The exact path (float64 E, as _rkd_angle_fwd_kernel reads it): the (j, k) tile of w2 and
    z2 / c (see the section's header) on each side, summed over the anchors order[t],
    counts[0] <= t < counts[1]; out (4, N, N) = (w2_s, z2_s / c, w2_t, z2_t / c), written whole."""
    _angle_grad(es_ptr, ls_ptr, es_ptr, et_ptr, lt_ptr, et_ptr, es_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                EXACT=True, PARTS=PARTS, BLOCK=BLOCK)


@triton.jit
def _rkd_angle_grad_fast_kernel(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, count_ptr,
                                out_ptr, lo, R, N, BLOCK: tl.constexpr):
    """The fast path (float32, E = hi + lo, v = 1 / sqrt(E), bounds as the forward's):
    _rkd_angle_grad_kernel's sums over the anchors order[t], counts[1] <= t < R (the z sums
    only to counts[2]), added to what out holds."""
    _angle_grad(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, bounds_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                EXACT=False, PARTS=True, BLOCK=BLOCK)


@triton.jit
def _side_rows(h_ptr, l_ptr, v_ptr, w_ptr, b_ptr, ra, lo, R, N, BLOCK: tl.constexpr):
    """_fast_rows_kernel for one side: stores v, w and, at b_ptr + 4 (blocks (a - lo) + block)
    for anchor a, each block's largest and smallest live E (0, inf where none is live);
    returns the rows' flags (int32): 3 for the direct path (a direction shorter than NORM_EPS
    but not zero, or live squared distances spread past DIRECT_RATIO_SQ_FLOAT32), 2 for the
    exact one, 1 for the fast one with a zero direction besides the anchor's own (a duplicate
    row), 0."""
    top = tl.zeros([BLOCK], dtype=tl.float32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    tiny = tl.zeros([BLOCK], dtype=tl.int32)
    dup = tl.zeros([BLOCK], dtype=tl.int32)
    bounds = b_ptr + ra.to(tl.int64) * tl.cdiv(N, BLOCK) * 4
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        at = (lo + ra[:, None]).to(tl.int64) * N + rb[None, :]
        e = tl.load(h_ptr + at, mask=ok, other=0.0)
        live = e >= _NORM_EPS_SQ
        # 1 / sqrt(E) in double-float: v within an ulp, as the angles need; v + w to about
        # u32^2, for the loss's double-float angles (_doubled_angle).
        e_lo = tl.load(l_ptr + at, mask=ok, other=0.0)
        s, s_lo = dd_sqrt(tl.where(live, e, 1.0), tl.where(live, e_lo, 0.0))
        inv, inv_lo = dd_div(1.0, 0.0, s, s_lo)
        out = ra[:, None].to(tl.int64) * N + rb[None, :]
        tl.store(v_ptr + out, tl.where(live, inv, 0.0), mask=ok)
        tl.store(w_ptr + out, tl.where(live, inv_lo, 0.0), mask=ok)
        top = tl.maximum(top, tl.max(tl.where(ok, e, 0.0), 1))
        counted = ok & live
        block_low = tl.min(tl.where(counted, e, float("inf")), 1)
        low = tl.minimum(low, block_low)
        tl.store(bounds + (start // BLOCK) * 4, tl.max(tl.where(counted, e, 0.0), 1), mask=ra < R)
        tl.store(bounds + (start // BLOCK) * 4 + 1, block_low, mask=ra < R)
        nan = tl.maximum(nan, tl.max((ok & (e != e)).to(tl.int32), 1))
        tiny = tl.maximum(tiny, tl.max((ok & (e > 0) & ~live).to(tl.int32), 1))
        dup = tl.maximum(dup, tl.max((ok & ~live & (rb[None, :] != lo + ra[:, None])).to(tl.int32), 1))
    holds = ((top <= _FAST_RATIO_SQ * low) | (top < _NORM_EPS_SQ)) & (top <= _FAST_MAX)
    direct = (tiny > 0) | (top > _DIRECT_RATIO_SQ_FLOAT32 * low)
    return tl.where(direct, 3, tl.where(holds & (nan == 0), dup, 2))


@triton.jit
def _fast_rows_kernel(hs_ptr, ls_ptr, ht_ptr, lt_ptr, vs_ptr, vt_ptr, ws_ptr, wt_ptr, bounds_ptr, flag_ptr, lo, R,
                      N, BLOCK: tl.constexpr):
    """For a block of the anchors lo:lo + R (rows of E = hi + lo (N, N) float32, each side):
    their inverse norms v + w = 1 / sqrt(E) (double-float; 0 for a zero direction) at
    (i - lo, :) of v and w (R, N), and flag[i - lo] = 2 where the fast path cannot hold the
    anchor (module docstring): on either side its live squared distances spread past
    FAST_RATIO_SQ, reach FAST_MAX or are NaN; 3 where it needs the direct path (a squared
    distance in (0, NORM_EPS^2), or live ones spread past DIRECT_RATIO_SQ_FLOAT32); 1 where
    the fast path holds it but it has a zero direction besides its own on either side; else
    0. And bounds (R, blocks, 4): per anchor and block of BLOCK directions, the student's
    largest and smallest live E, then the teacher's (_plain_tile)."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    flag = _side_rows(hs_ptr, ls_ptr, vs_ptr, ws_ptr, bounds_ptr, ra, lo, R, N, BLOCK)
    flag = tl.maximum(flag, _side_rows(ht_ptr, lt_ptr, vt_ptr, wt_ptr, bounds_ptr + 2, ra, lo, R, N, BLOCK))
    tl.store(flag_ptr + ra, flag, mask=ra < R)


@triton.jit
def _direct_flags(e_ptr, ra, lo, R, N, BLOCK: tl.constexpr):
    """_exact_rows_kernel for one side: 1 where the anchor needs the direct path, else 0."""
    top = tl.zeros([BLOCK], dtype=tl.float64)
    low = tl.full([BLOCK], float("inf"), tl.float64)
    tiny = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        e = tl.load(e_ptr + (lo + ra[:, None]).to(tl.int64) * N + rb[None, :], mask=ok, other=0.0)
        live = e >= _NORM_EPS_SQ
        top = tl.maximum(top, tl.max(tl.where(ok, e, 0.0), 1))
        low = tl.minimum(low, tl.min(tl.where(ok & live, e, float("inf")), 1))
        tiny = tl.maximum(tiny, tl.max((ok & (e > 0) & ~live).to(tl.int32), 1))
    return ((top > _DIRECT_RATIO_SQ * low) | (tiny > 0)).to(tl.int32)


@triton.jit
def _exact_rows_kernel(es_ptr, et_ptr, flag_ptr, lo, R, N, BLOCK: tl.constexpr):
    """Float64 inputs: flag[i - lo] = 3 for the anchors lo:lo + R that take the direct path
    (on either side: live squared distances spread past DIRECT_RATIO_SQ, or one in
    (0, NORM_EPS^2)), else 2 (the exact path); E (N, N) float64 per side."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    direct = tl.maximum(_direct_flags(es_ptr, ra, lo, R, N, BLOCK), _direct_flags(et_ptr, ra, lo, R, N, BLOCK))
    tl.store(flag_ptr + ra, 2 + direct, mask=ra < R)


# --- the direct path ------------------------------------------------------------
# For anchor i, d_j = x_j - x_i (the rows' difference vectors, in float64), m_j =
# max(n_j, NORM_EPS), n_j = sqrt(E_ij), e_j = d_j / m_j (F.normalize) and A_jk = e_j . e_k =
# (d_j . d_k) inv_j inv_k, inv = 1 / m; A_jj = 1 for a live direction (n_j >= NORM_EPS),
# n_j^2 / NORM_EPS^2 for a dead one. The gradient is autograd's of that formula: with
# u = h'(A_s - A_t) (symmetric; 0 on j = k for a live direction, where A_jj is constant) and
# g_j = dL/de_j = 2 sum_k u_jk e_k, F.normalize's backward gives
#     dL/dd_j = inv_j (g_j - live_j e_j (e_j . g_j)) = sum_k C_jk d_k + c_j d_j,
#     C_jk = 2 inv_j u_jk inv_k,   c_j = -2 live_j inv_j^2 sum_k u_jk A_jk,
# which x_j receives and x_i gives back: dL/dx_i -= sum_j dL/dd_j = sum_k r_k d_k,
# r_k = sum_j C_jk + c_k. Every product is of a difference vector taken from the anchor, as
# the reference's are, so nothing cancels that the reference keeps.

@triton.jit
def _direct_norms(e_ptr, l_ptr, row_i, rows, N, PARTS: tl.constexpr):
    """(inv, live) of anchor i's directions to `rows`: inv = 1 / max(sqrt(E_ij), NORM_EPS),
    live = [E_ij >= NORM_EPS^2] (0 outside); E float64 as _exact_load reads it."""
    ok = rows < N
    e = _exact_load(e_ptr, l_ptr, row_i + rows, ok, PARTS)
    live = e >= _NORM_EPS_SQ
    # 1 / NORM_EPS = 1e12 exactly: a float constant reaches a kernel as a float32, which 1e12
    # is not; 1e6 is, and its square in float64 is exact.
    million = tl.full([1], 1e6, tl.float64)
    inv = tl.where(live, 1.0 / sqrt(tl.where(live, e, 1.0)), million * million)
    return inv, (ok & live).to(e.dtype)


@triton.jit
def _differences(x_ptr, sn, sd, i, rows, f, N, D):
    """x[rows, f] - x[i, f] (len(rows), len(f)) in float64 (0 outside)."""
    xi = tl.load(x_ptr + i.to(tl.int64) * sn + f.to(tl.int64) * sd, mask=f < D, other=0.0).to(tl.float64)
    ok = (rows[:, None] < N) & (f[None, :] < D)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sn + f[None, :].to(tl.int64) * sd, mask=ok, other=0.0)
    return tl.where(ok, x.to(tl.float64) - xi[None, :], 0.0)


@triton.jit
def _direct_angles(x_ptr, sn, sd, D, i, rj, rk, inv_j, live_j, inv_k, N,
                   BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """A_jk (BLOCK, BLOCK) float64 of anchor i from the difference vectors (the section's
    header), 0 outside."""
    v = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
    for start in range(0, D, BLOCK_F):
        f = start + tl.arange(0, BLOCK_F)
        dj = _differences(x_ptr, sn, sd, i, rj, f, N, D)
        dk = _differences(x_ptr, sn, sd, i, rk, f, N, D)
        v += tl.sum(dj[:, None, :] * dk[None, :, :], axis=2)
    a = v * inv_j[:, None] * inv_k[None, :]
    a = tl.where((rj[:, None] == rk[None, :]) & (live_j[:, None] > 0), 1.0, a)
    return tl.where((rj[:, None] < N) & (rk[None, :] < N), a, 0.0)


@triton.jit
def _rkd_angle_fwd_direct_kernel(xs_ptr, sns, sds, Ds, xt_ptr, snt, sdt, Dt, es_ptr, ls_ptr, et_ptr, lt_ptr,
                                 order_ptr, count_ptr, part_ptr, stats_ptr, lo, N, PARTS: tl.constexpr,
                                 STATS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """The direct path: program (t, b), anchor i = lo + order[t] if t < counts[0] (else
    nothing), rows j of block b, all k: part = sum h(A_s - A_t), A from the rows x_* (N, D_*)
    (any float dtype, read through their strides) and E (N, N) (the norms: float64 E, or
    with PARTS its float32 parts e_* + l_*, as _exact_load reads them). With
    STATS, zeros at the anchor's rows of the other paths' stats (6, R, N): its gradient is
    _rkd_angle_grad_direct_kernel's."""
    t = tl.program_id(0)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if t < tl.load(count_ptr):
        i = lo + tl.load(order_ptr + t)
        row_i = i.to(tl.int64) * N
        invj_s, livej_s = _direct_norms(es_ptr, ls_ptr, row_i, rj, N, PARTS)
        invj_t, livej_t = _direct_norms(et_ptr, lt_ptr, row_i, rj, N, PARTS)
        loss = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
        for start in range(0, N, BLOCK):
            rk = start + tl.arange(0, BLOCK)
            invk_s, _ = _direct_norms(es_ptr, ls_ptr, row_i, rk, N, PARTS)
            invk_t, _ = _direct_norms(et_ptr, lt_ptr, row_i, rk, N, PARTS)
            a_s = _direct_angles(xs_ptr, sns, sds, Ds, i, rj, rk, invj_s, livej_s, invk_s, N, BLOCK, BLOCK_F)
            a_t = _direct_angles(xt_ptr, snt, sdt, Dt, i, rj, rk, invj_t, livej_t, invk_t, N, BLOCK, BLOCK_F)
            loss += _smooth_l1(a_s - a_t)
        tl.store(part_ptr + t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(loss, 1), 0))
        if STATS:
            plane = tl.num_programs(0).to(tl.int64) * N
            out = stats_ptr + (i - lo).to(tl.int64) * N + rj
            zero = tl.zeros([BLOCK], dtype=stats_ptr.dtype.element_ty)
            for k in tl.static_range(6):
                tl.store(out + k * plane, zero, mask=rj < N)


@triton.jit
def _direct_coefficients(u_ptr, rj, rk, N, inv_j, live_j, inv_k):
    """C_jk = 2 inv_j u_jk inv_k from the stored u tile, 0 on j = k for a live direction."""
    u = _load_tile(u_ptr, rj, rk, N, N)
    u = tl.where((rj[:, None] == rk[None, :]) & (live_j[:, None] > 0), 0.0, u)
    return 2.0 * u * inv_j[:, None] * inv_k[None, :]


@triton.jit
def _direct_rows_grad(x_ptr, sn, sd, D, e_ptr, l_ptr, g_ptr, u_ptr, i, rj, c_j, s, N, PARTS: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """g[rj] += s * (sum_k C_jk d_k + c_j d_j) for one side, C from the u (N, N) of anchor i
    (g (N, D) contiguous, in the input's dtype)."""
    row_i = i.to(tl.int64) * N
    inv_j, live_j = _direct_norms(e_ptr, l_ptr, row_i, rj, N, PARTS)
    for start in range(0, D, BLOCK_F):
        f = start + tl.arange(0, BLOCK_F)
        acc = c_j[:, None] * _differences(x_ptr, sn, sd, i, rj, f, N, D)
        for kstart in range(0, N, BLOCK):
            rk = kstart + tl.arange(0, BLOCK)
            inv_k, _ = _direct_norms(e_ptr, l_ptr, row_i, rk, N, PARTS)
            c = _direct_coefficients(u_ptr, rj, rk, N, inv_j, live_j, inv_k)
            dk = _differences(x_ptr, sn, sd, i, rk, f, N, D)
            acc += tl.sum(c[:, :, None] * dk[None, :, :], axis=1)
        ok = (rj[:, None] < N) & (f[None, :] < D)
        ptr = g_ptr + rj[:, None].to(tl.int64) * D + f[None, :]
        g = tl.load(ptr, mask=ok, other=0.0).to(tl.float64) + s * acc
        tl.store(ptr, _cast(g, g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _direct_side_sums(a, u, rj, rk, inv_k, live_j):
    """sum_k u_jk inv_k and sum_k u_jk A_jk over this k block, u 0 on j = k for a live j."""
    u = tl.where((rj[:, None] == rk[None, :]) & (live_j[:, None] > 0), 0.0, u)
    return tl.sum(u * inv_k[None, :], 1), tl.sum(u * a, 1)


@triton.jit
def _rkd_angle_grad_direct_kernel(xs_ptr, sns, sds, Ds, xt_ptr, snt, sdt, Dt, es_ptr, ls_ptr, et_ptr, lt_ptr,
                                  order_ptr, count_ptr, u_ptr, rs_ptr, rt_ptr, gs_ptr, gt_ptr, scale_ptr, first, chunk,
                                  lo, N, PARTS: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                                  BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """The direct path's gradient on the rows j of block b (program b), summed over its
    anchors i = lo + order[t], first <= t < min(first + chunk, counts[0]) (the section's
    header): for each anchor, u (N, N) (scratch, these rows) and each side's r at
    [t - first, j] of r_* (chunk, N); then g_*[j] += scale * dL/dd_j on each side that needs
    it (g_* (N, D_*) contiguous, in the input's dtype, scale a 0-dim tensor).
    _rkd_angle_grad_direct_anchor_kernel then adds the anchors' own rows."""
    rj = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(scale_ptr).to(tl.float64)
    for t in range(first, tl.minimum(first + chunk, tl.load(count_ptr))):
        i = lo + tl.load(order_ptr + t)
        row_i = i.to(tl.int64) * N
        invj_s, livej_s = _direct_norms(es_ptr, ls_ptr, row_i, rj, N, PARTS)
        invj_t, livej_t = _direct_norms(et_ptr, lt_ptr, row_i, rj, N, PARTS)
        ui_s = tl.zeros([BLOCK], dtype=tl.float64)
        ua_s = tl.zeros([BLOCK], dtype=tl.float64)
        ui_t = tl.zeros([BLOCK], dtype=tl.float64)
        ua_t = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, N, BLOCK):
            rk = start + tl.arange(0, BLOCK)
            invk_s, _ = _direct_norms(es_ptr, ls_ptr, row_i, rk, N, PARTS)
            invk_t, _ = _direct_norms(et_ptr, lt_ptr, row_i, rk, N, PARTS)
            a_s = _direct_angles(xs_ptr, sns, sds, Ds, i, rj, rk, invj_s, livej_s, invk_s, N, BLOCK, BLOCK_F)
            a_t = _direct_angles(xt_ptr, snt, sdt, Dt, i, rj, rk, invj_t, livej_t, invk_t, N, BLOCK, BLOCK_F)
            u = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
            tl.store(u_ptr + rj[:, None].to(tl.int64) * N + rk[None, :], u,
                     mask=(rj[:, None] < N) & (rk[None, :] < N))
            ui, ua = _direct_side_sums(a_s, u, rj, rk, invk_s, livej_s)
            ui_s += ui
            ua_s += ua
            ui, ua = _direct_side_sums(a_t, u, rj, rk, invk_t, livej_t)
            ui_t += ui
            ua_t += ua
        # C and c of dL/dA = u; the teacher's dL/dA is -u, so its r and scale change sign.
        c_s = -2.0 * livej_s * invj_s * invj_s * ua_s
        c_t = -2.0 * livej_t * invj_t * invj_t * ua_t
        at = tl.cast(t - first, tl.int64) * N + rj
        tl.store(rs_ptr + at, 2.0 * invj_s * ui_s + c_s, mask=rj < N)
        tl.store(rt_ptr + at, -(2.0 * invj_t * ui_t + c_t), mask=rj < N)
        tl.debug_barrier()  # u's tiles, stored above by other threads, are read below
        if GRAD_S:
            _direct_rows_grad(xs_ptr, sns, sds, Ds, es_ptr, ls_ptr, gs_ptr, u_ptr, i, rj, c_s, s, N, PARTS, BLOCK,
                              BLOCK_F)
        if GRAD_T:
            _direct_rows_grad(xt_ptr, snt, sdt, Dt, et_ptr, lt_ptr, gt_ptr, u_ptr, i, rj, c_t, -s, N, PARTS, BLOCK,
                              BLOCK_F)
        tl.debug_barrier()  # the next anchor's u overwrites these rows


@triton.jit
def _rkd_angle_grad_direct_anchor_kernel(x_ptr, sn, sd, D, order_ptr, count_ptr, r_ptr, g_ptr, scale_ptr, first,
                                         lo, N, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """One side: g[i, f] -= scale * sum_k r_k d_k[f] for the anchor i = lo + order[t] of
    program (t - first, f block), t < counts[0]; r (chunk, N) that side's plane of the row
    kernel's r, from the anchor order[first]."""
    t = first + tl.program_id(0)
    if t < tl.load(count_ptr):
        i = lo + tl.load(order_ptr + t)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        acc = tl.zeros([BLOCK, BLOCK_F], dtype=tl.float64)
        for start in range(0, N, BLOCK):
            rk = start + tl.arange(0, BLOCK)
            r = tl.load(r_ptr + (t - first).to(tl.int64) * N + rk, mask=rk < N, other=0.0)
            acc += r[:, None] * _differences(x_ptr, sn, sd, i, rk, f, N, D)
        ptr = g_ptr + i.to(tl.int64) * D + f
        g = tl.load(ptr, mask=f < D, other=0.0).to(tl.float64) - tl.load(scale_ptr).to(tl.float64) * tl.sum(acc, 0)
        tl.store(ptr, _cast(g, g_ptr.dtype.element_ty), mask=f < D)


def _ordered(flag):
    """(order, counts) from the anchors' paths, flag (R,) int32 (3 direct, 2 exact, 1 fast with
    a zero direction besides the anchor's own, 0 fast): the anchors sorted so, and counts (3,)
    int32 = the anchors flagged at least 3, 2 and 1, on the device: no host sync."""
    order = torch.sort(flag, descending=True, stable=True).indices
    levels = torch.arange(3, 0, -1, dtype=flag.dtype, device=flag.device)
    return order, (flag.unsqueeze(1) >= levels).sum(0, dtype=torch.int32)


def anchor_order(parts, n, lo, anchors):
    """(order, counts, v_s, v_t, w_s, w_t, bounds) of the fast path, parts = (hi_s, lo_s,
    hi_t, lo_t) (N, N) float32: the anchors lo:lo + anchors as offsets from lo, those that take
    the direct path first, then those of the exact path (_ordered), each side's inverse norms
    at those anchors' rows, v + w (anchors, N) float32, and their tiles' bounds (anchors,
    blocks, 4) (_fast_rows_kernel)."""
    hi_s = parts[0]
    v_s = torch.empty((anchors, n), dtype=torch.float32, device=hi_s.device)
    v_t = torch.empty_like(v_s)
    w_s = torch.empty_like(v_s)
    w_t = torch.empty_like(v_s)
    bounds = torch.empty((anchors, cdiv(n, BLOCK), 4), dtype=torch.float32, device=hi_s.device)
    flag = torch.empty(anchors, dtype=torch.int32, device=hi_s.device)
    _fast_rows_kernel[(cdiv(anchors, BLOCK),)](*parts, v_s, v_t, w_s, w_t, bounds, flag, lo, anchors, n, BLOCK=BLOCK,
                                               **NO_FMA)
    return (*_ordered(flag), v_s, v_t, w_s, w_t, bounds)


def exact_anchor_order(e_s, e_t, lo, anchors):
    """(order, counts) of float64 inputs (E (N, N) float64 per side): the anchors lo:lo + anchors
    as offsets from lo, the direct path's first (_exact_rows_kernel), the exact path's next."""
    flag = torch.empty(anchors, dtype=torch.int32, device=e_s.device)
    _exact_rows_kernel[(cdiv(anchors, BLOCK),)](e_s, e_t, flag, lo, anchors, len(e_s), BLOCK=BLOCK, **NO_FMA)
    return _ordered(flag)


def _exact_reads(e_s, e_t, parts):
    """((es, ls, et, lt), PARTS): how the exact and direct kernels read each side's E: float64
    E (e_*; ls, lt unused), or on the fast path E's float32 parts (hi_s, lo_s, hi_t, lo_t),
    summed in float64 as they load them (_exact_load)."""
    if parts is None:
        return (e_s, e_s, e_t, e_t), False
    return parts, True


def _saved_parts(fast):
    """The fast path's E parts (hi_s, lo_s, hi_t, lo_t) from rkd_angle_forward's saved fast
    tensors (hi_s, lo_s, v_s, hi_t, lo_t, v_t, bounds); None for float64 inputs (no fast tensors)."""
    return (fast[0], fast[1], fast[3], fast[4]) if fast else None


def rkd_angle_forward(e_s, e_t, with_stats, rows, lo=0, anchors=None, parts=None):
    """(N^3 * loss, saved for backward, or None); e_* the squared distances (N, N) float64,
    rows = (x_s, x_t) the rows (N, D_*) in any float dtype (the direct path's difference
    vectors). anchors: only the angles at the anchors lo:lo + anchors (R of them; all N by
    default), a global batch's share of the loss. parts: the fast path, for inputs that are
    not float64, in place of e_* (None): (hi_s, lo_s, hi_t, lo_t) float32 with hi + lo = E
    (gram.squared_distances_parts), float32 arithmetic for the anchors it suits and float64
    read from the parts for the others (the module docstring).
    saved = (stats, order, counts[, hi_s, lo_s, v_s, hi_t, lo_t, v_t, bounds]): stats (6, R, N) the
    per-anchor w1, s, q of each side (0 at the direct path's anchors), float32 on the fast
    path."""
    some = e_s if parts is None else parts[0]
    n = len(some)
    anchors = n if anchors is None else anchors
    nb = cdiv(n, BLOCK)
    device = some.device
    if parts is None:
        order, count = exact_anchor_order(e_s, e_t, lo, anchors)
    else:
        order, count, v_s, v_t, w_s, w_t, bounds = anchor_order(parts, n, lo, anchors)
    exact, in_parts = _exact_reads(e_s, e_t, parts)
    stats = torch.empty((6, anchors, n) if with_stats else (1,), dtype=some.dtype, device=device)
    # Each program writes its anchor's partial sum from one of the kernels.
    part = torch.empty(anchors * nb, dtype=torch.float64, device=device)
    x_s, x_t = rows
    _rkd_angle_fwd_direct_kernel[(anchors, nb)](x_s, x_s.stride(0), x_s.stride(1), x_s.shape[1], x_t, x_t.stride(0),
                                                x_t.stride(1), x_t.shape[1], *exact, order, count, part, stats, lo,
                                                n, PARTS=in_parts, STATS=with_stats, BLOCK=BLOCK,
                                                BLOCK_F=DIRECT_BLOCK_F, num_warps=TILE_WARPS, **NO_FMA)
    _rkd_angle_fwd_kernel[(anchors, nb)](*exact, order, count, part, stats, lo, n, PARTS=in_parts,
                                         STATS=with_stats, BLOCK=BLOCK, num_warps=TILE_WARPS, **NO_FMA)
    if parts is not None:
        fast = (parts[0], parts[1], v_s, parts[2], parts[3], v_t, bounds)
        _rkd_angle_fwd_fast_kernel[(anchors, nb)](parts[0], parts[1], v_s, w_s, parts[2], parts[3], v_t, w_t, bounds,
                                                  order, count, part, stats, lo, n, STATS=with_stats, BLOCK=BLOCK,
                                                  num_warps=TILE_WARPS, **NO_FMA)
    if not with_stats:
        return part.sum(), None
    return part.sum(), (stats, order, count) + (() if parts is None else fast)


def rkd_angle_direct_grad(rows, e_s, e_t, saved, grads, scale, lo=0):
    """Adds the direct path's anchors' share, scale * N^3 dL/dX, to the gradients grads =
    (g_s, g_t) (each (N, ...) contiguous in the rows' dtype, formed from the other paths'
    M, r; None where not needed), in place: rows, e_*, lo as rkd_angle_forward's (e_* None
    on the fast path), saved its saved, scale a 0-dim tensor (the upstream gradient times
    the loss's weight over N^3)."""
    stats, order, count, *fast = saved
    exact, in_parts = _exact_reads(e_s, e_t, _saved_parts(fast))
    x_s, x_t = rows
    g_s, g_t = (None if g is None else g.view(len(g), -1) for g in grads)
    n = len(exact[0])
    anchors = stats.shape[1]
    # u of one anchor at a time (each program its rows; float32 on the fast path, see the
    # module docstring), and each side's r at up to DIRECT_CHUNK direct anchors per launch:
    # the count is on the device, so the launches cover every anchor the path could take.
    u = torch.empty((n, n), dtype=torch.float32 if in_parts else torch.float64, device=stats.device)
    chunk = min(anchors, DIRECT_CHUNK)
    r = torch.empty((2, chunk, n), dtype=torch.float64, device=stats.device)
    some = g_s if g_s is not None else g_t
    for first in range(0, anchors, chunk):
        _rkd_angle_grad_direct_kernel[(cdiv(n, BLOCK),)](
            x_s, x_s.stride(0), x_s.stride(1), x_s.shape[1], x_t, x_t.stride(0), x_t.stride(1), x_t.shape[1], *exact,
            order, count, u, r[0], r[1], some if g_s is None else g_s, some if g_t is None else g_t, scale, first,
            chunk, lo, n, PARTS=in_parts, GRAD_S=g_s is not None, GRAD_T=g_t is not None, BLOCK=BLOCK,
            BLOCK_F=DIRECT_BLOCK_F, num_warps=TILE_WARPS, **NO_FMA)
        for x, plane, g in ((x_s, r[0], g_s), (x_t, r[1], g_t)):
            if g is not None:
                _rkd_angle_grad_direct_anchor_kernel[(chunk, cdiv(x.shape[1], DIRECT_ANCHOR_F))](
                    x, x.stride(0), x.stride(1), x.shape[1], order, count, plane, g, scale, first, lo, n, BLOCK=BLOCK,
                    BLOCK_F=DIRECT_ANCHOR_F, **NO_FMA)


@triton.jit
def _angle_grad_fast_m_kernel(tiles_ptr, stats_ptr, ds_ptr, dt_ptr, c, weight, dist_weight, lo, R, N,
                              DIST: tl.constexpr, BLOCK: tl.constexpr):
    """The fast path's M of each side at the tile (a, b), in place of that side's z2 in tiles
    (4, N, N) = (w2_s, z2_s, w2_t, z2_t), from stats (6, R, N) = (w1, s, q) per side, of the
    anchors lo:lo + R:
      M = weight (c (z2 - s^T - q) - 2 (W + W^T)),  W = w2 + w1
    (s^T on the anchors' columns, q and w1 on their rows), and with DIST + dist_weight M_d,
    M_d (R, N) per side (ds_ptr, dt_ptr) the distance term's M of the same rows. The element
    (a, b) reads only its own z2, so writing M over it is safe."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rb = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = (ra[:, None] < N) & (rb[None, :] < N)
    on_a = inside & ((ra[:, None] >= lo) & (ra[:, None] < lo + R))  # (a, b) on an anchor's row
    on_b = inside & ((rb[None, :] >= lo) & (rb[None, :] < lo + R))  # (b, a) on one
    at_ab = ra[:, None].to(tl.int64) * N + rb[None, :]
    at_ba = rb[None, :].to(tl.int64) * N + ra[:, None]
    anchor_ab = (ra[:, None] - lo).to(tl.int64) * N + rb[None, :]
    anchor_ba = (rb[None, :] - lo).to(tl.int64) * N + ra[:, None]
    plane = N.to(tl.int64) * N
    stat = R.to(tl.int64) * N
    for side in tl.static_range(2):
        w2 = tiles_ptr + (2 * side) * plane
        z2 = w2 + plane
        w1 = stats_ptr + (3 * side) * stat
        w_ab = tl.load(w2 + at_ab, mask=inside, other=0.0) + tl.load(w1 + anchor_ab, mask=on_a, other=0.0)
        w_ba = tl.load(w2 + at_ba, mask=inside, other=0.0) + tl.load(w1 + anchor_ba, mask=on_b, other=0.0)
        z = tl.load(z2 + at_ab, mask=inside, other=0.0) - tl.load(w1 + stat + anchor_ba, mask=on_b, other=0.0)
        z = (z - tl.load(w1 + 2 * stat + anchor_ab, mask=on_a, other=0.0)) * c
        m = weight * (z - 2.0 * (w_ab + w_ba))
        if DIST:
            m += dist_weight * tl.load((ds_ptr if side == 0 else dt_ptr) + anchor_ab, mask=on_a, other=0.0)
        tl.store(z2 + at_ab, m, mask=inside)


def rkd_angle_backward(e_s, e_t, saved, lo=0, weight=1.0, dist=None):
    """(M_s, None, M_t, None) with N^3 dL/dx_a = weight * sum_b M_ab (x_b - x_a) on each side
    (fastkd.kernels.gram.difference_grad: only M's off-diagonal entries count; the gradient
    M X + r * X whose r is minus M's row sums), e_* as rkd_angle_forward's (None on the fast
    path): M = Z - 2 S (N, N) from the forward's per-anchor stats (of the anchors lo:lo + R,
    R = stats.shape[1]) and the tile kernels' sums over the same anchors, float32 on the fast
    path (one kernel forms both sides' M from the tile sums: _angle_grad_fast_m_kernel),
    float64 otherwise. dist = (dist_weight, (M_d_s, r_d_s, M_d_t, r_d_t)): another term's M
    (rkd_distance_backward's, of the rows lo:lo + R) added times dist_weight, so both terms
    reach the rows in one map."""
    stats, order, count, *fast = saved
    exact, in_parts = _exact_reads(e_s, e_t, _saved_parts(fast))
    n = len(exact[0])
    anchors = stats.shape[1]
    nb = cdiv(n, BLOCK)
    tiles = torch.empty((4, n, n), dtype=stats.dtype, device=stats.device)
    # The anchors' loop bound, read from the device, holds one more register, which spilled at
    # TILE_WARPS in float64 (sm_80, sm_90); twice the warps (half the tile per thread) do not.
    _rkd_angle_grad_kernel[(nb, nb)](*exact, order, count, tiles, lo, anchors, n, PARTS=in_parts, BLOCK=BLOCK,
                                     num_warps=2 * TILE_WARPS, **NO_FMA)
    if fast:
        _rkd_angle_grad_fast_kernel[(nb, nb)](*fast, order, count, tiles, lo, anchors, n, BLOCK=BLOCK,
                                              num_warps=TILE_WARPS, **NO_FMA)
        dist_weight, (m_d_s, _, m_d_t, _) = dist if dist is not None else (0.0, (tiles,) * 4)
        # c in float32, as the kernel's float argument: the product stays in the buffers' dtype.
        _angle_grad_fast_m_kernel[(nb, nb)](tiles, stats, m_d_s, m_d_t, 2.0 / NORM_EPS, weight, dist_weight, lo,
                                            anchors, n, DIST=dist is not None, BLOCK=BLOCK, **NO_FMA)
        return tiles[1], None, tiles[3], None
    hi = lo + anchors
    out = []
    for (w1, s, q), (w2, z2) in ((stats[:3], tiles[:2]), (stats[3:], tiles[2:])):
        # In place on the tile kernel's buffers: w = w1 + w2 and z = z2 - s^T - q, with the
        # per-anchor terms on the anchors' rows (and s^T on their columns).
        w = w2
        w[lo:hi] += w1
        sym = w + w.t()
        z = z2
        z[:, lo:hi] -= s.t()
        z[lo:hi] -= q
        # c scales here, in the buffers' dtype: a kernel's Python float constant is a float32.
        z *= 2.0 / NORM_EPS
        m = z.sub_(sym, alpha=2)  # the difference form: its diagonal is never read
        if weight != 1.0:
            m *= weight
        out += [m, None]
    if dist is not None:
        dist_weight, (m_d_s, _, m_d_t, _) = dist
        out[0][lo:lo + len(m_d_s)] += m_d_s * dist_weight
        out[2][lo:lo + len(m_d_t)] += m_d_t * dist_weight
    return tuple(out)
