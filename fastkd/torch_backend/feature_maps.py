"""AT, NST and FSP with torch ops: the CPU path (torch autograd does the backward).

Same signatures and results as fastkd.reference.at / nst / fsp, without the
reference's full-size temporaries: one squared copy instead of |f| and |f|^2 for AT at
p = 2, no (B, C_s, C_t, HW) broadcast for NST. FSP is the reference's own bmm form, its
pooling avg_pool2d where the windows are whole.
"""
import torch
import torch.nn.functional as F

from ..common import nst_spatial_form, result_dtype, transformation_pool
from .elementwise import hint


def _channel_power(fm, p):
    """A = sum_c |f|^p as (B, HW)."""
    x = fm.reshape(fm.shape[0], fm.shape[1], -1)
    if p == 2:
        return x.square().sum(1)  # no |f| copy
    return x.abs().pow(p).sum(1)


def _attention(fm, p, eps=1e-6):
    """A / (||A||_2 + eps), as (B, HW)."""
    a = _channel_power(fm, p)
    return a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + eps)


def _normalized_attention(fm, p):
    """F.normalize(A / C) = A / max(||A||_2, C 1e-12), as (B, HW), with clamp_min's gradient."""
    a = _channel_power(fm, p)
    return a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(fm.shape[1] * 1e-12)


def at(fm_s, fm_t, p, normalize=False):
    """mse(am(fm_s), am(fm_t)); fm_* (B, C_*, H, W). normalize: am = _normalized_attention, in
    float32 at least (C 1e-12 is 0 in float16, where F.normalize gives 0 / 0 on a dead map)."""
    if not normalize:
        return F.mse_loss(_attention(fm_s, p), _attention(fm_t, p))
    out = result_dtype(fm_s, fm_t)
    acc = torch.promote_types(out, torch.float32)
    return F.mse_loss(_normalized_attention(fm_s.to(acc), p), _normalized_attention(fm_t.to(acc), p)).to(out)


def nst(fm_s, fm_t):
    """NST from batched Gram products, never broadcasting to (B, C_s, C_t, HW).

    With z the L2-normalised rows of f (B, C, HW): mean_{j,i} (y_j . x_i)^2 = ||Y X^T||_F^2 / (C_y C_x),
    so per sample loss_b = ||Z_s Z_s^T||^2 / C_s^2 + ||Z_t Z_t^T||^2 / C_t^2 - 2 ||Z_s Z_t^T||^2 / (C_s C_t)
    = ||Z_s^T Z_s / C_s - Z_t^T Z_t / C_t||_F^2. The (C x C) form runs on the raw maps and scales the
    Gram blocks by the inverse row norms; the (HW x HW) form is used when it is cheaper
    (fastkd.common.nst_spatial_form: HW small compared with the channels).
    """
    # bf16/fp16 in fp32: a raw Gram entry of maps near 1e3 (2e6 at HW = 2) overflows fp16.
    out = result_dtype(fm_s, fm_t)
    acc = torch.promote_types(out, torch.float32)
    xs = fm_s.reshape(fm_s.shape[0], fm_s.shape[1], -1).to(acc)
    xt = fm_t.reshape(fm_t.shape[0], fm_t.shape[1], -1).to(acc)
    B, c_s, hw = xs.shape
    c_t = xt.shape[1]
    if nst_spatial_form(c_s, c_t, hw):
        zs, zt = F.normalize(xs, dim=2), F.normalize(xt, dim=2)
        p = torch.baddbmm(torch.bmm(zs.transpose(1, 2), zs), zt.transpose(1, 2), zt,
                          beta=1.0 / c_s, alpha=-1.0 / c_t)
        return (p.square().sum() / B).to(out)
    r_s = 1.0 / torch.linalg.vector_norm(xs, dim=2).clamp_min(1e-12)
    r_t = 1.0 / torch.linalg.vector_norm(xt, dim=2).clamp_min(1e-12)

    def block_mean(x, r_x, y, r_y):
        k = torch.bmm(x, y.transpose(1, 2)) * r_x[:, :, None] * r_y[:, None, :]
        return k.square().sum() / (x.shape[1] * y.shape[1])

    return ((block_mean(xt, r_t, xt, r_t) + block_mean(xs, r_s, xs, r_s)
             - 2 * block_mean(xs, r_s, xt, r_t)) / B).to(out)


def _flow(fm1, fm2):
    """G = a b^T / HW (B, C_1, C_2), a pooled to b's (H, W) when larger: avg_pool2d where the
    windows are whole, the same values and gradients as the reference's adaptive_avg_pool2d
    at less cost (fastkd.common.transformation_pool)."""
    fm1 = transformation_pool(fm1, fm2)
    a = fm1.reshape(fm1.shape[0], fm1.shape[1], -1)
    return torch.bmm(a, fm2.reshape(fm2.shape[0], fm2.shape[1], -1).transpose(1, 2)) / a.shape[2]


def fsp(fm_s1, fm_s2, fm_t1, fm_t2):
    """mse(G_s, G_t): two bmm and an mse, as the reference (already torch's fastest form), the
    mse without F.mse_loss's Python wrapper (fastkd.torch_backend.elementwise.hint)."""
    return hint(_flow(fm_s1, fm_s2), _flow(fm_t1, fm_t2))
