"""FusedLinearSoftTarget: both fast paths against the materialised reference (values and
gradients), low precision against the reference's own error, memory (no (N, V) tensor),
and refused inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd import backend
from fastkd import functional as F
from fastkd.reference import fused_linear_soft_target as reference_loss
from helpers import assert_close, assert_within_reference_error

FAST = [b for b in ("torch", "triton") if b in backend.IMPLEMENTATIONS["fused_linear_soft_target"]]
REDUCTIONS = ("batchmean", "sum", "mean", "none")
TEACHERS = ("dense", "logits", "topk")


def make_problem(n, h, v, teacher, dtype=torch.float64, seed=0, k=3, ignore=0.3, bias=True, lead=None,
                 scale=1.0, ignore_index=-100):
    """(positional args, keyword args) of one call; the student's tensors require grad."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)
    lead = lead or (n,)
    h_s = randn(*lead, h).requires_grad_()
    W_s = randn(v, h, s=scale / h ** 0.5).requires_grad_()
    kw = {"student_bias": randn(v).requires_grad_() if bias else None}
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore] = ignore_index
    h_t, W_t = None, None
    if teacher == "dense":
        h_t, W_t = randn(*lead, h + 1), randn(v, h + 1, s=scale / (h + 1) ** 0.5)
        kw["teacher_bias"] = randn(v) if bias else None
    elif teacher == "logits":
        kw["teacher_logits"] = randn(*lead, v, s=scale)
    else:
        logp = torch.log_softmax(randn(*lead, v, s=scale).double(), -1)
        values, idx = logp.topk(min(k, v), -1)
        kw["teacher_topk_indices"], kw["teacher_topk_logprobs"] = idx, values.to(dtype)
    return (h_s, W_s, h_t, W_t, labels), kw


def student_grads(loss, args, kw, upstream=None):
    wrt = [args[0], args[1]] + ([kw["student_bias"]] if kw.get("student_bias") is not None else [])
    if upstream is None:
        upstream = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return torch.autograd.grad(loss, wrt, upstream)


def run(backend_name, args, kw, **options):
    with fastkd.use_backend(backend_name):
        loss = F.fused_linear_soft_target(*args, **kw, **options)
    return loss, student_grads(loss, args, kw)


@pytest.mark.parametrize("fast", FAST)
@settings(max_examples=12)
@given(n=st.integers(1, 23), h=st.integers(1, 9), v=st.integers(1, 40), teacher=st.sampled_from(TEACHERS),
       reduction=st.sampled_from(REDUCTIONS), hard_weight=st.sampled_from([0.0, 0.6]),
       T=st.sampled_from([0.5, 1.0, 4.0]), k=st.integers(1, 8), ignore=st.sampled_from([0.0, 0.4, 1.0]),
       chunk=st.sampled_from([None, 1, 3, 7]), bias=st.booleans(), seed=st.integers(0, 99))
def test_matches_the_reference_float64(fast, n, h, v, teacher, reduction, hard_weight, T, k, ignore, chunk,
                                       bias, seed):
    args, kw = make_problem(n, h, v, teacher, k=k, ignore=ignore, bias=bias, seed=seed)
    options = dict(T=T, reduction=reduction, hard_weight=hard_weight)
    ref, ref_grads = run("reference", args, kw, **options)
    out, grads = run(fast, args, kw, chunk_size=chunk, **options)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("teacher", TEACHERS)
def test_leading_dims_and_none_reduction_keep_the_token_shape(fast, teacher):
    args, kw = make_problem(0, 6, 11, teacher, lead=(2, 5))
    ref, ref_grads = run("reference", args, kw, reduction="none", hard_weight=0.5, T=2.0)
    out, grads = run(fast, args, kw, reduction="none", hard_weight=0.5, T=2.0, chunk_size=3)
    assert out.shape == (2, 5)
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


@pytest.mark.parametrize("fast", FAST)
def test_gradcheck_float64(fast):
    args, kw = make_problem(4, 3, 6, "dense", ignore=0.3, seed=3)
    h, W, h_t, W_t, labels = args
    b = kw["student_bias"]

    def f(h, W, b):
        with fastkd.use_backend(fast):
            return F.fused_linear_soft_target(h, W, h_t, W_t, labels, student_bias=b,
                                              teacher_bias=kw["teacher_bias"], T=2.0, hard_weight=0.3,
                                              reduction="none", chunk_size=3)
    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("fast", FAST)
