"""Bytes each memory-bound loss moves on its Triton path, beside its floor, without a GPU:
python -m fastkd.bench.traffic.

For AT, FT, AFD, AB, Hint, VID, OFD, Logits, SoftTarget, DML and BSS, one forward+backward of
the fastkd module on the triton backend runs through Triton's interpreter (TRITON_INTERPRET=1,
on CPU tensors; the command sets it and starts itself again when it is not set), with value
checks in their GPU form (as fastkd.bench.host does), and every byte is counted:

  Triton   per kernel launch, the distinct bytes its loads read plus the distinct bytes its
           stores write (atomics count as both), taken from the addresses the interpreter
           loads and stores: what the launch moves if each byte it touches crosses the memory
           bus once (within a launch the caches hold what it reads twice; between launches
           nothing stays). It is the argument model "each tensor argument's storage touched
           once", made exact: only the parts a kernel touches count, and a tensor it reads and
           then writes counts twice. Small buffers (per-sample norms, partial sums) that a GPU
           would keep in its L2 between launches make it an upper bound there; a kernel that
           streams over more than fits in cache twice in one launch (issued_read in the JSON
           shows each load instruction's bytes) moves more than it says.
  torch    per PyTorch operator that launches a kernel (fastkd.bench.host.NO_LAUNCH lists those
           that do not: views, empty allocations), the bytes of its tensor inputs (read) and
           outputs (written), each tensor once (a destination it only overwrites, as copy_ or
           fill_ does, is not read): VID's and OFD's convolutions, the few reductions around
           the kernels, the autograd seed.
  floor    fastkd.bench.measure.floor_bytes: each input and parameter read once, each gradient
           written once; the benchmark's floor in bytes (fastkd.bench.roofline).

moved = Triton + torch, and x floor = moved / floor, the factor by which the loss's traffic
exceeds the copy floor (1.0 would be a single fused pass). The reference's eager operators are
counted the same way (ref MB, ref x), for scale. The interpreter runs each program in Python,
so the shapes are the collection's (--sweep quick, the default: batch 128) or the GPU sweep's
with the batch cut (--sweep full --batch 8: every map's C, H, W and every vocabulary kept,
which is what a kernel's passes depend on, and the batch raised where the cut would change
the kernels a case launches).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backend, checks
from ..ops import no_launches
from . import cases as cases_mod
from . import measure
from .host import NO_LAUNCH

LOSSES = ("AT", "FT", "AFD", "AB", "Hint", "VID", "OFD", "Logits", "SoftTarget", "DML", "BSS")
SWEEPS = ("tiny", "quick", "full")
# Operators whose first argument is a destination they overwrite without reading it.
OVERWRITES = frozenset({"copy_", "fill_", "zero_", "zeros_like", "ones_like", "full_like", "new_zeros",
                        "new_ones", "new_full"})
CPU = torch.device("cpu")


# --- bytes of tensors ---------------------------------------------------------------

def tensor_bytes(t):
    """The bytes of t's storage that its view spans once: numel elements, or fewer where a
    stride of 0 repeats them (an expanded tensor)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def _tensors(obj):
    """The tensors in a nested structure of lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []


def _distinct_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key = (t.device.type, t.data_ptr() if t.device.type != "meta" else id(t), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


class OpTraffic(TorchDispatchMode):
    """Inside the block: per PyTorch operator that launches a kernel, (name, bytes read, bytes
    written), in self.ops. paused() true: the operator is not counted (a Triton launch's own
    argument handling in the interpreter)."""

    def __init__(self, paused=lambda: False):
        super().__init__()
        self.ops, self.paused = [], paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in NO_LAUNCH or self.paused():
            return out
        inputs = _tensors(list(args) + list(kwargs.values()))
        if name in OVERWRITES and args and isinstance(args[0], torch.Tensor):
            inputs = [t for t in inputs if t is not args[0]]
        self.ops.append((name, _distinct_bytes(inputs), _distinct_bytes(_tensors(out))))
        return out


# --- bytes of Triton launches, under the interpreter ----------------------------------

def interpreted():
    """Whether fastkd's Triton kernels run through Triton's interpreter in this process."""
    from triton.runtime.interpreter import InterpretedFunction

    from ..kernels import elementwise
    return any(isinstance(v, InterpretedFunction) for v in vars(elementwise).values())


class _Accesses:
    """The addresses one launch loads or stores, by element size; kept compact as it grows."""

    def __init__(self):
        self.parts, self.issued, self.pending = {}, 0, 0

    def add(self, ptrs, mask, size):
        addresses = ptrs[np.broadcast_to(mask, ptrs.shape)] if mask is not None else ptrs.ravel()
        self.issued += addresses.size * size
        self.parts.setdefault(size, []).append(addresses.astype(np.uint64, copy=False))
        self.pending += addresses.size
        if self.pending > 2 ** 24:
            self._compact()

    def _compact(self):
        self.parts = {size: [np.unique(np.concatenate(arrays))] for size, arrays in self.parts.items()}
        self.pending = 0

    def distinct_bytes(self):
        self._compact()
        return sum(arrays[0].size * size for size, arrays in self.parts.items())


class KernelTraffic:
    """Inside the block: per Triton launch through the interpreter, {kernel, read, written,
    issued_read, issued_written} in self.launches (see the module docstring)."""

    def __init__(self):
        self.launches, self.current = [], None

    def active(self):
        return self.current is not None

    def _record(self, kind, ptrs, mask):
        if self.current is not None:
            size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            self.current[kind].add(ptrs.data, None if mask is None else mask.data.astype(bool), size)

    @contextlib.contextmanager
    def counting(self):
        from triton.runtime import interpreter
        builder, function = interpreter.InterpreterBuilder, interpreter.InterpretedFunction
        load, store, run = builder.create_masked_load, builder.create_masked_store, function.run
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
        traffic = self

        def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            traffic._record("read", ptrs, mask)
            return load(self, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(self, ptrs, value, mask, cache_policy):
            traffic._record("written", ptrs, mask)
            return store(self, ptrs, value, mask, cache_policy)

        def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            traffic._record("read", ptr, mask)
            traffic._record("written", ptr, mask)
            return rmw(self, rmw_op, ptr, val, mask, sem, scope)

        def atomic_cas(self, ptr, cmp, val, sem, scope):
            traffic._record("read", ptr, None)
            traffic._record("written", ptr, None)
            return cas(self, ptr, cmp, val, sem, scope)

        def launch(self, *args, **kwargs):
            traffic.current = {"read": _Accesses(), "written": _Accesses()}
            try:
                return run(self, *args, **kwargs)
            finally:
                read, written = traffic.current["read"], traffic.current["written"]
                traffic.current = None
                traffic.launches.append({"kernel": self.fn.__name__, "read": read.distinct_bytes(),
                                         "written": written.distinct_bytes(), "issued_read": read.issued,
                                         "issued_written": written.issued})
        patches = [(builder, "create_masked_load", masked_load), (builder, "create_masked_store", masked_store),
                   (builder, "create_atomic_rmw", atomic_rmw), (builder, "create_atomic_cas", atomic_cas),
                   (function, "run", launch)]
        with contextlib.ExitStack() as stack:
            for owner, name, value in patches:
                stack.enter_context(mock.patch.object(owner, name, value))
            yield self


# --- cases ---------------------------------------------------------------------------

def _label(shape):
    return cases_mod._map_label(shape) if len(shape) == 4 else "x".join(map(str, shape))


def launched_kernels(case, dtype=torch.float32):
    """The Triton kernels the case's fastkd module launches in a forward+backward, in order:
    its path (shapes only, on meta tensors, launches skipped)."""
    meta = torch.device("meta")
    with triton_path(), mock.patch.object(backend, "triton_runs_on", lambda device: True), \
            no_launches() as names:
        case.build("fastkd", meta, dtype)(*case.inputs(meta, dtype, None)).backward()
    return list(names)


def _with_batch(case, batch):
    inputs = _tensors(case.inputs(torch.device("meta"), torch.float32, None))
    small = [(batch, *t.shape[1:]) for t in inputs]
    grads = [t.requires_grad for t in inputs]

    def make(device, dtype, gen):
        return tuple(torch.randn(s, device=device, dtype=dtype, generator=gen).requires_grad_(g)
                     for s, g in zip(small, grads))
    return dataclasses.replace(case, shape=_label(small[0]), inputs=make, size=math.prod(small[0]),
                               params=dict(case.params, batch_cut_from=inputs[0].shape[0]))


def scaled(case, batch):
    """The case with its inputs' first dimension (batch, or logit rows) cut to batch, or to
    the least power-of-two multiple of it that keeps the case's Triton path (the kernels a
    size picks: the logit losses' single fused kernel below 32768 values, for one)."""
    full = _tensors(case.inputs(torch.device("meta"), torch.float32, None))[0].shape[0]
    path = launched_kernels(case)
    while batch < full:
        small = _with_batch(case, batch)
        if launched_kernels(small) == path:
            return small
        batch *= 2
    return case


