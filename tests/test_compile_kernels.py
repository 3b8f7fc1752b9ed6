"""Every Triton kernel specialization fastkd launches compiles for sm_90 and sm_80.

The rest of the suite runs the kernels through Triton's interpreter, which checks neither
the compiler's typing rules nor registers, shared memory or grid limits. This runs
``python -m fastkd.kernels.resources --check`` (see that module) in a subprocess without
TRITON_INTERPRET: the losses run on meta tensors at the kernel tests' kinds of shapes and
the benchmark's full CUDA sweep, in fp32, bf16, fp16 and fp64, with launches recorded
instead of run, and each distinct specialization is compiled with Triton's compiler and
the ptxas of its wheel. It fails on a compile error, a register spill at the benchmark's
shapes in fp32/bf16/fp16, shared memory or a grid dimension beyond the device's limit, a
tl.dot whose fp32/bf16/fp16 products reach no tensor core (no mma/wgmma in its PTX),
or a host sync (.item() on a meta tensor raises), except the named EXPECTED findings there
and CRD's one deliberate sync (its finiteness check, stood in for by record()).

About 1,500 compiles: about 7 minutes of one core from a cold Triton cache, tens of seconds
warm; the suite runs them beside its other tests (start_compile_check).
"""
import os
import subprocess
import sys
import time

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


FOLDER_VAR = "FASTKD_COMPILE_CHECK_DIR"  # tests/conftest.py sets it for the whole run


def start_compile_check(folder):
    """Start the check in the background, once per folder: its output goes to folder/out and
    its exit status to folder/rc when it ends. None where Triton lacks the compile API.

    tests/conftest.py starts it as soon as the suite is collected (in the controller under
    pytest-xdist) and runs this test last: the check's compiles, minutes on one core from a
    cold Triton cache, then run beside the other tests. Two compile jobs at the lowest
    priority: the tests keep the cores they use, and the check takes what they leave (a
    whole core while the tests run in one process, both once they end).
    """
    if _compiler_available() is not None or os.path.exists(os.path.join(folder, "started")):
        return
    open(os.path.join(folder, "started"), "w").close()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    check = [sys.executable, "-m", "fastkd.kernels.resources", "--arch", "90", "--arch", "80", "--check",
             "--no-table", "--jobs", "2"]
    # A small parent writes the status when the check ends (renamed into place, so a reader
    # never sees it half written); it outlives this process, as a worker may be the reader.
    # At the lowest priority: the tests, which a spare core does not serve all the time (their
    # 2- and 3-process jobs), come first, and the check only has to end before the last.
    runner = ("import os, subprocess, sys\n"
              "os.nice(19)\n"
              "folder = sys.argv[1]\n"
              "with open(os.path.join(folder, 'out'), 'w') as out:\n"
              "    code = subprocess.call(sys.argv[2:], cwd=%r, stdout=out, stderr=subprocess.STDOUT)\n"
              "with open(os.path.join(folder, 'rc.part'), 'w') as f:\n"
              "    f.write(str(code))\n"
              "os.replace(os.path.join(folder, 'rc.part'), os.path.join(folder, 'rc'))\n" % ROOT)
    subprocess.Popen([sys.executable, "-c", runner, folder, *check], env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.skipif(_compiler_available() is not None,
                    reason=f"compiling the kernels for sm_90/sm_80: this Triton lacks the compile API "
                           f"the check uses ({_compiler_available()})")
def test_every_launched_kernel_compiles_within_device_limits(tmp_path):
    folder = os.environ.get(FOLDER_VAR) or str(tmp_path)
    start_compile_check(folder)  # where the run did not (this test run alone)
    rc = os.path.join(folder, "rc")
    deadline = time.monotonic() + 1800
    while not os.path.exists(rc):
        assert time.monotonic() < deadline, "the compile check did not end within 30 minutes"
        time.sleep(0.5)
    with open(rc) as f, open(os.path.join(folder, "out")) as out:
        returncode, output = int(f.read()), out.read()
    assert returncode == 0, output[-25000:]
    assert "specializations compiled" in output
