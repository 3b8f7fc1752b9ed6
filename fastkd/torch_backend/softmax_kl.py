"""Softmax-KL over logits (SoftTarget, DML, BSS) with torch ops, in chunks of samples.

    x_s = s / T, x_t = t / T (classes on dim 1), p = softmax(x_t), log q = log_softmax(x_s)
    loss = scale / B * sum of KL_row,  KL_row = sum_k p_k (log p_k - log q_k)
    d loss / d s = scale / (B T) * (q - p),  d loss / d t = scale / (B T) * p (log p - log q - KL_row)

The reference holds about six (B, K, ...) copies at once (scaled logits, log_softmax,
softmax, kl_div's terms and their autograd buffers). Here each chunk of samples is
processed while it sits in cache and only KL_row is kept; backward recomputes the two
softmaxes chunk by chunk and writes the gradients straight into their outputs.
"""
import torch

# Elements per chunk: large enough to keep both threads of an op busy, small enough to
# stay in cache.
CHUNK_ELEMENTS = 1 << 17


def _chunks(x):
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    for b0 in range(0, x.shape[0], step):
        yield slice(b0, b0 + step)


def _log_softmax(x, T, acc):
    """(log_softmax(x / T, dim=1), softmax's sum of exps) with one exp per element."""
    x = x.to(acc)
    y = x / T if T != 1 else x.clone()
    e = y.sub_(y.amax(dim=1, keepdim=True)).exp()
    z = e.sum(dim=1, keepdim=True)
    return y, e, z


class SoftmaxKL(torch.autograd.Function):
    """scale / B * sum of KL(softmax(t / T) || softmax(s / T)) over rows; classes on dim 1.

    Forward keeps per row the two log-sum-exps and KL_row; backward needs one exp per
    element and input, as the reference's autograd does.
    """

    @staticmethod
    def forward(ctx, out_s, out_t, T, scale):
        acc = torch.float64 if torch.float64 in (out_s.dtype, out_t.dtype) else torch.float32
        stats = torch.empty((3, out_s.shape[0], 1) + out_s.shape[2:], dtype=acc, device=out_s.device)
        lse_s, lse_t, kl = stats
        for c in _chunks(out_s):
            xs, xt = out_s[c].to(acc), out_t[c].to(acc)
            if T != 1:
                xs, xt = xs / T, xt / T
            m_s, m_t = xs.amax(dim=1, keepdim=True), xt.amax(dim=1, keepdim=True)
            log_q = torch.sub(xs, m_s)
            log_z_s = log_q.exp().sum(dim=1, keepdim=True).log_()
            log_q.sub_(log_z_s)
            log_p = torch.sub(xt, m_t)
            p = log_p.exp()
            z_t = p.sum(dim=1, keepdim=True)
            p.div_(z_t)
            log_z_t = z_t.log_()
            log_p.sub_(log_z_t)
            torch.add(m_s, log_z_s, out=lse_s[c])
            torch.add(m_t, log_z_t, out=lse_t[c])
            # torch's kl_div term is xlogy(p, p) - p log q: a class with p = 0 adds 0, or NaN
            # where log q = -inf too. Clamping log p = -inf to the lowest finite value gives
            # exactly that with one product.
            d = log_p.clamp_min_(torch.finfo(acc).min).sub_(log_q)
            torch.sum(p.mul_(d), dim=1, keepdim=True, out=kl[c])
        ctx.save_for_backward(out_s, out_t, stats)
        ctx.T, ctx.coef = T, scale / (out_s.shape[0] * T)
        return (kl.sum() * (scale / out_s.shape[0])).to(torch.result_type(out_s, out_t))

    @staticmethod
    def backward(ctx, grad_output):
        out_s, out_t, stats = ctx.saved_tensors
        student, teacher = ctx.needs_input_grad[:2]
        g = grad_output.to(stats.dtype) * ctx.coef
        grad_s = torch.empty_like(out_s, memory_format=torch.contiguous_format) if student else None
        grad_t = torch.empty_like(out_t, memory_format=torch.contiguous_format) if teacher else None
        neg_lse_s, neg_lse_t, kl = stats.neg()
        for c in _chunks(out_s):
            # log q = s / T - lse_s, log p = t / T - lse_t, each in one pass.
            log_q = torch.add(neg_lse_s[c], out_s[c], alpha=1 / ctx.T)
            log_p = torch.add(neg_lse_t[c], out_t[c], alpha=1 / ctx.T)
            p = log_p.exp()
            if student:
                torch.mul(log_q.exp().sub_(p), g, out=grad_s[c])
            if teacher:
                # A class with p = 0 contributes 0 (the limit of p log p); kl * 0 keeps a row
                # whose KL is inf or NaN non-finite, as the reference's is (kl holds -KL_row).
                k = kl[c]
                term = p * log_p.sub_(log_q).add_(k)
                torch.mul(torch.where(p > 0, term, k * 0), g, out=grad_t[c])
        return grad_s, grad_t, None, None


def soft_target(out_s, out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2."""
    return SoftmaxKL.apply(out_s, out_t, T, T * T)


def dml(out1, out2):
    """KLbm(softmax(out2) || softmax(out1))."""
    return SoftmaxKL.apply(out1, out2, 1.0, 1.0)


def bss(attacked_out_s, attacked_out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor."""
    return SoftmaxKL.apply(attacked_out_s, attacked_out_t, T, 1.0)
