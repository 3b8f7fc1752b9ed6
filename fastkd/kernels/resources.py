"""Compile every Triton kernel specialization fastkd launches for a CUDA target, without a GPU.

    python -m fastkd.kernels.resources --arch 90            # the resource table
    python -m fastkd.kernels.resources --check              # sm_90, sm_80, sm_89, sm_86 (ARCHS)

The interpreter (TRITON_INTERPRET=1, what the tests run on a CPU) checks neither the
compiler's typing rules nor registers, shared memory or grid limits. Here the losses run
forward and backward on "meta" tensors (shapes only, no memory) through the triton backend
while ``JITFunction.run`` is replaced by a recorder: every ``@triton.jit`` kernel the library
launches is seen, whatever its name, with the specialization Triton would build (argument
types, 16-divisibility, constexprs, num_warps/num_stages) and its grid. Each distinct
specialization is then compiled by Triton's own compiler and ptxas (shipped in the wheel)
for sm_XX; registers, spills and shared memory come from the cubin (cuobjdump).

Archs: sm_90 and sm_80 compile every specialization. sm_89 and sm_86 (Ada and consumer
Ampere: RTX 4090/3090, L4, A10, where float64 runs at 1/64 of float32's rate) compile the
relational kernels' float32/bfloat16/float16 specializations (RELATIONAL_MODULES: gram,
distance, angle, cosine, irg_transformation) at benchmark shapes, the question those parts
answer (registers, spills, a float64 tl.dot without DMMA); every other specialization's shared
memory is held to their limit (101376 bytes) from its sm_80 compile, Triton lowering 8.0, 8.6
and 8.9 alike but for a float64 tl.dot (--every-kernel compiles everything there too).

The PTX says what the code computes in: for each kernel with a tl.dot, the count of
tensor-core instructions (mma: sm_80's mma.sync, HMMA/DMMA in SASS; wgmma: sm_90's HGMMA), or
"FMA" where there are none, which fails the check in a float32/bfloat16/float16
specialization; and for every kernel the float64 arithmetic instructions (F64_ARITH on .f64:
add, sub, mul, fma, div, rcp, sqrt, min/max, setp, mma; conversions counted apart). A
relational kernel's float32/bfloat16/float16 specialization with float64 arithmetic fails the
check ("float64"), unless its module declares it an exact float64 path:

    EXACT_FLOAT64_KERNELS = {"_rkd_angle_exact_kernel"}  # in its module, with the reason

Known findings are listed in EXPECTED, kernel -> {finding: reason}, a finding for every arch
or for one ("spill@sm_86"); an entry whose finding no longer occurs fails the check (stale),
so the list stays exact.

Cost: Triton's passes, LLVM and ptxas, ~0.3 s of one core per specialization cold.
Specializations whose LLVM IR is the same (e.g. a 16-divisibility no access relies on) take
the first one's PTX and cubin. Compiles go through Triton's cache (~/.triton/cache or
TRITON_CACHE_DIR): a warm run takes tens of seconds. A machine without that cache (CI's clean
one) takes each specialization's recorded result from compile_results.json beside this file
where its key matches (RESULTS_FILE: the kernel's source as Triton's own cache key holds it,
the specialization, the arch, Triton's and ptxas's versions), and compiles the rest: after
changing a kernel, `--write-results` on a full run (every arch and dtype) records it.

Workloads: the kernel tests' kinds of shapes (odd sizes, channels_last and strided maps,
teacher gradients), the benchmark's full CUDA sweep, and the relational losses with
global_batch=True (the row-block specializations: a simulated rank, fastkd.bench.global_batch's
loopback group), in float32, bfloat16, float16 and float64.

Must run in a process where TRITON_INTERPRET is unset (kernels are then JITFunctions).
"""
import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
ARCHS = (90, 80, 89, 86)  # what --check compiles by default (and the test suite)
# Ada and consumer Ampere (RTX 4090/3090, L4, A10): float64 at 1/64 of float32's rate (1/2 on
# sm_80/sm_90). For these only the relational kernels' float32/bfloat16/float16
# specializations at benchmark shapes are compiled (--every-kernel: all), the question these
# archs answer: their registers and spills where float64 costs most, and their float64
# tl.dot, which has no DMMA there (Triton takes the FMA path). The rest is sm_80's answer:
# Triton lowers 8.0, 8.6 and 8.9 alike but for that float64 tl.dot (the same TTGIR in 40
# specializations sampled across kernels, and in all 56 of the 77 relational ones without a
# float64 tl.dot; sm_86 and sm_89 the same PTX in all 77), so every other specialization's
# shared memory is held to these archs' limit from its sm_80 compile (at most 48 KiB today,
# half the limit); only ptxas's registers differ, and a spill is judged at benchmark shapes.
CONSUMER_ARCHS = (89, 86)
# Largest dynamic shared memory per block (opt-in): the SM's shared memory less the 1 KiB
# the driver reserves per block (NVIDIA CCCL's arch traits; CUDA programming guide: 227, 163,
# 99 and 99 KB). Grid limits on CUDA.
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)

