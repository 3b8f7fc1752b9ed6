"""pytest-benchmark suite over fastkd.bench's cases (not part of the normal test run).

    python -m pytest benchmarks --benchmark-only                       # quick sweep, all losses
    python -m pytest benchmarks --benchmark-only --kd-sweep full --kd-losses RKD,SP
    python -m pytest benchmarks --benchmark-only --benchmark-json out.json

One group per loss and shape, one test per variant (eager, compile, fastkd), so
pytest-benchmark's table compares them side by side. The comparison table with
ratios and peak memory is ``python -m fastkd.bench``.
"""
import pytest
import torch

from fastkd.bench import cases, cli, measure


def pytest_addoption(parser):
    group = parser.getgroup("fastkd benchmarks")
    group.addoption("--kd-sweep", default="quick", choices=cases.SWEEPS, help="which sweep of shapes (default quick)")
    group.addoption("--kd-losses", default=None, help="comma-separated losses (default: all 21)")
    group.addoption("--kd-variants", default=",".join(measure.VARIANT_NAMES),
                    help="comma-separated subset of eager,compile,fastkd")
    group.addoption("--kd-device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.addoption("--kd-threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    group.addoption("--kd-rounds", type=int, default=10, help="timed rounds per test (default 10)")
    group.addoption("--kd-max-memory", default="50%",
                    help="CPU: memory a variant may use before it is skipped as out of memory "
                         "(default 50%% of available)")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = torch.device(config.getoption("--kd-device"))
    losses = config.getoption("--kd-losses")
    picked = cases.cases(config.getoption("--kd-sweep"), device.type, losses.split(",") if losses else None)
    variants = [v.strip() for v in config.getoption("--kd-variants").split(",") if v.strip()]
    metafunc.parametrize("case", picked, ids=[c.name.replace(" ", "_") for c in picked])
    metafunc.parametrize("variant", variants)


@pytest.fixture
def device(request):
    threads = request.config.getoption("--kd-threads")
    if threads:
        torch.set_num_threads(threads)
    return torch.device(request.config.getoption("--kd-device"))


@pytest.fixture
def rounds(request):
    return request.config.getoption("--kd-rounds")


@pytest.fixture
def max_memory(request):
    text = request.config.getoption("--kd-max-memory")
    return cli.parse_memory(text, cli.available_memory()) if text else None
