"""Sobolev: Jacobian matching (Czarnecki et al., 2017; Srinivas & Fleuret, 2018)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def target_gradient(out, target, wrt):
    """d(sum_i out[i, target_i]) / d wrt, kept in the graph (create_graph=True)."""
    picked = torch.gather(out, 1, target.view(-1, 1))
    return torch.autograd.grad(picked, wrt, grad_outputs=torch.ones_like(picked),
                               create_graph=True, retain_graph=True)[0]


def normalized_flat(x):
    return F.normalize(x.reshape(x.size(0), -1), p=2, dim=1)


def sobolev(out_s, out_t, img, target):
    """mse(normalize(flat(g_s)), normalize(flat(g_t)).detach()), g_x = d out_x[target] / d img."""
    g_s = normalized_flat(target_gradient(out_s, target, img))
    g_t = normalized_flat(target_gradient(out_t, target, img))
    return F.mse_loss(g_s, g_t.detach())


class Sobolev(nn.Module):
    def forward(self, out_s, out_t, img, target):
        return sobolev(out_s, out_t, img, target)
