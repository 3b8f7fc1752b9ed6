"""Running one case: each variant's forward+backward time and peak memory.

Variants (VARIANTS): ``eager`` the reference module, ``compile`` the reference
module under torch.compile, ``fastkd`` the fastkd module under the ``auto``
backend; on request, ``fastkd-compile`` that under torch.compile (on CUDA, the losses'
custom operators of fastkd.device_ops; on the CPU, the torch path traced), and
``fastkd-graphs`` under torch.compile(mode="reduce-overhead") (CUDA graphs on CUDA). A variant is a
function (case, device, dtype) -> (step, module): step(*inputs) returns the loss, module
is what holds the parameters.

Per case (run_case):
1. Each variant alone: build, warm up (compiling, for ``compile``), then up to
   three calls that measure its peak memory (the least is kept). A variant that
   runs out of memory is reported "out of memory"; a compile error "compile
   failed"; a call slower than max_call_s "too slow". None of these stops the
   benchmark.
2. The variants that passed are timed interleaved, so that machine drift hits
   all alike, in an order where each variant follows each other one equally
   often (balanced_order): a call pays for what ran just before it (on a CPU a
   compiled call leaves the next call some 14 us slower at the collection's
   smallest shapes), so a plain rotation, where with three variants one follows
   the compiled one twice as often as another does, would bias the ratios. Each
   call on fresh inputs made outside the timed region, until the time budget or
   the maximum repetitions; the median is reported.

Time: CUDA events around the call on GPU (after a 256 MiB write that flushes
the L2 cache); time.perf_counter on CPU.
Peak memory, minus the inputs:
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
        minus memory_allocated() once the inputs exist.
  CPU   the process's peak resident set (VmHWM in /proc/self/status, reset by
        writing 5 to /proc/self/clear_refs) minus its resident set once the
        inputs exist, after glibc's malloc_trim so freed memory is not counted
        as held, and with glibc returning every freed block of 64 KiB or more
        to the OS during that call (mallopt), so the resident set follows what
        is allocated. Linux only; elsewhere peak memory is not reported. It is
        good to a few MiB or about 10% (page-level effects): read big ratios,
        not small ones.
Memory cap: on CPU the process's address space is limited (RLIMIT_AS) to its
size at the start of the case plus max_memory, so a variant that would need
more fails its allocation (reported "out of memory") instead of making the
machine swap or the kernel kill the process; on CUDA the allocator is capped
with torch.cuda.set_per_process_memory_fraction.
"""
import concurrent.futures
import contextlib
import ctypes
import gc
import math
import os
import statistics
import time

import torch

from .. import backend

VARIANT_NAMES = ("eager", "compile", "fastkd")

OK = "ok"
OOM = "out of memory"
COMPILE_FAILED = "compile failed"
TOO_SLOW = "too slow"
FAILED = "failed"


def eager(case, device, dtype):
    module = case.build("reference", device, dtype)
    return module, module


def compiled(case, device, dtype):
    module = case.build("reference", device, dtype)
    return torch.compile(module), module


def fastkd_auto(case, device, dtype):
    """The fastkd module, called as a user calls it: run_case runs every variant inside
    use_backend("auto"), so no variant pays for entering the block on each call."""
    module = case.build("fastkd", device, dtype)
    return module, module


def fastkd_compiled(case, device, dtype):
    module = case.build("fastkd", device, dtype)
    return torch.compile(module), module


def fastkd_graphs(case, device, dtype):
    """fastkd under torch.compile(mode="reduce-overhead"): on CUDA the compiled call replayed
    as a CUDA graph, one launch for the whole forward (and one for the backward)."""
    module = case.build("fastkd", device, dtype)
    return torch.compile(module, mode="reduce-overhead"), module


def _liger_beta(case):
    """Liger-Kernel's jsd_beta for an LM-head case its fused linear JSD holds (beta = 0 and 1
    its forward and reverse KL, as TRL's), None for another."""
    if case.loss == "FusedLinearSoftTarget":
        return 0.0
    if case.loss == "FusedLinearDistillation":
        return {"kl": 0.0, "reverse_kl": 1.0, "jsd": case.kwargs["beta"]}.get(case.args[0])
    return None


