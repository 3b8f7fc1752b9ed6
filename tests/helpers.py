"""Tolerances per dtype, in one place, and the comparisons the equivalence tests use."""
import os
import subprocess
import sys

import torch

import fast_interpreter

fast_interpreter.install()  # also in the processes the multi-process tests spawn

# Same-dtype comparisons (for example fp64 fast path against the fp64 reference).
TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
    torch.float16: dict(rtol=5e-3, atol=1e-3),
}

# A low-precision result may be this many times further from the fp64 answer than the
# reference's own result in that dtype is.
ERROR_FACTOR = 10


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(), **tol,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def assert_within_reference_error(actual, reference, exact, msg="", terms=None):
    """|actual - exact| <= ERROR_FACTOR * max(|reference - exact|, eps |exact|, eps^2,
    eps ||terms||) in the 2-norm.

    actual and reference were computed in the same low precision, exact in fp64: the fast
    path may be no worse than ERROR_FACTOR times the reference's own rounding error. The
    eps^2 floor: a loss near 0 that is a difference of O(1) terms carries about that much
    rounding, however lucky the reference's own rounding happens to be.

    terms (optional): the magnitudes of the signed terms a result near 0 is summed from
    (a KL's p |log p| + p |log q| per element, NST's kernel entries). Rounding each term
    leaves independent errors of about eps * term, so eps * ||terms||_2 is the typical error
    of any term-by-term sum, the reference's included; one draw of the reference can be far
    luckier (KL at 1e-4 noise: 2e-9 on one draw where its mean over draws is 1.8e-8).
    """
    eps = torch.finfo(actual.dtype).eps
    a, r, e = (x.detach().double().reshape(-1) for x in (actual, reference, exact))
    ref_err = torch.linalg.vector_norm(r - e)
    floor = 0.0 if terms is None else eps * torch.linalg.vector_norm(terms.detach().double())
    allowed = ERROR_FACTOR * max(ref_err, eps * torch.linalg.vector_norm(e), eps ** 2, floor)
    err = torch.linalg.vector_norm(a - e)
    assert err <= allowed, (f"{msg}: error {err:.3e} of the {actual.dtype} result exceeds "
                            f"{ERROR_FACTOR} x the reference's own error {ref_err:.3e}")


# A Triton loop over a runtime bound, through the interpreter (the spawned ranks' Triton path).
INTERPRETER_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x, o, D, B: tl.constexpr):
    acc = tl.zeros([B], tl.float32)
    for s in range(0, D, B):
        acc += tl.load(x + s + tl.arange(0, B))
    tl.store(o + tl.arange(0, B), acc)
k[(1,)](torch.ones(8), torch.empty(4), 8, B=4)
"""


def interpreter_runs():
    """Whether Triton's interpreter runs here. Triton 3.6's (the GPU machine's) fails on any
    loop over a runtime bound with numpy >= 2.4, whose int() refuses its 1-element arrays."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], env=env, capture_output=True).returncode == 0


def route_through_operators(monkeypatch):
    """The auto backend calls fastkd.device_ops' operators for every device, eagerly and
    compiled (by default only compiled on CUDA), so that CPU tests run them."""
    from fastkd import device_ops
    monkeypatch.setattr(device_ops, "OPERATOR_ROUTES",
                        {(d, c) for d in ("cpu", "cuda") for c in (False, True)})


def grad_leaves(inputs):
    """The tensors that require grad among a loss's inputs, IRG's (fm1, fm2, feat, out) and
    other sequences walked through, in order."""
    for x in inputs:
        if isinstance(x, (tuple, list)):
            yield from grad_leaves(x)
        elif isinstance(x, torch.Tensor) and x.requires_grad:
            yield x
