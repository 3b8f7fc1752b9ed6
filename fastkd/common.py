"""Pieces shared by the fast backends (fastkd.torch_backend and the Triton Functions in
fastkd.autograd): nothing here depends on either."""
import functools

import torch


def first_order(backward):
    """Mark a hand-written autograd backward as first order only.

    Under create_graph=True (grad mode on during backward) it raises a clear error instead of
    returning gradients without a graph, which would drop the op's own second-order part
    without a word (torch's once_differentiable refuses only when the incoming gradient
    itself requires grad). Without create_graph the backward runs as written.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise second_order_error(type(ctx).__name__.removesuffix("Backward"))
        return backward(ctx, *grads)
    return wrapper


def second_order_error(name):
    """The error of differentiating twice (create_graph=True) a backward that is first order."""
    return RuntimeError(f"fastkd's {name} has a first-order backward only: it cannot be differentiated "
                        f"twice (create_graph=True). Use fastkd.use_backend('reference') for higher "
                        f"derivatives.")


def eager(fn):
    """fn behind torch.compiler.disable (a graph break under torch.compile: fn runs eagerly),
    applied at each call rather than at import: the decorator imports TorchDynamo, which would
    triple the time of ``import fastkd`` in a process that never compiles. Dynamo traces the
    call of torch.compiler.disable inside a compiled function as it does the decorator's."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


def accumulation_dtype(*tensors):
    """The dtype sums run in: float64 when an input is float64, else float32 (bfloat16 and
    float16 inputs accumulate in float32). The pairwise losses' exact parts use float64
    whatever the input (their module docstrings say why)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def result_dtype(*tensors):
    """The dtype of a loss of these tensors, for every backend: torch's promotion of their
    dtypes, which is what the reference's arithmetic gives when they are mixed (float32
    student, float64 teacher -> float64). Pass the tensors whose values enter the loss, not
    those used only as masks or indices (AB's teacher, CRD's indices). A fold of
    torch.promote_types, which torch.compile traces (torch.result_type it cannot)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def nst_spatial_form(c_s, c_t, hw):
    """Whether NST takes its (HW x HW) form: the Gram products of that form cost
    HW^2 (C_s + C_t), those of the (C x C) form HW (C_s^2 + C_t^2 + C_s C_t), both backends."""
    return hw * (c_s + c_t) < c_s * c_s + c_t * c_t + c_s * c_t


def normalized_rows(x, eps=1e-12):
    """(z, norm): z = x / max(|x_row|, eps), F.normalize(x, dim=1)'s operations without its
    Python layers (the same values), and the row norms (R, 1), for normalize_grad."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(eps).expand_as(x), norm


def normalize_grad(z, norm, dz, eps=1e-12):
    """dL/dx from dL/dz for z = normalized_rows(x): (dz - z (z . dz)) / |x| per row, or
    dz / eps where |x| <= eps (F.normalize's clamp, which autograd differentiates so)."""
    # dz - z s as one addcmul (value -1 is exact: the same roundings as the difference of the
    # product), divided in place: at small sizes each torch call is most of its time.
    r = torch.addcmul(dz, z, (z * dz).sum(dim=1, keepdim=True), value=-1).div_(norm.clamp_min(eps))
    return torch.where(norm > eps, r, dz / eps)


def output_gradient(out, target, wrt, create_graph=True):
    """d(sum_i out[i, target_i]) / d wrt: Sobolev's input gradients and LwM's map gradients
    (the reference computes its own, with gather). Kept in the graph (create_graph=True) for
    the student; the teacher's, which the loss detaches, without (no double-backward graph
    recorded for nothing)."""
    # A scatter rather than one_hot, which reads the targets' range on the host on the CPU.
    pick = torch.zeros_like(out).scatter_(1, target.long().unsqueeze(1), 1.0)
    return torch.autograd.grad(out, wrt, grad_outputs=pick, create_graph=create_graph, retain_graph=True)[0]


def grad_cam(out, fm, target, create_graph=True):
    """relu(sum_c mean_hw(g) g) (B, 1, H, W), g = output_gradient(out, target, fm) (B, C, H, W):
    LwM's class activation map (weighted by the gradient, as the collection's)."""
    g = output_gradient(out, target, fm, create_graph)
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * g).sum(dim=1, keepdim=True))


def transformation_pool(fm1, fm2):
    """IRG's transformation: fm1 average-pooled to fm2's (H, W) when it is larger, as
    adaptive_avg_pool2d does; with whole windows (the sizes divide) that is avg_pool2d,
    which runs faster."""
    if fm1.size(2) <= fm2.size(2):
        return fm1
    (h1, w1), (h2, w2) = fm1.shape[2:], fm2.shape[2:]
    if h1 % h2 == 0 and w1 % w2 == 0:
        return torch.nn.functional.avg_pool2d(fm1, (h1 // h2, w1 // w2))
    return torch.nn.functional.adaptive_avg_pool2d(fm1, (h2, w2))


@first_order
def direction_backward(ctx, grad_output):
    """The backward of CRD's contrast Function on both fast backends: forward saved the
    gradient direction dL/dembed (the memory bank changes before backward, so it cannot be
    formed then) and an empty tensor of embed's dtype; this scales the one by grad_output."""
    direction, like = ctx.saved_tensors
    grad_embed = None
    if ctx.needs_input_grad[0]:
        grad_embed = (direction * grad_output.to(direction.dtype)).to(like.dtype)
    return grad_embed, None, None, None, None, None, None


def squared_distances_from_gram(g):
    """E = G_aa + G_bb - 2 G_ab (N, N), 0 on the diagonal, from an exactly symmetric Gram
    matrix G of centred float64 rows. Its absolute error, about D u64 |x - mean|^2, is all
    of E for a pair much closer than the spread: enough for IRG's edges, which read E only
    through E / max(E) (RKD needs the difference vectors themselves)."""
    return squared_distances_from_gram_rows(g, torch.diagonal(g), 0)


def squared_distances_from_gram_rows(g, sq, lo):
    """The rows lo:lo + n of squared_distances_from_gram's E, (n, N), from those rows of G
    (n, N) and sq (N,) every row's squared norm: E_ab = sq_a + sq_b - 2 G_ab, 0 at b = lo + a
    (a global batch's row block)."""
    e = (sq.unsqueeze(0) + sq[lo:lo + len(g)].unsqueeze(1)) - 2 * g
    torch.diagonal(e[:, lo:lo + len(g)]).zero_()
    return e


def zero_row_sums(z):
    """z (N, N) with its diagonal set, in place, so that every row sums to 0, as the exact
    matrix's rows do when Z X is a sum of differences (the gradient through F.normalize's
    clamp in RKD's angles): Z X is then sum_k Z_jk (x_k - x_j), and the rounding of Z's
    entries is not multiplied by |x| (a near-duplicate pair's gap can be far smaller)."""
    z.diagonal().sub_(z.sum(dim=1))
    return z
