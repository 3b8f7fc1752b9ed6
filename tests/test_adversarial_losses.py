"""Adversarial inputs for every non-pairwise loss, on both fast backends (torch, triton).

Each example draws values of one hard kind (spread over 1..5000 with ReLU zeros, a +-1e3
common offset, scale 1e-4 or 1e4, dead rows and channels, duplicate rows), a student that is
independent of the teacher, nearly equal to it (1e-4 noise) or equal, odd sizes from batch 1
(2 where the loss needs pairs) upward, contiguous or strided inputs, and a dtype (float32,
bfloat16, float16). The loss and the gradient of every input that requires grad (under a
random upstream gradient) must be within 10x the reference's own error in that dtype of the
float64 reference (helpers.assert_within_reference_error), finite wherever the reference's
result is finite; KL-type losses never negative; no input modified.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import reference
from fastkd.backend import IMPLEMENTATIONS
from fastkd.kernels import elementwise as elementwise_kernels
from fastkd.reference.crd import contrast_scores, normalizer
from fastkd.reference.nst import poly_kernel
from helpers import assert_within_reference_error

F64 = torch.float64
KINDS = ("normal", "spread", "offset", "tiny", "huge", "dead", "duplicate")
RELATIONS = ("independent", "near", "equal")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KL_OPS = ("soft_target", "dml", "bss")


def values(g, shape, kind):
    """float64 values of shape, of one adversarial kind; dim 0 is the batch, dim 1 channels."""
    x = torch.randn(shape, generator=g, dtype=F64)
    if kind == "spread":  # 1..5000 with ReLU-like zeros
        x = (torch.rand(shape, generator=g, dtype=F64) * 4999 + 1) * (torch.rand(shape, generator=g) > 0.4)
    elif kind == "offset":
        x = x + (1e3 if torch.rand((), generator=g) > 0.5 else -1e3)
    elif kind == "tiny":
        x = x * 1e-4
    elif kind == "huge":
        x = x * 1e4
    elif kind == "dead":  # a dead channel and a dead sample
        x[:, 0] = 0
        x[-1] = 0
    elif kind == "duplicate" and shape[0] > 1:
        x[1::2] = x[0:1]
    return x


def pair(g, shape, case):
    """(student, teacher) float64 values of one shape with the case's kind and relation."""
    t = values(g, shape, case["kind"])
    if case["relation"] == "equal":
        return t.clone(), t
    if case["relation"] == "near":
        return t + 1e-4 * torch.randn(shape, generator=g, dtype=F64), t
    return values(g, shape, case["kind"]), t


def strided(x):
    """x as a non-contiguous view (every other element of a larger buffer's last dim)."""
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    big[..., ::2] = x
    return big[..., ::2]


def _plain(tensors, extra):
    return lambda impl, xs: impl(*xs, *extra)


# --- inputs of each loss: (tensors float64, which are cast to the low dtype, which need grad,
#     call(impl, leaves) -> loss) --------------------------------------------------------------

def _maps(g, c):
    s, t = pair(g, (c["B"], c["C"], c["H"], c["W"]), c)
    return [s, t]


def make_logits(g, c):
    s, t = pair(g, (c["B"], c["K"]), c)
    return [s, t], (True, True), (0, 1), _plain([], ())


def make_kl(T):
    def make(g, c):
        shape = (c["B"], c["K"]) if c["H"] % 2 else (c["B"], c["K"], c["H"])  # classes on dim 1
        s, t = pair(g, shape, c)
        return [s, t], (True, True), (0, 1) if c["W"] % 2 else (0,), _plain([], (T,) if T else ())
    return make


def make_maps(*extra):
    return lambda g, c: (_maps(g, c), (True, True), (0, 1), _plain([], extra))


def make_at(g, c):
    s, _ = pair(g, (c["B"], c["C"], c["H"], c["W"]), c)
    t = values(g, (c["B"], c["C2"], c["H"], c["W"]), c["kind"])
    if c["relation"] != "independent" and c["C2"] == c["C"]:
        t = s + (1e-4 * torch.randn(s.shape, generator=g, dtype=F64) if c["relation"] == "near" else 0)
    return [s, t], (True, True), (0, 1), _plain([], (2,))