def traffic_cases(sweep="quick", batch=8, losses=None):
    """The cases the report runs: the benchmark's, on its GPU shapes (quick: the collection's
    first call of each loss; full: the whole sweep, the batch cut to `batch`; tiny: the
    tests' shapes)."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}; got {sweep!r}")
    keep = LOSSES if losses is None else tuple(cases_mod.canonical(n) for n in losses)
    picked = cases_mod.cases(sweep, "cuda", keep)
    if sweep == "full":
        picked = [scaled(c, batch) for c in picked]
        names = set()
        picked = [c for c in picked if not (c.name in names or names.add(c.name))]  # cut shapes that now repeat
    return picked


# --- one case ------------------------------------------------------------------------

@contextlib.contextmanager
def triton_path():
    """The triton backend, value checks in their GPU form (no host reads, as on CUDA)."""
    with backend.use_backend("triton"), mock.patch.object(checks, "host_tensor", lambda x: False):
        yield


def _reference_bytes(case, dtype):
    module = case.build("reference", CPU, dtype)
    inputs = case.inputs(CPU, dtype, torch.Generator().manual_seed(0))
    ops = OpTraffic()
    with backend.use_backend("reference"), ops:
        module(*inputs).backward()
    return sum(r + w for _, r, w in ops.ops), len(ops.ops)


def run_case(case, dtype=torch.float32):
    """Forward+backward of the case's fastkd module on the Triton path, its bytes counted:
    {loss, shape, params, floor_bytes, kernels: [...], torch: [...], triton_bytes, torch_bytes,
    moved, ratio, reference_bytes, reference_ratio, seconds}."""
    if not interpreted():
        raise RuntimeError("fastkd.bench.traffic counts the interpreter's loads and stores: run it with "
                           "TRITON_INTERPRET=1 set before fastkd is imported (python -m fastkd.bench.traffic "
                           "sets it)")
    start = time.perf_counter()
    module = case.build("fastkd", CPU, dtype)
    inputs = case.inputs(CPU, dtype, torch.Generator().manual_seed(0))
    kernels = KernelTraffic()
    ops = OpTraffic(paused=kernels.active)
    with triton_path(), kernels.counting(), ops:
        module(*inputs).backward()
    triton = sum(k["read"] + k["written"] for k in kernels.launches)
    torch_bytes = sum(r + w for _, r, w in ops.ops)
    floor = measure.floor_bytes(case, dtype)
    reference, reference_ops = _reference_bytes(case, dtype)
    moved = triton + torch_bytes
    return {"loss": case.loss, "shape": case.shape, "params": case.params, "floor_bytes": floor,
            "kernels": kernels.launches, "torch": [{"op": n, "read": r, "written": w} for n, r, w in ops.ops],
            "triton_bytes": triton, "torch_bytes": torch_bytes, "moved": moved, "ratio": moved / floor,
            "reference_bytes": reference, "reference_ops": reference_ops, "reference_ratio": reference / floor,
            "seconds": time.perf_counter() - start}


def run(cases, dtype=torch.float32, progress=None):
    out = []
    for case in cases:
        if progress:
            progress(case.name)
        out.append(run_case(case, dtype))
    return out


# --- the table -----------------------------------------------------------------------

def _mb(n):
    return f"{n / 1e6:.3g}" if n < 1e7 else f"{n / 1e6:.1f}"


def table(results, kernels=False):
    """One row per case within 120 columns (kernels: a line per launch under each row)."""
    head = (f"{'loss':<10}  {'shape':<21}  {'kernels':>7}  {'ops':>4}  {'Triton MB':>9}  {'torch MB':>9}  "
            f"{'moved MB':>9}  {'floor MB':>9}  {'x floor':>7}  {'ref MB':>9}  {'ref x':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['loss']:<10}  {r['shape'][:21]:<21}  {len(r['kernels']):>7}  {len(r['torch']):>4}  "
                     f"{_mb(r['triton_bytes']):>9}  {_mb(r['torch_bytes']):>9}  {_mb(r['moved']):>9}  "
                     f"{_mb(r['floor_bytes']):>9}  {r['ratio']:>6.2f}x  {_mb(r['reference_bytes']):>9}  "
                     f"{r['reference_ratio']:>5.2f}x")
        if kernels:
            for k in r["kernels"]:
                lines.append(f"{'':<12}{k['kernel'][:40]:<40}  read {_mb(k['read']):>9}  written "
                             f"{_mb(k['written']):>9}  (issued {_mb(k['issued_read'])} / {_mb(k['issued_written'])})")
            for op in r["torch"]:
                lines.append(f"{'':<12}{'torch ' + op['op']:<40}  read {_mb(op['read']):>9}  written "
                             f"{_mb(op['written']):>9}")
    lines += ["",
              "MB = 10^6 bytes per forward+backward. kernels, ops: Triton launches and PyTorch operators that launch;",
              "Triton MB: each launch's distinct bytes loaded + stored (the interpreter's addresses); torch MB: each",
              "operator's tensors read and written once; floor MB: each input and parameter read once, each gradient",
              "written once; x floor = (Triton + torch) / floor; ref: the eager reference's operators counted alike."]
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(prog="python -m fastkd.bench.traffic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", help=f"comma-separated, of {','.join(LOSSES)} (default: all)")
    p.add_argument("--sweep", choices=SWEEPS, default="quick",
                   help="quick: the collection's first call of each loss (default); full: the GPU sweep's "
                   "shapes, the batch cut to --batch; tiny: the tests' shapes")
    p.add_argument("--batch", type=int, default=8, help="--sweep full: the batch (logit rows) to cut to (default 8)")
    p.add_argument("--cases", metavar="REGEX", help="keep the cases whose name matches")
    p.add_argument("--kernels", action="store_true", help="a line per Triton launch and PyTorch operator")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":  # the kernels must be built for the interpreter
        if argv is not None:
            raise SystemExit("fastkd.bench.traffic: set TRITON_INTERPRET=1 before importing fastkd")
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "fastkd.bench.traffic", *sys.argv[1:]], env)
    import re
    losses = [n for n in args.losses.split(",") if n.strip()] if args.losses else None
    try:
        todo = traffic_cases(args.sweep, args.batch, losses)
    except ValueError as err:
        raise SystemExit(f"fastkd.bench.traffic: {err}") from None
    if args.cases:
        todo = [c for c in todo if re.search(args.cases, c.name)]
    torch.set_num_threads(1)
    results = run(todo, progress=lambda name: print(f"  {name}", file=sys.stderr, flush=True))
    print(table(results, args.kernels))
    if args.json:
        with open(args.json, "w") as f:
            from .cli import git_commit
            json.dump({"torch": torch.__version__, "git_commit": git_commit(), "sweep": args.sweep,
                       "batch": args.batch if args.sweep == "full" else None, "results": results}, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
