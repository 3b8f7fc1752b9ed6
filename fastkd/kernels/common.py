"""Small pieces shared by the kernel modules.

How a number reaches a kernel, in every family:
  * a Python number known on the host (PKT's eps, CC's gamma, AT's p, AB's margin, scales):
    a ``tl.float64`` argument, converted once by ``to_acc`` (a float argument would be a
    float32 on the GPU and lose float64 runs' digits);
  * a number that lives on the device (the upstream gradient; CRD's normaliser Z, with
    CRD's other numbers in the same small tensor): a tensor filled on the device and read
    in the kernel, so no host sync and no host-to-device copy;
  * ``tl.constexpr`` only for what changes the code: block sizes and flags (P_IS_2, GRAD).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """A scalar kernel argument in the accumulation dtype ACC, without an fp32 detour.

    Triton types a Python float argument as fp32, so float arguments are annotated
    ``tl.float64`` (fp64 on the GPU) and converted here once: fp64 kernels keep every
    digit and fp32 ones do their arithmetic in fp32. Adding to a zero of ACC (rather
    than x.to(ACC)) also works in the interpreter, where x is a plain Python float.
    """
    return (tl.zeros((), ACC) + x).to(ACC)

# Launch option of the kernels that subtract two scaled values (x r_s - y r_t, scale1 G1 +
# scale2 G2). Otherwise the GPU compiler contracts one of the products into a fused
# multiply-add, so the two sides are rounded differently: identical inputs then give a
# nonzero difference, and an L1 loss's sign() a gradient of +-1 where it is 0. Triton's
# interpreter, which the CPU tests run, never contracts; with this the GPU rounds alike.
NO_FMA = {"enable_fp_fusion": False}


def cdiv(a, b):
    """ceil(a / b) of two non-negative ints. The launchers' own: triton.cdiv and
    triton.next_power_of_2 are constexpr functions, ~1.5 us of host time per call."""
    return -(-a // b)


def chunked(programs, length, target, least, align=1):
    """(per, chunks): a length that `programs` programs each walk whole, cut into chunks of
    `per` (a multiple of align), a program each, for about `target` programs in all, no
    chunk but the last shorter than `least`; one chunk where no cut keeps that. For the
    kernels whose few programs would each walk a long row: the chunks' sums are added after."""
    chunks = max(1, min(cdiv(target, programs), length // least))
    per = cdiv(cdiv(length, chunks), align) * align
    return per, cdiv(length, per)


def next_power_of_2(n):
    """The smallest power of 2 >= n for n >= 1 (0 for 0, as triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def tl_acc(dtype):
    """The Triton type of an accumulation dtype (fastkd.common.accumulation_dtype): a kernel's ACC."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_warps(elements):
    """Warps for a program holding `elements` values per operand: about 8 per thread
    (more spills past 255 registers; fewer leaves the memory system idle), 1 to 8 warps."""
    return max(1, min(8, elements // 256))


def as_3d(x):
    """(B, C, ...) -> (B, C, L), a view where the trailing dims merge into one stride
    (contiguous, channels_last), else a copy: how every map and logit tensor reaches a
    kernel."""
    return x.reshape(x.shape[0], x.shape[1], -1)


@triton.jit
def sqrt(x):
    """The correctly rounded square root. For float32 tl.sqrt is sqrt.approx.ftz on the
    GPU, which flushes a subnormal sum of squares to 0 (the norm of tiny features would
    come out 0); float64's tl.sqrt is already sqrt.rn, and tl.sqrt_rn takes float32 only."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div(a, b):
    """a / b correctly rounded. For float32, Triton's / is div.full.f32 on the GPU (up to 2 ulp
    off) while the interpreter divides exactly as numpy does; tl.div_rn is div.rn.f32, as the
    reference's torch division is. float64's / is div.rn.f64 already."""
    q = a / b
    if q.dtype == tl.float32:
        q = tl.div_rn(a + tl.zeros_like(q), b + tl.zeros_like(q))
    return q


@triton.jit
def two_sum(a, b):
    """(s, err) with s = fl(a + b) and a + b = s + err exactly (Knuth; no products, so the
    compiler's multiply-add contraction cannot change it)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


# --- double-float arithmetic: a value carried as two float32s, hi + lo (about 2^-48) ------
# For the float32 paths of the relational losses, where a float32 rounding of an
# intermediate would be of the size of the loss (fastkd/kernels/gram.py, cosine.py).
# Launch such kernels with NO_FMA: the error terms are formed explicitly (tl.fma), and a
# product the compiler fused into a sum would change the sum they correct.

@triton.jit
def two_prod(a, b):
    """(p, err) with p = fl(a b) and a b = p + err exactly (the fused multiply-add's)."""
    p = a * b
    return p, tl.fma(a, b, -p)


@triton.jit
def dd_add(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as (hi, lo), hi's rounding kept in lo: the combine of a
    compensated tl.reduce."""
    s, err = two_sum(a_hi, b_hi)
    return s, err + (a_lo + b_lo)


@triton.jit
def dd_sum(hi, lo, axis):
    """The sum of hi + lo along axis as (hi, lo), hi = fl(hi + lo): a compensated reduction."""
    s, err = tl.reduce((hi, lo), axis, dd_add)
    return two_sum(s, err)


@triton.jit
def dd_sqrt(hi, lo):
    """sqrt(hi + lo) as (s, s_lo) for hi >= 0, hi = fl(hi + lo): s the correctly rounded
    sqrt(hi), s_lo one Newton step's correction (hi - s^2 + lo) / (2 s), 0 where s = 0."""
    s = sqrt(hi)
    live = s > 0
    return s, tl.where(live, (tl.fma(-s, s, hi) + lo) / (2 * tl.where(live, s, 1.0)), 0.0)


@triton.jit
def dd_div(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) / (b_hi + b_lo) as (q, q_lo), b_hi != 0: q = fl(a_hi / b_hi) and the
    remainder a - q b (its big part exact by a fused multiply-add) over b_hi."""
    q = a_hi / b_hi
    rem = tl.fma(-q, b_hi, a_hi) + (a_lo - q * b_lo)
    return q, rem / b_hi


# --- float32 products on tensor cores (tf32x3) -------------------------------------------
# FSP's and NST's batched Gram products (feature_maps.py) and the relational losses' float32
# Gram and gradient products (gram.py).

@triton.jit
def _tf32(x):
    """x (fp32) rounded to tf32 (11 significant bits), half away from zero as the GPU's
    cvt.rna.tf32.f32: half a tf32 ulp added to the magnitude's bits, the 13 low bits cleared.
    Infinities and NaN are kept as they are (their bits would carry into the sign)."""
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, x, r)


@triton.jit
def _split(x, EXACT: tl.constexpr):
    """(hi, lo), both tf32 values: hi = tf32(x), lo = tf32(x - hi) (x - hi is exact), so that
    |x - hi - lo| <= 2^-22 |x|. EXACT (x converted from bf16/fp16, already a tf32 value): lo
    is not used."""
    if EXACT:
        return x, x
    else:
        hi = _tf32(x)
        return hi, _tf32(x - hi)


@triton.jit
def dot_f32(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr):
    """acc + a b for fp32 tiles a (M, K), b (K, N), acc (M, N), on tensor cores at about fp32
    accuracy: the tf32x3 split a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi (_split), each term a
    tf32 product, which the tensor cores form exactly and sum in fp32. The dropped terms
    (a_lo b_lo and the rounding of the lo parts) are <= 3 * 2^-22 |a| |b| per product, about
    the 2^-24 of one IEEE fp32 product and well below its rounding in a sum of K of them;
    single tf32 (2^-11) would lose half the digits (docs/numerics.md,
    tests/test_tensor_core_precision.py). An operand that is EXACT (bf16/fp16 converted)
    needs no lo part: two products, or one when both are.

    The three products of one K step go to a fresh tile, added to acc once: the long sum over
    K is then IEEE fp32 adds, and the tensor cores' own (truncating) sums only span one step.
    A product of inf and a lo part of 0 is NaN where the IEEE product is inf: NaN in the small
    terms is dropped (inf or NaN inputs still reach the result through the hi product)."""
    a_hi, a_lo = _split(a, A_EXACT)
    b_hi, b_lo = _split(b, B_EXACT)
    if A_EXACT and B_EXACT:
        part = tl.dot(a_hi, b_hi, input_precision="tf32")
    else:
        if A_EXACT:
            small = tl.dot(a_hi, b_lo, input_precision="tf32")
        elif B_EXACT:
            small = tl.dot(a_lo, b_hi, input_precision="tf32")
        else:
            small = tl.dot(a_lo, b_hi, input_precision="tf32")
            small = tl.dot(a_hi, b_lo, small, input_precision="tf32")
        part = tl.dot(a_hi, b_hi, tl.where(small == small, small, 0.0), input_precision="tf32")
    return acc + part
