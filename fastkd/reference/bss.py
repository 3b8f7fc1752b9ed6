"""BSS: boundary supporting samples (Heo et al., AAAI 2019)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .st import kl_batchmean


def bss(attacked_out_s, attacked_out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor."""
    return kl_batchmean(attacked_out_s / T, attacked_out_t / T)


class BSS(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, attacked_out_s, attacked_out_t):
        return bss(attacked_out_s, attacked_out_t, self.T)


def _logits_of(output):
    # The collection's networks return (features..., logits); plain models return logits.
    return output[-1] if isinstance(output, (tuple, list)) else output


class BSSAttacker:
    """Moves samples towards the decision boundary between target and attack_class.

    Each step, for p = softmax(model(x)) and g = d sum(p[attack] - p[target]) / dx:
    x <- clamp(x + alpha * (p[target] - p[attack] + eps) * g / ||g||_2, -2.5, 2.5),
    alpha = step_alpha where the model still predicts target, else 0.
    """

    def __init__(self, step_alpha, num_steps, eps=1e-4):
        self.step_alpha = step_alpha
        self.num_steps = num_steps
        self.eps = eps

    def attack(self, model, img, target, attack_class):
        """img (B, ...), target and attack_class (B,) -> attacked img (B, ...), detached."""
        x = img.detach()
        view = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.num_steps):
            x = x.requires_grad_(True)
            out = _logits_of(model(x))
            p = F.softmax(out, dim=1)
            p_target = p.gather(1, target.view(-1, 1)).squeeze(1)
            p_attack = p.gather(1, attack_class.view(-1, 1)).squeeze(1)
            g, = torch.autograd.grad((p_attack - p_target).sum(), x)
            alpha = self.step_alpha * (out.argmax(dim=1) == target).to(x.dtype)
            if alpha.sum() == 0:
                break
            g_norm = g.flatten(1).norm(dim=1)
            step = alpha * (p_target - p_attack + self.eps) / g_norm
            x = torch.clamp(x.detach() + step.detach().view(view) * g, -2.5, 2.5)
        return x.detach()
