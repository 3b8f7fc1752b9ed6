"""fastkd.compat.repdistiller: RepDistiller's losses on fastkd.

(a) Always on: each class against fastkd's references (fastkd.reference and
    fastkd.reference.repdistiller) in float64, loss and gradients; state_dict names and
    strict loading; CRD's memory banks after steps with a fixed seed; bad input.
(b) Opt-in: every class against RepDistiller's own code (HobbitLong/RepDistiller,
    ``distiller_zoo/`` and ``crd/``, loaded by path), on identical inputs, float64 and
    float32 (float32 held to RepDistiller's own float32 error against float64), wide
    spreads with near-duplicate rows included. Runs when FASTKD_REPDISTILLER points to a
    checkout of RepDistiller:

        FASTKD_REPDISTILLER=/path/to/RepDistiller python -m pytest tests/test_repdistiller.py
"""
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

import fastkd
import fastkd.reference as fref
from fastkd import backend
from fastkd.compat import repdistiller as rd
from fastkd.compat.repdistiller import (ABLoss, Attention, Correlation, CRDLoss, DistillKL, FactorTransfer,
                                        FSP, HintLoss, KDSVD, NSTLoss, PKT, RKDLoss, Similarity, VIDLoss)
from fastkd.reference import repdistiller as ref

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=D64, scale=1.0, grad=True):
    x = (torch.randn(*shape, generator=_gen(seed), dtype=D64) * scale).to(dtype)
    return x.requires_grad_(grad)


def _spread(n, d, seed=0, dtype=D64, grad=True):
    """Non-negative rows spread over ~5000, with rows 1 and 0 only 0.3 apart (DESIGN.md's case;
    no row all 0, where RepDistiller's PKT has a NaN gradient)."""
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=D64).abs() * torch.logspace(0, 3.7, n, dtype=D64)[:, None]
    x[1] = x[0] + 0.3 * torch.randn(d, generator=g, dtype=D64) / d ** 0.5
    return x.to(dtype).requires_grad_(grad)


def _total(out, seed=7):
    """A scalar of the losses under random upstream weights (a list or one tensor)."""
    outs = out if isinstance(out, list) else [out]
    g = _gen(seed)
    return sum(o.sum() * (0.5 + torch.rand((), generator=g, dtype=D64)) for o in outs)


def _grads(out, inputs):
    return torch.autograd.grad(_total(out), inputs, allow_unused=True)


def _close(a, b, rtol=1e-10, atol=1e-13):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rtol, atol)
        return
    if a is None or b is None:
        assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        return
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _maps(seed=0, spatial=(8, 4), channels=(4, 8), batch=3):
    g_s = [_randn(batch, c, h, h, seed=seed + i) for i, (c, h) in enumerate(zip(channels, spatial))]
    g_t = [_randn(batch, c, h, h, seed=seed + 10 + i, grad=False) for i, (c, h) in enumerate(zip(channels, spatial))]
    return g_s, g_t


# ---------------------------------------------------------------------------------------
# (a) against fastkd's references
# ---------------------------------------------------------------------------------------

def test_distill_kl_and_hint():
    y_s, y_t = _randn(5, 7, seed=1), _randn(5, 7, seed=2, grad=False)
    _close(DistillKL(4)(y_s, y_t), fref.st.soft_target(y_s, y_t, 4))
    _close(_grads(DistillKL(4)(y_s, y_t), y_s), _grads(fref.st.soft_target(y_s, y_t, 4), y_s))
    hl = HintLoss()
    assert isinstance(hl.crit, torch.nn.MSELoss)
    _close(hl(y_s, y_t), TF.mse_loss(y_s, y_t))