# The relational O(N^2 D) / O(N^3) kernels' modules: a float32/bfloat16/float16
# specialization of one of their kernels that does float64 arithmetic fails the check
# ("float64"), unless the module declares the kernel an exact float64 path by name in
# EXACT_FLOAT64_KERNELS, a module-level set of kernel names with the reason beside it:
#     EXACT_FLOAT64_KERNELS = {"_rkd_angle_exact_kernel"}  # the exact path: float64 on purpose
RELATIONAL_MODULES = tuple(f"{__package__}.{m}" for m in ("gram", "distance", "angle", "cosine",
                                                          "irg_transformation"))
EXACT_DECLARATION = "EXACT_FLOAT64_KERNELS"

# Kernels whose findings are known and accepted: name -> {finding: reason}, findings among
# "compile", "spill", "shared", "grid", "fma", "float64", each for every arch or for one
# ("spill@sm_86"). An entry whose finding no longer occurs fails the check (stale) when the
# run covers every arch of ARCHS and every dtype, so the list says exactly what remains.
EXPECTED = {}


@dataclasses.dataclass
class Spec:
    """One distinct compile: a kernel at one specialization for one arch."""
    kernel: object  # the JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: list = dataclasses.field(default_factory=lambda: [1, 1, 1])  # the largest per dimension
    dtypes: set = dataclasses.field(default_factory=set)
    bench: bool = False  # launched by a benchmark-sweep workload
    where: str = ""  # one workload that launched it

    @property
    def name(self):
        """module.kernel, e.g. softmax_kl._softmax_kl_forward_kernel (names repeat across modules)."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    @property
    def relational(self):
        """A kernel of RELATIONAL_MODULES."""
        return self.kernel.fn.__module__ in RELATIONAL_MODULES

    @property
    def low_precision(self):
        """Launched by a float32, bfloat16 or float16 workload (its arguments may still be float64)."""
        return bool(self.dtypes - {"float64"})

    @property
    def exact_float64(self):
        """Declared an exact float64 path by its module (EXACT_FLOAT64_KERNELS)."""
        module = sys.modules.get(self.kernel.fn.__module__)
        return self.kernel.fn.__name__ in getattr(module, EXACT_DECLARATION, ())

    def label(self):
        """The specialization in short: argument types (D = 16-divisible) and constexprs."""
        parts = []
        for i, (n, ty) in enumerate(self.signature.items()):
            if ty == "constexpr":
                v = self.constexprs.get((i,))
                parts.append(f"{n}={getattr(v, '__name__', v)}")
            else:
                div = bool(self.attrs.get((i,)))  # [["tt.divisibility", 16]] or []
                parts.append(f"{n}:{ty}{'/D' if div else ''}")
        return " ".join(parts) + f" w{self.options['num_warps']}s{self.options['num_stages']}"


# --- recording --------------------------------------------------------------------------

def _layout(x, layout):
    """The tests' map layouts applied to a 4-d input: channels_last, or every other channel."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or layout == "contiguous":
        return x
    grad = x.requires_grad
    x = x.detach()
    if layout == "channels_last":
        y = x.contiguous(memory_format=torch.channels_last)
    else:
        y = torch.empty((x.shape[0], 2 * x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)[:, ::2]
    return y.requires_grad_(grad)


def _map_inputs(inputs, fn):
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_map_inputs(x, fn) for x in inputs)
    return fn(inputs)


