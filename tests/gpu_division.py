"""A model of the GPU's float32 division for Triton's interpreter.

Triton compiles a float32 `/` to div.full.f32 (up to 2 ulp off: the dividend times an
approximate reciprocal), while its interpreter, which the tests run, divides exactly; only
tl.div_rn (fastkd.kernels.common.div) is correctly rounded on both. A division whose error
is one factor on a whole row (every element divided by one norm) can leave a near-zero loss
far off on a GPU and exact in the tests: AT's did (49x the reference's error).

model(): within it, the interpreter's float32 `/` returns fl(a r), r the float32 reciprocal of
b moved by up to one ulp, up or down by a fixed function of b's bits (the approximation's
error, the same for every element divided by one b): up to 4 ulp off, harsher than the
hardware's 2. A power of two's reciprocal is left exact (its significand is 1, which the
approximation meets). tl.div_rn stays exact. FASTKD_GPU_DIVISION=1 runs the whole suite so
(tests/conftest.py).
"""
import contextlib

import numpy as np


def divide(a, b):
    """a / b as the model's GPU divides float32 (numpy arrays or scalars)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.float32 or b.dtype != np.float32:
        return np.divide(a, b)
    b1 = np.atleast_1d(b)
    bits = b1.view(np.uint32)
    with np.errstate(all="ignore"):
        r = np.float32(1) / b1
        k = (bits.astype(np.uint64) * 2654435761 >> 7) % 3  # 0: as rounded, 1: up, 2: down
        moved = np.where(k == 1, np.nextafter(r, np.float32(np.inf)),
                         np.where(k == 2, np.nextafter(r, np.float32(-np.inf)), r))
        exact = ((bits & np.uint32(0x7FFFFF)) == 0) | ~np.isfinite(b1) | (b1 == 0) | ~np.isfinite(moved)
        r = np.where(exact, r, moved).astype(np.float32)
        return (a * r.reshape(b.shape)).astype(np.float32)


def install():
    """The interpreter's float32 `/` as the model's GPU divides, from now on; returns the
    builder's own division, for restoring it."""
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    exact = builder.create_fdiv
    builder.create_fdiv = lambda self, lhs, rhs: self.binary_op(lhs, rhs, divide)
    return exact


@contextlib.contextmanager
def model():
    """install() within the block."""
    from triton.runtime import interpreter
    exact = install()
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_fdiv = exact
