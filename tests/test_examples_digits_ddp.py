"""The digits example data-parallel: 2 gloo processes (CPU) train as one process does.

A spawned job trains the teacher and a few students on 2 ranks, each on its half of every
global batch; the loss trajectories (each step's loss of the global batch) must be one
process's on the same batches, to float32 rounding: a plain method (AT, SoftTarget), the
batch-relational RKD (global_batch=True), CRD (global batch, one memory), FSP (a staged
method, some parameters left out of each stage), FT (its paraphraser's own stage) and DML
(a peer with its own optimizer) and BSS (samples chosen and attacked among the whole batch;
here 1 or 2 of them, so one rank's share is empty at times), Sobolev and LwM (input
gradients through the global batch norm, differentiated again). The command line runs
with --nproc 2 and under torchrun.
"""
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("sklearn", reason="the data-parallel digits example's tests: scikit-learn (its data set) "
                    "is not installed")

from fastkd import distributed  # noqa: E402
from fastkd.examples import digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # where python -m finds this checkout's fastkd
METHODS = ["SoftTarget", "AT", "RKD", "CRD", "FSP", "FT", "DML", "BSS", "Sobolev", "LwM"]
TEACHER_CFG = digits.Config(epochs=2, batch_size=32, steps_per_epoch=4, progress=False)
STUDENT_CFG = digits.Config(epochs=2, batch_size=32, steps_per_epoch=3, progress=False)


def _losses(teacher_state=None):
    """({name: loss trajectory} of the teacher and each method, the teacher's state), in this
    process (one process, or a rank of the initialised job). The students learn from the teacher of teacher_state
    when given: every run then distils the same teacher (the teacher this process trains
    differs from one process's by rounding, which the methods' losses amplify)."""
    data = digits.Digits("cpu")
    run = digits.setup_seed(data, TEACHER_CFG, seed=0)
    out = {"Teacher": digits.train_teacher(run).losses}
    if teacher_state is not None:
        run.teacher.load_state_dict(teacher_state)
    run = dataclasses.replace(run, cfg=STUDENT_CFG)
    for name in METHODS:
        out[name] = digits.train_student(run, name).losses
    return out, run.teacher.state_dict()


def _worker(rank, world, port, out_dir, teacher_state):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.save(_losses(teacher_state)[0], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank done before any tears down its connections
    dist.destroy_process_group()


def test_two_processes_train_as_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, teacher_state = _losses()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, distributed.free_port(), str(tmp_path), teacher_state), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank records the global batch's losses
    for name, expected in one.items():
        got = torch.tensor(ranks[0][name])
        assert got.shape == (len(expected),) and len(expected) >= 6, name
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("launch", [["--nproc", "2"], ["torchrun"]], ids=["--nproc 2", "torchrun"])
def test_command_line_with_two_processes(tmp_path, launch):
    out_json = tmp_path / "digits.json"
    example = ["-m", "fastkd.examples.digits", "--device", "cpu", "--methods", "RKD", "SoftTarget",
               "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--no-progress",
               "--json", str(out_json)]
    if launch == ["torchrun"]:  # torchrun --nproc_per_node 2 -m fastkd.examples.digits ...
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] + example
    else:
        cmd = [sys.executable] + example + launch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("digits: ") == 1 and "on 2 processes (cpu)" in out  # rank 0 alone prints
    for name in ("Teacher", "Baseline", "RKD", "SoftTarget"):
        assert f"\n{name} " in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["Teacher", "Baseline", "RKD", "SoftTarget"]
    assert all(r["finite_losses"] for r in rows)


def test_data_parallel_options(monkeypatch, capsys):
    for argv, message in (
            (["--nproc", "0"], "--nproc must be >= 1"),
            (["--nproc", "3", "--batch-size", "64"], "--batch-size 64 must be divisible"),
            (["--nproc", "2", "--methods", "RKD", "OFD"], "OFD (its margin"),
    ):
        with pytest.raises(SystemExit):
            digits.parse_args(argv)
        assert message in capsys.readouterr().err
    # 'all' keeps the methods that train data-parallel, and says which it leaves out.
    args = digits.parse_args(["--nproc", "2"])
    refused = [n for n in digits.METHODS if digits.METHODS[n].not_data_parallel]
    assert refused == ["OFD"]
    assert args.methods == [n for n in digits.METHODS if n not in refused]
    assert "leaving out OFD" in capsys.readouterr().err
    # Under torchrun the launcher gives the processes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        digits.parse_args(["--nproc", "2"])
    assert "leave --nproc out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="OFD cannot train data-parallel"):
        run = digits.Run(None, STUDENT_CFG, 0, None, {}, {}, world=2)
        digits.train(run, "OFD", digits.OFD, None, {})
