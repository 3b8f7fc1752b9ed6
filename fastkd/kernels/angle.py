"""Triton kernels of RKD's angle term, from the squared distances E (N, N) float64 of the
student's and the teacher's rows (`squared_distances`, fastkd/kernels/gram.py).

Numerics: the angle at anchor i is read from E by polarisation, V_jk = (x_j - x_i).(x_k - x_i)
= (E_ij + E_ik - E_jk) / 2, whose error is about u64 (E_ij + E_ik + E_jk) <= 3 u64
max(n_j, n_k)^2: relative to n_j n_k, 1e-9 at a gap/spread ratio of 1e-7 (the float32
reference: 1e-7 on every angle). Buffers are (N, N) at most: the N^3 angles are read from E
one anchor at a time.
"""
import torch
import triton
import triton.language as tl

from ..common import zero_row_sums
from .common import cdiv, sqrt
from .gram import BLOCK, TILE_WARPS, _load_tile, _smooth_l1

# Directions shorter than this (E below its square) count as zero; F.normalize's clamp.
NORM_EPS = 1e-12
_NORM_EPS_SQ = tl.constexpr(NORM_EPS * NORM_EPS)  # kernels read only constexpr globals


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
# forward kernel takes while the angles are at hand; the rest is one tile kernel over all
# anchors.

@triton.jit
def _directions(e_ptr, row_i, rows, N):
    """E[i, rows], inv = 1 / n (0 for a zero direction) and dead = [zero direction] (0
    outside) for anchor i; row_i = i * N in int64."""
    ok = rows < N
    e = tl.load(e_ptr + row_i + rows, mask=ok, other=0.0)
    live = e >= _NORM_EPS_SQ
    inv = tl.where(live, 1.0 / sqrt(tl.where(live, e, 1.0)), 0.0)
    return e, inv, (ok & ~live).to(e.dtype)


@triton.jit
def _angle_tile(ejk, eij, eik, inv_j, inv_k, rj, rk, ok):
    """A_jk; on j = k exactly 1 for a live direction (inv_j > 0), 0 for a zero one."""
    a = 0.5 * ((eij[:, None] + eik[None, :]) - ejk) * inv_j[:, None] * inv_k[None, :]
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
def _rkd_angle_fwd_kernel(es_ptr, et_ptr, part_ptr, stats_ptr, lo, N,
                          STATS: tl.constexpr, BLOCK: tl.constexpr):
    """Anchor i = lo + program 0 (the anchors lo:lo + R, R programs), rows j of one block,
    all k: part = sum h(A_s - A_t).

    With STATS, per side and row j the row sums sum_k u inv_k, sum_k u A and sum_k u dead_k,
    stored as w1, s, q at [stat, i - lo, j] of stats (6, R, N): student 0-2, teacher 3-5."""
    i = lo + tl.program_id(0)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_i = i.to(tl.int64) * N
    eij_s, invj_s, deadj_s = _directions(es_ptr, row_i, rj, N)
    eij_t, invj_t, deadj_t = _directions(et_ptr, row_i, rj, N)
    loss = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ui_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ua_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ud_s = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ui_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ua_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    ud_t = tl.zeros([BLOCK], dtype=es_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        rk = start + tl.arange(0, BLOCK)
        ok = (rj[:, None] < N) & (rk[None, :] < N)
        eik_s, invk_s, deadk_s = _directions(es_ptr, row_i, rk, N)
        eik_t, invk_t, deadk_t = _directions(et_ptr, row_i, rk, N)
        a_s = _angle_tile(_load_tile(es_ptr, rj, rk, N, N), eij_s, eik_s, invj_s, invk_s, rj, rk, ok)
        a_t = _angle_tile(_load_tile(et_ptr, rj, rk, N, N), eij_t, eik_t, invj_t, invk_t, rj, rk, ok)
        loss += tl.sum(_smooth_l1(a_s - a_t), 1)
        if STATS:
            u = _angle_u(a_s, a_t, rj, rk)
            ui_s += tl.sum(u * invk_s[None, :], 1)
            ua_s += tl.sum(u * a_s, 1)
            ud_s += tl.sum(u * deadk_s[None, :], 1)
            ui_t -= tl.sum(u * invk_t[None, :], 1)
            ua_t -= tl.sum(u * a_t, 1)
            ud_t -= tl.sum(u * deadk_t[None, :], 1)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(loss, 0))
    if STATS:
        plane = tl.num_programs(0).to(tl.int64) * N
        out = stats_ptr + tl.program_id(0).to(tl.int64) * N + rj
        _store_angle_stats(out, plane, rj < N, ui_s, ua_s, ud_s, invj_s, deadj_s)
        _store_angle_stats(out + 3 * plane, plane, rj < N, ui_t, ua_t, ud_t, invj_t, deadj_t)