def test_equals_soft_target_on_the_materialised_logits(fast):
    args, kw = make_problem(9, 5, 13, "dense", dtype=torch.float32, bias=False)
    h, W, h_t, W_t, _ = args
    with fastkd.use_backend(fast):
        fused = F.fused_linear_soft_target(h, W, h_t, W_t, T=3.0, chunk_size=4)
        plain = F.soft_target(h @ W.t(), h_t @ W_t.t(), 3.0)
    assert_close(fused, plain)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_tokens_ignored_gives_zero_and_zero_gradients(fast, reduction):
    args, kw = make_problem(5, 4, 7, "topk", ignore=1.0)
    out, grads = run(fast, args, kw, reduction=reduction, hard_weight=1.0)
    assert torch.all(out == 0)
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("fast", FAST)
def test_ignore_index_that_is_a_class_is_still_ignored(fast):
    args, kw = make_problem(8, 4, 7, "logits", ignore=0.5, ignore_index=2)
    ref, ref_grads = run("reference", args, kw, ignore_index=2, hard_weight=1.0)
    out, grads = run(fast, args, kw, ignore_index=2, hard_weight=1.0, chunk_size=3)
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


def _low_precision_case(dtype, teacher, seed, n=48, h=32, v=300):
    """The fast path and the reference in dtype, and the exact (float64) answer of the same
    rounded inputs: loss and gradients, each a list."""
    args, kw = make_problem(n, h, v, teacher, dtype=dtype, seed=seed, k=20, scale=4.0)
    exact_args = [a.detach().double().requires_grad_(a.requires_grad) if a is not None and a.is_floating_point()
                  else a for a in args]
    exact_kw = {n: (a.detach().double().requires_grad_(a.requires_grad)
                    if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kw.items()}
    options = dict(T=2.0, hard_weight=0.5)
    exact = run("reference", exact_args, exact_kw, **options)
    ref = run("reference", args, kw, **options)
    return exact, ref, args, kw, options


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher", TEACHERS)
def test_low_precision_within_the_reference_error(fast, dtype, teacher):
    for seed in range(2):
        exact, ref, args, kw, options = _low_precision_case(dtype, teacher, seed)
        out = run(fast, args, kw, chunk_size=16, **options)
        assert out[0].dtype == ref[0].dtype
        assert_within_reference_error(out[0], ref[0], exact[0], msg=f"{teacher} loss")
        for name, a, r, e in zip(("h", "W", "b"), out[1], ref[1], exact[1]):
            assert a.dtype == r.dtype
            assert_within_reference_error(a, r, e, msg=f"{teacher} grad {name}")


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("teacher", TEACHERS)
def test_a_vocabulary_of_more_than_a_tile_within_the_reference_error(fast, dtype, teacher):
    """V = 2,500: the Triton kernel's rows of one 2,048-class block per program (the LM-head
    tile), the second block mostly masked."""
    exact, ref, args, kw, options = _low_precision_case(dtype, teacher, 0, n=5, h=16, v=2500)
    out = run(fast, args, kw, chunk_size=3, **options)
    assert_within_reference_error(out[0], ref[0], exact[0], msg=f"{teacher} loss")
    for name, a, r, e in zip(("h", "W", "b"), out[1], ref[1], exact[1]):
        assert_within_reference_error(a, r, e, msg=f"{teacher} grad {name}")


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.most = max(self.most, x.numel())
        return out


@pytest.mark.parametrize("teacher", ["dense", "topk"])  # given logits are (N, V) themselves
def test_torch_path_never_holds_the_logits(teacher):
    n, h, v, chunk = 64, 8, 500, 4
    args, kw = make_problem(n, h, v, teacher, dtype=torch.float32)
    with fastkd.use_backend("torch"), _LargestTensor() as seen:
        loss = F.fused_linear_soft_target(*args, **kw, hard_weight=0.5, chunk_size=chunk)
        student_grads(loss, args, kw)
    inputs = max(x.numel() for x in (*args, *kw.values()) if isinstance(x, torch.Tensor))
    assert seen.most <= max(inputs, chunk * v) < n * v


@pytest.mark.parametrize("fast", FAST)
def test_inputs_unchanged_and_non_contiguous_inputs(fast):
    args, kw = make_problem(10, 6, 9, "logits")
    h, W, _, _, labels = args
    W_t = W.detach().t().contiguous().t().requires_grad_()  # column-major weight
    h_wide = torch.randn(10, 12, dtype=torch.float64)
    h_strided = h_wide[:, ::2].detach().requires_grad_()
    logits = kw["teacher_logits"].t().contiguous().t()
    before = [x.clone() for x in (h_strided, W_t, logits, labels)]
    kw = dict(kw, teacher_logits=logits)
    args = (h_strided, W_t, None, None, labels)
    ref, ref_grads = run("reference", args, kw, hard_weight=0.2)
    out, grads = run(fast, args, kw, hard_weight=0.2, chunk_size=4)
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)
    for x, y in zip((h_strided, W_t, logits, labels), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fast", FAST)
def test_teacher_gets_no_gradient_and_twice_differentiating_refuses(fast):
    args, kw = make_problem(5, 3, 6, "dense")
    h, W, h_t, W_t, labels = args
    h_t.requires_grad_()
    with fastkd.use_backend(fast):
        loss = F.fused_linear_soft_target(h, W, h_t, W_t, labels)
    (g_h,) = torch.autograd.grad(loss, h, create_graph=False, retain_graph=True)
    assert torch.autograd.grad(loss, h_t, allow_unused=True)[0] is None
    with fastkd.use_backend(fast):
        loss = F.fused_linear_soft_target(h, W, h_t, W_t, labels)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_module_matches_functional_and_has_no_state():
    module = fastkd.FusedLinearSoftTarget(2.0, reduction="sum", hard_weight=0.5, chunk_size=3)
    assert module.state_dict() == {}
    args, kw = make_problem(7, 4, 9, "topk")
    a = module(*args, **kw)
    b = F.fused_linear_soft_target(*args, **kw, T=2.0, reduction="sum", hard_weight=0.5)
    assert_close(a, b)


def test_autocast_cpu_bfloat16_takes_the_reference_dtype():
    args, kw = make_problem(12, 8, 30, "dense", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.fused_linear_soft_target(*args, **kw, hard_weight=0.5, chunk_size=5)
        ref = reference_loss.fused_linear_soft_target(*args, kw["student_bias"], kw["teacher_bias"],
                                                      hard_weight=0.5)
    assert out.dtype == ref.dtype
    grads = student_grads(out, args, kw)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    exact = reference_loss.fused_linear_soft_target(*[a.double() if a is not None and a.is_floating_point()
                                                      else a for a in args],
                                                    kw["student_bias"].double(), kw["teacher_bias"].double(),
                                                    hard_weight=0.5)
    assert_within_reference_error(out, ref, exact)


def test_compiled_function_gives_the_eager_result():
    args, kw = make_problem(6, 4, 9, "logits")

    def f(h, W):
        return F.fused_linear_soft_target(h, W, None, None, args[4], teacher_logits=kw["teacher_logits"],
                                          hard_weight=0.5, chunk_size=4)
    compiled = torch.compile(f, backend="aot_eager")
    assert_close(compiled(args[0], args[1]), f(args[0], args[1]))


def _operator_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fastkd::fused_linear")}


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fullgraph_compile_through_the_operator_gives_the_eager_loss_and_gradients(teacher, reduction):
    """Compiled, the auto backend calls fastkd::fused_linear_soft_target (fastkd.device_ops):
    one node, no graph break, the eager loss and gradients (reduction "none" through its
    backward operator); a new token count compiles once more, dynamic, and then no more."""
    torch._dynamo.reset()

    def f(args, kw):
        return F.fused_linear_soft_target(*args, **kw, T=2.0, reduction=reduction, hard_weight=0.5, chunk_size=4)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n, stance in ((7, "default"), (11, "default"), (9, "fail_on_recompile")):
        args, kw = make_problem(n, 4, 9, teacher, dtype=torch.float32, seed=n)
        expected = f(args, kw)
        expected_grads = student_grads(expected, args, kw)
        with torch.compiler.set_stance(stance):
            got = {}
            called = _operator_calls(lambda: got.update(loss=compiled(args, kw)))
        assert "fastkd::fused_linear_soft_target" in called
        assert_close(got["loss"], expected)
        for a, b in zip(student_grads(got["loss"], args, kw), expected_grads):
            assert_close(a, b)


def test_inductor_compiles_a_training_step_with_the_loss():
    """A bfloat16 LM head and its loss compiled whole by inductor, then an optimizer step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 23, bias=True)
    twin = torch.nn.Linear(8, 23, bias=True)
    twin.load_state_dict(head.state_dict())
    loss_fn = fastkd.FusedLinearSoftTarget(T=2.0, hard_weight=0.5)
    h, teacher = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 23)
    labels = torch.randint(0, 23, (2, 5))

    def step(module, hidden):
        return loss_fn(hidden, module.weight, labels=labels, student_bias=module.bias, teacher_logits=teacher)
    compiled = torch.compile(step, fullgraph=True)
    for module, fn in ((head, compiled), (twin, step)):
        fn(module, h).backward()
    for p, q in zip(head.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("fast", FAST)
def test_the_operator_runs_each_backend_s_loop_and_refuses_a_second_derivative(fast, monkeypatch):
    """The operator's cpu kernel here runs the named backend's rows (on cuda it runs the
    Triton ones): the loss and gradients of calling that backend directly; differentiated
    twice it refuses, as the Function does."""
    from fastkd import device_ops
    monkeypatch.setitem(device_ops.KERNEL_BACKENDS, "cpu", fast)
    args, kw = make_problem(6, 4, 9, "topk", dtype=torch.float32)
    options = {"T": 2.0, "hard_weight": 0.5, "chunk_size": 4}
    for reduction in ("batchmean", "none"):
        expected, expected_grads = run(fast, args, kw, reduction=reduction, **options)
        loss = device_ops.call("fused_linear_soft_target", *args, kw["student_bias"], None, None,
                               kw["teacher_topk_indices"], kw["teacher_topk_logprobs"], 2.0, reduction, -100, 0.5, 4)
        assert _operator_calls(lambda: device_ops.call(
            "fused_linear_soft_target", *args, kw["student_bias"], None, None, kw["teacher_topk_indices"],
            kw["teacher_topk_logprobs"], 2.0, reduction, -100, 0.5, 4)) == {"fastkd::fused_linear_soft_target"}
        assert_close(loss, expected)
        for a, b in zip(student_grads(loss, args, kw), expected_grads):
            assert_close(a, b)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss.sum(), args[0], create_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the operator compiled on CUDA: torch sees no CUDA GPU "
                    "here (benchmarks/gpu.sh runs it on one)")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compiled_on_cuda_through_the_operator(reduction):
    """Compiled on CUDA the operator's cuda kernel runs the Triton rows kernel: the loss and
    gradients of the eager Triton path, bfloat16 inputs included."""
    for dtype in (torch.float32, torch.bfloat16):
        args, kw = make_problem(37, 16, 300, "dense", dtype=dtype)
        args = [x.detach().cuda().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                for x in args]
        kw = {k: x.detach().cuda().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for k, x in kw.items()}

        def f(args, kw):
            return F.fused_linear_soft_target(*args, **kw, T=2.0, reduction=reduction, hard_weight=0.5,
                                              chunk_size=8)
        expected = f(args, kw)
        expected_grads = student_grads(expected, args, kw)
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True)(args, kw)
        assert got.dtype == expected.dtype
        assert_close(got, expected)
        for a, b in zip(student_grads(got, args, kw), expected_grads):
            assert_close(a, b)


def test_export_through_the_operator():
    args, kw = make_problem(6, 4, 9, "dense", dtype=torch.float32)

    class Loss(torch.nn.Module):
        def forward(self, h, W, h_t, W_t, labels):
            return F.fused_linear_soft_target(h, W, h_t, W_t, labels, T=2.0, hard_weight=0.5)
    exported = torch.export.export(Loss(), tuple(args))
    assert "fastkd.fused_linear_soft_target" in str(exported.graph)
    assert_close(exported.module()(*args), Loss()(*args))


# --- refused inputs ---------------------------------------------------------------

def _call(**changes):
    args, kw = make_problem(4, 3, 6, "dense")
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
    call = dict(zip(names, args), **kw)
    call.update(changes)
    return F.fused_linear_soft_target(**call)


@pytest.mark.parametrize("changes, error, match", [
    (dict(teacher_weight=torch.randn(7, 4, dtype=torch.float64), teacher_bias=None), ValueError,
     "vocabularies must match"),
    (dict(student_weight=torch.randn(6, 5, dtype=torch.float64)), ValueError, "student_weight must be"),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, "exactly one way"),
    (dict(teacher_logits=torch.randn(4, 6, dtype=torch.float64)), ValueError, "exactly one way"),
    (dict(teacher_weight=None), ValueError, "come together"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None,
          teacher_topk_indices=torch.tensor([[0], [1], [6], [2]]),
          teacher_topk_logprobs=torch.zeros(4, 1, dtype=torch.float64)), ValueError, r"teacher_topk_indices values"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None,
          teacher_topk_indices=torch.zeros(4, 7, dtype=torch.long),
          teacher_topk_logprobs=torch.zeros(4, 7, dtype=torch.float64)), ValueError, "more than the vocabulary"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None,
          teacher_topk_indices=torch.zeros(4, 2), teacher_topk_logprobs=torch.zeros(4, 2, dtype=torch.float64)),
     TypeError, "teacher_topk_indices must have an integer dtype"),
    (dict(labels=torch.tensor([0, 1, 6, -100])), ValueError, r"labels values must lie in \[0, 6\)"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels must have shape"),
    (dict(labels=None, hard_weight=1.0), ValueError, "hard_weight > 0 needs labels"),
    (dict(student_weight=torch.randn(6, 3, dtype=torch.float32)), TypeError, "must have one dtype"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(T=0.0), ValueError, "T must be > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(teacher_hidden=torch.randn(5, 4, dtype=torch.float64)), ValueError, "teacher_hidden must have shape"),
])
def test_bad_input_is_refused_clearly(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


class _MatrixProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_without_grad_mode():
    args, kw = make_problem(12, 4, 9, "dense")
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), fastkd.use_backend("torch"), _MatrixProducts() as seen:
            F.fused_linear_soft_target(*args, **kw, chunk_size=4)
        counts.append(seen.count)
    assert counts == [3 * 4, 3 * 2]  # per chunk: both logits, then dh and dW only with grad


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["offset", "huge", "tiny", "dead", "near-teacher"])
@pytest.mark.parametrize("teacher", TEACHERS)
def test_adversarial_logits_within_the_reference_error(fast, dtype, kind, teacher):
    """Logits with a large common offset (bias 3e3), saturated softmaxes (scale 300), near-
    uniform ones (scale 1e-3), dead rows (zero hidden states), and a student nearly equal
    to the teacher (a KL near 0): loss and gradients within the reference's own error."""
    scale = {"huge": 300.0, "tiny": 1e-3}.get(kind, 4.0)
    args, kw = make_problem(24, 16, 120, teacher, dtype=torch.float64, seed=5, k=10, scale=scale)
    h, W, h_t, W_t, labels = args
    if kind == "offset":
        kw["student_bias"] = (kw["student_bias"] + 3e3).detach().requires_grad_()
    if kind == "dead":
        h = h.detach().clone()
        h[::3] = 0
        h.requires_grad_()
    if kind == "near-teacher" and teacher == "logits":
        noise = 1e-3 * torch.randn(24, 120, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        kw["teacher_logits"] = (h @ W.t() + kw["student_bias"] + noise).detach()
    args = (h, W, h_t, W_t, labels)
    low = lambda x: x.detach().to(dtype).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) \
        and x.is_floating_point() else x  # noqa: E731
    args_low, kw_low = [low(a) for a in args], {n: low(a) for n, a in kw.items()}
    # The exact answer for the rounded inputs: float64 of the dtype's values.
    exact = run("reference", [a.double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                              and a.is_floating_point() else a for a in args_low],
                {n: (a.double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a) for n, a in kw_low.items()}, T=2.0, hard_weight=0.5)
    ref = run("reference", args_low, kw_low, T=2.0, hard_weight=0.5)
    out = run(fast, args_low, kw_low, T=2.0, hard_weight=0.5, chunk_size=7)
    assert torch.isfinite(out[0]) or not torch.isfinite(ref[0])
    assert_within_reference_error(out[0], ref[0], exact[0], msg=f"{kind} loss")
    for name, a, r, e in zip(("h", "W", "b"), out[1], ref[1], exact[1]):
        assert_within_reference_error(a, r, e, msg=f"{kind} grad {name}")


@pytest.mark.parametrize("fast", FAST)
def test_gradients_are_scaled_in_place_once_and_a_second_backward_refuses(fast):
    """The gradients made in the forward are scaled by the upstream gradient in place (no
    second dW at the peak): the result is the reference's times the upstream gradient, and
    backpropagating the same graph again raises rather than scaling twice."""
    args, kw = make_problem(6, 4, 9, "dense")
    h, W = args[0], args[1]
    with fastkd.use_backend(fast):
        loss = F.fused_linear_soft_target(*args, **kw, hard_weight=0.5)
    ref = reference_loss.fused_linear_soft_target(*args, **kw, hard_weight=0.5)
    g = torch.tensor(3.0, dtype=loss.dtype)
    got = torch.autograd.grad(loss, (h, W), g, retain_graph=True)
    expected = torch.autograd.grad(ref, (h, W), g)
    for a, b in zip(got, expected):
        assert_close(a, b)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        torch.autograd.grad(loss, (h, W), g)
