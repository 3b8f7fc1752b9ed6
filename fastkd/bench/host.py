"""The per-call cost of each loss on a GPU, measured without one: python -m fastkd.bench --host.

At the collection's training shapes (cases("collection"): batch 128, 100 classes, CIFAR
ResNet maps) a loss gives the GPU tens of microseconds of arithmetic, so its time per
forward+backward is the host's: Python, checks, dispatch, allocations, and the launches.
This harness measures that part on the CPU, for the path fastkd's auto backend takes on
CUDA, beside the eager reference's, on the same footing:

  host_us   microseconds of forward+backward (the best of several rounds, the reference's
            and fastkd's alternating) with every Triton launch skipped
            (fastkd.ops.no_launches), on each case's small twin
            (cases.collection_cases(twin=True): the same code path, since the backend the
            auto backend picks at the real shape is the one it runs, checked per op; a few
            microseconds of CPU arithmetic). Real tensors, not meta ones, whose kernels
            run in Python and would cost more than the real ones.
  torch     PyTorch kernels launched per forward+backward: the ATen operators that
            compute (counted by a TorchDispatchMode; views, empty allocations and size
            queries launch nothing and are not counted).
  triton    Triton kernels launched per forward+backward.
  syncs     operators that read a device value on the host (.item(), bool(tensor),
            nonzero): each is a sync on a GPU, and a CUDA graph cannot hold one.
  model_us  host_us + 5 us per PyTorch launch + 20 us per Triton launch: roughly what a
            launch costs the host on a current GPU (a Triton launch binds its arguments
            in Python first).
  x         the reference's model_us / fastkd's: 1.0 or more means fastkd costs no more
            per call than the code it replaces.

The CUDA path runs on CPU tensors: fastkd.backend resolves each op as on CUDA, value
checks take their GPU form (fastkd.checks.host_tensor), and the Triton Functions run with
their launches skipped (their outputs stay uninitialised, which
no host decision reads). The PyTorch launch count is that of the CPU operators, which on
CUDA launch one kernel each, a few (reductions of large tensors) two.
"""
import contextlib
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backend, checks, functional
from ..ops import no_launches
from . import cases as cases_mod

TORCH_LAUNCH_US = 5.0
TRITON_LAUNCH_US = 20.0

# ATen operators that launch no kernel: views, allocations without a fill, metadata.
NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute", "expand",
    "expand_as", "as_strided", "slice", "select", "unsqueeze", "squeeze", "diagonal", "alias",
    "detach", "split", "split_with_sizes", "unbind", "view_as", "unflatten", "flatten", "narrow",
    "movedim", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "contiguous",
    "_has_compatible_shallow_copy_type", "set_", "resize_", "promote_types", "result_type", "can_cast",
})
# ATen operators that read a device value on the host.
SYNCS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal", "unique", "_unique2",
                   "masked_select"})


class LaunchCounter(TorchDispatchMode):
    """Counts the ATen operators that launch a kernel, and those that sync, while active."""

    def __init__(self):
        super().__init__()
        self.launches, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs.append(name)
        elif name not in NO_LAUNCH:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


def _as_on_cuda(op, x, kind):
    """fastkd.backend.eager_implementation as for a CUDA tensor of x's size."""
    return backend.eager_implementation(op, x, "cuda")


@contextlib.contextmanager
def cuda_path():
    """fastkd's losses take their CUDA path on CPU tensors inside the block (with the Triton
    launches to be skipped by fastkd.ops.no_launches)."""
    with mock.patch.object(functional, "eager_implementation", _as_on_cuda), \
            mock.patch.object(checks, "host_tensor", lambda x: False), backend.use_backend("auto"):
        yield


def cuda_choice(case):
    """{op: backend} the auto backend picks on CUDA for the case (its numel per op)."""
    return {op: backend.resolve(op, torch.device("cuda"), "auto", n) for op, n in case.numel.items()}


def _step(module):
    def step(inputs):
        for p in module.parameters():
            p.grad = None
        module(*inputs).backward()
    return step


def _count(step, make_inputs):
    """(PyTorch launches, syncs, Triton launches) of one step, with Triton launches skipped."""
    counter = LaunchCounter()
    with no_launches() as launched:
        step(make_inputs())  # warm-up: caches, lazy imports, a module's first call (CRD's Z)
        inputs = make_inputs()
        launched.clear()
        with counter:
            step(inputs)
    return counter, len(launched)


def _seconds(step, batch):
    with no_launches():
        start = time.perf_counter()
        for inputs in batch:
            step(inputs)
        return time.perf_counter() - start


