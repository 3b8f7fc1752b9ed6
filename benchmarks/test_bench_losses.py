"""Forward+backward of every loss: the reference eagerly, under torch.compile, and fastkd.

Run with ``python -m pytest benchmarks --benchmark-only`` (options in conftest.py).
A variant that runs out of memory, or that torch.compile cannot compile, is skipped
with that reason.
"""
import pytest
import torch

from fastkd.bench import cli, measure


def test_loss(benchmark, case, variant, device, rounds, max_memory):
    benchmark.group = case.name
    benchmark.extra_info["fastkd_path"] = cli.fastkd_path(case.loss, device)
    runner = measure.Runner(case, device, case.dtype or torch.float32)
    with measure.memory_cap(device, max_memory):
        try:
            step, module = measure.VARIANTS[variant](case, device, case.dtype or torch.float32)
            runner.time_call(step, module)  # warm-up (compiles, for the compile variant)
        except Exception as err:
            status = measure.OOM if measure.is_out_of_memory(err) else (
                measure.COMPILE_FAILED if variant == "compile" else None)
            if status is None:
                raise
            pytest.skip(f"{variant} of {case.name}, not timed: {status} ({err})")

        def setup():
            for p in module.parameters():
                p.grad = None
            inputs = runner.inputs()
            if runner.flush is not None:
                runner.flush.zero_()
                torch.cuda.synchronize(device)
            return inputs, {}

        def target(*inputs):
            step(*inputs).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
