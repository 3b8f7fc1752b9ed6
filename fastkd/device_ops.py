"""Each fused loss as one PyTorch custom operator, ``torch.ops.fastkd.<op>``, whose
implementation PyTorch's dispatcher picks by the tensors' device.

For every op of fastkd.backend.IMPLEMENTATIONS except EXCEPTIONS and FusedLinearSoftTarget
(whose operator, at the end of this file, has its own signature), ``fastkd::<op>`` has

  cpu kernel   the ``torch`` backend (fastkd/torch_backend);
  cuda kernel  the ``triton`` backend (fastkd.autograd's Functions over fastkd/kernels), or
               the torch one where triton is not installed;
  fake         the result's dtype (the reference's, found on fake tensors once per dtypes),
               and the gradients' shapes: for torch.compile and torch.export;
  autograd     dL/dx = grad * G_x, with G_x computed by the kernel (below).

Signature: fastkd::<op>(x0, ..., x(n-1), floats, ints, layout, needs) -> (L, G_x0, ...,
G_x(n-1)): the op's arguments flattened (fastkd.ops.flatten; IRG's tuples too), the
tensors one argument each (None after the last one given), needs[i] whether xi needs a
gradient, G_xi an empty tensor where it does not. Every loss L is a 0-d tensor, so its
gradient is G_x = dL/dx at grad_output 1 times the grad_output: the kernel runs the
implementation's forward and its backward (torch.autograd.grad, so the Triton Functions'
hand-written backwards on CUDA) in one call, and backward only scales G_x. Nothing is
computed twice; G_x is held from forward to backward instead of what the implementation
would save (its statistics; the inputs are saved too, for a second derivative, so autograd
raises if one is changed in place before backward), and is computed even if no backward
follows. The gradient formula is first order: differentiated again (create_graph=True,
eagerly), the backward differentiates the implementation itself, which gives its second
derivatives or its own clear refusal (fastkd.common.first_order).

Where fastkd calls them (fastkd.functional, the ``auto`` backend, the default): compiled
(torch.compile, torch.export) on CUDA tensors. There the operator is one opaque node that
runs the Triton kernels' forward and hand-written backward once each (fastkd.ops'
per-Function operators, which the named ``triton`` backend compiles to, run the forward
again in backward), and a graph exported on one device runs on the other, the dispatcher
picking the kernel. Elsewhere the auto backend calls the implementation the operator's
kernel would run, directly: eagerly, the operator's Python layers and second autograd pass
cost 0.03-0.2 ms per call on the CPU; compiled on the CPU, the traced torch path is code
inductor fuses, 1.5-6.5x faster than the operator running it eagerly (README, torch.compile
and torch.export). OPERATOR_ROUTES holds this choice; tests widen it to run the operators
on CPU tensors. Compiled inside an autocast block the operators serve on the CPU too (see
routes). FusedLinearSoftTarget's operator (the end of this file), FusedLinearDistillation's and
generalized_jsd_loss's are called compiled on either device (FUSED_LINEAR_ROUTES): their chunk
loop, called directly, is a graph break. A named backend
(``use_backend("torch" | "triton" | "reference")``) always calls that backend's function.
"""
import contextlib
import functools

import torch

from . import backend, chunked_linear
from .common import second_order_error
from .ops import flatten, on_device_of, unflatten
from .torch_backend import fused_linear as torch_fused_linear

# Not operators: Sobolev and LwM differentiate the network inside the loss
# (torch.autograd.grad of its outputs, create_graph=True), which an operator's inputs
# cannot carry; CRD's memory bank changes in place between its loss and backward (the
# module's state, fastkd.ops keeps what its forward saved).
EXCEPTIONS = ("sobolev", "lwm", "crd_contrast")

# FusedLinearSoftTarget has an operator of its own (the end of this file): a loss per token
# with reduction="none", gradients it makes itself, and the reference's arguments as they are.
FUSED_LINEAR = "fused_linear_soft_target"

# op -> how many tensors its arguments hold at most (IRG's edge and transformation take two
# (fm1, fm2, feat, out)): the ops with the operator of _register.
TENSOR_ARGUMENTS = {op: 2 for op in backend.IMPLEMENTATIONS if op not in EXCEPTIONS and op != FUSED_LINEAR}
TENSOR_ARGUMENTS.update(fsp=4, vid=3, afd=3, irg_edge=8, irg_transformation=8)

