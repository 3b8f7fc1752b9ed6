"""fastkd.functional: one function per loss.

Each function checks its inputs (raising before any computation, naming the
argument), then runs the implementation that ``fastkd.backend`` picks for the
tensors' device. Each docstring states its loss's math and shapes. Notation: s student,
t teacher, B or N the batch, mse/l1 means over all elements, KLbm the batch-mean KL
divergence (torch's kl_div with reduction="batchmean"), normalize as F.normalize.

Global batch. The relational losses (pkt_cos_sim, rkd, rkd_distance, rkd_angle, sp, cc,
irg) take keyword-only ``global_batch=False, group=None``. With global_batch=True, called
in every process of a torch.distributed job of W ranks (group: a process group, None for
the default one), the batch is the concatenation of every rank's batch in rank order
(local batches may differ, and be 1, as long as the global one is >= 2): every rank
returns the loss of that whole batch, and rank r's gradient of its own inputs is W times
the whole loss's gradient of them, so that DistributedDataParallel's average over the
ranks gives the single-process parameter gradients (fastkd/distributed.py). The torch and
triton backends shard the work: each rank computes the relation rows of its own samples,
with torch ops (fastkd/torch_backend/pairwise.py) or with the Triton kernels on the rank's
row block (fastkd/autograd.py; IRG's vertex term, an mse, with torch ops on both); the reference backend gathers every rank's inputs and computes the whole loss on
each rank.
Under torch.compile a global-batch call runs eagerly, behind a graph break.
"""
import contextlib
import functools

import torch

from . import checks, device_ops, distributed
from . import chunked_linear as _chunked_linear
from .backend import IMPLEMENTATIONS, current_backend, eager_implementation, global_implementation, resolve
from .backend import autograd as _autograd
from .common import eager

# Losses of the gradients of a network's outputs: their reference needs the network's graph,
# which a fake run does not have. Both end in float32 operations under autocast anyway.
_NO_FAKE_REFERENCE = {"sobolev", "lwm"}
_AUTOCAST_DTYPES = {}  # (op, device type, autocast dtype, input dtypes) -> the reference's result dtype


def _dtypes(args):
    return tuple(_dtypes(a) if isinstance(a, (tuple, list)) else a.dtype if isinstance(a, torch.Tensor)
                 else None for a in args)


def _reference_dtype_under_autocast(op, args, device_type):
    """The dtype of the reference's result for these arguments under the autocast in force.

    Autocast runs some of the reference's operations (matrix products) in 16 bits and others
    in float32, so its result dtype depends on the loss; the fast paths compute in float32
    (or wider) whatever autocast says, and take this dtype at the end. Found by running the
    reference on fake tensors (no memory, no arithmetic), once per dtypes; under
    torch.compile by tracing the reference, whose unused result the compiler drops.
    """
    reference = IMPLEMENTATIONS[op]["reference"]
    if torch.compiler.is_compiling():
        return reference(*args).dtype
    key = (op, device_type, torch.get_autocast_dtype(device_type), _dtypes(args))
    if key not in _AUTOCAST_DTYPES:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        mode = FakeTensorMode(shape_env=ShapeEnv())  # sizes that depend on values (RKD's d[d > 0])

        def fake(a):
            if isinstance(a, (tuple, list)):
                return type(a)(fake(x) for x in a)
            return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
        with mode:
            _AUTOCAST_DTYPES[key] = reference(*(fake(a) for a in args)).dtype
    return _AUTOCAST_DTYPES[key]


def _short_way(first):
    """The device type of first, the op's first tensor, where the call may go straight to the
    implementation: eagerly, outside autocast, where no test routes eager calls through the
    operators (fastkd.device_ops.OPERATOR_ROUTES); else None. is_cuda and is_cpu cost a
    sixth of device.type."""
    if torch.compiler.is_compiling():
        return None
    kind = "cuda" if first.is_cuda else "cpu" if first.is_cpu else first.device.type
    if ((kind in _AUTOCAST_DEVICES and torch.is_autocast_enabled(kind))
            or (kind, False) in device_ops.OPERATOR_ROUTES):
        return None
    return kind


def _call(op, device, *args, shard=None):
    """The implementation fastkd.backend picks (shard: (group, sizes) for a global batch,
    see _shard): for the auto backend where fastkd.device_ops.routes says (compiled on
    CUDA, or inside autocast), the op's custom operator, whose kernel PyTorch's dispatcher
    picks by the tensors' device; else the chosen backend's function. Under torch.autocast
    it computes on the inputs as they come (its own precision rules, float32 accumulation
    at least), with autocast off inside, and returns the result in the dtype the reference
    gives there. An eager call outside autocast, the common case, takes the short way: the
    implementation fastkd.backend.eager_implementation keeps for its settings, called."""
    if shard is not None:
        return _call_global(op, device, shard, *args)
    first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]  # IRG's are tuples
    kind = _short_way(first)
    if kind is not None:
        return eager_implementation(op, first, kind)(*args)
    requested = current_backend()
    name = resolve(op, device, requested, first.numel())
    if requested == "auto" and device_ops.routes(op, device, name):
        return _autocast_call(op, device, functools.partial(device_ops.call, op), args)
    return _autocast_call(op, device, IMPLEMENTATIONS[op][name], args)


@eager
def _call_global(op, device, shard, *args):
    """_call over every rank's batch, always eager: inside a compiled function, a graph break
    (TorchDynamo would trace the collectives and the Python loop over the ranks' sizes)."""
    return _autocast_call(op, device, global_implementation(op, device, *shard), args)


_AUTOCAST_DEVICES = ("cpu", "cuda")  # autocast refuses other device types, such as meta


def _autocast_call(op, device, impl, args):
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return impl(*args)
    with torch.autocast(device.type, enabled=False):
        out = impl(*args)
    if op not in _NO_FAKE_REFERENCE:
        out = out.to(_reference_dtype_under_autocast(op, args, device.type))
    return out


