"""The fastkd command (or python -m fastkd): each method, its ops, and the backend each op runs on here."""
import argparse
import os
import sys

import torch

from . import backend
from .registry import EXTENSIONS, METHODS

# The project's other commands, one line each in --help; each takes --help for its options.
COMMANDS = (
    ("python -m fastkd.bench", "time and peak memory of every loss, reference vs fastkd (fastkd-bench)"),
    ("python -m fastkd.bench --host", "per-call cost on a GPU at the collection's shapes, measured on the CPU"),
    ("python -m fastkd.bench.traffic",
     "bytes each memory-bound loss's Triton path moves against its floor, without a GPU"),
    ("python -m fastkd.bench.global_batch",
     "one rank's time and memory of the global-batch losses vs world size"),
    ("python -m fastkd.examples.digits", "end-to-end distillation on sklearn's digits, each method vs Baseline"),
    ("python -m fastkd.examples.lm", "a small language model's logits distilled with FusedLinearSoftTarget"),
    ("python -m fastkd.kernels.resources",
     "each Triton kernel compiled for sm_90/sm_80 without a GPU: registers, spills"),
)


def program_name(module, script):
    """The name a command was started by, for its usage line: the console script's name
    (setup.py's entry points) when run as one, else 'python -m <module>'."""
    started = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if started == script else f"python -m {module}"


def device_from(text):
    """The torch.device of a --device value: cpu, cuda or cuda:N, where N is a CUDA device
    torch sees. Raises ValueError with a one-line message naming --device otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device takes cpu, cuda or cuda:N (N a GPU index); got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {text}: torch sees no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: torch sees {count} CUDA device(s), "
                             f"so N in cuda:N goes from 0 to {count - 1}")
    return device


def main(argv=None):
    prog = program_name("fastkd", "fastkd")
    width = max(len(command) for command, _ in COMMANDS)
    epilog = "other commands (each with --help):\n" + "\n".join(
        f"  {command:<{width}}  {what}" for command, what in COMMANDS)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is one)")
    args = parser.parse_args(argv)
    try:
        device = device_from(args.device)
    except ValueError as err:
        raise SystemExit(f"{prog}: {err}") from None
    print(f"fastkd on {device} (requested backend: {backend.current_backend()})")
    print(f"{'method':<22} {'op':<25} {'runs on':<10} available")
    print(f"{'Baseline':<22} {'cross_entropy':<25} {'torch':<10} torch")
    for method, ops in {**METHODS, **EXTENSIONS}.items():
        for op in ops:
            try:
                chosen = backend.resolve(op, device)
            except backend.BackendUnavailableError:
                chosen = "-"
            print(f"{method:<22} {op:<25} {chosen:<10} {', '.join(backend.available(op, device))}")


if __name__ == "__main__":
    main()