# Device type -> the backend its kernel runs.
KERNEL_BACKENDS = {"cpu": "torch", "cuda": "triton" if backend.autograd is not None else "torch"}

_OPERATORS = {}  # op -> its custom operator
_DTYPES = {}  # (op, layout, input dtypes) -> the loss's dtype


def operator(op):
    """torch.ops.fastkd.<op>, or None for an op that has none."""
    return _OPERATORS.get(op)


# (device type, compiling) where the auto backend calls the operators (see above).
OPERATOR_ROUTES = {("cuda", True)}
# And FusedLinearSoftTarget's: compiled on every device. Called directly, its chunk loop
# runs eagerly behind a graph break; its operator is one node, the loop inside it.
FUSED_LINEAR_ROUTES = {("cpu", True), ("cuda", True)}


def routes(op, device, name):
    """Whether the auto backend calls op's operator for tensors on device, name being the
    backend it resolved to (the operator's kernel there runs that backend)."""
    compiling = torch.compiler.is_compiling()
    where = FUSED_LINEAR_ROUTES if op == FUSED_LINEAR else OPERATOR_ROUTES
    # Compiled inside an autocast block, AOTAutograd traces the backward of the traced torch
    # path with autocast on (the forward's ambient state, though that forward ran with it
    # off), so its matrix products would be cast down; the operator's kernel computes the
    # gradients with autocast off.
    autocast = compiling and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
    return (op in _OPERATORS and ((device.type, compiling) in where or autocast)
            and KERNEL_BACKENDS.get(device.type) == name)


def call(op, *args):
    """The loss op(*args) through its operator: L, with autograd's gradient formula."""
    if op == FUSED_LINEAR:
        return _call_fused_linear(*args)
    tensors, floats, ints, layout = flatten(args)
    grad = torch.is_grad_enabled()
    needs = [grad and x.requires_grad for x in tensors]
    unused = [None] * (TENSOR_ARGUMENTS[op] - len(tensors))
    return _OPERATORS[op](*tensors, *unused, floats, ints, layout, needs)[0]


# The dispatch keys of autocast (one per device type), as the bits of a DispatchKeySet.
_AUTOCAST_KEYS = functools.reduce(
    lambda keys, name: keys.add(getattr(torch._C.DispatchKey, name)),
    [k for k in dir(torch._C.DispatchKey) if k.startswith("Autocast")],
    torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)).raw_repr()


@contextlib.contextmanager
def _autograd_on():
    """torch.autograd inside a kernel. The dispatcher calls an operator's device kernels
    below autograd (autograd's dispatch keys, and under a dispatch mode such as the one a
    compiled graph's first call runs in, every key above the device's, are excluded in
    this thread), so the implementation's ops would record no graph. In the block, no
    key is excluded but autocast's (kept as they are: excluded where autocast is off), as
    in a call from Python, and grad mode is on."""
    exclude = torch._C._dispatch_tls_local_exclude_set().raw_repr() & _AUTOCAST_KEYS
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         torch._C.DispatchKeySet.from_raw_repr(exclude)), \
            torch.enable_grad():
        yield


def _loss_and_gradients(impl, n, tensors, floats, ints, layout, needs):
    """(L, then for each of the n tensor arguments: dL/dx where x needs a gradient, else an
    empty tensor) of impl; no graph is kept."""
    if not any(needs):
        with torch.no_grad():
            loss = impl(*unflatten(tensors, floats, ints, layout)).detach()
        return (loss, *(loss.new_empty(0) for _ in range(n)))
    with _autograd_on():
        leaves = [x.detach().requires_grad_(need) for x, need in zip(tensors, needs)]
        loss = impl(*unflatten(leaves, floats, ints, layout))
        grads = iter(torch.autograd.grad(loss, [x for x, need in zip(leaves, needs) if need], allow_unused=True,
                                         materialize_grads=True))
    # Contiguous, as the fake promises (the identity where a gradient is contiguous already).
    return (loss.detach(), *(next(grads).contiguous() if need else x.new_empty(0) for x, need in zip(tensors, needs)),
            *(loss.new_empty(0) for _ in range(n - len(tensors))))


