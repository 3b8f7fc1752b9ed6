"""Every Triton kernel specialization fastkd launches compiles for sm_90, sm_80, sm_89 and sm_86.

The rest of the suite runs the kernels through Triton's interpreter, which checks neither
the compiler's typing rules nor registers, shared memory or grid limits. This runs
``python -m fastkd.kernels.resources --check`` (see that module) in a subprocess without
TRITON_INTERPRET: the losses run on meta tensors at the kernel tests' kinds of shapes and
the benchmark's full CUDA sweep, in fp32, bf16, fp16 and fp64, with launches recorded
instead of run, and each distinct specialization is compiled with Triton's compiler and
the ptxas of its wheel, for sm_90 and sm_80 every one, for sm_89 and sm_86 (float64 at 1/64
of float32's rate) the relational kernels' fp32/bf16/fp16 ones. It fails on a compile error,
a register spill at the benchmark's shapes in fp32/bf16/fp16, shared memory or a grid
dimension beyond the device's limit, a tl.dot whose fp32/bf16/fp16 products reach no tensor
core (no mma/wgmma in its PTX), float64 arithmetic in a relational kernel's fp32/bf16/fp16
specialization (unless its module declares it an exact path, EXACT_FLOAT64_KERNELS), a stale
EXPECTED entry, or a host sync (.item() on a meta tensor raises), except the named EXPECTED
findings there and CRD's one deliberate sync (its finiteness check, stood in for by record()).

About 2,000 specializations: minutes of one core from a cold Triton cache, tens of seconds
warm; the suite runs them beside its other tests (start_compile_check). The other tests
here hold the float64 counter, the float64 finding and the stale-entry report to their word.
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
    # --check compiles for resources.ARCHS: sm_90, sm_80, sm_89, sm_86.
    check = [sys.executable, "-m", "fastkd.kernels.resources", "--check", "--no-table", "--jobs", "2"]
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
                    reason=f"compiling the kernels for sm_90/80/89/86: this Triton lacks the compile API "
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


# --- the float64 counter, the float64 finding and stale EXPECTED entries -----------------

def test_ptx_float64_counts():
    from fastkd.kernels.resources import _ptx_ops
    ptx = """
\tadd.f64 \t%fd3, %fd1, %fd2;
\t@%p1 fma.rn.f64 \t%fd4, %fd1, %fd2, %fd3;
\tdiv.rn.f64 \t%fd5, %fd4, %fd3;
\tsetp.lt.f64 \t%p2, %fd5, 0d0000000000000000;
\tmax.f64 \t%fd6, %fd5, %fd4;
\tmma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%fd7, %fd8}, {%fd1}, {%fd2}, {%fd7, %fd8};
\tneg.f64 \t%fd9, %fd6;
\tselp.f64 \t%fd10, %fd9, %fd6, %p2;
\tcvt.rn.f32.f64 \t%f1, %fd10;
\tcvt.f64.f32 \t%fd11, %f2;
\tfma.rn.f32 \t%f3, %f1, %f2, %f1;
\tadd.f32 \t%f4, %f3, %f1;
\tld.global.b64 \t%rd1, [%rd2];
\t.reg .f64 \t%fd<12>;
"""
    assert _ptx_ops(ptx) == {"f64": 6, "f64cvt": 2, "fma": 2, "mma": 1}


_KERNELS = """
import triton
import triton.language as tl


@triton.jit
def float32_kernel(x_ptr, y_ptr, s, n, BLOCK: tl.constexpr):  # n unused: its 16-divisibility changes nothing
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.sqrt(tl.load(x_ptr + i) * s + 1.0))


@triton.jit
def float64_kernel(x_ptr, y_ptr, s, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.sqrt(tl.load(x_ptr + i).to(tl.float64) * s + 1.0).to(tl.float32))