def test_relational_losses_against_references():
    f_s, f_t = _randn(6, 5, seed=3), _randn(6, 9, seed=4)
    # RKD: the teacher's terms are constants.
    out = RKDLoss()(f_s, f_t)
    assert out.dim() == 0
    want = fref.rkd.rkd(f_s, f_t.detach(), 25, 50)
    _close(out, want)
    g = _grads(RKDLoss()(f_s, f_t), (f_s, f_t))
    _close(g[0], _grads(want, f_s)[0])
    assert g[1] is None
    _close(RKDLoss(w_d=1, w_a=2)(f_s.view(6, 5, 1), f_t), fref.rkd.rkd(f_s, f_t.detach(), 1, 2))
    # PKT with eps 1e-7.
    want = fref.pkt.pkt_cos_sim(f_s, f_t, 1e-7)
    _close(PKT()(f_s, f_t), want)
    _close(_grads(PKT()(f_s, f_t), (f_s, f_t)), _grads(want, (f_s, f_t)))
    _close(PKT.cosine_similarity_loss(f_s, f_t), want)
    # Similarity: one (1,) loss per pair.
    g_s, g_t = _maps(5)
    out = Similarity()(g_s, g_t)
    assert isinstance(out, list) and len(out) == 2 and all(o.shape == (1,) for o in out)
    want = [fref.sp.sp(s, t).reshape(1) for s, t in zip(g_s, g_t)]
    _close(out, want)
    _close(_grads(out, g_s), _grads(want, g_s))
    # Correlation by hand: |D| rows (1, 2), (3, 0), (1, 1) -> mean(1*3 + 0, 3*1 + 0) = 3.
    d = torch.tensor([[1., -2.], [3., 0.], [-1., 1.]], dtype=D64)
    assert Correlation()(d, torch.zeros_like(d)).item() == 3.0
    f_t2 = _randn(6, 5, seed=5)
    _close(_grads(Correlation()(f_s, f_t2), (f_s, f_t2)), _grads(ref.correlation(f_s, f_t2), (f_s, f_t2)))


def test_spread_near_duplicates_against_reference():
    f_s, f_t = _spread(8, 6, seed=1), _spread(8, 6, seed=2, grad=False)
    for ours, want in ((RKDLoss()(f_s, f_t), fref.rkd.rkd(f_s, f_t, 25, 50)),
                       (PKT()(f_s, f_t), fref.pkt.pkt_cos_sim(f_s, f_t, 1e-7))):
        _close(ours, want, rtol=1e-9)
        _close(_grads(ours, f_s), _grads(want, f_s), rtol=1e-8, atol=1e-12)


def test_feature_map_lists_against_references():
    g_s, g_t = _maps(20, spatial=(8, 4), channels=(4, 4))
    g_t_wide = [_randn(3, 6, 16, 16, seed=30, grad=False), _randn(3, 5, 2, 2, seed=31, grad=False)]
    # Attention: channels differ, the larger map pooled.
    out = Attention()(g_s, g_t_wide)
    want = [ref.attention(s, t, 2) for s, t in zip(g_s, g_t_wide)]
    _close(out, want)
    _close(_grads(out, g_s), _grads(want, g_s))
    # NST: fastkd.functional.nst when the teacher needs no grad; the reference's detached
    # teacher self-term otherwise.
    g_tn = [_randn(3, 6, 8, 8, seed=32, grad=False), _randn(3, 5, 8, 8, seed=33, grad=False)]
    out = NSTLoss()(g_s, g_tn)
    want = [ref.nst(s, t) for s, t in zip(g_s, g_tn)]
    _close(out, want)
    _close(_grads(out, g_s), _grads(want, g_s))
    g_tg = [t.clone().requires_grad_() for t in g_tn]
    _close(_grads(NSTLoss()(g_s, g_tg), g_tg), _grads([ref.nst(s, t) for s, t in zip(g_s, g_tg)], g_tg))
    # FSP on consecutive maps: the collection's FSP matrices (the transposed flow) and mse.
    fsp = FSP([s.shape for s in g_s], [t.shape for t in g_t])
    out = fsp(g_s, g_t)
    want = [fref.fsp.fsp(g_s[0], g_s[1], g_t[0], g_t[1])]
    _close(out, want)
    _close(_grads(out, g_s), _grads(want, g_s))
    _close([m.transpose(1, 2) for m in FSP.compute_fsp(g_s)], [fref.fsp.fsp_matrix(g_s[0], g_s[1])])
    # AB with its per-layer weights.
    out = ABLoss(2)(g_s, g_t)
    want = ref.ab_losses(g_s, g_t, 2, 1.0)
    _close(out, want)
    _close(_grads(out, g_s), _grads(want, g_s))
    assert ABLoss(3).w == [0.25, 0.5, 1]
    # KDSVD: len - 1 losses.
    out = KDSVD()(g_s, g_t)
    assert len(out) == 1 and torch.isfinite(out[0])
    _close(out, ref.kdsvd(g_s, g_t, 1))