def _split(args):
    """(tensors, floats, ints, layout, needs) of an operator call's arguments: the tensors
    given (those after them are None: IRG's terms called with fewer)."""
    *tensors, floats, ints, layout, needs = args
    return tensors[:len(needs)], floats, ints, layout, needs


def _kernel(op, n, device_type):
    def kernel(*args):
        # Looked up at each call, so that a test's replacement of either entry runs.
        impl = backend.IMPLEMENTATIONS[op][KERNEL_BACKENDS[device_type]]
        return _loss_and_gradients(impl, n, *_split(args))
    return kernel


def _hint(n):
    """The size a symbolic size stands for in the call being traced (its hint)."""
    return n.node.hint if isinstance(n, torch.SymInt) else n


def _loss_dtype(op, tensors, floats, ints, layout):
    """The reference's result dtype for these inputs (every backend's, tests/test_result_dtype.py),
    found by running it on fake tensors of the sizes at hand, outside the compiler's fake
    mode (so it adds no guard on the sizes); once per input dtypes."""
    key = (op, layout, tuple(x.dtype for x in tensors))
    if key not in _DTYPES:
        from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        with unset_fake_temporarily(), FakeTensorMode(shape_env=ShapeEnv()), torch.no_grad():
            fakes = [torch.empty([_hint(n) for n in x.shape], dtype=x.dtype) for x in tensors]
            _DTYPES[key] = backend.IMPLEMENTATIONS[op]["reference"](*unflatten(fakes, floats, ints, layout)).dtype
    return _DTYPES[key]


def _register(op, n):
    """fastkd::<op> for an op of n tensor arguments. Each tensor is an argument of its own
    (not a Tensor[]): torch.library's autograd wrapper walks lists with pytree, several
    times the cost of a small loss."""
    tensors = ", ".join(f"Tensor? x{i}" for i in range(n))
    schema = (f"({tensors}, float[] floats, int[] ints, str layout, bool[] needs) -> "
              f"({', '.join(['Tensor'] * (n + 1))})")
    operator = torch.library.custom_op(f"fastkd::{op}", _kernel(op, n, "cpu"), mutates_args=(),
                                       device_types="cpu", schema=schema)
    operator.register_kernel("cuda", _kernel(op, n, "cuda"))

    @operator.register_fake
    def _(*args):
        tensors, floats, ints, layout, needs = _split(args)
        loss = tensors[0].new_empty((), dtype=_loss_dtype(op, tensors, floats, ints, layout))
        return (loss, *(x.new_empty(x.shape if need else (0,)) for x, need in zip(tensors, needs)),
                *(loss.new_empty(0) for _ in range(n - len(tensors))))

    def setup_context(ctx, inputs, output):
        tensors, floats, ints, layout, needs = _split(inputs)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.rest = (floats, ints, layout, needs)
        ctx.save_for_backward(*tensors, *output[1:len(tensors) + 1])

    def backward(ctx, grad, *_):
        floats, ints, layout, needs = ctx.rest
        saved, m = ctx.saved_tensors, len(needs)
        tensors, gradients = saved[:m], saved[m:]
        if grad is None:
            result = [None] * m
        elif torch.is_grad_enabled() and not torch.compiler.is_compiling():
            result = _differentiable_gradients(op, tensors, floats, ints, layout, needs, grad)
        else:
            result = [(g * grad).to(x.dtype) if need else None for x, g, need in zip(tensors, gradients, needs)]
        return (*result, *[None] * (n - m + 4))

    operator.register_autograd(backward, setup_context=setup_context)
    _OPERATORS[op] = operator


def _differentiable_gradients(op, tensors, floats, ints, layout, needs, grad):
    """grad * dL/dx with a graph (create_graph=True): the implementation the kernel runs,
    differentiated again on the inputs as saved (connected to their graphs)."""
    impl = backend.IMPLEMENTATIONS[op][KERNEL_BACKENDS[tensors[0].device.type]]
    loss = impl(*unflatten(list(tensors), floats, ints, layout))
    wrt = [x for x, n in zip(tensors, needs) if n]
    grads = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True, allow_unused=True,
                                     materialize_grads=True))
    return [next(grads) if n else None for n in needs]