def make_nst(g, c):
    s = values(g, (c["B"], c["C"], c["H"], c["W"]), c["kind"])
    t = values(g, (c["B"], c["C2"], c["W"], c["H"]), c["kind"])  # same H W, other shape
    return [s, t], (True, True), (0, 1), _plain([], ())


def make_fsp(g, c):
    a_s, a_t = pair(g, (c["B"], c["C"], c["H"], c["W"]), c)
    b_s, b_t = pair(g, (c["B"], c["C2"], c["H"], c["W"]), c)
    return [a_s, b_s, a_t, b_t], (True,) * 4, (0, 1, 2, 3), _plain([], ())


def make_ab(g, c):
    s, t = _maps(g, c)
    return [s, t], (True, True), (0,), _plain([], (c["margin"],))


def make_vid(g, c):
    alpha = torch.randn(c["C"], generator=g, dtype=F64) * 3  # variances from 0.05 to 9
    return _maps(g, c) + [alpha], (True, True, False), (0, 1, 2), _plain([], (1e-6,))


def make_afd(g, c):
    rho = torch.rand(c["B"], c["C"], generator=g, dtype=F64) + 0.05
    return _maps(g, c) + [rho / rho.sum(1, keepdim=True)], (True, True, False), (0, 1, 2), _plain([], (1e-6,))


def _target(g, c):
    return torch.randint(0, c["K"], (c["B"],), generator=g)


def make_sobolev(g, c):
    # out = flat(img)^2 @ W: the input gradient 2 img W[:, target] depends on img and W.
    img = values(g, (c["B"], c["C"], c["H"], c["W"]), c["kind"])
    w_s, w_t = pair(g, (c["C"] * c["H"] * c["W"], c["K"]), c)
    target = _target(g, c)

    def call(impl, xs):
        img, w_s, w_t = xs
        flat = img.flatten(1)
        return impl((flat * flat) @ w_s, (flat * flat) @ w_t, img, target)
    return [img, w_s, w_t], (True, True, True), (0, 1), call


def make_lwm(g, c):
    fm_s, fm_t = pair(g, (c["B"], c["C"], c["H"], c["W"]), c)
    w_s = values(g, (c["C"] * c["H"] * c["W"], c["K"]), c["kind"])
    w_t = values(g, (c["C"] * c["H"] * c["W"], c["K"]), c["kind"])
    target = _target(g, c)

    def call(impl, xs):
        fm_s, w_s, fm_t, w_t = xs
        return impl((fm_s.flatten(1) ** 2) @ w_s, fm_s, (fm_t.flatten(1) ** 2) @ w_t, fm_t, target)
    return [fm_s, w_s, fm_t, w_t], (True,) * 4, (0, 1, 2), call


def make_crd(g, c):
    # As CRD makes them: unit embeddings (a dead row stays 0), memory rows near unit norm.
    D = c["C"] * c["H"]
    embed = F.normalize(values(g, (c["B"], D), c["kind"]), dim=1)
    n_data = c["K"] + 3
    memory = F.normalize(torch.rand(n_data, D, generator=g, dtype=F64) * 2 - 1, dim=1)
    idx = torch.randint(0, n_data, (c["B"], c["W"] + 1), generator=g)
    if c["relation"] == "equal":
        idx[:, 1:] = idx[:, :1]
    z = normalizer(contrast_scores(embed, memory, idx, 0.07), n_data)
    return [embed, memory], (True, True), (0,), lambda impl, xs: impl(*xs, idx, 0.07, z, n_data)


OPS = {
    "logits": make_logits, "irg_vertex": make_logits,
    "soft_target": make_kl(4.0), "dml": make_kl(None), "bss": make_kl(2.0),
    "at": make_at, "hint": make_maps(), "nst": make_nst, "fsp": make_fsp, "ft": make_maps(),
    "ab": make_ab, "ofd": make_maps(), "vid": make_vid, "afd": make_afd,
    "sobolev": make_sobolev, "lwm": make_lwm, "crd_contrast": make_crd,
}
# Losses of rows normalised over H W (AT, AFD, LwM's CAM) or over a whole sample (FT, Sobolev).
NORMALISED = {"at", "afd", "lwm", "ft", "sobolev"}