@pytest.mark.parametrize("p2", [1, 2])
def test_factor_transfer(p2):
    f_s, f_t = _randn(3, 4, 8, 8, seed=40), _randn(3, 6, 4, 4, seed=41, grad=False)
    out = FactorTransfer(p2=p2)(f_s, f_t)
    want = ref.factor_transfer(f_s, f_t, 2, p2)
    _close(out, want)
    _close(_grads(out, f_s), _grads(want, f_s))


def _clamped_maps(seed, dtype=D64):
    """Attention's maps with samples where F.normalize's clamp holds (norm of the channel mean
    below 1e-12): a dead student sample, student and teacher samples near 1e-7."""
    g_s, g_t = _lists(seed, dtype, channels=(4, 8), teacher_channels=(6, 10), spatial=(8, 4))
    g_t[0] = _randn(3, 6, 16, 16, seed=seed + 20, dtype=dtype, grad=False)  # pooled to 8x8
    with torch.no_grad():
        g_s[0][1] *= 1e-7
        g_s[1][2] = 0
        g_t[1][0] *= 1e-7
    return g_s, g_t


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_attention_and_factor_transfer_reach_fastkd_at(backend_name, monkeypatch):
    """Even powers run fastkd's AT with normalize=True (on either backend); other powers, and
    FactorTransfer's p2 other than 1 and 2, the reference. Values and gradients are the
    reference's in float64, with dead and sub-clamp samples."""
    calls = []
    impl = backend.IMPLEMENTATIONS["at"][backend_name]
    monkeypatch.setitem(backend.IMPLEMENTATIONS["at"], backend_name,
                        lambda *args: calls.append(args[2:]) or impl(*args))
    g_s, g_t = _clamped_maps(60)
    with fastkd.use_backend(backend_name):
        for p, fused in ((2, True), (4, True), (3, False)):
            calls.clear()
            out = Attention(p)(g_s, g_t)
            want = [ref.attention(s, t, p) for s, t in zip(g_s, g_t)]
            assert calls == ([(float(p), True)] * 2 if fused else []), p
            _close(out, want)
            _close(_grads(out, g_s), _grads(want, g_s))
        f_s, f_t = g_s[0], g_t[0]
        for p1, p2, fused in ((2, 2, True), (4, 2, True), (3, 2, False), (2, 3, False), (2, 1, False)):
            calls.clear()
            out = FactorTransfer(p1, p2)(f_s, f_t)
            want = ref.factor_transfer(f_s, f_t, p1, p2)
            assert calls == ([(p1, True)] if fused else []), (p1, p2)
            _close(out, want)
            _close(_grads(out, f_s), _grads(want, f_s))


def test_vid_state_dict_and_values():
    torch.manual_seed(0)
    vid = VIDLoss(4, 6, 5).double()
    assert list(vid.state_dict()) == ["log_scale", "regressor.0.weight", "regressor.2.weight",
                                      "regressor.4.weight"]
    _close(TF.softplus(vid.log_scale) + 1e-5, torch.full((5,), 5.0, dtype=D64), rtol=1e-6)
    f_s, f_t = _randn(2, 4, 8, 8, seed=50), _randn(2, 5, 4, 4, seed=51, grad=False)
    out = vid(f_s, f_t)
    want = fref.vid.vid(vid.regressor(TF.adaptive_avg_pool2d(f_s, (4, 4))), f_t, vid.log_scale, 1e-5)
    _close(out, want)
    params = list(vid.parameters())
    _close(_grads(out, [f_s, *params]), _grads(want, [f_s, *params]))
    other = VIDLoss(4, 6, 5).double()
    other.load_state_dict(vid.state_dict(), strict=True)
    _close(other(f_s, f_t), out)


