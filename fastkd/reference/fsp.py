"""FSP: flow of solution procedure (Yim et al., CVPR 2017)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def fsp_matrix(fm1, fm2):
    """G = a @ b^T / HW (B, C_1, C_2); fm1 pooled to fm2's (H, W) when larger."""
    if fm1.size(2) > fm2.size(2):
        fm1 = F.adaptive_avg_pool2d(fm1, (fm2.size(2), fm2.size(3)))
    a = fm1.reshape(fm1.size(0), fm1.size(1), -1)
    b = fm2.reshape(fm2.size(0), fm2.size(1), -1)
    return torch.bmm(a, b.transpose(1, 2)) / a.size(2)


def fsp(fm_s1, fm_s2, fm_t1, fm_t2):
    """mse(G(fm_s1, fm_s2), G(fm_t1, fm_t2))."""
    return F.mse_loss(fsp_matrix(fm_s1, fm_s2), fsp_matrix(fm_t1, fm_t2))


class FSP(nn.Module):
    def forward(self, fm_s1, fm_s2, fm_t1, fm_t2):
        return fsp(fm_s1, fm_s2, fm_t1, fm_t2)

    def fsp_matrix(self, fm1, fm2):
        return fsp_matrix(fm1, fm2)
