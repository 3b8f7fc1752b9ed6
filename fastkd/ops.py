"""The Triton Functions of fastkd.autograd as torch.library custom operators, for torch.compile
of the ``triton`` backend called by name (the ``auto`` backend calls the losses' device-keyed
operators of fastkd.device_ops instead, whose cuda kernels run these Functions eagerly).

Eagerly, ``apply("XFunction", *args)`` is ``XFunction.apply(*args)``. While torch.compile
traces, it calls the operator ``fastkd::<XFunction>`` instead: the compiler treats it as
one opaque node (it cannot trace Triton launches, nor the interpreter on CPU), with

  forward    fastkd::<X>(tensors, floats, ints, layout, needs) -> [the loss]: X.forward
             run with a plain context object;
  backward   fastkd::<X>_backward(grad, kept, same arguments) -> one gradient per tensor
             argument: X.forward then X.backward with such a context, so the forward is
             computed again in backward (as activation checkpointing does), and nothing
             but the inputs is saved between the two (autograd raises if one of them is
             changed in place before backward). CRD's memory bank is changed in place
             after its loss, so its forward operator also returns what X.forward saved
             (``kept``), and its backward reads that instead (register's ``saved``);
  fake       X.forward on meta tensors with every Triton launch skipped, for the result's
             dtype (the launchers allocate their outputs with torch, so dtypes come out
             right; fastkd.kernels.resources runs them on meta tensors the same way).

The arguments of a Function call are flattened into tensors, floats and ints, with
``layout`` naming each position's kind ("t", "f", "i", "b" for a bool, "n" for None; "(...)"
a tuple, for fastkd.device_ops) and ``needs`` whether it needs a gradient (X.backward reads
ctx.needs_input_grad).
"""
import contextlib

import torch

# Function name -> (the autograd.Function, its forward custom op). Looked up by name: under
# torch.compile neither a dict keyed by class nor an attribute of a Function class is traced.
_REGISTRY = {}