def _opt(**kw):
    base = dict(s_dim=10, t_dim=12, feat_dim=8, nce_k=5, nce_t=0.07, nce_m=0.5, n_data=20)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_crd_state_dict_and_banks_against_reference(capsys):
    torch.manual_seed(0)
    crd = CRDLoss(_opt()).double()
    assert sorted(crd.state_dict()) == ["contrast.memory_v1", "contrast.memory_v2", "contrast.params",
                                        "embed_s.linear.bias", "embed_s.linear.weight",
                                        "embed_t.linear.bias", "embed_t.linear.weight"]
    # RepDistiller's params: a float32 tensor, so T is float32(0.07) (read back from it), even
    # after .double().
    t32 = torch.tensor(0.07).item()
    assert crd.contrast.params.tolist() == [5, t32, -1, -1, 0.5]
    # fastkd's reference CRD: memory_s is the student's bank (memory_v1), memory_t the teacher's.
    want = fref.CRD(10, 12, 8, 5, t32, 0.5, 20).double()
    want.embed_s.load_state_dict(crd.embed_s.state_dict())
    want.embed_t.load_state_dict(crd.embed_t.state_dict())
    want.contrast.memory_s.copy_(crd.contrast.memory_v1)
    want.contrast.memory_t.copy_(crd.contrast.memory_v2)
    g = _gen(3)
    for step in range(3):
        f_s, f_t = _randn(4, 10, seed=60 + step), _randn(4, 12, seed=70 + step, grad=False)
        idx = torch.randperm(20, generator=g)[:4]
        cidx = torch.randint(0, 20, (4, 6), generator=g)
        cidx[:, 0] = idx
        out = crd(f_s, f_t, idx, cidx)
        assert out.shape == (1,)
        w = want(f_s, f_t, idx, cidx)
        _close(out[0], w)
        ps = [f_s, *crd.embed_s.parameters()]
        _close(_grads(out, ps), _grads(w, [f_s, *want.embed_s.parameters()]))
        _close(crd.contrast.memory_v1, want.contrast.memory_s, rtol=1e-13, atol=1e-15)
        _close(crd.contrast.memory_v2, want.contrast.memory_t, rtol=1e-13, atol=1e-15)
        assert crd.contrast.params[2].item() == pytest.approx(want.contrast.Z_s, rel=1e-14)
        assert crd.contrast.params[3].item() == pytest.approx(want.contrast.Z_t, rel=1e-14)
    assert "normalization constant Z_v1 is set to" in capsys.readouterr().out
    # The state (banks and Z in params) round-trips, strictly.
    again = CRDLoss(_opt()).double()
    again.load_state_dict(crd.state_dict(), strict=True)
    f_s, f_t = _randn(4, 10, seed=80), _randn(4, 12, seed=81, grad=False)
    idx, cidx = torch.arange(4), torch.randint(0, 20, (4, 6), generator=g)
    _close(again(f_s, f_t, idx, cidx), crd(f_s, f_t, idx, cidx))
    # ContrastMemory itself returns RepDistiller's (B, K + 1, 1) scores.
    out_v1, out_v2 = crd.contrast(crd.embed_s(f_s), crd.embed_t(f_t), idx, cidx)
    assert out_v1.shape == out_v2.shape == (4, 6, 1)
    assert crd.criterion_s(out_v1).shape == (1,)


def test_crd_draws_negatives_on_the_cpu():
    torch.manual_seed(1)
    crd = CRDLoss(_opt(n_data=30, nce_k=7))
    idx = torch.tensor([3, 1, 4, 2])
    f_s, f_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 12)
    loss = crd(f_s, f_t, idx)
    assert loss.shape == (1,) and torch.isfinite(loss).all()
    loss.backward()
    assert f_s.grad is not None
    a = rd.AliasMethod(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.manual_seed(0)
    draws = a.draw(20000)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    _close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64), rtol=0, atol=0.02)


def test_bad_input_is_refused():
    g_s, g_t = _maps(90)
    with pytest.raises(ValueError, match="as many maps"):
        Attention()(g_s, g_t[:1])
    with pytest.raises(TypeError, match="g_s must be a list"):
        NSTLoss()(g_s[0], g_t[0])
    with pytest.raises(TypeError, match=r"g_t\[1\] must be a torch.Tensor"):
        Similarity()(g_s, [g_t[0], "x"])
    with pytest.raises(ValueError, match="num of channels not equal"):
        FSP([(1, 4, 8, 8)], [(1, 5, 8, 8)])
    with pytest.raises(ValueError, match="unequal length"):
        FSP([(1, 4, 8, 8)], [])
    with pytest.raises(ValueError, match="square"):
        KDSVD()([torch.randn(2, 3, 4, 5)], [torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="batch"):
        RKDLoss()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="T"):
        DistillKL(0.0)
    crd = CRDLoss(_opt())
    with pytest.raises(ValueError, match="idx"):
        crd(torch.randn(4, 10), torch.randn(4, 12), torch.arange(4), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="y"):
        crd(torch.randn(4, 10), torch.randn(4, 12), torch.arange(4) + 30)
    assert crd.contrast.params[2].item() == -1  # nothing fixed or written by a refused call


