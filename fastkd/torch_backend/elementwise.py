"""The pointwise-and-reduce losses with torch ops: the CPU path (torch autograd does the
backward, but for the Functions below). Same signatures and results as fastkd.reference,
with fewer full-size temporaries (masks folded into one expression, Hint's and Logits' mse
in fewer passes over memory: MSE).

Error analysis: the sums of squares are torch.sum of a squared copy, or vector_norm over
short runs (_block_sum_sq), not vector_norm(x).square() of the whole. On CPU vector_norm
accumulates long runs serially, so its fp32 relative error grows with the element count
(measured on 10^5..10^6 spread values: AB 2e-5, OFD 1e-6..4e-5, VID 1e-6 (alpha's gradient
1e-6 against the reference's 6e-8)), while torch.sum's cascade keeps about 1e-7, as the
reference's mean does. The squared copy costs one temporary the size of the input; bf16/fp16
are squared and summed in fp32.
"""
import torch
import torch.nn.functional as F

from .. import checks
from ..common import first_order, grad_cam, normalize_grad, normalized_rows, output_gradient, result_dtype


def _sum_sq(x, dim=None):
    """sum of x^2 (over dim) by torch.sum's blocked (cascade) summation; fp32 or wider."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.sum(x * x, dim=dim)


_MEAN = torch.nn._reduction.get_enum("mean")


# Elements from which Hint's and Logits' CPU path forms the gradient in the forward pass
# (MSE below); under it the call's fixed cost is all there is, and ATen's mse_loss, one native
# autograd node, costs less than a Python Function (measured on this project's 2-core CPU
# machine, one thread: 0.81x at 10^5 elements, 1.3-1.6x from 5 x 10^5).
MSE_FUSED_FROM = 1 << 18


def hint(fm_s, fm_t):
    """mse(fm_s, fm_t). Large float32/float64 CPU inputs of one dtype that need a gradient: MSE
    (the gradient formed in the forward pass). Otherwise ATen's mse_loss, called directly:
    F.mse_loss's Python wrapper (broadcasting the shapes, which fastkd.functional has checked
    equal) costs half as much host time again as the op itself."""
    if (fm_s.numel() >= MSE_FUSED_FROM and checks.host_tensor(fm_s) and fm_s.dtype == fm_t.dtype
            and fm_s.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and (fm_s.requires_grad or fm_t.requires_grad) and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()):  # torch.func: ATen's, as before
        return MSE.apply(fm_s, fm_t)
    return torch._C._nn.mse_loss(fm_s, fm_t, _MEAN)


def _block_sum_sq(d, block=256):
    """sum of d^2 for a contiguous d: each run of `block` elements by vector_norm (whose serial
    runs are then short), the squared norms by torch.sum's cascade. Within the reference's
    error of the sum of a squared copy (measured: 1e-7 relative on values spread over six
    decades), without the copy; vector_norm of the whole was 6e-5 off."""
    v = d.view(-1)
    k = v.numel() // block
    total = torch.linalg.vector_norm(v[:k * block].view(k, block), dim=1).square_().sum()
    if v.numel() > k * block:
        tail = v[k * block:]
        total = total + torch.dot(tail, tail)
    return total


class MSE(torch.autograd.Function):
    """mse(s, t) = sum (s - t)^2 / n on the CPU, its gradient formed in the forward pass.

    ATen's mse_loss writes the elementwise squares before averaging them, and its backward
    zero-fills the gradient before writing it: eight passes of the inputs' size over memory.
    Here forward forms d = s - t (three passes), sums d^2 in blocks (one) and scales d to
    2 d / n in place (two): the gradient for an upstream gradient of 1, which backward returns
    as it is (another upstream gradient scales it in place: two more; reading a CPU scalar is
    no device sync). d/ds = 2 (s - t) / n, d/dt = -d/ds. A second backward (retain_graph=True)
    forms the gradient again from s and t; under create_graph=True backward is torch ops on
    s and t, so it differentiates again like the reference.
    """

    @staticmethod
    def forward(ctx, s, t):
        d = torch.sub(s, t, out=torch.empty(s.shape, dtype=s.dtype))  # contiguous, whatever s's strides
        loss = _block_sum_sq(d) / d.numel()
        ctx.save_for_backward(s, t)
        ctx.grad = d.mul_(2.0 / d.numel())  # hint applies MSE only where a gradient is wanted
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        s, t = ctx.saved_tensors
        if torch.is_grad_enabled():
            g = (s - t) * (grad_output * (2.0 / s.numel()))
        else:
            g, ctx.grad = ctx.grad, None  # ours alone now: free to scale in place, or to keep
            if g is None:
                g = torch.sub(s, t).mul_(2.0 / s.numel())
            if grad_output.item() != 1.0:
                g.mul_(grad_output)
        student, teacher = ctx.needs_input_grad
        return g if student else None, -g if teacher else None


logits = hint


def ab(fm_s, fm_t, margin):
    """mean(relu(m + k s)^2), k = -1 where t > 0 else 1: the reference's two masked squares
    in one expression ((s + m) [s > -m] = relu(s + m), (s - m)^2 [s <= m] = relu(m - s)^2)."""
    k = (fm_t > 0).to(fm_s.dtype).mul_(-2).add_(1)
    e = torch.relu(fm_s * k + margin)
    return (_sum_sq(e) / e.numel()).to(e.dtype)


def _normalized_rows(x):
    """F.normalize(flat(x), dim=1)."""
    return normalized_rows(x.reshape(x.shape[0], -1))[0]


def ft(factor_s, factor_t):
    """l1(normalize(flat(factor_s)), normalize(flat(factor_t)))."""
    if not factor_t.requires_grad or not torch.is_grad_enabled():  # the teacher is a constant
        return FTStudent.apply(factor_s, _normalized_rows(factor_t.detach()))
    return F.l1_loss(_normalized_rows(factor_s), _normalized_rows(factor_t))


class FTStudent(torch.autograd.Function):
    """FT against a fixed normalised teacher z_t (B, D), with a hand-written backward: the
    reference's forward operations (F.normalize, l1) without an autograd graph, and, with
    z = x / max(|x|, 1e-12) and g = sign(z - z_t) / (B D),
        dx = (g - z (z . g)) / |x| where |x| > 1e-12, else g / 1e-12 (F.normalize's clamp)."""

    @staticmethod
    def forward(ctx, x, z_t):
        z, norm = normalized_rows(x.reshape(x.shape[0], -1))
        diff = z - z_t
        ctx.save_for_backward(z, norm, diff)
        ctx.shape = x.shape
        return diff.abs().mean()

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        z, norm, diff = ctx.saved_tensors
        g = torch.sign(diff).mul_(grad_output / diff.numel())
        return normalize_grad(z, norm, g).reshape(ctx.shape), None


def _ofd_excess(fm_s, fm_t):
    """e = d [d > 0 or t' > 0], d = s - t', t' = max(t, m_c) (the reference's mask
    1 - [s <= t' and t' <= 0] written as a keep mask)."""
    neg = fm_t < 0
    count = neg.sum(dim=(0, 2, 3), keepdim=True, dtype=fm_t.dtype)
    t = torch.maximum(fm_t, (fm_t * neg).sum(dim=(0, 2, 3), keepdim=True) / (count + 1e-6))
    d = fm_s - t
    return d * ((d > 0) | (t > 0)).to(d.dtype)


def ofd(fm_s, fm_t):
    """mean(e^2), e = _ofd_excess(s, t) (OFDStudent against a fixed teacher)."""
    if not fm_t.requires_grad or not torch.is_grad_enabled():  # the teacher is a constant
        return OFDStudent.apply(fm_s, fm_t)
    e = _ofd_excess(fm_s, fm_t)
    return (_sum_sq(e) / e.numel()).to(e.dtype)


class OFDStudent(torch.autograd.Function):
    """OFD against a fixed teacher map: the loss's operations without an autograd graph, and
    its gradient 2 e / numel (the mask is 0 or 1 and constant almost everywhere), from the e
    forward keeps: one pass where autograd's goes back through the mask, the difference and
    the square."""

    @staticmethod
    def forward(ctx, fm_s, fm_t):
        e = _ofd_excess(fm_s, fm_t)
        ctx.save_for_backward(e)
        return (_sum_sq(e) / e.numel()).to(e.dtype)

    @staticmethod
    @first_order
    def backward(ctx, grad_output):
        e, = ctx.saved_tensors
        return e * (grad_output * (2.0 / e.numel())).to(e.dtype), None


def vid(pred_mean, fm_t, alpha, eps=1e-6):
    """0.5 (mean_c log var_c + sum_c ||mu_c - t_c||^2 / var_c / N), var = softplus(alpha) + eps."""
    var = torch.log(1.0 + torch.exp(alpha)) + eps
    sq = _sum_sq(pred_mean - fm_t, dim=(0, 2, 3))
    loss = 0.5 * (torch.log(var).mean() + (sq / var).sum() / pred_mean.numel())
    return loss.to(result_dtype(pred_mean, fm_t, alpha))


def afd(fm_s, fm_t, rho, eps=1e-6):
    """mean_b sum_c rho[b, c] ||s' - t'||^2 / HW, f' = f / (||f||_2 over (H, W) + eps)."""
    s = fm_s / (torch.linalg.vector_norm(fm_s, dim=(2, 3), keepdim=True) + eps)
    t = fm_t / (torch.linalg.vector_norm(fm_t, dim=(2, 3), keepdim=True) + eps)
    q = _sum_sq(s - t, dim=(2, 3))
    loss = (rho * q).sum() / (q.shape[0] * fm_s.shape[2] * fm_s.shape[3])
    return loss.to(result_dtype(fm_s, fm_t, rho))


def sobolev(out_s, out_t, img, target):
    g_s = _normalized_rows(output_gradient(out_s, target, img))
    g_t = _normalized_rows(output_gradient(out_t, target, img, create_graph=False))
    return hint(g_s, g_t.detach())


def lwm(out_s, fm_s, out_t, fm_t, target):
    cam_t = _normalized_rows(grad_cam(out_t, fm_t, target, create_graph=False))
    cam_s = _normalized_rows(grad_cam(out_s, fm_s, target))
    return F.l1_loss(cam_s, cam_t.detach())
