"""fastkd.CRD(global_batch=True), with full and sharded banks, on 2 and 3 gloo processes
(CPU) against one process's CRD on the concatenated batch (fastkd/global_crd.py).

One spawned job per world size checks everything inside it: the loss on every rank, the
feature gradients (x.grad / W), the parameter gradients under DistributedDataParallel,
the banks and Z (identical on every rank, and the single process's) over several steps,
that a bad input on one rank raises on every rank and changes nothing anywhere, and that
the sharded banks' full_state_dict() loads into any world size.
"""
import datetime
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastkd
from fastkd import distributed, global_crd
from fastkd.global_crd import shard_range
from helpers import interpreter_runs

# s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data
ARGS = (6, 5, 4, 7, 0.1, 0.5, 40)
N_DATA = ARGS[-1]
STEPS = 3


def _crd(**options):
    torch.manual_seed(0)  # the same parameters and banks in every process and mode
    return fastkd.CRD(*ARGS, **options).double()


def _global_batch(sizes, step):
    """The step's concatenated batch (every rank builds the same one)."""
    g = torch.Generator().manual_seed(100 + step)
    b = sum(sizes)
    feat_s = torch.randn(b, 2, 3, generator=g, dtype=torch.float64)
    feat_t = torch.randn(b, ARGS[1], generator=g, dtype=torch.float64)
    idx = torch.randperm(N_DATA, generator=g)[:b]
    sample_idx = torch.randint(0, N_DATA, (b, ARGS[3] + 1), generator=g)
    sample_idx[:, 0] = idx
    return feat_s, feat_t, idx, sample_idx


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _same_on_every_rank(x, what):
    copies = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, x.contiguous())
    assert all(torch.equal(c, x) for c in copies), f"{what} differs between ranks"


def _state(crd):
    return {k: v.clone() for k, v in crd.state_dict().items()}


def _assert_unchanged(crd, before):
    after = crd.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _check_bad_inputs(rank, world, sizes, sharded):
    """A NaN on the last rank, an index out of range on rank 0: every rank raises, nothing
    changes anywhere, and the next good step runs on every rank."""
    crd = _crd(global_batch=True, bank_sharding=sharded)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    feat_s, feat_t, idx, sample_idx = (x[rows] for x in _global_batch(sizes, 0))
    for fixed_z in (False, True):
        before = _state(crd)
        nan = feat_s.clone()
        if rank == world - 1:
            nan[0, 0, 1] = float("nan")
        with pytest.raises(ValueError, match="left unchanged"):
            crd(nan, feat_t, idx, sample_idx)
        _assert_unchanged(crd, before)
        out_of_range = sample_idx.clone()
        if rank == 0:
            out_of_range[0, 2] = N_DATA
        with pytest.raises(ValueError, match="sample_idx" if rank == 0 else r"rank\(s\) \[0\]"):
            crd(feat_s, feat_t, idx, out_of_range)
        _assert_unchanged(crd, before)
        assert (crd.contrast.Z_s is None) is not fixed_z
        crd(feat_s, feat_t, idx, sample_idx)  # no rank is left behind in a collective
        assert crd.contrast.Z_s is not None and crd.contrast.Z_t is not None
    # An input the embedding heads refuse (float32 into float64 weights) on the last rank.
    before = _state(crd)
    with pytest.raises((RuntimeError, ValueError), match="dtype" if rank == world - 1 else r"rank\(s\)"):
        crd(feat_s.float() if rank == world - 1 else feat_s, feat_t, idx, sample_idx)
    _assert_unchanged(crd, before)
    # Z fixed on one rank only (its state_dict loaded there alone): every rank refuses.
    other = _crd(global_batch=True, bank_sharding=sharded)
    if rank == 0:
        other.load_state_dict(crd.state_dict())
    before = _state(other)
    with pytest.raises(RuntimeError, match="fixed on some ranks and not on others"):
        other(feat_s, feat_t, idx, sample_idx)
    _assert_unchanged(other, before)