def _run(op, *args, shard=None):
    """_call for an op whose first argument is a tensor, with the short way taken first (one
    call less on every loss's path)."""
    first = args[0]
    kind = _short_way(first) if shard is None else None
    if kind is not None:
        return eager_implementation(op, first, kind)(*args)
    return _call(op, first.device, *args, shard=shard)


def _pair(s, t, name_s, name_t, ndim=None, min_ndim=None):
    """Two non-empty floating-point tensors on one device (of ndim, or at least min_ndim,
    dimensions): one test of the common case, the named checks (which raise) otherwise."""
    if not (type(s) is torch.Tensor and type(t) is torch.Tensor and s.is_floating_point()
            and t.is_floating_point() and s.numel() and t.numel() and s.device == t.device
            and (ndim is None or s.dim() == t.dim() == ndim)
            and (min_ndim is None or min(s.dim(), t.dim()) >= min_ndim)):
        checks.tensor(s, name_s, ndim, min_ndim)
        checks.tensor(t, name_t, ndim, min_ndim)
        checks.same_device(**{name_s: s, name_t: t})


def _same_pair(s, t, name_s, name_t, ndim=None, min_ndim=None):
    _pair(s, t, name_s, name_t, ndim, min_ndim)
    if s.shape != t.shape:
        checks.same_shape(s, t, name_s, name_t)


def _shard(x, name, global_batch, group):
    """None for a loss of this batch alone, once x (N, ...) has N >= 2. For global_batch=True,
    (group, every rank's batch size) once torch.distributed is initialised and the global
    batch is >= 2 (one small all_gather; every rank raises alike)."""
    if not checks.flag(global_batch, "global_batch"):
        checks.min_batch(x, name)
        return None
    sizes = torch.compiler.disable(distributed.batch_sizes)(x.shape[0], x.device, group)
    if sum(sizes) < 2:
        raise ValueError(f"{name} needs a global batch of at least 2 samples for a relational loss "
                         f"(global_batch=True), got {sum(sizes)} (local batches {sizes})")
    return group, sizes


def _relational_pair(s, t, name_s, name_t, global_batch=False, group=None, **kw):
    """Checks a pair of relational inputs; returns _shard's (group, sizes) or None."""
    _pair(s, t, name_s, name_t, **kw)
    checks.same_batch(s, t, name_s, name_t)
    return _shard(s, name_s, global_batch, group)


def _maps_same_spatial(fm_s, fm_t):
    _pair(fm_s, fm_t, "fm_s", "fm_t", ndim=4)
    checks.same_batch(fm_s, fm_t, "fm_s", "fm_t")
    if fm_s.shape[2:] != fm_t.shape[2:]:
        raise ValueError(f"fm_s and fm_t must have the same (H, W), got {tuple(fm_s.shape[2:])} "
                         f"and {tuple(fm_t.shape[2:])}")


# --- logits -----------------------------------------------------------------

def logits(out_s, out_t):
    """Logits: mse(out_s, out_t). out_s, out_t (B, K) of one shape -> scalar."""
    _same_pair(out_s, out_t, "out_s", "out_t")
    return _run("logits", out_s, out_t)


def _kl_pair(out_s, out_t, name_s, name_t):
    _same_pair(out_s, out_t, name_s, name_t, None, 2)


def soft_target(out_s, out_t, T):
    """SoftTarget: KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2.

    out_s, out_t (B, K) or (B, K, ...) with classes on dim 1; T > 0. Batch mean
    divides by B.
    """
    _kl_pair(out_s, out_t, "out_s", "out_t")
    T = checks.argument("T", T)
    return _run("soft_target", out_s, out_t, T)


def dml(out1, out2):
    """DML: KLbm(softmax(out2) || softmax(out1)); out1 is the peer being trained.

    out1, out2 (B, K) or (B, K, ...), classes on dim 1.
    """
    _kl_pair(out1, out2, "out1", "out2")
    return _run("dml", out1, out2)


def bss(attacked_out_s, attacked_out_t, T):
    """BSS: KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor.

    attacked_out_* (B, K) logits of the attacked samples; T > 0.
    """
    _kl_pair(attacked_out_s, attacked_out_t, "attacked_out_s", "attacked_out_t")
    T = checks.argument("T", T)
    return _run("bss", attacked_out_s, attacked_out_t, T)


# --- feature maps -----------------------------------------------------------

def at(fm_s, fm_t, p, *, normalize=False):
    """AT: mse(am(fm_s), am(fm_t)), am(f) = A / (||A||_2 + 1e-6), A = sum_c |f|^p.

    fm_s (B, C_s, H, W), fm_t (B, C_t, H, W); p > 0 (typically 2).
    normalize=True: am(f) = normalize(mean_c |f|^p) = M / max(||M||_2, 1e-12), M = A / C_*
    (F.normalize, RepDistiller's Attention map for even p), the gradient through the clamp as
    autograd's (none to the norm where the clamp holds).
    """
    _maps_same_spatial(fm_s, fm_t)
    p = checks.argument("p", p)
    if checks.flag(normalize, "normalize"):
        return _run("at", fm_s, fm_t, p, True)
    return _run("at", fm_s, fm_t, p)


def hint(fm_s, fm_t):
    """Hint (FitNet): mse(fm_s, fm_t), same shapes."""
    _same_pair(fm_s, fm_t, "fm_s", "fm_t")
    return _run("hint", fm_s, fm_t)


def nst(fm_s, fm_t):
    """NST: mean K(F_t, F_t) + mean K(F_s, F_s) - 2 mean K(F_s, F_t).

    F = normalize(f as (B, C, HW), dim=2), K(X, Y)[b, j, i] = (Y[b, j] . X[b, i])^2.
    fm_s (B, C_s, H, W), fm_t (B, C_t, H', W') with H W = H' W'.
    """
    _pair(fm_s, fm_t, "fm_s", "fm_t", ndim=4)
    checks.same_batch(fm_s, fm_t, "fm_s", "fm_t")
    if fm_s.shape[2] * fm_s.shape[3] != fm_t.shape[2] * fm_t.shape[3]:
        raise ValueError(f"fm_s and fm_t must have the same H*W, got {tuple(fm_s.shape[2:])} "
                         f"and {tuple(fm_t.shape[2:])}")
    return _run("nst", fm_s, fm_t)