def _kl_terms(T, scale):
    def terms(s, t):
        """scale / B * p (|log p| + |log q|) per element: what a KL near 0 is summed from."""
        log_p, log_q = F.log_softmax(t / T, dim=1), F.log_softmax(s / T, dim=1)
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p.abs() + log_q.abs()), 0.0) * (scale / s.shape[0])
    return terms


def _nst_terms(fm_s, fm_t):
    """The three kernel means' entries, each divided by its count (NST is their signed sum)."""
    f_s, f_t = (F.normalize(x.reshape(x.shape[0], x.shape[1], -1), dim=2) for x in (fm_s, fm_t))
    k = [poly_kernel(x, y) for x, y in ((f_t, f_t), (f_s, f_s), (f_s, f_t))]
    return torch.cat([k[0].flatten() / k[0].numel(), k[1].flatten() / k[1].numel(),
                      2 * k[2].flatten() / k[2].numel()])


# Losses that are signed sums of O(1) terms, so that a loss near 0 keeps about eps * terms of
# rounding in any fp32 computation (see helpers.assert_within_reference_error).
TERMS = {"soft_target": _kl_terms(4.0, 16.0), "dml": _kl_terms(1.0, 1.0), "bss": _kl_terms(2.0, 1.0),
         "nst": _nst_terms}


@st.composite
def cases(draw):
    return dict(seed=draw(st.integers(0, 2 ** 31 - 1)), kind=draw(st.sampled_from(KINDS)),
                relation=draw(st.sampled_from(RELATIONS)), dtype=draw(st.sampled_from(DTYPES)),
                strided=draw(st.booleans()), B=draw(st.integers(1, 5)), C=draw(st.integers(1, 5)),
                C2=draw(st.integers(1, 5)), H=draw(st.integers(1, 5)), W=draw(st.integers(1, 5)),
                K=draw(st.integers(2, 9)), margin=draw(st.sampled_from([0.0, 0.5, 1.0])))


def run(op, backend, make_result, dtype, upstream):
    """(loss, grads) of the op on the case's tensors cast to dtype (as leaves, strided or not)."""
    tensors, cast, need, call, is_strided = make_result
    leaves = []
    for i, (x, low) in enumerate(zip(tensors, cast)):
        x = x.to(dtype) if low else x.to(torch.promote_types(dtype, torch.float32))  # alpha, rho fp32
        if is_strided and x.dim() > 1 and i in need:
            x = strided(x)
        leaves.append(x.detach().requires_grad_(i in need))
    before = [x.detach().clone() for x in leaves]
    loss = call(IMPLEMENTATIONS[op][backend], leaves)
    grads = torch.autograd.grad(loss, [leaves[i] for i in need], upstream.to(loss.dtype),
                                allow_unused=True, materialize_grads=True)
    for x, b in zip(leaves, before):
        assert torch.equal(x.detach(), b), f"{op}: an input was modified in place"
    return loss.detach(), grads


def finite(x):
    return bool(torch.isfinite(x).all())


def check(op, backend, case):
    if case["H"] * case["W"] * (case["C"] if op in ("ft", "sobolev") else 1) == 1 and op in NORMALISED:
        # One value per normalised row: normalize gives +-1, the exact loss or gradient is 0
        # and a result can only be compared by its rounding noise. Two values instead.
        case = dict(case, W=2)
    g = torch.Generator().manual_seed(case["seed"])
    tensors, cast, need, call = OPS[op](g, case)
    # The exact answer is the fp64 reference on the very values the low dtype holds.
    low = [x.to(case["dtype"]).double() if c else x.float().double() for x, c in zip(tensors, cast)]
    upstream = torch.randn((), generator=g, dtype=F64)
    setup = (tensors, cast, need, call, case["strided"])
    loss, grads = run(op, backend, setup, case["dtype"], upstream)
    ref_loss, ref_grads = run(op, "reference", setup, case["dtype"], upstream)
    exact_loss, exact_grads = run(op, "reference", (low, cast, need, call, False), F64, upstream)
    assert loss.dtype == ref_loss.dtype, f"{op}: loss dtype {loss.dtype}, reference's {ref_loss.dtype}"
    if op in KL_OPS:
        assert not (loss < 0), f"{op}: negative KL {loss.item():.3e}"
    for name, a, r, e in [("loss", loss, ref_loss, exact_loss)] + [
            (f"grad {i}", a, r, e) for i, a, r, e in zip(need, grads, ref_grads, exact_grads)]:
        assert a.shape == r.shape and a.dtype == r.dtype, f"{op} {name}: {a.shape} {a.dtype} vs {r.shape} {r.dtype}"
        if finite(r) and finite(e):
            terms = TERMS[op](*low[:2]) if op in TERMS and name == "loss" else None
            assert_within_reference_error(a, r, e, msg=f"{op} {backend} {name} {case}", terms=terms)