for _op, _n in TENSOR_ARGUMENTS.items():
    _register(_op, _n)


# --- FusedLinearSoftTarget ------------------------------------------------------------
#
# fastkd::fused_linear_soft_target(the reference's arguments, chunk_size 0 for the default,
# needs) -> (L, G_hidden, G_weight, G_bias): the chunk loop of fastkd.chunked_linear over
# the rows function of the kernel's backend (fastkd/torch_backend/fused_linear.py on the
# cpu, fastkd/kernels/fused_linear.py on cuda). needs: whether student_hidden,
# student_weight and student_bias need a gradient. With a scalar reduction the loop makes
# the gradients of L (for a unit upstream gradient) as it goes, and backward scales them,
# as the loss's Function does eagerly, but out of place: compiled, a backward holds a second
# copy of each gradient (dW, V x H) while it scales it. With reduction="none" the upstream
# gradient weighs each token, and backward runs the loop again with it,
# fastkd::fused_linear_soft_target_backward(grad, the same arguments) -> (G_hidden,
# G_weight, G_bias). First order only, as the Function.

_FUSED_LINEAR_ARGUMENTS = (
    "Tensor student_hidden, Tensor student_weight, Tensor? teacher_hidden, Tensor? teacher_weight, "
    "Tensor? labels, Tensor? student_bias, Tensor? teacher_bias, Tensor? teacher_logits, "
    "Tensor? teacher_topk_indices, Tensor? teacher_topk_logprobs, float T, str reduction, "
    "int ignore_index, float hard_weight, int chunk_size, bool[] needs")
_FUSED_LINEAR_TENSORS = 10  # the arguments before T
_STUDENT = (0, 1, 5)  # student_hidden, student_weight, student_bias: the arguments with a gradient

_ROWS = {"torch": torch_fused_linear.linear_kl_rows}
# The rows of FusedLinearDistillation's divergences on a dense teacher, by backend.
_DIVERGENCE_ROWS = {"torch": torch_fused_linear.linear_kl_rows}
if backend.autograd is not None:
    from .kernels import fused_linear as _kernels_fused_linear
    _ROWS["triton"] = _kernels_fused_linear.linear_kl_rows
    _DIVERGENCE_ROWS["triton"] = _kernels_fused_linear.linear_divergence_rows

# FusedLinearDistillation's operator, fastkd::fused_linear_distillation: FusedLinearSoftTarget's
# with the divergence's arguments before needs (its backward likewise), the same kernels over
# the backend's rows for that divergence (chunked_linear.DivergenceRows).
FUSED_LINEAR_DISTILLATION = "fused_linear_distillation"
_DIVERGENCE_ARGUMENTS = ("str divergence", "float beta", "float alpha", "str topk_rest")


def _call_fused_linear(*args):
    """fused_linear_soft_target(the reference's arguments) through its operator."""
    *tensors, T, reduction, ignore_index, hard_weight, chunk_size = args
    grad = torch.is_grad_enabled()
    needs = [grad and tensors[i] is not None and tensors[i].requires_grad for i in _STUDENT]
    return _OPERATORS[FUSED_LINEAR](*tensors, T, reduction, ignore_index, hard_weight, chunk_size or 0, needs)[0]


def call_fused_linear_distillation(spec, *args):
    """fused_linear_distillation(spec, FusedLinearSoftTarget's reference arguments) through its
    operator; spec a chunked_linear.Divergence."""
    *tensors, T, reduction, ignore_index, hard_weight, chunk_size = args
    grad = torch.is_grad_enabled()
    needs = [grad and tensors[i] is not None and tensors[i].requires_grad for i in _STUDENT]
    return _OPERATORS[FUSED_LINEAR_DISTILLATION](*tensors, T, reduction, ignore_index, hard_weight,
                                                 chunk_size or 0, *spec, needs)[0]


def _rows(device_type, divergence):
    """The rows function of the kernel's backend: FusedLinearSoftTarget's, or with divergence
    (the operator's divergence arguments, a chunked_linear.Divergence's fields) theirs."""
    name = KERNEL_BACKENDS[device_type]
    if not divergence:
        return _ROWS[name]
    return chunked_linear.DivergenceRows(chunked_linear.divergence(*divergence), _DIVERGENCE_ROWS[name], _ROWS[name])


