"""LwM: learning without memorizing, Grad-CAM attention (Dhar et al., CVPR 2019)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .sobolev import normalized_flat, target_gradient


def grad_cam(out, fm, target):
    """relu(sum_c mean_hw(g) * g), g = d out[target] / d fm (the collection weights g, not fm)."""
    g = target_gradient(out, target, fm)
    weights = F.adaptive_avg_pool2d(g, 1)
    return F.relu(torch.sum(weights * g, dim=1, keepdim=True))


def lwm(out_s, fm_s, out_t, fm_t, target):
    """l1(normalize(flat(cam_s)), normalize(flat(cam_t)).detach())."""
    cam_t = normalized_flat(grad_cam(out_t, fm_t, target))
    cam_s = normalized_flat(grad_cam(out_s, fm_s, target))
    return F.l1_loss(cam_s, cam_t.detach())


class LwM(nn.Module):
    def forward(self, out_s, fm_s, out_t, fm_t, target):
        return lwm(out_s, fm_s, out_t, fm_t, target)