def _teacher_grad(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.is_leaf and not x.requires_grad:
        return x.requires_grad_()
    return x


# The kernel tests' kinds of shapes: odd sizes, trailing class dims, several layouts.
_TEST_TABLES = {
    "_LOGITS": [(5, 33), (37, 13), (3, 5)],
    "_MAPS": [[(3, 37, 17, 19), (3, 5, 5, 3)], [(2, 30, 4, 6), (2, 25, 2, 3)]],
    "_PAIRWISE": ([2, 7, 33], 9),
    "_CRD": ([3, 5], (10, 19, 40, 7, 9)),
    "_NET": ([3], 6, 5),
}


def _workloads():
    """(label, bench, cases-kwargs, table patches, layouts, teacher grads) per group: the
    tests' kinds of shapes (the tiny sweep's cases at _TEST_TABLES), then the full CUDA sweep."""
    test_patch = {name: {"tiny": value} for name, value in _TEST_TABLES.items()}
    yield "test", False, dict(sweep="tiny", device_type="cpu"), test_patch, ("contiguous", "channels_last",
                                                                            "strided"), (False, True)
    yield "bench", True, dict(sweep="full", device_type="cuda"), {}, ("contiguous",), (False,)


def _extra_calls(dtype):
    """Launches the cases do not make: logits with trailing dims and strided classes."""
    from .. import functional as F
    meta = torch.device("meta")
    s = torch.empty((2, 7, 37, 3), device=meta, dtype=dtype, requires_grad=True)
    t = torch.empty((2, 7, 37, 3), device=meta, dtype=dtype, requires_grad=True)
    yield lambda: F.soft_target(s, t, 4.0)
    s2 = torch.empty((40, 6), device=meta, dtype=dtype).t().requires_grad_()
    t2 = torch.empty((6, 80), device=meta, dtype=dtype)[:, ::2].requires_grad_()
    yield lambda: F.dml(s2, t2)
    # FusedLinearSoftTarget's other specializations: the hard term, and a top-k teacher.
    h = torch.empty((37, 16), device=meta, dtype=dtype, requires_grad=True)
    W = torch.empty((50, 16), device=meta, dtype=dtype, requires_grad=True)
    labels = torch.empty((37,), device=meta, dtype=torch.long)
    yield lambda: F.fused_linear_soft_target(h, W, labels=labels, teacher_logits=torch.empty((37, 50), device=meta,
                                             dtype=dtype), hard_weight=0.5, chunk_size=8)
    yield lambda: F.fused_linear_soft_target(h, W, teacher_topk_indices=torch.empty((37, 5), device=meta,
                                             dtype=torch.long),
                                             teacher_topk_logprobs=torch.empty((37, 5), device=meta, dtype=dtype))
    # FusedLinearDistillation's divergence kernel: one specialization per divergence ("kl" is
    # FusedLinearSoftTarget's, above), with the hard term.
    for divergence in F.DIVERGENCES:
        if divergence != "kl":
            yield lambda divergence=divergence: F.fused_linear_distillation(
                h, W, labels=labels, teacher_logits=torch.empty((37, 50), device=meta, dtype=dtype),
                divergence=divergence, T=2.0, hard_weight=0.5, chunk_size=8)


# Global batch: (world, rank, local batch, feature dim) of the simulated ranks, the last
# rank of each world (a row offset past 0): one of the kernel tests' kind of sizes and one of
# the benchmark's.
_GLOBAL = [(3, 2, 5, 33), (4, 3, 256, 512)]


def _global_calls(dtype):
    """Forward and backward of each relational loss with global_batch=True, as rank `rank` of
    `world` over a loopback group (fastkd.bench.global_batch), on meta tensors."""
    from .. import distributed
    from ..bench import global_batch
    for world, rank, n, d in _GLOBAL:
        for loss in ("RKD", "SP", "PKT", "CC", "IRG"):
            case = global_batch.spec(loss, n, d, torch.device("meta"), dtype, None)

            def call(case=case, world=world, rank=rank):
                # Meta tensors hold no sizes to gather: every rank holds n rows.
                with global_batch.simulated_rank(rank, world), \
                        mock.patch.object(distributed, "batch_sizes", lambda m, device, group=None: [m] * world):
                    module, _ = case.build()
                    module(*case.inputs(torch.device("meta"), dtype, None)).backward()
            yield f"global {loss} rank {rank} of {world}, {n} x {d}", n >= 64, call


class Recorder:
    """Stands in for JITFunction.run: keeps the specializations and grids, launches nothing."""

    def __init__(self, archs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.backends = {a: make_backend(GPUTarget("cuda", a, 32)) for a in archs}
        self.specs = {}
        self.context = ("", False, "")  # workload, bench, dtype name
        self.binders = {}

    def run(self, kernel, *args, grid, warmup, **kwargs):
        from triton.runtime.jit import create_function_from_signature
        where, bench, dtype = self.context
        for arch, backend in self.backends.items():
            key = (kernel, arch)
            if key not in self.binders:
                self.binders[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = self.binders[key](*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                                      options)
            g = grid(bound) if callable(grid) else grid
            g = [int(x) for x in (*g, 1, 1)[:3]]
            ident = (kernel, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                     repr(sorted(attrs.items())), options.num_warps, options.num_stages)
            spec = self.specs.get(ident)
            if spec is None:
                spec = self.specs[ident] = Spec(kernel, arch, signature, constexprs, attrs,
                                                dict(options.__dict__), where=where)
            spec.grid = [max(a, b) for a, b in zip(spec.grid, g)]
            spec.dtypes.add(dtype)
            spec.bench |= bench
        return None


def record(archs=ARCHS, dtypes=tuple(DTYPES), every_kernel=False):
    """Run every workload on meta tensors; the distinct specializations (list of Spec) and the
    workloads' errors. For CONSUMER_ARCHS only the relational kernels' float32/bfloat16/float16
    specializations at benchmark shapes, unless every_kernel."""
    import triton.runtime.jit as jit
    from .. import backend as fkd_backend
    from .. import modules
    from ..bench import cases
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: the interpreter does not compile kernels")
    rec = Recorder(archs)
    meta = torch.device("meta")
    errors = []

    def patched_run(kernel, *args, grid, warmup, **kwargs):
        return rec.run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(jit.JITFunction, "run", patched_run))
        stack.enter_context(mock.patch.object(fkd_backend, "triton_runs_on", lambda device: True))
        stack.enter_context(fkd_backend.use_backend("triton"))
        # CRD's one host sync, on purpose: its finiteness check before the memory update.
        stack.enter_context(mock.patch.object(modules, "_all_true", lambda flag: True))
        for label, bench, kwargs, patches, layouts, teacher_grads in _workloads():
            with contextlib.ExitStack() as tables:
                for name, value in patches.items():
                    tables.enter_context(mock.patch.dict(getattr(cases, name), value))
                todo = cases.cases(**kwargs, losses=cases.LOSSES)
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for case in todo:
                    # Sobolev's and LwM's inputs come out of a network: relaid inputs would not be its.
                    for layout in layouts if case.floor else ("contiguous",):
                        for teacher in teacher_grads:
                            rec.context = (f"{label} {case.name} {layout}{' +teacher' if teacher else ''}",
                                           bench, dtype_name)
                            try:
                                module = case.build("fastkd", meta, dtype)
                                inputs = _map_inputs(case.inputs(meta, dtype, None),
                                                     lambda x: _layout(x, layout))
                                if teacher:
                                    inputs = _map_inputs(inputs, _teacher_grad)
                                module(*inputs).backward()
                            except Exception as e:  # noqa: BLE001 - reported, and fails --check
                                errors.append(f"{rec.context[0]} {dtype_name}: {type(e).__name__}: {e}")
                if label == "test":
                    for call in _extra_calls(dtype):
                        rec.context = ("test logits (2, 7, 37, 3) / strided / LM head", False, dtype_name)
                        call().backward()
                    for where, at_bench, call in _global_calls(dtype):
                        rec.context = (where, at_bench, dtype_name)
                        try:
                            call()
                        except Exception as e:  # noqa: BLE001 - reported, and fails --check
                            errors.append(f"{where} {dtype_name}: {type(e).__name__}: {e}")
    specs = [s for s in rec.specs.values()
             if every_kernel or s.arch not in CONSUMER_ARCHS or (s.relational and s.low_precision and s.bench)]
    return specs, errors


# --- compiling --------------------------------------------------------------------------

_SPECS = []  # for the forked compile workers


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin):
    """Registers, stack, shared and local memory from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


# PTX instructions of the tensor cores' matrix products: mma.sync (sm_80's HMMA on
# tf32/bf16/fp16 operands, DMMA on fp64) and wgmma.mma_async (sm_90's HGMMA). ptxas turns each
# into its tensor-core SASS and never into FMAs, so the PTX, which the compile already holds,
# says where a tl.dot's products go without disassembling the cubin. A kernel with a tl.dot
# and none of them forms its products with fma.rn (FFMA/DFMA).
TENSOR_CORE_OPS = ("mma", "wgmma")
# float64 arithmetic: the PTX opcodes on .f64 that run on the FP64 units (DADD, DMUL, DFMA,
# DSETP, DMNMX, and DMMA for mma; div, rcp, sqrt and rsqrt expand into DFMA sequences around
# an MUFU seed), 1/64 of the float32 rate on sm_86/sm_89. Not counted: neg and abs (a sign
# bit: an operand modifier or an integer op in SASS), selp, mov, ld, st (no arithmetic) and
# atom/red (the memory system's). Conversions to or from .f64 (cvt: reading or writing a
# float64 value, not computing in it) are counted apart. Static counts: a loop's body once.
F64_ARITH = ("add", "sub", "mul", "fma", "mad", "div", "rcp", "sqrt", "rsqrt", "min", "max", "setp", "testp",
             "mma")
_PTX_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_]*)((?:\.[A-Za-z0-9_]+)*)[\s;]", re.M)


def _ptx_ops(ptx):
    """Static counts of the PTX's tensor-core products (mma, wgmma), FMAs (fma, any type),
    float64 arithmetic (f64, F64_ARITH on .f64) and conversions to or from float64 (f64cvt)."""
    counts = {}
    for op, suffix in _PTX_INSTR.findall(ptx):
        types = suffix.split(".")
        names = []
        if op == "mma" and types[1:2] == ["sync"]:
            names.append("mma")
        elif op == "wgmma" and types[1:2] == ["mma_async"]:
            names.append("wgmma")
        if op == "fma" and types[1:2] == ["rn"]:
            names.append("fma")
        if "f64" in types:
            if op in F64_ARITH:
                names.append("f64")
            elif op == "cvt":
                names.append("f64cvt")
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


# Specializations that compile to the same code: those that differ only where the LLVM IR does
# not (e.g. a 16-divisibility no access relies on) give the same PTX and cubin; the compile
# takes each from the first (Triton's cache, keyed by the output's input text, arch and
# options) rather than running LLVM's code generation and ptxas again.
_MEMO_STAGES = ("ptx", "cubin")
_memo_hits = []


def _memo_stages(*args):
    """knobs.runtime.add_stages_inspection_hook: wraps the ptx and cubin stages."""
    if not args:  # compile() asks for a cache-key suffix: the outputs are the same, none
        return "", ""
    backend, stages, options, _language, _capability = args
    for ext in _MEMO_STAGES:
        stages[ext] = _memoized(ext, stages[ext], backend, options)


def _memoized(ext, stage, backend, options):
    import hashlib

    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_manager
    # What else decides the output, as in Triton's own key: its version (LLVM's), ptxas's
    # version and the arch (backend.hash()), the environment variables that change code.
    salt = repr(("fastkd stage", ext, triton.__version__, backend.hash(), sorted(options.__dict__.items()),
                 sorted(get_cache_invalidating_env_vars().items())))

    def run(src, metadata):
        key = hashlib.sha256(salt.encode() + src.encode()).hexdigest()
        cache = get_cache_manager(key)
        path = cache.get_file("out." + ext)
        if path is not None:
            with open(path, "rb") as f:
                out = f.read()
            _memo_hits.append(ext)
            if ext == "ptx":
                out = out.decode()
                metadata["name"] = re.findall(r".visible .entry ([a-zA-Z_][a-zA-Z0-9_]*)", out)[0]
            return out
        out = stage(src, metadata)
        cache.put(out, "out." + ext)
        return out
    return run


def _compile(i):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    spec = _SPECS[i]
    del _memo_hits[:]
    start = _cpu_seconds()
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        with knobs.runtime.scope():
            knobs.runtime.add_stages_inspection_hook = _memo_stages
            compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=spec.options)
    except Exception as e:  # noqa: BLE001 - a compile error is a finding
        # The first line gives the kernel line and column, the last the cause.
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        where_why = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
        return {"error": f"{type(e).__name__}: {where_why}"[:400]}
    usage = _cuobjdump(compiled.asm["cubin"])
    has_dot = "tt.dot" in str(compiled.asm.get("ttir", ""))
    ops = _ptx_ops(str(compiled.asm.get("ptx", "")))
    # Where the products go, for the kernels that have a tl.dot: the tensor-core instructions
    # by opcode (e.g. {"mma": 48}), empty where they all became FMAs.
    tc = {op: n for op, n in ops.items() if op in TENSOR_CORE_OPS} if has_dot else {}
    # Spilled registers live on the stack: a Triton kernel has no other use for it.
    return {"error": None, "regs": usage.get("REG", 0), "spill": usage.get("STACK", 0),
            "shared": max(compiled.metadata.shared, usage.get("SHARED", 0)), "has_dot": has_dot,
            "tc": tc, "fma": ops.get("fma", 0), "f64": ops.get("f64", 0), "f64cvt": ops.get("f64cvt", 0),
            "reused": "cubin" in _memo_hits, "cpu": _cpu_seconds() - start}


def _cpu_seconds():
    """CPU time of this process and its waited-for children (ptxas, cuobjdump)."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _dot_cell(res):
    """How the kernel's tl.dot products were lowered: tensor-core opcodes and counts
    (mma:48), "FMA" where none, "-" without a tl.dot."""
    if not res["has_dot"]:
        return "-"
    return ",".join(f"{op}:{n}" for op, n in sorted(res["tc"].items())) or "FMA"


# Results of earlier compiles, committed beside this module: a specialization whose key holds
# everything that decides its compile (its kernel's source with its dependencies, as Triton's
# own cache key; its signature, constexprs, attributes and options; the arch; Triton's and
# ptxas's versions; the environment variables that change code) takes its recorded result
# instead of compiling again, as Triton's on-disk cache would, on a machine that has none.
# A changed kernel changes its keys and compiles; `--write-results` records a full run.
RESULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_results.json")


def result_key(spec, backend_hash):
    """The key of one specialization's compile (see RESULTS_FILE); backend_hash: its arch's
    make_backend(...).hash() (ptxas's version and the arch)."""
    import hashlib

    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    # Paths (libdevice's) differ between installs; the file's name is what the compile depends on.
    options = sorted((k, tuple((name, os.path.basename(path)) for name, path in v) if k == "extern_libs" else v)
                     for k, v in spec.options.items())
    held = (spec.kernel.cache_key, sorted(spec.signature.items()), sorted(spec.constexprs.items()),
            sorted(spec.attrs.items()), options, spec.arch, triton.__version__, backend_hash,
            sorted(get_cache_invalidating_env_vars().items()))
    return hashlib.sha256(repr(held).encode()).hexdigest()[:32]


def _keys(specs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    hashes = {arch: make_backend(GPUTarget("cuda", arch, 32)).hash() for arch in {s.arch for s in specs}}
    return [result_key(spec, hashes[spec.arch]) for spec in specs]


def load_results(path=RESULTS_FILE):
    """{key: result} recorded by --write-results, {} where there is no file."""
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def write_results(specs, results, path=RESULTS_FILE):
    """Record this run's results by key (the file holds this run's only)."""
    import json
    kept = {key: {k: v for k, v in res.items() if k not in ("cpu", "reused")}
            for key, res in zip(_keys(specs), results)}
    with open(path, "w") as f:
        json.dump(kept, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")


def compile_all(specs, jobs=None, recorded=None):
    """Compile each spec; a list of result dicts (error, regs, spill, shared, has_dot, tc, fma,
    f64, f64cvt, reused; recorded: taken from `recorded`, {key: result}, instead of compiling)
    in order."""
    global _SPECS
    keys = _keys(specs) if recorded else [None] * len(specs)
    results = [dict(recorded[k], recorded=True) if recorded and k in recorded else None for k in keys]
    todo = [spec for spec, res in zip(specs, results) if res is None]
    _SPECS = todo
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(todo) < 2:
        fresh = [_compile(i) for i in range(len(todo))]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            fresh = pool.map(_compile, range(len(todo)), chunksize=1)
    fresh = iter(fresh)
    return [res if res is not None else next(fresh) for res in results]


def _twin(spec):
    """The specialization apart from its arch."""
    return (spec.name, repr(sorted(spec.signature.items())), repr(sorted(spec.constexprs.items())),
            repr(sorted(spec.attrs.items())), spec.options["num_warps"], spec.options["num_stages"])


def declaration_errors(modules=RELATIONAL_MODULES):
    """EXACT_FLOAT64_KERNELS entries that name no @triton.jit kernel of their module."""
    import importlib
    errors = []
    for name in modules:
        module = importlib.import_module(name)
        for kernel in sorted(getattr(module, EXACT_DECLARATION, ())):
            if getattr(getattr(module, kernel, None), "fn", None) is None:  # a JITFunction has .fn
                errors.append(f"{name}.{EXACT_DECLARATION} names {kernel!r}: no @triton.jit kernel of that name")
    return errors


def problems(specs, results, complete=True, kernel_filter=None):
    """(failures, tolerated): failures a list of strings; tolerated {(kernel, finding): lines}.

    complete: the run covers every arch of ARCHS and every dtype, so an EXPECTED finding that
    does not occur is stale (a failure); kernel_filter: the --kernel pattern the specs were
    chosen by (an EXPECTED kernel it excludes is not judged)."""
    failures, tolerated, seen = [], {}, set()
    archs = {spec.arch for spec in specs}
    # Kernels not compiled for a consumer arch: their sm_80 compile's shared memory against its limit.
    compiled_for = {(_twin(spec), spec.arch) for spec in specs}
    for spec, res in zip(specs, results):
        allowed = EXPECTED.get(spec.name, {})
        found = []
        if res["error"]:
            found.append(("compile", res["error"]))
        else:
            fp64_only = spec.dtypes == {"float64"}
            if res["spill"] and spec.bench and not fp64_only:
                found.append(("spill", f"{res['spill']} bytes spilled at benchmark shapes"))
            if res["shared"] > SHARED_LIMIT[spec.arch]:
                found.append(("shared", f"{res['shared']} bytes of shared memory"))
            if spec.arch == 80:
                for arch in sorted(archs & set(CONSUMER_ARCHS)):
                    if (_twin(spec), arch) not in compiled_for and res["shared"] > SHARED_LIMIT[arch]:
                        found.append(("shared", f"{res['shared']} bytes of shared memory > sm_{arch}'s "
                                                f"{SHARED_LIMIT[arch]} (sm_80's compile)"))
            if res["has_dot"] and not res["tc"] and not fp64_only:
                found.append(("fma", f"tl.dot on FMA only ({res['fma']} FFMA/DFMA, no tensor-core instruction)"))
            if res["f64"] and spec.relational and spec.low_precision and not spec.exact_float64:
                found.append(("float64", f"{res['f64']} float64 arithmetic instructions in a "
                                         f"{'/'.join(sorted(spec.dtypes - {'float64'}))} specialization"))
        for dim, (n, limit) in enumerate(zip(spec.grid, GRID_LIMIT)):
            if n > limit:
                found.append(("grid", f"grid dim {dim} = {n} > {limit}"))
        for kind, what in found:
            line = f"sm_{spec.arch} {spec.name} [{spec.where}, {'/'.join(sorted(spec.dtypes))}]: {what}"
            key = next((k for k in (kind, f"{kind}@sm_{spec.arch}") if k in allowed), None)
            if key is not None:
                tolerated.setdefault((spec.name, key), []).append(line)
                seen.add((spec.name, key))
            else:
                failures.append(line)
    if complete:
        launched = {spec.name for spec in specs}
        for name, kinds in sorted(EXPECTED.items()):
            if kernel_filter and not re.search(kernel_filter, name):
                continue
            for kind in sorted(kinds):
                if (name, kind) not in seen:
                    why = "finding" if name in launched else "kernel (not launched)"
                    failures.append(f"stale EXPECTED entry {name} {kind!r}: no such {why} any more; "
                                    f"remove it from EXPECTED in fastkd/kernels/resources.py")
    return failures, tolerated


def table(specs, results):
    rows = [("arch", "kernel", "dtypes", "regs", "spill B", "smem B", "tensor cores", "f64 ops", "f64 cvt",
             "grid max", "specialization")]
    order = sorted(range(len(specs)), key=lambda i: (specs[i].arch, specs[i].name, specs[i].label()))
    for i in order:
        spec, res = specs[i], results[i]
        dts = ",".join(sorted(d.replace("float", "f").replace("bf16", "bf16") for d in spec.dtypes))
        grid = "x".join(str(n) for n in spec.grid)
        if res["error"]:
            rows.append((f"sm_{spec.arch}", spec.name, dts, "-", "-", "-", "-", "-", "-", grid,
                         "ERROR " + res["error"]))
        else:
            rows.append((f"sm_{spec.arch}", spec.name, dts, str(res["regs"]), str(res["spill"]),
                         str(res["shared"]), _dot_cell(res), str(res["f64"]), str(res["f64cvt"]), grid,
                         spec.label()))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def _summary(specs, results, tolerated):
    """Specializations per arch (reused: PTX and cubin from an identical one) and each
    tolerated (kernel, finding) in one line, with the float64 counts where that is the finding."""
    lines = []
    for arch in sorted({s.arch for s in specs}, reverse=True):
        mine = [r for s, r in zip(specs, results) if s.arch == arch]
        reused = sum(1 for r in mine if r.get("reused"))
        cpu = sum(r.get("cpu", 0.0) for r in mine)
        lines.append(f"  sm_{arch}: {len(mine)} specializations ({reused} reused an identical one's PTX and "
                     f"cubin), {cpu:.0f} s of CPU")
    f64 = {}
    for spec, res in zip(specs, results):
        if not res["error"]:
            f64.setdefault((spec.name, "float64"), []).append((spec.arch, res["f64"]))
    for (name, kind), found in sorted(tolerated.items()):
        archs = "/".join(f"sm_{a}" for a in sorted({int(line.split()[0][3:]) for line in found}))
        extra = ""
        if kind == "float64":
            counts = [n for _, n in f64[(name, kind)] if n]
            extra = f", {min(counts)}-{max(counts)} float64 ops each"
        lines.append(f"  expected: {name} {kind} ({len(found)} specializations on {archs}{extra}): "
                     f"{EXPECTED[name][kind]}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastkd.kernels.resources", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="CUDA compute capability x10 (repeat for several); default 90, or all of "
                             f"{', '.join(map(str, ARCHS))} with --check")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: all four")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile error, a spill at benchmark shapes (fp32/bf16/fp16), "
                             "shared memory or a grid dimension beyond the device's limit, a tl.dot "
                             "whose fp32/bf16/fp16 products reach no tensor core, float64 arithmetic in "
                             "a relational kernel's fp32/bf16/fp16 specialization, or a stale EXPECTED entry")
    parser.add_argument("--every-kernel", action="store_true",
                        help=f"compile every kernel for sm_{'/sm_'.join(map(str, CONSUMER_ARCHS))} too, not "
                             "only the relational kernels' fp32/bf16/fp16 specializations")
    parser.add_argument("--kernel", help="only kernels whose name matches this regular expression")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--fresh", action="store_true",
                        help=f"compile every specialization, not taking recorded results ({os.path.basename(RESULTS_FILE)})")
    parser.add_argument("--write-results", action="store_true",
                        help=f"record this run's results in {os.path.basename(RESULTS_FILE)} (a full run: every arch "
                             "and dtype, no --kernel)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or (ARCHS if args.check else [90]))
    dtypes = tuple(args.dtype or DTYPES)
    start = _cpu_seconds()
    specs, errors = record(archs, dtypes, args.every_kernel)
    recording = _cpu_seconds() - start
    if args.kernel:
        specs = [s for s in specs if re.search(args.kernel, s.name)]
    results = compile_all(specs, args.jobs, recorded=None if args.fresh else load_results())
    if not args.no_table:
        print(table(specs, results))
    complete = set(archs) >= set(ARCHS) and set(dtypes) == set(DTYPES)
    failures, tolerated = problems(specs, results, complete, args.kernel)
    failures = errors + declaration_errors() + failures
    compiled = sum(1 for r in results if not r["error"])
    recorded = sum(1 for r in results if r.get("recorded"))
    print(f"\n{compiled} of {len(specs)} specializations compiled ({recorded} of them recorded results, "
          f"{os.path.basename(RESULTS_FILE)}); {len(failures)} failures, "
          f"{sum(map(len, tolerated.values()))} expected (EXPECTED in fastkd/kernels/resources.py)")
    if args.write_results:
        if not complete or args.kernel:
            print("  --write-results: not a full run (every arch and dtype, no --kernel); nothing written")
        else:
            write_results(specs, results)
    print(f"  recording the launches: {recording:.0f} s of CPU")
    for line in _summary(specs, results, tolerated):
        print(line)
    for line in failures:
        print("  FAIL:", line)
    sys.stdout.flush()
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