@triton.jit
def widening_kernel(x_ptr, y_ptr, s, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, (tl.load(x_ptr + i) * s + 1.0).to(tl.float64))
"""

_COMPILE = """
import json, sys
import kernels_f64 as k
from fastkd.kernels import resources as r
specs = [r.Spec(kernel, 86, {"x_ptr": "*fp32", "y_ptr": y, "s": "fp32", "BLOCK": "constexpr"}, {(3,): 128}, {},
                {"num_warps": 4, "num_stages": 3})
         for kernel, y in ((k.float64_kernel, "*fp32"), (k.widening_kernel, "*fp64"))]
# float32_kernel twice: n divisible by 16 or not, the same LLVM IR, so the second reuses the first's cubin.
specs += [r.Spec(k.float32_kernel, 86, {"x_ptr": "*fp32", "y_ptr": "*fp32", "s": "fp32", "n": "i32",
                                        "BLOCK": "constexpr"}, {(4,): 128}, attrs, {"num_warps": 4, "num_stages": 3})
          for attrs in ({}, {(3,): [["tt.divisibility", 16]]})]
print(json.dumps([{key: res.get(key) for key in ("error", "f64", "f64cvt", "reused")}
                  for res in r.compile_all(specs, 1)]))
# A recorded result is taken for its own key only: the same kernel at another constexpr compiles.
other = r.Spec(k.float64_kernel, 86, specs[0].signature, {(3,): 64}, {}, specs[0].options)
fake = {"error": None, "regs": 1, "spill": 0, "shared": 0, "has_dot": False, "tc": {}, "fma": 0, "f64": 99,
        "f64cvt": 0}
