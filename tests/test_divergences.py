"""FusedLinearDistillation and generalized_jsd_loss: every divergence x teacher form x
reduction against the materialised reference (fastkd/reference/divergences.py) in float64,
loss and gradients; low precision against the reference's own error; "kl" is
FusedLinearSoftTarget; TRL's own generalized_jsd_loss where trl imports; Liger-Kernel's JSD,
fused linear JSD, TVD and KL where liger_kernel imports; refused arguments.
Small shapes throughout: the Triton runs go through the interpreter."""
import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import backend
from fastkd import functional as F
from fastkd.reference import divergences as R
from helpers import assert_close, assert_within_reference_error
from test_fused_linear import _LargestTensor, make_problem, student_grads

FAST = [b for b in ("torch", "triton") if b in backend.IMPLEMENTATIONS["fused_linear_soft_target"]]
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# (teacher form, topk_rest): a dense teacher given by its head or by its logits, a top-k one
# under each convention for the mass outside its k classes.
TEACHERS = (("dense", "renormalise"), ("logits", "renormalise"), ("topk", "renormalise"), ("topk", "bucket"))
OPTIONS = dict(T=2.0, beta=0.3, alpha=0.2, hard_weight=0.5)


def _skip_infinite(divergence, teacher, rest):
    if teacher == "topk" and rest == "renormalise" and divergence == "reverse_kl":
        pytest.skip("reverse KL against a renormalised top-k teacher is infinite (refused, tested below)")


def run(backend_name, args, kw, **options):
    with fastkd.use_backend(backend_name):
        loss = F.fused_linear_distillation(*args, **kw, **options)
    return loss, student_grads(loss, args, kw)


def assert_matches(out, grads, ref, ref_grads, msg):
    assert out.dtype == ref.dtype and out.shape == ref.shape, msg
    assert_close(out, ref, msg=msg)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, msg=msg)


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("teacher,rest", TEACHERS)
def test_torch_path_matches_the_reference_float64(divergence, teacher, rest):
    _skip_infinite(divergence, teacher, rest)
    for i, reduction in enumerate(REDUCTIONS):
        args, kw = make_problem(7, 4, 11, teacher, k=4, seed=i, ignore=0.3 if i % 2 else 0.0)
        options = dict(OPTIONS, divergence=divergence, topk_rest=rest, reduction=reduction)
        ref, ref_grads = run("reference", args, kw, **options)
        out, grads = run("torch", args, kw, chunk_size=3, **options)
        assert_matches(out, grads, ref, ref_grads, f"{divergence} {teacher} {rest} {reduction}")


@settings(max_examples=10)
@given(n=st.integers(1, 9), v=st.integers(1, 12), teacher=st.sampled_from(TEACHERS),
       divergence=st.sampled_from(R.DIVERGENCES), reduction=st.sampled_from(REDUCTIONS),
       T=st.sampled_from([0.5, 1.0, 3.0]), k=st.integers(1, 12), ignore=st.sampled_from([0.0, 0.5, 1.0]),
       chunk=st.sampled_from([None, 1, 4]), bias=st.booleans(), mix=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 99))
def test_torch_path_matches_the_reference_on_random_problems(n, v, teacher, divergence, reduction, T, k, ignore,
                                                             chunk, bias, mix, seed):
    """Sizes down to one token and one class, k up to V (an empty bucket), every token
    ignored, beta and alpha at their ends."""
    teacher, rest = teacher
    if teacher == "topk" and rest == "renormalise" and (
            divergence == "reverse_kl" or (divergence == "jsd" and mix == 1.0)
            or (divergence == "skew_reverse_kl" and mix == 0.0)):
        rest = "bucket"
    args, kw = make_problem(n, 3, v, teacher, k=min(k, v), ignore=ignore, bias=bias, seed=seed)
    options = dict(divergence=divergence, topk_rest=rest, reduction=reduction, T=T, beta=mix, alpha=mix,
                   hard_weight=0.5)
    ref, ref_grads = run("reference", args, kw, **options)
    out, grads = run("torch", args, kw, chunk_size=chunk, **options)
    assert_matches(out, grads, ref, ref_grads, f"{options}")


