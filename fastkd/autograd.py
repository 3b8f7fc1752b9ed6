"""torch.autograd.Function wrappers of the Triton kernels in fastkd.kernels.

One Function per fused op: forward launches the kernels and saves inputs and
small statistics; backward launches the hand-derived gradient kernels. The
dispatcher (fastkd.backend) lists each op's Function as its ``triton`` entry;
an op with no entry there has no kernel yet.
"""


# --- softmax-KL over logits: SoftTarget, DML, BSS ---------------------------------

import torch  # noqa: E402

from .kernels import softmax_kl as _softmax_kl  # noqa: E402


class SoftmaxKLFunction(torch.autograd.Function):
    """scale / B * sum over rows of KL(softmax(t / T) || softmax(s / T)); classes on dim 1.

    Forward is one streaming pass that keeps five numbers per row (the two softmaxes'
    shifts and log-normalisers, and KL_row); backward recomputes the softmaxes from them. Writing the
    gradient during forward instead would cost a second pass over the logits in forward
    anyway (it needs the final log-sum-exps), a (rows x classes) buffer held until
    backward, and a third pass to scale it by grad_output; recomputing reads the logits
    once in each direction and does no gradient work when forward runs without grad.
    """

    @staticmethod
    def forward(ctx, out_s, out_t, T, scale):
        acc = _softmax_kl.accumulation_dtype(out_s, out_t)
        T_t = torch.full((1,), T, dtype=acc, device=out_s.device)
        stats = _softmax_kl.softmax_kl_forward(out_s, out_t, T_t)
        ctx.save_for_backward(out_s, out_t, stats, T_t)
        ctx.coef = scale / (out_s.shape[0] * T)
        loss = stats[4].sum() * (scale / out_s.shape[0])
        return loss.to(torch.result_type(out_s, out_t))

    @staticmethod
    def backward(ctx, grad_output):
        out_s, out_t, stats, T_t = ctx.saved_tensors
        student, teacher = ctx.needs_input_grad[:2]
        g = grad_output.reshape(1).to(stats.dtype) * ctx.coef
        grad_s, grad_t = _softmax_kl.softmax_kl_backward(out_s, out_t, T_t, stats, g, student, teacher)
        return grad_s, grad_t, None, None


def soft_target(out_s, out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)) * T^2."""
    return SoftmaxKLFunction.apply(out_s, out_t, T, T * T)


def dml(out1, out2):
    """KLbm(softmax(out2) || softmax(out1))."""
    return SoftmaxKLFunction.apply(out1, out2, 1.0, 1.0)


def bss(attacked_out_s, attacked_out_t, T):
    """KLbm(softmax(out_t / T) || softmax(out_s / T)), no T^2 factor."""
    return SoftmaxKLFunction.apply(attacked_out_s, attacked_out_t, T, 1.0)


# --- contrast: CRD ---------------------------------------------------------------------

from .kernels import contrast as _contrast  # noqa: E402


class CRDContrastFunction(torch.autograd.Function):
    """contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z); memory is a constant.

    The gradient direction d loss / d embed (B, feat_dim) is computed in forward, by the
    same kernel pass that computes the loss, and backward only scales it by grad_output.
    Recomputing it in backward would need the memory rows as they were in forward, but
    CRD updates its memory in place right after the loss (before backward); saving the
    gathered rows instead would be the (B, nce_n + 1, feat_dim) tensor this avoids.
    """

    @staticmethod
    def forward(ctx, embed, memory, sample_idx, nce_t, z, n_data, eps):
        acc = _contrast.accumulation_dtype(embed, memory)
        noise = (sample_idx.shape[1] - 1) / n_data
        # Filled on the device (a copy from host memory would wait for the stream).
        params = torch.empty(5, dtype=acc, device=embed.device)
        for i, value in enumerate((nce_t, z, noise, eps, 1.0 / embed.shape[0])):
            params[i] = value
        loss, direction = _contrast.crd_contrast_forward(embed, memory, sample_idx, params,
                                                         grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(direction)
        ctx.embed_dtype = embed.dtype
        return loss.to(embed.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        direction, = ctx.saved_tensors
        grad_embed = None
        if ctx.needs_input_grad[0]:
            grad_embed = (direction * grad_output.to(direction.dtype)).to(ctx.embed_dtype)
        return grad_embed, None, None, None, None, None, None


def crd_contrast(embed, memory, sample_idx, nce_t, z, n_data, eps=1e-7):
    """One side of CRD: contrast_loss(exp(memory[sample_idx] . embed / nce_t) / z)."""
    return CRDContrastFunction.apply(embed, memory, sample_idx, nce_t, z, n_data, eps)
