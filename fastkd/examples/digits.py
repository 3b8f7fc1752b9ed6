"""End-to-end distillation on scikit-learn's handwritten digits (1,797 8x8 images).

    python -m fastkd.examples.digits [--methods AT RKD ...] [--epochs 30] [--seeds 0 1 2]
                                     [--batch-size 64] [--backend auto] [--device cpu]
                                     [--json results.json] [--plot accuracy.png] [--nproc N]
    torchrun --nproc_per_node N -m fastkd.examples.digits ...

For each seed: trains the teacher (Baseline), the student alone (Baseline), then
one student per method from the same initial weights, the same batches and the
same schedule, and prints the test accuracy of each (after the last epoch: the
collection logs the best epoch's, which picks on the test set) beside the student
Baseline. The loss weights are the collection's CIFAR ones unless --kd-weight
replaces them; some suit 8x8 images less (AT's and AFD's maps, normalised over
H x W, are 16 times smaller, so their weights act about 16 times stronger).

Each method trains as the collection's train_*.py scripts run it, with their
loss weights; the collection's 200-epoch schedules are scaled to --epochs:
  - SGD (momentum 0.9, Nesterov, weight decay 1e-4), lr 0.1, divided by 10 at
    1/2 and 3/4 of training; the loss modules' own parameters (VID, OFD, AFD,
    CRD's embeddings, FT's translator, connectors) train with the student;
  - AB and FSP: a feature-only initialisation stage (the KD loss alone, a
    quarter of --epochs, lr 0.01 then 0.001 then 0.0001), then plain softmax;
  - FT: the paraphraser is first trained to reconstruct the teacher's last stage
    (15% of --epochs, lr 0.01), then frozen;
  - BSS: no KD for the first 5% of epochs, then a linearly decaying weight;
    each step attacks up to 32 samples both nets classify correctly (the ones
    the two disagree on most), towards a class drawn from the teacher's
    softmax, and matches the nets on the attacked samples;
  - CRD: each sample's dataset index and nce_n negatives drawn from the other
    classes, with the loss's memory of past embeddings;
  - DML: a teacher-shaped peer and the student, from their initial weights,
    trained together, each with CE + DML against the other;
  - Sobolev and LwM: the input requires grad (input gradients / Grad-CAM).
The student is thinner than the teacher, so Hint, AB, FSP and AFD, which
compare maps channel by channel, read the student's maps through a 1x1 conv +
BN connector trained with it (the collection pairs equal-width ResNets).

Data-parallel (--nproc N > 1 starts N processes, gloo on CPU or nccl on cuda:0..N-1; or
torchrun, read from RANK, WORLD_SIZE, LOCAL_RANK): every rank draws the same global batches
as one process (--batch-size, which N must divide) and trains on its rows, with the student
and the method's modules in DistributedDataParallel. So that the training is one process's
on the global batch: batch norm normalises with the global batch's statistics
(GlobalBatchNorm); RKD, SP, PKTCosSim, CC, IRG and CRD are built with global_batch=True
(CRD's negatives are drawn for the whole batch, as one process draws them); the recorded
losses are the global batch's (the mean of the ranks'). The other methods (Logits,
SoftTarget, AT, Hint, NST, VID, AFD, and AB and FSP with their initialisation stage) are
per-sample means and need nothing more; FT's paraphraser and DML's peer train data-parallel
too, BSS chooses and attacks among the whole batch on every rank, each rank then training
on its share of the attacked samples, and Sobolev's and LwM's input gradients go through
the global batch norm, which differentiates twice. OFD is refused (its margin is a
statistic of the batch's teacher map, which fastkd.OFD would take over the local rows):
named, it is an error, and 'all' leaves it out. Only rank 0 prints and writes. Without
--nproc, or with 1, nothing of this runs.
"""
import argparse
import importlib.util
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fastkd
from fastkd import distributed

from ..__main__ import device_from
from . import models

COLLECTION_EPOCHS = 200  # the collection's schedules, scaled to --epochs
NUM_CLASSES = 10
TEST_FRACTION, SPLIT_SEED = 0.2, 0


# ----------------------------------------------------------------------------- data