def _flow_shape(fm1, fm2, name1, name2):
    """The (C_1, C_2) of the flow matrix G(fm1, fm2), after checking the pair: fm1 is
    average-pooled to fm2's (H, W) when taller, else has fm2's (H, W)."""
    s1, s2 = fm1.shape, fm2.shape
    if s1[0] != s2[0]:
        checks.same_batch(fm1, fm2, name1, name2)
    if not (s1[2] > s2[2] or (s1[2] == s2[2] and s1[3] == s2[3])):
        raise ValueError(f"{name1} (H, W) {tuple(s1[2:])} must equal {name2}'s "
                         f"{tuple(s2[2:])}, or be larger (then it is average-pooled to it)")
    return s1[1], s2[1]


def fsp(fm_s1, fm_s2, fm_t1, fm_t2):
    """FSP: mse(G(fm_s1, fm_s2), G(fm_t1, fm_t2)), G(a, b) = a b^T / HW (B, C_a, C_b).

    All (B, C, H, W); a is adaptive-average-pooled to b's (H, W) when larger.
    """
    if not (type(fm_s1) is type(fm_s2) is type(fm_t1) is type(fm_t2) is torch.Tensor
            and fm_s1.device == fm_s2.device == fm_t1.device == fm_t2.device):
        _pair(fm_s1, fm_s2, "fm_s1", "fm_s2", 4)
        _pair(fm_t1, fm_t2, "fm_t1", "fm_t2", 4)
        checks.same_device(fm_s1=fm_s1, fm_s2=fm_s2, fm_t1=fm_t1, fm_t2=fm_t2)
    for x, name in ((fm_s1, "fm_s1"), (fm_s2, "fm_s2"), (fm_t1, "fm_t1"), (fm_t2, "fm_t2")):
        if not (x.dim() == 4 and x.is_floating_point() and x.numel()):
            checks.tensor(x, name, 4)
    flow_s = _flow_shape(fm_s1, fm_s2, "fm_s1", "fm_s2")
    flow_t = _flow_shape(fm_t1, fm_t2, "fm_t1", "fm_t2")
    if fm_s1.shape[0] != fm_t1.shape[0]:
        checks.same_batch(fm_s1, fm_t1, "fm_s1", "fm_t1")
    if flow_s != flow_t:
        raise ValueError(f"student and teacher flow matrices must match: channels (fm_s1, fm_s2) = "
                         f"{flow_s}, (fm_t1, fm_t2) = {flow_t}")
    return _run("fsp", fm_s1, fm_s2, fm_t1, fm_t2)


def ft(factor_s, factor_t):
    """FT: l1(normalize(flat(factor_s)), normalize(flat(factor_t))); (B, ...) of equal size per sample."""
    _pair(factor_s, factor_t, "factor_s", "factor_t", min_ndim=2)
    checks.same_batch(factor_s, factor_t, "factor_s", "factor_t")
    if factor_s.numel() != factor_t.numel():
        raise ValueError(f"factor_s and factor_t must have as many elements per sample, got shapes "
                         f"{tuple(factor_s.shape)} and {tuple(factor_t.shape)}")
    return _run("ft", factor_s, factor_t)


def ab(fm_s, fm_t, margin):
    """AB: mean((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]); pre-activation maps
    of one shape, margin m >= 0."""
    _same_pair(fm_s, fm_t, "fm_s", "fm_t")
    margin = checks.argument("margin", margin)
    return _run("ab", fm_s, fm_t, margin)


def vid(pred_mean, fm_t, alpha, eps=1e-6):
    """VID: mean(0.5 (log var + (mu - t)^2 / var)), var = softplus(alpha) + eps per channel.

    pred_mean (the regressor's output, mu) and fm_t (B, C, H, W); alpha (C,).
    """
    _same_pair(pred_mean, fm_t, "pred_mean", "fm_t", ndim=4)
    checks.tensor(alpha, "alpha", ndim=1)
    checks.same_device(pred_mean=pred_mean, alpha=alpha)
    if alpha.shape[0] != fm_t.shape[1]:
        raise ValueError(f"alpha must have one entry per channel of fm_t ({fm_t.shape[1]}), "
                         f"got {alpha.shape[0]}")
    eps = checks.argument("eps", eps)
    return _run("vid", pred_mean, fm_t, alpha, eps)


def ofd(fm_s, fm_t):
    """OFD: mean((s - t')^2 (1 - [s <= t' and t' <= 0])), t' = max(t, m_c),
    m_c = mean of the negative values of t in channel c.

    fm_s: the connector's output, fm_t the teacher's pre-ReLU map, both (B, C, H, W).
    """
    _same_pair(fm_s, fm_t, "fm_s", "fm_t", ndim=4)
    return _run("ofd", fm_s, fm_t)


def afd(fm_s, fm_t, rho, eps=1e-6):
    """AFD: mean_b sum_c rho[b, c] mean_hw (s' - t')^2, f' = f / (||f||_2 over (H, W) + eps).

    fm_s, fm_t (B, C, H, W); rho (B, C) channel weights (rows sum to 1).
    """
    _same_pair(fm_s, fm_t, "fm_s", "fm_t", ndim=4)
    _afd_rho(rho, fm_s)
    return _run("afd", fm_s, fm_t, rho, eps)


def _afd_rho(rho, fm_s):
    checks.tensor(rho, "rho", ndim=2)
    checks.same_device(fm_s=fm_s, rho=rho)
    if tuple(rho.shape) != tuple(fm_s.shape[:2]):
        raise ValueError(f"rho must have shape (B, C) = {tuple(fm_s.shape[:2])}, got {tuple(rho.shape)}")
    return rho