@pytest.mark.parametrize("op", sorted(OPS))
@given(case=cases())
def test_torch_backend(op, case):
    check(op, "torch", case)


@pytest.mark.parametrize("op", sorted(OPS))
@given(case=cases())
def test_triton_backend(op, case):
    check(op, "triton", case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_at_on_maps_near_a_common_offset(backend):
    """Maps of 1e3 plus noise: the normalised maps agree to about 1e-3, and the loss is their
    small differences. Each map multiplied by a rounded reciprocal of its norm (one rounding
    factor on the whole map) instead of divided, as the reference divides, left the Triton
    loss 50x the reference's error here."""
    check("at", backend, dict(seed=12, kind="offset", relation="near", dtype=torch.float32, strided=False,
                              B=4, C=2, C2=4, H=1, W=3, K=9, margin=0.5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", KL_OPS)
def test_kl_near_zero_stays_non_negative_and_accurate(op, backend):
    """student = teacher + 1e-4 noise: KL ~ 1e-9, a sum of O(1) terms that rounds to either
    side of 0. Never negative, and its absolute error over many draws (RMS; one draw of the
    reference can be lucky) within 10x the reference's."""
    g = torch.Generator().manual_seed(7)
    extra = () if op == "dml" else (4.0 if op == "soft_target" else 2.0,)
    ours, refs = [], []
    for rows in (1, 2, 5, 16, 28, 40) * 3:
        t = torch.randn(rows, 37, generator=g, dtype=F64) * 3
        s = (t + 1e-4 * torch.randn(t.shape, generator=g, dtype=F64)).float()
        t = t.float()
        loss = IMPLEMENTATIONS[op][backend](s, t, *extra)
        exact = IMPLEMENTATIONS[op]["reference"](s.double(), t.double(), *extra)
        assert loss >= 0, f"{op} {backend}: negative KL {loss.item():.3e} over {rows} rows"
        ours.append(loss.double() - exact)
        refs.append(IMPLEMENTATIONS[op]["reference"](s, t, *extra).double() - exact)
    rms = lambda x: torch.stack(x).square().mean().sqrt()  # noqa: E731
    assert rms(ours) <= 10 * rms(refs), f"{op} {backend}: RMS error {rms(ours):.2e}, reference's {rms(refs):.2e}"


def _afd_module_run(module, backend, s, t, dtype, is_strided, upstream):
    """(loss, grads of fm_s and of the attention's parameters) of an AFD module in dtype."""
    module = module.to(dtype)
    fm_s = (strided(s.to(dtype)) if is_strided else s.to(dtype)).requires_grad_()
    with fastkd.use_backend(backend):
        loss = module(fm_s, t.to(dtype))
    return loss.detach(), torch.autograd.grad(loss, [fm_s, *module.parameters()], upstream.to(loss.dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=40)
@given(case=cases())
def test_afd_module(backend, case):
    """AFD's module, its rho from the teacher's mean over (H, W) through its attention (on the
    Triton path the loss's forward kernel sums that mean: fastkd.functional.afd_attention):
    the loss and the gradients of fm_s and of the attention's weights within 10x the
    reference module's own error in the dtype."""
    # One value per row: normalize gives +-1 (see check). One channel: rho = 1 whatever the
    # attention, whose exact gradient is 0 and only rounding noise is left to compare.
    case = dict(case, W=2 if case["H"] * case["W"] == 1 else case["W"], C=max(case["C"], 2))
    g = torch.Generator().manual_seed(case["seed"])
    s, t = _maps(g, case)
    upstream = torch.randn((), generator=g, dtype=F64)
    proto = reference.AFD(case["C"], 1.0).double()
    with torch.no_grad():
        for p in proto.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    fast = fastkd.AFD(case["C"], 1.0)
    fast.load_state_dict(proto.state_dict())
    low = case["dtype"]
    exact_module = reference.AFD(case["C"], 1.0)
    exact_module.load_state_dict(proto.to(low).state_dict())  # the weights the low dtype holds
    loss, grads = _afd_module_run(fast, backend, s, t, low, case["strided"], upstream)
    ref_loss, ref_grads = _afd_module_run(proto, "reference", s, t, low, case["strided"], upstream)
    exact_loss, exact_grads = _afd_module_run(exact_module, "reference", s.to(low).double(), t.to(low).double(),
                                              F64, False, upstream)
    terms = [None, None, *_afd_attention_terms(exact_module, s.to(low).double(), t.to(low).double(), upstream)]
    for name, a, r, e, m in [("loss", loss, ref_loss, exact_loss, None)] + [
            (f"grad {i}", *x) for i, x in enumerate(zip(grads, ref_grads, exact_grads, terms[1:]))]:
        assert a.shape == r.shape and a.dtype == r.dtype, f"AFD {name}: {a.shape} {a.dtype} vs {r.shape} {r.dtype}"
        if finite(r) and finite(e):
            assert_within_reference_error(a, r, e, msg=f"AFD module {backend} {name} {case}", terms=m)


def _afd_attention_terms(module, fm_s, fm_t, upstream):
    """The magnitudes of the terms each attention weight's gradient is summed from (float64),
    for its rounding floor: rho = sg / sum(sg) backpropagates a = dL/drho as
    (a_i - sum_j a_j rho_j) / S, which cancels where one channel's rho is near 1 (a saturated
    sigmoid); its terms |a_i| / S + sum_j |a_j| sg_j / S^2 carried through the attention's
    backward with every factor taken by its magnitude. (w1, b1, w2, b2)."""
    w1, b1, w2, b2 = (p.detach() for p in module.parameters())
    B, C, H, W = fm_s.shape
    unit = lambda x: x / (torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True) + 1e-6)  # noqa: E731
    a = (upstream * (unit(fm_s) - unit(fm_t)).square().sum((2, 3)) / (B * H * W)).abs()
    pooled = fm_t.mean((2, 3))
    z1 = pooled @ w1.flatten(1).t() + b1
    h = torch.relu(z1)
    sg = torch.sigmoid(h @ w2.flatten(1).t() + b2)
    total = sg.sum(1, keepdim=True)
    t_z2 = (a / total + (a * sg).sum(1, keepdim=True) / total ** 2) * sg * (1 - sg)
    t_h = (t_z2 @ w2.flatten(1).abs()) * (z1 > 0)
    return (t_h.t() @ pooled.abs()).view_as(w1), t_h.sum(0), (t_z2.t() @ h).view_as(w2), t_z2.sum(0)


@pytest.mark.parametrize("op", ["ft", "afd", "sobolev"])
@settings(max_examples=12)
@given(case=cases(), hw=st.tuples(st.integers(23, 30), st.integers(23, 30)))
def test_triton_backend_split_rows(op, case, hw):
    """The same checks with the normalised rows split into chunks of 256 values or more, one
    program each, as FT's and Sobolev's whole-sample rows split on a GPU at ImageNet shapes
    (fastkd.kernels.elementwise.row_chunk): every row here has two chunks or more."""
    case = dict(case, H=hw[0], W=hw[1])
    rows, length = case["B"] * (case["C"] if op == "afd" else 1), hw[0] * hw[1] * (1 if op == "afd" else case["C"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(elementwise_kernels, "_SPLIT_PROGRAMS", 4096)
        patch.setattr(elementwise_kernels, "_SPLIT_MIN_CHUNK", 256)
        assert -(-length // elementwise_kernels.row_chunk(rows, length)) >= 2
        check(op, "triton", case)