def measure(reference, fast, make_inputs, calls=200, rounds=7):
    """{"reference": ..., "fastkd": ...} of {host_us, torch, triton, syncs, torch_ops}: one
    forward+backward of each module (fast's inside cuda_path), Triton launches skipped. The
    two are timed in alternating rounds of `calls` calls each, and each keeps its best round
    (other work on the machine only ever adds time)."""
    steps = {"reference": (_step(reference), contextlib.nullcontext), "fastkd": (_step(fast), cuda_path)}
    out = {}
    for name, (step, setting) in steps.items():
        with setting():
            counter, triton = _count(step, make_inputs)
        out[name] = {"host_us": float("inf"), "torch": len(counter.launches), "triton": triton,
                     "syncs": len(counter.syncs), "torch_ops": counter.launches, "sync_ops": counter.syncs}
    for _ in range(rounds):
        for name, (step, setting) in steps.items():
            batch = [make_inputs() for _ in range(calls)]
            with setting():
                per_call = _seconds(step, batch) / calls * 1e6
            out[name]["host_us"] = min(out[name]["host_us"], per_call)
    return out


def model_us(m):
    return m["host_us"] + TORCH_LAUNCH_US * m["torch"] + TRITON_LAUNCH_US * m["triton"]


def run_case(case, twin, calls=200, rounds=7):
    """The reference's and fastkd's costs for a collection case, measured on its twin."""
    device, dtype = torch.device("cpu"), torch.float32
    real, small = cuda_choice(case), cuda_choice(twin)
    if real != small:
        raise RuntimeError(f"{case.name}: its twin takes another path on CUDA ({small} against {real})")
    gen = torch.Generator().manual_seed(0)

    def make_inputs():
        with torch.enable_grad():
            return twin.inputs(device, dtype, gen)
    costs = measure(twin.build("reference", device, dtype), twin.build("fastkd", device, dtype), make_inputs,
                    calls, rounds)
    return {"loss": case.loss, "call": case.shape, "path": real, **costs,
            "ratio": model_us(costs["reference"]) / model_us(costs["fastkd"])}


def run(losses=None, calls=200, rounds=7, progress=None):
    """run_case for every collection case (of the named losses)."""
    keep = None if losses is None else set(losses)
    out = []
    for case, twin in zip(cases_mod.collection_cases(), cases_mod.collection_cases(twin=True)):
        if keep is not None and case.loss not in keep:
            continue
        if progress:
            progress(case.name)
        out.append(run_case(case, twin, calls, rounds))
    return out


def _path_label(path):
    names = sorted(set(path.values()))
    return names[0] if len(names) == 1 else "+".join(names)


def table(results):
    """The results as text, one row per case, within 120 columns."""
    left = f"{'loss':<10} {'call':<34} {'path':<12}"
    rows = [f"{'':<58} {'reference':-^22}   {'fastkd':-^30}",
            f"{left} {'host':>6} {'torch':>6} {'model':>8}   {'host':>6} {'torch':>6} {'triton':>6} "
            f"{'model':>7}  {'x':>6}"]
    for r in results:
        ref, fast = r["reference"], r["fastkd"]
        sync = " sync" if fast["syncs"] else ""
        rows.append(f"{r['loss']:<10} {r['call'][:34]:<34} {_path_label(r['path']):<12} {ref['host_us']:>6.0f} "
                    f"{ref['torch']:>6d} {model_us(ref):>8.0f}   {fast['host_us']:>6.0f} {fast['torch']:>6d} "
                    f"{fast['triton']:>6d} {model_us(fast):>7.0f}  {r['ratio']:>5.2f}x{sync}")
    slower = [r for r in results if r["ratio"] < 1.0]
    rows.append("")
    rows.append(f"microseconds per forward+backward; model = host + {TORCH_LAUNCH_US:g} us per PyTorch launch + "
                f"{TRITON_LAUNCH_US:g} us per Triton launch")
    rows.append("x = the reference's model / fastkd's; path = what fastkd runs on CUDA at the call's shape")
    rows.append(f"{len(results) - len(slower)} of {len(results)} calls cost no more than the reference's"
                + (f"; dearer: {', '.join(r['loss'] + ' ' + r['call'].split()[0] for r in slower)}" if slower else ""))
    return "\n".join(rows)


def main(losses=None, json_path=None, calls=200, rounds=7):
    import json
    import sys
    torch.set_num_threads(1)
    results = run(losses, calls, rounds, progress=lambda name: print(f"  {name}", file=sys.stderr, flush=True))
    print(table(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"torch": torch.__version__, "results": [
                {**r, "reference": {**r["reference"], "model_us": model_us(r["reference"])},
                 "fastkd": {**r["fastkd"], "model_us": model_us(r["fastkd"])}} for r in results]}, f, indent=1)
        print(f"wrote {json_path}")
    return 0
