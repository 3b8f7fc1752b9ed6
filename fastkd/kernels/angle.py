"""Triton kernels of RKD's angle term, from the squared distances E (N, N) float64 of the
student's and the teacher's rows (`squared_distances`, fastkd/kernels/gram.py).

The angle at anchor i is read from E by polarisation, V_jk = (x_j - x_i).(x_k - x_i)
= (E_ij + E_ik - E_jk) / 2, A_jk = V_jk / (n_j n_k), n_j = sqrt(E_ij). Buffers are (N, N) at
most: the N^3 angles are read from E one anchor at a time.

Two paths, each in kernels of its own:
  exact  (`_rkd_angle_fwd_kernel`, `_rkd_angle_grad_kernel`) in float64: V's error is about
         u64 (E_ij + E_ik + E_jk) <= 3 u64 max(n_j, n_k)^2, relative to n_j n_k 1e-9 at a
         gap/spread ratio of 1e-7 (the float32 reference: about 1e-7 on every angle).
         Float64 inputs take it for every anchor.
  fast   (`_rkd_angle_fwd_fast_kernel`, `_rkd_angle_grad_fast_kernel`) in float32 only, for
         float32, bfloat16 and float16 inputs. E arrives as two float32 matrices, E = hi + lo
         to 2^-48 (gram.squared_distances_split, or `split`), and V is summed compensated: hi_ij + hi_ik - hi_jk with its
         rounding errors kept (Knuth's two-sum), plus the lo terms. V's error is then about
         u32 |V| + 4 u32^2 (E_ij + E_ik + E_jk), relative to n_j n_k about
         1e-7 + 1e-14 (rho + 1/rho + 1) with rho = n_j / n_k, the ratio of two distances
         from the anchor. An anchor whose distances (live ones, E >= NORM_EPS^2) spread over
         more than FAST_RATIO_SQ (rho up to 1e5: 1e-9 on an angle) on either side, or whose E
         could overflow float32, takes the exact path; every other anchor the fast one.
         A near-duplicate pair flags just its two anchors.
The anchors are ordered exact first (`anchor_order`, one kernel that also forms the fast
path's inverse norms): `count` of them, read on the device, so choosing a path costs no host
sync. Each kernel takes its own anchors from the order.
"""
import torch
import triton
import triton.language as tl

from ..common import zero_row_sums
from .common import cdiv, sqrt, two_sum
from .gram import BLOCK, TILE_WARPS, _load_tile, _smooth_l1

# The exact path's kernels: float64 on purpose, for float64 inputs and the anchors the fast
# path cannot hold (fastkd.kernels.resources lets them do float64 for any input dtype).
EXACT_FLOAT64_KERNELS = {"_rkd_angle_fwd_kernel", "_rkd_angle_grad_kernel"}

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
# A side's E reaches the shared pieces below as (hi, lo) pointers; the exact path passes
# E twice and never reads lo (EXACT).

@triton.jit
def _directions(h_ptr, l_ptr, v_ptr, row_i, v_row, rows, N, EXACT: tl.constexpr):
    """E[i, rows] as (hi, lo) (lo = hi, unused, for EXACT), inv = 1 / n (0 for a zero
    direction) and dead = [zero direction] (0 outside) for anchor i; row_i = i * N in int64,
    v_row = (i - lo) * N its row of the anchors' inverse norms. The fast path reads inv from
    that matrix (`_fast_rows_kernel`): a division and a square root
    per direction and anchor cost more instructions than the angles read from them."""
    ok = rows < N
    e = tl.load(h_ptr + row_i + rows, mask=ok, other=0.0)
    if EXACT:
        e_lo = e
        live = e >= _NORM_EPS_SQ
        inv = tl.where(live, 1.0 / sqrt(tl.where(live, e, 1.0)), 0.0)
    else:
        e_lo = tl.load(l_ptr + row_i + rows, mask=ok, other=0.0)
        inv = tl.load(v_ptr + v_row + rows, mask=ok, other=0.0)
        live = inv > 0
    return e, e_lo, inv, (ok & ~live).to(e.dtype)


