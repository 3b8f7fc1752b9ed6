"""SoftTarget: soft targets with temperature (Hinton et al., 2015)."""
import torch.nn as nn
import torch.nn.functional as F


def kl_batchmean(out_s, out_t):
    """KL(softmax(out_t) || softmax(out_s)) summed, divided by the batch size."""
    return F.kl_div(F.log_softmax(out_s, dim=1), F.softmax(out_t, dim=1), reduction="batchmean")


def soft_target(out_s, out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2; out_* (B, K, ...)."""
    return kl_batchmean(out_s / T, out_t / T) * T * T


class SoftTarget(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, out_s, out_t):
        return soft_target(out_s, out_t, self.T)
