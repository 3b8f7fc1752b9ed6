"""The float32 path's Gram matrix on integer tensor cores (fastkd/kernels/gram.py: `slices`,
`gram_split`, `squared_norms_split`), against float64.

The slices' products are integers summed in int32, so Triton's interpreter forms exactly the
sums the GPU's int8 tensor cores do: what holds here holds there bit for bit (the combination
of the levels runs with fused multiply-adds off on both).
"""
import pytest
import torch

from fastkd.kernels import gram

F64 = torch.float64


def _inputs():
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    wide = randn(40, 70) * 10 ** (torch.rand(40, 70, generator=g) * 6 - 3)  # 1e-3..1e3 in one row
    mixed = randn(21, 33) * torch.tensor([1e-13, 1e-5, 1.0, 1e5, 1e12])[torch.arange(21) % 5][:, None]
    dead = torch.relu(randn(24, 40)) * 100
    dead[::3] = 0
    near = randn(1, 50) * 1e3 + randn(30, 50) * 1e-4  # cosines within 1e-14 of 1
    return {
        "normal": randn(37, 70),
        "wide": wide,
        "mixed magnitudes": mixed,
        "one feature": randn(5, 1),
        "dead rows": dead,
        "near-duplicate rows": near,
        "bfloat16": randn(20, 30).to(torch.bfloat16),
        "float16": randn(20, 30).to(torch.float16),
        "transposed view": randn(45, 30).t(),
    }


INPUTS = _inputs()
# Every input above takes the int8 path (D <= SLICE_MAX_RATIO N).
assert all(gram.slices(x) is not None for x in INPUTS.values())


def _bound(x):
    """|G - (hi + lo)| allowed: the truncation (SLICES + 1) 2^(-7 SLICES) D s_a s_b (s the rows'
    powers of two, < 2 max|x|) and the double-float combination's 2^-46 |G|."""
    x = x.reshape(len(x), -1).to(F64)
    top = x.abs().amax(1)
    s = torch.where(top > 0, 2.0 ** (torch.floor(torch.log2(top.clamp_min(1e-300))) + 1), 2.0 ** -125)
    exact = x @ x.t()
    slack = (gram.SLICES + 1) * 2.0 ** (-7 * gram.SLICES) * x.shape[1]
    return exact, slack * s[:, None] * s[None, :] + 2.0 ** -46 * exact.abs()


@pytest.mark.parametrize("name", INPUTS)
def test_gram_split_within_its_bound_of_float64(name):
    x = INPUTS[name]
    hi, lo = gram.gram_split(x)
    exact, bound = _bound(x)
    err = (hi.to(F64) + lo.to(F64) - exact).abs()
    assert (err <= bound).all(), f"{name}: worst error / bound {(err / bound).max():.3g}"
    # The float32 reference's own G is this close only where nothing cancels: hi is fl(G).
    assert torch.equal(hi, exact.to(torch.float32)), name


@pytest.mark.parametrize("name", ["normal", "mixed magnitudes", "bfloat16"])
def test_gram_split_symmetric_and_its_parts_agree_bit_for_bit(name):
    x = INPUTS[name]
    hi, lo = gram.gram_split(x)
    assert torch.equal(hi, hi.t()) and torch.equal(lo, lo.t())
    # A row's squared norm (a global batch's rows) is G's diagonal; a row block is G's rows.
    sq, sq_lo = gram.squared_norms_split(x)
    assert torch.equal(sq, hi.diagonal()) and torch.equal(sq_lo, lo.diagonal())
    part, part_lo = gram.gram_split(x, 3, 5, gram.slices(x))
    assert torch.equal(part, hi[3:8]) and torch.equal(part_lo, lo[3:8])


def test_slices_reconstruct_the_rows():
    x = INPUTS["wide"]
    q, s = gram.slices(x)
    padded = -(-70 // gram.SLICE_BLOCK_K) * gram.SLICE_BLOCK_K  # zero columns up to a whole K step
    assert q.shape == (gram.SLICES, 40, padded)
    assert q.abs().max() <= 64 and (q[:, :, 70:] == 0).all()
    weights = 2.0 ** (1 - 7 * torch.arange(1, gram.SLICES + 1, dtype=F64))
    back = (q[:, :, :70].to(F64) * weights[:, None, None]).sum(0) * s.to(F64)[:, None]
    assert ((back - x.to(F64)).abs() <= 2.0 ** (-7 * gram.SLICES) * s.to(F64)[:, None]).all()
    assert (x.abs().amax(1) < s).all() and (x.abs().amax(1) >= s / 2).all()


def test_gram_split_sums_past_one_int32_chunk(monkeypatch):
    # Each int32 sum takes at most SLICES * SLICE_CHUNK products of |q q'| <= 2^12, below 2^29:
    # a float32 rounding of it then stays below 2^31 too.
    assert gram.SLICES * gram.SLICE_CHUNK * 64 * 64 < 2 ** 29
    monkeypatch.setattr(gram, "SLICE_CHUNK", gram.SLICE_BLOCK_K)
    x = INPUTS["wide"]  # 70 features: several chunks
    hi, lo = gram.gram_split(x)
    exact, bound = _bound(x)
    assert ((hi.to(F64) + lo.to(F64) - exact).abs() <= bound).all()


def test_rows_past_range_or_not_finite_give_nan_rows():
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[4] = 1e38  # |x|^2 overflows float32: the reference's products are not finite either
    hi, lo = gram.gram_split(x)
    bad = torch.tensor([False, True, True, False, True, False])
    assert hi[bad].isnan().all() and hi[:, bad].isnan().all()
    good = ~bad
    exact = (x[good].to(F64) @ x[good].to(F64).t())
    assert torch.equal(hi[good][:, good], exact.to(torch.float32))


def test_gram_split_past_the_slices_ratio_on_the_vector_units():
    # N = 8 rows of D = 100: slices of 7 N D bytes would outweigh the (N, N) matrices.
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(2)) * 10 ** torch.arange(-3.0, 5.0)[:, None]
    assert gram.slices(x) is None
    hi, lo = gram.gram_split(x)
    exact, bound = _bound(x)
    assert ((hi.to(F64) + lo.to(F64) - exact).abs() <= bound).all()
    assert torch.equal(hi, exact.to(torch.float32)) and torch.equal(hi, hi.t())
    sq, sq_lo = gram.squared_norms_split(x)
    assert ((sq.to(F64) + sq_lo.to(F64) - exact.diagonal()).abs() <= 2.0 ** -46 * exact.diagonal()).all()
