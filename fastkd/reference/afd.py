"""AFD: attention feature distillation, SE-block attention (Wang et al., ICLR 2020)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def afd(fm_s, fm_t, rho, eps=1e-6):
    """mean_b sum_c rho[b, c] * mean_hw (s' - t')^2, f' = f / (||f||_2 over (H, W) + eps).

    fm_* (B, C, H, W); rho (B, C), rows summing to 1.
    """
    s = fm_s / (torch.norm(fm_s, dim=(2, 3), keepdim=True) + eps)
    t = fm_t / (torch.norm(fm_t, dim=(2, 3), keepdim=True) + eps)
    return (rho * torch.pow(s - t, 2).mean(dim=(2, 3))).sum(1).mean(0)


class AFD(nn.Module):
    def __init__(self, in_channels, att_f):
        super().__init__()
        mid_channels = int(in_channels * att_f)
        self.attention = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, 1, 0, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, in_channels, 1, 1, 0, bias=True))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)

    def channel_weights(self, fm_t):
        """rho = sigmoid(attention(avg_pool(fm_t))) normalised to sum 1 per sample, (B, C)."""
        return self.pooled_channel_weights(F.adaptive_avg_pool2d(fm_t, 1))

    def pooled_channel_weights(self, pooled):
        """channel_weights from the teacher's mean over (H, W), pooled (B, C, 1, 1)."""
        # flatten(1), not the collection's squeeze(): batch size 1 keeps its batch dim.
        rho = torch.sigmoid(self.attention(pooled).flatten(1))
        return rho / torch.sum(rho, dim=1, keepdim=True)

    def forward(self, fm_s, fm_t, eps=1e-6):
        return afd(fm_s, fm_t, self.channel_weights(fm_t), eps)