@triton.jit
def _tile(h_ptr, l_ptr, rj, rk, N, EXACT: tl.constexpr):
    """The (rj, rk) tile of E as (hi, lo), as _directions."""
    e = _load_tile(h_ptr, rj, rk, N, N)
    if EXACT:
        e_lo = e
    else:
        e_lo = _load_tile(l_ptr, rj, rk, N, N)
    return e, e_lo


@triton.jit
def _angle_tile(ejk, ejk_lo, eij, eij_lo, eik, eik_lo, inv_j, inv_k, rj, rk, ok, EXACT: tl.constexpr):
    """A_jk; on j = k exactly 1 for a live direction (inv_j > 0), 0 for a zero one."""
    if EXACT:
        v = (eij[:, None] + eik[None, :]) - ejk
    else:
        s, err = two_sum(eij[:, None], eik[None, :])
        v, err2 = two_sum(s, -ejk)
        v = v + ((err + err2) + ((eij_lo[:, None] + eik_lo[None, :]) - ejk_lo))
    a = 0.5 * v * inv_j[:, None] * inv_k[None, :]
    a = tl.where(rj[:, None] == rk[None, :], (inv_j > 0).to(a.dtype)[:, None], a)
    return tl.where(ok, a, 0.0)


@triton.jit
def _angle_u(a_s, a_t, rj, rk):
    """h'(A_s - A_t), 0 on j = k."""
    u = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
    return tl.where(rj[:, None] == rk[None, :], 0.0, u)


@triton.jit
def _store_angle_stats(out, plane, ok, u_inv, u_a, u_dead, inv, dead):
    """w1, s / c, q / c (see the section's header) for anchor i and these rows j, at
    out + k plane."""
    tl.store(out, inv * u_inv - inv * inv * u_a, mask=ok)
    tl.store(out + plane, dead * u_inv, mask=ok)
    tl.store(out + 2 * plane, inv * u_dead, mask=ok)


