"""global_batch=True: the relational losses over a torch.distributed job equal one process's loss
on the concatenated batch, and DDP's averaged gradients equal that process's gradients.

One gloo job per world size (CPU processes spawned from the test) checks every loss inside it.
"""
import contextlib
import os
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
import fastkd.backend
import fastkd.functional as KF
from fastkd import reference
from helpers import interpreter_runs

# float64 throughout: the sharded sums differ from one process's only by rounding.
TOL = dict(rtol=1e-9, atol=1e-12)


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rkd_inputs(n, seed):
    x_s, x_t = _r(n, 6, seed=seed), _r(n, 7, seed=seed + 1)
    x_s[-1] = x_s[0]  # equal rows on two ranks: RKD's zero directions (F.normalize's clamp)
    return [x_s, x_t]


def _irg_side(n, c1, c2, d, seed):
    return [_r(n, c1, 4, 4, seed=seed), _r(n, c2, 2, 2, seed=seed + 1), _r(n, d, seed=seed + 2),
            _r(n, 5, seed=seed + 3)]


# name -> (loss of a list of (N, ...) inputs and keyword arguments, inputs of a global batch N).
# The modules with global_batch=True in their constructor, and the functional terms of RKD.
CASES = {
    "RKD": (lambda a, **kw: fastkd.RKD(25, 50, **kw)(*a), _rkd_inputs),
    "RKD distance": (lambda a, **kw: fastkd.RKD(25, 0, **kw)(*a), _rkd_inputs),
    "RKD angle": (lambda a, **kw: fastkd.RKD(0, 50, **kw)(*a), _rkd_inputs),
    "rkd_distance": (lambda a, **kw: KF.rkd_distance(*a, **kw), _rkd_inputs),
    "rkd_angle": (lambda a, **kw: KF.rkd_angle(*a, **kw), _rkd_inputs),
    "SP": (lambda a, **kw: fastkd.SP(**kw)(*a),
           lambda n, seed: [_r(n, 3, 2, 2, seed=seed), _r(n, 5, 2, 2, seed=seed + 1)]),
    "PKTCosSim": (lambda a, **kw: fastkd.PKTCosSim(**kw)(*a),
                  lambda n, seed: [_r(n, 6, seed=seed), _r(n, 7, seed=seed + 1)]),
    "CC": (lambda a, **kw: fastkd.CC(0.4, 2, **kw)(*a),
           lambda n, seed: [_r(n, 6, seed=seed), _r(n, 7, seed=seed + 1)]),
    # IRG: fm1 pooled (4x4 -> 2x2) and fm2's channels halved on the student side.
    "IRG": (lambda a, **kw: fastkd.IRG(0.1, 5, 5, **kw)(a[:4], a[4:]),
            lambda n, seed: _irg_side(n, 2, 4, 6, seed) + _irg_side(n, 4, 4, 7, seed + 10)),
}

# The single-process oracles: the reference modules on the whole batch.
REFERENCE = {
    "RKD": lambda a: reference.RKD(25, 50)(*a),
    "RKD distance": lambda a: 25 * reference.rkd.rkd_distance(*a),
    "RKD angle": lambda a: 50 * reference.rkd.rkd_angle(*a),
    "rkd_distance": lambda a: reference.rkd.rkd_distance(*a),
    "rkd_angle": lambda a: reference.rkd.rkd_angle(*a),
    "SP": lambda a: reference.SP()(*a),
    "PKTCosSim": lambda a: reference.PKTCosSim()(*a),
    "CC": lambda a: reference.CC(0.4, 2)(*a),
    "IRG": lambda a: reference.IRG(0.1, 5, 5)(a[:4], a[4:]),
}


# The cases run through the Triton sharded functions (fastkd.backend.SHARDED["triton"]); IRG's
# vertex mse has none, and runs the torch one.
TRITON_SHARDED = ("RKD", "RKD distance", "RKD angle", "rkd_distance", "rkd_angle", "SP", "PKTCosSim", "CC",
                  "IRG")


@contextlib.contextmanager
def _torch_sharded_refused():
    """The torch sharded functions of the ops with a Triton one raise inside the block: a
    triton-backend call that fell back to them fails."""
    def refuse(op):
        def call(*args, **kwargs):
            raise AssertionError(f"the triton backend ran the torch sharded {op}")
        return call
    ops = fastkd.backend.SHARDED["triton"]
    assert {"pkt_cos_sim", "rkd", "rkd_distance", "rkd_angle", "sp", "cc", "irg_edge",
            "irg_transformation"} <= set(ops)
    with mock.patch.dict(fastkd.backend.SHARDED["torch"], {op: refuse(op) for op in ops}):
        yield


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _check(name, sizes, rank, backend, group=None, seed=0):
    """Rank's part of one case: loss on every rank, x.grad / W against one process's."""
    run, make = CASES[name]
    world = len(sizes)
    full = [x.requires_grad_() for x in make(sum(sizes), seed)]
    expected = REFERENCE[name](full)
    expected_grads = _grads(expected, full)
    with fastkd.use_backend("torch"):  # fastkd's single-process path agrees with it too
        single = run(full)
    torch.testing.assert_close(single, expected, **TOL)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    local = [x.detach()[lo:hi].clone().requires_grad_() for x in full]
    before = [x.detach().clone() for x in local]
    with fastkd.use_backend(backend):
        loss = run(local, global_batch=True, group=group)
    msg = f"{name} {backend} sizes {sizes} rank {rank}"
    for x, b in zip(local, before):
        assert torch.equal(x, b), f"{msg}: an input was modified"
    assert loss.dtype == expected.dtype, msg
    torch.testing.assert_close(loss, expected, **TOL, msg=lambda m: f"{msg}: loss\n{m}")
    grads = _grads(loss, local)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(g / world, e[lo:hi], **TOL,
                                   msg=lambda m: f"{msg}: gradient of input {i}\n{m}")


