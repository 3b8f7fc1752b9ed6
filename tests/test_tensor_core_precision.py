"""The tensor-core products of FSP's and NST's Gram kernels, and the pairwise losses' gradient
products, keep float32 accuracy: tf32x3 emulated on the CPU.

On a GPU the kernels of fastkd/kernels/feature_maps.py (and gram._product_grad_kernel) form
each float32 product on the tensor cores from a split (``fastkd.kernels.common.dot_f32``):
a = a_hi + a_lo, both tf32 values (11 significant bits), and
a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, each term exact in fp32, summed in fp32. Triton's
interpreter, which the other tests run, computes a tl.dot in plain fp32 whatever its precision,
so it cannot show what tf32 rounding does. Here the kernels' two launchers, ``gram`` and
``matrix_times_maps``, are replaced by torch functions that round as the tensor cores would
(tf32 rounding written with integer operations on the float32 bits), with the kernels' K steps
and accumulation order, and FSP's and NST's own autograd Functions run on them. Their losses and
gradients must stay within 10x the reference's own float32 error against float64
(helpers.assert_within_reference_error, as tests/test_adversarial_losses.py holds every loss
to; for FSP's loss at least its rounding floor with G rounded once, which the CPU's float32
bmm can undercut by luck: _fsp_terms), on adversarial inputs: student nearly equal to or equal to the teacher (a loss near 0),
values spread from 1e-3 to 1e3 in one map, 1..5000 with ReLU zeros, a +-1e3 offset, tiny and huge
scales. The split is checked with the kernels' rounding (half away from zero, as the GPU's
cvt.rna.tf32.f32) and with round-half-to-even. A single tf32 product must fail the same bound
on some of these inputs, so the test can tell the two apart.

What the emulation does not model: the tensor cores' own fp32 sums within one instruction,
which truncate rather than round (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
2021); the kernels confine them to one K step of 16 products, added to the running sum in IEEE
fp32 (docs/numerics.md). The GPU runs of the kernel and adversarial tests cover that part.
"""
import pytest
import torch

import fastkd.autograd as fa
import test_adversarial_pairwise as pairwise
from adversarial_rows import CASES
from fastkd import reference as R
from fastkd.kernels import feature_maps as fm
from fastkd.kernels import gram
from helpers import assert_within_reference_error
from test_adversarial_losses import F64, _nst_terms, values

F32 = torch.float32
# The fp32 kernels' K step: the Gram kernel's BLOCK_K, the matrix-times-maps kernel's BLOCK_J.
STEP = fm._GRAM_TILES[torch.float32][2]
assert fm._MAT_TILES[torch.float32][1] == STEP


def tf32(x, mode):
    """float32 x rounded to tf32 (11 significant bits): "rna" half away from zero (the kernels'
    _tf32, the GPU's cvt.rna), "rne" half to even, "rz" truncated (what a tensor core reads
    of a float32 register). Infinities and NaN as they are."""
    bits = x.contiguous().view(torch.int32)
    if mode == "rna":
        bits = bits + 0x1000
    elif mode == "rne":
        bits = bits + 0x0FFF + ((bits >> 13) & 1)
    r = (bits & -0x2000).view(F32)
    return torch.where(torch.isfinite(x), r, x)


def split(x, mode):
    hi = tf32(x, mode)
    return hi, tf32(x - hi, mode)


def product(a, b, acc, scheme):
    """acc + a @ b (batched, fp32) as the kernels' tensor cores form it, K step by K step: each
    step's products summed in fp32 into a fresh tile, added to acc (common.dot_f32).
    scheme: "ieee" (plain fp32 products), "tf32x3-rna" / "tf32x3-rne" (the split, with that
    rounding), "tf32" (one product of the operands rounded to tf32, half to even)."""
    for k0 in range(0, a.shape[-1], STEP):
        ak, bk = a[..., k0:k0 + STEP], b[..., k0:k0 + STEP, :]
        if scheme == "ieee":
            part = ak @ bk
        elif scheme == "tf32":
            part = tf32(ak, "rne") @ tf32(bk, "rne")
        else:
            mode = scheme.split("-")[1]
            (a_hi, a_lo), (b_hi, b_lo) = split(ak, mode), split(bk, mode)
            small = a_lo @ b_hi + a_hi @ b_lo
            part = a_hi @ b_hi + torch.where(small.isnan(), 0.0, small)
        acc = acc + part
    return acc


