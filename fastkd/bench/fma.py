"""A Triton kernel that measures a GPU's float32 vector FMA rate, the floor's rate for
elementwise work that no matrix unit can take (fastkd.bench.roofline). Imported only on CUDA,
where Triton is there.

Each element runs four independent chains of FMAs (a = fma(a, b, c), explicit: no reliance on
the compiler's contraction of a * b + c) from registers, so the units, not memory or latency,
bound it: 8 FMAs per element and iteration, 16 flops.
"""
import triton
import triton.language as tl

FLOPS_PER_ITER = 16


@triton.jit
def _fma_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    b = x * 0.001 + 0.5  # |b| < 1: the chains stay finite
    c = x * 0.25
    a0 = x
    a1 = x + 1.0
    a2 = x - 1.0
    a3 = x * 2.0
    for _ in range(ITERS):
        a0 = tl.fma(a0, b, c)
        a1 = tl.fma(a1, b, c)
        a2 = tl.fma(a2, b, c)
        a3 = tl.fma(a3, b, c)
        a0 = tl.fma(a0, b, c)
        a1 = tl.fma(a1, b, c)
        a2 = tl.fma(a2, b, c)
        a3 = tl.fma(a3, b, c)
    tl.store(out_ptr + offs, a0 + a1 + a2 + a3)


def launch(x, out, iters, block=1024):
    """out = the chains' sum for each element of x (float32, a multiple of block long);
    returns the flops it ran."""
    _fma_kernel[(x.numel() // block,)](x, out, ITERS=iters, BLOCK=block, num_warps=4)
    return FLOPS_PER_ITER * iters * x.numel()
