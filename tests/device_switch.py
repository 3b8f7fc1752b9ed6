"""FASTKD_TEST_DEVICE: run the tests' Triton calls on another device.

Why: the tests build CPU tensors (often from CPU torch.Generators) and, without a GPU, run
the Triton kernels through Triton's interpreter. On a CUDA machine (benchmarks/gpu.sh) the
kernels should be compiled and run on the GPU, and a compiled kernel cannot read CPU
memory. With FASTKD_TEST_DEVICE=cuda, conftest.py calls install() before any test module
imports fastkd objects, and then:

* every torch.autograd.Function in fastkd.autograd (each Triton launch happens in the
  forward or backward of one) gets an ``apply`` that moves its tensor arguments to the
  device through a differentiable copy that keeps their strides, runs the original
  ``apply`` there, and returns each tensor result to the caller's device through a copy
  node named after the Function (``type(loss.grad_fn).__name__`` still reads
  "NSTFunctionBackward"). Gradients flow back to the tests' CPU leaves, so the existing
  assertions run unchanged. An argument whose device copy the call changed is copied back
  into the caller's tensor (none of the current Functions writes its inputs: CRD's memory
  bank is updated by the module, on the caller's device, not by the kernel).
* fastkd.backend.triton_runs_on accepts CPU tensors, so use_backend("triton") and the
  dispatcher reach those Functions with the tests' CPU inputs.

The plain functions (fastkd.autograd.<op>, IMPLEMENTATIONS[op]["triton"]) stay as they are:
identity checks hold, and their torch steps (pooling, the input gradients Sobolev and LwM
build with create_graph=True) stay on the caller's device, where their graph is.

FASTKD_TEST_DEVICE=cpu (with TRITON_INTERPRET=1, which conftest.py sets) is the self-test
of this mechanism on a machine without a GPU: the same wrapping, every tensor copied in
and out on the CPU, so the copy, gradient and write-back paths run under the whole suite.

What the copies lose: an input with overlapping memory (an expanded tensor) arrives
contiguous on the device. A kernel that wrote into an input during backward would not be
copied back (only forward is checked).
"""
import functools
import os

import torch

ENV_VAR = "FASTKD_TEST_DEVICE"

# Tests that check exactly what this mode changes: a regular expression matching the end of
# the nodeid -> reason.
SKIPPED = {
    r"test_dispatch\.py::test_triton_on_cpu_needs_the_interpreter":
        f"{ENV_VAR} makes the triton backend accept CPU tensors (their calls run on the test "
        "device), which this test checks it refuses",
}
# And those that need the interpreter, which runs only with FASTKD_TEST_DEVICE=cpu.
SKIPPED_OFF_CPU = {
    # Under torch.compile a Triton call is a fastkd.ops custom operator, whose implementation
    # runs the Function's forward itself, not the apply this mode wraps: CPU tensors would
    # reach a compiled kernel. test_fullgraph_compile_on_cuda compiles the same operators
    # with the inputs on the GPU.
    r"test_compile\.py::test_(fullgraph_compile_gives_the_eager_loss_and_does_not_recompile"
    r"|a_new_batch_size_compiles_once_with_a_dynamic_batch|export_gives_the_eager_loss)\[\w+-triton\]":
        "CPU inputs through fastkd.ops' custom operators need the interpreter; "
        "test_fullgraph_compile_on_cuda and test_export_on_cuda run them on the GPU",
    # FusedLinearSoftTarget's operator launches the Triton rows kernel itself, not through a
    # Function this mode wraps; test_compiled_on_cuda_through_the_operator runs it on the GPU.
    r"test_fused_linear\.py::test_the_operator_runs_each_backend_s_loop_and_refuses_a_second_derivative\[triton\]":
        "CPU inputs to the operator's Triton rows kernel need the interpreter; "
        "test_compiled_on_cuda_through_the_operator runs it on the GPU",
}


def skipped(device):
    """{nodeid-end pattern: reason} of the tests to skip with the tests' calls on device."""
    return SKIPPED if device.type == "cpu" else {**SKIPPED, **SKIPPED_OFF_CPU}


def requested():
    """The device named by $FASTKD_TEST_DEVICE, or None."""
    name = os.environ.get(ENV_VAR, "").strip()
    return torch.device(name) if name else None


class _Move(torch.autograd.Function):
    """A copy of x on device with x's strides (contiguous if x overlaps itself); the
    gradient is copied back to x's device."""

    @staticmethod
    def forward(ctx, x, device):
        ctx.device = x.device
        return _copy(x, device)

    @staticmethod
    def backward(ctx, grad):
        return _copy(grad, ctx.device), None


def _copy(x, device):
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    try:
        return out.copy_(x)
    except RuntimeError:  # overlapping strides (an expanded tensor): no such destination
        return x.to(device, copy=True)


def _same_bits(a, b):
    # A fresh copy: contiguous() keeps a stride of 2 on a one-element tensor.
    as_bytes = lambda x: (x.detach().reshape(-1).clone(memory_format=torch.contiguous_format)  # noqa: E731
                          .view(torch.uint8))
    return torch.equal(as_bytes(a), as_bytes(b.to(a.device)))


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def on_device(apply, device, name):
    """apply(*args) run with its tensors on device, its tensor results on the caller's."""
    back = type(name, (_Move,), {"__doc__": f"{name}'s result copied back to the caller's device."})

    @functools.wraps(apply)
    def wrapped(*args, **kwargs):
        inputs = list(_tensors((args, kwargs)))
        if not inputs:
            return apply(*args, **kwargs)
        caller = inputs[0].device
        copies = []

        def move(t):
            copies.append((t, _Move.apply(t, device)))
            return copies[-1][1]

        result = apply(*_map(args, move), **_map(kwargs, move))
        with torch.no_grad():
            for original, copy in copies:
                if not _same_bits(original, copy):
                    original.copy_(copy)
        return _map(result, lambda t: back.apply(t, caller))

    wrapped.on_device = device
    return wrapped


def install(device):
    """Route every Triton-backed entry point the tests reach through device (see above)."""
    from fastkd import autograd, backend

    if getattr(backend.triton_runs_on, "on_device", None) is not None:
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{ENV_VAR}={device} but torch sees no CUDA device")
    for name, cls in sorted(vars(autograd).items()):
        if (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)
                and cls.__module__ == autograd.__name__):
            # Set on the class itself: a base class (CRDContrastFunction's, the torch
            # path's CRDContrast) keeps its own apply.
            cls.apply = staticmethod(on_device(cls.apply, device, name))

    triton_runs_on = backend.triton_runs_on

    @functools.wraps(triton_runs_on)
    def runs_on(dev):
        return dev.type == "cpu" or triton_runs_on(dev)

    runs_on.on_device = device
    backend.triton_runs_on = runs_on