@triton.jit
def _angle_fwd(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, part_ptr, stats_ptr, lo, N,
               EXACT: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The forward kernels' body (see _rkd_angle_fwd_kernel), over this path's anchors."""
    t = tl.program_id(0)
    count = tl.load(count_ptr)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    part = part_ptr + t.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    if EXACT:
        mine = t < count
    else:
        mine = t >= count
    if mine:
        i = lo + tl.load(order_ptr + t)
        row_i = i.to(tl.int64) * N
        v_row = (i - lo).to(tl.int64) * N
        eij_s, lij_s, invj_s, deadj_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rj, N, EXACT)
        eij_t, lij_t, invj_t, deadj_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rj, N, EXACT)
        # Summed elementwise over the k blocks and reduced over k once at the end: a reduction
        # per block costs cross-thread shuffles, about as many instructions as the angles.
        loss = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ui_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ua_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ud_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ui_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ua_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        ud_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        for start in range(0, N, BLOCK):
            rk = start + tl.arange(0, BLOCK)
            ok = (rj[:, None] < N) & (rk[None, :] < N)
            eik_s, lik_s, invk_s, deadk_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rk, N, EXACT)
            eik_t, lik_t, invk_t, deadk_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rk, N, EXACT)
            ejk_s, ljk_s = _tile(hs_ptr, ls_ptr, rj, rk, N, EXACT)
            ejk_t, ljk_t = _tile(ht_ptr, lt_ptr, rj, rk, N, EXACT)
            a_s = _angle_tile(ejk_s, ljk_s, eij_s, lij_s, eik_s, lik_s, invj_s, invk_s, rj, rk, ok, EXACT)
            a_t = _angle_tile(ejk_t, ljk_t, eij_t, lij_t, eik_t, lik_t, invj_t, invk_t, rj, rk, ok, EXACT)
            loss += _smooth_l1(a_s - a_t)
            if STATS:
                u = _angle_u(a_s, a_t, rj, rk)
                ui_s += u * invk_s[None, :]
                ua_s += u * a_s
                ud_s += u * deadk_s[None, :]
                ui_t -= u * invk_t[None, :]
                ua_t -= u * a_t
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
def _rkd_angle_fwd_kernel(es_ptr, et_ptr, order_ptr, count_ptr, part_ptr, stats_ptr, lo, N,
                          STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The exact path (float64 E). Program (t, b): anchor i = lo + order[t] if t < count
    (else nothing: the fast kernel's), rows j of block b, all k: part = sum h(A_s - A_t).

    With STATS, per side and row j the row sums sum_k u inv_k, sum_k u A and sum_k u dead_k,
    stored as w1, s, q at [stat, i - lo, j] of stats (6, R, N) (the anchors lo:lo + R, R
    programs): student 0-2, teacher 3-5."""
    _angle_fwd(es_ptr, es_ptr, es_ptr, et_ptr, et_ptr, et_ptr, order_ptr, count_ptr, part_ptr, stats_ptr, lo, N,
               EXACT=True, STATS=STATS, BLOCK=BLOCK)


@triton.jit
def _rkd_angle_fwd_fast_kernel(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, part_ptr,
                               stats_ptr, lo, N, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The fast path (float32, E = hi + lo, v = 1 / sqrt(E)): _rkd_angle_fwd_kernel for the
    anchors order[t], t >= count."""
    _angle_fwd(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, part_ptr, stats_ptr, lo, N,
               EXACT=False, STATS=STATS, BLOCK=BLOCK)


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
def _angle_grad(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """The tile kernels' body (see _rkd_angle_grad_kernel), over this path's anchors.
    u is symmetric in (j, k), so only the tiles on and above the diagonal are computed, each
    giving its transpose too: w2 is symmetric, z2's (k, j) entries are sum_i u dead_k inv_j."""
    if tl.program_id(0) <= tl.program_id(1):
        rj = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (rj[:, None] < N) & (rk[None, :] < N)
        ejk_s, ljk_s = _tile(hs_ptr, ls_ptr, rj, rk, N, EXACT)
        ejk_t, ljk_t = _tile(ht_ptr, lt_ptr, rj, rk, N, EXACT)
        w_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        z_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        zt_s = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        w_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        z_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        zt_t = tl.zeros([BLOCK, BLOCK], dtype=hs_ptr.dtype.element_ty)
        count = tl.load(count_ptr)
        if EXACT:
            first = 0
            end = count
        else:
            first = count
            end = R
        for t in range(first, end):
            local = tl.load(order_ptr + t).to(tl.int64)
            row_i = (lo + local) * N
            v_row = local * N
            eij_s, lij_s, invj_s, deadj_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rj, N, EXACT)
            eik_s, lik_s, invk_s, deadk_s = _directions(hs_ptr, ls_ptr, vs_ptr, row_i, v_row, rk, N, EXACT)
            eij_t, lij_t, invj_t, deadj_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rj, N, EXACT)
            eik_t, lik_t, invk_t, deadk_t = _directions(ht_ptr, lt_ptr, vt_ptr, row_i, v_row, rk, N, EXACT)
            a_s = _angle_tile(ejk_s, ljk_s, eij_s, lij_s, eik_s, lik_s, invj_s, invk_s, rj, rk, ok, EXACT)
            a_t = _angle_tile(ejk_t, ljk_t, eij_t, lij_t, eik_t, lik_t, invj_t, invk_t, rj, rk, ok, EXACT)
            u = _angle_u(a_s, a_t, rj, rk)
            w_s += u * invj_s[:, None] * invk_s[None, :]
            z_s += u * deadj_s[:, None] * invk_s[None, :]
            zt_s += u * invj_s[:, None] * deadk_s[None, :]
            w_t -= u * invj_t[:, None] * invk_t[None, :]
            z_t -= u * deadj_t[:, None] * invk_t[None, :]
            zt_t -= u * invj_t[:, None] * deadk_t[None, :]
        plane = N.to(tl.int64) * N
        # Not EXACT: the exact kernel ran first and left its anchors' sums in out.
        _store_grad_tile(out_ptr, plane, rj, rk, N, ok, -0.5 * w_s, z_s, zt_s, not EXACT)
        _store_grad_tile(out_ptr + 2 * plane, plane, rj, rk, N, ok, -0.5 * w_t, z_t, zt_t, not EXACT)


@triton.jit
def _rkd_angle_grad_kernel(es_ptr, et_ptr, order_ptr, count_ptr, out_ptr, lo, R, N, BLOCK: tl.constexpr):
    """The exact path (float64 E): the (j, k) tile of w2 and z2 / c (see the section's
    header) on each side, summed over the anchors order[t], t < count;
    out (4, N, N) = (w2_s, z2_s / c, w2_t, z2_t / c), written whole."""
    _angle_grad(es_ptr, es_ptr, es_ptr, et_ptr, et_ptr, et_ptr, order_ptr, count_ptr, out_ptr, lo, R, N,
                EXACT=True, BLOCK=BLOCK)


