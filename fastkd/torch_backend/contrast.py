"""CRD's contrast loss with torch ops, gathering the sampled memory rows in chunks.

    x_bk = exp(memory[idx_bk] . e_b / nce_t) / z,  c = N / M + eps  (N = nce_n, M = n_data)
    loss = -(1/B) (sum_b log(x_b0 / (x_b0 + c)) + sum_{b, k >= 1} log((N / M) / (x_bk + c)))
    d loss / d e_b = sum_k w_bk memory[idx_bk] / nce_t,
        w_b0 = -(1/B) c / (x_b0 + c),  w_bk = (1/B) x_bk / (x_bk + c) for k >= 1

The reference gathers all (B, N + 1, feat_dim) rows at once (about 0.5 GB at B = 64,
N = 16384, feat_dim = 128) and autograd keeps them until backward. Here a chunk of
sampled rows is gathered, dotted and folded into the loss and the gradient direction,
then dropped.
"""
import torch

from ..common import accumulation_dtype, direction_backward

# Gathered elements per chunk (rows x feat_dim).
CHUNK_ELEMENTS = 1 << 18


class CRDContrast(torch.autograd.Function):
    """contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z); memory is a constant.

    The gradient direction is computed in forward and only scaled in backward: CRD
    updates its memory in place between forward and backward, so the rows could not be
    gathered again then.
    """

    @staticmethod
    def forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps):
        acc = accumulation_dtype(embed, memory)
        B, D = embed.shape
        K1 = sample_idx.shape[1]
        noise = (K1 - 1) / n_data
        c = noise + eps
        grad = ctx.needs_input_grad[0]
        e = embed.to(acc).unsqueeze(2)
        loss = embed.new_zeros((), dtype=acc)
        direction = embed.new_zeros((B, D), dtype=acc) if grad else None
        step = max(1, CHUNK_ELEMENTS // (B * D))
        for k0 in range(0, K1, step):
            idx = sample_idx[:, k0:k0 + step]
            rows = memory.index_select(0, idx.reshape(-1)).view(B, idx.shape[1], D).to(acc)
            x = torch.bmm(rows, e).squeeze(2).div_(nce_t).exp_().div_(z)
            denom = x + c
            terms = torch.log(noise / denom)
            if k0 == 0:
                terms[:, 0] = torch.log(x[:, 0] / denom[:, 0])
            loss -= terms.sum()
            if grad:
                w = x.div_(denom)
                if k0 == 0:
                    w[:, 0] = -c / denom[:, 0]
                direction.unsqueeze(1).baddbmm_(w.unsqueeze(1), rows, alpha=1 / (B * nce_t))
        # An empty tensor carries embed's dtype (what backward reads is all saved tensors).
        ctx.save_for_backward(direction, embed.new_empty(0))
        return (loss / B).to(embed.dtype)

    backward = staticmethod(direction_backward)


def crd_contrast(embed, memory, sample_idx, nce_t, z, n_data, eps=1e-7):
    """One side of CRD: contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z)."""
    return CRDContrast.apply(embed, memory, sample_idx, nce_t, z, n_data, eps)