@pytest.mark.skipif("triton" not in FAST, reason="the triton backend is not installed")
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_triton_kernels_match_the_reference_float64(divergence):
    """Through the interpreter on CPU tensors (a GPU where one runs the suite): the dense
    rows kernel on a teacher's logits with the hard term, then a top-k teacher (the plain
    rows kernel and the shared top-k step), tiny shapes."""
    cases = [("logits", "renormalise", "batchmean"), ("topk", "bucket", "none")]
    if divergence != "reverse_kl":
        cases.append(("topk", "renormalise", "mean"))
    for i, (teacher, rest, reduction) in enumerate(cases):
        args, kw = make_problem(5, 3, 11, teacher, k=4, seed=i)
        options = dict(OPTIONS, divergence=divergence, topk_rest=rest, reduction=reduction)
        ref, ref_grads = run("reference", args, kw, **options)
        out, grads = run("triton", args, kw, chunk_size=3, **options)
        assert_matches(out, grads, ref, ref_grads, f"{divergence} {teacher} {rest} {reduction}")


@pytest.mark.skipif("triton" not in FAST, reason="the triton backend is not installed")
def test_generalized_jsd_loss_triton_matches_the_reference():
    s, t, labels = _logits(5, (2, 3, 9))
    for beta in (0.0, 0.4):  # 0: the forward KL of the dense divergence kernel
        ref = R.generalized_jsd_loss(s, t, labels, beta, 2.0)
        with fastkd.use_backend("triton"):
            out = F.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0)
        assert_close(out, ref)
        assert_close(torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s)[0])


@pytest.mark.parametrize("divergence,teacher,rest", [("jsd", "dense", "renormalise"),
                                                     ("skew_reverse_kl", "topk", "bucket")])
def test_torch_path_never_holds_the_logits(divergence, teacher, rest):
    n, h, v, chunk = 48, 6, 300, 4
    args, kw = make_problem(n, h, v, teacher, dtype=torch.float32, k=5)
    with fastkd.use_backend("torch"), _LargestTensor() as seen:
        loss = F.fused_linear_distillation(*args, **kw, divergence=divergence, topk_rest=rest, hard_weight=0.5,
                                           chunk_size=chunk)
        student_grads(loss, args, kw)
    inputs = max(x.numel() for x in (*args, *kw.values()) if isinstance(x, torch.Tensor))
    assert seen.most <= max(inputs, chunk * v) < n * v


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_the_two_kls(beta):
    args, kw = make_problem(6, 4, 9, "logits")
    jsd = run("torch", args, kw, divergence="jsd", beta=beta, T=2.0)
    kl = run("torch", args, kw, divergence="kl" if beta == 0 else "reverse_kl", T=2.0)
    assert_matches(*jsd, *kl, f"beta={beta}")


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_kl_is_fused_linear_soft_target(teacher):
    args, kw = make_problem(8, 4, 10, teacher, k=3)
    a = fastkd.FusedLinearDistillation("kl", T=3.0, hard_weight=0.2)(*args, **kw)
    b = fastkd.FusedLinearSoftTarget(3.0, hard_weight=0.2)(*args, **kw)
    assert torch.equal(a, b)


def test_reference_kl_is_the_soft_target_reference():
    from fastkd.reference import fused_linear_soft_target as soft_target
    for teacher in ("dense", "topk"):
        args, kw = make_problem(8, 4, 10, teacher, k=3)
        assert_close(R.fused_linear_distillation(*args, **kw, divergence_name="kl", T=2.0),
                     soft_target.fused_linear_soft_target(*args, **kw, T=2.0))


def test_bucket_at_temperature_one_is_the_full_teacher_lumped():
    """At T = 1 the bucket convention's teacher is its full distribution with the classes
    outside the top-k lumped: so KL(p || q) over the k + 1 outcomes equals the divergence of
    the two lumped full distributions, computed here from the full teacher."""
    g = torch.Generator().manual_seed(1)
    z_t, z_s = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(z_t, -1)
    values, idx = logp.topk(4, -1)
    log_q = torch.log_softmax(z_s, -1)
    log_p_k, log_q_k = R.topk_outcomes(log_q, idx, values, 1.0, "bucket")
    rest = torch.ones_like(logp, dtype=torch.bool).scatter(1, idx, False)
    lumped_p = torch.cat([values, torch.logsumexp(logp.masked_fill(~rest, float("-inf")), 1, keepdim=True)], 1)
    torch.testing.assert_close(log_p_k, lumped_p)
    for name in R.DIVERGENCES:
        torch.testing.assert_close(R.divergence(log_p_k, log_q_k, name), R.divergence(lumped_p, log_q_k, name))


