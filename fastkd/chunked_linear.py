"""The token-chunk loop of FusedLinearSoftTarget, shared by its torch and Triton paths.

Neither model's (N, V) logits exist at once: for each chunk of rows [r0, r1),

    z = h[r0:r1] W^T + b                      (chunk, V), the student's logits
    t = h_t[r0:r1] W_t^T + b_t, or the given logits' rows, or the top-k (indices, q)
    stats, dz = rows(z, t, ...)               the chunk's losses; dz written over z
    top-k: KL_row = sum_j q_j (log q_j - log_softmax(z / T)[idx_j]),  dz[idx_j] -= w_kl T q_j
    dh[r0:r1] = dz W,   dW += dz^T h[r0:r1],   db += sum over rows of dz

with q = softmax(logp_k / T) over the k given classes. ``rows`` is the backend's: the
Triton kernel (fastkd/kernels/fused_linear.py) or torch ops (fastkd/torch_backend/
fused_linear.py), both with the contract of ``linear_kl_rows`` there.

Gradients: with a scalar reduction they are computed during the forward (the logits are
made once) for a unit upstream gradient and scaled in place in backward (so the graph
can be backpropagated once, as a second dW would otherwise be held); with reduction="none" the
upstream gradient differs by row, so backward runs the loop again with it in the weights.
dW accumulates in W's dtype (one rounding per chunk, of a sum whose terms were rounded
once); the teacher is a fixed target and gets no gradient.
"""
import math
from typing import NamedTuple

import torch

from .common import accumulation_dtype, eager, first_order, result_dtype

# Logits per chunk by default. On CUDA the Triton kernel holds no buffer beyond the two
# models' chunk logits (512 MB each in bfloat16), and each chunk reads and writes all of dW
# once more: on an H100 at 8,192 tokens x 128k classes, 2^27 (1,048 rows) took 61.9 ms, 2^28
# 58.4 ms at a fifth of eager's peak memory, 2^29 57.6 ms at 0.29 of it
# (benchmarks/results/gpu-NVIDIA-H100-80GB-HBM3-20261127). The torch path's float32
# temporaries take several chunk-sized buffers, so the CPU's is smaller.
CHUNK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 22}


