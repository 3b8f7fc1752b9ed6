"""Softmax-KL over logits (SoftTarget, DML, BSS) with torch ops, in chunks of samples.

    x_s = s / T, x_t = t / T (classes on dim 1), p = softmax(x_t), log q = log_softmax(x_s)
    loss = scale / B * sum of KL_row,  KL_row = sum_k p_k (log p_k - log q_k)
    d loss / d s = scale / (B T) * (q - p),  d loss / d t = scale / (B T) * p (log p - log q - KL_row)

The reference holds about six (B, K, ...) copies at once (scaled logits, log_softmax,
softmax, kl_div's terms and their autograd buffers). Here each chunk of samples is
processed while it sits in cache and only KL_row is kept; backward recomputes the two
softmaxes chunk by chunk and writes the gradients straight into their outputs.

KL_row is clamped at 0 (see _clamp_rows): never negative, and never further from the exact
value than the unclamped sum; the gradients are those of the unclamped formula.
"""
import torch
import torch.nn.functional as F

from ..common import accumulation_dtype, first_order, result_dtype

# Elements per chunk: large enough to keep both threads of an op busy, small enough to
# stay in cache.
CHUNK_ELEMENTS = 1 << 17


def _chunks(x):
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    for b0 in range(0, x.shape[0], step):
        yield slice(b0, b0 + step)


def _scaled(x, T, acc):
    """x / T in acc, always a new tensor (so it may be modified in place)."""
    return torch.div(x.to(acc), T) if T != 1 else x.to(acc, copy=True)


class SoftmaxKL(torch.autograd.Function):
    """scale / B * sum of KL(softmax(t / T) || softmax(s / T)) over rows; classes on dim 1.

    Forward keeps per row the two softmaxes' maxima and log-normalisers and KL_row;
    backward needs one exp per element and input, as the reference's autograd does.
    """

    @staticmethod
    def forward(ctx, out_s, out_t, T, scale):
        acc = accumulation_dtype(out_s, out_t)
        stats = torch.empty((5, out_s.shape[0], 1) + out_s.shape[2:], dtype=acc, device=out_s.device)
        max_s, log_z_s, max_t, log_z_t, kl = stats
        for c in _chunks(out_s):
            xs, xt = _scaled(out_s[c], T, acc), _scaled(out_t[c], T, acc)
            m_s, m_t = xs.amax(dim=1, keepdim=True), xt.amax(dim=1, keepdim=True)
            v = xs.sub_(m_s)
            u = xt.sub_(m_t)
            z_s = v.exp().sum(dim=1, keepdim=True)
            p = u.exp()
            z_t = p.sum(dim=1, keepdim=True)
            p.div_(z_t)
            max_s[c], max_t[c] = m_s, m_t
            torch.log(z_s, out=log_z_s[c])
            torch.log(z_t, out=log_z_t[c])
            # KL_row = sum p (u - v) + log(z_s / z_t): differences of numbers near the row
            # maxima, and one rounded log instead of two. torch's kl_div term is
            # xlogy(p, p) - p log q: a class with p = 0 adds 0, or NaN where log q = -inf
            # too; clamping u = -inf to the lowest finite value gives exactly that.
            d = u.clamp_min_(torch.finfo(acc).min).sub_(v)
            torch.sum(p.mul_(d), dim=1, keepdim=True, out=kl[c])
            kl[c] += z_s.div_(z_t).log_()
            kl[c] = _clamp_rows(kl[c])
        ctx.save_for_backward(out_s, out_t, stats)
        ctx.T, ctx.coef = T, scale / (out_s.shape[0] * T)
        return (kl.sum() * (scale / out_s.shape[0])).to(result_dtype(out_s, out_t))

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        out_s, out_t, stats = ctx.saved_tensors
        student, teacher = ctx.needs_input_grad[:2]
        g = grad_output.to(stats.dtype) * ctx.coef
        grad_s = torch.empty_like(out_s, memory_format=torch.contiguous_format) if student else None
        grad_t = torch.empty_like(out_t, memory_format=torch.contiguous_format) if teacher else None
        max_s, log_z_s, max_t, log_z_t, kl = stats
        for c in _chunks(out_s):
            # log q = (s / T - max_s) - log z_s with forward's roundings (as log_softmax's).
            log_q = _scaled(out_s[c], ctx.T, kl.dtype).sub_(max_s[c]).sub_(log_z_s[c])
            log_p = _scaled(out_t[c], ctx.T, kl.dtype).sub_(max_t[c]).sub_(log_z_t[c])
            p = log_p.exp()
            if student:
                torch.mul(log_q.exp().sub_(p), g, out=grad_s[c])
            if teacher:
                # A class with p = 0 contributes 0 (the limit of p log p); kl * 0 keeps a row
                # whose KL is inf or NaN non-finite, as the reference's is.
                k = kl[c]
                term = p * log_p.sub_(log_q).sub_(k)
                torch.mul(torch.where(p > 0, term, k * 0), g, out=grad_t[c])
        return grad_s, grad_t, None, None