def test_low_precision_within_the_reference_error():
    """bfloat16 inputs, float32 accumulation: the fast paths' loss and gradients within the
    materialised reference's own bfloat16 error (both against float64 on the same rounded
    inputs)."""
    for divergence, (teacher, rest) in (("reverse_kl", ("dense", "renormalise")), ("jsd", ("logits", "renormalise")),
                                        ("skew_kl", ("topk", "bucket")), ("tvd", ("topk", "renormalise")),
                                        ("skew_reverse_kl", ("dense", "renormalise"))):
        args, kw = make_problem(24, 16, 120, teacher, dtype=torch.bfloat16, k=10, scale=4.0)
        exact_args = [a.detach().double().requires_grad_(a.requires_grad) if a is not None and a.is_floating_point()
                      else a for a in args]
        exact_kw = {n: (a.detach().double().requires_grad_(a.requires_grad)
                        if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kw.items()}
        options = dict(OPTIONS, divergence=divergence, topk_rest=rest)
        exact = run("reference", exact_args, exact_kw, **options)
        ref = run("reference", args, kw, **options)
        # The Triton kernels once (the interpreter is slow): the dense divergence kernel.
        for fast in ("torch", "triton") if "triton" in FAST and divergence == "jsd" else ("torch",):
            out = run(fast, args, kw, chunk_size=8, **options)
            assert out[0].dtype == ref[0].dtype
            assert_within_reference_error(out[0], ref[0], exact[0], msg=f"{fast} {divergence} {teacher} loss")
            for name, a, r, e in zip(("h", "W", "b"), out[1], ref[1], exact[1]):
                assert_within_reference_error(a, r, e, msg=f"{fast} {divergence} {teacher} grad {name}")


# --- generalized_jsd_loss: TRL's signature and numbers ------------------------------------

def _logits(seed=0, shape=(2, 5, 9), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.3] = -100
    return s, t, labels


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_generalized_jsd_loss_matches_the_reference(reduction, with_labels):
    s, t, labels = _logits()
    labels = labels if with_labels else None
    for beta in (0.0, 0.4, 1.0):
        ref = R.generalized_jsd_loss(s, t, labels, beta, 2.0, reduction)
        out = F.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0, reduction=reduction)
        assert out.shape == ref.shape
        assert_close(out, ref, msg=f"beta={beta}")
        up = torch.linspace(-1, 2, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        assert_close(torch.autograd.grad(out, s, up)[0], torch.autograd.grad(ref, s, up)[0], msg=f"beta={beta}")
    n = torch.tensor(7)
    assert_close(F.generalized_jsd_loss(s, t, labels, num_items_in_batch=n),
                 R.generalized_jsd_loss(s, t, labels, num_items_in_batch=n))


def _trl_generalized_jsd_loss():
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return None
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_generalized_jsd_loss_matches_trl(reduction):
    trl_loss = _trl_generalized_jsd_loss()
    if trl_loss is None:
        pytest.skip("trl is not installed here (not a fastkd dependency): fastkd.functional.generalized_jsd_loss "
                    "is checked against TRL's GKDTrainer.generalized_jsd_loss only where trl imports")
    s, t, labels = _logits(3)
    for beta in (0.0, 0.5, 0.9, 1.0):
        for lab in (None, labels):
            ref = trl_loss(s, t, labels=lab, beta=beta, temperature=1.5, reduction=reduction)
            out = F.generalized_jsd_loss(s, t, lab, beta=beta, temperature=1.5, reduction=reduction)
            assert_close(out, ref, msg=f"beta={beta}")
            up = torch.ones_like(ref)
            assert_close(torch.autograd.grad(out, s, up)[0], torch.autograd.grad(ref, s, up)[0])


# --- Liger-Kernel as an oracle -----------------------------------------------------------
# Liger-Kernel's conventions, from its source (liger-kernel 0.8.5): LigerJSD and
# LigerFusedLinearJSD take TRL's beta (beta KL(p || m) + (1 - beta) KL(q || m), m = beta p +
# (1 - beta) q; beta = 0 and 1 the forward and reverse KL), no T^2 factor, and the sum over the
# rows whose label is not ignore_index / their count (labels per row, nothing shifted). LigerJSD
# takes log-probabilities (the caller applies T); the fused one divides both heads' logits by T.
# LigerTVDLoss takes probabilities, with ignore_index and the reductions batchmean (/ kept rows),
# sum, mean (/ kept rows x V) and none ((BT, V) elementwise). LigerKLDIVLoss is torch's
# KLDivLoss (no ignore_index, batchmean / BT). So each is fastkd's divergence / T^2 on the same
# tokens. Liger computes in float32 whatever the input dtype (its JSD and KL kernels load
# float32, the fused JSD projects to float32, TVD stores its loss as float32): its losses and
# gradients, from float64 or float32 inputs, are held to float32's error against fastkd's in
# float64 (ERROR_FACTOR x that of fastkd's materialised reference run in float32).
LIGER_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIGER_SHAPE = (13, 8, 40)  # tokens, hidden, vocabulary (not a power of 2: the kernels' masks)


def _liger(module):
    if LIGER_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Liger-Kernel's Triton kernels need a CUDA GPU or Triton's interpreter: "
                    "fastkd is not compared with Liger-Kernel here")
    return pytest.importorskip(module, reason="liger_kernel is not installed here (the test extra's, not fastkd's "
                                              "dependency): fastkd's divergences are compared with Liger-Kernel's "
                                              "only where it imports")