# ---------------------------------------------------------------------------------------
# (b) opt-in: against RepDistiller's own code
# ---------------------------------------------------------------------------------------

_RD_ENV = os.environ.get("FASTKD_REPDISTILLER", "")
_RD_ROOT = Path(_RD_ENV).expanduser() if _RD_ENV else None
_RD_REASON = ("opt-in parity against RepDistiller's own distiller_zoo/ and crd/: set "
              "FASTKD_REPDISTILLER to a checkout of HobbitLong/RepDistiller to run it")
if _RD_ROOT is not None and not ((_RD_ROOT / "distiller_zoo").is_dir() and (_RD_ROOT / "crd").is_dir()):
    _RD_REASON = (f"parity against RepDistiller: FASTKD_REPDISTILLER={_RD_ENV!r} holds no checkout of "
                  "it (no distiller_zoo/ and crd/ there)")
    _RD_ROOT = None
parity = pytest.mark.skipif(_RD_ROOT is None, reason=_RD_REASON)


def _load_package(name):
    """RepDistiller's package name (distiller_zoo or crd) loaded by path, under a private name."""
    full = f"_repdistiller_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, _RD_ROOT / name / "__init__.py",
                                                  submodule_search_locations=[str(_RD_ROOT / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo():
    return _load_package("distiller_zoo")


@pytest.fixture(scope="module")
def crd_pkg():
    _load_package("crd")
    memory = importlib.import_module("_repdistiller_crd.memory")
    memory.AliasMethod.cuda = lambda self: None  # its constructor moves the sampler to CUDA
    return importlib.import_module("_repdistiller_crd.criterion")


def _to_list(out):
    return out if isinstance(out, list) else [out]


def _run(module, args, wrt):
    """Losses (a list) and the gradients of wrt (inputs, then parameters)."""
    out = _to_list(module(*args))
    grads = torch.autograd.grad(_total(out), wrt, allow_unused=True)
    return [o.detach() for o in out], [None if g is None else g.detach() for g in grads]


def _err(a, b):
    """Largest |a - b| over a list of tensors (None counts as 0), relative to b's largest |.|."""
    worst = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            assert (x is None or x.abs().max() == 0) and (y is None or y.abs().max() == 0)
            continue
        scale = y.abs().max().item() or 1.0
        worst = max(worst, ((x.double() - y.double()).abs().max().item()) / scale)
    return worst


# Each case: (name, builder(dtype) -> (their module, our module, args, wrt indices of args)).
def _lists(seed, dtype, spatial=(8, 4, 4), channels=(4, 8, 8), teacher_channels=None, spread=False):
    tc = teacher_channels or channels
    s = [_randn(3, c, h, h, seed=seed + i, dtype=dtype, scale=50.0 if spread else 1.0)
         for i, (c, h) in enumerate(zip(channels, spatial))]
    t = [_randn(3, c, h, h, seed=seed + 10 + i, dtype=dtype, grad=False, scale=50.0 if spread else 1.0)
         for i, (c, h) in enumerate(zip(tc, spatial))]
    if spread:  # post-ReLU maps over a wide range, two near-duplicate samples
        s = [torch.relu(x.detach()) * torch.logspace(0, 2, 3, dtype=dtype).view(3, 1, 1, 1) for x in s]
        s = [torch.cat([x[:1], x[:1] + 0.01, x[2:]]).requires_grad_() for x in s]
    return s, t


def _vecs(seed, dtype, spread, n=16, d_s=12, d_t=20):
    if spread:
        return _spread(n, d_s, seed, dtype), _spread(n, d_t, seed + 1, dtype, grad=False)
    return _randn(n, d_s, seed=seed, dtype=dtype), _randn(n, d_t, seed=seed + 1, dtype=dtype, grad=False)


def _case(name, zoo, dtype, spread):
    """(theirs, ours, args, number of args to differentiate)."""
    if name == "DistillKL":
        a = [_randn(8, 10, seed=1, dtype=dtype, scale=30 if spread else 3),
             _randn(8, 10, seed=2, dtype=dtype, grad=False, scale=30 if spread else 3)]
        return zoo.DistillKL(4), DistillKL(4), a, 1
    if name == "HintLoss":
        a = [_randn(3, 4, 4, 4, seed=1, dtype=dtype), _randn(3, 4, 4, 4, seed=2, dtype=dtype, grad=False)]
        return zoo.HintLoss(), HintLoss(), a, 1
    if name in ("Attention", "NSTLoss"):
        s, t = _lists(3, dtype, channels=(4, 8, 8), teacher_channels=(6, 10, 12), spatial=(8, 4, 4),
                      spread=spread)
        t[0] = _randn(3, 6, 16, 16, seed=33, dtype=dtype, grad=False)  # pooled to the student's 8x8
        return getattr(zoo, name)(), (Attention() if name == "Attention" else NSTLoss()), [s, t], 1
    if name == "Attention_clamped":
        s, t = _clamped_maps(16, dtype)
        return zoo.Attention(), Attention(), [s, t], 1
    if name == "NSTLoss_teacher_grad":
        s, t = _lists(4, dtype, channels=(4, 8), teacher_channels=(6, 5), spatial=(8, 4))
        t = [x.detach().requires_grad_() for x in t]
        return zoo.NSTLoss(), NSTLoss(), [s, t], 2
    if name == "Similarity":
        s, t = _lists(5, dtype, spread=spread)
        return zoo.Similarity(), Similarity(), [s, t], 1
    if name in ("RKDLoss", "PKT"):
        f_s, f_t = _vecs(6, dtype, spread)
        return getattr(zoo, name)(), (RKDLoss() if name == "RKDLoss" else PKT()), [f_s, f_t], 1
    if name == "Correlation":
        f_s, f_t = _vecs(7, dtype, spread, d_t=12)
        f_t = f_t.detach().requires_grad_()
        return zoo.Correlation(), Correlation(), [f_s, f_t], 2
    if name == "FSP":
        s, t = _lists(8, dtype, spatial=(8, 4, 4), channels=(4, 8, 6), spread=spread)
        shapes = [x.shape for x in s]
        return zoo.FSP(shapes, shapes), FSP(shapes, shapes), [s, t], 1
    if name in ("FactorTransfer", "FactorTransfer_p2"):
        f_s = _randn(3, 4, 8, 8, seed=9, dtype=dtype, scale=20 if spread else 1)
        f_t = _randn(3, 6, 4, 4, seed=10, dtype=dtype, grad=False)
        p2 = 1 if name == "FactorTransfer" else 2
        return zoo.FactorTransfer(p2=p2), FactorTransfer(p2=p2), [f_s, f_t], 1
    if name == "ABLoss":
        s, t = _lists(11, dtype, spread=spread)
        t = [x * 3 - 0.5 for x in t]
        return zoo.ABLoss(3), ABLoss(3), [s, t], 1
    if name == "VIDLoss":
        torch.manual_seed(12)
        theirs = zoo.VIDLoss(4, 6, 5).to(dtype)
        ours = VIDLoss(4, 6, 5).to(dtype)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        f_s = _randn(3, 4, 8, 8, seed=13, dtype=dtype, scale=10 if spread else 1)
        f_t = _randn(3, 5, 4, 4, seed=14, dtype=dtype, grad=False)
        return theirs, ours, [f_s, f_t], 1
    if name == "KDSVD":
        # Well-separated singular values: random maps' nearly equal ones make the singular
        # vectors (and the alignment's choice) flip between float32 and float64.
        s = [_svd_maps(3, 6, h, seed=15 + i, dtype=dtype) for i, h in enumerate((8, 8, 4))]
        t = [_svd_maps(3, 6, h, seed=25 + i, dtype=dtype, grad=False) for i, h in enumerate((8, 8, 4))]
        return zoo.KDSVD(), KDSVD(), [s, t], 1
    raise KeyError(name)


def _svd_maps(b, c, h, seed, dtype, grad=True):
    """(b, c, h, h) maps whose (h h, c) matrices have singular values 8, 4, 2, 1, 0.5, ..."""
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(b, h * h, c, generator=g, dtype=D64))
    v, _ = torch.linalg.qr(torch.randn(b, c, c, generator=g, dtype=D64))
    sv = 8.0 * 0.5 ** torch.arange(c, dtype=D64)
    x = (u * sv) @ v.transpose(1, 2)  # (b, h h, c)
    return x.transpose(1, 2).reshape(b, c, h, h).to(dtype).requires_grad_(grad)


PARITY_CASES = ["DistillKL", "HintLoss", "Attention", "Attention_clamped", "Similarity", "Correlation", "RKDLoss",
                "PKT", "NSTLoss", "NSTLoss_teacher_grad", "FSP", "FactorTransfer", "FactorTransfer_p2", "ABLoss",
                "VIDLoss", "KDSVD"]
# Cases that have no wide-spread variant (teacher gradient, clamped attention maps, KDSVD's
# SVD of random maps) run on the ordinary inputs only.
SPREAD_CASES = [c for c in PARITY_CASES if c not in ("NSTLoss_teacher_grad", "KDSVD", "HintLoss",
                                                     "Attention_clamped")]
PARITY_ERRORS = {}  # (case, dtype, spread) -> (ours, theirs) errors, printed by the last test


def _flat_args(args, n_grad):
    wrt = []
    for a in args[:n_grad]:
        wrt.extend(a if isinstance(a, list) else [a])
    return wrt


def _measure(zoo, name, spread):
    """float64: ours vs theirs; float32: ours and theirs each vs theirs in float64."""
    theirs, ours, args, n = _case(name, zoo, D64, spread)
    params = list(ours.parameters())
    wrt = _flat_args(args, n)
    their_out, their_grads = _run(theirs, args, wrt + list(theirs.parameters()))
    our_out, our_grads = _run(ours, args, wrt + params)
    assert [o.shape for o in our_out] == [o.shape for o in their_out]
    e64 = max(_err(our_out, their_out), _err(our_grads, their_grads))
    theirs32, ours32, args32, _ = _case(name, zoo, torch.float32, spread)
    wrt32 = _flat_args(args32, n)
    t32_out, t32_grads = _run(theirs32, args32, wrt32 + list(theirs32.parameters()))
    o32_out, o32_grads = _run(ours32, args32, wrt32 + list(ours32.parameters()))
    their32 = max(_err(t32_out, their_out), _err(t32_grads, their_grads))
    our32 = max(_err(o32_out, their_out), _err(o32_grads, their_grads))
    return e64, our32, their32


@parity
@pytest.mark.parametrize("spread", [False, True], ids=["random", "spread"])
@pytest.mark.parametrize("name", PARITY_CASES)
def test_parity_with_repdistiller(zoo, name, spread):
    if spread and name not in SPREAD_CASES:
        pytest.skip(f"{name}: no wide-spread variant")
    e64, our32, their32 = _measure(zoo, name, spread)
    PARITY_ERRORS[(name, spread)] = (e64, our32, their32)
    assert e64 <= 1e-10, f"{name}: float64 relative error {e64:.3g} against RepDistiller"
    # float32: within RepDistiller's own float32 error against float64 (a small factor and
    # a floor of a few float32 ulps, for where RepDistiller's own rounding happens to be 0).
    assert our32 <= 8 * their32 + 4e-6, f"{name}: float32 error {our32:.3g}, RepDistiller's {their32:.3g}"


@parity
@pytest.mark.parametrize("spread", [False, True], ids=["random", "spread"])
@pytest.mark.parametrize("name", ["Attention", "Attention_clamped", "FactorTransfer_p2"])
def test_attention_parity_on_the_triton_kernels(zoo, name, spread):
    """Attention and FactorTransfer(p2=2) on the Triton kernels (on CUDA what the auto backend
    runs; here through the interpreter), against RepDistiller's own code."""
    if spread and name not in SPREAD_CASES:
        pytest.skip(f"{name}: no wide-spread variant")
    with fastkd.use_backend("triton"):
        e64, our32, their32 = _measure(zoo, name, spread)
    PARITY_ERRORS[(f"{name} (triton)", spread)] = (e64, our32, their32)
    assert e64 <= 1e-10, f"{name}: float64 relative error {e64:.3g} against RepDistiller"
    assert our32 <= 8 * their32 + 4e-6, f"{name}: float32 error {our32:.3g}, RepDistiller's {their32:.3g}"


def _crd_steps(module, dtype):
    """3 steps (2 with negatives drawn from a fixed seed, 1 given): per step the loss, the
    gradients of f_s and embed_s, and the banks and params after it."""
    results = []
    for step in range(3):
        f_s = _randn(6, 10, seed=100 + step, dtype=dtype)
        f_t = _randn(6, 12, seed=200 + step, dtype=dtype, grad=False)
        idx = torch.randperm(40, generator=_gen(step))[:6]
        args = [f_s, f_t, idx]
        if step == 2:
            cidx = torch.randint(0, 40, (6, 10), generator=_gen(9))
            cidx[:, 0] = idx
            args.append(cidx)
        torch.manual_seed(step)
        out, grads = _run(module, args, [f_s, *module.embed_s.parameters()])
        state = [getattr(module.contrast, k).clone() for k in ("memory_v1", "memory_v2", "params")]
        results.append((out, grads, state))
    return results


@parity
def test_crd_parity_with_repdistiller(crd_pkg, capsys):
    """Loss, gradients (input and embedding), banks and params after each of 3 steps; the
    same banks and weights from the same seed; the same negatives drawn from the same seed;
    both ways of strict state_dict loading. float32 held to RepDistiller's own float32 error."""
    opt = _opt(n_data=40, nce_k=9, feat_dim=8)
    runs = {}
    for dtype in (D64, torch.float32):
        torch.manual_seed(0)
        theirs = crd_pkg.CRDLoss(opt).to(dtype)
        torch.manual_seed(0)
        ours = CRDLoss(opt).to(dtype)
        for (k, v), (k2, v2) in zip(theirs.state_dict().items(), ours.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        runs[dtype] = (_crd_steps(theirs, dtype), _crd_steps(ours, dtype))
    capsys.readouterr()

    def err(a, b):
        (oa, ga, sa), (ob, gb, sb) = a, b
        assert oa[0].shape == ob[0].shape == (1,)
        return max(_err(oa, ob), _err(ga, gb), _err(sa, sb))

    (t64, o64), (t32, o32) = runs[D64], runs[torch.float32]
    e64 = max(err(o, t) for o, t in zip(o64, t64))
    our32 = max(err(o, t) for o, t in zip(o32, t64))
    their32 = max(err(o, t) for o, t in zip(t32, t64))
    PARITY_ERRORS[("CRDLoss", False)] = (e64, our32, their32)
    assert e64 <= 1e-12, f"CRDLoss float64: {e64:.3g}"
    assert our32 <= 8 * their32 + 4e-6, f"CRDLoss float32: {our32:.3g}, RepDistiller's {their32:.3g}"


@parity
def test_parity_report():
    """Prints the measured errors (run with -s)."""
    for key, value in sorted(PARITY_ERRORS.items(), key=str):
        print("parity", key, value)


@parity
@pytest.mark.parametrize("mode", ["kd", "hint", "attention", "similarity", "correlation", "vid", "crd", "kdsvd",
                                  "fsp", "rkd", "pkt", "abound", "factor", "nst"])
def test_train_student_with_fastkd(mode, tmp_path):
    """RepDistiller's train_student.py, unchanged, with its own losses and with fastkd's
    (benchmarks/repdistiller_train.py): the same losses and final weights in float64, and in
    float32 the weights as far from RepDistiller's float64 ones as RepDistiller's own."""
    spec = importlib.util.spec_from_file_location(
        "_repdistiller_train", Path(__file__).resolve().parents[1] / "benchmarks" / "repdistiller_train.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    [(_, n, loss64, weights64, ours32, theirs32, _, _)] = harness.compare(_RD_ROOT.resolve(), [mode], tmp_path)
    assert n >= 4
    assert loss64 <= 1e-12 and weights64 <= 1e-12, (loss64, weights64)
    assert ours32 <= 2 * theirs32 + 1e-6, (ours32, theirs32)