def _clamp_rows(kl):
    """max(KL_row, 0), NaN kept: an exact KL_row is >= 0, so this never moves a rounded value
    away from it; a sum of p (log p - log q) rounds below 0 when q ~ p."""
    return kl.clamp_min(0)  # clamp keeps NaN


class SmallSoftmaxKL(torch.autograd.Function):
    """scale / B * sum of max(KL_row, 0) for inputs that fit in one chunk and a fixed teacher:
    a few torch calls (the two log_softmax, KL_row as SoftmaxKL forms it) without an autograd
    graph, and the gradient of the unclamped KL written at once, scale / (B T) (q - p)."""

    @staticmethod
    def forward(ctx, out_s, out_t, T, scale):
        if T != 1:
            out_s, out_t = out_s / T, out_t / T
        # Tensor methods rather than F.log_softmax: at the sizes this runs, the call's host
        # time is most of its time.
        log_q, log_p = out_s.log_softmax(1), out_t.log_softmax(1)
        p = log_p.exp()
        # KL_row = sum p (log p - log q), as SoftmaxKL forms it: no xlogy (the slowest of the
        # reference's operations), and exactly 0 for equal logits. log p = -inf (a class of
        # probability 0) is clamped to the lowest finite value, so that it adds 0, as xlogy's.
        d = log_p.clamp_min_(_LOWEST[log_p.dtype]).sub_(log_q)
        ctx.save_for_backward(log_q, p)
        ctx.coef = scale / (out_s.shape[0] * T)
        return _clamp_rows(d.mul_(p).sum(1)).sum() * (scale / out_s.shape[0])

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        log_q, p = ctx.saved_tensors
        return (log_q.exp().sub_(p).mul_(grad_output * ctx.coef), None, None, None)


_LOWEST = {dtype: torch.finfo(dtype).min for dtype in (torch.float32, torch.float64)}


def _softmax_kl(out_s, out_t, T, scale):
    # An input that fits in one chunk gains nothing from chunking, and its temporaries are
    # small: there the reference's few torch calls (SmallSoftmaxKL) cost less than
    # SoftmaxKL's statistics and loops. Not for a teacher that trains (the reference's
    # teacher gradient is NaN where a teacher probability underflows to 0), nor for
    # bf16/fp16 (the reference does not compute in fp32).
    if (out_s.numel() <= CHUNK_ELEMENTS and not out_t.requires_grad
            and out_s.dtype == out_t.dtype and out_s.dtype in (torch.float32, torch.float64)):
        return SmallSoftmaxKL.apply(out_s, out_t, T, scale)
    return SoftmaxKL.apply(out_s, out_t, T, scale)


def soft_target(out_s, out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2."""
    return _softmax_kl(out_s, out_t, T, T * T)


def dml(out1, out2):
    """KLbm(softmax(out2) || softmax(out1))."""
    return _softmax_kl(out1, out2, 1.0, 1.0)


def bss(attacked_out_s, attacked_out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor."""
    return _softmax_kl(attacked_out_s, attacked_out_t, T, 1.0)