@contextlib.contextmanager
def _floats_as_compiled_triton():
    """Compiled Triton passes a non-constexpr Python float argument to a kernel as an fp32
    scalar; Triton's interpreter passes the float itself, and Liger's TVD and KL kernels call
    .to(tl.float32) on theirs. Inside this block the interpreter converts it as compiled
    Triton does (only around Liger's calls: fastkd's kernels are tested as the interpreter is)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    convert = interpreter._implicit_cvt

    def fp32(arg):
        if type(arg) is float:
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(interpreter, "_implicit_cvt", fp32)
        yield


def _liger_problem(seed, labelled=True):
    """Student hidden (N, H) and head (V, H), which require grad; the teacher's hidden and head;
    labels with some ignored rows (at least one kept), or None."""
    n, h, v = LIGER_SHAPE
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64)
    W_s = torch.randn(v, h, generator=g, dtype=torch.float64) * 2 / h ** 0.5
    h_t = torch.randn(n, h + 1, generator=g, dtype=torch.float64)
    W_t = torch.randn(v, h + 1, generator=g, dtype=torch.float64) * 2 / (h + 1) ** 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[0] = 1
    return [x.to(LIGER_DEVICE) for x in (h_s, W_s, h_t, W_t)], labels.to(LIGER_DEVICE) if labelled else None


def _loss_and_grads(fn, tensors, dtype):
    """fn's loss on the tensors in dtype, and its gradients with respect to the first two (the
    student's hidden states and head), for an upstream gradient that is not all ones."""
    xs = [x.to(dtype).requires_grad_(i < 2) for i, x in enumerate(tensors)]
    loss = fn(*xs)
    up = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, xs[:2], up)


def _assert_liger_matches(liger_fn, fastkd_fn, reference_fn, tensors, msg):
    """liger_fn's loss and gradients on float64 and on float32 inputs against fastkd_fn's in
    float64, within float32's error: ERROR_FACTOR x that of reference_fn in float32."""
    exact = _loss_and_grads(fastkd_fn, tensors, torch.float64)
    ref = _loss_and_grads(reference_fn, tensors, torch.float32)
    for dtype in (torch.float64, torch.float32):
        with _floats_as_compiled_triton():
            out = _loss_and_grads(liger_fn, tensors, dtype)
        assert out[0].shape == exact[0].shape, msg
        assert_within_reference_error(out[0].float(), ref[0], exact[0], msg=f"{msg} {dtype} loss")
        for name, a, r, e in zip(("hidden", "head"), out[1], ref[1], exact[1]):
            assert_within_reference_error(a.float(), r, e, msg=f"{msg} {dtype} {name} grad")


def _head(h, W, T):
    return (h @ W.T) / T


def _fastkd(divergence, T, reduction="batchmean", beta=0.5, labels=None, teacher="dense"):
    """fastkd's divergence / T^2 on the problem's tensors: fused_linear_distillation (the
    default backend) and its materialised reference, the teacher by its head or its logits."""
    def call(f, name_key):
        def fn(h_s, W_s, h_t, W_t):
            teacher_args = (dict(teacher_hidden=h_t, teacher_weight=W_t) if teacher == "dense"
                            else dict(teacher_logits=h_t @ W_t.T))
            return f(h_s, W_s, labels=labels, **teacher_args, **{name_key: divergence}, T=T, beta=beta,
                     reduction=reduction) / (T * T)
        return fn
    return call(F.fused_linear_distillation, "divergence"), call(R.fused_linear_distillation, "divergence_name")


