"""IRG: instance relationship graph (Liu et al., CVPR 2019)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .rkd import pdist


def edge(x):
    """E = pdist2(flat(x)) / max(pdist2(flat(x))): squared distances, (N, N)."""
    d = pdist(x.reshape(x.size(0), -1), squared=True)
    return d / d.max()


def transformation(fm1, fm2, eps=1e-12):
    """T(a, b) = d / max(d), d_i = max(|a_i - b_i|^2, eps) (N,); fm1 precedes fm2 in the net.

    a is pooled to b's (H, W) when larger; b's channels are averaged in pairs when a has fewer.
    """
    if fm1.size(2) > fm2.size(2):
        fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
    if fm1.size(1) < fm2.size(1):
        fm2 = (fm2[:, 0::2] + fm2[:, 1::2]) / 2.0
    d = torch.sum((fm1.reshape(fm1.size(0), -1) - fm2.reshape(fm2.size(0), -1)).pow(2), dim=-1).clamp(min=eps)
    return d / d.max()


def irg_vertex(out_s, out_t):
    return F.mse_loss(out_s, out_t)


def irg_edge(irg_s, irg_t):
    """(mse(E(feat_s), E(feat_t)) + mse(E(fm1_s), E(fm1_t)) + mse(E(fm2_s), E(fm2_t))) / 3."""
    fm_s1, fm_s2, feat_s, _ = irg_s
    fm_t1, fm_t2, feat_t, _ = irg_t
    return (F.mse_loss(edge(feat_s), edge(feat_t))
            + F.mse_loss(edge(fm_s1), edge(fm_t1))
            + F.mse_loss(edge(fm_s2), edge(fm_t2))) / 3.0


def irg_transformation(irg_s, irg_t):
    """mse(T(fm1_s, fm2_s), T(fm1_t, fm2_t))."""
    return F.mse_loss(transformation(irg_s[0], irg_s[1]), transformation(irg_t[0], irg_t[1]))


def irg(irg_s, irg_t, w_irg_vert, w_irg_edge, w_irg_tran):
    """w_vert * vertex + w_edge * edge + w_tran * transformation; irg_* = (fm1, fm2, feat, out)."""
    return (w_irg_vert * irg_vertex(irg_s[3], irg_t[3])
            + w_irg_edge * irg_edge(irg_s, irg_t)
            + w_irg_tran * irg_transformation(irg_s, irg_t))


class IRG(nn.Module):
    def __init__(self, w_irg_vert, w_irg_edge, w_irg_tran):
        super().__init__()
        self.w_irg_vert = w_irg_vert
        self.w_irg_edge = w_irg_edge
        self.w_irg_tran = w_irg_tran

    def forward(self, irg_s, irg_t):
        return irg(irg_s, irg_t, self.w_irg_vert, self.w_irg_edge, self.w_irg_tran)
