"""Hint's, Logits' and IRG's vertex mse on the CPU path from 2^18 elements: the gradient formed
in the forward pass (fastkd.torch_backend.elementwise.MSE).

The adversarial cases run with the size threshold lowered to 1, so that their small odd
shapes take the path: loss and gradients within 10x the reference's own float32 error, no
input modified (test_adversarial_losses.check). Then what the path must keep of autograd's
contract: an upstream gradient of 1 or not, a teacher that trains, a second backward through
a retained graph, create_graph, no_grad, strided inputs.
"""
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastkd.backend import IMPLEMENTATIONS
from fastkd.torch_backend import elementwise
import test_adversarial_losses as losses

OPS = ("logits", "hint", "irg_vertex")


@pytest.mark.parametrize("op", OPS)
@given(case=losses.cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_adversarial_cases_on_the_fused_path(op, case, dtype):
    with mock.patch.object(elementwise, "MSE_FUSED_FROM", 1):
        losses.check(op, "torch", dict(case, dtype=dtype))


def _leaves(shape=(64, 4096), teacher_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))).requires_grad_()
    t = torch.randn(shape, generator=g).requires_grad_(teacher_grad)
    return s, t


def _exact(s, t, upstream):
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    loss = ((s64 - t64) ** 2).mean()
    return (loss, *torch.autograd.grad(loss * upstream, [s64, t64]))


def _close(a, e, rel):
    assert float((a.detach().double() - e.detach()).norm() / e.detach().norm()) < rel


@pytest.mark.parametrize("upstream", [1.0, -0.37, 0.0])
def test_gradients_for_any_upstream_gradient_and_a_training_teacher(upstream):
    s, t = _leaves(teacher_grad=True)
    assert s.numel() >= elementwise.MSE_FUSED_FROM
    loss = elementwise.hint(s, t)
    assert type(loss.grad_fn).__name__ == "MSEBackward"
    gs, gt = torch.autograd.grad(loss, [s, t], torch.tensor(upstream))
    e_loss, e_s, e_t = _exact(s, t, upstream)
    _close(loss, e_loss, 1e-6)
    if upstream == 0.0:
        assert not gs.any() and not gt.any()
    else:
        _close(gs, e_s, 1e-6)
        torch.testing.assert_close(gt, -gs, rtol=0, atol=0)


def test_a_second_backward_through_a_retained_graph_is_the_first_s():
    s, t = _leaves()
    loss = elementwise.hint(s, t)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0].clone()
    scaled = torch.autograd.grad(loss, s, torch.tensor(3.0), retain_graph=True)[0]
    again = torch.autograd.grad(loss, s)[0]
    torch.testing.assert_close(scaled, 3 * first, rtol=1e-6, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_second_derivative_matches_the_reference():
    s, t = _leaves(shape=(8, 2 ** 15))
    s, t = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    out = []
    for impl in (elementwise.hint, IMPLEMENTATIONS["hint"]["reference"]):
        loss = impl(s, t)
        gs = torch.autograd.grad(loss, s, create_graph=True)[0]
        out.append(torch.autograd.grad((gs * gs).sum(), [s, t]))
    assert type(elementwise.hint(s, t).grad_fn).__name__ == "MSEBackward"
    for a, r in zip(*out):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)


def test_strided_inputs_and_the_paths_it_leaves_to_aten():
    s, t = _leaves(shape=(4096, 64))
    st_, tt = s.detach().t().requires_grad_(), t.detach().t()  # transposed views
    loss = elementwise.hint(st_, tt)
    g = torch.autograd.grad(loss, st_)[0]
    e_loss, e_s, _ = _exact(st_, tt, 1.0)
    _close(loss, e_loss, 1e-6)
    _close(g, e_s, 1e-6)
    with torch.no_grad():  # no gradient wanted: nothing formed for it
        assert elementwise.hint(s, t).grad_fn is None
    assert type(elementwise.hint(s.detach(), t).grad_fn).__name__ != "MSEBackward"
    assert type(elementwise.hint(s.bfloat16(), t.bfloat16()).grad_fn).__name__ != "MSEBackward"
    small = s[:1, :8]
    assert type(elementwise.hint(small, t[:1, :8]).grad_fn).__name__ == "MseLossBackward0"


def test_torch_func_transforms_take_aten_s_mse():
    """Under torch.func (grad, vmap) the Function cannot run (it reads the upstream gradient on
    the host): there the path is ATen's mse_loss, which the transforms differentiate."""
    s, t = (x.detach() for x in _leaves())
    g = torch.func.grad(lambda x: elementwise.hint(x, t))(s)
    torch.testing.assert_close(g, 2 * (s - t) / s.numel(), rtol=1e-6, atol=0)