def emulated_launchers(scheme):
    """Stand-ins for feature_maps.gram and matrix_times_maps, same arguments and results, with
    the products of `scheme` and the kernels' fp32 arithmetic around them."""

    def gram(dtype, x1, y1, scale1=1.0, x2=None, y2=None, scale2=0.0):
        assert dtype == F32

        def tile(x, y, scale):
            zero = x.new_zeros((x.shape[0], x.shape[1], y.shape[1]), dtype=F32)
            return product(x.to(F32), y.to(F32).transpose(1, 2), zero, scheme) * torch.tensor(scale, dtype=F32)
        s = tile(x1, y1, scale1)
        if x2 is not None:
            s = s + tile(x2, y2, scale2)
        return s, (s * s).sum((1, 2))

    def matrix_times_maps(m1, x1, m2=None, x2=None, diag=None, y=None, out_dtype=None):
        assert m1.dtype == F32
        acc = product(m1, x1.to(F32), m1.new_zeros((m1.shape[0], m1.shape[1], x1.shape[2])), scheme)
        if m2 is not None:
            acc = product(m2, x2.to(F32), acc, scheme)
        if diag is not None:
            acc = acc + diag[:, :, None] * y.to(F32)
        return acc.to(out_dtype or x1.dtype)

    return gram, matrix_times_maps


# --- inputs ----------------------------------------------------------------------------------

KINDS = ("normal", "wide", "spread", "offset", "tiny", "huge")
RELATIONS = ("independent", "near", "equal")


def maps(g, shape, kind):
    """float64 values: tests/test_adversarial_losses.py's kinds (spread 1..5000 with ReLU
    zeros, offset +-1e3, tiny 1e-4, huge 1e4), and wide: magnitudes log-uniform over 1e-3..1e3
    with random signs, in one map."""
    if kind == "wide":
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(F64)
        return sign * 10.0 ** (torch.rand(shape, generator=g, dtype=F64) * 6 - 3)
    return values(g, shape, kind)


def student(g, t, relation, kind):
    """The student of teacher t: independent, t plus noise 1e-4 of its mean magnitude (a loss
    near 0, the cancellation a low-precision product cannot survive), or t itself."""
    if relation == "equal":
        return t.clone()
    if relation == "near":
        return t + 1e-4 * t.abs().mean() * torch.randn(t.shape, generator=g, dtype=F64)
    return maps(g, t.shape, kind)


# One shape per form, large enough that the K sums have several steps of 16.
SHAPES = {"fsp": (2, 12, 7, 9, 9), "nst": (2, 10, 10, 8, 9), "nst_spatial": (2, 40, 36, 3, 4)}


def make(loss, kind, relation, seed):
    """(float64 inputs, call(inputs) -> loss with the fast path's Function, reference loss fn)."""
    g = torch.Generator().manual_seed(seed)
    B, c1, c2, H, W = SHAPES[loss]
    if loss == "fsp":
        a_t, b_t = maps(g, (B, c1, H, W), kind), maps(g, (B, c2, H, W), kind)
        xs = [student(g, a_t, relation, kind), student(g, b_t, relation, kind), a_t, b_t]
        return xs, lambda x: fa.FSPFunction.apply(*x), lambda x: R.fsp.fsp(*x)
    c2 = c1 if relation != "independent" else c2  # a near-zero NST needs the teacher's channels
    t = maps(g, (B, c2, H, W), kind)
    xs = [student(g, t, relation, kind) if relation != "independent" else maps(g, (B, c1, H, W), kind), t]
    fn = fa.NSTSpatialFunction if loss == "nst_spatial" else fa.NSTFunction
    return xs, lambda x: fn.apply(*x), lambda x: R.nst.nst(*x)


def loss_and_grads(call, xs, dtype, upstream):
    leaves = [x.to(dtype).requires_grad_() for x in xs]
    loss = call(leaves)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return [loss.detach()] + [gr.detach() for gr in grads]


def _fsp_terms(fm_s1, fm_s2, fm_t1, fm_t2):
    """FSP's loss mean (G_s - G_t)^2 moves by 2 (G_s - G_t) delta / n when an entry of G_s or
    G_t is rounded by delta ~ eps |G|: these terms, 2 |G_s - G_t| (|G_s| + |G_t|) / n, give the
    loss's rounding floor with G rounded once, which one draw of the reference can undercut
    by luck (40x at offset maps near their teacher, on one CPU's float32 bmm)."""
    g_s, g_t = R.fsp.fsp_matrix(fm_s1, fm_s2), R.fsp.fsp_matrix(fm_t1, fm_t2)
    return (2 * (g_s - g_t).abs() * (g_s.abs() + g_t.abs()) / g_s.numel()).flatten()


