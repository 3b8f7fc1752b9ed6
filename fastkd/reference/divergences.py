"""FusedLinearDistillation's oracle: the divergences LLM distillation uses, on materialised
logits, with the teacher forms, ignore_index, hard term and reductions of
fastkd.FusedLinearSoftTarget (fastkd/reference/fused_linear_soft_target.py).

Per token, with p the teacher's and q the student's distribution at temperature T
(q = softmax(z_s / T), z_s = h_s W_s^T (+ b_s), (N, V)):

    kl               KL(p || q)  = sum_c p_c (log p_c - log q_c)           forward KL (Hinton)
    reverse_kl       KL(q || p)  = sum_c q_c (log q_c - log p_c)           MiniLLM
    jsd              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                     (TRL's GKDTrainer.generalized_jsd_loss; beta = 0 is kl, beta = 1 is
                     reverse_kl, as TRL defines the endpoints)
    skew_kl          KL(p || alpha p + (1 - alpha) q)                      DistiLLM's SKL
    skew_reverse_kl  KL(q || (1 - alpha) p + alpha q)                      DistiLLM's SRKL
    tvd              1/2 sum_c |p_c - q_c|                                 total variation

Terms with a zero weight add 0 (0 log 0 = 0). DistiLLM's own code drops the teacher's
entropy from skew_kl (a constant: same gradients); here it is the divergence itself, >= 0.

    loss_i = T^2 D(p_i, q_i) + hard_weight * cross_entropy(z_s_i, label_i)   kept tokens i

Reductions as FusedLinearSoftTarget's: batchmean sum / n_kept; sum; mean: D part /
(n_kept V) + hard part / n_kept; none: loss_i per token (0 where ignored); n_kept clamped
at 1.

The teacher: dense (h_t W_t^T (+ b_t), or given logits (N, V)): p = softmax(z_t / T). Or a
top-k: indices (N, k), distinct per token, and log-probabilities logp (N, k) at
temperature 1. Then both distributions live on k + 1 outcomes, the k classes and one
bucket for the other V - k:

    student  q_j = softmax(z_s / T)[idx_j],  q_rest = sum of softmax(z_s / T) over the rest
    teacher  topk_rest="renormalise":  p_j = softmax(logp / T)_j,  p_rest = 0
             topk_rest="bucket":       p = softmax([logp_1, ..., logp_k, log r] / T),
                                       r = 1 - sum_j exp(logp_j), the teacher's own rest mass
                                       (0 where k = V: there is no class outside)

and D is taken over those k + 1 outcomes. The student's bucket is its exact mass outside
the k classes (at T), so with "renormalise" (the teacher has 0 there) kl, jsd, skew_kl,
skew_reverse_kl and tvd equal the divergence over all V classes with the teacher's top-k
renormalised and 0 elsewhere: kl is FusedLinearSoftTarget's top-k. reverse_kl (and jsd at
beta = 1, skew_reverse_kl at alpha = 0) is infinite there: the student's mass outside the
top-k is compared against 0; fastkd refuses it and asks for "bucket". With "bucket" the
teacher's tail keeps its mass r as one outcome (tempered as one class: its true tempered
mass needs the tail's values, which a top-k does not hold), so every divergence is finite. At T = 1 the k + 1 outcomes
hold the teacher's own distribution exactly, lumped; over all V classes a divergence of lumped outcomes is a lower
bound of the full one (data processing).

Every (N, V) tensor is materialised, so it is only for checking and small problems.
"""
import torch
import torch.nn.functional as F

from .fused_linear_soft_target import FusedLinearSoftTarget, head_logits, reduced

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
TOPK_REST = ("renormalise", "bucket")