@pytest.mark.parametrize("beta,divergence", [(0.0, "kl"), (0.3, "jsd"), (0.8, "jsd"), (1.0, "reverse_kl")])
def test_liger_jsd_is_fastkd_divergence(beta, divergence):
    """LigerJSD on log_softmax(logits / T): FusedLinearDistillation(divergence, T, beta) / T^2 on
    the teacher's logits (kl and reverse_kl at Liger's beta = 0 and 1), kept rows; and
    generalized_jsd_loss on the 2-D logits, whose beta is the same."""
    LigerJSD = _liger("liger_kernel.transformers").LigerJSD
    T = 2.0
    tensors, labels = _liger_problem(0)

    def liger(h_s, W_s, h_t, W_t):
        log_q = torch.log_softmax(_head(h_s, W_s, T), -1)
        return LigerJSD(beta=beta)(log_q, torch.log_softmax(_head(h_t, W_t, T), -1), labels)
    fast, ref = _fastkd(divergence, T, beta=beta, labels=labels, teacher="logits")
    _assert_liger_matches(liger, fast, ref, tensors, f"fused_linear_distillation {divergence} beta={beta}")

    def gkd(f):
        return lambda h_s, W_s, h_t, W_t: f(h_s @ W_s.T, h_t @ W_t.T, labels, beta=beta, temperature=T)
    _assert_liger_matches(liger, gkd(F.generalized_jsd_loss), gkd(R.generalized_jsd_loss), tensors,
                          f"generalized_jsd_loss beta={beta}")


@pytest.mark.parametrize("beta,divergence", [(0.0, "kl"), (0.3, "jsd"), (1.0, "reverse_kl")])
def test_liger_fused_linear_jsd_is_fastkd_divergence(beta, divergence):
    """LigerFusedLinearJSD(beta, T) on both heads: FusedLinearDistillation(divergence, T, beta) /
    T^2 with the teacher's hidden states and head, gradients of the student's hidden states and
    head."""
    LigerFusedLinearJSD = _liger("liger_kernel.transformers").LigerFusedLinearJSD
    T = 1.5
    tensors, labels = _liger_problem(1)

    def liger(h_s, W_s, h_t, W_t):
        return LigerFusedLinearJSD(jsd_beta=beta, temperature=T)(h_s, W_s, h_t, W_t, labels)
    fast, ref = _fastkd(divergence, T, beta=beta, labels=labels)
    _assert_liger_matches(liger, fast, ref, tensors, f"{divergence} beta={beta}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_liger_tvd_is_fastkd_tvd(reduction):
    """LigerTVDLoss(reduction) on softmax(logits / T), kept rows: FusedLinearDistillation("tvd",
    T, reduction) / T^2 (Liger's "none" is elementwise: summed over the vocabulary)."""
    LigerTVDLoss = _liger("liger_kernel.transformers").LigerTVDLoss
    T = 2.0
    tensors, labels = _liger_problem(2)

    def liger(h_s, W_s, h_t, W_t):
        p = torch.softmax(_head(h_s, W_s, T), -1)
        loss = LigerTVDLoss(reduction=reduction)(p, torch.softmax(_head(h_t, W_t, T), -1), labels)
        return loss.sum(-1) if reduction == "none" else loss
    fast, ref = _fastkd("tvd", T, reduction, labels=labels)
    _assert_liger_matches(liger, fast, ref, tensors, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [True, False])
def test_liger_kl_div_is_fastkd_kl(reduction, log_target):
    """LigerKLDIVLoss(reduction, log_target) on log_softmax(student logits / T) and the
    teacher's at T: FusedLinearDistillation("kl", T, reduction) / T^2 without labels (Liger's KL
    has no ignore_index; its "none" is elementwise: summed over the vocabulary)."""
    LigerKLDIVLoss = _liger("liger_kernel.transformers").LigerKLDIVLoss
    T = 2.0
    tensors, _ = _liger_problem(3, labelled=False)

    def liger(h_s, W_s, h_t, W_t):
        log_p = torch.log_softmax(_head(h_t, W_t, T), -1)
        target = log_p if log_target else log_p.exp()
        loss = LigerKLDIVLoss(reduction=reduction, log_target=log_target)(
            torch.log_softmax(_head(h_s, W_s, T), -1), target)
        return loss.sum(-1) if reduction == "none" else loss
    fast, ref = _fastkd("kl", T, reduction)
    _assert_liger_matches(liger, fast, ref, tensors, reduction)


def test_generalized_jsd_loss_bfloat16_within_the_reference_error():
    s, t, labels = _logits(4, (3, 8, 200), torch.bfloat16)
    exact_s = s.detach().double().requires_grad_()
    exact = R.generalized_jsd_loss(exact_s, t.double(), labels, 0.5, 2.0)
    ref = R.generalized_jsd_loss(s, t, labels, 0.5, 2.0)
    out = F.generalized_jsd_loss(s, t, labels, beta=0.5, temperature=2.0)
    assert out.dtype == torch.bfloat16
    assert_within_reference_error(out, ref, exact, msg="loss")
    grads = [torch.autograd.grad(x, w)[0] for x, w in ((out, s), (ref, s), (exact, exact_s))]
    assert_within_reference_error(*grads, msg="grad")


# --- refused arguments --------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    (dict(divergence="js"), "divergence must be one of"),
    (dict(divergence="jsd", beta=1.5), "beta must be in \\[0, 1\\]"),
    (dict(divergence="skew_kl", alpha=-0.1), "alpha must be in \\[0, 1\\]"),
    (dict(divergence="tvd", topk_rest="drop"), "topk_rest must be one of"),
])
def test_bad_arguments_are_refused_naming_them(options, message):
    args, kw = make_problem(4, 3, 6, "logits")
    with pytest.raises(ValueError, match=message):
        F.fused_linear_distillation(*args, **kw, **options)
    divergence = options.pop("divergence")
    with pytest.raises(ValueError, match=message):
        fastkd.FusedLinearDistillation(divergence, **options)