def afd_attention(fm_s, fm_t, channel_weights, eps=1e-6):
    """AFD with rho = channel_weights(pooled), pooled the mean of fm_t over (H, W) as
    (B, C, 1, 1) in fm_t's dtype: afd(fm_s, fm_t, channel_weights(pooled), eps). AFD's module
    passes its attention (pooled_channel_weights).

    Eagerly on the Triton path, where fm_t needs no gradient (a teacher's map), the mean is
    summed by afd's own forward kernel as it reads fm_t (fastkd.autograd.afd_pooled): one
    pass over the teacher less than pooling it first. Elsewhere adaptive_avg_pool2d forms it.
    """
    _same_pair(fm_s, fm_t, "fm_s", "fm_t", ndim=4)
    kind = _short_way(fm_s)
    fused = IMPLEMENTATIONS["afd"].get("triton")
    if (kind is not None and fused is not None and not (fm_t.requires_grad and torch.is_grad_enabled())
            and eager_implementation("afd", fm_s, kind) is fused):
        return _autograd.afd_pooled(fm_s, fm_t, lambda pooled: _afd_rho(channel_weights(pooled), fm_s), eps)
    rho = channel_weights(torch.nn.functional.adaptive_avg_pool2d(fm_t, 1))
    return _run("afd", fm_s, fm_t, _afd_rho(rho, fm_s), eps)  # afd's, the pair checked above


# --- gradients of the outputs ----------------------------------------------

def _target_pair(out_s, out_t, target):
    _same_pair(out_s, out_t, "out_s", "out_t", ndim=2)
    checks.target(target, "target", out_s, "out_s")
    checks.same_device(out_s=out_s, target=target)


def sobolev(out_s, out_t, img, target):
    """Sobolev: mse(normalize(flat(g_s)), normalize(flat(g_t)).detach()),
    g_x = d(sum_i out_x[i, target_i]) / d img, kept in the graph.

    out_* (B, K) computed from img (B, ...), which requires grad; target (B,) class indices.
    """
    _target_pair(out_s, out_t, target)
    checks.tensor(img, "img", min_ndim=2)
    checks.same_batch(img, out_s, "img", "out_s")
    checks.requires_grad(img, "img")
    return _run("sobolev", out_s, out_t, img, target)


def lwm(out_s, fm_s, out_t, fm_t, target):
    """LwM: l1(normalize(flat(cam_s)), normalize(flat(cam_t)).detach()),
    cam = relu(sum_c mean_hw(g) g), g = d(sum_i out[i, target_i]) / d fm.

    out_* (B, K); fm_* (B, C_*, H, W) in the graph of out_*; target (B,).
    """
    _target_pair(out_s, out_t, target)
    _maps_same_spatial(fm_s, fm_t)
    checks.same_batch(fm_s, out_s, "fm_s", "out_s")
    checks.requires_grad(fm_s, "fm_s")
    checks.requires_grad(fm_t, "fm_t")
    return _run("lwm", out_s, fm_s, out_t, fm_t, target)


# --- relations between samples ------------------------------------------------

def pkt_cos_sim(feat_s, feat_t, eps=1e-6, *, global_batch=False, group=None):
    """PKT: mean P_t log((P_t + eps) / (P_s + eps)), P = C' / rowsum(C'),
    C' = (x^ x^T + 1) / 2, x^ = x / (||x_row|| + eps).

    feat_s (N, D_s), feat_t (N, D_t), N >= 2. global_batch=True: feat_* (n_r, D_*) on rank r,
    N = sum n_r; rank r computes the rows of P of its samples, (n_r, N), each normalised
    over all N columns.
    """
    shard = _relational_pair(feat_s, feat_t, "feat_s", "feat_t", global_batch, group, ndim=2)
    eps = checks.argument("eps", eps)
    return _run("pkt_cos_sim", feat_s, feat_t, eps, shard=shard)


def rkd_distance(feat_s, feat_t, *, global_batch=False, group=None):
    """RKD distance term: smooth_l1(d_s, d_t) over N^2 entries, d = pdist(x) / mean(d[d > 0]).

    feat_s (N, D_s), feat_t (N, D_t), N >= 2. global_batch=True: feat_* (n_r, D_*) on rank r,
    N = sum n_r; rank r computes its rows of d, (n_r, N); the mean over the N(N-1)
    distances off the diagonal is all-reduced.
    """
    shard = _relational_pair(feat_s, feat_t, "feat_s", "feat_t", global_batch, group, ndim=2)
    return _run("rkd_distance", feat_s, feat_t, shard=shard)


def rkd_angle(feat_s, feat_t, *, global_batch=False, group=None):
    """RKD angle term: smooth_l1(A_s, A_t) over N^3 entries, A[i, j, k] = e_ij . e_ik,
    e_ij = normalize(x_j - x_i) (0 when x_j = x_i).

    feat_s (N, D_s), feat_t (N, D_t), N >= 2. global_batch=True: feat_* (n_r, D_*) on rank r,
    N = sum n_r; rank r computes the angles at its own anchors i, (n_r, N, N) a block at a
    time, from the squared distances (N, N) gathered from every rank's rows.
    """
    shard = _relational_pair(feat_s, feat_t, "feat_s", "feat_t", global_batch, group, ndim=2)
    return _run("rkd_angle", feat_s, feat_t, shard=shard)


def rkd(feat_s, feat_t, w_dist, w_angle, *, global_batch=False, group=None):
    """RKD: w_dist * rkd_distance + w_angle * rkd_angle; a term whose weight is 0 is skipped.

    feat_s (N, D_s), feat_t (N, D_t), N >= 2. global_batch=True: each term as its function
    says.
    """
    shard = _relational_pair(feat_s, feat_t, "feat_s", "feat_t", global_batch, group, ndim=2)
    w_dist = checks.argument("w_dist", w_dist)
    w_angle = checks.argument("w_angle", w_angle)
    if w_dist != 0 and w_angle != 0:  # one op: both terms from one set of squared distances
        return _run("rkd", feat_s, feat_t, w_dist, w_angle, shard=shard)
    loss = 0.0
    if w_dist != 0:
        loss = loss + w_dist * _run("rkd_distance", feat_s, feat_t, shard=shard)
    if w_angle != 0:
        loss = loss + w_angle * _run("rkd_angle", feat_s, feat_t, shard=shard)
    if not isinstance(loss, torch.Tensor):
        # Both weights 0: a zero that still belongs to both graphs.
        loss = (feat_s.sum() + feat_t.sum()) * 0.0
    return loss


