"""CPU time of fastkd.compat.repdistiller against RepDistiller's own losses, forward + backward.

    python benchmarks/repdistiller_cpu.py /path/to/RepDistiller

At the shapes RepDistiller's CIFAR-100 scripts give (batch 64; resnet32x4 -> resnet8x4):
RKDLoss on the penultimate features (64, 256) and at larger batches; NSTLoss and Attention
on the three blocks' maps (64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8). Best of repeated
interleaved runs, float32, 1 thread, process CPU time (robust to other jobs on the machine), after a
warm-up; prints a Markdown table.
"""
import importlib.util
import sys
import time
from pathlib import Path

import torch

import fastkd
from fastkd.compat import repdistiller as compat


def _load_zoo(root):
    spec = importlib.util.spec_from_file_location("_rd_zoo", Path(root) / "distiller_zoo" / "__init__.py",
                                                  submodule_search_locations=[str(Path(root) / "distiller_zoo")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_rd_zoo"] = mod
    spec.loader.exec_module(mod)
    return mod


def _times(fns, repeat):
    """Best CPU ms (process time, 1 thread) of each function, run interleaved: on a shared
    machine the wall time counts the other jobs' turns, the process time does not."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - t0)
    return [b * 1e3 for b in best]


def _step(module, make):
    def fn():
        args = make()
        out = module(*args)
        total = sum(out) if isinstance(out, list) else out
        total.sum().backward()
    return fn


def main(root, repeat=7):
    torch.set_num_threads(1)
    zoo = _load_zoo(root)
    torch.manual_seed(0)
    rows = []
    for n in (64, 128):
        f_s, f_t = torch.randn(n, 256), torch.randn(n, 256)
        make = lambda: (f_s.clone().requires_grad_(), f_t)  # noqa: E731
        own = fastkd.RKD(25.0, 50.0)
        rows.append((f"RKDLoss ({n}, 256)", *_times([_step(zoo.RKDLoss(), make), _step(compat.RKDLoss(), make),
                                                      _step(lambda s, t: own(s, t.detach()), make)], repeat)))
    shapes = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8)]
    g_s = [torch.randn(*s) for s in shapes]
    g_t = [torch.randn(*s) for s in shapes]
    make = lambda: ([x.clone().requires_grad_() for x in g_s], g_t)  # noqa: E731
    own = fastkd.NST()
    rows.append(("NSTLoss resnet8x4 blocks 1-3",
                 *_times([_step(zoo.NSTLoss(), make), _step(compat.NSTLoss(), make),
                          _step(lambda gs, gt: [own(s, t) for s, t in zip(gs, gt)], make)], repeat)))
    own_at = fastkd.AT(2)
    rows.append(("Attention resnet8x4 blocks 1-3",
                 *_times([_step(zoo.Attention(), make), _step(compat.Attention(), make),
                          _step(lambda gs, gt: [own_at(s, t) for s, t in zip(gs, gt)], make)], repeat)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward, best-of CPU ms")
    print("| loss, shape | RepDistiller ms | fastkd.compat ms | x | fastkd.RKD / fastkd.NST / fastkd.AT ms |")
    print("|---|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.1f}x | {c:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