def _prepared(args):
    """(h, W, b, teacher, row labels, kept, the loss's dtype, the leading dims, T, reduction,
    hard_weight, chunk) of an operator call's arguments, for fastkd.chunked_linear's loop."""
    (student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
     teacher_logits, topk_indices, topk_logprobs, T, reduction, ignore_index, hard_weight, chunk_size) = args
    h, teacher, row_labels, kept, out_dtype, lead = chunked_linear.prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        teacher_logits, topk_indices, topk_logprobs, ignore_index, hard_weight)
    chunk = chunk_size or chunked_linear.default_chunk(h.shape[0], student_weight.shape[0], h.device)
    return h, student_weight, student_bias, teacher, row_labels, kept, out_dtype, lead, T, reduction, hard_weight, chunk


def _gradients_out(args, grads, needs):
    """The operator's gradient outputs: G_hidden shaped like student_hidden, an empty tensor
    for an argument that needs none."""
    out = []
    for i, g, need in zip(_STUDENT, grads, needs):
        out.append(g.reshape(args[i].shape) if need and g is not None else args[0].new_empty(0))
    return out


def _split_divergence(args, extra):
    """(FusedLinearSoftTarget's arguments, the divergence's, needs) of an operator's arguments
    with extra divergence arguments."""
    *args, needs = args
    return args[:len(args) - extra], args[len(args) - extra:], needs


def _fused_linear_kernel(device_type, extra=0):
    def kernel(*args):
        args, divergence, needs = _split_divergence(args, extra)
        rows = _rows(device_type, divergence)
        with on_device_of(args):
            h, W, b, teacher, labels, kept, out_dtype, lead, T, reduction, hard_weight, chunk = _prepared(args)
            per_row, grads = chunked_linear.losses_and_gradients(h, W, b, rows, teacher, labels, kept, T,
                                                                 hard_weight, reduction, chunk, needs)
        loss = per_row.to(out_dtype).reshape(lead) if reduction == "none" else per_row.sum().to(out_dtype)
        return (loss, *_gradients_out(args, grads, needs if reduction != "none" else (False,) * 3))
    return kernel


def _fused_linear_backward_kernel(device_type, extra=0):
    def kernel(grad, *args):
        args, divergence, needs = _split_divergence(args, extra)
        rows = _rows(device_type, divergence)
        with on_device_of(args):
            h, W, b, teacher, labels, kept, _, _, T, _, hard_weight, chunk = _prepared(args)
            grads = chunked_linear.weighted_gradients(h, W, b, rows, teacher, labels, kept, T, hard_weight, chunk,
                                                      grad.reshape(-1), needs)
        return tuple(_gradients_out(args, grads, needs))
    return kernel


