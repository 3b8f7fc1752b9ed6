"""NST: neuron selectivity transfer, polynomial kernel d=2, c=0 (Huang & Wang, 2017)."""
import torch.nn as nn
import torch.nn.functional as F


def poly_kernel(x, y):
    """K[b, j, i] = (y[b, j] . x[b, i])^2, built by broadcasting to (B, C_y, C_x, HW)."""
    return (x.unsqueeze(1) * y.unsqueeze(2)).sum(-1).pow(2)


def nst(fm_s, fm_t):
    """mean K(F_t, F_t) + mean K(F_s, F_s) - 2 mean K(F_s, F_t),
    F = normalize(f as (B, C, HW), dim=2); fm_* (B, C_*, H, W)."""
    f_s = F.normalize(fm_s.reshape(fm_s.size(0), fm_s.size(1), -1), dim=2)
    f_t = F.normalize(fm_t.reshape(fm_t.size(0), fm_t.size(1), -1), dim=2)
    return poly_kernel(f_t, f_t).mean() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


class NST(nn.Module):
    def forward(self, fm_s, fm_t):
        return nst(fm_s, fm_t)