taken = r.compile_all([specs[0], other], 1, recorded={r._keys(specs[:1])[0]: fake})
print(json.dumps([(res["f64"], bool(res.get("recorded"))) for res in taken]))
"""


@pytest.mark.skipif(_compiler_available() is not None, reason="this Triton lacks the compile API")
def test_float64_counter_on_kernels_compiled_for_sm86(tmp_path):
    (tmp_path / "kernels_f64.py").write_text(_KERNELS)
    (tmp_path / "compile_f64.py").write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # cold: the second float32 compile reuses the first's
    out = subprocess.run([sys.executable, str(tmp_path / "compile_f64.py")], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-5000:]
    lines = out.stdout.strip().splitlines()
    f64, widening, f32, f32_twin = __import__("json").loads(lines[-2])
    assert __import__("json").loads(lines[-1]) == [[99, True], [2, False]]
    # x * s + 1 (one fma.rn.f64, fused) and sqrt.rn.f64; conversions in and out.
    assert f64["error"] is None and f64["f64"] == 2 and f64["f64cvt"] >= 2 and not f64["reused"], f64
    # A conversion is not float64 arithmetic.
    assert widening == {"error": None, "f64": 0, "f64cvt": 1, "reused": False}
    assert f32 == {"error": None, "f64": 0, "f64cvt": 0, "reused": False}
    assert f32_twin == {"error": None, "f64": 0, "f64cvt": 0, "reused": True}


def _fake_spec(module, fn_name, dtypes, arch=80):
    import types

    from fastkd.kernels.resources import Spec
    fn = types.FunctionType((lambda: None).__code__, {}, fn_name)
    fn.__module__ = module
    spec = Spec(types.SimpleNamespace(fn=fn), arch, {"x": "*fp64"}, {}, {}, {"num_warps": 4, "num_stages": 1},
                where="test", dtypes=set(dtypes))
    return spec


def _result(f64=0, shared=0):
    return {"error": None, "regs": 32, "spill": 0, "shared": shared, "has_dot": False, "tc": {}, "fma": 0,
            "f64": f64, "f64cvt": 0}


def test_float64_finding_exact_path_and_stale_entries(monkeypatch):
    import types

    from fastkd.kernels import resources
    module = types.ModuleType("fakepkg.relational")
    module.EXACT_FLOAT64_KERNELS = {"_exact_kernel", "_missing_kernel"}
    module._exact_kernel = types.SimpleNamespace(fn=lambda: None)
    monkeypatch.setitem(sys.modules, "fakepkg.relational", module)
    monkeypatch.setattr(resources, "RELATIONAL_MODULES", ("fakepkg.relational",))
    monkeypatch.setattr(resources, "EXPECTED", {})
    rel, other = "fakepkg.relational", "fakepkg.other"
    cases = [
        (_fake_spec(rel, "_f64_kernel", {"float32", "float64"}), _result(f64=12)),  # the finding
        (_fake_spec(rel, "_f64_only_kernel", {"float64"}), _result(f64=12)),  # float64 inputs: none
        (_fake_spec(rel, "_clean_kernel", {"bfloat16"}), _result(f64=0)),  # no float64 arithmetic
        (_fake_spec(rel, "_exact_kernel", {"float32"}), _result(f64=30)),  # declared exact
        (_fake_spec(other, "_f64_kernel", {"float32"}), _result(f64=12)),  # not a relational kernel
    ]
    specs, results = [c[0] for c in cases], [c[1] for c in cases]
    failures, tolerated = resources.problems(specs, results)
    assert len(failures) == 1 and "relational._f64_kernel" in failures[0], failures
    assert "12 float64 arithmetic instructions in a float32 specialization" in failures[0]
    assert tolerated == {}

    # In EXPECTED: tolerated; an entry whose finding does not occur is stale, in a complete run.
    monkeypatch.setattr(resources, "EXPECTED", {"relational._f64_kernel": {"float64": "why"},
                                                "relational._clean_kernel": {"float64": "why"},
                                                "relational._gone_kernel": {"float64": "why"}})
    failures, tolerated = resources.problems(specs, results)
    assert list(tolerated) == [("relational._f64_kernel", "float64")]
    assert len(failures) == 2 and all(f.startswith("stale EXPECTED entry") for f in failures), failures
    assert "relational._clean_kernel 'float64': no such finding" in failures[0]
    assert "relational._gone_kernel 'float64': no such kernel (not launched)" in failures[1]
    assert resources.problems(specs, results, complete=False)[0] == []
    assert resources.problems(specs, results, kernel_filter="_f64_")[0] == []

    # For one arch: "float64@sm_80" holds on sm_80 only; one for an arch that never has it is stale.
    monkeypatch.setattr(resources, "EXPECTED", {"relational._f64_kernel": {"float64@sm_80": "why",
                                                                           "float64@sm_86": "why"}})
    failures, tolerated = resources.problems(specs + [_fake_spec(rel, "_f64_kernel", {"float32"}, arch=90)],
                                             results + [_result(f64=12)])
    assert list(tolerated) == [("relational._f64_kernel", "float64@sm_80")]
    assert len(failures) == 2 and failures[0].startswith("sm_90 relational._f64_kernel"), failures
    assert failures[1].startswith("stale EXPECTED entry relational._f64_kernel 'float64@sm_86'")

    # A declaration naming no kernel of its module.
    errors = resources.declaration_errors(("fakepkg.relational",))
    assert errors == ["fakepkg.relational.EXACT_FLOAT64_KERNELS names '_missing_kernel': no @triton.jit kernel "
                      "of that name"]


def test_shared_memory_held_to_consumer_limit_from_sm80(monkeypatch):
    from fastkd.kernels import resources
    monkeypatch.setattr(resources, "EXPECTED", {})
    big = _fake_spec("fakepkg.other", "_big_kernel", {"float32"}, arch=80)
    rel86 = _fake_spec("fakepkg.relational", "_k", {"float32"}, arch=86)
    failures, _ = resources.problems([big, rel86], [_result(shared=120000), _result()], complete=False)
    assert len(failures) == 1 and "120000 bytes of shared memory > sm_86's 101376 (sm_80's compile)" in failures[0]
    assert resources.problems([big], [_result(shared=120000)], complete=False)[0] == []  # no sm_86 in the run
