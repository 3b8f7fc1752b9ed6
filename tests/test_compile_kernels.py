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

About 1,500 compiles: a few minutes on 2 cores from a cold Triton cache, seconds warm.
"""
import os
import subprocess
import sys

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


@pytest.mark.skipif(_compiler_available() is not None,
                    reason=f"compiling the kernels for sm_90/sm_80: this Triton lacks the compile API "
                           f"the check uses ({_compiler_available()})")
def test_every_launched_kernel_compiles_within_device_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fastkd.kernels.resources", "--arch", "90", "--arch", "80",
                           "--check", "--no-table"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert "specializations compiled" in proc.stdout
