"""OFD: overhaul of feature distillation (Heo et al., ICCV 2019)."""
import torch
import torch.nn as nn


def margin(fm_t, eps=1e-6):
    """m_c = sum t [t < 0] / (count(t < 0) + eps) over (B, H, W), shape (1, C, 1, 1)."""
    mask = (fm_t < 0.0).to(fm_t.dtype)
    return (fm_t * mask).sum(dim=(0, 2, 3), keepdim=True) / (mask.sum(dim=(0, 2, 3), keepdim=True) + eps)


def ofd(fm_s, fm_t):
    """mean((s - t')^2 * (1 - [s <= t' and t' <= 0])), t' = max(t, margin(t)).

    fm_s is the connector's output; both (B, C, H, W).
    """
    fm_t = torch.max(fm_t, margin(fm_t))
    mask = 1.0 - ((fm_s <= fm_t) & (fm_t <= 0.0)).to(fm_s.dtype)
    return torch.mean((fm_s - fm_t) ** 2 * mask)


class OFD(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.connector = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, fm_s, fm_t):
        return ofd(self.connector(fm_s), fm_t)

    def get_margin(self, fm, eps=1e-6):
        return margin(fm, eps)
