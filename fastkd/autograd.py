"""torch.autograd.Function wrappers of the Triton kernels in fastkd.kernels.

One Function per fused op: forward launches the kernels and saves inputs and
small statistics; backward launches the hand-derived gradient kernels. The
dispatcher (fastkd.backend) lists each op's plain function below as its
``triton`` entry.
"""

import torch
import torch.nn.functional as F

from . import chunked_linear as _chunked_linear
from . import ops as _ops
from .common import (accumulation_dtype, direction_backward, first_order, grad_cam, nst_spatial_form,
                     output_gradient, result_dtype, transformation_pool)
from .kernels import angle as _angle
from .kernels import contrast as _contrast
from .kernels import cosine as _cosine
from .kernels import distance as _dist
from .kernels import elementwise as _ew
from .kernels import feature_maps as _fm
from .kernels import fused_linear as _fused_linear
from .kernels import gram as _gram
from .kernels import irg_transformation as _irg_t
from .kernels import softmax_kl as _softmax_kl
from .kernels.common import as_3d
from .distributed import all_gather_rows, all_reduce_max, all_reduce_sum, reducer


# --- gradients written in forward ---------------------------------------------------------
# At small sizes a launch costs more than its work: a Function whose loss is one number can
# write dL/dx at grad_output 1 in the pass that computes the loss, save it instead of what
# a backward kernel would read, and have backward scale it by grad_output (one multiply,
# no launch of its own). Autograd runs forward without grad mode, and its needs_input_grad
# holds without it too: the callers pass grad, torch.is_grad_enabled() at the call.


def _forward_grads(ctx, grad, n):
    """Whether forward writes the gradient of each of the first n inputs: it needs one and a
    backward can follow (grad mode at the call, or fastkd.ops' operator, whose needs count it)."""
    grad = grad or isinstance(ctx, _ops._Ctx)
    return [grad and need for need in ctx.needs_input_grad[:n]]


def saved_gradients(ctx, grad_output):
    """Backward of a Function that saved its first inputs' gradients at grad_output 1 (None
    where not written): each scaled by the 0-d grad_output, in its own dtype; None for the
    rest of the inputs."""
    grads = tuple(None if g is None else g * grad_output for g in ctx.saved_tensors)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


# --- feature maps: AT, NST, FSP (fastkd.kernels.feature_maps) ------------------------------


NORMALIZE_EPS = 1e-12  # F.normalize's


def _at_bounds(fm_s, fm_t, normalize):
    """(eps, (min_norm_s, min_norm_t)) of am = A / max(||A|| + eps, min_norm), A = sum_c |f|^p:
    the collection's A / (||A|| + 1e-6), or with normalize F.normalize(A / C) = A / max(||A||, C 1e-12)."""
    if normalize:
        return 0.0, (fm_s.shape[1] * NORMALIZE_EPS, fm_t.shape[1] * NORMALIZE_EPS)
    return 1e-6, (0.0, 0.0)


