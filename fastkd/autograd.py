"""torch.autograd.Function wrappers of the Triton kernels in fastkd.kernels.

One Function per fused op: forward launches the kernels and saves inputs and
small statistics; backward launches the hand-derived gradient kernels. The
dispatcher (fastkd.backend) lists each op's Function as its ``triton`` entry;
an op with no entry there has no kernel yet.
"""


# --- pairwise: RKD, SP, PKT, CC, IRG (kernels in fastkd.kernels.pairwise) --------------------
import torch  # noqa: E402

from .kernels import pairwise as _pw  # noqa: E402


def _pairwise_grads(ctx, sides, scale):
    """dL/dX per side that needs it: sides = ((M, r, X prepared, input), ...)."""
    return tuple(_pw.gram_grad(m, r, x, scale, like) if needed else None
                 for (m, r, x, like), needed in zip(sides, ctx.needs_input_grad))


class RKDDistanceFunction(torch.autograd.Function):
    """smooth_l1(d_s / mean, d_t / mean) over N^2 entries, d from the centred Gram matrices."""

    @staticmethod
    def forward(ctx, feat_s, feat_t):
        x_s, x_t = _pw.prepare(feat_s, centre=True), _pw.prepare(feat_t, centre=True)
        (g_s, same_s), (g_t, same_t) = _pw.gram(x_s, same=True), _pw.gram(x_t, same=True)
        total, stats = _pw.rkd_distance_forward(g_s, same_s, g_t, same_t)
        ctx.save_for_backward(feat_s, feat_t, x_s, x_t, g_s, same_s, g_t, same_t, stats)
        return (total / len(g_s) ** 2).to(feat_s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        feat_s, feat_t, x_s, x_t, g_s, same_s, g_t, same_t, stats = ctx.saved_tensors
        m_s, r_s, m_t, r_t = _pw.rkd_distance_backward(g_s, same_s, g_t, same_t, stats)
        scale = grad_out.to(g_s.dtype) / len(g_s) ** 2
        return _pairwise_grads(ctx, ((m_s, r_s, x_s, feat_s), (m_t, r_t, x_t, feat_t)), scale)


class RKDAngleFunction(torch.autograd.Function):
    """smooth_l1(A_s, A_t) over the N^3 angles, read from the centred Gram matrices."""

    @staticmethod
    def forward(ctx, feat_s, feat_t):
        x_s, x_t = _pw.prepare(feat_s, centre=True), _pw.prepare(feat_t, centre=True)
        (g_s, same_s), (g_t, same_t) = _pw.gram(x_s, same=True), _pw.gram(x_t, same=True)
        total, stats = _pw.rkd_angle_forward(g_s, same_s, g_t, same_t,
                                             with_stats=any(ctx.needs_input_grad))
        ctx.save_for_backward(feat_s, feat_t, x_s, x_t, g_s, same_s, g_t, same_t, stats)
        return (total / len(g_s) ** 3).to(feat_s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        feat_s, feat_t, x_s, x_t, g_s, same_s, g_t, same_t, stats = ctx.saved_tensors
        m_s, r_s, m_t, r_t = _pw.rkd_angle_backward(g_s, same_s, g_t, same_t, stats)
        # Every term is a difference x_b - x_i, so M Xc + r Xc is dL/dX itself: no
        # un-centring, whose column means would spread huge duplicate-row terms over all rows.
        scale = grad_out.to(g_s.dtype) / len(g_s) ** 3
        return _pairwise_grads(ctx, ((m_s, r_s, x_s, feat_s), (m_t, r_t, x_t, feat_t)), scale)


def rkd_distance(feat_s, feat_t):
    return RKDDistanceFunction.apply(feat_s, feat_t)


def rkd_angle(feat_s, feat_t):
    return RKDAngleFunction.apply(feat_s, feat_t)