def _plogp_ratio(log_a, log_b):
    """sum a (log a - log b) over the last dim, a = exp(log_a); a term with a = 0 adds 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def _log_mix(log_a, log_b, w):
    """log(w a + (1 - w) b), 0 < w < 1."""
    return torch.logaddexp(log_a + torch.log(torch.tensor(w, dtype=log_a.dtype)),
                           log_b + torch.log1p(torch.tensor(-w, dtype=log_a.dtype)))


def divergence(log_p, log_q, name, beta=0.5, alpha=0.1):
    """D(p, q) over the last dim of the log-probabilities log_p (teacher) and log_q (student),
    (..., C) each -> (...). The formulas of the module docstring."""
    if name == "kl" or (name == "jsd" and beta == 0):
        return _plogp_ratio(log_p, log_q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return _plogp_ratio(log_q, log_p)
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _plogp_ratio(log_p, log_m) + (1 - beta) * _plogp_ratio(log_q, log_m)
    if name == "skew_kl":
        log_m = log_p if alpha == 1 else log_q if alpha == 0 else _log_mix(log_p, log_q, alpha)
        return _plogp_ratio(log_p, log_m)
    if name == "skew_reverse_kl":
        log_m = log_q if alpha == 1 else log_p if alpha == 0 else _log_mix(log_q, log_p, alpha)
        return _plogp_ratio(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")


def topk_outcomes(log_q, idx, logp, T, topk_rest):
    """(log p, log q) (N, k + 1) on the k classes and the bucket of the rest, from the
    student's log_softmax(z_s / T) (N, V), the teacher's indices (N, k) and log-probabilities
    at temperature 1 (N, k)."""
    rest = torch.ones_like(log_q, dtype=torch.bool).scatter(1, idx, False)
    log_q_rest = torch.logsumexp(log_q.masked_fill(~rest, float("-inf")), dim=1, keepdim=True)
    log_q_k = torch.cat([log_q.gather(1, idx), log_q_rest], dim=1)
    logp = logp.to(log_q.dtype)
    if topk_rest == "renormalise":
        log_p_k = F.log_softmax(logp / T, dim=1)
        log_p_k = torch.cat([log_p_k, torch.full_like(log_p_k[:, :1], float("-inf"))], dim=1)
    else:
        mass = logp.exp().sum(1, keepdim=True)
        log_r = torch.where(mass < 1, torch.log1p(-mass.clamp(max=1)), float("-inf"))
        if idx.shape[1] == log_q.shape[1]:  # k = V: no class outside, r is rounding only
            log_r = torch.full_like(log_r, float("-inf"))
        log_p_k = F.log_softmax(torch.cat([logp, log_r], dim=1) / T, dim=1)
    return log_p_k, log_q_k


def fused_linear_distillation(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                              labels=None, student_bias=None, teacher_bias=None, teacher_logits=None,
                              teacher_topk_indices=None, teacher_topk_logprobs=None, divergence_name="kl", T=1.0,
                              beta=0.5, alpha=0.1, topk_rest="renormalise", reduction="batchmean",
                              ignore_index=-100, hard_weight=0.0, chunk_size=None):
    """student_hidden (..., H), student_weight (V, H); the teacher one way (module docstring)
    with the same leading (...) dims; labels (...) int or None. Returns a scalar, or (...)
    for reduction="none". chunk_size is the fast paths' (this materialises everything)."""
    lead, z_s, z_t = head_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, teacher_logits)
    n = z_s.shape[0]
    log_q = F.log_softmax(z_s / T, dim=1)
    if z_t is None:
        k = teacher_topk_indices.shape[-1]
        log_p, log_q_d = topk_outcomes(log_q, teacher_topk_indices.reshape(n, k).long(),
                                       teacher_topk_logprobs.reshape(n, k), T, topk_rest)
    else:
        log_p, log_q_d = F.log_softmax(z_t / T, dim=1).to(log_q.dtype), log_q
    d = divergence(log_p, log_q_d, divergence_name, beta, alpha) * (T * T)
    return reduced(d, z_s, labels, ignore_index, hard_weight, reduction, lead)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss, written from its definition: on logits
    (B, L, V) (any leading dims), per element the jsd of the module docstring at T =
    temperature, no T^2 factor; labels (B, L) drop the tokens whose label is -100.
    batchmean: sum / (kept tokens, or B = student_logits.shape[0] without labels, clamped at
    1); sum; mean: mean over the kept elements (tokens x V); none: the elementwise terms,
    (B, L, V), or (n_kept, V) with labels. num_items_in_batch: sum / it, whatever the
    reduction."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)

    def term(log_a, log_b):  # the elementwise a (log a - log b), 0 where a = 0
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), 0.0)
    if beta == 0:
        elementwise = term(log_p, log_q)
    elif beta == 1:
        elementwise = term(log_q, log_p)
    else:
        log_m = _log_mix(log_p, log_q, beta)
        elementwise = beta * term(log_p, log_m) + (1 - beta) * term(log_q, log_m)
    if labels is not None:
        elementwise = elementwise[labels != -100]
    if num_items_in_batch is not None:
        return elementwise.sum() / num_items_in_batch
    if reduction == "batchmean":
        count = (labels != -100).sum().clamp(min=1) if labels is not None else max(elementwise.shape[0], 1)
        return elementwise.sum() / count
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "mean":
        return elementwise.mean()
    return elementwise


class FusedLinearDistillation(FusedLinearSoftTarget):
    """The module form of fused_linear_distillation (arguments as fastkd.FusedLinearDistillation);
    forward takes FusedLinearSoftTarget's inputs."""

    def __init__(self, divergence, *, T=1.0, beta=0.5, alpha=0.1, topk_rest="renormalise", reduction="batchmean",
                 ignore_index=-100, hard_weight=0.0, chunk_size=None):
        super().__init__(T, reduction=reduction, ignore_index=ignore_index, hard_weight=hard_weight,
                         chunk_size=chunk_size)
        self.divergence = divergence
        self.beta = beta
        self.alpha = alpha
        self.topk_rest = topk_rest

    def loss(self, *inputs):
        """The loss of forward's ten inputs, in fused_linear_distillation's order."""
        return fused_linear_distillation(*inputs, self.divergence, self.T, self.beta, self.alpha, self.topk_rest,
                                         self.reduction, self.ignore_index, self.hard_weight, self.chunk_size)
