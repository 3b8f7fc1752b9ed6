"""CRD over W processes as one loss on their global batch: fastkd.CRD(..., global_batch=True).

The global batch is the concatenation, in rank order, of every rank's feat_s, feat_t, idx
and sample_idx; B = sum_r b_r its size, N = nce_n, M = n_data. Per side, CRD's loss on it is

    L = -(1/B) sum_b [log(x_b0 / (x_b0 + c)) + sum_{k>=1} log((N/M) / (x_bk + c))],
    x_bk = exp(bank[sample_idx_bk] . e_b / nce_t) / Z,  c = N/M + eps,

and Z = mean_{b,k} exp(bank[sample_idx_bk] . e_b / nce_t) * M, fixed by the first call.
The bank is a constant of the loss, so each term (b, k) depends on one embedding e_b only:
the loss is a sum of parts over disjoint sets of entries, which fastkd.distributed's
all_reduce_sum adds up (rank r's gradient is then W dL/d(its rows), and DDP's mean over
ranks gives dL/dtheta). Z's mean is the sum over ranks of score sums over B (N + 1); it
takes no gradient.

Full banks (the default): every rank holds both banks whole and computes the terms of
its own b_r samples with fastkd.functional.crd_contrast, times b_r / B (that function
averages over its b_r rows). The momentum rows of every rank's samples are all-gathered
and written on every rank in global order: the banks stay identical on all ranks.

Sharded banks (bank_sharding=True): rank r holds rows [r C, min((r + 1) C, M)) of each
bank, C = ceil(M / W). The entries go to the rows, not the rows to the entries: the
embeddings (B x feat_dim, all_gather_rows, differentiable) and the indices (B x (N + 2))
are all-gathered, and each rank computes the terms of the global batch's entries whose
bank row it holds (about a W-th of all entries), and the momentum update of the rows it
holds. The contrast over the shard is fastkd.kernels.contrast's kernel given the shard's
row range [start, stop) where fastkd.backend resolves crd_contrast to triton for the
banks' device, else _OwnedContrast's chunked torch gathers. A step moves
O(B (feat_dim + N)) numbers to each rank instead of the B (N + 1) feat_dim of fetched
bank rows, with collectives gloo has (no all_to_all).

No rank writes anything until all have agreed that the step is valid: input checks and
the finiteness of Z and of the rows to be written are all-gathered first, and a bad
input on any rank raises ValueError on every rank with every bank and Z unchanged.
Duplicate indices in idx across the global batch are written as index_copy_ writes them
in a single process on that device. The step's collectives are the same on every rank,
so a rank that raises leaves none of the others waiting.
"""
import math

import torch
import torch.distributed as dist

from . import backend, distributed
from . import functional as F
from .common import accumulation_dtype, first_order
from .reference.crd import contrast_scores

try:  # Triton has wheels for Linux only (fastkd.backend then never resolves to triton)
    from . import autograd as _triton
except ImportError:
    _triton = None

# Gathered elements per chunk (entries x feat_dim) of the sharded contrast.
CHUNK_ELEMENTS = 1 << 18


def shard_range(n_data, rank, world):
    """The bank rows [start, stop) that rank holds when the banks are sharded."""
    size = math.ceil(n_data / world)
    return min(rank * size, n_data), min((rank + 1) * size, n_data)