class ATFunction(torch.autograd.Function):
    """mse(am(fm_s), am(fm_t)) over (B, HW), A = sum_c |f|^p (B, HW):
    am(f) = A / (||A||_2 + 1e-6), or with normalize am(f) = F.normalize(mean_c |f|^p)
    = M / max(||M||_2, 1e-12), M = A / C (the gradient through the clamp as autograd's).

    Saves the inputs, the two (B, HW) maps A and their norms (B, 2). For p < 1 the
    gradient at an exact zero of f is 0 (the reference's is NaN there).
    """

    @staticmethod
    def forward(ctx, fm_s, fm_t, p, normalize=False):
        acc = accumulation_dtype(fm_s, fm_t)
        a_s, a_t = _fm.at_maps(fm_s, p, acc), _fm.at_maps(fm_t, p, acc)
        eps, min_norms = _at_bounds(fm_s, fm_t, normalize)
        partial, norms = _fm.at_loss(a_s, a_t, eps, min_norms)
        ctx.save_for_backward(fm_s, fm_t, a_s, a_t, norms)
        ctx.p, ctx.bounds = p, (eps, min_norms)
        return (partial.sum() / a_s.numel()).to(result_dtype(fm_s, fm_t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        fm_s, fm_t, a_s, a_t, norms = ctx.saved_tensors
        ga_s, ga_t = _fm.at_grad_maps(a_s, a_t, norms, grad, 2.0 / a_s.numel(), *ctx.bounds)
        g_s = _fm.at_grad_features(fm_s, ga_s, ctx.p) if ctx.needs_input_grad[0] else None
        g_t = _fm.at_grad_features(fm_t, ga_t, ctx.p) if ctx.needs_input_grad[1] else None
        return g_s, g_t, None, None


def at(fm_s, fm_t, p, normalize=False):
    return _ops.apply("ATFunction", fm_s, fm_t, p, normalize)


def _inverse_norms(gram_diag, eps=1e-12):
    """1 / max(||f_i||, eps) from the Gram diagonal, and whether ||f_i|| >= eps."""
    n = gram_diag.clamp_min(0).sqrt()
    return 1.0 / n.clamp_min(eps), (n >= eps).to(n.dtype)


class NSTFunction(torch.autograd.Function):
    """NST from the raw Gram blocks S_ss, S_tt, S_st (B, C_x, C_y) of the maps as (B, C, HW).

    With z the L2-normalised rows, K = z_x z_y^T = r_x S r_y and w = 1/C_s on student rows,
    -1/C_t on teacher rows: loss = (1/B) sum_b sum_ij w_i w_j K_ij^2. The per-sample
    (C x C) blocks are small statistics: forward reads the maps in three Gram products
    (S_ss, S_tt, S_st), backward in one matrix-times-maps pass per side.
    Backward: dz = (4/B) W K W z, df_i = r_i (dz_i - z_i (z_i . dz_i)) (no projection where
    ||f_i|| < 1e-12), written as one (C x C) matrix times the maps per side.
    """

    @staticmethod
    def forward(ctx, fm_s, fm_t):
        acc = accumulation_dtype(fm_s, fm_t)
        xs, xt = as_3d(fm_s), as_3d(fm_t)
        s_ss, _ = _fm.gram(acc, xs, xs)
        s_tt, _ = _fm.gram(acc, xt, xt)
        s_st, _ = _fm.gram(acc, xs, xt)
        r_s, keep_s = _inverse_norms(s_ss.diagonal(dim1=1, dim2=2))
        r_t, keep_t = _inverse_norms(s_tt.diagonal(dim1=1, dim2=2))
        k_ss = r_s[:, :, None] * s_ss * r_s[:, None, :]
        k_tt = r_t[:, :, None] * s_tt * r_t[:, None, :]
        k_st = r_s[:, :, None] * s_st * r_t[:, None, :]
        B, c_s, c_t = xs.shape[0], xs.shape[1], xt.shape[1]
        loss = (k_ss.square().sum() / c_s ** 2 + k_tt.square().sum() / c_t ** 2
                - 2 * k_st.square().sum() / (c_s * c_t)) / B
        ctx.save_for_backward(fm_s, fm_t, k_ss, k_tt, k_st, r_s, r_t, keep_s, keep_t)
        return loss.to(result_dtype(fm_s, fm_t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        fm_s, fm_t, k_ss, k_tt, k_st, r_s, r_t, keep_s, keep_t = ctx.saved_tensors
        xs, xt = as_3d(fm_s), as_3d(fm_t)
        B, c_s, c_t = xs.shape[0], xs.shape[1], xt.shape[1]
        c = grad.to(k_ss.dtype) * (4.0 / B)
        h_ss, h_tt, h_st = c * k_ss / c_s ** 2, c * k_tt / c_t ** 2, -c * k_st / (c_s * c_t)
        g_s = g_t = None
        if ctx.needs_input_grad[0]:
            d_s = (h_ss * k_ss).sum(2) + (h_st * k_st).sum(2)
            g_s = _fm.matrix_times_maps(r_s[:, :, None] * h_ss * r_s[:, None, :], xs,
                                        r_s[:, :, None] * h_st * r_t[:, None, :], xt,
                                        -r_s * r_s * d_s * keep_s, xs).view(fm_s.shape)
        if ctx.needs_input_grad[1]:
            d_t = (h_tt * k_tt).sum(2) + (h_st * k_st).sum(1)
            g_t = _fm.matrix_times_maps(r_t[:, :, None] * h_tt * r_t[:, None, :], xt,
                                        r_t[:, :, None] * h_st.transpose(1, 2) * r_s[:, None, :], xs,
                                        -r_t * r_t * d_t * keep_t, xt).view(fm_t.shape)
        return g_s, g_t


class NSTSpatialFunction(torch.autograd.Function):
    """NST in the (HW x HW) form, for maps with fewer positions than channels.

    With r = 1 / max(||f_i||, 1e-12) and z = r f the normalised rows of f (B, C, HW):
    P = z_s^T z_s / C_s - z_t^T z_t / C_t (B, HW, HW) and loss = (1/B) sum_b ||P_b||_F^2,
    the same sum w_i w_j K_ij^2 as the (C x C) form. Saves the inputs, r and P.
    Backward: u_x = z_x P, dz_x = +-(4 / (B C_x)) u_x, df_i = r_i (dz_i - z_i (z_i . dz_i))
    (no projection where ||f_i|| < 1e-12).
    """

    @staticmethod
    def forward(ctx, fm_s, fm_t):
        acc = accumulation_dtype(fm_s, fm_t)
        xs, xt = as_3d(fm_s), as_3d(fm_t)
        r_s, r_t = (1.0 / torch.linalg.vector_norm(x, dim=2, dtype=acc).clamp_min(1e-12) for x in (xs, xt))
        z_s, z_t = xs * r_s[:, :, None], xt * r_t[:, :, None]
        # The Gram kernel reduces over the last dim: z^T as (B, HW, C) views, no copies.
        p, sq = _fm.gram(acc, z_s.transpose(1, 2), z_s.transpose(1, 2), 1.0 / xs.shape[1],
                         z_t.transpose(1, 2), z_t.transpose(1, 2), -1.0 / xt.shape[1])
        ctx.save_for_backward(fm_s, fm_t, r_s, r_t, p)
        return (sq.sum() / xs.shape[0]).to(result_dtype(fm_s, fm_t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        fm_s, fm_t, r_s, r_t, p = ctx.saved_tensors
        grads = []
        for x, r, sign, needed in ((fm_s, r_s, 1.0, ctx.needs_input_grad[0]),
                                   (fm_t, r_t, -1.0, ctx.needs_input_grad[1])):
            if not needed:
                grads.append(None)
                continue
            xf = as_3d(x)
            z = xf.to(p.dtype) * r[:, :, None]
            u = _fm.matrix_times_maps(z, p, out_dtype=p.dtype)
            k = grad.to(p.dtype) * (sign * 4.0 / (xf.shape[0] * xf.shape[1]))
            keep = (r < 1e12).to(p.dtype)  # ||f_i|| >= 1e-12: F.normalize's projection applies
            proj = (u * z).sum(2, keepdim=True) * keep[:, :, None]
            grads.append(((u - proj * z) * (k * r[:, :, None])).to(x.dtype).view(x.shape))
        return tuple(grads)


def nst(fm_s, fm_t):
    """The (C x C) form, or the (HW x HW) form where its products cost less
    (fastkd.common.nst_spatial_form)."""
    c_s, c_t, hw = fm_s.shape[1], fm_t.shape[1], fm_s.shape[2] * fm_s.shape[3]
    if nst_spatial_form(c_s, c_t, hw):
        return _ops.apply("NSTSpatialFunction", fm_s, fm_t)
    return _ops.apply("NSTFunction", fm_s, fm_t)


class FSPFunction(torch.autograd.Function):
    """mse(G_s, G_t), G = a b^T / HW (B, C_1, C_2), on maps a, b of one (H, W) per side.

    One fused Gram kernel writes D = G_s - G_t and the per-tile sums of D^2; D (the size of
    one flow matrix) is saved for backward: dG_s = 2 D / (B C_1 C_2), da = dG b / HW,
    db = dG^T a / HW, and the negatives for the teacher.
    """

    @staticmethod
    def forward(ctx, a_s, b_s, a_t, b_t):
        xs1, xs2, xt1, xt2 = (as_3d(x) for x in (a_s, b_s, a_t, b_t))
        hw_s, hw_t = xs1.shape[2], xt1.shape[2]
        d, sq = _fm.gram(accumulation_dtype(a_s, b_s, a_t, b_t), xs1, xs2, 1.0 / hw_s, xt1, xt2, -1.0 / hw_t)
        ctx.save_for_backward(a_s, b_s, a_t, b_t, d)
        return (sq.sum() / d.numel()).to(result_dtype(a_s, b_s, a_t, b_t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        a_s, b_s, a_t, b_t, d = ctx.saved_tensors
        m = d * (grad.to(d.dtype) * (2.0 / d.numel()))
        grads = [None] * 4
        for side, (a, b, sign) in enumerate(((a_s, b_s, 1.0), (a_t, b_t, -1.0))):
            xa, xb = as_3d(a), as_3d(b)
            ms = m * (sign / xa.shape[2])
            if ctx.needs_input_grad[2 * side]:
                grads[2 * side] = _fm.matrix_times_maps(ms, xb, out_dtype=a.dtype).view(a.shape)
            if ctx.needs_input_grad[2 * side + 1]:
                grads[2 * side + 1] = _fm.matrix_times_maps(ms.transpose(1, 2), xa,
                                                            out_dtype=b.dtype).view(b.shape)
        return tuple(grads)


def fsp(fm_s1, fm_s2, fm_t1, fm_t2):
    # The adaptive average pooling of a larger first map runs in torch before the kernel:
    # it shrinks the map, and its backward is torch's.
    if fm_s1.size(2) > fm_s2.size(2):
        fm_s1 = F.adaptive_avg_pool2d(fm_s1, fm_s2.shape[2:])
    if fm_t1.size(2) > fm_t2.size(2):
        fm_t1 = F.adaptive_avg_pool2d(fm_t1, fm_t2.shape[2:])
    return _ops.apply("FSPFunction", fm_s1, fm_s2, fm_t1, fm_t2)


# --- elementwise: Hint, Logits, AB, FT, OFD, VID, AFD, Sobolev, LwM (fastkd.kernels.elementwise)
# The modules' own layers stay torch.


class MSEFunction(torch.autograd.Function):
    """mean((s - t)^2) over same-shaped s, t; backward ds = 2 (s - t) / N, dt = -ds."""

    @staticmethod
    def forward(ctx, s, t):
        ctx.save_for_backward(s, t)
        return (_ew.flat_loss(s, t, _ew.MSE) / s.numel()).to(result_dtype(s, t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        return _ew.flat_grad(s, t, grad, _ew.MSE, 0.0, *ctx.needs_input_grad)


def hint(fm_s, fm_t):
    return _ops.apply("MSEFunction", fm_s, fm_t)


def logits(out_s, out_t):
    return _ops.apply("MSEFunction", out_s, out_t)


class ABFunction(torch.autograd.Function):
    """mean((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]); fm_t enters only
    through the masks, so it gets no gradient."""

    @staticmethod
    def forward(ctx, fm_s, fm_t, margin):
        ctx.save_for_backward(fm_s, fm_t)
        ctx.margin = margin
        # The teacher enters only through masks: the student's dtype, as in the reference.
        return (_ew.flat_loss(fm_s, fm_t, _ew.AB, margin) / fm_s.numel()).to(fm_s.dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        ds, _ = _ew.flat_grad(s, t, grad, _ew.AB, ctx.margin, ctx.needs_input_grad[0], False)
        return ds, None, None


def ab(fm_s, fm_t, margin):
    return _ops.apply("ABFunction", fm_s, fm_t, margin)


class OFDFunction(torch.autograd.Function):
    """mean((s - t')^2 (1 - [s <= t' and t' <= 0])), t' = max(t, m_c), m_c the mean of the
    negative values of t in channel c (differentiable in t, as in the reference).

    Forward: one pass over t for the rows' margin sums, one over s and t (each row reduces
    its channel's sums to m_c) for the loss, the per-row sums the teacher's gradient needs
    and, at grad_output 1, ds, which backward scales; dt is a backward pass of its own (it
    needs every row's sums).
    """

    @staticmethod
    def forward(ctx, fm_s, fm_t, grad=True):
        need_s, _ = _forward_grads(ctx, grad, 2)
        mstats = _ew.ofd_margin(fm_t)
        stats, ds = _ew.ofd_loss(fm_s, fm_t, mstats, need_s)
        ctx.save_for_backward(ds, fm_s, fm_t, mstats, stats)
        return (stats[..., 0].sum() / fm_s.numel()).to(result_dtype(fm_s, fm_t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        ds, fm_s, fm_t, mstats, stats = ctx.saved_tensors
        dt = _ew.ofd_grad_t(fm_s, fm_t, mstats, stats, grad) if ctx.needs_input_grad[1] else None
        return None if ds is None else ds * grad, dt, None


def ofd(fm_s, fm_t):
    return _ops.apply("OFDFunction", fm_s, fm_t, torch.is_grad_enabled())


class VIDFunction(torch.autograd.Function):
    """mean(0.5 (log var_c + (mu - t)^2 / var_c)), var = log(1 + exp(alpha)) + eps (C,).

    One kernel pass writes the per-row sums and, at grad_output 1, dmu = (mu - t) / (var_c N),
    dt = -dmu and the rows' shares of dalpha_c = 0.5 (1 / (C var_c) - sum_c (mu - t)^2 /
    (N var_c^2)) sigmoid(alpha_c); backward scales them (saved_gradients).
    """

    @staticmethod
    def forward(ctx, pred_mean, fm_t, alpha, eps, grad=True):
        need_mu, need_t, need_alpha = _forward_grads(ctx, grad, 3)
        stats, d_mu, d_t = _ew.vid(pred_mean, fm_t, alpha.detach(), eps, need_mu, need_t)
        d_alpha = stats[..., 1].sum(0).to(alpha.dtype) if need_alpha else None
        ctx.save_for_backward(d_mu, d_t, d_alpha)
        return stats[..., 0].sum().to(result_dtype(pred_mean, fm_t, alpha))

    backward = staticmethod(first_order(saved_gradients))


def vid(pred_mean, fm_t, alpha, eps=1e-6):
    return _ops.apply("VIDFunction", pred_mean, fm_t, alpha, eps, torch.is_grad_enabled())


class AFDFunction(torch.autograd.Function):
    """mean_b sum_c rho[b, c] mean_hw (s' - t')^2, f' = f / (||f||_2 over (H, W) + eps).

    One kernel per direction over the rows (b, c) (forward two for long rows split into
    chunks); forward saves per-row norms and per-chunk sums (B C, chunks, STATS), or takes
    them from afd_pooled. drho = q / (B HW) with q the per-row sum of (s' - t')^2.
    """

    @staticmethod
    def forward(ctx, fm_s, fm_t, rho, eps, stats=None):
        xs, xt = as_3d(fm_s), as_3d(fm_t)
        B, C, L = xs.shape
        if stats is None:
            stats = _ew.normalized_distance(xs, xt, eps, add_eps=True, l1=False)
        q = _ew.row_distance(stats).view(B, C)
        ctx.save_for_backward(fm_s, fm_t, rho, stats)
        ctx.eps = eps
        return ((rho.detach().to(q.dtype) * q).sum() / (B * L)).to(result_dtype(fm_s, fm_t, rho))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        fm_s, fm_t, rho, stats = ctx.saved_tensors
        xs, xt = as_3d(fm_s), as_3d(fm_t)
        B, C, L = xs.shape
        g = grad.to(stats.dtype)
        weight = (2.0 / (B * L)) * g * rho.to(stats.dtype).reshape(-1)
        ds, dt = _ew.normalized_distance_grad(xs, xt, stats, weight.contiguous(), ctx.eps, True, False,
                                              *ctx.needs_input_grad[:2])
        d_rho = (g * _ew.row_distance(stats).view(B, C) / (B * L)).to(rho.dtype) if ctx.needs_input_grad[2] else None
        return (None if ds is None else ds.view(fm_s.shape),
                None if dt is None else dt.view(fm_t.shape), d_rho, None, None)


def afd(fm_s, fm_t, rho, eps=1e-6):
    return _ops.apply("AFDFunction", fm_s, fm_t, rho, eps)


def afd_pooled(fm_s, fm_t, channel_weights, eps=1e-6):
    """afd with rho = channel_weights(the mean of fm_t over (H, W), (B, C, 1, 1) in fm_t's dtype),
    the mean summed by AFDFunction's forward kernel as it reads fm_t, whose statistics the
    Function then takes instead of running it again: one pass over the teacher less than
    pooling it first. The mean carries no gradient to fm_t (fastkd.functional.afd_attention
    calls this only where fm_t needs none)."""
    xs, xt = as_3d(fm_s), as_3d(fm_t)
    B, C, L = xs.shape
    stats = _ew.normalized_distance(xs, xt, eps, add_eps=True, l1=False)
    pooled = (_ew.row_sum_t(stats) / L).to(fm_t.dtype).view(B, C, 1, 1)
    return _ops.apply("AFDFunction", fm_s, fm_t, channel_weights(pooled), eps, stats)


class NormalizedRowsFunction(torch.autograd.Function):
    """mean(phi(normalize(flat(s)) - normalize(flat(t)))), normalize = x / max(||x_row||, 1e-12),
    phi = |.| (FT, LwM) or (.)^2 (Sobolev); s, t (B, ...) of equal size per sample.

    Its backward is first order only (first_order): Sobolev's and LwM's inputs are
    gradients built with create_graph=True, and the loss's gradient flows back through them
    by torch's own double backward.
    """

    @staticmethod
    def forward(ctx, s, t, l1):
        xs, xt = s.reshape(s.shape[0], 1, -1), t.reshape(t.shape[0], 1, -1)
        stats = _ew.normalized_distance(xs, xt, 1e-12, add_eps=False, l1=l1)
        ctx.save_for_backward(s, t, stats)
        ctx.l1 = l1
        return (stats[:, :, 2].sum() / s.numel()).to(result_dtype(s, t))

    @staticmethod
    @first_order
    def backward(ctx, grad):
        s, t, stats = ctx.saved_tensors
        xs, xt = s.reshape(s.shape[0], 1, -1), t.reshape(t.shape[0], 1, -1)
        w = grad.to(stats.dtype) * ((1.0 if ctx.l1 else 2.0) / s.numel())
        ds, dt = _ew.normalized_distance_grad(xs, xt, stats, w.expand(s.shape[0]).contiguous(), 1e-12, False,
                                              ctx.l1, *ctx.needs_input_grad[:2])
        return (None if ds is None else ds.view(s.shape), None if dt is None else dt.view(t.shape), None)


def ft(factor_s, factor_t):
    return _ops.apply("NormalizedRowsFunction", factor_s, factor_t, True)


def sobolev(out_s, out_t, img, target):
    # The input gradients come from torch autograd (create_graph=True), as in the reference.
    g_s = output_gradient(out_s, target, img)
    g_t = output_gradient(out_t, target, img, create_graph=False)  # detached by the loss
    return _ops.apply("NormalizedRowsFunction", g_s, g_t.detach(), False)


def lwm(out_s, fm_s, out_t, fm_t, target):
    cam_t = grad_cam(out_t, fm_t, target, create_graph=False)  # detached by the loss
    cam_s = grad_cam(out_s, fm_s, target)
    return _ops.apply("NormalizedRowsFunction", cam_s, cam_t.detach(), True)


# --- pairwise: RKD, SP, PKT, CC, IRG (fastkd.kernels: gram, distance, angle, cosine, irg_transformation)
# IRG's fm1 pooling stays torch (with its autograd), before the kernels.


def _pairwise_grads(ctx, sides, grad_out, divisor):
    """dL/dX per side that needs it: sides = ((M, r, X, input), ...), X the raw or prepared
    rows; grad_out / divisor * (M X + r X) (divisor: the loss's count)."""
    return tuple(_gram.gram_grad(m, r, x, grad_out, like, divisor=divisor) if needed else None
                 for (m, r, x, like), needed in zip(sides, ctx.needs_input_grad))


def _split_sides(x_s, x_t, lo=0, rows=None):
    """(hi_s, lo_s, hi_t, lo_t): E's float32 parts on RKD's float32 path (_float32_path), from
    float32 arithmetic (squared_distances_parts; the rows lo:lo + rows, all by default). No
    float64 E is formed: the angle term's exact anchors read E from the parts."""
    return tuple(p for x in (x_s, x_t) for p in _gram.squared_distances_parts(x, lo, rows))


def _rkd_sides(feat_s, feat_t, fast):
    """RKD's (E_s, E_t, parts): the exact squared distances (N, N) float64 and parts None, or
    with fast (_float32_path) E None and _split_sides' parts."""
    if not fast:
        return _gram.squared_distances(feat_s), _gram.squared_distances(feat_t), None
    return None, None, _split_sides(feat_s, feat_t)


def _rkd_distance_inputs(e_s, e_t, parts):
    """What RKD's distance term reads, (e_s, e_t, parts_lo) for rkd_distance_forward and
    backward: E float64, or with parts (the float32 path) E's float32 hi and lo parts."""
    if parts is None:
        return e_s, e_t, None
    hi_s, lo_s, hi_t, lo_t = parts
    return hi_s, hi_t, (lo_s, lo_t)


def _float32_path(*xs):
    """Whether a relational loss takes its float32 kernels (RKD's angles, the similarity and
    IRG losses; compensated where cancellation needs it): for float32, bfloat16 and float16
    inputs; a float64 result keeps float64 throughout."""
    return result_dtype(*xs) != torch.float64


class RKDFunction(torch.autograd.Function):
    """w_dist * distance term + w_angle * angle term, feat_* (N, D_*), a term whose weight is
    0 skipped (neither launched nor saved):
      distance  smooth_l1(d_s / mean(d_s), d_t / mean(d_t)) over N^2 entries, d = sqrt of the
                exact squared distances E (N, N), the mean over the N(N-1) entries off the
                diagonal;
      angle     smooth_l1(A_s, A_t) over the N^3 angles, read from E by polarisation.
    Both terms from one E per side, and one gradient map onto the rows per side, on their
    differences (difference_grad: sum_b M_ab (x_b - x_a), exact whatever the rows' offset or
    magnitudes). On the float32 path (_float32_path) both terms read E's float32 parts
    (_split_sides; no float64 E) and the map runs in float32."""

    @staticmethod
    def forward(ctx, feat_s, feat_t, w_dist, w_angle):
        e_s, e_t, parts = _rkd_sides(feat_s, feat_t, _float32_path(feat_s, feat_t))
        d_s, d_t, d_lo = _rkd_distance_inputs(e_s, e_t, parts)
        n = len(feat_s)
        loss = d_s.new_zeros(())
        stats_d = stats_a = None
        if w_dist:
            total, stats_d = _dist.rkd_distance_forward(d_s, d_t, parts_lo=d_lo)
            loss = loss + w_dist * total / n ** 2
        if w_angle:
            total, stats_a = _angle.rkd_angle_forward(e_s, e_t, any(ctx.needs_input_grad),
                                                      (_gram.flat(feat_s), _gram.flat(feat_t)), parts=parts)
            loss = loss + w_angle * total / n ** 3
        ctx.save_for_backward(feat_s, feat_t, e_s, e_t, d_s, d_t, *(d_lo or (None, None)), stats_d,
                              *(stats_a or ()))
        ctx.weights = (w_dist, w_angle)
        return loss.to(result_dtype(feat_s, feat_t))

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        feat_s, feat_t, e_s, e_t, d_s, d_t, l_s, l_t, stats_d, *stats_a = ctx.saved_tensors
        d_lo = None if l_s is None else (l_s, l_t)
        w_dist, w_angle = ctx.weights
        n = len(feat_s)
        dist = None
        # Each term's N^k dL/dx_a is sum_b M_ab (x_b - x_a) (k = 2, 3), per side (M_s, _, M_t, _).
        if w_dist and w_angle:  # their weighted sum, formed with the angle term's M: one map per side
            dist = _dist.rkd_distance_backward(d_s, d_t, stats_d, parts_lo=d_lo)
            terms = _angle.rkd_angle_backward(e_s, e_t, stats_a, weight=w_angle / n ** 3,
                                              dist=(w_dist / n ** 2, dist))
            divisor = 1
        elif w_dist:  # one term: its count and weight divide in difference_grad, nothing is scaled
            terms, divisor = _dist.rkd_distance_backward(d_s, d_t, stats_d, parts_lo=d_lo), n ** 2 / w_dist
        elif w_angle:
            terms, divisor = _angle.rkd_angle_backward(e_s, e_t, stats_a), n ** 3 / w_angle
        else:
            return None, None, None, None
        m_s, _, m_t, _ = terms
        # Each term's r is minus its M's row sums: the difference form, which reads M alone.
        grads = tuple(_gram.difference_grad(m, None, x, grad_out, x, divisor=divisor) if needed else None
                      for m, x, needed in ((m_s, feat_s, ctx.needs_input_grad[0]),
                                           (m_t, feat_t, ctx.needs_input_grad[1])))
        if w_angle:  # the angle term's direct-path anchors, added to the rows' gradients
            # The (N, N) M buffers go first: the direct path's float64 scratch takes their memory.
            terms = dist = m_s = m_t = None
            _angle.rkd_angle_direct_grad((_gram.flat(feat_s), _gram.flat(feat_t)), e_s, e_t, stats_a, grads,
                                         grad_out.to(torch.float64) * (w_angle / n ** 3))
        return (*grads, None, None)


# The float32 path's E is float32, which rows past about 1e19 overflow (NaN), where the
# reference's angles, from normalised difference vectors, stay finite. With the angle term,
# each side's rows are brought into range by a power of two first (_in_range): exactly, and
# no angle or normalised distance changes.
_ROW_MAX_EXP = 47


def _in_range(x_s, x_t):
    """(x_s 2^-k_s, x_t 2^-k_t), for each side the least k >= 0 with max|x| 2^-k < 2^47, found
    on the device (no host sync): the squared distances of such rows, below D 2^98, stay
    within float32 and below the angle kernels' FAST_MAX (1e37) for D up to 2^24. k = 0 (x
    unchanged) below 2^47 and where max|x| is inf or NaN. Directions shorter than
    NORM_EPS 2^k then count as zero, which on rows past 2^47 only differences of their small
    entries can be."""
    if not (x_s.numel() and x_t.numel()):
        return x_s, x_t
    with torch.no_grad():
        top = torch.stack([torch.linalg.vector_norm(x.detach(), float("inf"), dtype=torch.float32)
                           for x in (x_s, x_t)])
        # 2^-k from its bits, exact: the biased exponent 127 - k, with top < 2^exponent.
        scale = ((127 + _ROW_MAX_EXP - torch.frexp(top).exponent).clamp_(1, 127) << 23).view(torch.float32)
    return x_s * scale[0], x_t * scale[1]


def rkd(feat_s, feat_t, w_dist, w_angle):
    if w_angle and _float32_path(feat_s, feat_t):
        feat_s, feat_t = _in_range(feat_s, feat_t)
    return _ops.apply("RKDFunction", feat_s, feat_t, w_dist, w_angle)


def rkd_distance(feat_s, feat_t):
    return _ops.apply("RKDFunction", feat_s, feat_t, 1.0, 0.0)


def rkd_angle(feat_s, feat_t):
    return rkd(feat_s, feat_t, 0.0, 1.0)


class SPFunction(torch.autograd.Function):
    """mse(G^_s, G^_t), G^ = normalize(G, dim=1), G the raw Gram matrix of flat(fm), read from
    the features as they are: float64 for float64 inputs; otherwise (_float32_path) hi + lo
    float32 parts (gram_split) and float32 kernels, double-float where G^_s - G^_t cancels
    (fastkd/kernels/cosine.py). With a backward to follow, forward also writes the loss and
    the gradients at grad_output 1 (M, then dL/dX = M X / N^2), and backward scales them
    (saved_gradients)."""

    @staticmethod
    def forward(ctx, fm_s, fm_t, grad=True):
        need = _forward_grads(ctx, grad, 2)
        if _float32_path(fm_s, fm_t):
            g_s, g_t = _gram.gram_split(fm_s), _gram.gram_split(fm_t)
            count = len(g_s[0]) ** 2
            forward, backward = _cosine.sp_split_forward, _cosine.sp_split_backward
        else:
            g_s, g_t = _gram.gram(fm_s), _gram.gram(fm_t)
            count = len(g_s) ** 2
            forward, backward = _cosine.sp_forward, _cosine.sp_backward
        part, stats = forward(g_s, g_t)
        dtype = result_dtype(fm_s, fm_t)
        if not any(need):
            ctx.save_for_backward(None, None)
            return (part.sum() / count).to(dtype)
        m_s, m_t, loss = backward(g_s, g_t, stats, part=part, loss_dtype=dtype)
        ctx.save_for_backward(*(_gram.gram_grad(m, None, f, None, f, divisor=count) if needed else None
                                for m, f, needed in ((m_s, fm_s, need[0]), (m_t, fm_t, need[1]))))
        return loss

    backward = staticmethod(first_order(saved_gradients))


def sp(fm_s, fm_t):
    return _ops.apply("SPFunction", fm_s, fm_t, torch.is_grad_enabled())


class PKTFunction(torch.autograd.Function):
    """mean P_t log((P_t + eps) / (P_s + eps)), P the row-normalised (C + 1) / 2 and C the
    cosine similarities, read from the raw Gram matrices: float64 for float64 inputs;
    otherwise (_float32_path) G = hi + lo (gram_split) and float32 kernels, double-float
    where C' = (C + 1) / 2 and P's rows cancel (fastkd/kernels/cosine.py)."""

    @staticmethod
    def forward(ctx, feat_s, feat_t, eps):
        ctx.eps = eps
        ctx.fast = _float32_path(feat_s, feat_t)
        if ctx.fast:
            g_s, g_t = _gram.gram_split(feat_s), _gram.gram_split(feat_t)
            total, stats = _cosine.pkt_split_forward(g_s, g_t, eps)
            ctx.save_for_backward(feat_s, feat_t, *g_s, *g_t, stats)
        else:
            g_s, g_t = _gram.gram(feat_s), _gram.gram(feat_t)
            total, stats = _cosine.pkt_forward(g_s, g_t, eps)
            ctx.save_for_backward(feat_s, feat_t, g_s, g_t, stats)
        return (total / len(feat_s) ** 2).to(result_dtype(feat_s, feat_t))

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        if ctx.fast:
            feat_s, feat_t, gs, gs_lo, gt, gt_lo, stats = ctx.saved_tensors
            m_s, r_s, m_t, r_t = _cosine.pkt_split_backward((gs, gs_lo), (gt, gt_lo), ctx.eps, stats)
        else:
            feat_s, feat_t, g_s, g_t, stats = ctx.saved_tensors
            m_s, r_s, m_t, r_t = _cosine.pkt_backward(g_s, g_t, ctx.eps, stats)
        return (*_pairwise_grads(ctx, ((m_s, r_s, feat_s, feat_s), (m_t, r_t, feat_t, feat_t)), grad_out,
                                 len(feat_s) ** 2), None)


def pkt_cos_sim(feat_s, feat_t, eps=1e-6):
    return _ops.apply("PKTFunction", feat_s, feat_t, eps)


class CCFunction(torch.autograd.Function):
    """mse(K_s, K_t), K = sum_{p<=P} e^{-2 gamma} (2 gamma)^p / p! S^p and S = X^ X^^T the
    cosine similarities. Float64 inputs: X^ the rows normalised first as the reference does
    (a Gram matrix of raw rows far from the origin rounds the cosines more). Otherwise
    (_float32_path) S = G / (n_a n_b) double-float from the raw rows' G = hi + lo (gram_split),
    float32 kernels and the gradient on the raw rows (fastkd/kernels/cosine.py)."""

    @staticmethod
    def forward(ctx, feat_s, feat_t, gamma, p_order):
        ctx.gamma, ctx.p_order = gamma, p_order
        ctx.fast = _float32_path(feat_s, feat_t)
        if ctx.fast:
            (gs, gs_lo), (gt, gt_lo) = _gram.gram_split(feat_s), _gram.gram_split(feat_t)
            total = _cosine.cc_split_forward((gs, gs_lo), (gt, gt_lo), gamma, p_order)
            ctx.save_for_backward(feat_s, feat_t, gs, gs_lo, gt, gt_lo)
            return (total / len(gs) ** 2).to(result_dtype(feat_s, feat_t))
        (x_s, n_s), (x_t, n_t) = (_gram.prepare(f, centre=False, normalise=True) for f in (feat_s, feat_t))
        g_s, g_t = _gram.gram(x_s), _gram.gram(x_t)
        total = _cosine.cc_forward(g_s, g_t, gamma, p_order)
        ctx.save_for_backward(feat_s, feat_t, x_s, x_t, n_s, n_t, g_s, g_t)
        return (total / len(g_s) ** 2).to(result_dtype(feat_s, feat_t))

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        if ctx.fast:
            feat_s, feat_t, gs, gs_lo, gt, gt_lo = ctx.saved_tensors
            m_s, r_s, m_t, r_t = _cosine.cc_split_backward((gs, gs_lo), (gt, gt_lo), ctx.gamma, ctx.p_order)
            return (*_pairwise_grads(ctx, ((m_s, r_s, feat_s, feat_s), (m_t, r_t, feat_t, feat_t)), grad_out,
                                     len(gs) ** 2), None, None)
        feat_s, feat_t, x_s, x_t, n_s, n_t, g_s, g_t = ctx.saved_tensors
        m_s, r_s, m_t, r_t = _cosine.cc_backward(g_s, g_t, n_s, n_t, ctx.gamma, ctx.p_order)
        return (*_pairwise_grads(ctx, ((m_s, r_s, x_s, feat_s), (m_t, r_t, x_t, feat_t)), grad_out,
                                 len(g_s) ** 2), None, None)


def cc(feat_s, feat_t, gamma, P_order):
    return _ops.apply("CCFunction", feat_s, feat_t, gamma, P_order)


class IRGEdgeFunction(torch.autograd.Function):
    """mse(E'_s, E'_t), E' = pdist2 / max(pdist2) of flat(x). Float64 inputs: E from the
    centred float64 Gram matrix (formed in the kernels as fastkd.common.squared_distances_from_gram
    does). Otherwise (_float32_path) E from float32 arithmetic (squared_distances_parts: hi +
    lo, hi read as E, lo only to order the maximum), the kernels in float32 and the gradient
    in the difference form (difference_grad)."""

    @staticmethod
    def forward(ctx, x_s, x_t):
        fast = ctx.fast = _float32_path(x_s, x_t)
        if fast:
            (e_s, l_s), (e_t, l_t) = (_gram.squared_distances_parts(x) for x in (x_s, x_t))
            total, stats = _dist.irg_edge_forward(e_s, e_t, parts_lo=(l_s, l_t))
            ctx.save_for_backward(x_s, x_t, e_s, e_t, l_s, l_t, stats)
            return (total / len(e_s) ** 2).to(x_s.dtype)
        c_s, c_t = (_gram.prepare(x, centre=True) for x in (x_s, x_t))
        g_s, g_t = _gram.gram(c_s), _gram.gram(c_t)
        total, stats = _dist.irg_edge_forward(g_s, g_t)
        ctx.save_for_backward(x_s, x_t, c_s, c_t, g_s, g_t, stats)
        return (total / len(g_s) ** 2).to(x_s.dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        if ctx.fast:
            x_s, x_t, e_s, e_t, l_s, l_t, stats = ctx.saved_tensors
            m_s, _, m_t, _ = _dist.irg_edge_backward(e_s, e_t, stats, parts_lo=(l_s, l_t))
            return tuple(_gram.difference_grad(m, None, x, grad_out, x, divisor=len(e_s) ** 2) if needed
                         else None for m, x, needed in ((m_s, x_s, ctx.needs_input_grad[0]),
                                                        (m_t, x_t, ctx.needs_input_grad[1])))
        x_s, x_t, c_s, c_t, g_s, g_t, stats = ctx.saved_tensors
        m_s, r_s, m_t, r_t = _dist.irg_edge_backward(g_s, g_t, stats)
        return _pairwise_grads(ctx, ((m_s, r_s, c_s, x_s), (m_t, r_t, c_t, x_t)), grad_out, len(g_s) ** 2)


def irg_edge(irg_s, irg_t):
    """The mean of the edge terms of feat, fm1 and fm2; irg_* = (fm1, fm2, feat, out)."""
    return sum(_ops.apply("IRGEdgeFunction", irg_s[i], irg_t[i]) for i in (2, 0, 1)) / 3.0


class IRGTransformationFunction(torch.autograd.Function):
    """mse(T_s, T_t), T = d / max(d), d_i = max(|a_i - b'_i|^2, 1e-12) over sample i's values;
    a (N, C, H, W) (fm1, pooled already), b (N, C2, H2, W2) (fm2), b' = b's channels averaged
    in pairs when C < C2, else b; a and b' paired by flat index. One launch per side for d,
    one for the loss and dL/dd at grad_output 1, and with a backward to follow one per side
    writing da, db, which backward scales (saved_gradients)."""

    @staticmethod
    def forward(ctx, a_s, b_s, a_t, b_t, grad=True):
        need = _forward_grads(ctx, grad, 4)
        dtype = result_dtype(a_s, b_s, a_t, b_t)
        if _float32_path(a_s, b_s, a_t, b_t):
            # float32 arithmetic, double-float where a near-zero loss cancels (the distances,
            # T_s - T_t, the maxima's order: fastkd/kernels/irg_transformation.py).
            d_s = _irg_t.transformation_distances_split(a_s, b_s)
            d_t = _irg_t.transformation_distances_split(a_t, b_t)
            loss, dd_s, dd_t = _irg_t.transformation_split_loss(d_s, d_t, dtype)
        else:
            # float64, as every pairwise sum (fastkd.kernels.gram): a near-zero loss is a
            # difference of nearly equal T_s, T_t.
            d_s = _irg_t.transformation_distances(a_s, b_s, torch.float64)
            d_t = _irg_t.transformation_distances(a_t, b_t, torch.float64)
            loss, dd_s, dd_t = _irg_t.transformation_loss(d_s, d_t, dtype)
        ctx.save_for_backward(*_irg_t.transformation_grads(a_s, b_s, dd_s, need[0], need[1]),
                              *_irg_t.transformation_grads(a_t, b_t, dd_t, need[2], need[3]))
        return loss

    backward = staticmethod(first_order(saved_gradients))


def irg_transformation(irg_s, irg_t):
    """mse(T(fm1_s, fm2_s), T(fm1_t, fm2_t)); irg_* = (fm1, fm2, feat, out)."""
    return _ops.apply("IRGTransformationFunction", transformation_pool(irg_s[0], irg_s[1]), irg_s[1],
                      transformation_pool(irg_t[0], irg_t[1]), irg_t[1], torch.is_grad_enabled())


# --- global batch: this rank's rows of the pairwise relations ------------------------------
# With global_batch=True (fastkd.functional) on the triton backend, as the torch backend's
# *_global functions (fastkd/torch_backend/pairwise.py) but on the kernels above: each
# function gathers every rank's rows X (N, ...) (all_gather_rows, differentiable), runs the
# kernels on this rank's rows lo:lo + n of the (N, N) relations (RKD's angle: its anchors,
# reading E (N, N) gathered from every rank's rows), all-reduces the global statistics
# (RKD's mean distances, IRG's maxima) between the kernel passes, and returns
# all_reduce_sum of its part L_r of L = sum_r L_r.
#
# Gradients. Each Function returns L_r, and its backward gives this rank's share of dL/dX,
# the shares summing over the ranks to dL/dX: the global statistics are every rank's in
# forward, and all_reduce_sum's backward hands every rank's L_r the same upstream gradient,
# which all_gather_rows' backward then sums over the ranks (fastkd/distributed.py's
# convention: rank r's own rows get W dL/dx_r). Where dL/dE is symmetric and continuous
# (RKD's distances, CC; PKT once every row's sums and dots are gathered), a rank's rows of it
# give those rows' whole gradient (one product, (n, N) by (N, D)); elsewhere (SP, IRG's edge, whose maximum's gradient needs both (a, b)
# and (b, a), which two ranks may round apart) W_r X on the rank's rows plus W_r^T X_r on
# every row; RKD's angle term reaches every row from its anchors. Each in its one-process
# Function's arithmetic above (float64 inputs in float64, the others on the float32 paths);
# the loss part cast by the caller.


def _gathered(x, group, sizes):
    """(X, lo, n): every rank's x (n_r, ...) concatenated (differentiable), the offset of this
    rank's rows in it and their count."""
    full, lo = all_gather_rows(x, group, sizes)
    return full, lo, x.shape[0]


def _own_rows(part, like, lo):
    """The gradient of X (N, ...) shaped and typed like `like`: part (the gradient of the rows
    lo:lo + n, n = len(part)) there, zeros elsewhere."""
    out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    out.view(len(like), -1)[lo:lo + len(part)] = part.reshape(len(part), -1)
    return out


class RKDRowsFunction(torch.autograd.Function):
    """This rank's part of w_dist * distance term + w_angle * angle term (either weight may be
    0): the distances d of the rows lo:lo + n of E (n, N) and the angles at the anchors
    lo:lo + n, from E (N, N) gathered from every rank's rows; X_* (N, ...) every rank's rows.
    On the float32 path (_float32_path) both terms read E as float32 parts (_split_sides;
    the angle term every rank's, gathered: no float64 E)."""

    @staticmethod
    def forward(ctx, x_s, x_t, lo, n, w_dist, w_angle, group, sizes):
        big = len(x_s)
        fast = _float32_path(x_s, x_t)
        if fast:
            e_s = e_t = None
            own_parts = _split_sides(x_s, x_t, lo, n)
        else:
            e_s, e_t, own_parts = _gram.squared_distances(x_s, lo, n), _gram.squared_distances(x_t, lo, n), None
        d_s, d_t, d_lo = _rkd_distance_inputs(e_s, e_t, own_parts)
        loss = d_s.new_zeros(())
        stats_d = stats_a = full_s = full_t = parts = None
        if w_dist:
            total, stats_d = _dist.rkd_distance_forward(d_s, d_t, lo, reducer(group), d_lo)
            loss = loss + w_dist * total / big ** 2
        if w_angle:  # every rank's rows of E: float64, or on the float32 path its float32 parts
            if fast:
                parts = tuple(all_gather_rows(p, group, sizes)[0] for p in own_parts)
            else:
                full_s, full_t = (all_gather_rows(e, group, sizes)[0] for e in (e_s, e_t))
            total, stats_a = _angle.rkd_angle_forward(full_s, full_t, any(ctx.needs_input_grad),
                                                      (_gram.flat(x_s), _gram.flat(x_t)), lo, n, parts=parts)
            loss = loss + w_angle * total / big ** 3
        ctx.save_for_backward(x_s, x_t, full_s, full_t, d_s, d_t, *(d_lo or (None, None)), stats_d,
                              *(stats_a or ()))
        ctx.lo, ctx.weights = lo, (w_dist, w_angle)
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x_s, x_t, full_s, full_t, d_s, d_t, l_s, l_t, stats_d, *stats_a = ctx.saved_tensors
        (w_dist, w_angle), lo, big = ctx.weights, ctx.lo, len(x_s)
        grad = grad_out.to(torch.float64)
        dist_terms = (_dist.rkd_distance_backward(d_s, d_t, stats_d, lo, None if l_s is None else (l_s, l_t))
                      if w_dist else None)
        # The angle term reaches every row: M (N, N), the distance term's (on our rows) added.
        terms = (_angle.rkd_angle_backward(full_s, full_t, stats_a, lo, weight=w_angle / big ** 3,
                                           dist=None if dist_terms is None else (w_dist / big ** 2, dist_terms))
                 if w_angle
                 else dist_terms)
        grads = []
        for side, x in enumerate((x_s, x_t)):
            if not ctx.needs_input_grad[side]:
                grads.append(None)
                continue
            # Each term's r is minus its M's row sums: the difference form, which reads M alone.
            m = terms[2 * side]
            if not w_angle:  # the distance term alone: these rows' whole gradient
                own = _gram.difference_grad(m, None, x, grad * (w_dist / big ** 2), x, lo=lo)
                grads.append(_own_rows(own, x, lo))
            else:
                grads.append(_gram.difference_grad(m, None, x, grad, x))
        if w_angle:  # the angle term's direct-path anchors, added to every row's gradient
            # The (N, N) M buffers go first: the direct path's float64 scratch takes their memory.
            terms = dist_terms = m = None
            _angle.rkd_angle_direct_grad((_gram.flat(x_s), _gram.flat(x_t)), full_s, full_t, stats_a, grads,
                                         grad * (w_angle / big ** 3), lo)
        return (*grads, None, None, None, None, None, None)


def _rkd_global_part(feat_s, feat_t, w_dist, w_angle, group, sizes):
    (x_s, lo, n), (x_t, _, _) = _gathered(feat_s, group, sizes), _gathered(feat_t, group, sizes)
    if w_angle and _float32_path(x_s, x_t):
        # As rkd's (_in_range): every rank scales the same gathered rows alike.
        x_s, x_t = _in_range(x_s, x_t)
    return all_reduce_sum(RKDRowsFunction.apply(x_s, x_t, lo, n, w_dist, w_angle, group, sizes), group)


def rkd_global(feat_s, feat_t, w_dist, w_angle, *, group, sizes):
    """rkd over every rank's batch (sizes: their local batch sizes), sharded: this rank's rows
    of E and its anchors' angles."""
    return _rkd_global_part(feat_s, feat_t, w_dist, w_angle, group, sizes).to(result_dtype(feat_s, feat_t))


def rkd_distance_global(feat_s, feat_t, *, group, sizes):
    """rkd_distance over every rank's batch, sharded: this rank's rows of E."""
    return _rkd_global_part(feat_s, feat_t, 1.0, 0.0, group, sizes).to(result_dtype(feat_s, feat_t))


def rkd_angle_global(feat_s, feat_t, *, group, sizes):
    """rkd_angle over every rank's batch, sharded: the angles at this rank's anchors."""
    return _rkd_global_part(feat_s, feat_t, 0.0, 1.0, group, sizes).to(result_dtype(feat_s, feat_t))


def _rows_and_transpose_grad(w, x, lo, scale, z=None, r=None, rt=None):
    """scale * (W X + r * X_rows on the rows lo:lo + n, + W^T X_rows + rt * Z on every row)
    (N, D) float64, for W (n, N) = dL/d(rows lo:lo + n of a relation) and X (N, D)."""
    rows = x[lo:lo + len(w)]
    out = _gram.gram_grad(w.t(), rt, rows, scale, x, z=z)
    out[lo:lo + len(w)] += _gram.gram_grad(w, r, x, scale, rows, lo)
    return out


class SPRowsFunction(torch.autograd.Function):
    """This rank's part of SP: the rows lo:lo + n of G^_s - G^_t, G^ = normalize(G, dim=1) and
    G = X X^T (n, N) from X_* (N, ...) every rank's rows. Each row's norm is its own, so no
    statistic is global; dL/dG (n, N) reaches every row as W X + W^T X_rows. Float32 path
    (_float32_path) as SPFunction's: G's rows as hi + lo, W float32, X the raw rows."""

    @staticmethod
    def forward(ctx, f_s, f_t, lo, n):
        ctx.lo = lo
        ctx.fast = _float32_path(f_s, f_t)
        if ctx.fast:
            (gs, gs_lo), (gt, gt_lo) = _gram.gram_split(f_s, lo, n), _gram.gram_split(f_t, lo, n)
            part, stats = _cosine.sp_split_forward((gs, gs_lo), (gt, gt_lo))
            ctx.save_for_backward(f_s, f_t, f_s, f_t, gs, gt, stats, gs_lo, gt_lo)
            return part.sum() / len(f_s) ** 2
        x_s, x_t = _gram.prepare(f_s, centre=False), _gram.prepare(f_t, centre=False)
        g_s, g_t = _gram.gram(x_s, lo, n), _gram.gram(x_t, lo, n)
        part, stats = _cosine.sp_forward(g_s, g_t)
        ctx.save_for_backward(f_s, f_t, x_s, x_t, g_s, g_t, stats)
        return part.sum() / len(x_s) ** 2

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        f_s, f_t, x_s, x_t, g_s, g_t, stats, *parts_lo = ctx.saved_tensors
        if ctx.fast:
            w_s, w_t, _ = _cosine.sp_split_backward((g_s, parts_lo[0]), (g_t, parts_lo[1]), stats, square=False)
            scale = grad_out.to(torch.float32) / len(x_s) ** 2
        else:
            w_s, w_t, _ = _cosine.sp_backward(g_s, g_t, stats, square=False)
            scale = grad_out.to(torch.float64) / len(x_s) ** 2
        return (*(_rows_and_transpose_grad(w, x, ctx.lo, scale).reshape(f.shape).to(f.dtype) if needed
                  else None for w, x, f, needed in ((w_s, x_s, f_s, ctx.needs_input_grad[0]),
                                                     (w_t, x_t, f_t, ctx.needs_input_grad[1]))), None, None)


def sp_global(fm_s, fm_t, *, group, sizes):
    """sp over every rank's batch, sharded: this rank's rows of G^_s - G^_t."""
    (x_s, lo, n), (x_t, _, _) = _gathered(fm_s, group, sizes), _gathered(fm_t, group, sizes)
    part = SPRowsFunction.apply(x_s, x_t, lo, n)
    return all_reduce_sum(part, group).to(result_dtype(fm_s, fm_t))


class PKTRowsFunction(torch.autograd.Function):
    """This rank's part of PKT: the rows lo:lo + n of P_t log((P_t + eps) / (P_s + eps)) (n, N),
    from the raw Gram rows of X_* (N, ...) every rank's rows (each row of P normalised over all
    N). dL/dC's symmetric part at (a, b) needs row b's sums and dots: those (N,) vectors are
    gathered from every rank, and these rows' M and r then give their whole gradient. Float32
    path (_float32_path) as PKTFunction's, X the raw rows, every row's squared norm as hi + lo
    (squared_norms_split)."""

    @staticmethod
    def forward(ctx, f_s, f_t, eps, lo, n, group, sizes):
        ctx.eps, ctx.lo = eps, lo
        ctx.fast = _float32_path(f_s, f_t)
        if ctx.fast:
            x_s, x_t = f_s, f_t
            sl_s, sl_t = _gram.slices(x_s), _gram.slices(x_t)
            g_s, g_t = _gram.gram_split(x_s, lo, n, sl_s), _gram.gram_split(x_t, lo, n, sl_t)
            sq = (_gram.squared_norms_split(x_s, sl_s), _gram.squared_norms_split(x_t, sl_t))
            total, stats = _cosine.pkt_split_forward(g_s, g_t, eps, lo, sq)
            saved = (*g_s, *g_t, *sq[0], *sq[1])
        else:
            x_s, x_t = _gram.prepare(f_s, centre=False), _gram.prepare(f_t, centre=False)
            g_s, g_t = _gram.gram(x_s, lo, n), _gram.gram(x_t, lo, n)
            sq = (torch.linalg.vecdot(x_s, x_s), torch.linalg.vecdot(x_t, x_t))  # G's diagonal
            total, stats = _cosine.pkt_forward(g_s, g_t, eps, lo, sq)
            saved = (g_s, g_t, *sq)
        stats = all_gather_rows(stats.permute(2, 0, 1), group, sizes)[0].permute(1, 2, 0).contiguous()
        ctx.save_for_backward(f_s, f_t, x_s, x_t, stats, *saved)
        return total / len(x_s) ** 2

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        f_s, f_t, x_s, x_t, stats, *saved = ctx.saved_tensors
        if ctx.fast:
            gs, gs_lo, gt, gt_lo, sqs, sqs_lo, sqt, sqt_lo = saved
            m_s, r_s, m_t, r_t = _cosine.pkt_split_backward((gs, gs_lo), (gt, gt_lo), ctx.eps, stats, ctx.lo,
                                                            ((sqs, sqs_lo), (sqt, sqt_lo)))
        else:
            g_s, g_t, sq_s, sq_t = saved
            m_s, r_s, m_t, r_t = _cosine.pkt_backward(g_s, g_t, ctx.eps, stats, ctx.lo, (sq_s, sq_t))
        scale = grad_out.to(m_s.dtype) / len(x_s) ** 2
        return (*(_own_rows(_gram.gram_grad(m, r, x, scale, f, ctx.lo), f, ctx.lo) if needed else None
                  for m, r, x, f, needed in ((m_s, r_s, x_s, f_s, ctx.needs_input_grad[0]),
                                             (m_t, r_t, x_t, f_t, ctx.needs_input_grad[1]))),
                None, None, None, None, None)


def pkt_cos_sim_global(feat_s, feat_t, eps=1e-6, *, group, sizes):
    """pkt_cos_sim over every rank's batch, sharded: this rank's rows of P."""
    (x_s, lo, n), (x_t, _, _) = _gathered(feat_s, group, sizes), _gathered(feat_t, group, sizes)
    part = PKTRowsFunction.apply(x_s, x_t, eps, lo, n, group, sizes)
    return all_reduce_sum(part, group).to(result_dtype(feat_s, feat_t))


class CCRowsFunction(torch.autograd.Function):
    """This rank's part of CC: the rows lo:lo + n of K_s - K_t (n, N), S = X^ X^^T from the
    normalised rows of X_* (N, ...) every rank's rows. dL/dS is symmetric: its rows give
    these rows' whole gradient. Float32 path (_float32_path) as CCFunction's, with every
    row's squared norm as hi + lo (squared_norms_split)."""

    @staticmethod
    def forward(ctx, f_s, f_t, gamma, p_order, lo, n):
        ctx.gamma, ctx.p_order, ctx.lo = gamma, p_order, lo
        ctx.fast = _float32_path(f_s, f_t)
        if ctx.fast:
            sl_s, sl_t = _gram.slices(f_s), _gram.slices(f_t)
            (gs, gs_lo), (gt, gt_lo) = _gram.gram_split(f_s, lo, n, sl_s), _gram.gram_split(f_t, lo, n, sl_t)
            sq_s, sq_s_lo = _gram.squared_norms_split(f_s, sl_s)
            sq_t, sq_t_lo = _gram.squared_norms_split(f_t, sl_t)
            total = _cosine.cc_split_forward((gs, gs_lo), (gt, gt_lo), gamma, p_order, lo,
                                             ((sq_s, sq_s_lo), (sq_t, sq_t_lo)))
            ctx.save_for_backward(f_s, f_t, gs, gs_lo, gt, gt_lo, sq_s, sq_s_lo, sq_t, sq_t_lo)
            return total / len(f_s) ** 2
        (x_s, n_s), (x_t, n_t) = (_gram.prepare(f, centre=False, normalise=True) for f in (f_s, f_t))
        g_s, g_t = _gram.gram(x_s, lo, n), _gram.gram(x_t, lo, n)
        total = _cosine.cc_forward(g_s, g_t, gamma, p_order)
        ctx.save_for_backward(f_s, f_t, x_s, x_t, n_s, n_t, g_s, g_t)
        return total / len(x_s) ** 2

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        if ctx.fast:
            f_s, f_t, gs, gs_lo, gt, gt_lo, sq_s, sq_s_lo, sq_t, sq_t_lo = ctx.saved_tensors
            m_s, r_s, m_t, r_t = _cosine.cc_split_backward((gs, gs_lo), (gt, gt_lo), ctx.gamma, ctx.p_order, ctx.lo,
                                                           ((sq_s, sq_s_lo), (sq_t, sq_t_lo)))
            x_s, x_t, scale = f_s, f_t, grad_out.to(torch.float32) / len(f_s) ** 2
        else:
            f_s, f_t, x_s, x_t, n_s, n_t, g_s, g_t = ctx.saved_tensors
            m_s, r_s, m_t, r_t = _cosine.cc_backward(g_s, g_t, n_s, n_t, ctx.gamma, ctx.p_order, ctx.lo)
            scale = grad_out.to(torch.float64) / len(x_s) ** 2
        return (*(_own_rows(_gram.gram_grad(m, r, x, scale, f, ctx.lo), f, ctx.lo) if needed else None
                  for m, r, x, f, needed in ((m_s, r_s, x_s, f_s, ctx.needs_input_grad[0]),
                                             (m_t, r_t, x_t, f_t, ctx.needs_input_grad[1]))),
                None, None, None, None)


def cc_global(feat_s, feat_t, gamma, P_order, *, group, sizes):
    """cc over every rank's batch, sharded: this rank's rows of K_s - K_t."""
    (x_s, lo, n), (x_t, _, _) = _gathered(feat_s, group, sizes), _gathered(feat_t, group, sizes)
    part = CCRowsFunction.apply(x_s, x_t, gamma, P_order, lo, n)
    return all_reduce_sum(part, group).to(result_dtype(feat_s, feat_t))


class IRGEdgeRowsFunction(torch.autograd.Function):
    """This rank's part of one IRG edge term: the rows lo:lo + n of E'_s - E'_t, E' = pdist2 /
    max(pdist2), E (n, N) from the Gram rows of the centred float64 X_* (N, ...) (every rank's
    rows), the maxima and the gradient's sums all-reduced. dL/dE's rows reach every row
    (W X on these rows, W^T X_rows on all). On the float32 path (_float32_path) E's rows come
    from squared_distances_parts, exactly symmetric across ranks ((x_a - x_b)^2 = (x_b - x_a)^2
    bit for bit, the statistics all-reduced alike), so W is symmetric and these rows' W gives
    their whole gradient in the difference form, as RKD's distance term."""

    @staticmethod
    def forward(ctx, x_s, x_t, lo, n, group):
        ctx.lo = lo
        fast = ctx.fast = _float32_path(x_s, x_t)
        if fast:
            (e_s, l_s), (e_t, l_t) = (_gram.squared_distances_parts(x, lo, n) for x in (x_s, x_t))
            total, stats = _dist.irg_edge_forward(e_s, e_t, lo, reducer(group), parts_lo=(l_s, l_t))
            ctx.save_for_backward(x_s, x_t, e_s, e_t, l_s, l_t, stats)
            return total / len(x_s) ** 2
        c_s, c_t = (_gram.prepare(x, centre=True) for x in (x_s, x_t))
        g_s, g_t = _gram.gram(c_s, lo, n), _gram.gram(c_t, lo, n)
        sq_s, sq_t = torch.linalg.vecdot(c_s, c_s), torch.linalg.vecdot(c_t, c_t)
        total, stats = _dist.irg_edge_forward(g_s, g_t, lo, reducer(group), (sq_s, sq_t))
        ctx.save_for_backward(x_s, x_t, c_s, c_t, g_s, g_t, sq_s, sq_t, stats)
        return total / len(c_s) ** 2

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        if ctx.fast:
            x_s, x_t, e_s, e_t, l_s, l_t, stats = ctx.saved_tensors
            m_s, _, m_t, _ = _dist.irg_edge_backward(e_s, e_t, stats, ctx.lo, parts_lo=(l_s, l_t))
            return (*(_own_rows(_gram.difference_grad(m, None, x, grad_out, x, ctx.lo, len(x) ** 2), x, ctx.lo)
                      if needed else None for m, x, needed in ((m_s, x_s, ctx.needs_input_grad[0]),
                                                               (m_t, x_t, ctx.needs_input_grad[1]))),
                    None, None, None)
        x_s, x_t, c_s, c_t, g_s, g_t, sq_s, sq_t, stats = ctx.saved_tensors
        m_s, r_s, m_t, r_t = _dist.irg_edge_backward(g_s, g_t, stats, ctx.lo, (sq_s, sq_t))
        # M = -4 W, r = 4 rowsum(W) on these rows; with half of each, these rows get
        # 2 sum_b W_ab (x_a - x_b) and every row b gets 2 sum_a W_ab (x_b - x_a).
        scale = grad_out.to(torch.float64) / len(c_s) ** 2 * 0.5
        return (*(_rows_and_transpose_grad(m, c, ctx.lo, scale, z=c, r=r, rt=-m.sum(0))
                  .reshape(x.shape).to(x.dtype) if needed else None
                  for m, r, c, x, needed in ((m_s, r_s, c_s, x_s, ctx.needs_input_grad[0]),
                                             (m_t, r_t, c_t, x_t, ctx.needs_input_grad[1]))), None, None, None)


def irg_edge_global(irg_s, irg_t, *, group, sizes):
    """irg_edge over every rank's batch, sharded: this rank's rows of each E."""
    part = 0.0
    for i in (2, 0, 1):
        (x_s, lo, n), (x_t, _, _) = _gathered(irg_s[i], group, sizes), _gathered(irg_t[i], group, sizes)
        part = part + IRGEdgeRowsFunction.apply(x_s, x_t, lo, n, group)
    return (all_reduce_sum(part, group) / 3.0).to(irg_s[2].dtype)


class TransformationDistancesFunction(torch.autograd.Function):
    """d (N,) float64, d_i = |a_i - b'_i|^2 over sample i's values, unclamped (the kernels of
    IRGTransformationFunction, for a global batch's own samples). Float32 path
    (_float32_path): d from the float32 kernel's hi + lo (exact in float64 to 2^-48), the
    gradient kernel in float32."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        ctx.fast = _float32_path(a, b)
        if ctx.fast:
            hi, lo = _irg_t.transformation_distances_split(a, b)
            return hi.to(torch.float64).add_(lo)  # (N,): O(N) float64 work in torch
        return _irg_t.transformation_distances(a, b, torch.float64)

    @staticmethod
    @first_order
    def backward(ctx, dd):
        a, b = ctx.saved_tensors
        dd = dd.to(torch.float32) if ctx.fast else dd
        return _irg_t.transformation_grads(a, b, dd.contiguous(), *ctx.needs_input_grad)


def irg_transformation_global(irg_s, irg_t, *, group, sizes):
    """irg_transformation over every rank's batch: one distance per sample, so nothing is
    gathered; max(d') all-reduced (differentiable) and the mean over all N samples."""
    d_s, d_t = (TransformationDistancesFunction.apply(transformation_pool(x[0], x[1]), x[1]).clamp(min=1e-12)
                for x in (irg_s, irg_t))
    part = F.mse_loss(d_s / all_reduce_max(d_s, group), d_t / all_reduce_max(d_t, group),
                      reduction="sum") / sum(sizes)
    return all_reduce_sum(part, group).to(result_dtype(*irg_s[:2], *irg_t[:2]))


# --- softmax-KL over logits: SoftTarget, DML, BSS (fastkd.kernels.softmax_kl) ---------------


class SoftmaxKLFunction(torch.autograd.Function):
    """scale / B * sum over rows of KL(softmax(t / T) || softmax(s / T)); classes on dim 1.

    Logits of at most FUSED_MAX values per input (fastkd.kernels.softmax_kl), where a launch
    costs more than the work: one program writes the loss and the gradients at
    grad_output 1, and backward only scales them (fastkd.autograd.saved_gradients).
    Larger ones: forward is one streaming pass that keeps five numbers per row (the two
    softmaxes' shifts and log-normalisers, and KL_row), and backward recomputes the softmaxes
    from them: the gradient written in forward would cost a second pass over the logits
    there, a (rows x classes) buffer held until backward and a third pass to scale it.
    grad: whether a backward can follow (grad mode at the call; forward runs without it).
    """

    @staticmethod
    def forward(ctx, out_s, out_t, T, scale, grad=True):
        acc = accumulation_dtype(out_s, out_t)
        dtype = result_dtype(out_s, out_t)
        ctx.fused = out_s.numel() <= _softmax_kl.FUSED_MAX
        if ctx.fused:
            loss, *grads = _softmax_kl.softmax_kl_fused(out_s, out_t, T, scale, acc, dtype,
                                                        *_forward_grads(ctx, grad, 2))
            ctx.save_for_backward(*grads)
            return loss
        loss, stats = _softmax_kl.softmax_kl_forward(out_s, out_t, T, scale, acc)
        ctx.save_for_backward(out_s, out_t, stats)
        ctx.T, ctx.scale = T, scale
        return loss.to(dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        if ctx.fused:
            return saved_gradients(ctx, grad_output)
        out_s, out_t, stats = ctx.saved_tensors
        return (*_softmax_kl.softmax_kl_backward(out_s, out_t, ctx.T, ctx.scale, stats, grad_output,
                                                 *ctx.needs_input_grad[:2]), None, None, None)


def soft_target(out_s, out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2."""
    return _ops.apply("SoftmaxKLFunction", out_s, out_t, T, T * T, torch.is_grad_enabled())


def dml(out1, out2):
    """KLbm(softmax(out2) || softmax(out1))."""
    return _ops.apply("SoftmaxKLFunction", out1, out2, 1.0, 1.0, torch.is_grad_enabled())


def bss(attacked_out_s, attacked_out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor."""
    return _ops.apply("SoftmaxKLFunction", attacked_out_s, attacked_out_t, T, 1.0, torch.is_grad_enabled())


# --- contrast: CRD (fastkd.kernels.contrast) -------------------------------------------------


class CRDContrastFunction(torch.autograd.Function):
    """contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z); memory is a constant.

    The gradient direction d loss / d embed (B, feat_dim) is computed in forward, by the
    same kernel pass that computes the loss, and backward only scales it by grad_output
    (fastkd.common.direction_backward, as the CPU path's).
    Recomputing it in backward would need the memory rows as they were in forward, but
    CRD updates its memory in place right after the loss (before backward); saving the
    gathered rows instead would be the (B, nce_n + 1, feat_dim) tensor this avoids.
    """

    @staticmethod
    def forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps):
        return _crd_contrast_forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps, 0, memory.shape[0])

    backward = staticmethod(direction_backward)


def _crd_contrast_forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps, lo, hi):
    acc = accumulation_dtype(embed, memory)
    noise = (sample_idx.shape[1] - 1) / n_data
    # Filled on the device (a copy from host memory would wait for the stream).
    params = torch.empty(5, dtype=acc, device=embed.device)
    for i, value in enumerate((nce_t, z, noise, eps, 1.0 / embed.shape[0])):
        params[i] = value
    loss, direction = _contrast.crd_contrast_forward(embed, memory, sample_idx, params,
                                                     grad=ctx.needs_input_grad[0], lo=lo, hi=hi)
    ctx.save_for_backward(direction, embed.new_empty(0))  # the empty one carries embed's dtype
    return loss.to(embed.dtype)


class CRDContrastShardFunction(torch.autograd.Function):
    """CRDContrastFunction's terms of the entries whose sample index is in [lo, hi) alone,
    memory (hi - lo, feat_dim) holding bank rows lo..hi-1; still -(1/B) times their sum,
    B = embed's row count. fastkd.global_crd's sharded banks (eager only: not registered
    with fastkd.ops, as that path is not compiled)."""

    @staticmethod
    def forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps, lo, hi):
        return _crd_contrast_forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps, lo, hi)

    @staticmethod
    def backward(ctx, grad_output):
        return direction_backward(ctx, grad_output) + (None, None)


def crd_contrast(embed, memory, sample_idx, nce_t, z, n_data, eps=1e-7):
    """One side of CRD: contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z)."""
    return _ops.apply("CRDContrastFunction", embed, memory, sample_idx, nce_t, z, n_data, eps)


def crd_contrast_shard(embed, memory, sample_idx, nce_t, z, n_data, eps, lo, hi):
    """crd_contrast's terms of the entries with lo <= sample_idx < hi, memory the bank rows
    [lo, hi) (hi - lo rows; sample_idx indexes the whole bank of n_data rows)."""
    if memory.shape[0] != hi - lo:
        raise ValueError(f"memory has {memory.shape[0]} rows, the bank rows [{lo}, {hi}) are {hi - lo}")
    with _ops.on_device_of((embed, memory)):
        return CRDContrastShardFunction.apply(embed, memory, sample_idx, nce_t, z, n_data, eps, lo, hi)


# --- LLM-scale logits: FusedLinearSoftTarget (fastkd.kernels.fused_linear) ------------------


class FusedLinearSoftTargetFunction(_chunked_linear.ChunkedLinearSoftTarget):
    """The chunk loop of fastkd.chunked_linear (forward and backward there), called with
    the Triton rows kernel of fastkd.kernels.fused_linear: a plain autograd Function, called
    eagerly (compiled, the auto backend calls fastkd.device_ops' operator, whose cuda
    kernel runs the same loop over the same kernel)."""


def fused_linear_soft_target(*args):
    """FusedLinearSoftTarget with the reference's arguments (checked by fastkd.functional)."""
    with _ops.on_device_of(args):
        return _chunked_linear.run(FusedLinearSoftTargetFunction, _fused_linear.linear_kl_rows, *args)


def divergence_rows(spec):
    """The Triton rows of FusedLinearDistillation's divergence spec (a chunked_linear.Divergence)."""
    return _chunked_linear.DivergenceRows(spec, _fused_linear.linear_divergence_rows, _fused_linear.linear_kl_rows)


def fused_linear_distillation(spec, *args):
    """FusedLinearDistillation for spec with FusedLinearSoftTarget's reference arguments
    (checked by fastkd.functional): its chunk loop over the Triton rows kernels."""
    with _ops.on_device_of(args):
        return _chunked_linear.run(FusedLinearSoftTargetFunction, divergence_rows(spec), *args)


# Each Function above as a torch.library custom operator for torch.compile (fastkd.ops).
for _function in (ATFunction, NSTFunction, NSTSpatialFunction, FSPFunction, MSEFunction, ABFunction,
                  OFDFunction, VIDFunction, AFDFunction, NormalizedRowsFunction, RKDFunction, SPFunction,
                  PKTFunction, CCFunction, IRGEdgeFunction, IRGTransformationFunction, SoftmaxKLFunction):
    _ops.register(_function)
# CRD's memory bank changes between forward and backward: its operator keeps what forward saved.
_ops.register(CRDContrastFunction, saved=lambda embed, memory, *_: [
    (embed.shape, accumulation_dtype(embed, memory)), ((0,), embed.dtype)])