def sp(fm_s, fm_t, *, global_batch=False, group=None):
    """SP: mse(G^_s, G^_t), G^ = normalize(flat(f) flat(f)^T, dim=1) (N, N).

    fm_s (N, ...), fm_t (N, ...), N >= 2. global_batch=True: fm_* (n_r, ...) on rank r,
    N = sum n_r; rank r computes the rows of G^ of its samples, (n_r, N) (each row is
    normalised by itself).
    """
    shard = _relational_pair(fm_s, fm_t, "fm_s", "fm_t", global_batch, group, min_ndim=2)
    return _run("sp", fm_s, fm_t, shard=shard)


def cc(feat_s, feat_t, gamma, P_order, *, global_batch=False, group=None):
    """CC: mse(K_s, K_t), K = sum_{p=0..P} e^{-2 gamma} (2 gamma)^p / p! S^p, S = x^ x^T
    with x^ the L2-normalised rows.

    feat_s (N, D_s), feat_t (N, D_t), N >= 2; gamma a number, P_order >= 0.
    global_batch=True: feat_* (n_r, D_*) on rank r, N = sum n_r; rank r computes the rows of
    K of its samples, (n_r, N).
    """
    shard = _relational_pair(feat_s, feat_t, "feat_s", "feat_t", global_batch, group, ndim=2)
    gamma = checks.argument("gamma", gamma)
    P_order = checks.argument("P_order", P_order)
    return _run("cc", feat_s, feat_t, gamma, P_order, shard=shard)


def _irg_check(irg_x, name):
    if not isinstance(irg_x, (tuple, list)) or len(irg_x) != 4:
        raise TypeError(f"{name} must be a sequence (fm1, fm2, feat, out), got {type(irg_x).__name__}"
                        + (f" of length {len(irg_x)}" if isinstance(irg_x, (tuple, list)) else ""))
    fm1, fm2, feat, out = irg_x
    checks.feature_map(fm1, f"{name}[0] (fm1)")
    checks.feature_map(fm2, f"{name}[1] (fm2)")
    checks.tensor(feat, f"{name}[2] (feat)", min_ndim=2)
    checks.tensor(out, f"{name}[3] (out)", min_ndim=2)
    for i, x in enumerate(irg_x[1:], 1):
        checks.same_batch(fm1, x, f"{name}[0]", f"{name}[{i}]")
    # The transformation pools fm1 to fm2's (H, W) when larger, and averages fm2's channels
    # in pairs when fm1 has fewer; then both must hold as many values per sample.
    c1, (h1, w1) = fm1.shape[1], (fm2.shape[2:] if fm1.shape[2] > fm2.shape[2] else fm1.shape[2:])
    c2, h2, w2 = fm2.shape[1:]
    if c1 < c2:
        if c2 % 2:
            raise ValueError(f"{name}: fm2 has more channels ({c2}) than fm1 ({c1}), so they are "
                             f"averaged in pairs, which needs an even count")
        c2 //= 2
    if c1 * h1 * w1 != c2 * h2 * w2:
        raise ValueError(f"{name}: fm1 {tuple(fm1.shape[1:])} and fm2 {tuple(fm2.shape[1:])} do not "
                         f"hold as many values per sample after pooling fm1 and halving fm2's channels")


def irg(irg_s, irg_t, w_irg_vert, w_irg_edge, w_irg_tran, *, global_batch=False, group=None):
    """IRG: w_vert * mse(out_s, out_t) + w_edge * edge + w_tran * transformation.

    irg_s, irg_t: sequences (fm1, fm2, feat, out) of the student and the teacher, batch N >= 2.
    edge = mean over (feat, fm1, fm2) of mse(E_s, E_t), E(x) = pdist2(flat x) / max;
    transformation = mse(T_s, T_t), T_i = |fm1_i - fm2_i|^2 / max
    (fastkd.reference.irg.transformation: pooling and channel pairing). A term
    whose weight is 0 is skipped. global_batch=True: every tensor (n_r, ...) on rank r,
    N = sum n_r; rank r computes its rows of each E, (n_r, N), and T of its samples, with
    each max(pdist2) and max(d) all-reduced; the vertex mse is a mean over all N samples.
    """
    _irg_check(irg_s, "irg_s")
    _irg_check(irg_t, "irg_t")
    checks.same_device(**{f"irg_{side}[{i}]": x for side, seq in (("s", irg_s), ("t", irg_t))
                          for i, x in enumerate(seq)})
    checks.same_batch(irg_s[0], irg_t[0], "irg_s[0]", "irg_t[0]")
    checks.same_shape(irg_s[3], irg_t[3], "irg_s[3] (out)", "irg_t[3] (out)")
    shard = _shard(irg_s[0], "irg_s[0] (fm1)", global_batch, group)
    weights = {name: checks.argument(name, w) for name, w in
               (("w_irg_vert", w_irg_vert), ("w_irg_edge", w_irg_edge), ("w_irg_tran", w_irg_tran))}
    parts = {"w_irg_vert": ("irg_vertex", (irg_s[3], irg_t[3])),
             "w_irg_edge": ("irg_edge", (irg_s, irg_t)),
             "w_irg_tran": ("irg_transformation", (irg_s, irg_t))}
    loss = 0.0
    for name, (op, args) in parts.items():
        if weights[name] != 0:
            loss = loss + weights[name] * _call(op, irg_s[0].device, *args, shard=shard)
    if not isinstance(loss, torch.Tensor):
        loss = sum(x.sum() for x in (*irg_s, *irg_t)) * 0.0
    return loss


# --- contrast -------------------------------------------------------------------

