"""The one place that decides which implementation of a loss runs.

Backends:
  reference  fastkd.reference, the plain PyTorch oracle (any device).
  torch      fastkd's algorithm written with torch ops (any device; the CPU path).
  triton     fastkd.autograd Functions over fastkd.kernels (CUDA tensors, or CPU
             tensors when TRITON_INTERPRET=1 runs Triton's interpreter).
  auto       the fastest one that exists for the op and the tensors' device:
             triton on CUDA, then torch, then reference; on CUDA the torch path below
             the sizes of CUDA_TORCH_BELOW, where a fused kernel cannot pay for its launch.

The choice is read at call time: the innermost ``fastkd.use_backend(name)``
block, else the environment variable FASTKD_BACKEND, else ``auto``.

With global_batch=True (the relational losses, over torch.distributed) the choice is
``global_implementation``'s: the reference backend gathers every rank's batch and computes
the whole loss on each rank; torch runs the sharded torch algorithm of
fastkd/torch_backend/pairwise.py, and triton the same algorithm on the Triton kernels
(fastkd/autograd.py's *_global: RKD, SP, PKT, CC, IRG's edge and transformation terms)
where SHARDED["triton"] has the op, else the torch one (IRG's vertex term, an mse).
"""
import contextlib
import functools
import os

import torch

from .distributed import all_gather_rows
from .reference import (ab, afd, at, bss, cc, crd, dml, fitnet, fsp, ft, irg, logits, lwm, nst,
                        ofd, pkt, rkd, sobolev, sp, st, vid)
from .reference import fused_linear_soft_target as fused_linear

try:  # Triton has wheels for Linux only: elsewhere fastkd runs its torch and reference paths.
    import triton  # noqa: F401
except ImportError:
    autograd = None
else:
    from . import autograd
from .torch_backend import contrast as torch_contrast
from .torch_backend import elementwise as torch_elementwise
from .torch_backend import feature_maps as torch_feature_maps
from .torch_backend import fused_linear as torch_fused_linear
from .torch_backend import pairwise as torch_pairwise
from .torch_backend import softmax_kl as torch_softmax_kl

class _NoTriton:
    """Stands for fastkd.autograd where triton is not installed: every entry None."""

    def __getattr__(self, name):
        return None


_triton = autograd if autograd is not None else _NoTriton()

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "FASTKD_BACKEND"

# op name -> {backend: function}, each with the reference's signature. Every op has a
# reference; "torch" is fastkd/torch_backend/<family>.py, "triton" the Function wrapper in
# fastkd/autograd.py over fastkd/kernels/<family>.py (the pairwise family's over gram.py,
# distance.py, angle.py, cosine.py and irg_transformation.py).
IMPLEMENTATIONS = {
    "logits": {"reference": logits.logits, "torch": torch_elementwise.logits,
               "triton": _triton.logits},
    "soft_target": {"reference": st.soft_target, "torch": torch_softmax_kl.soft_target,
                    "triton": _triton.soft_target},
    "dml": {"reference": dml.dml, "torch": torch_softmax_kl.dml, "triton": _triton.dml},
    "bss": {"reference": bss.bss, "torch": torch_softmax_kl.bss, "triton": _triton.bss},
    "at": {"reference": at.at, "torch": torch_feature_maps.at, "triton": _triton.at},
    "hint": {"reference": fitnet.hint, "torch": torch_elementwise.hint, "triton": _triton.hint},
    "nst": {"reference": nst.nst, "torch": torch_feature_maps.nst, "triton": _triton.nst},
    "fsp": {"reference": fsp.fsp, "torch": torch_feature_maps.fsp, "triton": _triton.fsp},
    "ft": {"reference": ft.ft, "torch": torch_elementwise.ft, "triton": _triton.ft},
    "ab": {"reference": ab.ab, "torch": torch_elementwise.ab, "triton": _triton.ab},
    "vid": {"reference": vid.vid, "torch": torch_elementwise.vid, "triton": _triton.vid},
    "ofd": {"reference": ofd.ofd, "torch": torch_elementwise.ofd, "triton": _triton.ofd},
    "afd": {"reference": afd.afd, "torch": torch_elementwise.afd, "triton": _triton.afd},
    "sobolev": {"reference": sobolev.sobolev, "torch": torch_elementwise.sobolev,
                "triton": _triton.sobolev},
    "lwm": {"reference": lwm.lwm, "torch": torch_elementwise.lwm, "triton": _triton.lwm},
    "pkt_cos_sim": {"reference": pkt.pkt_cos_sim, "torch": torch_pairwise.pkt_cos_sim,
                    "triton": _triton.pkt_cos_sim},
    "rkd": {"reference": rkd.rkd, "torch": torch_pairwise.rkd, "triton": _triton.rkd},
    "rkd_distance": {"reference": rkd.rkd_distance, "torch": torch_pairwise.rkd_distance,
                     "triton": _triton.rkd_distance},
    "rkd_angle": {"reference": rkd.rkd_angle, "torch": torch_pairwise.rkd_angle,
                  "triton": _triton.rkd_angle},
    "sp": {"reference": sp.sp, "torch": torch_pairwise.sp, "triton": _triton.sp},
    "cc": {"reference": cc.cc, "torch": torch_pairwise.cc, "triton": _triton.cc},
    "irg_vertex": {"reference": irg.irg_vertex, "torch": torch_elementwise.hint,
                   "triton": _triton.hint},
    "irg_edge": {"reference": irg.irg_edge, "torch": torch_pairwise.irg_edge,
                 "triton": _triton.irg_edge},
    "irg_transformation": {"reference": irg.irg_transformation,
                           "torch": torch_pairwise.irg_transformation,
                           "triton": _triton.irg_transformation},
    "crd_contrast": {"reference": crd.crd_contrast, "torch": torch_contrast.crd_contrast,
                     "triton": _triton.crd_contrast},
    "fused_linear_soft_target": {"reference": fused_linear.fused_linear_soft_target,
                                 "torch": torch_fused_linear.fused_linear_soft_target,
                                 "triton": _triton.fused_linear_soft_target},
}

