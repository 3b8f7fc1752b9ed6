"""CRD's contrast loss with the memory rows gathered inside the kernel.

    x_bk = exp(memory[idx_bk] . e_b / nce_t) / z,  c = N / M + eps  (N = nce_n, M = n_data)
    loss = -(1/B) (sum_b log(x_b0 / (x_b0 + c)) + sum_{b, k >= 1} log((N / M) / (x_bk + c)))
    d loss / d e_b = sum_k w_bk memory[idx_bk] / nce_t,
        w_b0 = -(1/B) c / (x_b0 + c),  w_bk = (1/B) x_bk / (x_bk + c) for k >= 1

A bank row range [lo, hi) (runtime ints) restricts the sums to the entries whose sample
index is in it: memory is then rows lo..hi-1 of the bank (hi - lo rows, read at
idx - lo), and every other entry adds nothing to the loss or to the direction. The whole
bank is lo = 0, hi = its row count; a sharded bank (fastkd.global_crd) passes its shard.

Program (b, split) reads embedding row b once and streams over its share of the
N + 1 sampled memory rows in blocks of BLOCK_K, so the (B, N + 1, feat_dim) gather
the reference builds never exists. Each program writes its partial loss and partial
gradient direction; the host sums the splits (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2, num_warps

# Elements per (memory rows x feat_dim) tile, the widest feat_dim chunk (wider feat_dims
# are looped over: a whole 16384-wide row spilled), and about how many programs to launch.
TILE = 4096
MAX_BLOCK_D = 256
TARGET_PROGRAMS = 1024


@triton.jit(do_not_specialize=["lo", "hi"])
def _crd_contrast_forward_kernel(
    embed_ptr, memory_ptr, idx_ptr, params_ptr, loss_ptr, direction_ptr,
    K1, D, k_per_split, lo, hi,
    e_sb, e_sd, m_sn, m_sd, i_sb, i_sk,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GRAD: tl.constexpr,
):
    """loss (B, splits): sum of this split's log terms; direction (B, splits, D): sum_k w_bk m_k / nce_t.

    params (5,) in the accumulation dtype: nce_t, z, N / M, eps, 1 / B. Only the entries
    with lo <= idx < hi count; memory row idx - lo is theirs.
    feat_dim is read in chunks of BLOCK_D, so any feat_dim fits in registers; the gradient
    direction is accumulated in this program's own row of direction (each chunk of the
    memory rows is read a second time for it, from cache).
    """
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    acc_t = loss_ptr.dtype.element_ty
    nce_t = tl.load(params_ptr)
    z = tl.load(params_ptr + 1)
    noise = tl.load(params_ptr + 2)
    c = noise + tl.load(params_ptr + 3)
    inv_b = tl.load(params_ptr + 4)

    out = b * splits + split
    loss = tl.zeros((BLOCK_K,), acc_t)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K1)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        rows = tl.load(idx_ptr + b * i_sb + ks * i_sk, mask=k_ok, other=0).to(tl.int64)
        k_ok = k_ok & (rows >= lo) & (rows < hi)  # outside the bank rows held: nothing
        rows = rows - lo
        dot = tl.zeros((BLOCK_K,), acc_t)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            e = tl.load(embed_ptr + b * e_sb + dims * e_sd, mask=d_ok, other=0.0).to(acc_t)
            m = tl.load(memory_ptr + rows[:, None] * m_sn + dims[None, :] * m_sd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(acc_t)
            dot += tl.sum(m * e[None, :], axis=1)
        x = tl.exp(dot / nce_t) / z
        positive = ks == 0
        term = tl.where(positive, tl.log(x / (x + c)), tl.log(noise / (x + c)))
        loss += tl.where(k_ok, term, 0.0)
        if GRAD:
            w = tl.where(k_ok, tl.where(positive, -c, x) / (x + c) * (inv_b / nce_t), 0.0)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                d_ok = dims < D
                m = tl.load(memory_ptr + rows[:, None] * m_sn + dims[None, :] * m_sd,
                            mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(acc_t)
                # The first block overwrites the row; later ones add to it (no zero-fill launch).
                prev = tl.load(direction_ptr + out * D + dims, mask=d_ok, other=0.0)
                prev = tl.where(k0 > k_start, prev, 0.0)
                tl.store(direction_ptr + out * D + dims, prev + tl.sum(w[:, None] * m, axis=0), mask=d_ok)
    tl.store(loss_ptr + out, tl.sum(loss, axis=0))


def crd_contrast_forward(embed, memory, sample_idx, params, grad, lo=0, hi=None):
    """(loss, direction): the contrast loss (0-dim, params' dtype) and, when grad, d loss / d embed
    (B, feat_dim) in params' dtype (else None). params as the kernel's. memory holds bank rows
    [lo, hi) (hi: lo + its row count by default); entries of sample_idx outside them add nothing.
    The loss is still divided by B, embed's row count."""
    B, D = embed.shape
    if hi is None:
        hi = lo + memory.shape[0]
    K1 = sample_idx.shape[1]
    block_d = min(next_power_of_2(D), MAX_BLOCK_D, TILE)
    block_k = max(1, min(TILE // block_d, next_power_of_2(K1)))
    blocks = cdiv(K1, block_k)
    splits = max(1, min(blocks, TARGET_PROGRAMS // B))
    k_per_split = cdiv(blocks, splits) * block_k
    splits = cdiv(K1, k_per_split)
    loss = torch.empty((B, splits), device=embed.device, dtype=params.dtype)
    direction = torch.empty((B, splits, D), device=embed.device, dtype=params.dtype) if grad else None
    _crd_contrast_forward_kernel[(B, splits)](
        embed, memory, sample_idx, params, loss, direction, K1, D, k_per_split, lo, hi,
        *embed.stride(), *memory.stride(), *sample_idx.stride(),
        BLOCK_K=block_k, BLOCK_D=block_d, GRAD=grad, num_warps=num_warps(block_k * block_d))
    return -loss.sum() / B, (direction.sum(dim=1) if grad else None)