def crd_contrast(embed, memory, sample_idx, nce_t, z, n_data, eps=1e-7):
    """One side of CRD: contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z).

    contrast_loss(x) = -(sum_b log(x_b0 / (x_b0 + N/M + eps))
                         + sum_{b, k >= 1} log((N/M) / (x_bk + N/M + eps))) / B, M = n_data.
    embed (B, feat_dim); memory (n_data, feat_dim), constant; sample_idx (B, N + 1) integer
    rows of memory, the positive first; nce_t > 0; z > 0 the normalisation constant.
    """
    checks.tensor(embed, "embed", ndim=2)
    checks.tensor(memory, "memory", ndim=2)
    checks.same_device(embed=embed, memory=memory, sample_idx=sample_idx)
    if memory.shape[1] != embed.shape[1]:
        raise ValueError(f"memory rows ({memory.shape[1]}) and embed ({embed.shape[1]}) must have "
                         f"the same feat_dim")
    if not isinstance(sample_idx, torch.Tensor) or sample_idx.dim() != 2 or sample_idx.shape[1] < 2:
        raise ValueError(f"sample_idx must be a (B, nce_n + 1) tensor with nce_n >= 1, got "
                         f"{tuple(sample_idx.shape) if isinstance(sample_idx, torch.Tensor) else type(sample_idx).__name__}")
    checks.indices(sample_idx, "sample_idx", (embed.shape[0], sample_idx.shape[1]), memory.shape[0])
    nce_t = checks.argument("nce_t", nce_t)
    if not (isinstance(z, torch.Tensor) and z.dim() == 0
            and (not checks.host_tensor(z) or torch.compiler.is_compiling())):
        # On the GPU, checking a tensor z would sync; compiled, it would be a graph break.
        z = checks.number(z, "z", positive=True)
    n_data = checks.integer(n_data, "n_data", least=1)
    return _run("crd_contrast", embed, memory, sample_idx, nce_t, z, n_data, eps)


# --- LLM-scale logits ----------------------------------------------------------

def _rows_like(x, name, lead, last=None):
    if tuple(x.shape[:-1]) != tuple(lead) or (last is not None and x.shape[-1] != last):
        want = (*lead, last if last is not None else "k")
        raise ValueError(f"{name} must have shape {want} (student_hidden's leading dims), got {tuple(x.shape)}")


def _linear(hidden, weight, bias, names):
    name_h, name_w, name_b = names
    checks.tensor(hidden, name_h, min_ndim=2)
    checks.tensor(weight, name_w, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name_w} must be (V, {hidden.shape[-1]}) for {name_h} of hidden size "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    tensors = {name_h: hidden, name_w: weight}
    if bias is not None:
        checks.tensor(bias, name_b, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{name_b} must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors[name_b] = bias
    if len({t.dtype for t in tensors.values()}) > 1:
        listing = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise TypeError(f"{listing} must have one dtype (a linear layer's)")
    return tensors


def _checked_head(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                  teacher_bias, teacher_logits, teacher_topk_indices, teacher_topk_logprobs, T, reduction,
                  ignore_index, hard_weight, chunk_size):
    """FusedLinearSoftTarget's and FusedLinearDistillation's arguments checked (each error
    names its argument), the head's tensors cast as F.linear under autocast: (student_hidden,
    student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, T,
    hard_weight, ignore_index, chunk_size)."""
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: the head's matrix products in the autocast dtype.
        cast = torch.get_autocast_dtype(device_type)
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = (
            x.to(cast) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias))
    student = _linear(student_hidden, student_weight, student_bias,
                      ("student_hidden", "student_weight", "student_bias"))
    lead, v = tuple(student_hidden.shape[:-1]), student_weight.shape[0]
    tensors = dict(student)
    given = {"teacher_hidden/teacher_weight": teacher_hidden is not None or teacher_weight is not None,
             "teacher_logits": teacher_logits is not None,
             "teacher_topk_indices/teacher_topk_logprobs":
                 teacher_topk_indices is not None or teacher_topk_logprobs is not None}
    if sum(given.values()) != 1:
        have = ", ".join(n for n, g in given.items() if g) or "none"
        raise ValueError(f"give the teacher exactly one way: teacher_hidden with teacher_weight, "
                         f"teacher_logits, or teacher_topk_indices with teacher_topk_logprobs; got {have}")
    if given["teacher_hidden/teacher_weight"]:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight come together (a dense teacher)")
        tensors.update(_linear(teacher_hidden, teacher_weight, teacher_bias,
                               ("teacher_hidden", "teacher_weight", "teacher_bias")))
        _rows_like(teacher_hidden, "teacher_hidden", lead, teacher_hidden.shape[-1])
        if teacher_weight.shape[0] != v:
            raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} classes, student_weight {v}: "
                             f"the vocabularies must match")
    elif teacher_bias is not None:
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight")
    if given["teacher_logits"]:
        checks.tensor(teacher_logits, "teacher_logits")
        _rows_like(teacher_logits, "teacher_logits", lead, v)
        tensors["teacher_logits"] = teacher_logits
    if given["teacher_topk_indices/teacher_topk_logprobs"]:
        if teacher_topk_indices is None or teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_indices and teacher_topk_logprobs come together (a top-k teacher)")
        checks.integer_tensor(teacher_topk_indices, "teacher_topk_indices")
        checks.tensor(teacher_topk_logprobs, "teacher_topk_logprobs")
        _rows_like(teacher_topk_indices, "teacher_topk_indices", lead)
        checks.same_shape(teacher_topk_indices, teacher_topk_logprobs, "teacher_topk_indices",
                          "teacher_topk_logprobs")
        if teacher_topk_indices.shape[-1] > v:
            raise ValueError(f"teacher_topk_indices has k={teacher_topk_indices.shape[-1]} classes, "
                             f"more than the vocabulary V={v} of student_weight")
        tensors["teacher_topk_indices"] = teacher_topk_indices
        tensors["teacher_topk_logprobs"] = teacher_topk_logprobs
    T = checks.argument("T", T)
    hard_weight = checks.argument("hard_weight", hard_weight)
    checks.argument("reduction", reduction)
    ignore_index = checks.argument("ignore_index", ignore_index)
    chunk_size = checks.argument("chunk_size", chunk_size)
    if labels is not None:
        checks.integer_tensor(labels, "labels")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (student_hidden's leading dims), "
                             f"got {tuple(labels.shape)}")
        tensors["labels"] = labels
    elif hard_weight:
        raise ValueError("hard_weight > 0 needs labels (the hard term's targets)")
    checks.same_device(**tensors)
    if labels is not None:
        checks.values_in_range(labels, "labels", v, allowed=ignore_index)
    if teacher_topk_indices is not None:
        checks.values_in_range(teacher_topk_indices, "teacher_topk_indices", v)
    return (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, T,
            hard_weight, ignore_index, chunk_size)


