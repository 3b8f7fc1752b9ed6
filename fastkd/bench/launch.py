"""Launch options of fastkd's Triton kernels set for one benchmark run (``--launch``), to
compare a kernel's occupancy on a GPU without editing its launcher, e.g. RKD's float32 angle
forward capped at 128 registers a thread (two programs per SM instead of one):

    python -m fastkd.bench --losses RKD --cases "N=1024 D=512" --variants fastkd \\
        --launch _rkd_angle_fwd_fast_kernel:maxnreg=128

Each ``KERNEL:KEY=VALUE[,KEY=VALUE]`` names a ``@triton.jit`` kernel of fastkd.kernels and the
options (OPTIONS) that replace its launcher's at every launch; the run's JSON records them.
A changed option compiles the kernel anew (Triton keys its cache on the options), so the first
call of a case pays that, as it does for any kernel.
"""
import functools
import importlib
import pkgutil

OPTIONS = {"num_warps": int, "num_stages": int, "maxnreg": int}


def parse(text):
    """'KERNEL:key=value,...' -> (KERNEL, {key: value}); ValueError naming what is wrong."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise ValueError(f"--launch takes KERNEL:KEY=VALUE[,KEY=VALUE], got {text!r}")
    options = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in OPTIONS:
            raise ValueError(f"--launch {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(OPTIONS)}")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"--launch {text!r}: {key} takes an integer, got {value!r}") from None
    return name, options


def kernel(name):
    """The @triton.jit kernel of that name in fastkd.kernels' modules (a JITFunction, or under
    TRITON_INTERPRET=1 an InterpretedFunction); ValueError if none."""
    from triton.runtime.jit import KernelInterface

    from .. import kernels
    for info in pkgutil.iter_modules(kernels.__path__):
        found = getattr(importlib.import_module(f"{kernels.__name__}.{info.name}"), name, None)
        if isinstance(found, KernelInterface):
            return found
    raise ValueError(f"--launch: fastkd.kernels has no Triton kernel named {name!r}")


def apply(specs):
    """Set each spec's options, (kernel name, {key: value}) as parse() gives them, on its
    kernel for the rest of the process."""
    for name, options in specs:
        k = kernel(name)
        k.run = functools.partial(_run, type(k).run.__get__(k), options)


def _run(run, options, *args, **kwargs):
    return run(*args, **{**kwargs, **options})
