"""FusedLinearSoftTarget with torch ops: the chunk loop of fastkd/chunked_linear.py over
``linear_kl_rows`` below, which does with torch ops, in the accumulation dtype, what the
Triton kernel of fastkd/kernels/fused_linear.py does (its docstring has the math)."""
import torch

from .. import chunked_linear


def linear_kl_rows(z, t, labels, w_kl, w_ce, T, hard_weight, grad, spec=None):
    """stats (4, R) [shift_s, log z_s, KL_row, CE_row] of logits z (R, V), in w_kl's dtype
    (the accumulation dtype); with grad, dz over z. In-place steps keep about four
    chunk-sized buffers alive at once. spec: a chunked_linear.Divergence for a dense
    teacher, whose D_row takes KL_row's place (and w_kl T dD/dx the KL's gradient; about
    eight chunk-sized buffers), or None for the KL."""
    acc = w_kl.dtype
    log_q = z.to(acc, copy=True).div_(T)
    shift_s = log_q.amax(dim=1)
    # As log_softmax: the max off first (exactly), then log z, so a large max costs no digits.
    log_q.sub_(shift_s[:, None])
    log_z_s = torch.logsumexp(log_q, dim=1)
    log_q.sub_(log_z_s[:, None])
    kl = torch.zeros_like(log_z_s)
    if t is not None and spec is not None:
        log_p = torch.log_softmax(t.to(acc, copy=True).div_(T), dim=1)
        kl, dx = chunked_linear.divergence_terms(log_p, log_q, spec, grad)
        del log_p
    elif t is not None:
        p = torch.log_softmax(t.to(acc, copy=True).div_(T), dim=1)  # log p, then p below
        diff = (p - log_q).mul_(p.exp_())
        # kl_div's element rule: p = 0 adds 0 (p log p -> 0); the exact KL_row is >= 0.
        kl = diff.masked_fill_(p == 0, 0.0).sum(1).clamp(min=0)
        del diff
    ce = torch.zeros_like(log_z_s)
    if labels is not None:
        label_ok = (labels >= 0) & (labels < z.shape[1])
        safe = torch.where(label_ok, labels, 0)
        p1 = torch.log_softmax(z.to(acc), dim=1)
        ce = torch.where(label_ok, -p1.gather(1, safe[:, None])[:, 0], 0.0)
    if grad:
        if t is not None and spec is not None:
            dz = dx
        else:
            dz = log_q.exp_()
            if t is not None:
                dz.sub_(p)
        dz.mul_((w_kl * T)[:, None])
        if labels is not None:
            p1.exp_()
            p1[torch.arange(z.shape[0], device=z.device), safe] -= label_ok.to(acc)
            dz.add_(p1.mul_((w_ce * hard_weight)[:, None]))
        live = (w_kl != 0) | (w_ce != 0)
        z.copy_(dz.masked_fill_(~live[:, None], 0.0))
    return torch.stack([shift_s, log_z_s, kl, ce])


def fused_linear_soft_target(*args):
    """The loss with the reference's arguments (checked by fastkd.functional)."""
    return chunked_linear.run(chunked_linear.ChunkedLinearSoftTarget, linear_kl_rows, *args)


def fused_linear_distillation(spec, *args):
    """FusedLinearDistillation for spec (a chunked_linear.Divergence) with
    FusedLinearSoftTarget's reference arguments (checked by fastkd.functional)."""
    rows = chunked_linear.DivergenceRows(spec, linear_kl_rows, linear_kl_rows)
    return chunked_linear.run(chunked_linear.ChunkedLinearSoftTarget, rows, *args)