# backend -> op -> its sharded implementation with global_batch=True: the reference's
# arguments, then keyword-only group and sizes (every rank's local batch size). "torch":
# fastkd/torch_backend/pairwise.py; "triton": the Functions of fastkd/autograd.py over the
# kernels, for the ops that have one (the others run the torch one on the triton backend).
SHARDED = {
    "torch": {
        "pkt_cos_sim": torch_pairwise.pkt_cos_sim_global,
        "rkd": torch_pairwise.rkd_global,
        "rkd_distance": torch_pairwise.rkd_distance_global,
        "rkd_angle": torch_pairwise.rkd_angle_global,
        "sp": torch_pairwise.sp_global,
        "cc": torch_pairwise.cc_global,
        "irg_vertex": torch_pairwise.irg_vertex_global,
        "irg_edge": torch_pairwise.irg_edge_global,
        "irg_transformation": torch_pairwise.irg_transformation_global,
    },
    "triton": {
        "pkt_cos_sim": _triton.pkt_cos_sim_global,
        "rkd": _triton.rkd_global,
        "rkd_distance": _triton.rkd_distance_global,
        "rkd_angle": _triton.rkd_angle_global,
        "sp": _triton.sp_global,
        "cc": _triton.cc_global,
        "irg_edge": _triton.irg_edge_global,
        "irg_transformation": _triton.irg_transformation_global,
    },
}

# CUDA: op -> the element count of its first input below which the auto backend runs the
# torch path rather than the Triton kernels. Measured on an H200 (torch 2.11, Triton 3.6;
# benchmarks/results/gpu-NVIDIA-H200-20261127, run1-bench.txt, forward+backward, float32):
#   Logits  8192x1000 (8.2M): eager 0.199 ms, Triton 0.437; 8192x32000 (262M): 2.07 vs 1.19.
#   Hint    (128,64,8,8) (0.5M): 0.282 vs 0.538; (256,64,56,56) (51M): 0.432 vs 0.257.
# Their torch path is the reference's own ATen mse_loss, three launches per forward+backward
# where the Triton path needs two of its own, each dearer to launch (python -m fastkd.bench
# --host): below 2^24 elements (16.8M, between the sizes where each lost and won) the call's
# fixed cost is all there is. IRG's vertex term is such an mse. FSP's Triton kernels lost at
# every size of that sweep (0.38x-0.78x eager: their Gram products ran on FMAs then), so FSP
# runs the torch path on CUDA at every size. They now run on the tensor cores (tf32x3,
# docs/numerics.md); the choice stands until a GPU sweep measures them again.
CUDA_TORCH_BELOW = {"logits": 2 ** 24, "hint": 2 ** 24, "irg_vertex": 2 ** 24, "fsp": 2 ** 62}

# The innermost use_backend() block's choice. A plain module global, read at every call:
# torch.compile traces the read and guards on the value (a different backend recompiles),
# where a ContextVar cannot be traced at all. Process-wide, like torch.backends' flags.
_override = None

if autograd is None:  # no triton: no "triton" entries
    for _impls in IMPLEMENTATIONS.values():
        del _impls["triton"]
    del SHARDED["triton"]
del _triton


class BackendUnavailableError(RuntimeError):
    """The requested backend has no implementation of this op for these tensors."""


def _checked(name, source):
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


def current_backend():
    """The backend asked for right now: use_backend() block, else $FASTKD_BACKEND, else auto."""
    if _override is not None:
        return _override
    return _checked(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name):
    """Run the losses inside the block with this backend (overrides $FASTKD_BACKEND).

    The setting is process-wide for the duration of the block, like torch.backends'
    flags: every thread sees it, also one started inside the block, and a generator
    suspended inside the block leaves it in force until the generator resumes and leaves
    the block (blocks nest: leaving one restores the setting it found). Under
    torch.compile the backend is read while tracing and guarded, so a compiled function
    called under another backend recompiles for it.
    """
    global _override
    previous, _override = _override, _checked(name, "backend")
    try:
        yield
    finally:
        _override = previous