def test_teacher_errors_name_the_arguments():
    args, kw = make_problem(4, 3, 6, "topk", k=2)
    h, W, _, _, labels = args
    with pytest.raises(ValueError, match="topk_rest='bucket'"):
        F.fused_linear_distillation(*args, **kw, divergence="reverse_kl")
    with pytest.raises(ValueError, match="jsd at beta=1"):
        F.fused_linear_distillation(*args, **kw, divergence="jsd", beta=1.0)
    bad = dict(kw, teacher_topk_indices=kw["teacher_topk_indices"] + 6)
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        F.fused_linear_distillation(*args, **bad, divergence="tvd")
    with pytest.raises(ValueError, match="exactly one way"):
        F.fused_linear_distillation(h, W, labels=labels, divergence="tvd")
    with pytest.raises(ValueError, match="exactly one way"):
        F.fused_linear_distillation(*args, **kw, teacher_logits=torch.randn(4, 6, dtype=torch.float64),
                                    divergence="tvd")
    s, t, _ = _logits()
    with pytest.raises(ValueError, match="beta"):
        F.generalized_jsd_loss(s, t, beta=-0.5)


# --- torch.compile and torch.export: one operator node -------------------------------------

@pytest.mark.parametrize("divergence,teacher,rest,reduction", [("jsd", "dense", "renormalise", "none"),
                                                               ("tvd", "topk", "bucket", "batchmean")])
