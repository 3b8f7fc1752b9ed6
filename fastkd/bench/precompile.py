"""Compiling the references ahead, on a spare CPU core.

On the CPU most of a quick sweep's time is torch.compile of the references (inductor's
tracing, lowering and C++ compiles: about 100 s of one core on a 2-core machine, against
about 20 s of measuring), while the benchmark itself times on one thread. When the machine
has a core beyond the benchmark's threads, `Precompiler` starts a second process that calls
each case's compiled variants twice (as the benchmark's warm-up does), from the last case
backwards, into inductor's on-disk caches (FX graph and AOTAutograd), which the benchmark's
own process reads. The benchmark compiles each case as a user's first call does, from the
first case forwards; the two meet in the middle, where the second process stops, and from
there the benchmark's compiles are cache hits. What is measured is unchanged (the timed
calls run after compilation either way); while the second process runs, the benchmark's
calls share the machine with it (one core each), but not the timed ones: the benchmark
stops the second process and its compiler while it times (`paused`).
"""
import contextlib
import logging
import multiprocessing
import os
import signal


def spare_cores(threads):
    """Cores this process may run on beyond the benchmark's `threads`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores - threads


class Precompiler:
    """The second process (see the module docstring); `at(index)` tells it the case the
    benchmark has reached, `paused()` stops it for a block, `close()` ends it. Without
    compiled variants, on a device other than the CPU, or without a spare core, it does
    nothing."""

    def __init__(self, settings, compiled_variants):
        self._proc = None
        self._position = None
        if not compiled_variants or not settings["device"].startswith("cpu") or spare_cores(settings["threads"]) < 1:
            return
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
        try:
            self._position = ctx.Value("i", -1)
            proc = ctx.Process(target=_child, args=(settings, list(compiled_variants), self._position),
                               daemon=True, name="fastkd-bench-precompile")
            proc.start()
        except OSError:  # no shared memory or no process to spare: the benchmark compiles alone
            return
        self._proc = proc

    @property
    def active(self):
        return self._proc is not None

    def at(self, index):
        if self._position is not None:
            self._position.value = index

    @contextlib.contextmanager
    def paused(self):
        """The block runs with the second process and its compiler subprocesses stopped
        (SIGSTOP to its process group; where there is none yet, not stopped)."""
        group = self._group()
        if group is None or not _signal_group(group, signal.SIGSTOP):
            yield
            return
        try:
            yield
        finally:
            _signal_group(group, signal.SIGCONT)

    def close(self):
        if self._proc is None:
            return
        group = self._group()
        if group is not None:
            _signal_group(group, signal.SIGCONT)  # a stopped process would hold the SIGTERM
            _signal_group(group, signal.SIGTERM)  # its compiler subprocesses too
        else:
            self._proc.terminate()
        self._proc.join()
        self._proc = None

    def _group(self):
        """The second process's own process group (made at its start), else None."""
        if self._proc is None or not hasattr(signal, "SIGSTOP"):
            return None
        try:
            group = os.getpgid(self._proc.pid)
        except OSError:  # it has ended
            return None
        return group if group == self._proc.pid else None


def _signal_group(group, sig):
    """Whether sig reached the process group (it may have ended meanwhile)."""
    try:
        os.killpg(group, sig)
        return True
    except ProcessLookupError:
        return False


def _child(settings, variants, position):
    """The second process's entry: its output silenced (compiler warnings would interleave
    with the table), then compile_backwards."""
    if hasattr(os, "setpgrp"):  # a group of its own, which `paused` stops as one
        os.setpgrp()
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    import torch
    from torch._inductor import config as inductor_config

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    inductor_config.compile_threads = 1  # one core: the other is the benchmark's
    torch.set_num_threads(settings["threads"])
    compile_backwards(settings, variants, position)


def compile_backwards(settings, variants, position):
    """Each case's compiled variants, two calls each (as the benchmark's warm-up makes: CRD
    takes another branch on its second call), from the last case down to the one after
    position.value, which the benchmark moves on. Best effort: a failure here only leaves
    that case for the benchmark to compile. Returns the names of the cases it ran."""
    import torch

    from .. import backend
    from . import cli, measure

    device = torch.device(settings["device"])
    todo = cli.sweep_cases(settings, device)
    cap = settings["max_memory"] // 2 if settings["max_memory"] else None
    ran = []
    with measure.memory_cap(device, cap), backend.use_backend("auto"):
        for index in reversed(range(len(todo))):
            if index <= position.value:
                break
            case = todo[index]
            dtype = case.dtype or cli.DTYPES[settings["dtype"]]
            torch._dynamo.reset()
            ran.append(case.name)
            for name in variants:
                with contextlib.suppress(Exception):
                    step, module = measure.VARIANTS[name](case, device, dtype)
                    runner = measure.Runner(case, device, dtype)
                    for _ in range(2):
                        if runner.time_call(step, module) > settings["max_call_s"]:
                            break
    return ran
