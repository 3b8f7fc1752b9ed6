"""VID: variational information distillation (Ahn et al., CVPR 2019)."""
import numpy as np
import torch
import torch.nn as nn


def vid(pred_mean, fm_t, alpha, eps=1e-6):
    """mean(0.5 * (log var + (mu - t)^2 / var)), var = softplus(alpha) + eps per channel.

    pred_mean, fm_t (B, C, H, W); alpha (C,).
    """
    pred_var = (torch.log(1.0 + torch.exp(alpha)) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * (torch.log(pred_var) + (pred_mean - fm_t) ** 2 / pred_var))


def _conv1x1(in_channels, out_channels):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False)


class VID(nn.Module):
    def __init__(self, in_channels, mid_channels, out_channels, init_var, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.regressor = nn.Sequential(
            _conv1x1(in_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, out_channels))
        # Inverse softplus, so that softplus(alpha) + eps starts at init_var.
        self.alpha = nn.Parameter(np.log(np.exp(init_var - eps) - 1.0) * torch.ones(out_channels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, fm_s, fm_t):
        return vid(self.regressor(fm_s), fm_t, self.alpha, self.eps)