def test_fullgraph_compile_through_the_operator(divergence, teacher, rest, reduction):
    """Compiled, the auto backend calls fastkd::fused_linear_distillation (fastkd.device_ops):
    no graph break, the eager loss and gradients (reduction "none" through its backward
    operator)."""
    torch._dynamo.reset()
    options = dict(OPTIONS, divergence=divergence, topk_rest=rest, reduction=reduction, chunk_size=4)

    def f(args, kw):
        return F.fused_linear_distillation(*args, **kw, **options)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args, kw = make_problem(7, 4, 9, teacher, dtype=torch.float32, k=3)
    expected = f(args, kw)
    expected_grads = student_grads(expected, args, kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(args, kw)
    assert "fastkd::fused_linear_distillation" in {e.name for e in prof.events()}
    assert_close(got, expected)
    for a, b in zip(student_grads(got, args, kw), expected_grads):
        assert_close(a, b)


def test_every_divergence_compiles_fullgraph_to_the_eager_losses_and_gradients():
    """torch.compile(fullgraph=True) of one function calling FusedLinearDistillation for every
    divergence (a dense teacher by its head, a top-k one under "bucket") and generalized_jsd_loss
    (beta 0, 0.3 and 1, with labels): one graph, each of its 15 losses and their gradients
    those of the eager calls (one compile for all: tiny shapes, the aot_eager backend)."""
    torch._dynamo.reset()
    modules = [fastkd.FusedLinearDistillation(d, topk_rest="bucket", chunk_size=4, **OPTIONS) for d in R.DIVERGENCES]
    betas = (0.0, 0.3, 1.0)

    def f(args, kw, topk_kw, s, t, labels):
        losses = [m(*args, **kw) for m in modules] + [m(*args[:2], labels=args[4], **topk_kw) for m in modules]
        return losses + [F.generalized_jsd_loss(s, t, labels, beta=b, temperature=2.0) for b in betas]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args, kw = make_problem(7, 4, 9, "dense", dtype=torch.float32)
    _, topk_kw = make_problem(7, 4, 9, "topk", dtype=torch.float32, k=3, seed=1)
    topk_kw = dict(topk_kw, student_bias=kw["student_bias"])
    s, t, labels = _logits(2, (2, 3, 9), torch.float32)
    inputs = (args, kw, topk_kw, s, t, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(*inputs)
    ran = {e.name for e in prof.events()}
    assert {"fastkd::fused_linear_soft_target", "fastkd::fused_linear_distillation", "fastkd::generalized_jsd"} <= ran
    names = [f"{d} {teacher}" for teacher in ("dense", "topk") for d in R.DIVERGENCES]
    names += [f"jsd beta={b}" for b in betas]
    for i, (name, expected) in enumerate(zip(names, f(*inputs))):
        wrt = [args[0], args[1], kw["student_bias"]] if i < 12 else [s]
        assert_close(got[i], expected, msg=name)
        for a, b in zip(torch.autograd.grad(got[i], wrt, retain_graph=True), torch.autograd.grad(expected, wrt)):
            assert_close(a, b, msg=name)


def test_export_through_the_operator():
    args, kw = make_problem(6, 4, 9, "dense", dtype=torch.float32)

    class Loss(torch.nn.Module):
        def forward(self, h, W, h_t, W_t, labels):
            return F.fused_linear_distillation(h, W, h_t, W_t, labels, divergence="skew_kl", T=2.0, hard_weight=0.5)
    exported = torch.export.export(Loss(), tuple(args))
    assert "fastkd.fused_linear_distillation" in str(exported.graph)
    assert_close(exported.module()(*args), Loss()(*args))


def test_autocast_cpu_bfloat16_takes_the_reference_dtype():
    args, kw = make_problem(6, 4, 9, "dense", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.fused_linear_distillation(*args, **kw, divergence="jsd", T=2.0, hard_weight=0.5)
        with fastkd.use_backend("reference"):
            ref = F.fused_linear_distillation(*args, **kw, divergence="jsd", T=2.0, hard_weight=0.5)
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("fast", FAST)
def test_a_confident_student_keeps_its_tiny_rest_mass(fast):
    """The student puts all but about 1e-12 of its mass on the teacher's top-k: float32 1 - sum
    q_j would give 0 and an infinite KL against the teacher's bucket; the exact rest keeps
    the loss and gradients at the float64 reference's."""
    args, kw = make_problem(4, 3, 9, "topk", dtype=torch.float32, k=3, bias=False, ignore=0.0)
    h, W = args[0], args[1]
    W.data.zero_()
    b = torch.full((9,), -30.0)
    b[kw["teacher_topk_indices"][0]] = 0.0
    kw = dict(kw, student_bias=b.requires_grad_())
    args = (h, W, *args[2:])
    kw["teacher_topk_indices"] = kw["teacher_topk_indices"][:1].expand(4, 3).contiguous()
    exact_args = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
    exact_kw = {n: (a.detach().double().requires_grad_(a.requires_grad)
                    if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kw.items()}
    options = dict(divergence="kl", topk_rest="bucket", T=1.0)
    ref, ref_grads = run("reference", exact_args, exact_kw, **options)
    out, grads = run(fast, args, kw, **options)
    assert torch.isfinite(ref) and torch.isfinite(out)
    assert_close(out, ref, dtype=torch.float32)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype=torch.float32)