def default_chunk(n, v, device):
    return max(1, min(n, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // v))


def row_weights(kept, n_rows, v, reduction, device, dtype):
    """(w_kl, w_ce) (N,) in the accumulation dtype: each row's weight in the reduced loss of
    the KL and hard terms. batchmean: 1/n_kept; mean: 1/(n_kept V) for KL (torch's kl_div
    'mean'), 1/n_kept for the hard term; sum and none: 1. 0 on ignored rows (kept False).
    n_kept is clamped at 1, so a batch of ignored tokens gives a loss of 0 and zero
    gradients, not NaN.
    """
    if kept is None:
        keep = torch.ones(n_rows, dtype=dtype, device=device)
    else:
        keep = kept.to(dtype)
    n = keep.sum().clamp(min=1)
    if reduction == "batchmean":
        return keep / n, keep / n
    if reduction == "mean":
        return keep / (n * v), keep / n
    return keep, keep


class ChunkedLinearSoftTarget(torch.autograd.Function):
    """(student_hidden (N, H), student_weight (V, H), student_bias (V,) or None, teacher,
    labels (N,) int64 or None, kept (N,) bool or None) -> loss: a scalar or (N,).

    teacher: ("dense", h_t, W_t, b_t), ("logits", t) or ("topk", idx, logp), all fixed.
    rows: the backend's linear_kl_rows. T, hard_weight floats; reduction as the loss's;
    grad_mode: torch.is_grad_enabled() at the call (no gradients are made without it).
    """

    @staticmethod
    def forward(ctx, h, W, b, rows, teacher, labels, kept, T, hard_weight, reduction, chunk, out_dtype,
                grad_mode):
        # needs_input_grad is True under torch.no_grad too: the caller says if grad mode is on.
        need = ctx.needs_input_grad[:3] if grad_mode else (False, False, False)
        early = any(need) and reduction != "none"
        per_row, grads = losses_and_gradients(h, W, b, rows, teacher, labels, kept, T, hard_weight, reduction,
                                              chunk, need)
        ctx.rows, ctx.teacher, ctx.labels, ctx.T, ctx.hard_weight = rows, teacher, labels, T, hard_weight
        ctx.reduction, ctx.chunk, ctx.kept = reduction, chunk, kept
        ctx.grads = grads
        if not early:
            ctx.save_for_backward(h, W, b)
        if reduction == "none":
            return per_row.to(out_dtype)
        return per_row.sum().to(out_dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        if ctx.reduction != "none":
            # Scaled in place: a copy would hold a second dW (V x H) at the peak.
            if ctx.grads is None:
                raise RuntimeError("fused_linear_soft_target: its gradients are made during the forward and "
                                   "scaled in place by the first backward, so its graph can be backpropagated "
                                   "once (this is a second backward through it; compute the loss again)")
            grads, ctx.grads = ctx.grads, None
            return tuple(None if g is None else g.mul_(grad.to(g.dtype)) for g in grads) + (None,) * 10
        h, W, b = ctx.saved_tensors
        return weighted_gradients(h, W, b, ctx.rows, ctx.teacher, ctx.labels, ctx.kept, ctx.T, ctx.hard_weight,
                                  ctx.chunk, grad, ctx.needs_input_grad[:3]) + (None,) * 10


def losses_and_gradients(h, W, b, rows, teacher, labels, kept, T, hard_weight, reduction, chunk, need):
    """The per-row losses (N,) in the accumulation dtype, each with its weight in the
    reduction, and (dh, dW, db) of their sum (the reduced loss at a unit upstream gradient)
    where need asks, with a scalar reduction (None elsewhere: with "none" the upstream
    gradient weighs each row, weighted_gradients)."""
    w_kl, w_ce = row_weights(kept, h.shape[0], _vocabulary(h, W), reduction, h.device, _acc(h, W, teacher))
    early = any(need) and reduction != "none"
    return _loop(h, W, b, rows, teacher, labels, w_kl, w_ce, T, hard_weight, chunk,
                 need if early else (False, False, False))


def weighted_gradients(h, W, b, rows, teacher, labels, kept, T, hard_weight, chunk, grad, need):
    """(dh, dW, db) of sum over rows of grad (N,) times the row's loss (reduction "none"),
    where need asks (None elsewhere): the chunk loop again, the weights scaled by grad."""
    w_kl, w_ce = row_weights(kept, h.shape[0], _vocabulary(h, W), "none", h.device, _acc(h, W, teacher))
    g = grad.to(w_kl.dtype)
    return _loop(h, W, b, rows, teacher, labels, w_kl * g, w_ce * g, T, hard_weight, chunk, need)[1]


def _linear(h, W, b):
    """h W^T + b as F.linear computes it: the bias added before the one rounding of the
    product (adding it after would round the logits twice)."""
    return torch.addmm(b, h, W.t()) if b is not None else h @ W.t()


def _acc(h, W, teacher):
    """Float64 sums for float64 inputs, else float32 (fastkd.common.accumulation_dtype)."""
    return accumulation_dtype(*(x for x in (h, W, *teacher[1:]) if isinstance(x, torch.Tensor)
                                and x.is_floating_point()))


def _vocabulary(h, W):
    """V: W's rows, or without a head (W None: h holds the student's logits) h's columns."""
    return W.shape[0] if W is not None else h.shape[1]


def _teacher_rows(teacher, r0, r1):
    kind = teacher[0]
    if kind == "dense":
        _, h_t, W_t, b_t = teacher
        return _linear(h_t[r0:r1], W_t, b_t)
    return teacher[1][r0:r1]


def _loop(h, W, b, rows, teacher, labels, w_kl, w_ce, T, hard_weight, chunk, need):
    """The per-row losses (N,), w_kl T^2 KL + w_ce hard_weight CE (KL: the divergence of
    ``rows`` where it is a DivergenceRows), in w_kl's dtype (the accumulation dtype), and
    (dh, dW, db) where ``need`` asks (None elsewhere)."""
    n = h.shape[0]
    grad = any(need)
    per_row = torch.empty(n, device=h.device, dtype=w_kl.dtype)
    dh = torch.empty_like(h) if need[0] else None
    dW = torch.zeros_like(W) if need[1] else None
    db = torch.zeros(W.shape[0], device=h.device, dtype=w_kl.dtype) if need[2] else None
    topk = teacher[0] == "topk"
    head = W is not None  # else h holds the student's logits, and dh is theirs
    general = isinstance(rows, DivergenceRows)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        hc = h[r0:r1]
        z = _linear(hc, W, b) if head else hc.clone(memory_format=torch.contiguous_format)
        t = None if topk else _teacher_rows(teacher, r0, r1)
        chunk_labels = labels[r0:r1] if labels is not None else None
        w_k, w_c = w_kl[r0:r1], w_ce[r0:r1]
        if topk and general:
            kl, ce = _topk_divergence(z, teacher[1][r0:r1], teacher[2][r0:r1], chunk_labels, w_k, w_c, T,
                                      hard_weight, grad, rows)
        else:
            if topk:
                idx = teacher[1][r0:r1]
                q = torch.softmax(teacher[2][r0:r1].to(w_kl.dtype) / T, dim=1)
                z_idx = z.gather(1, idx).to(w_kl.dtype)  # before rows() writes dz over z
            stats = rows(z, t, chunk_labels, w_k, w_c, T, hard_weight, grad)
            shift_s, log_z_s, kl, ce = stats
            if topk:
                log_q = (z_idx / T - shift_s[:, None]) - log_z_s[:, None]
                kl = (torch.xlogy(q, q) - q * log_q).sum(1).clamp(min=0)
                if grad:
                    z.scatter_add_(1, idx, (-(w_k * T)[:, None] * q).to(z.dtype))
        # An ignored row adds 0 even where its logits are not finite.
        per_row[r0:r1] = torch.where((w_k != 0) | (w_c != 0), w_k * (T * T) * kl + w_c * hard_weight * ce, 0.0)
        if grad:
            if dh is not None and not head:
                dh[r0:r1] = z
            elif dh is not None:
                torch.mm(z, W, out=dh[r0:r1])  # straight into its rows, no temporary
            if dW is not None:
                dW.addmm_(z.t(), hc)
            if db is not None:
                db += z.sum(0, dtype=db.dtype)
    return per_row, (dh, dW, db.to(b.dtype) if db is not None else None)


# --- The divergences of FusedLinearDistillation beyond KL (fastkd/reference/divergences.py
# has their math, and the top-k teacher's two conventions) --------------------------------

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


class Divergence(NamedTuple):
    """A divergence D(p, q) of the teacher's p and the student's q, its parameters, and
    topk_rest, how a top-k teacher's mass outside its k classes is treated. Made by
    divergence(): jsd at beta 0 or 1 is kl or reverse_kl, skew_kl at alpha 0 is kl,
    skew_reverse_kl at alpha 0 is reverse_kl."""
    name: str
    beta: float
    alpha: float
    topk_rest: str


def divergence(name, beta=0.5, alpha=0.1, topk_rest="renormalise"):
    """The Divergence of these (checked) arguments, with its endpoints named as such."""
    if name == "jsd" and beta in (0, 1):
        name = "kl" if beta == 0 else "reverse_kl"
    elif name in ("skew_kl", "skew_reverse_kl") and alpha == 0:
        name = name.removeprefix("skew_")
    return Divergence(name, float(beta), float(alpha), topk_rest)


def divergence_terms(log_p, log_q, spec, grad):
    """(D (R,), dD/dx (R, C) or None) over the last dim of log-probabilities log_p (teacher)
    and log_q (student), x the student's logits at T (log_q = log_softmax(x)), in their
    dtype. Per element, term t_c (D = sum_c t_c, each term >= 0 except tvd's |p - q| / 2)
    and g_c = dD/dq_c less a constant; then dD/dx_c = q_c g_c - q_c S, S = sum_j q_j g_j:

        kl               t = p (log p - log q)            g = -p / q
        reverse_kl       t = q (log q - log p)            g = log q - log p
        jsd              t = beta p (log p - log m) + (1 - beta) q (log q - log m),
                         m = beta p + (1 - beta) q        g = (1 - beta) (log q - log m)
        skew_kl          t = p (log p - log m), m = alpha p + (1 - alpha) q
                                                          g = -(1 - alpha) p / m
        skew_reverse_kl  t = q (log q - log m), m = (1 - alpha) p + alpha q
                                                          g = log q - log m - alpha q / m
        tvd              t = |p - q| / 2                  g = sign(q - p) / 2

    q_c g_c is formed without g where g is singular (kl's is -p, exact where q underflows);
    a term whose weight (p or q) is 0 adds 0; D is clamped at 0 (the exact D is >= 0)."""
    name = spec.name
    p, q = log_p.exp(), log_q.exp()

    def weighted(w, log_w, log_m):  # w (log w - log m), 0 where w = 0
        return torch.where(w > 0, w * (log_w - log_m), 0.0)

    def mix(log_a, log_b, w):  # log(w a + (1 - w) b)
        if w == 1:
            return log_a
        return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))
    qg = None
    if name == "kl":
        terms = weighted(p, log_p, log_q)
        if grad:
            qg = -p
    elif name == "reverse_kl":
        terms = weighted(q, log_q, log_p)
        if grad:
            qg = terms
    elif name == "jsd":
        log_m = mix(log_p, log_q, spec.beta)
        q_part = weighted(q, log_q, log_m)
        terms = spec.beta * weighted(p, log_p, log_m) + (1 - spec.beta) * q_part
        if grad:
            qg = (1 - spec.beta) * q_part
    elif name == "skew_kl":
        log_m = mix(log_p, log_q, spec.alpha)
        terms = weighted(p, log_p, log_m)
        if grad:
            qg = -(1 - spec.alpha) * torch.where(p > 0, (log_q + log_p - log_m).exp(), 0.0)
    elif name == "skew_reverse_kl":
        log_m = mix(log_q, log_p, spec.alpha)
        terms = weighted(q, log_q, log_m)
        if grad:
            qg = terms - spec.alpha * torch.where(q > 0, (2 * log_q - log_m).exp(), 0.0)
    else:  # tvd
        terms = 0.5 * (p - q).abs()
        if grad:
            qg = 0.5 * q * torch.sign(q - p)
    d = terms.sum(-1).clamp(min=0)
    if not grad:
        return d, None
    return d, qg.sub_(q * qg.sum(-1, keepdim=True))


class DivergenceRows:
    """A backend's rows for a Divergence (FusedLinearSoftTarget's KL passes the backend's
    linear_kl_rows itself): called as linear_kl_rows, on a dense teacher, it runs
    ``dense(..., spec)`` (stats [shift_s, log z_s, D_row, CE_row], dz over z with w_kl T
    dD/dx in place of the KL's); ``plain`` is the backend's linear_kl_rows, which the chunk
    loop runs without a teacher for a top-k one (_topk_divergence)."""

    def __init__(self, spec, dense, plain):
        self.spec, self.dense, self.plain = spec, dense, plain

    def __call__(self, z, t, labels, w_kl, w_ce, T, hard_weight, grad):
        return self.dense(z, t, labels, w_kl, w_ce, T, hard_weight, grad, self.spec)


def topk_log_probs(logp, log_q_k, log_q_rest, spec, T, empty_rest):
    """(log p, log q) (R, k + 1) on a top-k teacher's k classes and the bucket of the rest
    (fastkd/reference/divergences.py): log_q_k (R, k) and log_q_rest (R,) the student's
    log-probabilities at T at the k classes and of the rest; logp (R, k) the teacher's at
    temperature 1; empty_rest: k = V."""
    log_q = torch.cat([log_q_k, log_q_rest[:, None]], dim=1)
    if spec.topk_rest == "renormalise":
        log_p = torch.log_softmax(logp / T, dim=1)
        return torch.cat([log_p, torch.full_like(log_p[:, :1], float("-inf"))], dim=1), log_q
    mass_p = logp.exp().sum(1, keepdim=True)
    log_r = torch.where(mass_p < 1, torch.log1p(-mass_p.clamp(max=1)), float("-inf"))
    if empty_rest:  # k = V: no class outside, r is rounding only
        log_r = torch.full_like(log_r, float("-inf"))
    return torch.log_softmax(torch.cat([logp, log_r], dim=1) / T, dim=1), log_q


def _topk_divergence(z, idx, logp, labels, w_k, w_c, T, hard_weight, grad, rows):
    """(D_row, CE_row) of a chunk of student logits z (R, V) against a top-k teacher (idx,
    logp (R, k)), the divergence over the k + 1 outcomes (dD/dx_o over them); with grad, dz
    over z: at the k classes w_k T dD/dx_j, at each other class c its share of the bucket's,
    w_k T (q_c / q_rest) dD/dx_rest (a softmax over the rest: exact however small q_rest
    is), plus the hard term's gradient, which the backend's rows kernel writes (run without
    a teacher, once for the student's statistics, once more for that gradient)."""
    acc = w_k.dtype
    z_idx = z.gather(1, idx).to(acc)  # before rows() writes dz over z
    # The student's rest exactly, a logsumexp over the other classes (1 - its top-k mass
    # would lose every digit when the top-k hold almost all of it; a KL against the teacher's
    # bucket would be infinite): one more chunk-sized buffer, which becomes the gradient.
    rest = z.scatter(1, idx, float("-inf")).to(acc).div_(T)  # a new tensor, whatever the dtypes
    log_rest = torch.logsumexp(rest, dim=1)
    shift_s, log_z_s, _, ce = rows.plain(z, None, labels, w_k, w_c, T, hard_weight, False)
    log_q_k = (z_idx / T - shift_s[:, None]) - log_z_s[:, None]
    log_q_rest = (log_rest - shift_s) - log_z_s
    log_p, log_q = topk_log_probs(logp.to(acc), log_q_k, log_q_rest, rows.spec, T, idx.shape[1] == z.shape[1])
    d, dx = divergence_terms(log_p, log_q, rows.spec, grad)
    if not grad:
        return d, ce
    w = w_k * T
    # exp(x_c - log_rest) = q_c / q_rest: 0 at the k classes (-inf there), and where every
    # class is in the top-k (log_rest = -inf).
    share = rest.sub_(torch.where(log_rest == float("-inf"), 0.0, log_rest)[:, None]).exp_()
    dz = share.mul_((w * dx[:, -1])[:, None]).scatter_(1, idx, w[:, None] * dx[:, :-1])
    dz.masked_fill_((w_k == 0)[:, None], 0.0)  # ignored rows: 0, whatever their logits
    if labels is not None:
        rows.plain(z, None, labels, torch.zeros_like(w_k), w_c, T, hard_weight, True)  # the hard term's dz
        z.add_(dz.to(z.dtype))
    else:
        z.copy_(dz)
    return d, ce


def prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
            teacher_bias, teacher_logits, teacher_topk_indices, teacher_topk_logprobs, ignore_index, hard_weight):
    """What the chunk loop takes, from the reference's arguments: (h (N, H), teacher, row
    labels (N,) int64 or None, kept (N,) bool or None, the loss's dtype, the leading dims)."""
    lead = student_hidden.shape[:-1]
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    n, v = h.shape[0], student_weight.shape[0]
    if teacher_topk_indices is not None:
        k = teacher_topk_indices.shape[-1]
        teacher = ("topk", teacher_topk_indices.reshape(n, k).long(), teacher_topk_logprobs.reshape(n, k).detach())
        teacher_dtype = teacher_topk_logprobs.dtype
    elif teacher_logits is not None:
        t = teacher_logits.detach().reshape(n, v)
        teacher = ("logits", t if t.stride(1) == 1 else t.contiguous())
        teacher_dtype = t.dtype
    else:
        b_t = teacher_bias.detach() if teacher_bias is not None else None
        teacher = ("dense", teacher_hidden.detach().reshape(n, -1), teacher_weight.detach(), b_t)
        teacher_dtype = result_dtype(*(x for x in teacher[1:] if x is not None))
    kept = labels.reshape(n) != ignore_index if labels is not None else None
    # Rows whose label is ignored get label -1, which no class matches (ignore_index may be one).
    row_labels = torch.where(kept, labels.reshape(n).long(), -1) if hard_weight else None
    student = [x for x in (h, student_weight, student_bias) if x is not None]
    out_dtype = torch.promote_types(result_dtype(*student), teacher_dtype)
    return h, teacher, row_labels, kept, out_dtype, lead