@triton.jit
def _rkd_angle_grad_kernel(es_ptr, et_ptr, out_ptr, lo, R, N, ALL: tl.constexpr, BLOCK: tl.constexpr):
    """The (j, k) tile of w2 and z2 / c (see the section's header) on each side, summed over
    the anchors i in lo:lo + R, or all N with ALL (one process: lo and R unused, its loop
    the one it had without them);
    out (4, N, N) = (w2_s, z2_s / c, w2_t, z2_t / c)."""
    rj = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rj[:, None] < N) & (rk[None, :] < N)
    ejk_s = _load_tile(es_ptr, rj, rk, N, N)
    ejk_t = _load_tile(et_ptr, rj, rk, N, N)
    w_s = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    z_s = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    w_t = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    z_t = tl.zeros([BLOCK, BLOCK], dtype=es_ptr.dtype.element_ty)
    if ALL:
        first = 0
        end = N
    else:
        first = lo
        end = lo + R
    for i in range(first, end):
        row_i = tl.cast(i, tl.int64) * N
        eij_s, invj_s, deadj_s = _directions(es_ptr, row_i, rj, N)
        eik_s, invk_s, _ = _directions(es_ptr, row_i, rk, N)
        eij_t, invj_t, deadj_t = _directions(et_ptr, row_i, rj, N)
        eik_t, invk_t, _ = _directions(et_ptr, row_i, rk, N)
        a_s = _angle_tile(ejk_s, eij_s, eik_s, invj_s, invk_s, rj, rk, ok)
        a_t = _angle_tile(ejk_t, eij_t, eik_t, invj_t, invk_t, rj, rk, ok)
        u = _angle_u(a_s, a_t, rj, rk)
        w_s += u * invj_s[:, None] * invk_s[None, :]
        z_s += u * deadj_s[:, None] * invk_s[None, :]
        w_t -= u * invj_t[:, None] * invk_t[None, :]
        z_t -= u * deadj_t[:, None] * invk_t[None, :]
    plane = N.to(tl.int64) * N
    out = out_ptr + rj[:, None].to(tl.int64) * N + rk[None, :]
    tl.store(out, -0.5 * w_s, mask=ok)
    tl.store(out + plane, z_s, mask=ok)
    tl.store(out + 2 * plane, -0.5 * w_t, mask=ok)
    tl.store(out + 3 * plane, z_t, mask=ok)


def rkd_angle_forward(e_s, e_t, with_stats, lo=0, anchors=None):
    """(N^3 * loss, stats (6, R, N) for backward, or None); e_* the squared distances (N, N).
    anchors: only the angles at the anchors lo:lo + anchors (R of them; all N by default),
    a global batch's share of the loss."""
    n = len(e_s)
    anchors = n if anchors is None else anchors
    nb = cdiv(n, BLOCK)
    part = torch.empty(anchors * nb, dtype=e_s.dtype, device=e_s.device)
    stats = torch.empty((6, anchors, n) if with_stats else (1,), dtype=e_s.dtype, device=e_s.device)
    _rkd_angle_fwd_kernel[(anchors, nb)](e_s, e_t, part, stats, lo, n, STATS=with_stats, BLOCK=BLOCK,
                                         num_warps=TILE_WARPS)
    return part.sum(), (stats if with_stats else None)


def rkd_angle_backward(e_s, e_t, stats, lo=0):
    """(M_s, r_s, M_t, r_t) with N^3 dL/dX = M X + r * X on each side: M = Z - 2 S,
    r = 2 rowsum(S), from the forward's per-anchor stats (of the anchors lo:lo + R, R =
    stats.shape[1]) and the tile kernel's sums over the same anchors; M (N, N) and r (N,)
    reach every row."""
    n = len(e_s)
    anchors = stats.shape[1]
    nb = cdiv(n, BLOCK)
    tiles = torch.empty((4, n, n), dtype=e_s.dtype, device=e_s.device)
    every = anchors == n
    # The anchors lo:lo + R hold their loop bound in one more register, which spilled at
    # TILE_WARPS (sm_80, sm_90); twice the warps (half the tile per thread) do not.
    _rkd_angle_grad_kernel[(nb, nb)](e_s, e_t, tiles, lo, anchors, n, ALL=every, BLOCK=BLOCK,
                                     num_warps=TILE_WARPS if every else 2 * TILE_WARPS)
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
        # c scales here, in float64: a kernel's Python float constant is a float32 there.
        z *= 2.0 / NORM_EPS
        # Z_ii = sum_j s_ij, set as minus the rest of row i (see zero_row_sums).
        out += [zero_row_sums(z) - 2 * sym, 2 * sym.sum(1)]
    return tuple(out)

