"""AB: activation boundaries (Heo et al., AAAI 2019)."""
import torch.nn as nn


def ab(fm_s, fm_t, margin):
    """mean((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]); pre-activation maps."""
    loss = ((fm_s + margin).pow(2) * ((fm_s > -margin) & (fm_t <= 0)).to(fm_s.dtype)
            + (fm_s - margin).pow(2) * ((fm_s <= margin) & (fm_t > 0)).to(fm_s.dtype))
    return loss.mean()


class AB(nn.Module):
    def __init__(self, margin):
        super().__init__()
        self.margin = margin

    def forward(self, fm_s, fm_t):
        return ab(fm_s, fm_t, self.margin)
