"""fastkd-bench (or python -m fastkd.bench): time and peak memory of every loss, reference vs fastkd.

For each loss at a sweep of realistic shapes it runs forward+backward of the
reference eagerly, the reference under torch.compile, and fastkd (the auto
backend), side by side in one run, and prints one table with the ratios.
See fastkd.bench.measure for how time and memory are measured.
"""
import argparse
import datetime
import logging
import os
import platform
import re
import subprocess
import sys
import time

import torch

import fastkd

from .. import backend
from ..__main__ import METHODS, device_from, program_name
from ..registry import EXTENSIONS, LM_HEAD
from . import cases as cases_mod
from . import host, launch, measure, precompile, report, roofline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def available_memory():
    """Bytes of RAM available now (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_memory(text, total=None):
    """'8G', '512M', '1.5T', a byte count, or 'P%' of total -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text.endswith("%"):
        if total is None:
            raise ValueError("a percentage needs the amount of memory, which cannot be read here")
        return int(float(text[:-1]) / 100 * total)
    match = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)", text)
    if not match:
        raise ValueError(f"cannot read {text!r} as an amount of memory (e.g. 8G, 512M, 50%)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def git_commit():
    """The commit of the fastkd checkout, with "-dirty" if it has changes; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device):
    """{type, name, description, cpu, cores, gpu}: what the numbers were measured on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = _cpu_model()
    info = {"type": device.type, "cpu": cpu, "cores": cores, "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["name"] = info["gpu"]
        info["description"] = f"{info['gpu']} (host: {cores}-core CPU)"
    else:
        gpu = "no GPU" if not torch.cuda.is_available() else "GPU not used"
        info["name"] = cpu
        info["description"] = f"{cores}-core CPU ({cpu}), {gpu}"
    return info


def fastkd_path(loss, device, numel=None):
    """{op: backend} that fastkd's auto backend runs for the loss's ops on device (numel:
    {op: its first input's element count}, which the choice on CUDA depends on)."""
    ops = {**METHODS, **EXTENSIONS, **LM_HEAD}[loss]
    return {op: backend.resolve(op, device, "auto", (numel or {}).get(op)) for op in ops}


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def parser():
    p = argparse.ArgumentParser(prog=program_name("fastkd.bench", "fastkd-bench"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", help="comma-separated losses (default: all 21), e.g. RKD,SP,PKT; beyond them "
                   "the LM head's: FusedLinearSoftTarget, FusedLinearDistillation (each divergence), "
                   "generalized_jsd_loss")
    p.add_argument("--cases", metavar="REGEX", help="keep only the cases whose name (e.g. 'RKD N=1024 D=512') "
                   "matches this regular expression")
    p.add_argument("--quick", action="store_true", help="the quick sweep: a first look, minutes on a CPU")
    p.add_argument("--host", action="store_true", help="instead of timing: the per-call cost on a GPU at the "
                   "collection's shapes, measured on the CPU (launches per call, host microseconds with the "
                   "launches skipped; fastkd.bench.host), fastkd beside the reference")
    p.add_argument("--sweep", choices=cases_mod.SWEEPS, help="tiny, quick or full (default full; --quick = quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--variants", default=",".join(measure.VARIANT_NAMES),
                   help="comma-separated subset of eager,compile,fastkd (default: all three), and fastkd-compile: "
                   "fastkd under torch.compile; fastkd-graphs: under torch.compile(mode='reduce-overhead'), CUDA "
                   "graphs on CUDA; liger: Liger-Kernel's fused linear JSD for FusedLinearSoftTarget and "
                   "FusedLinearDistillation's kl, reverse_kl and jsd, its JSD for generalized_jsd_loss, where "
                   "liger_kernel is installed")
    p.add_argument("--max-memory", help="memory a variant may use before it is reported out of memory: "
                   "8G, 512M, or a percentage of available memory (default: 50%% of available RAM on CPU, "
                   "the whole GPU on CUDA)")
    p.add_argument("--max-call-seconds", type=float, help="a variant whose call takes longer is reported "
                   "too slow and not run at larger shapes (default 5 quick, 30 full)")
    p.add_argument("--budget", type=float, help="seconds of measured time per case (default 0.3 quick, 3 full)")
    p.add_argument("--min-reps", type=int, help="least timed repetitions per variant (default 3 quick, 5 full)")
    p.add_argument("--max-reps", type=int, default=100, help="most timed repetitions per variant (default 100)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls before measuring (default 1; "
                   "the memory-measuring call follows them)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--csv", metavar="PATH", help="write every number to this CSV file")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots per loss to this folder (needs matplotlib)")
    p.add_argument("--machine", help="text describing the machine, stored in the JSON/CSV (default: detected)")
    p.add_argument("--wide", action="store_true", help="the wide table: each variant's peak MiB, the memory "
                   "ratio against torch.compile and, on CUDA, the floor (the JSON and CSV always have them)")
    p.add_argument("--launch", action="append", default=[], metavar="KERNEL:KEY=VALUE[,KEY=VALUE]",
                   help="set a Triton kernel's launch options (num_warps, num_stages, maxnreg) for this run, "
                   "e.g. _rkd_angle_fwd_fast_kernel:maxnreg=128; repeatable (fastkd.bench.launch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-precompile", action="store_true", help="on the CPU with a core to spare beyond "
                   "--threads: do not compile the references ahead in a second process (fastkd.bench.precompile)")
    return p


def settings_from(args):
    """The run's settings from parsed arguments, defaults filled in by sweep and device."""
    sweep = args.sweep or ("quick" if args.quick else "full")
    try:
        device = device_from(args.device)
    except ValueError as err:
        raise SystemExit(f"fastkd.bench: {err}") from None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in measure.VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"fastkd.bench: --variants takes {', '.join(measure.VARIANTS)}; got {args.variants!r}")
    quick = sweep != "full"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        max_memory = parse_memory(args.max_memory, total) if args.max_memory else None
    else:
        avail = available_memory()
        max_memory = parse_memory(args.max_memory or "50%", avail) if (args.max_memory or avail) else None
    try:
        losses = None if not args.losses else [cases_mod.canonical(n) for n in args.losses.split(",") if n.strip()]
    except ValueError as err:
        raise SystemExit(f"fastkd.bench: {err}") from None
    if args.cases:
        try:
            re.compile(args.cases)
        except re.error as err:
            raise SystemExit(f"fastkd.bench: --cases is not a regular expression: {err}") from None
    try:
        launches = [launch.parse(text) for text in args.launch]
        for name, _ in launches:
            launch.kernel(name)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"fastkd.bench: {err}") from None
    return {
        "sweep": sweep, "cases": args.cases, "device": str(device), "dtype": args.dtype, "variants": variants, "losses": losses,
        "max_memory": max_memory,
        "max_call_s": args.max_call_seconds or (5.0 if quick else 30.0),
        "budget_s": args.budget or (0.3 if quick else 3.0),
        "min_reps": args.min_reps or (3 if quick else 5), "max_reps": args.max_reps, "warmup": args.warmup,
        "threads": args.threads or torch.get_num_threads(),
        "precompile": not args.no_precompile,
        "launch": dict(launches),
    }


def sweep_cases(settings, device):
    """The cases settings name: the sweep's for the device, those whose name matches
    settings["cases"]."""
    todo = cases_mod.cases(settings["sweep"], device.type, settings["losses"])
    if settings.get("cases"):
        todo = [c for c in todo if re.search(settings["cases"], c.name)]
    return todo


def run(settings, machine=None, variants=None, progress=True, cases=None, on_start=None, on_record=None):
    """Run the benchmark; returns the run dict that report.* print and write.

    variants: {name: builder} overriding measure.VARIANTS (the tests use this); cases:
    the list of cases (default: the sweep's, those whose name matches settings["cases"]);
    on_start(run, known): called before the first case, with the run's metadata and the
    (loss, shape, fastkd path) of each case to come; on_record(run): called with the run
    so far after each case, so that a run stopped part-way (a time limit) leaves what it
    measured.
    """
    device = torch.device(settings["device"])
    dtype = DTYPES[settings["dtype"]]
    torch.set_num_threads(settings["threads"])
    launch.apply(settings.get("launch", {}).items())
    builders = variants or {v: measure.VARIANTS[v] for v in settings["variants"]}
    settings = dict(settings, variants=list(builders))
    todo = sweep_cases(settings, device) if cases is None else cases
    compiled = [v for v in builders if v in measure.COMPILED]
    # The second process rebuilds the sweep's cases, so it runs only for those.
    ahead = precompile.Precompiler(settings, compiled if settings.get("precompile") and cases is None else [])
    settings["precompile"] = ahead.active
    info = describe_device(device)
    if machine:
        info["description"] = machine
    if device.type == "cuda":
        if settings["max_memory"]:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, settings["max_memory"] / total), device)
        info.update(roofline.device_peaks(device))
    out = {"fastkd": fastkd.__version__, "torch": torch.__version__, "triton": _triton_version(),
           "python": platform.python_version(), "git_commit": git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": info, "settings": settings, "results": []}
    paths = [fastkd_path(case.loss, device, case.numel) for case in todo]
    if on_start is not None:
        on_start(out, [(case.loss, case.shape, report.path_cell(path)) for case, path in zip(todo, paths)])
    if compiled:
        measure.warm_compiler(device)
    bar = report.Progress(len(todo), enabled=progress)
    # (loss, its arguments, variant) -> (size, status): not tried at larger sizes (the
    # arguments tell FusedLinearDistillation's divergences apart, whose references differ).
    failed_at = {}
    start = time.monotonic()
    try:
        for index, (case, path) in enumerate(zip(todo, paths)):
            ahead.at(index)
            skip = {v: status for v in builders
                    for size, status in [failed_at.get((case.loss, case.args, v), (None, None))]
                    if case.monotone and size is not None and case.size >= size}
            results = measure.run_case(
                case, device, case.dtype or dtype, builders, warmup=settings["warmup"], min_reps=settings["min_reps"],
                max_reps=settings["max_reps"], budget_s=settings["budget_s"], max_call_s=settings["max_call_s"],
                max_memory=settings["max_memory"] if device.type == "cpu" else None, skip=skip, progress=bar.show,
                quiet=ahead.paused)
            for v, res in results.items():
                if res["status"] in (measure.OOM, measure.TOO_SLOW) and not res["skipped"] and case.monotone:
                    failed_at.setdefault((case.loss, case.args, v), (case.size, res["status"]))
            record = {"loss": case.loss, "shape": case.shape, "x": case.x, "x_name": case.x_name, "size": case.size,
                      "monotone": case.monotone, "params": case.params, "fastkd_path": path,
                      "variants": results, "floor": None, "dtype": str(case.dtype or dtype).removeprefix("torch.")}
            report.add_ratios(record, min_memory_bytes=2 ** 20 if device.type == "cpu" else 0)
            if device.type == "cuda" and case.floor:
                fast = results.get("fastkd") or {}
                record["floor"] = roofline.floor(case, dtype, info, fast.get("time_s"))
            out["results"].append(record)
            if on_record is not None:
                on_record(out)
            bar.advance(case.name)
    finally:
        ahead.close()
    bar.close()
    out["run_seconds"] = time.monotonic() - start
    out["beyond"] = report.beyond(out["results"])
    return out


def main(argv=None):
    args = parser().parse_args(argv)
    if args.host:
        try:
            losses = None if not args.losses else [cases_mod.canonical(n) for n in args.losses.split(",") if n.strip()]
        except ValueError as err:
            raise SystemExit(f"fastkd.bench: {err}") from None
        return host.main(losses, json_path=args.json)
    settings = settings_from(args)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break notices are expected here
    table = None

    def start(partial, known):  # the header at once, then a row per case as it ends
        nonlocal table
        print(report.header(partial), end="\n\n", flush=True)
        table = report.StreamingTable(partial["settings"]["variants"], known, wide=args.wide,
                                      floor=partial["device"]["type"] == "cuda")
        table.start()

    def save(partial):  # after every case, so a run stopped part-way keeps what it measured
        if args.json:
            report.write_json(partial, args.json)
        if args.csv:
            report.write_csv(partial, args.csv)
        table.row(partial["results"][-1])

    result = run(settings, machine=args.machine, progress=not args.no_progress,
                 on_start=start, on_record=save)
    print("\n".join(["", *report.legend(result, args.wide)]))
    print(f"\n{len(result['results'])} cases in {result['run_seconds']:.0f} s")
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        report.write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        try:
            files = report.write_plots(result, args.plot)
        except report.MissingMatplotlib as err:
            print(f"fastkd.bench: {err}", file=sys.stderr)
            return 2
        print(f"wrote {len(files)} plots to {args.plot}")
    return 0


def entry_point():
    """The command's entry point: main(), then exit without the interpreter's teardown.

    Triton's compiled bindings report leaked objects on stderr at interpreter teardown
    (a false alarm of theirs), after the table; everything of ours is written and closed
    by then.
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
