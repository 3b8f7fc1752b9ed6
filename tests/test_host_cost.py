"""The per-call cost harness (fastkd.bench.host) and what it guards: on the GPU path, at the
collection's shapes, no loss reads a device value on the host (a sync, which a CUDA graph
cannot hold), CRD after its first call included; the harness's counts are real.

What the GPU itself must show (capture in a CUDA graph, reduce-overhead) is in
tests/test_cuda_graphs.py.
"""
import pytest
import torch

from fastkd import backend, checks
from fastkd.bench import cases, cli, host

CPU = torch.device("cpu")
PAIRS = list(zip(cases.collection_cases(), cases.collection_cases(twin=True)))
BY_NAME = {case.name: (case, twin) for case, twin in PAIRS}


def _counts(module, twin, calls=2):
    """The LaunchCounter and Triton launches of each of `calls` calls after the first, on the
    CUDA path with the launches skipped."""
    gen = torch.Generator().manual_seed(0)
    step = host._step(module)
    out = []
    with host.cuda_path():
        step(twin.inputs(CPU, torch.float32, gen))  # the first call (CRD fixes Z)
        for _ in range(calls):
            out.append(host._count(step, lambda: twin.inputs(CPU, torch.float32, gen)))
    return out


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_the_gpu_path_never_syncs(name):
    """No .item(), bool(tensor), nonzero or the like on the path fastkd takes on CUDA, for
    every call the collection's scripts make (the CPU-only value checks take their GPU
    form here): the call can be captured in a CUDA graph."""
    case, twin = BY_NAME[name]
    module = twin.build("fastkd", CPU, torch.float32)
    for counter, _ in _counts(module, twin):
        assert counter.syncs == [], (name, counter.syncs)


def test_the_harness_counts_what_each_path_launches():
    results = {r["loss"]: r for r in host.run(["Logits", "RKD", "AT"], calls=3, rounds=1)}
    # Logits at 128 x 100 runs ATen's mse_loss on CUDA: one kernel forward, one backward,
    # one for the seed gradient, as the reference.
    assert results["Logits"]["path"] == {"logits": "torch"}
    assert results["Logits"]["fastkd"]["triton"] == 0
    assert results["Logits"]["fastkd"]["torch"] == results["Logits"]["reference"]["torch"]
    for loss in ("RKD", "AT"):
        r = results[loss]
        assert set(r["path"].values()) == {"triton"} and r["fastkd"]["triton"] >= 2, r
        assert r["reference"]["triton"] == 0 and r["reference"]["torch"] > r["fastkd"]["torch"]
    for r in results.values():
        assert r["fastkd"]["syncs"] == 0
        for m in (r["reference"], r["fastkd"]):
            assert 0 < m["host_us"] < 1e5
            assert host.model_us(m) == pytest.approx(m["host_us"] + 5 * m["torch"] + 20 * m["triton"])
        assert r["ratio"] == pytest.approx(host.model_us(r["reference"]) / host.model_us(r["fastkd"]))


def test_launches_are_counted_not_run():
    """Inside no_launches a Triton Function's kernels do not run (their output stays as
    allocated) and each launch is recorded; views and allocations are not PyTorch launches."""
    from fastkd.ops import no_launches
    case, twin = BY_NAME[next(n for n in BY_NAME if n.startswith("AB "))]
    module = twin.build("fastkd", CPU, torch.float32)
    inputs = twin.inputs(CPU, torch.float32, torch.Generator().manual_seed(0))
    counter = host.LaunchCounter()
    with host.cuda_path(), no_launches() as launched, counter:
        module(*inputs)
    assert launched and all(isinstance(k, str) for k in launched)
    assert not set(counter.launches) & host.NO_LAUNCH
    with counter:
        x = torch.empty(3, 4).t().reshape(-1)[1:]
        y = x + 1
    assert counter.launches[-1:] == ["add"] and y.shape == (11,)


def test_the_twins_choice_is_checked():
    case, twin = BY_NAME["Logits out 128x100"]
    bigger = cases.Case(case.loss, case.shape, 0, "batch", 0, case.args, case.inputs,
                        numel={"logits": backend.CUDA_TORCH_BELOW["logits"]})
    with pytest.raises(RuntimeError, match="its twin takes another path on CUDA"):
        host.run_case(bigger, twin, calls=1, rounds=1)


def test_the_command_prints_the_table_within_120_columns(capsys, tmp_path):
    path = tmp_path / "host.json"
    assert cli.main(["--host", "--losses", "Hint,SP", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert sum(line.startswith(("Hint ", "SP ")) for line in lines) == 1 + 3  # Hint at rb3, SP at rb1..rb3
    assert "calls cost no more than the reference's" in out and path.exists()


def test_host_tensor_is_what_the_value_checks_ask():
    assert checks.host_tensor(torch.zeros(1)) and not checks.host_tensor(torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 3\)"):
        checks.indices(torch.tensor([0, 3]), "idx", (2,), 3)
