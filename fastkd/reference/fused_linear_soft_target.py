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
    lead, z_s, z_t = head_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, teacher_logits)
    n, v = z_s.shape
    log_q = F.log_softmax(z_s / T, dim=1)
    if z_t is None:
        k = teacher_topk_indices.shape[-1]
        q = F.softmax(teacher_topk_logprobs.reshape(n, k) / T, dim=1)
        p_t = q.new_zeros(n, v).scatter_add(1, teacher_topk_indices.reshape(n, k), q)
    else:
        p_t = F.softmax(z_t / T, dim=1)
    kl = F.kl_div(log_q, p_t, reduction="none").sum(1) * (T * T)
    return reduced(kl, z_s, labels, ignore_index, hard_weight, reduction, lead)


def head_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                teacher_logits):
    """(lead, z_s, z_t): the hidden states' leading dims, the student's logits (n, V) and the
    teacher's (n, V), None for a top-k teacher."""
    lead = student_hidden.shape[:-1]
    z_s = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    if teacher_logits is not None:
        return lead, z_s, teacher_logits.reshape(z_s.shape)
    if teacher_hidden is not None:
        return lead, z_s, F.linear(teacher_hidden.reshape(z_s.shape[0], -1), teacher_weight, teacher_bias)
    return lead, z_s, None


def reduced(d, z_s, labels, ignore_index, hard_weight, reduction, lead):
    """The per-token divergence d (n,) of the student's logits z_s (n, V), over the kept tokens
    (label != ignore_index), plus hard_weight x cross-entropy(z_s, labels), reduced: none (the
    terms, shaped lead), sum, batchmean (sum / kept tokens), mean (d's sum / (kept tokens x V),
    the hard term's / kept tokens); kept tokens clamped at 1."""
    n, v = z_s.shape
    if labels is None:
        kept = torch.ones(n, dtype=torch.bool, device=z_s.device)
    else:
        kept = labels.reshape(n) != ignore_index
    per_token = torch.where(kept, d, 0.0)
    ce = None
    if hard_weight:
        ce = torch.where(kept, F.cross_entropy(z_s, labels.reshape(n), ignore_index=ignore_index, reduction="none"),
                         0.0)
        per_token = per_token + hard_weight * ce
    n_kept = kept.sum().clamp(min=1)
    if reduction == "none":
        return per_token.reshape(lead)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "batchmean":
        return per_token.sum() / n_kept
    part = torch.where(kept, d, 0.0).sum() / (n_kept * v)
    return part if ce is None else part + hard_weight * ce.sum() / n_kept


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