def _register_fused_linear(op=FUSED_LINEAR, divergence=()):
    """op's forward and backward operators; divergence: the schema of its arguments beyond
    FusedLinearSoftTarget's, before needs."""
    extra = len(divergence)
    arguments = _FUSED_LINEAR_ARGUMENTS.replace(", bool[] needs", "".join(f", {a}" for a in divergence)
                                                + ", bool[] needs")
    forward = torch.library.custom_op(
        f"fastkd::{op}", _fused_linear_kernel("cpu", extra), mutates_args=(), device_types="cpu",
        schema=f"({arguments}) -> (Tensor, Tensor, Tensor, Tensor)")
    forward.register_kernel("cuda", _fused_linear_kernel("cuda", extra))
    backward_op = torch.library.custom_op(
        f"fastkd::{op}_backward", _fused_linear_backward_kernel("cpu", extra), mutates_args=(),
        device_types="cpu", schema=f"(Tensor grad, {arguments}) -> (Tensor, Tensor, Tensor)")
    backward_op.register_kernel("cuda", _fused_linear_backward_kernel("cuda", extra))

    def fake_gradients(args, needs):
        return [args[i].new_empty(args[i].shape) if need else args[0].new_empty(0) for i, need in zip(_STUDENT, needs)]

    @forward.register_fake
    def _(*args):
        args, _, needs = _split_divergence(args, extra)
        # The loss's dtype and leading dims (the chunk size, which would guard on the tokens, not).
        *tensors, _, reduction, ignore_index, hard_weight, _ = args
        *_, out_dtype, lead = chunked_linear.prepare(*tensors, ignore_index, hard_weight)
        loss = args[0].new_empty(lead if reduction == "none" else (), dtype=out_dtype)
        return (loss, *fake_gradients(args, needs if reduction != "none" else (False,) * 3))

    @backward_op.register_fake
    def _(grad, *args):
        args, _, needs = _split_divergence(args, extra)
        return tuple(fake_gradients(args, needs))

    def setup_context(ctx, inputs, output):
        *args, needs = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.rest = (args[_FUSED_LINEAR_TENSORS:], needs)
        ctx.save_for_backward(*args[:_FUSED_LINEAR_TENSORS], *output[1:])

    def backward(ctx, grad, *_):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise second_order_error(op)
        rest, needs = ctx.rest
        saved = ctx.saved_tensors
        tensors, gradients = saved[:_FUSED_LINEAR_TENSORS], saved[_FUSED_LINEAR_TENSORS:]
        if grad is None:
            result = [None] * 3
        elif rest[1] != "none":  # reduction
            result = [(g * grad).to(g.dtype) if need else None for g, need in zip(gradients, needs)]
        else:
            out = backward_op(grad, *tensors, *rest, needs)
            result = [g if need else None for g, need in zip(out, needs)]
        grads = [None] * (len(tensors) + len(rest) + 1)
        for i, g in zip(_STUDENT, result):
            grads[i] = g
        return tuple(grads)

    forward.register_autograd(backward, setup_context=setup_context)
    _OPERATORS[op] = forward


_register_fused_linear()
_register_fused_linear(FUSED_LINEAR_DISTILLATION, _DIVERGENCE_ARGUMENTS)


# generalized_jsd_loss's operator: fastkd::generalized_jsd(student_logits, teacher_logits,
# labels, beta, temperature, need) -> (S, G): S the sum over the kept tokens of T^2 jsd at
# T = temperature (fastkd.chunked_linear.on_logits over the kernel's backend's rows), G = dS
# / d student_logits (an empty tensor without need). Its backward scales G; generalized_jsd_loss
# divides S by T^2 and by its reduction's count outside, as it does eagerly.
GENERALIZED_JSD = "generalized_jsd"


def _generalized_jsd_kernel(device_type):
    def kernel(student_logits, teacher_logits, labels, beta, temperature, need):
        rows = _rows(device_type, chunked_linear.divergence("jsd", beta, 0.0))
        with on_device_of((student_logits, teacher_logits)):
            total, grad = chunked_linear.on_logits(rows, student_logits, teacher_logits, labels, temperature, need)
        return total, grad if need else student_logits.new_empty(0)
    return kernel


def _register_generalized_jsd():
    forward = torch.library.custom_op(
        f"fastkd::{GENERALIZED_JSD}", _generalized_jsd_kernel("cpu"), mutates_args=(), device_types="cpu",
        schema="(Tensor student_logits, Tensor teacher_logits, Tensor? labels, float beta, float temperature, "
               "bool need) -> (Tensor, Tensor)")
    forward.register_kernel("cuda", _generalized_jsd_kernel("cuda"))

    @forward.register_fake
    def _(student_logits, teacher_logits, labels, beta, temperature, need):
        total = student_logits.new_empty((), dtype=torch.promote_types(student_logits.dtype, teacher_logits.dtype))
        return total, student_logits.new_empty(student_logits.shape if need else (0,))

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])

    def backward(ctx, grad, _):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise second_order_error("generalized_jsd_loss")
        (g,) = ctx.saved_tensors
        return None if grad is None else g * grad.to(g.dtype), None, None, None, None, None

    forward.register_autograd(backward, setup_context=setup_context)
    _OPERATORS[GENERALIZED_JSD] = forward


def call_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """The sum over the kept tokens of T^2 jsd at T (fastkd.chunked_linear.on_logits) through
    fastkd::generalized_jsd."""
    need = torch.is_grad_enabled() and student_logits.requires_grad
    return _OPERATORS[GENERALIZED_JSD](student_logits, teacher_logits, labels, float(beta), float(temperature),
                                      need)[0]


_register_generalized_jsd()
