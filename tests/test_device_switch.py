"""The FASTKD_TEST_DEVICE wrapper (device_switch.py), on the CPU: copies in and out with
the inputs' strides, gradients back to the caller's leaves, write-back of inputs the call
changed; and, when the switch is on, that every fastkd.autograd Function goes through it."""
import pytest
import torch

import device_switch
from fastkd import autograd, backend

CPU = torch.device("cpu")


class Scale(torch.autograd.Function):
    """x * w, and counts its calls in state[0] in place (a stateful op)."""

    seen = []

    @staticmethod
    def forward(ctx, x, w, state):
        Scale.seen.append((x, w, state))
        state += 1
        ctx.save_for_backward(w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        w, = ctx.saved_tensors
        return grad * w, None, None


def test_copies_in_and_out_with_gradients_and_write_back():
    Scale.seen.clear()
    apply = device_switch.on_device(Scale.apply, CPU, "Scale")
    x = torch.randn(4, 6, dtype=torch.float64)[:, ::2].requires_grad_()  # strided leaf
    w = torch.randn(3, dtype=torch.float64)
    state = torch.zeros(1, dtype=torch.int64)
    y = apply(x, w, state)
    (x_in, w_in, state_in), = Scale.seen
    assert x_in.data_ptr() != x.data_ptr() and x_in.stride() == x.stride()
    assert state_in.data_ptr() != state.data_ptr() and state.item() == 1  # written back
    assert type(y.grad_fn).__name__ == "ScaleBackward" and y.device == CPU
    g = torch.randn(4, 3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * w, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a: apply(a, w, state), (x.detach().clone().requires_grad_(),))
    with torch.no_grad():
        assert apply(x, w, state).grad_fn is None


def test_expanded_inputs_arrive_contiguous():
    Scale.seen.clear()
    x = torch.randn(3, 1, dtype=torch.float64).expand(3, 4)
    device_switch.on_device(Scale.apply, CPU, "Scale")(x, torch.ones(4, dtype=torch.float64),
                                                       torch.zeros(1))
    assert Scale.seen[0][0].is_contiguous()


@pytest.mark.skipif(device_switch.requested() is None, reason=f"every autograd Function on the test device: "
                    f"${device_switch.ENV_VAR} names none (benchmarks/gpu.sh sets it)")
def test_every_autograd_function_runs_on_the_test_device():
    device = device_switch.requested()
    functions = [c for c in vars(autograd).values()
                 if isinstance(c, type) and issubclass(c, torch.autograd.Function)
                 and c.__module__ == autograd.__name__]
    assert len(functions) >= 19
    for cls in functions:
        assert getattr(cls.apply, "on_device", None) == device, cls.__name__
    assert getattr(autograd.CRDContrastFunction.__mro__[1].apply, "on_device", None) is None
    assert backend.triton_runs_on(CPU) and backend.resolve("sp", CPU, "triton") == "triton"
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    loss = autograd.sp(s, torch.randn(5, 4, dtype=torch.float64))
    assert loss.device == CPU and type(loss.grad_fn).__name__ == "SPFunctionBackward"
    inner = loss.grad_fn.next_functions[0][0]  # the Function's own node, on the device
    assert type(inner).__name__ == "SPFunctionBackward" and inner is not loss.grad_fn
    assert type(inner.next_functions[0][0]).__name__ == "_MoveBackward"
