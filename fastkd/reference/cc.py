"""CC: correlation congruence with a P-order Taylor Gaussian RBF (Peng et al., ICCV 2019)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def correlation(feat, gamma, P_order):
    """K = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * S^p, S = x^ x^T, x^ = normalize(x)."""
    x = F.normalize(feat, p=2, dim=-1)
    sim = x @ x.t()
    corr = torch.zeros_like(sim)
    for p in range(P_order + 1):
        corr = corr + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * torch.pow(sim, p)
    return corr


def cc(feat_s, feat_t, gamma, P_order):
    """mse(K_s, K_t); feat_* (N, D_*)."""
    return F.mse_loss(correlation(feat_s, gamma, P_order), correlation(feat_t, gamma, P_order))


class CC(nn.Module):
    def __init__(self, gamma, P_order):
        super().__init__()
        self.gamma = gamma
        self.P_order = P_order

    def forward(self, feat_s, feat_t):
        return cc(feat_s, feat_t, self.gamma, self.P_order)
