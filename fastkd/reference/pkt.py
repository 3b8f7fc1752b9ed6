"""PKTCosSim: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)."""
import torch
import torch.nn as nn


def cond_prob(feat, eps=1e-6):
    """P = C' / rowsum(C'), C' = (x^ x^T + 1) / 2, x^ = x / (||x_row|| + eps), NaN -> 0."""
    x = feat / (torch.sqrt(torch.sum(feat ** 2, dim=1, keepdim=True)) + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    cos = (x @ x.t() + 1.0) / 2.0
    return cos / cos.sum(dim=1, keepdim=True)


def pkt_cos_sim(feat_s, feat_t, eps=1e-6):
    """mean P_t * log((P_t + eps) / (P_s + eps)); feat_* (N, D_*)."""
    p_s = cond_prob(feat_s, eps)
    p_t = cond_prob(feat_t, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


class PKTCosSim(nn.Module):
    def forward(self, feat_s, feat_t, eps=1e-6):
        return pkt_cos_sim(feat_s, feat_t, eps)
