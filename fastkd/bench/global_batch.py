"""python -m fastkd.bench.global_batch: one rank's time and peak memory of the global-batch
losses against the world size W, at a fixed global batch N.

For each loss and W it measures the forward+backward of one rank (rank 0) holding N / W
of the N samples, with global_batch=True (README "Global batch across processes", "CRD
across processes"), and prints the ratio of each figure to W = 1's. Two ways to run
the ranks:

  simulated (the default)  Rank 0 of W alone in this process, over a loopback process
      group (LoopbackGroup) that stands in for the other W - 1 ranks: all_gather fills
      each other rank's block with this rank's rows, slightly scaled (so that no two
      rows of the global batch are equal, as in a real batch), and all_reduce returns
      W times its input (MAX and MIN: the input). The rank runs the sharded computation
      of a real job on the same shapes (the gathered N rows, its N / W rows of each
      relation), so its time and memory are a real rank's; the loss values are not
      those of any real batch. Nothing is sent: the time is compute and the memory
      copies standing in for the collectives, without network or waiting for other
      ranks. Any W fits on one machine.
  processes (--processes)  W real gloo processes on this machine (CPU only), each with
      --threads threads (default cores / W) and its own inputs; rank 0's figures are
      reported. Its time includes gloo and waiting for the other ranks, which share the
      machine's cores.

Per call: a barrier (so rank 0's time starts with every rank ready), then
fastkd.bench.measure.Runner's timed call and memory-measured call. Peak memory is that
of fastkd.bench.measure (CPU: the process's peak resident set; CUDA:
torch.cuda.max_memory_allocated), above what the rank's inputs hold; the least of
--memory-calls calls is kept; of --reps timed calls the median and the least are
reported, and the time ratio to W = 1 is of the least (the call least disturbed by
other work on the machine). The module's
parameters and buffers (CRD's memory banks) are held across steps and are not part
of that peak: they are reported apart, as "state".

The relational losses (RKD, SP, PKT for PKTCosSim, CC, IRG) are fastkd's modules with
global_batch=True; CRD keeps both banks whole on every rank, CRD-sharded
(bank_sharding=True) a W-th of them. Only the student's inputs take gradients, as in
fastkd.bench.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ReduceOp, _create_work_from_future
from torch.futures import Future

import fastkd

from . import measure
from .cli import DTYPES, describe_device, git_commit

LOOPBACK = "fastkd_loopback"
MIB = 2 ** 20


# --- the loopback process group ----------------------------------------------------

def _done(result):
    future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


class LoopbackGroup(dist.ProcessGroup):
    """Rank `rank` of `world` simulated ranks whose tensors are this process's: all_gather
    gives every other rank's block as this rank's input, scaled by 1 + k / 1024 for the
    k-th rank after it when it holds floating-point numbers (copied exactly otherwise:
    sizes, indices); all_reduce multiplies by W for SUM, and returns the input for MAX,
    MIN, AVG (see the module docstring)."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        self._world = world

    def size(self):
        return self._world

    def getBackendName(self):
        return LOOPBACK

    def allgather(self, output_tensors, input_tensor, opts=None):
        rank = self.rank()
        for blocks, x in zip(output_tensors, input_tensor):
            for k, block in enumerate(blocks):
                block.copy_(x)
                if block.is_floating_point() and k != rank:
                    # Another rank's rows: this rank's, scaled, so that no two rows of the
                    # global batch are equal (RKD treats equal rows apart, at extra cost).
                    block.mul_(1 + ((k - rank) % self._world) / 1024)
        return _done(output_tensors)

    def allreduce(self, tensors, opts=None):
        kind = opts.reduceOp.op if opts is not None else ReduceOp.RedOpType.SUM
        if kind == ReduceOp.RedOpType.SUM:
            for t in tensors:
                t.mul_(self._world)
        elif kind not in (ReduceOp.RedOpType.MAX, ReduceOp.RedOpType.MIN, ReduceOp.RedOpType.AVG):
            raise ValueError(f"{LOOPBACK}: all_reduce with {kind} is not simulated")
        return _done(tensors)

    def barrier(self, opts=None):
        return _done(None)


