"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_map(fm, p, eps=1e-6):
    """A = sum_c |f|^p (B, 1, H, W), divided by (||A||_2 over (H, W) + eps)."""
    am = torch.sum(torch.abs(fm).pow(p), dim=1, keepdim=True)
    norm = torch.norm(am, dim=(2, 3), keepdim=True)
    return am / (norm + eps)


def normalized_map(fm, p):
    """F.normalize(mean_c |f|^p as (B, H W)): divided by max(||.||_2, 1e-12) (RepDistiller's
    Attention.at for even p)."""
    return F.normalize(torch.mean(torch.abs(fm).pow(p), dim=1).flatten(1))


def at(fm_s, fm_t, p, normalize=False):
    """mse(am(fm_s), am(fm_t)); fm_* (B, C_*, H, W). normalize: am = normalized_map."""
    if normalize:
        return F.mse_loss(normalized_map(fm_s, p), normalized_map(fm_t, p))
    return F.mse_loss(attention_map(fm_s, p), attention_map(fm_t, p))


class AT(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, fm_s, fm_t):
        return at(fm_s, fm_t, self.p)

    def attention_map(self, fm, eps=1e-6):
        return attention_map(fm, self.p, eps)
