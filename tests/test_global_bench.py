"""python -m fastkd.bench.global_batch: its loopback process group, every loss at a tiny size,
and the per-rank memory of a relational loss falling with the world size."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fastkd.backend
from fastkd.bench import global_batch, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """--threads 1 below sets torch's threads for this process: the suite's setting is
    restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_loopback_group_collectives():
    with global_batch.simulated_rank(1, 3):
        assert (dist.get_rank(), dist.get_world_size()) == (1, 3)
        x = torch.tensor([[1.0, -2.0]])
        blocks = [torch.empty_like(x) for _ in range(3)]
        dist.all_gather(blocks, x)
        # Its own block exact; the others scaled, so no row of the global batch repeats.
        assert torch.equal(blocks[1], x)
        assert torch.equal(blocks[2], x * (1 + 1 / 1024)) and torch.equal(blocks[0], x * (1 + 2 / 1024))
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(3)]
        dist.all_gather(sizes, torch.tensor([5]))
        assert [int(s) for s in sizes] == [5, 5, 5]
        total, most = torch.tensor([2.0]), torch.tensor([2.0])
        dist.all_reduce(total)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        assert (float(total), float(most)) == (6.0, 2.0)
    assert not dist.is_initialized()


def test_every_loss_runs_at_a_tiny_size(capsys):
    status = global_batch.main(["--N", "8", "--D", "4", "--world", "1,2,4", "--reps", "1", "--memory-calls", "1",
                                "--nce-n", "8", "--n-data", "40", "--feat-dim", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "simulated ranks" in out
    assert "sharded path: rkd torch" in out  # CPU: the torch sharded functions
    for loss in global_batch.LOSSES:
        assert sum(line.split()[:2] == [loss, "8"] for line in out.splitlines()) == 3, out  # table rows


def test_cuda_runs_the_triton_sharded_functions(monkeypatch):
    # Where Triton kernels run (CUDA), auto picks the triton backend, and the global batch its
    # Triton sharded functions; IRG's vertex term (an mse) stays torch.
    pytest.importorskip("triton", reason="the Triton sharded functions' choice: triton is not installed")
    monkeypatch.setattr(fastkd.backend, "triton_runs_on", lambda device: True)
    assert global_batch.sharded_paths(torch.device("cuda")) == {
        "rkd": "triton", "sp": "triton", "pkt_cos_sim": "triton", "cc": "triton", "irg_edge": "triton",
        "irg_vertex": "torch", "irg_transformation": "triton"}


def test_unequal_shares_are_refused():
    with pytest.raises(SystemExit, match="divisible by every W"):
        global_batch.main(["--N", "10", "--world", "1,4", "--losses", "SP"])
    with pytest.raises(ValueError, match="unknown loss 'KD'"):
        global_batch.main(["--N", "8", "--world", "1", "--losses", "KD"])


@pytest.mark.skipif(not measure.cpu_memory_supported(),
                    reason="CPU peak memory per rank: it reads Linux's /proc, which this platform lacks")
def test_relational_memory_per_rank_falls_with_the_world_size(tmp_path):
    # A fresh process: its resident set holds nothing of the other tests. SP at N=2048,
    # D=32 holds (N / W, N) similarity rows, 16 MiB each at W=1: about 100 MiB at its peak,
    # where the resident set's page-level noise (a few MiB) and the odd temporary that
    # outlives another (one call in a few) are small beside halving the rows.
    path = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-m", "fastkd.bench.global_batch", "--losses", "SP,PKT", "--N", "2048",
                          "--D", "32", "--world", "1,2", "--reps", "2", "--memory-calls", "3", "--threads", "1",
                          "--json", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "peak MiB" in run.stdout
    doc = json.loads(path.read_text())
    assert (doc["mode"], doc["N"], doc["D"], doc["threads"]) == ("simulated", 2048, 32, 1)
    rows = {(r["loss"], r["W"]): r for r in doc["results"]}
    assert set(rows) == {(loss, w) for loss in ("SP", "PKT") for w in (1, 2)}
    for r in rows.values():
        assert r["status"] == "ok" and r["rows_per_rank"] == 2048 // r["W"]
        assert r["time_ms"] > 0 and r["min_ms"] <= r["time_ms"] and len(r["times_ms"]) == 2
        assert r["peak_mib"] is not None and r["state_mib"] == 0
    assert rows["SP", 1]["peak_ratio"] == 1.0
    peaks = {w: rows["SP", w]["peak_mib"] for w in (1, 2)}
    assert peaks[1] > 48, doc["results"]
    # Half the rows: about half W=1's peak (0.4-0.75 of it measured here, with 3 calls each).
    assert peaks[2] < 0.85 * peaks[1], doc["results"]
    assert rows["SP", 2]["peak_ratio"] == pytest.approx(peaks[2] / peaks[1])