if LOOPBACK.upper() not in dir(dist.Backend):  # registered once per process
    dist.Backend.register_backend(LOOPBACK, lambda store, rank, world, timeout: LoopbackGroup(rank, world),
                                  devices=["cpu", "cuda"])


@contextlib.contextmanager
def simulated_rank(rank, world):
    """torch.distributed initialised as rank `rank` of `world` over a LoopbackGroup."""
    if dist.is_initialized():
        raise RuntimeError("simulated ranks need a process without torch.distributed initialised")
    dist.init_process_group(LOOPBACK, store=dist.HashStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- the losses ----------------------------------------------------------------------

class Spec:
    """One loss on one rank: `n` local rows of a global batch; `inputs` as fastkd.bench's
    cases make them (for measure.Runner), `build` the module (after init_process_group)."""

    def __init__(self, name, n, make, build):
        self.name, self.n, self._make, self.build = name, n, make, build

    def inputs(self, device, dtype, gen):
        return self._make(device, dtype, gen)


def _randn(shape, device, dtype, gen, grad=False):
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    return x.requires_grad_(grad)


def _pair(n, d):
    return lambda device, dtype, gen: (_randn((n, d), device, dtype, gen, grad=True),
                                       _randn((n, d), device, dtype, gen))


def _irg(n, d):
    # fastkd.bench.cases' IRG layers at c=8, s=4: fm1 (n, c, 2s, 2s), fm2 (n, 2c, s, s), feat, out.
    shapes = [(n, 8, 8, 8), (n, 16, 4, 4), (n, d), (n, 100)]
    return lambda device, dtype, gen: ([_randn(s, device, dtype, gen, grad=True) for s in shapes],
                                       [_randn(s, device, dtype, gen) for s in shapes])


def _crd(n, d, crd):
    nce_n, feat_dim, n_data = crd["nce_n"], crd["feat_dim"], crd["n_data"]

    def make(device, dtype, gen):
        idx = torch.randint(0, n_data, (n,), device=device, generator=gen)
        sample_idx = torch.randint(0, n_data, (n, nce_n + 1), device=device, generator=gen)
        sample_idx[:, 0] = idx
        return _randn((n, d), device, dtype, gen, grad=True), _randn((n, d), device, dtype, gen), idx, sample_idx
    return make


def spec(loss, n, d, device, dtype, crd):
    """The Spec of `loss` for a rank holding n rows of dimension d."""
    modules = {
        "RKD": lambda: fastkd.RKD(25.0, 50.0, global_batch=True),
        "SP": lambda: fastkd.SP(global_batch=True),
        "PKT": lambda: fastkd.PKTCosSim(global_batch=True),
        "CC": lambda: fastkd.CC(0.4, 2, global_batch=True),
        "IRG": lambda: fastkd.IRG(0.1, 5.0, 5.0, global_batch=True),
        "CRD": lambda: fastkd.CRD(d, d, crd["feat_dim"], crd["nce_n"], 0.1, 0.5, crd["n_data"],
                                  global_batch=True),
        "CRD-sharded": lambda: fastkd.CRD(d, d, crd["feat_dim"], crd["nce_n"], 0.1, 0.5, crd["n_data"],
                                          global_batch=True, bank_sharding=True),
    }
    if loss not in modules:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(modules)}")
    make = _irg(n, d) if loss == "IRG" else _crd(n, d, crd) if loss.startswith("CRD") else _pair(n, d)

    def build():
        module = modules[loss]().to(device=device, dtype=dtype)
        return module, module
    return Spec(loss, n, make, build)


LOSSES = ("RKD", "SP", "PKT", "CC", "IRG", "CRD", "CRD-sharded")


def sharded_paths(device):
    """op -> "triton" or "torch": whose sharded function each relational op runs with
    global_batch=True on this device (fastkd.backend.global_implementation: the Triton kernels
    on CUDA where the op has them)."""
    from .. import backend
    out = {}
    for op in ("rkd", "sp", "pkt_cos_sim", "cc", "irg_edge", "irg_vertex", "irg_transformation"):
        name = backend.resolve(op, device)
        out[op] = "torch" if name == "triton" and op not in backend.SHARDED["triton"] else name
    return out


# --- one rank's measurement ----------------------------------------------------------