def _check_against_one_process(rank, world, sizes, sharded):
    one = _crd()
    # The sharded run goes through an explicit process group (of every rank).
    group = dist.new_group(list(range(world))) if sharded else None
    crd = _crd(global_batch=True, bank_sharding=sharded, group=group)
    # Sharded banks differ between ranks: DDP must not broadcast rank 0's.
    ddp = DistributedDataParallel(crd, broadcast_buffers=not sharded)
    opt_one = torch.optim.SGD(one.parameters(), lr=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    lo, hi = shard_range(N_DATA, rank, world) if sharded else (0, N_DATA)
    mem, mem_one = crd.contrast, one.contrast
    assert mem.memory_s.shape[0] == hi - lo
    for step in range(STEPS):
        feat_s, feat_t, idx, sample_idx = _global_batch(sizes, step)
        xs, xt = feat_s.clone().requires_grad_(), feat_t.clone().requires_grad_()
        loss_one = one(xs, xt, idx, sample_idx)
        loss_one.backward()
        ms, mt = feat_s[rows].clone().requires_grad_(), feat_t[rows].clone().requires_grad_()
        loss = ddp(ms, mt, idx[rows], sample_idx[rows])
        loss.backward()
        what = f"step {step}, sharded={sharded}, rank {rank}"
        _close(loss, loss_one, f"loss, {what}")
        _close(ms.grad / world, xs.grad[rows], f"feat_s grad, {what}")
        _close(mt.grad / world, xt.grad[rows], f"feat_t grad, {what}")
        for (name, p), q in zip(crd.named_parameters(), one.parameters()):
            _close(p.grad, q.grad, f"{name} grad, {what}")
        for name in ("memory_s", "memory_t"):
            _close(getattr(mem, name), getattr(mem_one, name)[lo:hi], f"{name}, {what}")
            if sharded:
                union, _ = distributed.all_gather_rows(getattr(mem, name))
                _close(union, getattr(mem_one, name), f"union of the {name} shards, {what}")
            else:
                _same_on_every_rank(getattr(mem, name), f"{name}, {what}")
        for name in ("Z_s", "Z_t"):
            _close(getattr(mem, name), getattr(mem_one, name), f"{name}, {what}")
            _same_on_every_rank(getattr(mem, name), f"{name}, {what}")
        opt.step()
        opt_one.step()
        opt.zero_grad()
        opt_one.zero_grad()
    saved = crd.state_dict()  # a sharded module saves its shard
    assert saved.keys() == one.state_dict().keys()
    assert saved["contrast.memory_s"].shape == saved["contrast.memory_t"].shape == (hi - lo, ARGS[2])
    return crd, one


def _check_full_state(rank, world, crd, one, first_two):
    """full_state_dict() gathers whole banks, which load anywhere (strict): into a fresh
    sharded module (its rows), an unsharded one, and a sharded one over the first two
    ranks (another world size); a shard loads only where it was saved, and says why."""
    full = crd.full_state_dict()
    assert full.keys() == one.state_dict().keys()
    for key, value in one.state_dict().items():
        _close(full[key], value, f"full_state_dict()[{key!r}], rank {rank}")
    sharded = _crd(global_batch=True, bank_sharding=True)
    sharded.load_state_dict(full)
    plain = _crd()
    plain.load_state_dict(full)
    for module, expected in ((sharded, crd), (plain, one)):
        for key, value in expected.state_dict().items():
            _close(module.state_dict()[key], value, f"{key} loaded from full_state_dict(), rank {rank}")
    assert full["contrast.memory_s"].shape[0] == N_DATA  # the caller's dict as it was
    with pytest.raises(RuntimeError, match=r"loads only into the rank and world size that saved it"):
        plain.load_state_dict(crd.state_dict())
    if world == 3 and rank < 2:
        two = _crd(global_batch=True, bank_sharding=True, group=first_two)
        two.load_state_dict(full)
        lo, hi = shard_range(N_DATA, rank, 2)
        for name in ("memory_s", "memory_t"):
            _close(getattr(two.contrast, name), getattr(one.contrast, name)[lo:hi], f"{name} over 2 ranks")
        with pytest.raises(RuntimeError, match="full_state_dict"):
            two.load_state_dict(crd.state_dict())  # a shard of three


def _check_triton_shards(rank, world, sizes):
    """Sharded banks on the triton backend: the Triton contrast kernel over the shard's row
    range, never _OwnedContrast (made to raise), against one process's CRD (also Triton)."""
    refused = AssertionError("the sharded Triton path ran _OwnedContrast")
    with fastkd.use_backend("triton"), mock.patch.object(global_crd._OwnedContrast, "apply",
                                                         side_effect=refused):
        _check_against_one_process(rank, world, sizes, sharded=True)


def _worker(rank, world, port, sizes, triton_path=False):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    first_two = dist.new_group([0, 1])  # every rank takes part in making it
    if rank >= 2:
        with pytest.raises(ValueError, match="group must be a process group this process belongs to"):
            fastkd.CRD(*ARGS, global_batch=True, group=first_two)
    for sharded in (False, True):
        _check_bad_inputs(rank, world, sizes, sharded)
        crd, one = _check_against_one_process(rank, world, sizes, sharded)
    _check_full_state(rank, world, crd, one, first_two)
    if triton_path:
        _check_triton_shards(rank, world, sizes)
    # Every rank done before any tears down its connections (a process that exits while
    # gloo still talks to it can abort another). A failing rank just exits: the others'
    # collectives then fail too, at the latest after the timeout.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[4, 4], [3, 1, 4]], ids=["2 ranks", "3 ranks, unequal batches"])
def test_global_crd_matches_one_process_on_the_concatenated_batch(sizes):
    # The spawned ranks run on CPU: their Triton path (sharded banks) needs the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    triton_path = interpreter_runs()
    mp.spawn(_worker, args=(len(sizes), distributed.free_port(), sizes, triton_path),
             nprocs=len(sizes), join=True)
    if not triton_path:
        pytest.skip("the sharded Triton path on CPU ranks (the torch path ran and passed): it needs "
                    "Triton's interpreter, which does not run with this Triton and numpy "
                    "(helpers.interpreter_runs)")


def test_global_batch_without_a_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastkd.CRD(*ARGS, global_batch=True)


def test_options_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        fastkd.CRD(*ARGS, True)
    with pytest.raises(ValueError, match="bank_sharding=True needs global_batch=True"):
        fastkd.CRD(*ARGS, bank_sharding=True)
    with pytest.raises(TypeError, match="global_batch"):
        fastkd.CRD(*ARGS, global_batch=1)
    assert not fastkd.CRD(*ARGS).global_batch
