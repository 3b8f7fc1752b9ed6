"""RepDistiller's train_student.py, unchanged, with its own losses and with fastkd's.

    python benchmarks/repdistiller_train.py /path/to/RepDistiller [--modes kd,crd,...]

For each --distill mode, runs RepDistiller's ``train_student.py`` twice in fresh processes
on the CPU, from the same seed, on a tiny generated CIFAR-shaped data set (64 training and
32 test images, 3x32x32, 100 classes; resnet14 teacher with random weights, resnet8
student; 1 epoch of batch 16, and 1 initialisation epoch for the two-stage modes):

- ``repdistiller``: its own ``distiller_zoo`` and ``crd.criterion`` (its ContrastMemory's
  ``.cuda()`` on the sampler made a no-op, so that it runs without a GPU);
- ``fastkd``: ``distiller_zoo`` and ``crd.criterion`` resolved to
  ``fastkd.compat.repdistiller`` (what ``from fastkd.compat.repdistiller import *`` does
  to the script).

Stubbed, the same for both: ``tensorboard_logger`` (a no-op logger) and
``dataset.cifar100``'s two loader functions (the generated data; CRD's negatives drawn
from a fixed generator per sample). Each pair runs in float32 (as the script does) and in
float64 (the script's ``.cuda()`` calls, made while ``torch.cuda.is_available`` reports
True, become ``.double()``: the weights are initialised in float32 as in the float32 run,
then converted). Every scalar the script calls ``backward`` on is recorded. The table
gives, in float64, the largest relative difference of those losses and of the student's
final weights (``<model_s>_last.pth``: the largest |difference| over the largest |weight|)
between fastkd's run and RepDistiller's; in float32, how far each one's final weights are
from RepDistiller's float64 ones (float32 rounding, grown over the SGD steps); and each
float32 run's wall time (1 thread).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ["kd", "hint", "attention", "similarity", "correlation", "vid", "crd", "kdsvd", "fsp", "rkd",
         "pkt", "abound", "factor", "nst"]
# -a (alpha) and -b (beta) of RepDistiller's scripts/run_cifar_distill.sh.
WEIGHTS = {"kd": ("0.9", "0"), "hint": ("0", "100"), "attention": ("0", "1000"),
           "similarity": ("0", "3000"), "correlation": ("0", "0.02"), "vid": ("0", "1"),
           "rkd": ("0", "1"), "pkt": ("0", "30000"), "abound": ("0", "1"), "factor": ("0", "200"),
           "fsp": ("0", "50"), "nst": ("0", "50"), "crd": ("0", "0.8"), "kdsvd": ("0", "1")}

BOOTSTRAP = r'''
import json, os, runpy, sys, types
import numpy as np
import torch
root, impl, out_path, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, root)
torch.set_num_threads(int(os.environ.get("HARNESS_THREADS", "1")))

logger = types.ModuleType("tensorboard_logger")
class Logger:
    def __init__(self, *a, **k): pass
    def log_value(self, *a, **k): pass
logger.Logger = Logger
sys.modules["tensorboard_logger"] = logger

class Data(torch.utils.data.Dataset):
    def __init__(self, n, seed, k=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 100, (n,), generator=g)
        self.k = k
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        if self.k is None:
            return self.x[i], int(self.y[i]), i
        rng = np.random.RandomState(1000 + i)
        neg = rng.choice([j for j in range(len(self.y)) if j != i], self.k, replace=self.k >= len(self.y))
        return self.x[i], int(self.y[i]), i, np.hstack(([i], neg))

class TestData(Data):
    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

def loaders(batch_size=16, num_workers=0, is_instance=False, k=None, mode="exact"):
    train = Data(64, 1, k)
    test = TestData(32, 2)
    dl = torch.utils.data.DataLoader
    return dl(train, batch_size=batch_size, shuffle=True), dl(test, batch_size=batch_size), len(train)

cifar = types.ModuleType("dataset.cifar100")
cifar.get_cifar100_dataloaders = lambda batch_size=16, num_workers=0, is_instance=True: loaders(batch_size)
cifar.get_cifar100_dataloaders_sample = lambda batch_size=16, num_workers=0, k=4096, mode="exact": loaders(batch_size, k=k)
sys.modules["dataset.cifar100"] = cifar

if impl == "fastkd":
    import fastkd.compat.repdistiller as compat
    import crd
    sys.modules["distiller_zoo"] = compat
    sys.modules["crd.criterion"] = compat
else:
    import crd.memory
    crd.memory.AliasMethod.cuda = lambda self: None

if os.environ.get("HARNESS_FLOAT64") == "1":
    # float64 run: the script moves its modules and batches with .cuda() when CUDA is
    # available; here that means .double() (weights initialised in float32, as in the
    # float32 run, then converted; integer tensors unchanged).
    torch.cuda.is_available = lambda: True
    torch.nn.Module.cuda = lambda self, device=None: self.double()
    torch.Tensor.cuda = lambda self, *a, **k: self.double() if self.is_floating_point() else self
    import torch.backends.cudnn

losses = []
backward = torch.Tensor.backward
def recording_backward(self, *a, **k):
    if self.numel() == 1:
        losses.append(self.detach().double().item())
    return backward(self, *a, **k)
torch.Tensor.backward = recording_backward

torch.manual_seed(0)
np.random.seed(0)
sys.argv = ["train_student.py", *argv]
try:
    runpy.run_path(root + "/train_student.py", run_name="__main__")
finally:
    json.dump(losses, open(out_path, "w"))
'''


def _teacher(root, folder):
    """A resnet14 checkpoint with random weights where train_student.py looks for it."""
    path = Path(folder) / "save" / "models" / "resnet14_cifar100_tiny" / "resnet14_best.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    code = (f"import sys, torch; sys.path.insert(0, {str(root)!r}); from models import model_dict; "
            f"torch.manual_seed(123); torch.save({{'model': model_dict['resnet14'](num_classes=100).state_dict()}}, "
            f"{str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def run(root, mode, impl, folder, teacher, threads=1, float64=False):
    work = Path(folder) / f"{impl}-{threads}-{64 if float64 else 32}" / mode
    work.mkdir(parents=True, exist_ok=True)
    a, b = WEIGHTS[mode]
    argv = ["--path_t", str(teacher), "--distill", mode, "--model_s", "resnet8", "-r", "1", "-a", a, "-b", b,
            "--epochs", "1", "--init_epochs", "1", "--batch_size", "16", "--num_workers", "0",
            "--print_freq", "1000", "--nce_k", "16", "--feat_dim", "16", "--trial", "0"]
    out = work / "losses.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HARNESS_THREADS=str(threads),
               HARNESS_FLOAT64="1" if float64 else "0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(root), impl, str(out), *argv], cwd=work,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{mode} with {impl} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    import torch
    last = next(work.glob("save/student_model/*/resnet8_last.pth"))
    weights = torch.load(last, weights_only=False)["model"]
    return json.loads(out.read_text()), weights, wall


def _loss_diff(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def _weight_diff(a, b):
    """Largest |a - b| over the student's floating-point state, over b's largest |value|."""
    keys = [k for k in b if b[k].is_floating_point()]
    scale = max(b[k].abs().max().item() for k in keys)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys) / scale


def compare(root, modes, folder):
    """Per mode: fastkd against RepDistiller in float64 (losses, final weights); in float32,
    each one's final weights against RepDistiller's float64 ones; wall times (float32)."""
    teacher = _teacher(root, folder)
    rows = []
    for mode in modes:
        r = {(impl, f64): run(root, mode, impl, folder, teacher, float64=f64)
             for impl in ("repdistiller", "fastkd") for f64 in (True, False)}
        base_l, base_w, _ = r["repdistiller", True]
        fk_l, fk_w, _ = r["fastkd", True]
        rows.append((mode, len(base_l), _loss_diff(fk_l, base_l), _weight_diff(fk_w, base_w),
                     _weight_diff(r["fastkd", False][1], base_w), _weight_diff(r["repdistiller", False][1], base_w),
                     r["repdistiller", False][2], r["fastkd", False][2]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a checkout of RepDistiller")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = compare(Path(args.root).resolve(), args.modes.split(","), folder)
    print("| --distill | losses | float64: losses | float64: weights | float32: fastkd's weights "
          "| float32: RepDistiller's weights | RepDistiller s | fastkd s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, n, le, we, w32, r32, t1, t2 in rows:
        print(f"| {mode} | {n} | {le:.1e} | {we:.1e} | {w32:.1e} | {r32:.1e} | {t1:.1f} | {t2:.1f} |")


if __name__ == "__main__":
    main()
