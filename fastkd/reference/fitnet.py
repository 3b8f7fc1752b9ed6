"""Hint: FitNets hints (Romero et al., ICLR 2015)."""
import torch.nn as nn
import torch.nn.functional as F


def hint(fm_s, fm_t):
    """mse(fm_s, fm_t); same shapes."""
    return F.mse_loss(fm_s, fm_t)


class Hint(nn.Module):
    def forward(self, fm_s, fm_t):
        return hint(fm_s, fm_t)