def measure_rank(case, device, dtype, reps, memory_calls, warmup=1):
    """{status, time_ms (median), min_ms, times_ms, peak_mib, state_mib, error} of this rank for one case,
    inside an initialised process group. Every rank makes the same calls, in the same
    number (they are collectives), whatever their own timings."""
    out = {"status": measure.OK, "time_ms": None, "min_ms": None, "times_ms": [], "peak_mib": None,
           "state_mib": None, "error": None}
    try:
        step, module = case.build()
        out["state_mib"] = sum(t.numel() * t.element_size()
                               for t in list(module.parameters()) + list(module.buffers())) / MIB
        # Each rank its own inputs: equal rows on two ranks would send RKD down its
        # equal-rows branch, which costs more.
        runner = measure.Runner(case, device, dtype, seed=dist.get_rank())
        for _ in range(warmup):  # CRD fixes its Z on the first call
            dist.barrier()
            runner.time_call(step, module)
        peaks = []
        for _ in range(memory_calls):
            dist.barrier()
            peak, _ = runner.peak_bytes(step, module)
            if peak is not None:
                peaks.append(peak)
        out["peak_mib"] = min(peaks) / MIB if peaks else None
        for _ in range(reps):
            dist.barrier()
            out["times_ms"].append(runner.time_call(step, module) * 1e3)
        out["time_ms"], out["min_ms"] = statistics.median(out["times_ms"]), min(out["times_ms"])
    # Reported in the table; a simulated run goes on with the next case. (In --processes,
    # the ranks run alike and fail alike; one failing alone would leave the others waiting.)
    except Exception as err:
        out["status"] = measure.OOM if measure.is_out_of_memory(err) else measure.FAILED
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    return out