def _check_float32_and_compiled(name, sizes, rank):
    """float32 inputs: the loss's dtype and value of one process's float32 loss (the sharded sums
    round otherwise); and the same call inside torch.compile, where it runs eagerly behind a
    graph break, gives the eager numbers."""
    run, make = CASES[name]
    full = [x.float().requires_grad_() for x in make(sum(sizes), 5)]
    with fastkd.use_backend("torch"):
        expected = run(full)
    expected_grads = _grads(expected, full)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    local = [x.detach()[lo:hi].clone().requires_grad_() for x in full]
    eager = run(local, global_batch=True)
    assert eager.dtype == torch.float32
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(_grads(eager, local), expected_grads):
        torch.testing.assert_close(g / len(sizes), e[lo:hi], rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype one process gets there
        assert run(local, global_batch=True).dtype == run(full).dtype
    compiled = torch.compile(lambda *a: run(list(a), global_batch=True), backend="aot_eager")(*local)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for g, e in zip(_grads(compiled, local), _grads(run(local, global_batch=True), local)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _check_ddp(sizes, rank, name):
    """A Linear student under DistributedDataParallel: its .grad after backward equals the
    single-process gradient of the loss on the whole batch."""
    world = len(sizes)
    torch.manual_seed(0)
    student = torch.nn.Linear(5, 6).double()
    single = torch.nn.Linear(5, 6).double()
    single.load_state_dict(student.state_dict())
    inputs, (feat_t, *_) = _r(sum(sizes), 5, seed=3), CASES[name][1](sum(sizes), 4)[1:]
    loss_fn = {"RKD": lambda **kw: fastkd.RKD(25, 50, **kw),
               "PKTCosSim": lambda **kw: fastkd.PKTCosSim(**kw),
               "CC": lambda **kw: fastkd.CC(0.4, 2, **kw)}[name]
    loss_fn(global_batch=False)(single(inputs), feat_t).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    loss = loss_fn(global_batch=True)(ddp(inputs[lo:hi]), feat_t[lo:hi])
    loss.backward()
    for p, q in zip(student.parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"DDP {name} {sizes}\n{m}")
    assert world == dist.get_world_size()


def _job(rank, world, init_file, error_dir, triton_path=True):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layouts = {2: [[3, 1], [1, 1]], 3: [[3, 1, 4], [2, 2, 2]]}[world]
        for sizes in layouts:
            for name in CASES:
                for backend in ("torch", "reference"):
                    _check(name, sizes, rank, backend)
        sizes = layouts[0]
        if triton_path:
            with _torch_sharded_refused():
                for name in TRITON_SHARDED:
                    _check(name, sizes, rank, "triton")
        for name in ("RKD", "SP", "IRG"):
            _check_float32_and_compiled(name, sizes, rank)
        if triton_path:
            with fastkd.use_backend("triton"), _torch_sharded_refused():
                for name in ("RKD", "PKTCosSim", "SP", "CC", "IRG"):  # float32 rows through the Triton kernels
                    _check_float32_and_compiled(name, sizes, rank)
        for name in ("RKD", "PKTCosSim", "CC"):
            _check_ddp(sizes, rank, name)
        # A subgroup: ranks 0 and 1 alone, the others not taking part.
        pair = dist.new_group([0, 1])
        if rank < 2:
            for name in ("RKD", "IRG"):
                _check(name, [1, 3], rank, "torch", group=pair)
        # A global batch of 1 (rank 0 alone in its group) raises, naming it.
        alone = dist.new_group([0])
        if rank == 0:
            x = _r(1, 4, seed=0)
            with pytest.raises(ValueError, match=r"feat_s needs a global batch of at least 2.*got 1"):
                fastkd.RKD(1, 1, global_batch=True, group=alone)(x, x)
            with pytest.raises(ValueError, match=r"irg_s\[0\] \(fm1\) needs a global batch"):
                fastkd.IRG(1, 1, 1, global_batch=True, group=alone)(*[_irg_side(1, 2, 2, 3, 0)] * 2)
        dist.barrier()
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_matches_one_process(world, tmp_path):
    # The spawned processes run on CPU; the Triton backend there needs the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    triton_path = interpreter_runs()
    try:
        mp.spawn(_job, args=(world, str(tmp_path / "init"), str(tmp_path), triton_path), nprocs=world)
    except Exception:
        reports = sorted(tmp_path.glob("rank*.txt"))
        pytest.fail("\n".join(p.read_text() for p in reports) or traceback.format_exc())
    if not triton_path:
        pytest.skip("the Triton path on CPU ranks (the torch and reference paths ran and passed): it "
                    "needs Triton's interpreter, which does not run with this Triton and numpy "
                    "(helpers.interpreter_runs)")


def test_global_batch_without_a_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    x = _r(4, 3, seed=0)
    with pytest.raises(RuntimeError, match="global_batch=True needs torch.distributed initialised"):
        fastkd.RKD(1, 1, global_batch=True)(x, x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        KF.sp(x, x, global_batch=True)


def test_global_batch_must_be_a_bool():
    x = _r(4, 3, seed=0)
    with pytest.raises(TypeError, match="global_batch must be True or False"):
        KF.cc(x, x, 0.4, 2, global_batch=1)


def test_modules_keep_the_collection_constructors():
    assert fastkd.RKD(25, 50).global_batch is False
    m = fastkd.IRG(0.1, 5, 5, global_batch=True)
    assert (m.w_irg_vert, m.global_batch, m.group) == (0.1, True, None)
    with pytest.raises(TypeError):
        fastkd.CC(0.4, 2, True)  # keyword-only
