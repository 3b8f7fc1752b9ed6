"""Second derivatives: every fast path either gives the reference's or refuses.

The hand-written backwards are first order: differentiated again (create_graph=True) they
would leave out their own second-order part without a word. So each is marked
fastkd.common.first_order and refuses with a clear error; a fast path built from plain torch
ops (Hint's mse_loss, for example) differentiates twice like the reference and must agree
with it.
"""
import pytest
import torch

from fastkd.backend import IMPLEMENTATIONS
from adversarial_rows import rows
import test_adversarial_losses as losses
import test_adversarial_pairwise as pairwise

CASE = dict(seed=3, kind="normal", relation="independent", dtype=torch.float64, strided=False,
            B=3, C=2, C2=3, H=3, W=2, K=5, margin=0.5)


def _inputs(op):
    """(leaves in float64 that need grad, call(impl, leaves) -> loss)."""
    if op in losses.OPS:
        tensors, _, need, call = losses.OPS[op](torch.Generator().manual_seed(3), CASE)
        leaves = [x.detach().requires_grad_(i in need) for i, x in enumerate(tensors)]
        return leaves, [leaves[i] for i in need], call
    if op == "fused_linear_soft_target":  # student hidden states and head weight need grad
        g = torch.Generator().manual_seed(3)
        h, W = (torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(),
                torch.randn(7, 4, generator=g, dtype=torch.float64).requires_grad_())
        z_t, labels = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.tensor([0, 3, -100, 6, 2])
        return [h, W], [h, W], lambda impl, xs: impl(xs[0], xs[1], None, None, labels, None, None, z_t,
                                                    None, None, 2.0, "batchmean", -100, 0.5, 2)
    s, t = rows(5, 8, "spread", 3), rows(5, 9, "spread", 4)
    leaves = [s.requires_grad_(), t.requires_grad_()]
    return leaves, leaves, lambda impl, xs: pairwise.OPS[op](impl, *xs)


def _second(op, backend):
    """d/dx of sum(dL/dx) for the inputs x that need grad, or the error a second backward
    raises."""
    leaves, need, call = _inputs(op)
    loss = call(IMPLEMENTATIONS[op][backend], leaves)
    grads = torch.autograd.grad(loss, need, create_graph=True, allow_unused=True)
    total = sum(g.sum() for g in grads if g is not None and g.requires_grad)
    if not isinstance(total, torch.Tensor):
        return None  # the gradient does not depend on the inputs
    return torch.autograd.grad(total, need, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", sorted(IMPLEMENTATIONS))
def test_second_derivative_is_the_reference_s_or_refused(op, backend):
    try:
        fast = _second(op, backend)
    except RuntimeError as e:
        assert "first-order backward only" in str(e), f"{op} {backend}: unclear refusal: {e}"
        return
    exact = _second(op, "reference")
    assert (fast is None) == (exact is None), f"{op} {backend}: second derivative dropped"
    for a, e in zip(fast or (), exact or ()):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10, msg=f"{op} {backend}")


@pytest.mark.parametrize("op", ["pkt_cos_sim", "cc", "sp", "ft", "soft_target"])
def test_cpu_functions_against_a_fixed_teacher_refuse_clearly(op):
    """Against a teacher that needs no gradient, these CPU paths run Functions with
    hand-written backwards: their gradient is the reference's, a second one is refused."""
    s, t = rows(5, 8, "spread", 3).requires_grad_(), rows(5, 8, "spread", 4)
    args = {"cc": (0.4, 2), "soft_target": (2.0,)}.get(op, ())
    fast, ref = IMPLEMENTATIONS[op]["torch"](s, t, *args), IMPLEMENTATIONS[op]["reference"](s, t, *args)
    torch.testing.assert_close(torch.autograd.grad(fast, s)[0], torch.autograd.grad(ref, s)[0],
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(IMPLEMENTATIONS[op]["torch"](s, t, *args), s, create_graph=True)