class Digits:
    """sklearn's digits, split once (stratified, fixed seed), as tensors on device.

    Images are kept in [0, 1] and standardised with the training set's mean and
    std after augmentation (a random shift of up to one pixel; no flips: digits
    are not mirror-symmetric).
    """

    def __init__(self, device):
        if importlib.util.find_spec("sklearn") is None:
            raise SystemExit("the digits example needs scikit-learn: pip install scikit-learn "
                             "(or, in a clone of fastkd: pip install -e '.[examples]')")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(
            digits.images / 16.0, digits.target, test_size=TEST_FRACTION,
            random_state=SPLIT_SEED, stratify=digits.target)
        as_x = lambda a: torch.tensor(a, dtype=torch.float32, device=device).unsqueeze(1)
        as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)
        self.train_x, self.test_x = as_x(x_tr), as_x(x_te)
        self.train_y, self.test_y = as_y(y_tr), as_y(y_te)
        self.mean, self.std = self.train_x.mean().item(), self.train_x.std().item()
        self.device = device
        # For CRD: the training indices of each class's negatives (every other class).
        self.negatives = [torch.nonzero(self.train_y != c).view(-1) for c in range(NUM_CLASSES)]

    def normalize(self, x):
        return (x - self.mean) / self.std

    def shift(self, x, gen):
        """Each image moved by -1, 0 or +1 pixel in each direction (zero fill)."""
        b, size = x.shape[0], x.shape[-1]
        padded = F.pad(x, (1, 1, 1, 1))
        oy, ox = torch.randint(0, 3, (2, b), generator=gen).to(x.device)
        ar = torch.arange(size, device=x.device)
        rows = (oy[:, None] + ar)[:, :, None]
        cols = (ox[:, None] + ar)[:, None, :]
        return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)

    def batches(self, batch_size, gen, steps=None):
        """One epoch of shuffled, augmented training batches (the last partial one dropped)."""
        n = self.train_y.shape[0]
        order = torch.randperm(n, generator=gen)
        count = n // batch_size if steps is None else min(steps, n // batch_size)
        for i in range(count):
            idx = order[i * batch_size:(i + 1) * batch_size].to(self.device)
            yield Batch(self.normalize(self.shift(self.train_x[idx], gen)), self.train_y[idx], idx)

    def contrast_indices(self, idx, target, nce_n, gen):
        """(B, nce_n + 1): each sample's own index, then nce_n indices of other classes
        (without replacement when there are enough, as the collection)."""
        sample_idx = torch.empty(idx.shape[0], nce_n + 1, dtype=torch.int64, device=self.device)
        sample_idx[:, 0] = idx
        for c in target.unique().tolist():
            rows = torch.nonzero(target == c).view(-1)
            pool = self.negatives[c]
            if nce_n <= pool.numel():
                pick = torch.rand(rows.numel(), pool.numel(), generator=gen).argsort(dim=1)[:, :nce_n]
            else:
                pick = torch.randint(0, pool.numel(), (rows.numel(), nce_n), generator=gen)
            sample_idx[rows, 1:] = pool[pick.to(self.device)]
        return sample_idx


# whole: under data parallelism, the global batch this rank's rows were cut from (None otherwise).
Batch = namedtuple("Batch", "img target idx whole", defaults=(None,))


# ----------------------------------------------------------------------------- training setup

@dataclass
class Config:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    steps_per_epoch: Optional[int] = None  # cap on batches per epoch (smoke tests)
    kd_weights: dict = field(default_factory=dict)  # method name -> lambda_kd replacing its default
    device: str = "cpu"
    progress: bool = True


def scaled(epochs, collection_epochs):
    """A stage of collection_epochs (out of the collection's 200) scaled to epochs, at least 1."""
    return max(1, round(epochs * collection_epochs / COLLECTION_EPOCHS))


def main_lr(cfg, epoch):
    """lr, then lr/10 after half of the epochs, lr/100 after three quarters (1-based epoch)."""
    if epoch <= cfg.epochs / 2:
        return cfg.lr
    return cfg.lr * (0.1 if epoch <= cfg.epochs * 3 / 4 else 0.01)


