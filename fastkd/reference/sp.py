"""SP: similarity preserving (Tung & Mori, ICCV 2019)."""
import torch.nn as nn
import torch.nn.functional as F


def similarity(fm):
    """G^ = normalize(flat(f) flat(f)^T, dim=1), (N, N)."""
    f = fm.reshape(fm.size(0), -1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp(fm_s, fm_t):
    """mse(G^_s, G^_t); fm_* (N, ...)."""
    return F.mse_loss(similarity(fm_s), similarity(fm_t))


class SP(nn.Module):
    def forward(self, fm_s, fm_t):
        return sp(fm_s, fm_t)
