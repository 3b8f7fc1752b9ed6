"""FusedLinearSoftTarget with torch ops: the chunk loop of fastkd/chunked_linear.py over
``linear_kl_rows`` below, which does in float32 torch ops what the Triton kernel of
fastkd/kernels/fused_linear.py does (its docstring has the math)."""
import torch

from .. import chunked_linear


def linear_kl_rows(z, t, labels, w_kl, w_ce, T, hard_weight, grad):
    """stats (3, R) [lse_s, KL_row, CE_row] of logits z (R, V), in w_kl's dtype (the
    accumulation dtype); with grad, dz over z."""
    acc = w_kl.dtype
    x = z.to(acc) / T
    lse_s = torch.logsumexp(x, dim=1)
    log_q = x - lse_s[:, None]
    kl = torch.zeros_like(lse_s)
    if t is not None:
        log_p = torch.log_softmax(t.to(acc) / T, dim=1)
        p = log_p.exp()
        # kl_div's element rule: p = 0 adds 0; the exact KL_row is >= 0.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(1).clamp(min=0)
    ce = torch.zeros_like(lse_s)
    if labels is not None:
        label_ok = (labels >= 0) & (labels < z.shape[1])
        safe = torch.where(label_ok, labels, 0)
        log_p1 = torch.log_softmax(z.to(acc), dim=1)
        ce = torch.where(label_ok, -log_p1.gather(1, safe[:, None])[:, 0], 0.0)
    if grad:
        dz = log_q.exp()
        if t is not None:
            dz -= p
        dz *= (w_kl * T)[:, None]
        if labels is not None:
            p1 = log_p1.exp()
            p1[torch.arange(z.shape[0], device=z.device), safe] -= label_ok.to(acc)
            dz += (w_ce * hard_weight)[:, None] * p1
        live = (w_kl != 0) | (w_ce != 0)
        z.copy_(torch.where(live[:, None], dz, 0.0))
    return torch.stack([lse_s, kl, ce])


def fused_linear_soft_target(*args):
    """The loss with the reference's arguments (checked by fastkd.functional)."""
    return chunked_linear.run(linear_kl_rows, *args)