def liger(case, device, dtype):
    """Liger-Kernel's counterpart, where it has one: its fused linear JSD (with its own
    reduction) for FusedLinearSoftTarget (beta = 0, a KL at temperature T) and for
    FusedLinearDistillation's kl, reverse_kl and jsd; its JSD on the log-probabilities at the
    temperature for generalized_jsd_loss. The time and memory of another implementation,
    not always the same numbers."""
    if case.loss == "generalized_jsd_loss":
        from liger_kernel.ops.jsd import LigerJSDFunction
        beta, temperature = case.kwargs["beta"], case.kwargs["temperature"]

        def step(student_logits, teacher_logits, labels):
            v = student_logits.shape[-1]
            log_q = torch.log_softmax(student_logits.reshape(-1, v) / temperature, -1)
            log_p = torch.log_softmax(teacher_logits.reshape(-1, v) / temperature, -1)
            return LigerJSDFunction.apply(log_q, log_p, labels.reshape(-1), beta, -100)
        return step, torch.nn.Module()
    beta = _liger_beta(case)
    if beta is None:
        raise ValueError(f"the liger variant runs FusedLinearSoftTarget, FusedLinearDistillation's kl, reverse_kl "
                         f"and jsd, and generalized_jsd_loss (Liger-Kernel has no fused op for {case.name})")
    from liger_kernel.transformers import LigerFusedLinearJSD
    T = case.args[0] if case.loss == "FusedLinearSoftTarget" else case.kwargs["T"]
    module = LigerFusedLinearJSD(jsd_beta=beta, temperature=T)

    def step(student_hidden, student_weight, teacher_hidden, teacher_weight):  # no labels
        return module(student_hidden, student_weight, teacher_hidden, teacher_weight, None)
    return step, module


VARIANTS = {"eager": eager, "compile": compiled, "fastkd": fastkd_auto, "fastkd-compile": fastkd_compiled,
            "fastkd-graphs": fastkd_graphs, "liger": liger}
COMPILED = ("compile", "fastkd-compile", "fastkd-graphs")  # the variants under torch.compile


def warm_compiler(device):
    """Before the first torch.compile on the CPU: probe the CPU's vector instruction sets for
    inductor in parallel threads. Each probe compiles and loads a test program; one after
    another they take about 8 s of the first compile on 2 cores from an empty cache, and
    their result is kept for the process. Best effort: it reaches into torch's internals,
    which vary by release, and does nothing where they differ."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor import cpu_vec_isa
        flags = cpu_vec_isa.x86_isa_checker()
        isas = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        if isas:
            with concurrent.futures.ThreadPoolExecutor(len(isas)) as pool:
                list(pool.map(bool, isas))
    except Exception:  # noqa: BLE001 - the first compile then probes them itself
        pass


def is_out_of_memory(err):
    """True for an allocation failure: CUDA's OutOfMemoryError, MemoryError, or the CPU
    allocator's error (also when wrapped, e.g. by torch.compile)."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError,
                                  MemoryError) if t is not None)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, oom_types):
            return True
        text = str(err).lower()
        if isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                              or "out of memory" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


# --- process memory (CPU) ----------------------------------------------------------

def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def cpu_memory_supported():
    """Peak RSS can be reset and read (Linux with /proc/self/clear_refs writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _release_freed():
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextlib.contextmanager
def _exact_rss():
    """While measuring memory, glibc hands every freed block of 64 KiB or more back to the
    OS, so the resident set follows what is allocated. Afterwards the thresholds are those
    that glibc's own adjustment settles at once big blocks have been freed (32 MiB, 64 MiB),
    the same for every variant's timing."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 64 * 2 ** 10)
    mallopt(_M_TRIM_THRESHOLD, 128 * 2 ** 10)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)
        mallopt(_M_TRIM_THRESHOLD, 64 * 2 ** 20)