def fused_linear_soft_target(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                             labels=None, *, student_bias=None, teacher_bias=None, teacher_logits=None,
                             teacher_topk_indices=None, teacher_topk_logprobs=None, T=1.0,
                             reduction="batchmean", ignore_index=-100, hard_weight=0.0, chunk_size=None):
    """SoftTarget on an LM head's logits, without materialising them.

    z_s = student_hidden student_weight^T (+ student_bias), (N, V) over the N = prod(...)
    tokens of student_hidden (..., H). The teacher, fixed (it gets no gradient), is given one
    way: teacher_hidden (..., H_t) with teacher_weight (V, H_t) (+ teacher_bias), its logits
    teacher_logits (..., V), or a top-k: teacher_topk_indices (..., k) int and
    teacher_topk_logprobs (..., k) float, log-probabilities at temperature 1. Teacher
    probabilities at T: p_t = softmax(z_t / T), or for a top-k softmax(logp_k / T) over its k
    classes and 0 elsewhere (the top-k mass renormalised; repeated indices add up).

    Per kept token (labels (...) int, a token is kept unless its label is ignore_index; all
    are kept without labels):
        T^2 * sum_c p_t(c) (log p_t(c) - log_softmax(z_s / T)(c)) + hard_weight * CE(z_s, label)
    reduction: "batchmean" sum / n_kept; "sum"; "mean" KL part / (n_kept V) (torch's kl_div
    "mean") + hard part / n_kept; "none" (...) per token, 0 where ignored. n_kept is clamped
    at 1: when every token is ignored the loss is 0 with zero gradients (not NaN).

    With a dense teacher and no labels it equals fastkd.soft_target(z_s, z_t, T). Memory:
    the logits exist one chunk of chunk_size tokens at a time (default: about 2^28 logits per
    chunk on CUDA, 2^22 on CPU), so beyond the inputs and gradients it needs O(chunk_size x V). Float32
    accumulation for 16-bit inputs. Compiled (torch.compile, torch.export), one custom
    operator node, fastkd::fused_linear_soft_target (fastkd.device_ops), on CPU and CUDA.
    """
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, T, hard_weight,
     ignore_index, chunk_size) = _checked_head(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        teacher_logits, teacher_topk_indices, teacher_topk_logprobs, T, reduction, ignore_index, hard_weight,
        chunk_size)
    return _run("fused_linear_soft_target", student_hidden, student_weight, teacher_hidden, teacher_weight,
                labels, student_bias, teacher_bias, teacher_logits, teacher_topk_indices,
                teacher_topk_logprobs, T, reduction, ignore_index, hard_weight, chunk_size)


# --- FusedLinearDistillation: every divergence LLM distillation uses, on the LM head ------

DIVERGENCES = _chunked_linear.DIVERGENCES
TOPK_REST = ("renormalise", "bucket")


