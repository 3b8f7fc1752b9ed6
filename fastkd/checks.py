"""Input validation shared by every public loss.

Each check raises before any computation, with a message that names the
argument and what was expected: TypeError for a wrong type or dtype,
ValueError for a wrong shape, size or value.
"""
import math
import numbers

import torch


def tensor(x, name, ndim=None, min_ndim=None):
    """A non-empty floating-point tensor, optionally of a given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def feature_map(x, name):
    """A (B, C, H, W) feature map."""
    return tensor(x, name, ndim=4)


def channels(fm, name, expected, what="in_channels"):
    """A (B, C, H, W) feature map with the C that a module was built for."""
    feature_map(fm, name)
    if fm.shape[1] != expected:
        raise ValueError(f"{name} must have {what}={expected} channels, got shape {tuple(fm.shape)}")


def same_device(**named):
    """All named tensors on one device."""
    devices = {n: t.device for n, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def same_batch(a, b, name_a, name_b):
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size, "
                         f"got {a.shape[0]} and {b.shape[0]}")


def min_batch(x, name, least=2):
    """Relational losses compare samples with each other: they need >= 2."""
    if x.shape[0] < least:
        raise ValueError(f"{name} needs a batch of at least {least} samples for a relational loss, "
                         f"got {x.shape[0]}")


def number(value, name, positive=False, non_negative=False):
    """A real, finite Python or 0-d tensor number; returned as a float."""
    # The common case first, without the ABC test below: every call of a loss checks its numbers.
    if type(value) is float and math.isfinite(value) and (value > 0 or not positive
                                                          and (value >= 0 or not non_negative)):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def flag(value, name):
    """A Python bool (a tensor or a number would be read as one without a word)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def integer(value, name, least=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def size(value, name, least=1):
    """A size or count as torch's constructors read one: an integer, or what stands for one
    exactly (__index__: a numpy integer, a 0-d integer tensor); returned as an int."""
    index = getattr(type(value), "__index__", None)
    return integer(value if index is None else index(value), name, least)


def one_of(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


# The losses' arguments by name -> the rule each is checked by: at every call (fastkd.functional)
# and when a module is built (fastkd.modules), so that both accept the same values.
ARGUMENTS = {
    **dict.fromkeys(("T", "p", "eps", "nce_t"), lambda value, name: number(value, name, positive=True)),
    **dict.fromkeys(("margin", "hard_weight"), lambda value, name: number(value, name, non_negative=True)),
    **dict.fromkeys(("w_dist", "w_angle", "gamma", "w_irg_vert", "w_irg_edge", "w_irg_tran"), number),
    "P_order": integer,
    "ignore_index": lambda value, name: integer(value, name, least=-(2 ** 63)),
    "chunk_size": lambda value, name: None if value is None else integer(value, name, least=1),
    "reduction": lambda value, name: one_of(value, name, ("batchmean", "sum", "mean", "none")),
    # The modules' sizes (a call checks the tensors they shape): none can be 0 in a loss that runs.
    **dict.fromkeys(("in_channels", "mid_channels", "out_channels", "s_dim", "t_dim", "feat_dim",
                     "nce_n", "n_data"), size),
}


def argument(name, value):
    """value checked by the rule for the losses' argument called name; returned as a float or an
    int (or as given, for reduction and a None chunk_size)."""
    return ARGUMENTS[name](value, name)


def integer_tensor(x, name):
    """A tensor of one of the integer dtypes indices come in."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    return x


def host_tensor(x):
    """Whether x lives in host memory (a CPU tensor), so that reading its values costs no
    device sync: value checks read such tensors on the host; on a GPU they run on the
    device (an asynchronous assert) or not at all, so that no call syncs and a CUDA graph
    can capture it (fastkd.bench.host stands in for a GPU by answering False)."""
    return x.device.type == "cpu"


def indices(idx, name, shape, upper):
    """An integer index tensor of a given shape with values in [0, upper).

    The range is checked on CPU only: on CUDA it would cost a host sync on
    every call.
    """
    integer_tensor(idx, name)
    if tuple(idx.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(idx.shape)}")
    if host_tensor(idx):
        values_in_range(idx, name, upper)
    return idx


def target(t, name, logits, logits_name):
    """Class indices (B,) for logits (B, K)."""
    tensor(logits, logits_name, ndim=2)
    return indices(t, name, (logits.shape[0],), logits.shape[1])


def requires_grad(x, name):
    if not x.requires_grad:
        raise ValueError(f"{name} must require grad and be part of the graph of the outputs "
                         f"(its gradient is what this loss compares)")


def values_in_range(idx, name, upper, allowed=None):
    """Integer values in [0, upper) (or equal to ``allowed``, e.g. an ignore_index): read on
    the host on CPU; compiled, or on other devices, an asynchronous device assert (no host
    sync), which fails the next synchronising call rather than letting a kernel read out of
    bounds."""
    if idx.numel() == 0:
        return
    on_host = host_tensor(idx) and not torch.compiler.is_compiling()
    if on_host:
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()
        if lo >= 0 and hi < upper:  # one pass (and one read) settles the common case
            return
    ok = (idx >= 0) & (idx < upper)
    if allowed is not None:
        ok |= idx == allowed
    also = f" or equal to {allowed}" if allowed is not None else ""
    if on_host:
        if not bool(ok.all()):
            # Without an allowed value, every value's range; with one, the offending values'.
            seen = idx if allowed is None else idx[~ok]
            raise ValueError(f"{name} values must lie in [0, {upper}){also}, got values from "
                             f"{int(seen.min())} to {int(seen.max())}")
    else:  # a compiled graph cannot branch on the values: the check runs inside it instead
        torch._assert_async(ok.all(), f"{name} values must lie in [0, {upper}){also}")
