"""Every Triton kernel specialization fastkd launches compiles for sm_90 and sm_80.

The rest of the suite runs the kernels through Triton's interpreter, which checks neither
the compiler's typing rules nor registers, shared memory or grid limits. This runs
``python -m fastkd.kernels.resources --check`` (see that module) in a subprocess without
TRITON_INTERPRET: the losses run on meta tensors at the kernel tests' kinds of shapes and
the benchmark's full CUDA sweep, in fp32, bf16, fp16 and fp64, with launches recorded
instead of run, and each distinct specialization is compiled with Triton's compiler and
the ptxas of its wheel. It fails on a compile error, a register spill at the benchmark's
shapes in fp32/bf16/fp16, shared memory or a grid dimension beyond the device's limit, or
a host sync (.item() on a meta tensor raises), except the named EXPECTED findings there and
CRD's one deliberate sync (its finiteness check, stood in for by record()).

About 1,500 compiles: about 6 minutes on one core from a cold Triton cache, tens of seconds
warm; the suite runs them beside its other tests (start_compile_check).
"""
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler_available():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


_CHECK = {}


def start_compile_check():
    """Start the check in a subprocess, once; None where Triton lacks the compile API.

    tests/conftest.py starts it as soon as the suite is collected and runs this test last:
    the check's compiles (minutes on one core from a cold Triton cache) then run beside the
    rest of the suite, most of which keeps one core of two busy. One compile job, so the
    suite keeps its core.
    """
    if _compiler_available() is not None:
        return None
    if "proc" not in _CHECK:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        out = tempfile.TemporaryFile("w+")  # a file, not a pipe, which a long report would fill
        _CHECK["out"] = out
        _CHECK["proc"] = subprocess.Popen(
            [sys.executable, "-m", "fastkd.kernels.resources", "--arch", "90", "--arch", "80", "--check",
             "--no-table", "--jobs", "1"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return _CHECK["proc"]


@pytest.mark.skipif(_compiler_available() is not None,
                    reason=f"compiling the kernels for sm_90/sm_80: this Triton lacks the compile API "
                           f"the check uses ({_compiler_available()})")
def test_every_launched_kernel_compiles_within_device_limits():
    proc = start_compile_check()
    try:
        returncode = proc.wait(timeout=1800)
    finally:
        proc.kill()
    _CHECK["out"].seek(0)
    output = _CHECK["out"].read()
    assert returncode == 0, output[-25000:]
    assert "specializations compiled" in output