def sgd(params, cfg, lr, nesterov=True):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=nesterov)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Run:
    """What one training run sees: data, config, seed, the trained teacher, the initial
    weights, a seeded generator (batch order, augmentation, sampling) and the record
    of every step's loss; under data parallelism, this process's rank among world."""
    data: Digits
    cfg: Config
    seed: int
    teacher: Optional[nn.Module]
    teacher_init: dict
    student_init: dict
    gen: torch.Generator = field(default_factory=torch.Generator)
    losses: list = field(default_factory=list)
    progress: Optional["Progress"] = None
    rank: int = 0
    world: int = 1

    def batches(self):
        batches = self.data.batches(self.cfg.batch_size, self.gen, self.cfg.steps_per_epoch)
        if self.world == 1:
            return batches
        # Every rank draws the whole global batch (the same generator calls as one process,
        # so the same batches in the same order) and keeps its rows.
        return (Batch(self.shard(b.img), self.shard(b.target), self.shard(b.idx), whole=b) for b in batches)

    def shard(self, x):
        """This rank's rows of a global batch's tensor (cfg.batch_size divides evenly)."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def teacher_features(self, img, grad=False):
        with torch.set_grad_enabled(grad):
            return self.teacher(img)

    def record(self, loss):
        self.losses.append(loss.detach())


class Progress:
    """A one-line progress bar on stderr: label, bar, epochs done, last loss, time.
    Redrawn in place on a terminal; elsewhere (logs, CI) written once, when done."""

    def __init__(self, label, total, enabled=True, width=20):
        self.label, self.total, self.enabled, self.width, self.done = label, total, enabled, width, 0
        self.live = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.info = ""
        if self.live:
            self._draw()

    def _draw(self):
        filled = self.width * self.done // max(self.total, 1)
        redraw = "\r" if self.live else ""
        sys.stderr.write(f"{redraw}{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{self.done}/{self.total} {self.info}")
        sys.stderr.flush()

    def tick(self, loss):
        self.done += 1
        self.info = f"loss {loss:.4f} {time.perf_counter() - self.start:.0f}s "
        if self.live:
            self._draw()

    def close(self):
        if self.enabled:
            if not self.live:
                self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


def freeze(net):
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------- methods

class Method:
    """A way to train a student: loss modules, trainable extras, stages, weight schedule.

    A subclass sets lambda_kd (the collection's weight) and defines
    loss(run, student, batch, s, t) -> the KD loss of one batch, from the student's and
    the teacher's Features s and t. ``self.modules`` hold what trains with the student.
    """
    lambda_kd = 1.0
    uses_teacher = True
    input_grad = False  # the loss differentiates the nets' outputs w.r.t. the input
    pre_epochs = 0      # epochs of the stage run by prepare()
    not_data_parallel = None  # why the method cannot train data-parallel (None: it can)

    def __init__(self, run, student, teacher_channels):
        self.modules = nn.ModuleList()
        self.lambda_kd = run.cfg.kd_weights.get(type(self).__name__, self.lambda_kd)

    def prepare(self, run, step, optimizer):
        """A stage before softmax training (AB, FSP, FT); step is the run's Step (or its
        DistributedDataParallel wrapper)."""

    def weight(self, epoch, epochs):
        return self.lambda_kd

    def start_epoch(self, lr):
        self.modules.train()

    def after_step(self):
        """Work after the student's optimizer step (DML's peer update)."""


METHODS = {}


def method(cls):
    METHODS[cls.__name__] = cls
    return cls


def _mean(losses):
    return sum(losses) / len(losses)


def _connectors(s_channels, t_channels):
    return nn.ModuleList(models.Connector(s, t) for s, t in zip(s_channels, t_channels))


def _stages(f):
    return (f.stage1, f.stage2, f.stage3)


class Baseline(Method):
    """Cross-entropy only."""
    lambda_kd = 0.0
    uses_teacher = False


@method
class Logits(Method):
    lambda_kd = 0.1

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.Logits()

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.out, t.out)


@method
class SoftTarget(Method):
    lambda_kd = 0.1

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.SoftTarget(4.0)

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.out, t.out)


@method
class AT(Method):
    lambda_kd = 1000.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.AT(2.0)

    def loss(self, run, student, batch, s, t):
        return _mean([self.criterion(a[1], b[1]) for a, b in zip(_stages(s), _stages(t))])


@method
class Hint(Method):
    lambda_kd = 0.1

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.Hint()
        self.modules = _connectors(student.channels()[3:4], teacher_channels[3:4])

    def loss(self, run, student, batch, s, t):
        return self.criterion(self.modules[0](s.stage3[1]), t.stage3[1])


@method
class NST(Method):
    lambda_kd = 10.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.NST()

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.stage3[1], t.stage3[1])


@method
class PKTCosSim(Method):
    lambda_kd = 10000.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.PKTCosSim(global_batch=run.world > 1)

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.feat, t.feat)


class FeatureInit(Method):
    """AB and FSP: the KD loss alone trains the student (through its connectors) for a
    stage scaled from the collection's 50 epochs (lr/10 for 60%, lr/100, lr/1000), then
    the student trains with softmax only."""

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.pre_epochs = scaled(run.cfg.epochs, 50)

    def prepare(self, run, step, optimizer):
        for epoch in range(1, self.pre_epochs + 1):
            scale = 0.1 if epoch <= 0.6 * self.pre_epochs else (0.01 if epoch <= 0.8 * self.pre_epochs else 0.001)
            set_lr(optimizer, run.cfg.lr * scale)
            step.train()
            for batch in run.batches():
                loss = step(run, batch, self.lambda_kd, ce=False)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                run.record(loss)
            run.progress.tick(loss.item())

    def weight(self, epoch, epochs):
        return 0.0


@method
class FSP(FeatureInit):
    lambda_kd = 1.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.FSP()
        self.modules = _connectors(student.channels()[:4], teacher_channels[:4])

    def loss(self, run, student, batch, s, t):
        maps_s = [c(f[1]) for c, f in zip(self.modules, (s.stem,) + _stages(s))]
        maps_t = [f[1] for f in (t.stem,) + _stages(t)]
        return _mean([self.criterion(maps_s[k], maps_s[k + 1], maps_t[k], maps_t[k + 1]) for k in range(3)])


@method
class FT(Method):
    """Paraphraser (k = 0.5) pre-trained on the teacher's last stage, then frozen; the
    translator trains with the student."""
    lambda_kd = 200.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.FT()
        self.paraphraser = fastkd.Paraphraser(teacher_channels[3], 0.5, use_bn=True).to(run.cfg.device)
        self.modules = nn.ModuleList([fastkd.Translator(student.channels()[3], teacher_channels[3], 0.5,
                                                        use_bn=True)])
        self.pre_epochs = scaled(run.cfg.epochs, 30)

    def prepare(self, run, step, optimizer):
        para_opt = sgd(self.paraphraser.parameters(), run.cfg, run.cfg.lr * 0.1, nesterov=False)
        self.paraphraser.train()
        paraphraser = self.paraphraser
        if run.world > 1:  # trained data-parallel, as the student is
            paraphraser = DistributedDataParallel(global_batch_norm(self.paraphraser), **NO_BUFFER_SYNC)
        for _ in range(self.pre_epochs):
            for batch in run.batches():
                fm_t = run.teacher_features(batch.img).stage3[1]
                loss = F.mse_loss(paraphraser(fm_t)[1], fm_t)
                para_opt.zero_grad()
                loss.backward()
                para_opt.step()
                run.record(loss)
            run.progress.tick(loss.item())
        freeze(self.paraphraser)

    def loss(self, run, student, batch, s, t):
        with torch.no_grad():
            factor_t = self.paraphraser(t.stage3[1])[0]
        return self.criterion(self.modules[0](s.stage3[1]), factor_t)


@method
class RKD(Method):
    lambda_kd = 1.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.RKD(25.0, 50.0, global_batch=run.world > 1)

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.feat, t.feat)


@method
class AB(FeatureInit):
    lambda_kd = 10.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.AB(2.0)
        self.modules = _connectors(student.channels()[1:4], teacher_channels[1:4])

    def loss(self, run, student, batch, s, t):
        return _mean([self.criterion(c(a[0]), b[0]) for c, a, b in zip(self.modules, _stages(s), _stages(t))])


@method
class SP(Method):
    lambda_kd = 3000.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.SP(global_batch=run.world > 1)

    def loss(self, run, student, batch, s, t):
        return _mean([self.criterion(a[1], b[1]) for a, b in zip(_stages(s), _stages(t))])


@method
class Sobolev(Method):
    lambda_kd = 20.0
    input_grad = True

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.Sobolev()

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.out, t.out, batch.img, batch.target)


@method
class BSS(Method):
    """Boundary supporting samples: T = 3, attack_size 32, attacker (0.3, 10 steps)."""
    lambda_kd = 2.0
    attack_size = 32

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.BSS(3.0)
        self.attacker = fastkd.BSSAttacker(step_alpha=0.3, num_steps=10, eps=1e-4)
        self.warmup = scaled(run.cfg.epochs, 10)

    def weight(self, epoch, epochs):
        if epoch <= self.warmup:
            return 0.0
        return max(self.lambda_kd * (1 - 5 / 4 * (epoch - 1) / epochs), 0.0)

    def loss(self, run, student, batch, s, t):
        img, target = batch.img, batch.target
        out_s, out_t = s.out.detach(), t.out
        if batch.whole is not None:
            # Data-parallel: every rank chooses and attacks among the whole batch, as one
            # process does, then trains on its share of the attacked samples.
            img, target = batch.whole.img, batch.whole.target
            gathered = [torch.empty_like(out_s) for _ in range(run.world)]
            dist.all_gather(gathered, out_s)
            out_s, out_t = torch.cat(gathered), run.teacher_features(img).out
        chosen = torch.nonzero((out_s.argmax(1) == target) & (out_t.argmax(1) == target)).view(-1)
        if chosen.numel() == 0:
            return s.out.new_zeros(())
        if chosen.numel() > self.attack_size:
            # Keep the samples whose non-target probabilities the nets disagree on most.
            diff = (F.softmax(out_t[chosen], 1) - F.softmax(out_s[chosen], 1)) ** 2
            score = diff.sum(1) - diff.gather(1, target[chosen, None]).squeeze(1)
            chosen = chosen[score.argsort(descending=True)[:self.attack_size]]
        # Attack class: drawn from the teacher's softmax over the non-top classes.
        class_score, class_idx = F.softmax(out_t[chosen], 1).sort(dim=1, descending=True)
        class_score, class_idx = class_score[:, 1:], class_idx[:, 1:]
        draw = torch.rand(chosen.numel(), generator=run.gen).to(class_score.device) * class_score.sum(1)
        first = (class_score.cumsum(1) >= draw[:, None]).to(torch.int8).argmax(1)
        attack_class = class_idx.gather(1, first[:, None]).squeeze(1)
        attacked = self.attacker.attack(run.teacher, img[chosen], target[chosen], attack_class)
        if batch.whole is None:
            return self.criterion(student(attacked).out, run.teacher_features(attacked).out)
        mine = torch.tensor_split(attacked, run.world)[run.rank]
        out = student(mine).out  # on every rank, an empty share too: its batch norm is collective
        if mine.shape[0] == 0:
            return out.sum()  # 0, and the backward's collectives run here as on the other ranks
        # The criterion's mean over this rank's share, weighted so that the ranks' mean (after
        # the mean over ranks of the losses and DDP's of the gradients) is the whole set's.
        return self.criterion(out, run.teacher_features(mine).out) * (mine.shape[0] * run.world / attacked.shape[0])


@method
class CC(Method):
    lambda_kd = 100.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.CC(0.4, 2, global_batch=run.world > 1)

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.feat, t.feat)


@method
class LwM(Method):
    lambda_kd = 0.4
    input_grad = True

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.LwM()

    def loss(self, run, student, batch, s, t):
        return self.criterion(s.out, s.stage2[1], t.out, t.stage2[1], batch.target)


@method
class IRG(Method):
    lambda_kd = 1.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.IRG(0.1, 5.0, 5.0, global_batch=run.world > 1)

    def loss(self, run, student, batch, s, t):
        return self.criterion([s.stage2[1], s.stage3[1], s.feat, s.out],
                              [t.stage2[1], t.stage3[1], t.feat, t.out])


@method
class VID(Method):
    lambda_kd = 1.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.modules = nn.ModuleList(fastkd.VID(s, t, t, 5.0) for s, t in
                                     zip(student.channels()[1:4], teacher_channels[1:4]))

    def loss(self, run, student, batch, s, t):
        return _mean([vid(a[1], b[1]) for vid, a, b in zip(self.modules, _stages(s), _stages(t))])


@method
class OFD(Method):
    lambda_kd = 0.5
    not_data_parallel = ("its margin is a statistic of the teacher's map over the batch, which "
                         "fastkd.OFD would take over each process's rows alone")

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.modules = nn.ModuleList(fastkd.OFD(s, t) for s, t in
                                     zip(student.channels()[1:4], teacher_channels[1:4]))

    def loss(self, run, student, batch, s, t):
        return _mean([ofd(a[0], b[0]) for ofd, a, b in zip(self.modules, _stages(s), _stages(t))])


@method
class AFD(Method):
    lambda_kd = 500.0

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.afd = nn.ModuleList(fastkd.AFD(c, 1.0) for c in teacher_channels[1:4])
        self.connectors = _connectors(student.channels()[1:4], teacher_channels[1:4])
        self.modules = nn.ModuleList([self.afd, self.connectors])

    def loss(self, run, student, batch, s, t):
        return _mean([afd(c(a[1]), b[1]) for afd, c, a, b in
                      zip(self.afd, self.connectors, _stages(s), _stages(t))])


@method
class CRD(Method):
    """feat_dim 128, nce_t 0.1, nce_mom 0.5; nce_n 1024 (the collection's 16384 is more
    than the ~1,290 negatives a digits class has)."""
    lambda_kd = 0.2
    nce_n = 1024

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.CRD(student.channels()[4], teacher_channels[4], 128, self.nce_n, 0.1, 0.5,
                                    run.data.train_y.shape[0], global_batch=run.world > 1)
        self.modules = nn.ModuleList([self.criterion])

    def loss(self, run, student, batch, s, t):
        if batch.whole is None:
            sample_idx = run.data.contrast_indices(batch.idx, batch.target, self.nce_n, run.gen)
        else:  # the whole batch's negatives, drawn as one process draws them; this rank's rows
            whole = batch.whole
            sample_idx = run.shard(run.data.contrast_indices(whole.idx, whole.target, self.nce_n, run.gen))
        return self.criterion(s.feat, t.feat, batch.idx, sample_idx)


@method
class DML(Method):
    """The student and a teacher-shaped peer (from the teacher's initial weights) learn
    together: each step both take CE + DML(own, other.detach())."""
    uses_teacher = False

    def __init__(self, run, student, teacher_channels):
        super().__init__(run, student, teacher_channels)
        self.criterion = fastkd.DML()
        self.peer = models.teacher().to(run.cfg.device)
        self.peer.load_state_dict(run.teacher_init)
        self.peer_opt = sgd(self.peer.parameters(), run.cfg, run.cfg.lr)
        self.peer_loss = None
        # Data-parallel, the peer is a DistributedDataParallel of its own (its loss is
        # backpropagated apart from the student's).
        self.peer_step = self.peer
        if run.world > 1:
            self.peer_step = DistributedDataParallel(global_batch_norm(self.peer), **NO_BUFFER_SYNC)

    def start_epoch(self, lr):
        set_lr(self.peer_opt, lr)
        self.peer.train()

    def loss(self, run, student, batch, s, t):
        out_peer = self.peer_step(batch.img).out
        self.peer_loss = (F.cross_entropy(out_peer, batch.target)
                          + self.lambda_kd * self.criterion(out_peer, s.out.detach()))
        return self.criterion(s.out, out_peer.detach())

    def after_step(self):
        self.peer_opt.zero_grad()
        self.peer_loss.backward()
        self.peer_opt.step()


ALIASES = {"st": "SoftTarget", "fitnet": "Hint", "pkt": "PKTCosSim"}


def _canonical():
    lookup = {n.lower(): n for n in METHODS}
    lookup.update(ALIASES)
    return lookup


def method_names(requested):
    """Canonical method names from user input (any case, commas allowed, 'all')."""
    names = [n for item in requested for n in item.split(",") if n]
    if not names or any(n.lower() == "all" for n in names):
        return list(METHODS)
    lookup = _canonical()
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(lookup[n.lower()] for n in names))


# ----------------------------------------------------------------------------- training

Result = namedtuple("Result", "name seed accuracy sec_per_epoch total_sec losses")


@torch.no_grad()
def accuracy(net, data):
    """Test accuracy in percent."""
    net.eval()
    pred = net(data.normalize(data.test_x)).out.argmax(1)
    return (pred == data.test_y).float().mean().item() * 100


class SumOverRanks(torch.autograd.Function):
    """x summed over the ranks, on every rank. Its backward is itself (the gradient reaching
    each rank's x is the sum over ranks of the output's gradients, as in
    fastkd.distributed.all_reduce_sum), so it differentiates twice too: Sobolev and LwM
    backpropagate through input gradients taken through the batch norm."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return SumOverRanks.apply(grad.contiguous())


class GlobalBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d that, in training, normalises with the statistics of the global batch:
    each rank's per-channel sums are added by SumOverRanks, whose backward carries every
    rank's gradient back to the rows it came from, so outputs and gradients are one
    process's on the concatenated batch (torch's SyncBatchNorm does this on GPUs only).
    In eval mode (running statistics) it is nn.BatchNorm2d and talks to no other process."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        per_channel = lambda v: v[None, :, None, None]
        # float64 statistics, as torch's CPU batch norm accumulates them: float32 sums of
        # different partial orders would move a channel of small variance visibly.
        wide = x.double()
        count = wide.new_tensor([x.numel() / x.shape[1]])
        sums = SumOverRanks.apply(torch.cat([wide.sum(dim=(0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = wide - per_channel(mean)
        var = SumOverRanks.apply((centred * centred).sum(dim=(0, 2, 3))) / n  # two passes: no cancellation
        with torch.no_grad():  # as nn.BatchNorm2d: momentum 0.1, the unbiased variance
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.to(x.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(x.dtype), self.momentum)
        normalised = (centred * per_channel(torch.rsqrt(var + self.eps))).to(x.dtype)
        return normalised * per_channel(self.weight) + per_channel(self.bias)


def global_batch_norm(module):
    """Makes every nn.BatchNorm2d in module a GlobalBatchNorm, in place (the same parameters and
    buffers, so optimizers and the methods' references to submodules stay valid)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm
    return module


class Step(nn.Module):
    """One step's loss as a module: the student and the method's modules (connectors, loss
    parameters) under one forward, so that DistributedDataParallel averages the gradients of
    everything the loss trains. forward(run, batch, weight) -> CE + weight * KD loss, or with
    ce=False (AB's and FSP's initialisation stage) weight * KD loss."""

    def __init__(self, net, method):
        super().__init__()
        self.net, self.extras, self.method = net, method.modules, method

    def forward(self, run, batch, weight, ce=True):
        method = self.method
        s = self.net(batch.img)
        if not ce:
            return weight * method.loss(run, self.net, batch, s, run.teacher_features(batch.img))
        loss = F.cross_entropy(s.out, batch.target)
        if weight:
            t = run.teacher_features(batch.img, method.input_grad) if method.uses_teacher else None
            loss = loss + weight * method.loss(run, self.net, batch, s, t)
        return loss


# DistributedDataParallel's option for "no buffer broadcast at each forward": broadcast_buffers
# until torch names it forward_sync_buffers (and warns about the old name).
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def train(run, name, method_cls, net, init):
    """Trains net (from init) with method_cls as the collection does; returns (Result, net).
    With run.world > 1, this process trains on its rows of every global batch, under
    DistributedDataParallel, and every rank returns the same Result."""
    cfg = run.cfg
    if run.world > 1 and method_cls.not_data_parallel:
        raise ValueError(f"{name} cannot train data-parallel: {method_cls.not_data_parallel}")
    run.gen.manual_seed(run.seed)
    torch.manual_seed(run.seed)
    run.losses = []
    net.load_state_dict(init)
    teacher_channels = models.channels(models.TEACHER_WIDTHS)
    method = method_cls(run, net, teacher_channels)
    method.modules.to(cfg.device)
    optimizer = sgd(chain(net.parameters(), method.modules.parameters()), cfg, cfg.lr)
    step = Step(net, method)
    if run.world > 1:
        global_batch_norm(step)
        # Buffers need no broadcast: the global batch norm keeps its running statistics, and
        # CRD's memory, identical on every rank. AB's and FSP's stages leave some parameters
        # out of each stage's loss (the classifier, then the connectors).
        step = DistributedDataParallel(step, **NO_BUFFER_SYNC,
                                       find_unused_parameters=isinstance(method, FeatureInit))
    run.progress = Progress(f"{name} (seed {run.seed})", method.pre_epochs + cfg.epochs,
                            cfg.progress and run.rank == 0)
    start = time.perf_counter()
    method.prepare(run, step, optimizer)
    epoch_times = []
    for epoch in range(1, cfg.epochs + 1):
        lr = main_lr(cfg, epoch)
        set_lr(optimizer, lr)
        method.start_epoch(lr)
        weight = method.weight(epoch, cfg.epochs)
        net.train()
        epoch_start = time.perf_counter()
        for batch in run.batches():
            if weight and method.input_grad:
                batch = batch._replace(img=batch.img.requires_grad_(True))
            loss = step(run, batch, weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_step()
            run.record(loss)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - epoch_start)
        run.progress.tick(loss.item())
    run.progress.close()
    losses = torch.stack(run.losses)
    if run.world > 1:
        # Each rank recorded the loss of its rows (a relational term: the global batch's);
        # their mean is the loss of the global batch.
        dist.all_reduce(losses)
        losses = losses / run.world
    losses = losses.tolist()
    result = Result(name, run.seed, accuracy(net, run.data), sum(epoch_times) / len(epoch_times),
                    time.perf_counter() - start, losses)
    return result, net


def setup_seed(data, cfg, seed):
    """Initial weights of both nets for this seed and the Run, without a teacher yet. When
    torch.distributed is initialised, the Run trains data-parallel over its default group."""
    torch.manual_seed(seed)
    teacher_init = {k: v.clone() for k, v in models.teacher().state_dict().items()}
    student_init = {k: v.clone() for k, v in models.student().state_dict().items()}
    run = Run(data, cfg, seed, None, teacher_init, student_init)
    if dist.is_available() and dist.is_initialized():
        run.rank, run.world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % run.world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                             f"processes, {run.world}")
    return run


def train_teacher(run):
    """Trains the teacher (Baseline) and installs it, frozen, in run."""
    result, net = train(run, "Teacher", Baseline, models.teacher().to(run.cfg.device), run.teacher_init)
    run.teacher = freeze(net)
    return result


def train_student(run, name):
    """Trains a student with method name ('Baseline' or a key of METHODS)."""
    cls = Baseline if name == "Baseline" else METHODS[name]
    return train(run, name, cls, models.student().to(run.cfg.device), run.student_init)[0]


def run_all(names, cfg, seeds, data=None):
    """{row name: [Result per seed]} for Teacher, Baseline and each method."""
    data = data or Digits(cfg.device)
    results = {}
    for seed in seeds:
        run = setup_seed(data, cfg, seed)
        results.setdefault("Teacher", []).append(train_teacher(run))
        for name in ["Baseline"] + names:
            results.setdefault(name, []).append(train_student(run, name))
    return results


# ----------------------------------------------------------------------------- report

def summarize(results):
    """Rows of the table: accuracy mean/std over seeds, Baseline beside it, times."""
    base = statistics.fmean(r.accuracy for r in results["Baseline"])
    rows = []
    for name, runs in results.items():
        accs = [r.accuracy for r in runs]
        mean = statistics.fmean(accs)
        finite = all(math.isfinite(x) for r in runs for x in r.losses)
        rows.append({
            "method": name,
            "accuracy": accs,
            "mean": mean,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "baseline": None if name == "Teacher" else base,
            "delta": None if name in ("Teacher", "Baseline") else mean - base,
            "sec_per_epoch": statistics.fmean(r.sec_per_epoch for r in runs),
            "total_sec": statistics.fmean(r.total_sec for r in runs),
            "finite_losses": finite,
        })
    return rows


def format_table(rows, header):
    lines = [header,
             f"{'method':<11} {'test acc %':>14} {'Baseline %':>10} {'delta':>6} {'s/epoch':>8} {'run s':>7}",
             "-" * 61]
    for r in rows:
        acc = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        base = "" if r["baseline"] is None else f"{r['baseline']:.2f}"
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        note = "" if r["finite_losses"] else "  non-finite loss!"
        lines.append(f"{r['method']:<11} {acc:>14} {base:>10} {delta:>6} "
                     f"{r['sec_per_epoch']:>8.3f} {r['total_sec']:>7.1f}{note}")
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    means = [r["mean"] for r in rows]
    errs = [r["std"] or 0.0 for r in rows]
    base = next(r["mean"] for r in rows if r["method"] == "Baseline")
    colors = ["#555555" if n in ("Teacher", "Baseline") else
              ("#2a9d8f" if m > base else ("#e76f51" if m < base else "#aaaaaa"))
              for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), means, xerr=errs, color=colors, capsize=2)
    ax.axvline(base, color="black", linestyle="--", linewidth=1)
    for i, m in enumerate(means):  # the figures, since a few points are hard to see on a 0-100 axis
        ax.text(1, i, f"{m:.2f}", va="center", fontsize=7, color="white" if m >= 10 else "black")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)  # from 0: bar lengths are the accuracies, not differences blown up
    ax.set_xlabel("test accuracy (%); dashed line: the student Baseline")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kd_weight(item):
    """'NAME=VALUE' -> (canonical method name, float)."""
    name, _, value = item.partition("=")
    canonical = _canonical().get(name.lower())
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if canonical is None or weight is None or not math.isfinite(weight):
        raise ValueError(f"--kd-weight takes METHOD=NUMBER with a method of {', '.join(METHODS)}; got {item!r}")
    return canonical, weight


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastkd.examples.digits",
                                description="Distil a small ResNet into a thinner one on sklearn's digits "
                                            "with the Baseline and every fastkd method.")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help=f"methods to run (default all): {' '.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--backend", choices=fastkd.BACKENDS, default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="cap on batches per epoch (for quick checks)")
    p.add_argument("--kd-weight", nargs="+", default=[], metavar="NAME=VALUE",
                   help="replace a method's loss weight (default: the collection's), e.g. AT=62.5")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the accuracies (needs matplotlib)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these nets are too small to gain from more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel on N processes started here (gloo on CPU, nccl on N GPUs); "
                        "under torchrun, leave it out")
    args = p.parse_args(argv)
    all_methods = any(n.lower() == "all" for item in args.methods for n in item.split(","))
    try:
        args.methods = method_names(args.methods)
    except ValueError as e:
        p.error(str(e))
    try:
        args.kd_weight = dict(kd_weight(item) for item in args.kd_weight)
    except ValueError as e:
        p.error(str(e))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install matplotlib (or, in a clone of fastkd: pip install -e '.[examples]')")
    if args.epochs < 1 or args.batch_size < 2:
        p.error("--epochs must be >= 1 and --batch-size >= 2")
    try:
        device_from(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1; got {args.nproc}")
    launched = torchrun_world()
    if launched > 1 and args.nproc > 1:
        p.error(f"--nproc {args.nproc} under torchrun, which started {launched} processes already: "
                "leave --nproc out")
    world = max(launched, args.nproc)
    if world > 1:
        data_parallel_checks(p, args, world, all_methods)
    return args


def torchrun_world():
    """The number of processes torchrun (or another launcher setting WORLD_SIZE) started; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_checks(p, args, world, all_methods):
    """Refuses what cannot train on world processes; 'all' keeps the methods that can."""
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be divisible by the number of processes, {world}")
    refused = [n for n in args.methods if METHODS[n].not_data_parallel]
    if refused and all_methods:
        args.methods = [n for n in args.methods if n not in refused]
        if int(os.environ.get("RANK", "0")) == 0:
            reasons = "; ".join(f"{n} ({METHODS[n].not_data_parallel})" for n in refused)
            print(f"data-parallel: leaving out {reasons}", file=sys.stderr)
    elif refused:
        p.error("these methods cannot train data-parallel: "
                + "; ".join(f"{n} ({METHODS[n].not_data_parallel})" for n in refused)
                + ". Run them without --nproc / torchrun")
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            p.error(f"--device {args.device} on {world} processes: each uses cuda:<its local rank>; "
                    "give --device cuda")
        if args.nproc > torch.cuda.device_count():
            p.error(f"--nproc {args.nproc} with --device cuda needs {args.nproc} GPUs; torch sees "
                    f"{torch.cuda.device_count()} (or use --device cpu)")


def main(argv=None):
    """Runs the example; returns the table's rows (None in the process that --nproc N > 1
    spawns from: rank 0 prints and writes the results)."""
    args = parse_args(argv)
    if torchrun_world() > 1:
        return run_rank(args, int(os.environ["RANK"]), torchrun_world(),
                        int(os.environ.get("LOCAL_RANK", "0")), "env://")
    if args.nproc > 1:
        mp.spawn(_spawned, args=(args, distributed.free_port()), nprocs=args.nproc)
        return None
    return run_main(args)


def _spawned(rank, args, port):
    run_rank(args, rank, args.nproc, rank, f"tcp://127.0.0.1:{port}")


def run_rank(args, rank, world, local_rank, init_method):
    """One process of a data-parallel run: joins the job (nccl on cuda:local_rank, else gloo),
    runs the example, and leaves it."""
    backend = "gloo"
    if torch.device(args.device).type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()}; "
                             "start at most that many processes a node, or use --device cpu")
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
        backend = "nccl"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        rows = run_main(args)
        # Every rank done before any tears down its connections (a process that exits while
        # gloo still talks to it can abort another).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return rows


def run_main(args):
    """The example in this process: alone, or as one rank of an initialised process group
    (then only rank 0 prints and writes)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cfg = Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 steps_per_epoch=args.steps_per_epoch, kd_weights=args.kd_weight, device=args.device,
                 progress=not args.no_progress)
    torch.set_num_threads(args.threads)
    data = Digits(cfg.device)
    start = time.perf_counter()
    try:
        with fastkd.use_backend(args.backend):
            results = run_all(args.methods, cfg, args.seeds, data)
    except fastkd.BackendUnavailableError as e:
        raise SystemExit(f"backend {args.backend!r} cannot run here: {e}")
    elapsed = time.perf_counter() - start
    rows = summarize(results)
    if rank != 0:
        return rows
    on = f"{cfg.device}" if world == 1 else f"{world} processes ({cfg.device.split(':')[0]})"
    header = (f"digits: {data.train_y.shape[0]} train / {data.test_y.shape[0]} test images, "
              f"{cfg.epochs} epochs, batch {cfg.batch_size}, backend {args.backend} on {on}, "
              f"seed{'s' if len(args.seeds) > 1 else ''} {' '.join(map(str, args.seeds))}; {elapsed:.0f} s in all")
    print(format_table(rows, header))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": {**vars(args), "train_size": data.train_y.shape[0],
                                  "test_size": data.test_y.shape[0], "total_sec": elapsed},
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, header.split(";")[0])
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
