"""RKD: relational knowledge distillation (Park et al., CVPR 2019)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def pdist(feat, squared=False, eps=1e-12):
    """(N, N) distances from the Gram form, clamped at eps, diagonal 0."""
    square = feat.pow(2).sum(dim=1)
    dist = (square.unsqueeze(0) + square.unsqueeze(1) - 2 * feat @ feat.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    diagonal = torch.eye(len(feat), dtype=torch.bool, device=feat.device)
    return dist.masked_fill(diagonal, 0)


def rkd_distance(feat_s, feat_t):
    """smooth_l1(d_s, d_t), d = pdist(x) / mean(d[d > 0]); feat_* (N, D_*)."""
    d_t = pdist(feat_t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = pdist(feat_s)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def angles(feat):
    """A[i, j, k] = e_ij . e_ik, e_ij = normalize(x_j - x_i), as (N^3,). Builds (N, N, D)."""
    e = F.normalize(feat.unsqueeze(0) - feat.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


def rkd_angle(feat_s, feat_t):
    """smooth_l1(A_s, A_t) over the N^3 angle entries; feat_* (N, D_*)."""
    return F.smooth_l1_loss(angles(feat_s), angles(feat_t))


def rkd(feat_s, feat_t, w_dist, w_angle):
    """w_dist * rkd_distance + w_angle * rkd_angle."""
    return w_dist * rkd_distance(feat_s, feat_t) + w_angle * rkd_angle(feat_s, feat_t)


class RKD(nn.Module):
    def __init__(self, w_dist, w_angle):
        super().__init__()
        self.w_dist = w_dist
        self.w_angle = w_angle

    def forward(self, feat_s, feat_t):
        # The collection returns NaN for N < 2; the reference says why instead.
        if feat_s.shape[0] < 2:
            raise ValueError(f"feat_s needs a batch of at least 2 samples for a relational loss, "
                             f"got {feat_s.shape[0]}")
        return rkd(feat_s, feat_t, self.w_dist, self.w_angle)