def _simulated(loss, n_global, world, d, device, dtype, crd, reps, memory_calls):
    with simulated_rank(0, world):
        return measure_rank(spec(loss, n_global // world, d, device, dtype, crd), device, dtype, reps, memory_calls)


def _process(rank, world, init_file, result_file, jobs, d, dtype_name, crd, reps, memory_calls, threads):
    # The machine's cores are shared among the W processes, as ranks on one host share them.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for loss, n_global in jobs:
            results.append(measure_rank(spec(loss, n_global // world, d, torch.device("cpu"), DTYPES[dtype_name],
                                             crd), torch.device("cpu"), DTYPES[dtype_name], reps, memory_calls))
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _processes(jobs, world, d, dtype_name, crd, reps, memory_calls, threads):
    """Rank 0's results for jobs [(loss, N)] from a gloo job of `world` processes."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "rank0.json")
        mp.spawn(_process, args=(world, init_file, result_file, jobs, d, dtype_name, crd, reps, memory_calls,
                                 threads), nprocs=world)
        with open(result_file) as f:
            return json.load(f)


# --- the command ---------------------------------------------------------------------

def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parser():
    p = argparse.ArgumentParser(prog="python -m fastkd.bench.global_batch",
                                description="One rank's forward+backward time and peak memory of the "
                                            "global-batch losses against the world size W, at a fixed "
                                            "global batch N (see the module docstring).")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {','.join(LOSSES)}")
    p.add_argument("--N", type=int, default=1024, help="global batch (divisible by every W)")
    p.add_argument("--D", type=int, default=512, help="feature dimension")
    p.add_argument("--world", default="1,2,4", help="comma-separated world sizes W")
    p.add_argument("--device", default="cpu", help="cpu or cuda (simulated ranks only on cuda)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--processes", action="store_true",
                   help="W real gloo processes on this machine (CPU) instead of one simulated rank")
    p.add_argument("--reps", type=int, default=10, help="timed calls per case (median and least reported)")
    p.add_argument("--memory-calls", type=int, default=2, help="memory-measured calls (the least is kept)")
    p.add_argument("--nce-n", type=int, default=1024, help="CRD's negatives per sample")
    p.add_argument("--feat-dim", type=int, default=128, help="CRD's embedding dimension")
    p.add_argument("--n-data", type=int, default=50000, help="CRD's dataset size (bank rows)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: torch's own; with --processes, cores / W). On a "
                        "machine shared with other jobs pass 1: an OpenMP thread that is not scheduled "
                        "makes every parallel op wait")
    p.add_argument("--json", help="also write the results here")
    return p


def _table(rows):
    head = ["loss", "N", "W", "rows/rank", "median ms", "min ms", "peak MiB", "state MiB", "min ms / W=1",
            "peak / W=1"]

    def fmt(v, spec_):
        return "-" if v is None else format(v, spec_)
    lines = [head]
    for r in rows:
        first = [r["loss"], str(r["N"]), str(r["W"]), str(r["rows_per_rank"])]
        if r["status"] != measure.OK:
            lines.append(first + [r["status"]] + [""] * (len(head) - 5))
            continue
        lines.append(first + [fmt(r["time_ms"], ".1f"), fmt(r["min_ms"], ".1f"), fmt(r["peak_mib"], ".1f"),
                              fmt(r["state_mib"], ".1f"), fmt(r["time_ratio"], ".2f"), fmt(r["peak_ratio"], ".2f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main(argv=None):
    args = parser().parse_args(argv)
    losses = [v.strip() for v in args.losses.split(",") if v.strip()]
    worlds = _ints(args.world)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    crd = {"nce_n": args.nce_n, "feat_dim": args.feat_dim, "n_data": args.n_data}
    for loss in losses:
        spec(loss, 2, args.D, device, dtype, crd)  # an unknown name fails here, before any run
    bad = [w for w in worlds if w < 1 or args.N % w or args.N // w < 1]
    if bad:
        raise SystemExit(f"--N {args.N} must be divisible by every W, each W >= 1 (not {bad}): the simulated "
                         f"ranks hold equal shares")
    if args.N < 2:
        raise SystemExit("--N must be at least 2 (a global batch of 1 has no relations)")
    if args.processes and device.type != "cpu":
        raise SystemExit("--processes runs gloo processes on CPU; use simulated ranks on cuda")
    mode = "processes" if args.processes else "simulated"
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    threads = ("cores / W" if args.threads is None else args.threads) if args.processes else torch.get_num_threads()
    print(f"{mode} ranks, {describe_device(device)['description']}, torch {torch.__version__}, "
          f"{args.dtype}, N={args.N} D={args.D}, {threads} threads per rank; rank 0 of W measured", flush=True)
    sharded = sharded_paths(device)
    print("sharded path: " + ", ".join(f"{op} {path}" for op, path in sharded.items()), flush=True)

    results = {}
    for world in worlds:
        if args.processes:
            for loss, res in zip(losses, _processes([(loss, args.N) for loss in losses], world, args.D, args.dtype,
                                                    crd, args.reps, args.memory_calls, args.threads)):
                results[loss, world] = res
        else:
            for loss in losses:
                results[loss, world] = _simulated(loss, args.N, world, args.D, device, dtype, crd, args.reps,
                                                  args.memory_calls)
        for loss in losses:
            r = results[loss, world]
            shown = f"{r['min_ms']:.1f} ms (min), {r['peak_mib']:.1f} MiB" if r["status"] == measure.OK else r["error"]
            print(f"  {loss} W={world}: {shown}", flush=True)

    rows = []
    for loss in losses:
        base = results.get((loss, 1)) if 1 in worlds else None
        for world in worlds:
            r = dict(results[loss, world], loss=loss, N=args.N, D=args.D, W=world, rank=0,
                     rows_per_rank=args.N // world, time_ratio=None, peak_ratio=None)
            if base and base["status"] == measure.OK and r["status"] == measure.OK:
                # The least time, the one least disturbed by whatever else shares the machine.
                r["time_ratio"] = r["min_ms"] / base["min_ms"]
                if base["peak_mib"] and r["peak_mib"] is not None:
                    r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
            rows.append(r)
    print(_table(rows))
    if args.json:
        doc = {"mode": mode, "device": describe_device(device), "torch": torch.__version__,
               "python": platform.python_version(), "commit": git_commit(), "dtype": args.dtype, "N": args.N,
               "D": args.D, "crd": crd, "reps": args.reps, "threads": threads, "sharded": sharded,
               "results": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all(r["status"] == measure.OK for r in rows) else 1


if __name__ == "__main__":
    # Through the imported module, so that the spawned processes of --processes find
    # _process under its own name rather than __main__'s.
    from fastkd.bench import global_batch
    try:
        sys.exit(global_batch.main())
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(2)