class _OwnedContrast(torch.autograd.Function):
    """-(1/B) sum over the given entries of CRD's contrast terms, with this rank's bank shard.

    embed (B, D) the global batch's embeddings; memory (n_local, D) the shard, a constant;
    rows, cols (n,) each entry's sample b and shard row; positive (n,) whether it is
    column 0 of sample_idx. The gradient direction is formed in forward, chunk by chunk,
    as fastkd.torch_backend.contrast's is (the bank is updated before backward).
    """

    @staticmethod
    def forward(ctx, embed, memory, rows, cols, positive, nce_t, z, noise, eps, batch):
        acc = accumulation_dtype(embed, memory)
        c = noise + eps
        loss = embed.new_zeros((), dtype=acc)
        direction = embed.new_zeros(embed.shape, dtype=acc) if ctx.needs_input_grad[0] else None
        step = max(1, CHUNK_ELEMENTS // embed.shape[1])
        for i in range(0, rows.numel(), step):
            b, p = rows[i:i + step], positive[i:i + step]
            bank = memory.index_select(0, cols[i:i + step]).to(acc)
            x = (bank * embed.index_select(0, b).to(acc)).sum(1).div_(nce_t).exp_().div_(z)
            denom = x + c
            loss -= torch.where(p, torch.log(x / denom), torch.log(noise / denom)).sum()
            if direction is not None:
                w = torch.where(p, -c / denom, x / denom)
                direction.index_add_(0, b, bank * (w / (batch * nce_t)).unsqueeze(1))
        ctx.save_for_backward(direction, embed.new_empty(0))
        return (loss / batch).to(embed.dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        direction, like = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = (direction * grad_output.to(direction.dtype)).to(like.dtype)
        return (grad,) + (None,) * 9


def _agree(crd, local_error, n, device, group):
    """Every rank's batch size once all ranks have checked their inputs; raises on every
    rank if any input is bad or the ranks disagree on whether Z is fixed."""
    mem = crd.contrast
    status = distributed.all_gather_ints(
        [local_error is not None, n, mem.Z_s is None, mem.Z_t is None], device, group)
    bad = [r for r, s in enumerate(status) if s[0]]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(f"CRD (global_batch=True): the input on rank(s) {bad} is invalid (the error "
                         f"is raised there); every rank's memory banks and Z were left unchanged")
    if len({tuple(s[2:]) for s in status}) > 1:
        raise RuntimeError("CRD (global_batch=True): Z_s, Z_t are fixed on some ranks and not on others; "
                           "load the same state_dict on every rank")
    return [s[1] for s in status]


def _agree_finite(crd, ok, feat_s, feat_t, e_s, e_t, idx, z_s, z_t, device, group, sharded):
    """Raise on every rank, before any write, unless every rank's ok is true."""
    flags = distributed.all_gather_ints([bool(ok)], device, group)
    bad = [r for r, (f,) in enumerate(flags) if not f]
    if not bad:
        return
    if not bool(ok):
        # This rank saw it: name the cause (a sharded rank holds other ranks' rows, so
        # its bank rows at idx are not to be looked at).
        crd._raise_non_finite(feat_s, feat_t, e_s, e_t, idx, z_s, z_t, banks=not sharded)
    raise ValueError(f"CRD (global_batch=True): a NaN or Inf on rank(s) {bad} (in the features, their "
                     f"embeddings or the memory update); every rank's memory banks and Z were left unchanged")


def _z_sums(parts, device, dtype, group):
    """sum over ranks of each of parts (0-d tensors), with one all_reduce."""
    sums = torch.stack([p.to(dtype) for p in parts]).to(device)
    dist.all_reduce(sums, group=group)
    return sums


def forward(crd, feat_s, feat_t, idx, sample_idx):
    """fastkd.CRD.forward with global_batch=True (see the module docstring)."""
    mem = crd.contrast
    n_data = crd.criterion_s.n_data
    group = crd.group
    rank, world = distributed.rank_and_size(group)
    device = mem.memory_s.device
    error = None
    try:
        idx, sample_idx = crd._checked(feat_s, feat_t, idx, sample_idx, n_data)
        # Inside too: the embedding heads can refuse an input the checks pass (a dtype
        # other than their weights'), and a rank must not fail alone after this point.
        e_s, e_t = crd.embed_s(feat_s), crd.embed_t(feat_t)
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    sizes = _agree(crd, error, feat_s.shape[0] if error is None else 0, device, group)
    batch = sum(sizes)
    if crd.bank_sharding:
        return _sharded(crd, feat_s, feat_t, e_s, e_t, idx, sample_idx, sizes, batch, rank, world, device)

    rows_s = crd._momentum_rows(mem.memory_s, e_s, idx, mem.momentum)
    rows_t = crd._momentum_rows(mem.memory_t, e_t, idx, mem.momentum)
    ok = torch.cat([rows_s, rows_t]).isfinite().all()
    z_s, z_t = mem.Z_s, mem.Z_t
    if z_s is None or z_t is None:  # the ranks agree on this (_agree)
        with torch.no_grad():
            scores_s = contrast_scores(e_s, mem.memory_t, sample_idx, mem.T)
            scores_t = contrast_scores(e_t, mem.memory_s, sample_idx, mem.T)
            acc = accumulation_dtype(scores_s)
            sums = _z_sums([scores_s.sum(dtype=acc), scores_t.sum(dtype=acc)], device, acc, group)
            z = sums / (batch * sample_idx.shape[1]) * n_data
        if z_s is None:
            z_s = z[0].to(scores_s.dtype)
            ok &= z_s.isfinite() & (z_s > 0)
        if z_t is None:
            z_t = z[1].to(scores_t.dtype)
            ok &= z_t.isfinite() & (z_t > 0)
    _agree_finite(crd, ok, feat_s, feat_t, e_s, e_t, idx, z_s, z_t, device, group, sharded=False)

    eps_s, eps_t = crd.criterion_s.eps, crd.criterion_t.eps
    part = (F.crd_contrast(e_s, mem.memory_t, sample_idx, mem.T, z_s, n_data, eps_s)
            + F.crd_contrast(e_t, mem.memory_s, sample_idx, mem.T, z_t, n_data, eps_t))
    loss = distributed.all_reduce_sum(part * (feat_s.shape[0] / batch), group)
    # The loss has read the banks as they were before this step; now commit everywhere.
    rows, _ = distributed.all_gather_rows(torch.cat([rows_s, rows_t], 1), group, sizes)
    every_idx, _ = distributed.all_gather_rows(idx, group, sizes)
    crd._commit_state(z_s, z_t, every_idx, *rows.split(rows_s.shape[1], 1))
    return loss


def _sharded(crd, feat_s, feat_t, e_s, e_t, idx, sample_idx, sizes, batch, rank, world, device):
    mem = crd.contrast
    group = crd.group
    n_data = crd.criterion_s.n_data
    dim = e_s.shape[1]
    start, stop = shard_range(n_data, rank, world)
    embed, _ = distributed.all_gather_rows(torch.cat([e_s, e_t], 1), group, sizes)
    every_s, every_t = embed.split(dim, 1)
    indices, _ = distributed.all_gather_rows(
        torch.cat([idx.unsqueeze(1), sample_idx.long()], 1), group, sizes)
    every_idx, every_sample = indices[:, 0], indices[:, 1:]

    # The entries and the updates this rank's rows serve, in global order (the Triton
    # kernel finds its entries itself: the list is made for Z's first sums only).
    triton_path = backend.resolve("crd_contrast", device) == "triton" and stop > start
    if not triton_path or mem.Z_s is None or mem.Z_t is None:
        b, k = ((every_sample >= start) & (every_sample < stop)).nonzero(as_tuple=True)
        cols = every_sample[b, k] - start
    mine = (every_idx >= start) & (every_idx < stop)
    local_idx = every_idx[mine] - start
    rows_s = crd._momentum_rows(mem.memory_s, every_s[mine], local_idx, mem.momentum)
    rows_t = crd._momentum_rows(mem.memory_t, every_t[mine], local_idx, mem.momentum)
    ok = torch.cat([rows_s, rows_t, e_s.detach(), e_t.detach()]).isfinite().all()
    z_s, z_t = mem.Z_s, mem.Z_t
    if z_s is None or z_t is None:
        with torch.no_grad():
            acc = accumulation_dtype(e_s, mem.memory_s)
            parts = [(mem.memory_t[cols].to(acc) * every_s[b].to(acc)).sum(1).div(mem.T).exp().sum(),
                     (mem.memory_s[cols].to(acc) * every_t[b].to(acc)).sum(1).div(mem.T).exp().sum()]
            z = _z_sums(parts, device, acc, group) / (batch * every_sample.shape[1]) * n_data
        dtype = torch.promote_types(e_s.dtype, mem.memory_t.dtype)  # a single process's Z dtype
        if z_s is None:
            z_s = z[0].to(dtype)
            ok &= z_s.isfinite() & (z_s > 0)
        if z_t is None:
            z_t = z[1].to(dtype)
            ok &= z_t.isfinite() & (z_t > 0)
    _agree_finite(crd, ok, feat_s, feat_t, e_s, e_t, idx, z_s, z_t, device, group, sharded=True)

    eps_s, eps_t = crd.criterion_s.eps, crd.criterion_t.eps
    if triton_path:
        # The Triton contrast kernel over the shard: it skips the entries of other ranks' rows.
        part = (_triton.crd_contrast_shard(every_s, mem.memory_t, every_sample, mem.T, z_s, n_data,
                                           eps_s, start, stop)
                + _triton.crd_contrast_shard(every_t, mem.memory_s, every_sample, mem.T, z_t, n_data,
                                             eps_t, start, stop))
    else:
        noise = mem.N / n_data
        positive = k == 0
        part = (_OwnedContrast.apply(every_s, mem.memory_t, b, cols, positive, mem.T, z_s, noise,
                                     eps_s, batch)
                + _OwnedContrast.apply(every_t, mem.memory_s, b, cols, positive, mem.T, z_t, noise,
                                       eps_t, batch))
    loss = distributed.all_reduce_sum(part, group)
    crd._commit_state(z_s, z_t, local_idx, rows_s, rows_t)
    return loss

