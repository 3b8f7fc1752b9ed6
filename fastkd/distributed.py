"""Differentiable collectives for global-batch losses over torch.distributed.

A global-batch loss on W ranks is one loss L on the concatenation of every rank's batch
(in rank order). Each rank computes a part L_r of it (the relation rows of its own
samples) and returns ``all_reduce_sum(L_r) = L``. Autograd then sees, summed over ranks,
the objective W * L; DistributedDataParallel averages the parameter gradients over the
W ranks, which leaves exactly dL/dtheta, the single-process gradient.

The backward of each collective is the collective that makes this hold:
  all_gather_rows  y = cat(x_0, ..., x_{W-1}):  dx_r = sum over ranks of dy[rows of r]
  all_reduce_sum   y = sum_r x_r (on every rank): dx_r = sum over ranks of dy
Both work with gloo (CPU) and nccl (CUDA); local batch sizes may differ between ranks.
"""
import socket

import torch
import torch.distributed as dist


def _group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("global_batch=True needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) in every process")
    return group if group is not None else dist.group.WORLD


def rank_and_size(group=None):
    """(this process's rank in group, the group's size)."""
    group = _group(group)
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_ints(values, device, group=None):
    """Every rank's list of Python ints (the same length on every rank), in rank order:
    one small all_gather, for sizes and flags the ranks must agree on."""
    group = _group(group)
    world = dist.get_world_size(group)
    local = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).tolist()


def batch_sizes(n, device, group=None):
    """Every rank's local batch size, in rank order (one small all_gather)."""
    return [row[0] for row in all_gather_ints([n], device, group)]


def _gather_padded(x, sizes, group):
    """all_gather of row blocks of unequal sizes: pad each to the largest, drop the padding."""
    most = max(sizes)
    padded = x.new_zeros((most,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded.contiguous(), group=group)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)])


def gather_rows(x, sizes, group=None):
    """cat over ranks (rank order) of each rank's x (sizes[r], ...), not differentiable:
    for state such as CRD's bank shards."""
    return _gather_padded(x, sizes, _group(group))


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss part depends on every rank's rows: sum the gradients over ranks
        # (gloo has no reduce_scatter), then keep this rank's rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def all_gather_rows(x, group=None, sizes=None):
    """cat over ranks (rank order) of each rank's x (n_r, ...), differentiable.

    sizes: every rank's n_r when already known (saves one collective). Returns
    (sum n_r, ...) on every rank, and the offset of this rank's rows in it.
    """
    group = _group(group)
    if sizes is None:
        sizes = batch_sizes(x.shape[0], x.device, group)
    rank = dist.get_rank(group)
    return _AllGatherRows.apply(x, list(sizes), group), sum(sizes[:rank])


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x, group=None):
    """sum over ranks of x, on every rank, differentiable (see the module docstring)."""
    return _AllReduceSum.apply(x, _group(group))


def all_reduce_max(x, group=None):
    """max over ranks of all entries of x (n, ...), on every rank, differentiable: its
    gradient is shared evenly among the entries that attain it, on whichever ranks they are,
    as torch's max() over one tensor shares it. n may be 0 on a rank."""
    group = _group(group)
    m = x.detach().amax() if x.numel() else x.new_full((), float("-inf"))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    hit = x.detach() == m
    count = hit.sum().to(x.dtype)
    dist.all_reduce(count, group=group)
    # (x - m) is exactly 0 at every hit: the value is m itself, the gradient hit / count.
    return m + all_reduce_sum(((x - m) * hit).sum(), group) / count


def reducer(group=None):
    """reduce(x, op): x summed (op "sum") or maximised ("max") entry by entry over the ranks
    of group, on every rank. For the statistics between two kernel passes inside the forward
    of a global-batch autograd Function (fastkd/autograd.py), which differentiates them
    itself."""
    group = _group(group)

    def reduce(x, op):
        if op == "sum":
            return all_reduce_sum(x, group)
        if op != "max":
            raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=group)
        return y
    return reduce


def free_port():
    """A TCP port free on this host now, for processes spawned here to meet on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