def results(monkeypatch, loss, kind, relation, seed, schemes):
    """{scheme: [loss, grads...] in fp32}, the reference's fp32 results, the float64 answer on
    the same fp32 values, and the loss's terms (a near-zero NST loss is summed from them;
    FSP's carry its rounding floor)."""
    xs, call, ref = make(loss, kind, relation, seed)
    xs = [x.to(F32).to(F64) for x in xs]  # the values fp32 holds
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    ours = {}
    for scheme in schemes:
        gram, mtm = emulated_launchers(scheme)
        with monkeypatch.context() as m:
            m.setattr(fm, "gram", gram)
            m.setattr(fm, "matrix_times_maps", mtm)
            ours[scheme] = loss_and_grads(call, xs, F32, upstream)
    terms = _nst_terms(*xs) if loss.startswith("nst") else _fsp_terms(*xs)
    return ours, loss_and_grads(ref, xs, F32, upstream), loss_and_grads(ref, xs, F64, upstream), terms


def at_unit_scale(actual, reference, exact, terms=None):
    """The four multiplied by one power of two that brings exact's norm near 1 (exact in
    floating point): FSP's loss grows as the 4th power of the maps' scale, and at scale 1e-4
    an absolute floor (helpers' eps^2) would pass anything."""
    norm = float(exact.double().norm())
    if norm == 0 or not torch.isfinite(exact).all():
        return actual, reference, exact, terms
    f = 2.0 ** -round(torch.tensor(norm).log2().item())
    return actual * f, reference * f, exact * f, None if terms is None else terms * f


def check(actual, reference, exact, terms=None, msg=""):
    """helpers.assert_within_reference_error on each result (loss with its terms, then the
    gradients) at unit scale, where reference and exact are finite."""
    for i, (a, r, e) in enumerate(zip(actual, reference, exact)):
        if torch.isfinite(r).all() and torch.isfinite(e).all():
            a, r, e, t = at_unit_scale(a, r, e, terms if i == 0 else None)
            assert_within_reference_error(a, r, e, terms=t, msg=f"{msg} {'loss' if i == 0 else f'grad {i - 1}'}")


def within(actual, reference, exact, terms=None):
    """Whether check passes."""
    try:
        check(actual, reference, exact, terms)
    except AssertionError:
        return False
    return True


@pytest.fixture(autouse=True)
def ieee_fp32_matmul():
    # The emulation needs fp32 products and sums from torch's matmul (no TF32 or bf16 inside).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def test_tf32_rounding_and_split():
    """The emulated rounding: tf32 values have 13 zero low bits; rne and rna differ only at
    ties; hi + lo is x within 2^-22 |x|; bf16 and fp16 values are tf32 values (the kernels'
    EXACT operands, which skip their lo part)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g).float()
    for mode in ("rna", "rne"):
        hi, lo = split(x, mode)
        assert not ((hi.view(torch.int32) | lo.view(torch.int32)) & 0x1FFF).any()
        assert ((hi.double() + lo.double() - x.double()).abs() <= 2.0 ** -22 * x.double().abs()).all()
    tie = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11)])
    assert tf32(tie, "rne").tolist() == [1.0, 1 + 2 ** -9, -1.0]
    assert tf32(tie, "rna").tolist() == [1 + 2 ** -10, 1 + 2 ** -9, -(1 + 2 ** -10)]
    special = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0])
    assert tf32(special, "rna").tolist() == special.tolist() and tf32(torch.tensor([float("nan")]), "rne").isnan().all()
    for dt in (torch.bfloat16, torch.float16):
        v = x.clamp(-6e4, 6e4).to(dt).float()
        assert torch.equal(tf32(v, "rz"), v)


def test_emulated_launchers_are_the_kernels_contract():
    """With IEEE products the stand-ins give the fp32 Functions' answers to fp32 accuracy (the
    emulation computes what the launchers compute, only the products change)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 37, generator=g), torch.randn(2, 6, 37, generator=g)
    gram, mtm = emulated_launchers("ieee")
    s, sq = gram(F32, x, y, 0.5, y[:, :5], y, -0.25)
    exact = 0.5 * x.double() @ y.double().transpose(1, 2) - 0.25 * y[:, :5].double() @ y.double().transpose(1, 2)
    torch.testing.assert_close(s.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq.double(), exact.square().sum((1, 2)), rtol=1e-5, atol=1e-5)
    m, d = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, generator=g)
    out = mtm(m, y, m[:, :, :5], x, d, x)
    exact = m.double() @ y.double() + m[:, :, :5].double() @ x.double() + d.double()[:, :, None] * x.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", sorted(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