def _divergence(divergence, beta, alpha, topk_rest, topk):
    """The checked chunked_linear.Divergence (each error names its argument); topk: whether
    the teacher is a top-k, where a divergence that compares the student's mass outside it
    against a teacher's 0 is infinite under "renormalise" and refused."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    beta = checks.number(beta, "beta")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (the jsd's mixing coefficient), got {beta}")
    alpha = checks.number(alpha, "alpha")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (the skew divergences' mixing coefficient), got {alpha}")
    checks.one_of(topk_rest, "topk_rest", TOPK_REST)
    spec = _chunked_linear.divergence(divergence, beta, alpha, topk_rest)
    if topk and topk_rest == "renormalise" and spec.name == "reverse_kl":
        what = {"jsd": "jsd at beta=1", "skew_reverse_kl": "skew_reverse_kl at alpha=0"}.get(divergence, divergence)
        raise ValueError(f"divergence={what} with a top-k teacher and topk_rest='renormalise' is infinite (the "
                         f"teacher has no mass outside its k classes, the student does); use topk_rest='bucket'")
    return spec


def _reference_distillation(spec, *args):
    """The reference with FusedLinearSoftTarget's arguments, after spec's."""
    *tensors, T, reduction, ignore_index, hard_weight, chunk_size = args
    from .reference import divergences
    return divergences.fused_linear_distillation(*tensors, spec.name, T, spec.beta, spec.alpha, spec.topk_rest,
                                                 reduction, ignore_index, hard_weight, chunk_size)


def _distillation_implementation(device):
    """fused_linear_distillation(spec, FusedLinearSoftTarget's reference arguments) of the
    backend chosen for FusedLinearSoftTarget on this device."""
    from .backend import autograd as triton_functions
    from .torch_backend import fused_linear as torch_fused_linear
    name = resolve("fused_linear_soft_target", device)
    if name == "triton":
        return triton_functions.fused_linear_distillation
    return torch_fused_linear.fused_linear_distillation if name == "torch" else _reference_distillation


def fused_linear_distillation(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                              labels=None, *, student_bias=None, teacher_bias=None, teacher_logits=None,
                              teacher_topk_indices=None, teacher_topk_logprobs=None, divergence="kl", T=1.0,
                              beta=0.5, alpha=0.1, topk_rest="renormalise", reduction="batchmean",
                              ignore_index=-100, hard_weight=0.0, chunk_size=None):
    """A divergence between the teacher's and the student's distributions at temperature T
    on an LM head's logits, without materialising them: fused_linear_soft_target's arguments,
    teacher forms, reductions, ignore_index and hard term, with

        divergence  "kl"               KL(p || q)                              (forward)
                    "reverse_kl"       KL(q || p)                              (MiniLLM)
                    "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),
                                       m = beta p + (1 - beta) q (TRL's GKD; beta 0: kl, 1: reverse_kl)
                    "skew_kl"          KL(p || alpha p + (1 - alpha) q)        (DistiLLM)
                    "skew_reverse_kl"  KL(q || (1 - alpha) p + alpha q)        (DistiLLM)
                    "tvd"              sum_c |p_c - q_c| / 2

    p the teacher's distribution at T, q = softmax(z_s / T); per kept token
    T^2 D(p, q) + hard_weight CE(z_s, label). beta, alpha in [0, 1]. A top-k teacher
    (indices distinct per token) puts both distributions on k + 1 outcomes, its classes and
    one bucket for the rest: topk_rest="renormalise" gives the teacher's bucket 0 (its top-k
    renormalised; infinite for reverse_kl, which is refused), "bucket" gives it the
    teacher's own rest mass 1 - sum exp(logp) (fastkd/reference/divergences.py has the
    math). divergence="kl" runs fused_linear_soft_target itself; the others the same chunk
    loop (O(chunk_size x V) memory, hand-written backward), compiled (torch.compile,
    torch.export) as one custom operator node, fastkd::fused_linear_distillation
    (fastkd.device_ops), on CPU and CUDA.
    """
    topk = teacher_topk_indices is not None or teacher_topk_logprobs is not None
    spec = _divergence(divergence, beta, alpha, topk_rest, topk)
    if spec.name == "kl" and (not topk or topk_rest == "renormalise"):
        return fused_linear_soft_target(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits, teacher_topk_indices=teacher_topk_indices,
            teacher_topk_logprobs=teacher_topk_logprobs, T=T, reduction=reduction, ignore_index=ignore_index,
            hard_weight=hard_weight, chunk_size=chunk_size)
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, T, hard_weight,
     ignore_index, chunk_size) = _checked_head(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        teacher_logits, teacher_topk_indices, teacher_topk_logprobs, T, reduction, ignore_index, hard_weight,
        chunk_size)
    device = student_hidden.device
    requested = current_backend()
    if requested == "auto" and device_ops.routes(device_ops.FUSED_LINEAR, device,
                                                 resolve("fused_linear_soft_target", device, requested)):
        # Compiled (or in autocast): one node, the operator, its kernel picked by the device.
        impl = device_ops.call_fused_linear_distillation
    else:
        impl = _distillation_implementation(device)
    autocast = device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type)
    # The head's products were cast above, as F.linear would; inside, the loss's own precision.
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
            teacher_logits, teacher_topk_indices, teacher_topk_logprobs, T, reduction, ignore_index, hard_weight,
            chunk_size)
    if not autocast:
        return impl(spec, *args)
    with torch.autocast(device.type, enabled=False):
        out = impl(spec, *args)
    # The dtype the reference gives under autocast, as FusedLinearSoftTarget's.
    return out.to(_reference_dtype_under_autocast("fused_linear_soft_target", args, device.type))


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss (same signature, same numbers: no T^2 factor), on
    logits (B, L, V) (any leading dims): per token the jsd of fused_linear_distillation at
    T = temperature (beta = 0 forward KL, 1 reverse KL); labels (B, L), -100 ignored.
    batchmean: sum / kept tokens (clamped at 1), or / B = student_logits.shape[0] without
    labels (TRL's); sum; mean: sum / (kept tokens x V); none: TRL's elementwise terms,
    (B, L, V), or (kept tokens, V) with labels (materialised, as TRL's).
    num_items_in_batch: sum / it. The scalar reductions run fused_linear_distillation's
    chunk loop on the logits (no softmax copies beyond a chunk's; the gradient is the
    logits'), the torch rows on the CPU, the Triton kernel on CUDA; compiled (torch.compile
    with fullgraph=True, torch.export), one custom operator node, fastkd::generalized_jsd
    (fastkd.device_ops), on either device."""
    _same_pair(student_logits, teacher_logits, "student_logits", "teacher_logits", min_ndim=2)
    beta = checks.number(beta, "beta")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (the jsd's mixing coefficient), got {beta}")
    temperature = checks.number(temperature, "temperature", positive=True)
    checks.argument("reduction", reduction)
    lead, v = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if labels is not None:
        checks.integer_tensor(labels, "labels")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (the logits' leading dims), got {tuple(labels.shape)}")
        checks.same_device(student_logits=student_logits, labels=labels)
    name = resolve("fused_linear_soft_target", student_logits.device)
    if reduction == "none" or name == "reference":
        from .reference import divergences
        return divergences.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                                reduction, num_items_in_batch)
    if current_backend() == "auto" and device_ops.routes(device_ops.FUSED_LINEAR, student_logits.device, name):
        # Compiled: one node, fastkd::generalized_jsd, the chunk loop inside (as T^2 jsd).
        total = device_ops.call_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature)
        total = total / (float(temperature) * float(temperature))
    else:
        spec = _chunked_linear.divergence("jsd", beta, 0.0)
        if name == "triton":
            from .backend import autograd as triton_functions
            rows = triton_functions.divergence_rows(spec)
        else:
            from .torch_backend import fused_linear as torch_fused_linear
            rows = _chunked_linear.DivergenceRows(spec, torch_fused_linear.linear_kl_rows,
                                                  torch_fused_linear.linear_kl_rows)
        with device_ops.on_device_of((student_logits, teacher_logits)):  # the CUDA device of the logits
            total = _chunked_linear.run_on_logits(rows, student_logits, teacher_logits, labels, temperature)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        count = (labels != -100).sum().clamp(min=1)
    else:
        count = student_logits.shape[0]
    if reduction == "batchmean":
        return total / count
    return total / (count * v) if labels is not None else total / student_logits.numel()