def on_logits(rows, student_logits, teacher_logits, labels, T, need):
    """(sum over the kept tokens (label != -100; all without labels) of T^2 D(p, q) of ``rows``'
    divergence at T, a scalar of the logits' promoted dtype; its gradient in the student's
    logits (..., V) where need asks, else None): the chunk loop with the student's logits in
    place of its head, from both models' logits (..., V)."""
    v = student_logits.shape[-1]
    z = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    kept = labels.reshape(-1) != -100 if labels is not None else None
    per_row, (dz, _, _) = losses_and_gradients(
        z, None, None, rows, ("logits", t if t.stride(1) == 1 else t.contiguous()), None, kept, float(T), 0.0, "sum",
        default_chunk(z.shape[0], v, z.device), (need, False, False))
    total = per_row.sum().to(torch.promote_types(z.dtype, t.dtype))
    return total, dz.reshape(student_logits.shape) if need else None


@eager
def run_on_logits(rows, student_logits, teacher_logits, labels, T):
    """sum over the kept tokens (label != -100; all without labels) of D(p, q) of ``rows``'
    divergence at T, without the T^2 factor, from both models' logits (..., V): the chunk
    loop with the student's logits in place of its head (their gradient is dh), a scalar of
    the logits' promoted dtype."""
    v = student_logits.shape[-1]
    z = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    kept = labels.reshape(-1) != -100 if labels is not None else None
    out_dtype = torch.promote_types(z.dtype, t.dtype)
    total = ChunkedLinearSoftTarget.apply(
        z, None, None, rows, ("logits", t if t.stride(1) == 1 else t.contiguous()), None, kept, float(T), 0.0,
        "sum", default_chunk(z.shape[0], v, z.device), out_dtype, torch.is_grad_enabled())
    return total / (float(T) * float(T))


# A Python loop of launches: a graph break under torch.compile, where the auto backend calls
# fastkd.device_ops' operator instead (a named backend comes here).
@eager
def run(function, rows, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, teacher_logits, teacher_topk_indices, teacher_topk_logprobs, T, reduction,
        ignore_index, hard_weight, chunk_size):
    """The loss with the reference's arguments (fastkd/reference/fused_linear_soft_target.py),
    checked by fastkd.functional, over the backend's ``rows``; ``function`` is
    ChunkedLinearSoftTarget or the backend's subclass of it. (Compiled, the auto backend
    calls fastkd.device_ops' operator instead, which runs the same loop.)"""
    h, teacher, row_labels, kept, out_dtype, lead = prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        teacher_logits, teacher_topk_indices, teacher_topk_logprobs, ignore_index, hard_weight)
    n, v = h.shape[0], student_weight.shape[0]
    loss = function.apply(h, student_weight, student_bias, rows, teacher, row_labels, kept, float(T),
                          float(hard_weight), reduction, chunk_size or default_chunk(n, v, h.device), out_dtype,
                          torch.is_grad_enabled())
    return loss.reshape(lead) if reduction == "none" else loss
