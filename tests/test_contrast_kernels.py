"""CRD contrast: the gather-dot Triton kernel and the CPU path against the reference."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastkd
from fastkd import autograd, global_crd, reference
from fastkd.kernels import contrast as kernels
from fastkd.reference.crd import contrast_scores, normalizer
from fastkd.torch_backend import contrast as torch_path
from helpers import TOLERANCE, assert_close, assert_within_reference_error

PATHS = {"triton": autograd.crd_contrast, "torch": torch_path.crd_contrast}
# Small tiles and few programs make the kernel loop over several row blocks per split.
BLOCKS = pytest.mark.parametrize("blocks", [dict(TILE=64, TARGET_PROGRAMS=8),
                                            dict(TILE=kernels.TILE, TARGET_PROGRAMS=kernels.TARGET_PROGRAMS)],
                                 ids=["small-blocks", "default-blocks"])


@st.composite
def crd_case(draw, max_b=6, max_n=40, dims=(1, 3, 8, 17, 32, 64)):
    """(embed, memory, sample_idx, nce_t, z, n_data) in fp64 as CRD makes them: unit-norm
    embeddings, memory rows uniform in +-1/sqrt(D/3), indices with repeats."""
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(1, max_n))
    D = draw(st.sampled_from(dims))
    n_data = draw(st.integers(1, 50))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    embed = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    stdv = 1 / math.sqrt(D / 3)
    memory = (torch.rand(n_data, D, generator=gen, dtype=torch.float64) * 2 - 1) * stdv
    if draw(st.booleans()):  # memory after some updates: unit rows, near the embeddings
        memory = F.normalize(memory, dim=1)
    sample_idx = torch.randint(0, n_data, (B, N + 1), generator=gen)
    if draw(st.booleans()):
        sample_idx[:, 1:] = sample_idx[:, :1]  # every negative repeats the positive
    nce_t = draw(st.sampled_from([0.07, 0.1, 0.5]) | st.floats(0.05, 1.0))
    z = normalizer(contrast_scores(embed, memory, sample_idx, nce_t), n_data) * draw(st.sampled_from([1.0, 0.3, 7.0]))
    return embed, memory, sample_idx, nce_t, z, n_data


upstream = st.floats(-3.0, 3.0).filter(lambda x: abs(x) > 1e-3)


def _loss_and_grad(fn, embed, memory, sample_idx, nce_t, z, n_data, g, eps=1e-7):
    e = embed.detach().clone().requires_grad_(True)
    loss = fn(e, memory, sample_idx, nce_t, z, n_data, eps)
    grad, = torch.autograd.grad(loss, e, torch.tensor(g, dtype=loss.dtype))
    return loss.detach(), grad


def _check_fp64(path, case, g):
    loss, grad = _loss_and_grad(PATHS[path], *case, g)
    ref_loss, ref_grad = _loss_and_grad(reference.crd.crd_contrast, *case, g)
    assert loss.dtype == grad.dtype == torch.float64
    assert_close(loss, ref_loss, msg="loss")
    assert_close(grad, ref_grad, msg="embedding gradient")


@BLOCKS
@given(case=crd_case(), g=upstream)
def test_triton_matches_reference_fp64(blocks, case, g):
    with mock.patch.multiple(kernels, **blocks):
        _check_fp64("triton", case, g)


@given(case=crd_case(max_b=64, max_n=400, dims=(1, 17, 64, 128)), g=upstream)
def test_torch_path_matches_reference_fp64(case, g):
    _check_fp64("torch", case, g)


def test_torch_path_over_several_chunks(monkeypatch):
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(0)
    embed = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=1)
    memory = torch.rand(30, 8, generator=gen, dtype=torch.float64) - 0.5
    idx = torch.randint(0, 30, (5, 23), generator=gen)
    _check_fp64("torch", (embed, memory, idx, 0.1, 2.0, 30), -0.8)


@pytest.mark.parametrize("path", PATHS)
@given(case=crd_case(), g=upstream)
def test_fp32_within_reference_error(path, case, g):
    embed, memory, idx, nce_t, z, n_data = case
    low = (embed.float(), memory.float(), idx, nce_t, z, n_data)
    loss, grad = _loss_and_grad(PATHS[path], *low, g)
    ref = _loss_and_grad(reference.crd.crd_contrast, *low, g)
    exact = _loss_and_grad(reference.crd.crd_contrast, *case, g)
    assert loss.dtype == grad.dtype == torch.float32
    assert_within_reference_error(loss, ref[0], exact[0], msg="loss")
    assert_within_reference_error(grad, ref[1], exact[1], msg="embedding gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(case=crd_case(), g=upstream)
def test_low_precision_inputs(path, dtype, case, g):
    embed, memory, idx, nce_t, z, n_data = case
    embed, memory = embed.to(dtype), memory.to(dtype)
    loss, grad = _loss_and_grad(PATHS[path], embed, memory, idx, nce_t, z, n_data, g)
    exact = _loss_and_grad(reference.crd.crd_contrast, embed.double(), memory.double(), idx, nce_t, z, n_data, g)
    assert loss.dtype == grad.dtype == dtype
    for ours, hi in zip((loss, grad), exact):
        atol = TOLERANCE[dtype]["atol"] * max(1.0, hi.abs().max().item())
        torch.testing.assert_close(ours.double(), hi, rtol=TOLERANCE[dtype]["rtol"], atol=atol)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    gen = torch.Generator().manual_seed(1)
    embed = F.normalize(torch.randn(16, 4, generator=gen, dtype=torch.float64), dim=0).t()  # (4, 16)
    memory = torch.rand(2 * 16, 20, generator=gen, dtype=torch.float64).t()[:, ::2]  # (20, 16)
    idx = torch.randint(0, 20, (9, 4), generator=gen).t()  # (4, 9)
    _check_fp64(path, (embed, memory, idx, 0.1, 3.0, 20), 1.4)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_survives_in_place_memory_update(path):
    """CRD overwrites memory rows after the loss and before backward."""
    gen = torch.Generator().manual_seed(2)
    embed = F.normalize(torch.randn(3, 8, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
    memory = torch.rand(10, 8, generator=gen, dtype=torch.float64) - 0.5
    idx = torch.randint(0, 10, (3, 6), generator=gen)
    expected, = torch.autograd.grad(reference.crd.crd_contrast(embed, memory.clone(), idx, 0.1, 2.0, 10), embed)
    loss = PATHS[path](embed, memory, idx, 0.1, 2.0, 10)
    memory.index_copy_(0, idx[:, 0], torch.ones(3, 8, dtype=torch.float64))
    grad, = torch.autograd.grad(loss, embed)
    assert_close(grad, expected)


@pytest.mark.parametrize("fn", [autograd.CRDContrastFunction.apply, torch_path.CRDContrast.apply], ids=PATHS)
def test_gradcheck(fn):
    gen = torch.Generator().manual_seed(3)
    embed = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    memory = torch.rand(7, 5, generator=gen, dtype=torch.float64) - 0.5
    idx = torch.randint(0, 7, (3, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda e: fn(e, memory, idx, 0.3, 1.5, 7, 1e-7), (embed,))


def test_no_gradient_work_without_grad():
    gen = torch.Generator().manual_seed(4)
    embed = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    memory = torch.rand(7, 5, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 7, (2, 4), generator=gen)
    loss = autograd.crd_contrast(embed, memory, idx, 0.3, 1.5, 7)
    assert loss.grad_fn is None
    assert_close(loss, reference.crd.crd_contrast(embed, memory, idx, 0.3, 1.5, 7))


def test_poisoned_outputs(monkeypatch):
    """Every torch.empty the kernel path allocates is fully written (NaN-filled here)."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(math.nan))
    monkeypatch.setattr(kernels, "TILE", 64)
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 8)
    gen = torch.Generator().manual_seed(5)
    embed = F.normalize(torch.randn(3, 17, generator=gen, dtype=torch.float64), dim=1)
    memory = torch.rand(40, 17, generator=gen, dtype=torch.float64) - 0.5
    idx = torch.randint(0, 40, (3, 30), generator=gen)
    _check_fp64("triton", (embed, memory, idx, 0.1, 5.0, 40), 0.6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_crd_module_matches_reference(backend):
    """Two training steps of the module: loss, embedding-layer gradients, Z and memory."""
    torch.manual_seed(6)
    ref = reference.crd.CRD(s_dim=12, t_dim=10, feat_dim=8, nce_n=15, nce_t=0.1, nce_mom=0.5, n_data=30)
    ours = fastkd.CRD(s_dim=12, t_dim=10, feat_dim=8, nce_n=15, nce_t=0.1, nce_mom=0.5, n_data=30)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        feat_s, feat_t = torch.randn(4, 3, 4, generator=gen), torch.randn(4, 10, generator=gen)
        idx = torch.randperm(30, generator=gen)[:4]
        sample_idx = torch.randint(0, 30, (4, 16), generator=gen)
        sample_idx[:, 0] = idx
        with fastkd.use_backend(backend):
            loss = ours(feat_s, feat_t, idx, sample_idx)
        if backend == "triton":
            assert "CRDContrastFunctionBackward" in str(loss.grad_fn.next_functions)
        expected = ref(feat_s, feat_t, idx, sample_idx)
        assert_close(loss, expected)
        grads = torch.autograd.grad(loss, list(ours.parameters()))
        ref_grads = torch.autograd.grad(expected, list(ref.parameters()))
        for a, b in zip(grads, ref_grads):
            assert_close(a, b)
        assert ours.contrast.Z_s == pytest.approx(ref.contrast.Z_s)
        for name in ("memory_s", "memory_t"):
            assert_close(getattr(ours.contrast, name), getattr(ref.contrast, name))


def _range_forward(embed, memory, sample_idx, nce_t, z, n_data, lo, hi, eps=1e-7):
    """The kernel over bank rows [lo, hi) (memory[lo:hi]); an empty range adds nothing."""
    if hi == lo:
        return torch.zeros((), dtype=torch.float64), torch.zeros_like(embed)
    params = torch.tensor([nce_t, float(z), (sample_idx.shape[1] - 1) / n_data, eps, 1 / embed.shape[0]],
                          dtype=torch.float64)
    return kernels.crd_contrast_forward(embed, memory[lo:hi], sample_idx, params, True, lo, hi)


@BLOCKS
@given(case=crd_case(), data=st.data())
def test_shard_and_its_complement_sum_to_the_whole_bank(blocks, case, data):
    """Bank rows [lo, hi): the kernel's loss and direction over them, plus over [0, lo) and
    [hi, n_data), are the whole bank's (each entry counted in exactly one range)."""
    embed, memory, sample_idx, nce_t, z, n_data = case
    lo = data.draw(st.integers(0, n_data), label="lo")
    hi = data.draw(st.integers(lo, n_data), label="hi")
    with mock.patch.multiple(kernels, **blocks):
        whole = _range_forward(embed, memory, sample_idx, nce_t, z, n_data, 0, n_data)
        parts = [_range_forward(embed, memory, sample_idx, nce_t, z, n_data, a, b)
                 for a, b in ((lo, hi), (0, lo), (hi, n_data))]
    for i, what in enumerate(("loss", "direction")):
        torch.testing.assert_close(sum(p[i] for p in parts), whole[i], rtol=1e-12, atol=1e-13,
                                   msg=lambda m: f"{what} over [{lo}, {hi}) and its complement\n{m}")
    # Only the entries of the range count: a shard holding none of them gives nothing.
    inside = ((sample_idx >= lo) & (sample_idx < hi)).any()
    if not inside:
        assert parts[0][0] == 0 and not parts[0][1].any()


@given(case=crd_case(), data=st.data(), g=upstream)
def test_shard_function_matches_the_torch_shard_contrast(case, data, g):
    """fastkd.global_crd's sharded-bank contrast, Triton (crd_contrast_shard) against the torch
    one (_OwnedContrast) on the same shard: loss and embedding gradient, -(1/B) both."""
    embed, memory, sample_idx, nce_t, z, n_data = case
    lo = data.draw(st.integers(0, n_data - 1), label="lo")
    hi = data.draw(st.integers(lo + 1, n_data), label="hi")
    shard = memory[lo:hi]
    e = embed.clone().requires_grad_(True)
    loss = autograd.crd_contrast_shard(e, shard, sample_idx, nce_t, z, n_data, 1e-7, lo, hi)
    grad, = torch.autograd.grad(loss, e, torch.tensor(g, dtype=loss.dtype))
    b, k = ((sample_idx >= lo) & (sample_idx < hi)).nonzero(as_tuple=True)
    e2 = embed.clone().requires_grad_(True)
    expected = global_crd._OwnedContrast.apply(e2, shard, b, sample_idx[b, k] - lo, k == 0, nce_t, z,
                                               (sample_idx.shape[1] - 1) / n_data, 1e-7, embed.shape[0])
    expected_grad, = torch.autograd.grad(expected, e2, torch.tensor(g, dtype=expected.dtype))
    assert_close(loss, expected, msg="loss")
    assert_close(grad, expected_grad, msg="embedding gradient")