def triton_runs_on(device):
    """Triton kernels run on CUDA, and on CPU only through the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def available(op, device, numel=None):
    """The backends that can run op on tensors of this device, fastest first (for inputs of
    numel elements, the first one's, where given: see CUDA_TORCH_BELOW)."""
    impls = IMPLEMENTATIONS[op]
    if device.type != "cuda":
        order = ("torch", "reference", "triton")
    elif numel is not None and numel < CUDA_TORCH_BELOW.get(op, 0):
        order = ("torch", "triton", "reference")
    else:
        order = ("triton", "torch", "reference")
    return [b for b in order if b in impls and (b != "triton" or triton_runs_on(device))]


def resolve(op, device, backend=None, numel=None):
    """The backend that will run op for tensors on device (numel: the first input's
    element count, which the auto backend's choice on CUDA depends on)."""
    name = _checked(backend, "backend") if backend is not None else current_backend()
    if name == "auto":
        return available(op, device, numel)[0]
    if name == "triton" and autograd is None:
        raise BackendUnavailableError("the triton backend needs the triton package, which is not "
                                      "installed (Triton has wheels for Linux only)")
    if name not in IMPLEMENTATIONS[op]:
        have = ", ".join(b for b in BACKENDS[1:] if b in IMPLEMENTATIONS[op])
        raise BackendUnavailableError(f"fastkd has no {name} implementation of {op} yet (it has: {have})")
    if name == "triton" and not triton_runs_on(device):
        raise BackendUnavailableError(
            f"the triton backend runs {op} on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; "
            f"got tensors on {device}")
    return name


def implementation(op, device, backend=None):
    """The function that computes op for tensors on device."""
    return IMPLEMENTATIONS[op][resolve(op, device, backend)]


# os.environ keeps its values in a dict of encoded keys; reading it directly costs a tenth of
# os.environ.get (which encodes the key on every call), a saving on every loss's call.
_ENVIRON = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_ENCODED = {}  # variable name -> its key in _ENVIRON


def _environ(name):
    """os.environ.get(name), decoded as os.environ would."""
    if _ENVIRON is None or _ENCODE is None:
        return os.environ.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = _ENCODE(name)
    value = _ENVIRON.get(key)
    return value if value is None or isinstance(value, str) else os.environ.decodevalue(value)


# (op, device type, the backend asked for (use_backend's, else $FASTKD_BACKEND's), small on
# CUDA, $TRITON_INTERPRET where it matters) -> (the op's implementations, resolve()'s choice).
_RESOLVED = {}


def eager_implementation(op, x, kind):
    """implementation(op, x.device) for a call outside torch.compile and autocast, with x the
    op's first input and kind its device's type: what every eager call asks, so resolve()'s
    answer is kept per setting and only the settings are read per call (the environment
    too, which may change between calls)."""
    impls = IMPLEMENTATIONS[op]
    requested = _override if _override is not None else _environ(ENV_VAR)
    small = kind == "cuda" and op in CUDA_TORCH_BELOW and x.numel() < CUDA_TORCH_BELOW[op]
    # The interpreter decides only whether the triton backend may run on CPU tensors.
    interpret = (_environ("TRITON_INTERPRET")
                 if kind == "cpu" and requested is not None and requested.lower() == "triton" else None)
    key = (op, kind, requested, small, interpret)
    hit = _RESOLVED.get(key)
    if hit is None or hit[0] is not impls:  # a test may swap an op's implementations
        hit = _RESOLVED[key] = (impls, resolve(op, torch.device(kind), numel=x.numel()))
    return impls[hit[1]]


def _gathered(x, group, sizes):
    """x with every tensor in it (a tensor, or a sequence of them) replaced by the
    concatenation over ranks (differentiable, fastkd.distributed.all_gather_rows)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_gathered(a, group, sizes) for a in x)
    return all_gather_rows(x, group, sizes)[0] if isinstance(x, torch.Tensor) else x


def _reference_on_gathered(reference, *args, group, sizes):
    """The reference loss of every rank's batch, on each rank. Each rank's gradient of the
    gathered rows is dL/dX; all_gather_rows' backward sums them over ranks, so this rank's
    rows get W dL/dx_r, fastkd.distributed's convention."""
    return reference(*_gathered(args, group, sizes))


def global_implementation(op, device, group, sizes, backend=None):
    """The function that computes op over every rank's batch (global_batch=True) for
    tensors on device: the reference's signature, group and sizes bound. The reference
    backend gathers everything (each rank computes the whole loss); torch and triton run
    SHARDED, the triton backend its Triton sharded function where the op has one, else the
    torch one."""
    name = resolve(op, device, backend)
    if name == "reference":
        return functools.partial(_reference_on_gathered, IMPLEMENTATIONS[op]["reference"],
                                 group=group, sizes=sizes)
    sharded = SHARDED.get(name, {}).get(op, SHARDED["torch"][op])
    return functools.partial(sharded, group=group, sizes=sizes)
