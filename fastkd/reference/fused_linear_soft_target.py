"""FusedLinearSoftTarget's oracle: SoftTarget on materialised LM-head logits, with the
ignore_index, top-k teacher and hard-label terms of fastkd.FusedLinearSoftTarget.

    z_s = h_s W_s^T (+ b_s)                         student logits (N, V)
    p_t = softmax(z_t / T), z_t = h_t W_t^T (+ b_t) or given (N, V)     dense teacher
    p_t = softmax(logp_k / T) on the k given classes, 0 elsewhere       top-k teacher
    loss_i = T^2 sum_c p_t(c) (log p_t(c) - log_softmax(z_s / T)(c))
             + hard_weight * cross_entropy(z_s_i, label_i)            kept tokens i
    batchmean: sum over kept / n_kept; sum; mean: KL part / (n_kept V) + hard part / n_kept;
    none: loss_i per token (0 where ignored).   n_kept is clamped at 1 (no NaN when every
    token is ignored).

Every (N, V) tensor is materialised, so it is only for checking and small problems.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def fused_linear_soft_target(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                             labels=None, student_bias=None, teacher_bias=None, teacher_logits=None,
                             teacher_topk_indices=None, teacher_topk_logprobs=None, T=1.0,
                             reduction="batchmean", ignore_index=-100, hard_weight=0.0, chunk_size=None):
    """student_hidden (..., H), student_weight (V, H); the teacher as documented above, with
    the same leading (...) dims; labels (...) int or None. Returns a scalar, or (...) for
    reduction="none". chunk_size is the fast paths' (this materialises everything)."""
    lead = student_hidden.shape[:-1]
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    z_s = F.linear(h, student_weight, student_bias)
    n, v = z_s.shape
    log_q = F.log_softmax(z_s / T, dim=1)
    if teacher_topk_indices is not None:
        k = teacher_topk_indices.shape[-1]
        q = F.softmax(teacher_topk_logprobs.reshape(n, k) / T, dim=1)
        p_t = q.new_zeros(n, v).scatter_add(1, teacher_topk_indices.reshape(n, k), q)
    else:
        if teacher_logits is not None:
            z_t = teacher_logits.reshape(n, v)
        else:
            z_t = F.linear(teacher_hidden.reshape(n, -1), teacher_weight, teacher_bias)
        p_t = F.softmax(z_t / T, dim=1)
    kl = F.kl_div(log_q, p_t, reduction="none").sum(1) * (T * T)
    if labels is None:
        kept = torch.ones(n, dtype=torch.bool, device=z_s.device)
    else:
        kept = labels.reshape(n) != ignore_index
    per_token = torch.where(kept, kl, 0.0)
    if hard_weight:
        ce = F.cross_entropy(z_s, labels.reshape(n), ignore_index=ignore_index, reduction="none")
        per_token = per_token + hard_weight * torch.where(kept, ce, 0.0)
    n_kept = kept.sum().clamp(min=1)
    if reduction == "none":
        return per_token.reshape(lead)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "batchmean":
        return per_token.sum() / n_kept
    kl_part = torch.where(kept, kl, 0.0).sum() / (n_kept * v)
    if not hard_weight:
        return kl_part
    return kl_part + hard_weight * torch.where(kept, ce, 0.0).sum() / n_kept


class FusedLinearSoftTarget(nn.Module):
    """The module form of fused_linear_soft_target (arguments as fastkd.FusedLinearSoftTarget)."""

    def __init__(self, T=1.0, *, reduction="batchmean", ignore_index=-100, hard_weight=0.0, chunk_size=None):
        super().__init__()
        self.T = T
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.hard_weight = hard_weight
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                *, student_bias=None, teacher_bias=None, teacher_logits=None, teacher_topk_indices=None,
                teacher_topk_logprobs=None):
        return self.loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                         teacher_bias, teacher_logits, teacher_topk_indices, teacher_topk_logprobs)

    def loss(self, *inputs):
        """The loss of forward's ten inputs, in fused_linear_soft_target's order."""
        return fused_linear_soft_target(*inputs, self.T, self.reduction, self.ignore_index, self.hard_weight,
                                        self.chunk_size)