class _Ctx:
    """What fastkd's Functions use of torch's autograd context."""

    def __init__(self, needs):
        self.needs_input_grad = tuple(needs)
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def on_device_of(tensors):
    """The CUDA device of the tensors made current (Triton launches on the current device;
    under DistributedDataParallel a process may hold tensors of another); nothing on CPU."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


def flatten(args):
    """(tensors, floats, ints, layout) of a call's arguments: layout names each position's
    kind ("t" tensor, "f" float, "i" int, "b" bool, "n" None, "(...)" a tuple or list of
    such, IRG's (fm1, fm2, feat, out)), the values go to the list of their kind."""
    tensors, floats, ints, layout = [], [], [], []

    def walk(a):
        if isinstance(a, torch.Tensor):
            tensors.append(a)
            layout.append("t")
        elif a is None:
            layout.append("n")
        elif isinstance(a, (tuple, list)):
            layout.append("(")
            for x in a:
                walk(x)
            layout.append(")")
        elif isinstance(a, bool):
            ints.append(int(a))
            layout.append("b")
        elif isinstance(a, int):
            ints.append(a)
            layout.append("i")
        else:
            floats.append(float(a))
            layout.append("f")
    for a in args:
        walk(a)
    return tensors, floats, ints, "".join(layout)


def unflatten(tensors, floats, ints, layout):
    """The arguments flatten() took apart (tuples as tuples)."""
    it = {"t": iter(tensors), "f": iter(floats), "i": iter(ints), "b": iter(ints)}
    stack = [[]]
    for k in layout:
        if k == "(":
            stack.append([])
        elif k == ")":
            done = tuple(stack.pop())
            stack[-1].append(done)
        else:
            stack[-1].append(None if k == "n" else bool(next(it[k])) if k == "b" else next(it[k]))
    return stack[0]


@contextlib.contextmanager
def no_launches():
    """Triton launches do nothing inside the block (for fake tensors, which hold no memory;
    for fastkd.bench.host, which times the host's part of a call). Yields a list that gets
    the kernel's name at each launch."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    kinds = (JITFunction, InterpretedFunction)  # compiled, and TRITON_INTERPRET=1
    runs = [kind.run for kind in kinds]
    launched = []

    def skip(self, *args, **kwargs):
        launched.append(getattr(self, "__name__", "kernel"))
    for kind in kinds:
        kind.run = skip
    try:
        yield launched
    finally:
        for kind, run in zip(kinds, runs):
            kind.run = run


def _hint(n):
    """The size a symbolic size stands for in the call being traced (its hint)."""
    return n.node.hint if isinstance(n, torch.SymInt) else n


def register(function, saved=None):
    """Define fastkd::<Function name> and its backward for an autograd.Function of
    fastkd.autograd (forward(ctx, *args) -> one tensor).

    saved: for a Function whose backward must read what its forward saved, because an
    input changes in place between the two (CRD's memory bank): saved(*args) -> the
    (shape, dtype) of each tensor its forward saves (a None saved is returned as zeros).
    Its forward operator then returns those tensors too, and the backward operator runs
    X.backward on them instead of computing the forward again.
    """
    name = function.__name__
    schema = "(Tensor[] tensors, float[] floats, int[] ints, str layout, bool[] needs)"

    def run_forward(tensors, floats, ints, layout, needs):
        ctx = _Ctx(needs)
        with torch.no_grad(), on_device_of(tensors):
            out = function.forward(ctx, *unflatten(tensors, floats, ints, layout))
        return out.clone(), ctx

    def forward(tensors, floats, ints, layout, needs):
        out, ctx = run_forward(tensors, floats, ints, layout, needs)
        if saved is None:
            return [out]
        shapes = saved(*unflatten(tensors, floats, ints, layout))
        return [out, *(torch.zeros(shape, dtype=dtype, device=out.device) if k is None else k.clone()
                       for k, (shape, dtype) in zip(ctx.saved_tensors, shapes))]

    def backward(grad, kept, tensors, floats, ints, layout, needs):
        if saved is None:  # the forward again, for what its backward reads (saved tensors, attributes)
            _, ctx = run_forward(tensors, floats, ints, layout, needs)
        else:
            ctx = _Ctx(needs)
            ctx.saved_tensors = tuple(kept)
        with torch.no_grad(), on_device_of(tensors):
            grads = function.backward(ctx, grad)
        grads = grads if isinstance(grads, tuple) else (grads,)
        tensor_grads = [g for g, kind in zip(grads, layout) if kind == "t"]
        # A gradient for every tensor argument, zeros where none is needed: a custom operator
        # returns no None. Contiguous, in the input's dtype, as the fake below promises.
        return [torch.zeros_like(x, memory_format=torch.contiguous_format) if g is None
                else g.to(x.dtype).contiguous() for x, g in zip(tensors, tensor_grads)]

    fwd_op = torch.library.custom_op(f"fastkd::{name}", forward, mutates_args=(),
                                     schema=f"{schema} -> Tensor[]")
    bwd_op = torch.library.custom_op(f"fastkd::{name}_backward", backward, mutates_args=(),
                                     schema=f"(Tensor grad, Tensor[] kept, {schema[1:]} -> Tensor[]")

    @fwd_op.register_fake
    def _(tensors, floats, ints, layout, needs):
        # X.forward on meta tensors of the sizes at hand, outside the compiler's fake mode:
        # its launchers' arithmetic on the sizes (block sizes, grids) then adds no guard on
        # the batch size, which stays dynamic. Every fastkd loss is a 0-d tensor.
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily(), no_launches(), torch.no_grad():
            metas = [torch.empty([_hint(n) for n in x.shape], dtype=x.dtype, device="meta") for x in tensors]
            out = function.forward(_Ctx(needs), *unflatten(metas, floats, ints, layout))
        result = [tensors[0].new_empty((), dtype=out.dtype)]
        if saved is not None:
            shapes = saved(*unflatten(tensors, floats, ints, layout))
            result += [tensors[0].new_empty(shape, dtype=dtype) for shape, dtype in shapes]
        return result

    @bwd_op.register_fake
    def _(grad, kept, tensors, floats, ints, layout, needs):
        return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in tensors]

    def setup_context(ctx, inputs, output):
        tensors, floats, ints, layout, needs = inputs
        ctx.rest = (floats, ints, layout, needs)
        if saved is None:
            # Through autograd, which raises if an input is changed in place before backward
            # (the forward computed again would read the change).
            ctx.save_for_backward(*tensors)
        else:
            # Backward reads only what forward saved, and the inputs' shapes and dtypes.
            ctx.tensors = tensors
            ctx.save_for_backward(*output[1:])

    def autograd_backward(ctx, grads):
        floats, ints, layout, needs = ctx.rest
        if saved is None:
            tensors, kept = ctx.saved_tensors, ()
        else:
            tensors, kept = ctx.tensors, ctx.saved_tensors
        grad = grads[0]
        result = bwd_op(grad, list(kept), list(tensors), floats, ints, layout, needs)
        tensor_needs = [n for n, kind in zip(needs, layout) if kind == "t"]
        # One entry per input: torch.library wants None for a list of numbers, but [] for an
        # empty list (which it cannot tell from an empty list of tensors).
        return ([g if n else None for g, n in zip(result, tensor_needs)],
                *[[] if isinstance(x, list) and not x else None for x in (floats, ints, layout, needs)])

    fwd_op.register_autograd(autograd_backward, setup_context=setup_context)
    _REGISTRY[name] = (function, fwd_op)
    return fwd_op


def apply(name, *args):
    """The registered Function called name: Function.apply(*args), on the device of its
    tensor arguments; while torch.compile traces, its custom operator instead."""
    function, op = _REGISTRY[name]
    if not torch.compiler.is_compiling():
        # Backward runs on the autograd engine's thread for the device of the graph.
        with on_device_of(args):
            return function.apply(*args)
    tensors, floats, ints, layout = flatten(args)
    needs = [isinstance(a, torch.Tensor) and a.requires_grad and torch.is_grad_enabled() for a in args]
    return op(tensors, floats, ints, layout, needs)[0]
