"""CRD: contrastive representation distillation (Tian et al., ICLR 2020)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def contrast_scores(embed, memory, sample_idx, nce_t):
    """exp(memory[sample_idx[b, k]] . embed[b] / nce_t), (B, K); memory rows are constants.

    Builds the gathered (B, K, feat_dim) tensor.
    """
    weight = memory.detach()[sample_idx]
    return torch.exp(torch.bmm(weight, embed.unsqueeze(2)).squeeze(2) / nce_t)


def contrast_loss(x, n_data, eps=1e-7):
    """-(sum_b log(x0 / (x0 + N/M + eps)) + sum_{b,k>=1} log((N/M) / (x_k + N/M + eps))) / B.

    x (B, N + 1): column 0 the positive pair, the rest the N negatives; M = n_data.
    """
    n = x.size(1) - 1
    noise = n / float(n_data)
    log_pos = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_neg = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / x.size(0)


def normalizer(scores, n_data):
    """Z = mean(scores) * n_data, as a plain number (fixed from the first batch)."""
    return (scores.mean() * n_data).item()


def crd_contrast(embed, memory, sample_idx, nce_t, z, n_data, eps=1e-7):
    """contrast_loss(contrast_scores(embed, memory, sample_idx, nce_t) / z): one side of CRD.

    embed (B, feat_dim), memory (n_data, feat_dim), sample_idx (B, nce_n + 1).
    """
    return contrast_loss(contrast_scores(embed, memory, sample_idx, nce_t) / z, n_data, eps)


class Embed(nn.Module):
    """Linear projection of flat(x) to feat_dim, then L2-normalised rows."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return F.normalize(self.linear(x.reshape(x.size(0), -1)), p=2, dim=1)


class ContrastLoss(nn.Module):
    def __init__(self, n_data, eps=1e-7):
        super().__init__()
        self.n_data = n_data
        self.eps = eps

    def forward(self, x):
        return contrast_loss(x, self.n_data, self.eps)


class ContrastMemory(nn.Module):
    """Two memory banks of past embeddings, their normalisation constants Z, and the
    momentum update."""

    def __init__(self, feat_dim, n_data, nce_n, nce_t, nce_mom):
        super().__init__()
        self.N = nce_n
        self.T = nce_t
        self.momentum = nce_mom
        self.Z_t = None
        self.Z_s = None
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))

    def forward(self, feat_s, feat_t, idx, sample_idx):
        n_data = self.memory_s.size(0)
        out_t = contrast_scores(feat_t, self.memory_s, sample_idx, self.T)
        out_s = contrast_scores(feat_s, self.memory_t, sample_idx, self.T)
        if self.Z_t is None:
            self.Z_t = normalizer(out_t, n_data)
        if self.Z_s is None:
            self.Z_s = normalizer(out_s, n_data)
        self.update(feat_s, feat_t, idx)
        return out_s / self.Z_s, out_t / self.Z_t

    @torch.no_grad()
    def update(self, feat_s, feat_t, idx):
        """memory[idx] = normalize(mom * memory[idx] + (1 - mom) * embed)."""
        for memory, feat in ((self.memory_t, feat_t), (self.memory_s, feat_s)):
            rows = memory[idx] * self.momentum + feat.detach() * (1 - self.momentum)
            memory.index_copy_(0, idx, F.normalize(rows, p=2, dim=1))


class CRD(nn.Module):
    def __init__(self, s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_n, nce_t, nce_mom)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def forward(self, feat_s, feat_t, idx, sample_idx):
        """feat_* (B, ...); idx (B,) dataset indices; sample_idx (B, nce_n + 1), positive first."""
        out_s, out_t = self.contrast(self.embed_s(feat_s), self.embed_t(feat_t), idx, sample_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)
