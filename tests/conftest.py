import atexit
import os
import re
import sys
import tempfile

import torch

import device_switch
import fast_interpreter

# FASTKD_TEST_DEVICE=cuda runs the Triton-backed calls of the CPU-built tests on the GPU
# (benchmarks/gpu.sh); =cpu is its self-test under the interpreter. See device_switch.py.
TEST_DEVICE = device_switch.requested()

# Without a GPU, Triton kernels run through its interpreter; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available() or (TEST_DEVICE is not None and TEST_DEVICE.type == "cpu"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
fast_interpreter.install()
if os.environ.get("FASTKD_GPU_DIVISION") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    import gpu_division  # the interpreter's float32 division as a GPU's: see gpu_division.py
    gpu_division.install()

if TEST_DEVICE is not None:  # before any test module imports fastkd objects
    device_switch.install(TEST_DEVICE)

if os.environ.get("PYTEST_XDIST_WORKER"):  # workers side by side: one thread each
    torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("fastkd", deadline=None, max_examples=25, derandomize=True)
# For slow runs, e.g. the kernel tests under compute-sanitizer by hand.
settings.register_profile("fastkd-sanitizer", deadline=None, max_examples=3, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastkd"))


# FASTKD_TEST_FAILURES=PATH appends each failure's report to PATH as it happens, so a run
# stopped at a time limit (benchmarks/gpu.sh) keeps them: pytest prints its own at the end.
FAILURES_LOG = os.environ.get("FASTKD_TEST_FAILURES")


def pytest_runtest_logreport(report):
    if FAILURES_LOG and report.failed:
        with open(FAILURES_LOG, "a") as f:
            f.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_report_header(config):
    if TEST_DEVICE is not None:
        return f"{device_switch.ENV_VAR}={TEST_DEVICE}: fastkd.autograd Functions run there"


COMPILE_CHECK = "test_compile_kernels.py::test_every_launched_kernel_compiles_within_device_limits"


def _compile_check_folder():
    """The folder where the compile check, started below, leaves its result for its test, in
    the environment for the run."""
    folder = os.environ.get("FASTKD_COMPILE_CHECK_DIR")
    if folder is None:
        folder = os.environ["FASTKD_COMPILE_CHECK_DIR"] = tempfile.mkdtemp(prefix="fastkd-compile-check-")
    return folder


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`-n` (pytest-xdist, what the README's test command passes) distributes whole files:
    a file's module fixtures and the kernels its tests compile stay on one worker."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 8 (each holds torch and Triton, about 1 GB,
    and the multi-process tests spawn their own ranks)."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    # The tests time nothing (speed lives in benchmarks/); under -n pytest-benchmark would
    # warn in every process that it cannot time.
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        if hasattr(config.option, "benchmark_disable"):
            config.option.benchmark_disable = True
    # Under pytest-xdist, before the workers start, so that they see the folder.
    if not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None):
        _compile_check_folder()


def _start_compile_check():
    from test_compile_kernels import start_compile_check
    start_compile_check(_compile_check_folder())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under pytest-xdist, in the controller: start the compile check once a worker has
    collected its test, before any test runs."""
    if any(i.endswith(COMPILE_CHECK) for i in ids):
        _start_compile_check()


@pytest.hookimpl(trylast=True)  # after -k and --deselect have deselected
def pytest_collection_modifyitems(config, items):
    # The compile check runs in a subprocess from now on, beside the other tests, and its
    # test, which collects the result, runs last (see test_compile_kernels.py).
    check = [item for item in items if item.nodeid.endswith(COMPILE_CHECK)]
    if check and not config.option.collectonly:
        items[:] = [item for item in items if item not in check] + check
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            _start_compile_check()
    if TEST_DEVICE is None:
        return
    for item in items:
        for pattern, reason in device_switch.skipped(TEST_DEVICE).items():
            if re.search(f"(?:{pattern})$", item.nodeid):
                item.add_marker(pytest.mark.skip(reason=reason))


def _quiet_teardown_stderr():
    """Send the process's stderr to /dev/null for the rest of interpreter teardown."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def pytest_unconfigure(config):
    """After the run (in each xdist worker too): where Triton's compiled bindings were
    loaded, the process's teardown writes its stderr to /dev/null.

    At the very end of interpreter teardown nanobind reports Triton's bindings as leaked
    objects ("nanobind: leaked 518 functions!" and a line for each), a false alarm that
    Triton silences the same way in its own compile workers (and fastkd.bench's entry
    point by leaving through os._exit). Only teardown's stderr goes: pytest's report is
    written by then, and the exit status stays pytest's.
    """
    if "triton._C.libtriton" in sys.modules:
        atexit.register(_quiet_teardown_stderr)