@contextlib.contextmanager
def memory_cap(device, max_bytes):
    """Limit what the block may allocate to about max_bytes (see the module docstring)."""
    if max_bytes is None or device.type != "cpu" or not os.path.exists("/proc/self/status"):
        yield
        return
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_bytes("VmSize") + int(max_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- one call -----------------------------------------------------------------------

class Runner:
    """Fresh inputs, one timed call, one memory-measured call, for a case on a device."""

    def __init__(self, case, device, dtype, seed=0):
        self.case, self.device, self.dtype = case, device, dtype
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.flush = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device) if device.type == "cuda" else None
        self.cpu_memory = device.type == "cpu" and cpu_memory_supported()

    def inputs(self):
        with torch.enable_grad():
            return self.case.inputs(self.device, self.dtype, self.gen)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _clear_grads(module):
        for p in module.parameters():
            p.grad = None

    def time_call(self, step, module):
        """Seconds of step(*inputs).backward() on fresh inputs."""
        self._clear_grads(module)
        inputs = self.inputs()
        if self.flush is not None:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*inputs).backward()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step(*inputs).backward()
        return time.perf_counter() - t0

    def peak_bytes(self, step, module):
        """(peak memory of step(*inputs).backward() above what the inputs hold, or None
        where it cannot be read; seconds the call took)."""
        self._clear_grads(module)
        if self.device.type == "cuda":
            inputs = self.inputs()
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            step(*inputs).backward()
            self._sync()
            seconds = time.perf_counter() - t0
            return torch.cuda.max_memory_allocated(self.device) - base, seconds
        if not self.cpu_memory:
            inputs = self.inputs()
            t0 = time.perf_counter()
            step(*inputs).backward()
            return None, time.perf_counter() - t0
        with _exact_rss():
            _release_freed()
            inputs = self.inputs()
            _release_freed()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_bytes("VmRSS")
            t0 = time.perf_counter()
            step(*inputs).backward()
            seconds = time.perf_counter() - t0
            return max(_status_bytes("VmHWM") - base, 0), seconds


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _message(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _failure(name, err):
    if is_out_of_memory(err):
        return OOM
    return COMPILE_FAILED if name in COMPILED else FAILED


def new_result():
    return {"status": OK, "time_s": None, "times_s": [], "reps": 0, "peak_bytes": None, "warmup_s": None,
            "error": None, "skipped": False}


def _prepare(name, build, runner, warmup, max_call_s, memory_calls=3):
    """Build and warm up one variant, then measure its peak memory (timed calls too).

    Returns (result, (step, module) or None when it cannot be timed). Every variant
    gets at least one warm-up call, the compiled variants two: a module whose second call
    takes another branch (CRD fixes its normaliser on the first) compiles again then.
    A call slower than max_call_s makes the variant "too slow", except those warm-up
    calls. Peak memory is the least over up to memory_calls calls (one when a call
    takes over a second): one-time effects only ever add to it. warmup_s is the last
    call's time, the estimate for the budget.
    """
    res = new_result()
    unjudged = 2 if name in COMPILED else 1
    warmup = max(warmup, unjudged)
    try:
        step, module = build(runner.case, runner.device, runner.dtype)
        for i in range(warmup + memory_calls):
            if i < warmup:
                seconds = runner.time_call(step, module)
            else:
                peak, seconds = runner.peak_bytes(step, module)
                if peak is not None:
                    res["peak_bytes"] = peak if res["peak_bytes"] is None else min(res["peak_bytes"], peak)
            res["warmup_s"] = seconds
            if seconds > max_call_s and i >= unjudged:
                res["status"], res["peak_bytes"] = TOO_SLOW, None
                return res, None
            if i >= warmup and seconds > 1.0:
                break
        return res, (step, module)
    except Exception as err:  # reported in the table, never fatal
        res["status"], res["error"], res["peak_bytes"] = _failure(name, err), _message(err), None
        return res, None


def balanced_order(names):
    """A cyclic order of names in which every ordered pair of two different names is
    adjacent exactly once (an Eulerian circuit of the complete directed graph on them,
    Hierholzer's algorithm): each name appears len(names) - 1 times and follows every other
    name once, the wrap-around included. One name: itself."""
    n = len(names)
    if n < 2:
        return list(names)
    out_edges = {i: [j for j in range(n) if j != i] for i in range(n)}
    stack, circuit = [0], []
    while stack:
        v = stack[-1]
        if out_edges[v]:
            stack.append(out_edges[v].pop())
        else:
            circuit.append(stack.pop())
    circuit.reverse()  # starts and ends at 0: drop the repeated end, the cycle wraps
    return [names[i] for i in circuit[:-1]]


def _time_round_robin(results, active, runner, min_reps, max_reps, budget_s):
    """Time the active variants interleaved in balanced_order; fills times_s, reps and
    time_s (median)."""
    estimate = sum(max(results[n]["warmup_s"] or 0.0, 1e-6) for n in active)
    reps = min(max(math.ceil(budget_s / estimate), min_reps), max_reps)
    names = list(active)
    order = balanced_order(names)
    for _ in range(math.ceil(reps * len(names) / len(order))):
        for name in order:
            res = results[name]
            if res["status"] != OK or len(res["times_s"]) == reps:  # the last cycle may overshoot
                continue
            try:
                res["times_s"].append(runner.time_call(*active[name]))
            except Exception as err:
                res["status"], res["error"] = _failure(name, err), _message(err)
                _release(runner.device)
    for name in names:
        res = results[name]
        res["reps"] = len(res["times_s"])
        if res["status"] == OK:
            res["time_s"] = statistics.median(res["times_s"])


def run_case(case, device, dtype=torch.float32, variants=None, *, warmup=1, min_reps=3, max_reps=50,
             budget_s=1.0, max_call_s=10.0, max_memory=None, skip=None, progress=None,
             quiet=contextlib.nullcontext):
    """Measure every variant of a case; returns {variant name: result}.

    variants: {name: builder}, default VARIANTS. skip: {name: status} of variants not to
    run (they ran out of memory or time at a smaller size of the same loss); they are
    reported with that status and skipped=True. progress(text) is told what runs. quiet():
    a context manager the timed calls run in (the benchmark's: its precompiling process
    stopped, fastkd.bench.precompile).
    A result: status (ok, out of memory, compile failed, too slow, failed), time_s (the
    median), times_s (every sample), reps, peak_bytes, warmup_s (the last warm-up call),
    error (the failure's message), skipped.
    """
    variants = VARIANTS if variants is None else variants
    skip = skip or {}
    results, active = {}, {}
    torch._dynamo.reset()  # each case compiles afresh and never meets the recompile limit
    # What lives now (torch's modules, earlier cases' survivors) is left out of later
    # collections, which keeps the many gc.collect() calls below cheap.
    gc.collect()
    gc.freeze()
    runner = Runner(case, device, dtype)
    with memory_cap(device, max_memory), backend.use_backend("auto"):
        for name, build in variants.items():
            if name in skip:
                results[name] = dict(new_result(), status=skip[name], skipped=True)
                continue
            if progress:
                progress(f"{case.name}: {name}")
            results[name], ready = _prepare(name, build, runner, warmup, max_call_s)
            if ready:
                active[name] = ready
            _release(device)
        if active:
            if progress:
                progress(f"{case.name}: timing")
            with quiet():
                _time_round_robin(results, active, runner, min_reps, max_reps, budget_s)
        active.clear()
        _release(device)
    return results


def floor_bytes(case, dtype):
    """Bytes a fused fastkd must move at least for the case in dtype (the case's own dtype
    where it has one): read each input and parameter once, write the gradient of each that
    requires grad once (a teacher's input, which needs none, is only read), plus the case's
    extra values (CRD's memory-bank rows). Counted on "meta" tensors: shapes only, nothing
    allocated, the same on every device."""
    meta = torch.device("meta")
    dtype = case.dtype or dtype
    module = case.build("fastkd", meta, dtype)
    flat = [t for x in case.inputs(meta, dtype, None) for t in (x if isinstance(x, (list, tuple)) else [x])]
    tensors = [t for t in flat + list(module.parameters()) if isinstance(t, torch.Tensor)]
    moved = sum(t.numel() * t.element_size() * (2 if t.requires_grad else 1) for t in tensors)
    return moved + case.extra_values * torch.empty((), dtype=dtype).element_size()