@triton.jit
def _rkd_angle_grad_fast_kernel(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, out_ptr,
                                lo, R, N, BLOCK: tl.constexpr):
    """The fast path (float32, E = hi + lo, v = 1 / sqrt(E)): _rkd_angle_grad_kernel's sums over
    the anchors order[t], count <= t < R, added to what out holds."""
    _angle_grad(hs_ptr, ls_ptr, vs_ptr, ht_ptr, lt_ptr, vt_ptr, order_ptr, count_ptr, out_ptr, lo, R, N, EXACT=False,
                BLOCK=BLOCK)


@triton.jit
def _side_rows(h_ptr, l_ptr, v_ptr, ra, lo, R, N, BLOCK: tl.constexpr):
    """_fast_rows_kernel for one side: stores v, returns the rows' flags (int32)."""
    top = tl.zeros([BLOCK], dtype=tl.float32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        rb = start + tl.arange(0, BLOCK)
        ok = (ra[:, None] < R) & (rb[None, :] < N)
        at = (lo + ra[:, None]).to(tl.int64) * N + rb[None, :]
        e = tl.load(h_ptr + at, mask=ok, other=0.0)
        live = e >= _NORM_EPS_SQ
        # hi + lo rounded once more: within an ulp of 1 / sqrt(E), as the angles need.
        full = e + tl.load(l_ptr + at, mask=ok, other=0.0)
        inv = tl.where(live, 1.0 / sqrt(tl.where(live, full, 1.0)), 0.0)
        tl.store(v_ptr + ra[:, None].to(tl.int64) * N + rb[None, :], inv, mask=ok)
        top = tl.maximum(top, tl.max(tl.where(ok, e, 0.0), 1))
        low = tl.minimum(low, tl.min(tl.where(ok & live, e, float("inf")), 1))
        nan = tl.maximum(nan, tl.max((ok & (e != e)).to(tl.int32), 1))
    holds = ((top <= _FAST_RATIO_SQ * low) | (top < _NORM_EPS_SQ)) & (top <= _FAST_MAX)
    return tl.where(holds & (nan == 0), 0, 1)


@triton.jit
def _fast_rows_kernel(hs_ptr, ls_ptr, ht_ptr, lt_ptr, vs_ptr, vt_ptr, flag_ptr, lo, R, N, BLOCK: tl.constexpr):
    """For a block of the anchors lo:lo + R (rows of E = hi + lo (N, N) float32, each side):
    their inverse norms v = 1 / sqrt(E) (0 for a zero direction) at (i - lo, :) of v (R, N),
    and flag[i - lo] = 1 where the fast path cannot hold the anchor (module docstring): on
    either side its live squared distances spread past FAST_RATIO_SQ, reach FAST_MAX or are
    NaN."""
    ra = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    flag = _side_rows(hs_ptr, ls_ptr, vs_ptr, ra, lo, R, N, BLOCK)
    flag = tl.maximum(flag, _side_rows(ht_ptr, lt_ptr, vt_ptr, ra, lo, R, N, BLOCK))
    tl.store(flag_ptr + ra, flag, mask=ra < R)


def split(e):
    """E (float64) as the fast path takes it: (hi, lo) float32, hi + lo = E to about 2^-48."""
    hi = e.to(torch.float32)
    return hi, (e - hi.to(e.dtype)).to(torch.float32)


def anchor_order(parts, n, lo, anchors):
    """(order, count, v_s, v_t) of the fast path, parts = (hi_s, lo_s, hi_t, lo_t) (N, N)
    float32: the anchors lo:lo + anchors as offsets from lo, those that take the exact path
    first (count of them, a tensor on the device: no host sync), and each side's inverse
    norms at those anchors' rows (anchors, N)."""
    hi_s = parts[0]
    v_s = torch.empty((anchors, n), dtype=torch.float32, device=hi_s.device)
    v_t = torch.empty_like(v_s)
    flag = torch.empty(anchors, dtype=torch.int32, device=hi_s.device)
    _fast_rows_kernel[(cdiv(anchors, BLOCK),)](*parts, v_s, v_t, flag, lo, anchors, n, BLOCK=BLOCK)
    order = torch.sort(flag, descending=True, stable=True).indices
    return order, flag.sum(dtype=torch.int32).reshape(1), v_s, v_t


def rkd_angle_forward(e_s, e_t, with_stats, lo=0, anchors=None, parts=None):
    """(N^3 * loss, saved for backward, or None); e_* the squared distances (N, N) float64.
    anchors: only the angles at the anchors lo:lo + anchors (R of them; all N by default),
    a global batch's share of the loss. parts: the fast path, for inputs that are not
    float64: (hi_s, lo_s, hi_t, lo_t) float32 with hi + lo = E (squared_distances_split, or
    split), float32 arithmetic for the anchors it suits (the module docstring).
    saved = (stats, order, count[, hi_s, lo_s, v_s, hi_t, lo_t, v_t]): stats (6, R, N) the
    per-anchor w1, s, q of each side, float32 on the fast path."""
    n = len(e_s)
    anchors = n if anchors is None else anchors
    nb = cdiv(n, BLOCK)
    device = e_s.device
    if parts is None:
        order = torch.arange(anchors, device=device)
        count = torch.full((1,), anchors, device=device, dtype=torch.int32)
    else:
        order, count, v_s, v_t = anchor_order(parts, n, lo, anchors)
    stats = torch.empty((6, anchors, n) if with_stats else (1,), dtype=e_s.dtype if parts is None else torch.float32,
                        device=device)
    # Each program writes its anchor's partial sum from one of the two kernels.
    part = torch.empty(anchors * nb, dtype=e_s.dtype, device=device)
    _rkd_angle_fwd_kernel[(anchors, nb)](e_s, e_t, order, count, part, stats, lo, n, STATS=with_stats,
                                         BLOCK=BLOCK, num_warps=TILE_WARPS)
    if parts is not None:
        fast = (parts[0], parts[1], v_s, parts[2], parts[3], v_t)
        _rkd_angle_fwd_fast_kernel[(anchors, nb)](*fast, order, count, part, stats, lo, n,
                                                  STATS=with_stats, BLOCK=BLOCK, num_warps=TILE_WARPS)
    if not with_stats:
        return part.sum(), None
    return part.sum(), (stats, order, count) + (() if parts is None else fast)


def rkd_angle_backward(e_s, e_t, saved, lo=0):
    """(M_s, r_s, M_t, r_t) with N^3 dL/dX = M X + r * X on each side: M = Z - 2 S,
    r = 2 rowsum(S), from the forward's per-anchor stats (of the anchors lo:lo + R, R =
    stats.shape[1]) and the tile kernels' sums over the same anchors; M (N, N) and r (N,)
    float64 reach every row. On the fast path M is float32 and r None: its gradient is
    formed as sum_b M_ab (x_b - x_a) (fastkd.kernels.gram.difference_grad), where r is
    minus M's row sums, so only M's off-diagonal entries count."""
    stats, order, count, *fast = saved
    n = len(e_s)
    anchors = stats.shape[1]
    nb = cdiv(n, BLOCK)
    tiles = torch.empty((4, n, n), dtype=stats.dtype, device=e_s.device)
    # The anchors' loop bound, read from the device, holds one more register, which spilled at
    # TILE_WARPS in float64 (sm_80, sm_90); twice the warps (half the tile per thread) do not.
    _rkd_angle_grad_kernel[(nb, nb)](e_s, e_t, order, count, tiles, lo, anchors, n, BLOCK=BLOCK,
                                     num_warps=2 * TILE_WARPS)
    if fast:
        _rkd_angle_grad_fast_kernel[(nb, nb)](*fast, order, count, tiles, lo, anchors, n, BLOCK=BLOCK,
                                              num_warps=TILE_WARPS)
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
        if fast:  # the difference form: no diagonal, no r
            out += [z.sub_(sym, alpha=2), None]
        else:
            # Z_ii = sum_j s_ij, set as minus the rest of row i (see zero_row_sums).
            out += [zero_row_sums(z) - 2 * sym, 2 * sym.sum(1)]
    return tuple(out)