def test_tf32x3_products_keep_float32_accuracy(monkeypatch, loss, kind):
    for relation in RELATIONS:
        # NST's (C x C) form at a student equal to its teacher: the exact gradient is 0 and
        # what the Function computes around the products (K = r S r, the sums of W K W) leaves
        # 4-11x the reference's error with IEEE fp32 products too (the kernels' arithmetic
        # before tensor cores). There the split is held to the IEEE-product path's own error.
        baseline = loss == "nst" and relation == "equal"
        for seed in (0, 1):
            schemes = ("tf32x3-rna", "tf32x3-rne") + (("ieee",) if baseline else ())
            ours, ref32, exact, terms = results(monkeypatch, loss, kind, relation, seed, schemes)
            ref32 = ours.pop("ieee", ref32)
            for scheme, res in ours.items():
                check(res, ref32, exact, terms, msg=f"{loss} {kind} {relation} seed {seed} {scheme}")


@pytest.mark.parametrize("loss", sorted(SHAPES))
def test_single_tf32_fails_the_bound(monkeypatch, loss):
    """The control: one tf32 product (2^-11 per operand) loses the cancellation of a student
    near its teacher, so the bound the split passes rejects it, on every loss form."""
    failed = []
    for kind in ("normal", "offset", "wide"):
        ours, ref32, exact, terms = results(monkeypatch, loss, kind, "near", 0, ("tf32",))
        if not within(ours["tf32"], ref32, exact, terms):
            failed.append(kind)
    assert failed, f"{loss}: single tf32 products passed the float32 bound on every input"


# --- the pairwise losses' gradient products (gram._product_grad_kernel) --------------------
# SP, PKT and CC on float32 inputs map dL/dG onto the rows as M X (+ r X) with the same tf32x3
# split, K steps of 16 (gram.PRODUCT_TILES). Their Gram matrices come from int8 slices, whose
# integer sums the interpreter forms exactly as the GPU does (tests/test_sliced_gram.py).

PAIRWISE = ("sp", "pkt_cos_sim", "cc")
assert gram.PRODUCT_TILES[1] == STEP


def emulated_gram_grad(scheme):
    """A stand-in for gram.gram_grad whose float32 path (a float32 M) forms M X with `scheme`'s
    products; a float64 M goes to the kernel as before."""
    own = gram.gram_grad

    def gram_grad(m, r, x, scale, like, lo=0, z=None, divisor=1.0):
        if m.dtype != F32:
            return own(m, r, x, scale, like, lo, z, divisor)
        x = gram.flat(x)
        z = x[lo:] if z is None else gram.flat(z)
        acc = product(m[None], x.to(F32)[None], m.new_zeros((1, len(m), x.shape[1])), scheme)[0]
        if r is not None:
            acc = acc + r[:, None] * z.to(F32)
        out = (acc * ((1.0 if scale is None else scale.to(F32)) * (1.0 / divisor))).to(like.dtype)
        return out.reshape(like.shape) if len(m) == len(like) else out
    return gram_grad


def pairwise_results(monkeypatch, op, case, near, seed, schemes):
    """({scheme: fast path's [loss, grads]}, the float32 reference's, float64 on the same values)."""
    s, t = pairwise.inputs(10, 40, case, 2 + seed % 6, near, F32, seed)
    upstream = torch.tensor(0.75, dtype=F64)
    ours = {}
    for scheme in schemes:
        with monkeypatch.context() as m:
            m.setattr(gram, "gram_grad", emulated_gram_grad(scheme))
            ours[scheme] = pairwise.loss_and_grads(op, "triton", s, t, upstream)
    return (ours, pairwise.loss_and_grads(op, "reference", s, t, upstream),
            pairwise.loss_and_grads(op, "reference", s.double(), t.double(), upstream))


@pytest.mark.parametrize("op", PAIRWISE)
def test_pairwise_gradient_products_keep_float32_accuracy(monkeypatch, op):
    """tf32x3 (either rounding) within 10x the reference's error on every adversarial row case,
    teacher independent or near; single tf32 products fail it on some (the control)."""
    single = []
    for seed, case in enumerate(CASES):
        for near in (False, True):
            schemes = ("tf32x3-rna", "tf32x3-rne", "tf32")
            ours, ref32, exact = pairwise_results(monkeypatch, op, case, near, seed, schemes)
            for scheme in ("tf32x3-rna", "tf32x3-rne"):
                check(ours[scheme], ref32, exact, msg=f"{op} {case} near={near} {scheme}")
            single.append(within(ours["tf32"], ref32, exact))
    assert not all(single), f"{op}: single tf32 products passed the float32 bound on every input"
