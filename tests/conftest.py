import os

import torch

import device_switch

# FASTKD_TEST_DEVICE=cuda runs the Triton-backed calls of the CPU-built tests on the GPU
# (benchmarks/gpu.sh); =cpu is its self-test under the interpreter. See device_switch.py.
TEST_DEVICE = device_switch.requested()

# Without a GPU, Triton kernels run through its interpreter; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available() or (TEST_DEVICE is not None and TEST_DEVICE.type == "cpu"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

if TEST_DEVICE is not None:  # before any test module imports fastkd objects
    device_switch.install(TEST_DEVICE)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("fastkd", deadline=None, max_examples=25, derandomize=True)
# For slow runs such as compute-sanitizer's (benchmarks/gpu.sh).
settings.register_profile("fastkd-sanitizer", deadline=None, max_examples=3, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastkd"))


def pytest_report_header(config):
    if TEST_DEVICE is not None:
        return f"{device_switch.ENV_VAR}={TEST_DEVICE}: fastkd.autograd Functions run there"


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE is None:
        return
    for item in items:
        for suffix, reason in device_switch.SKIPPED.items():
            if item.nodeid.endswith(suffix):
                item.add_marker(pytest.mark.skip(reason=reason))
