"""Opt-in parity check: ``fastkd.reference`` against the original collection.

fastkd promises to be a drop-in for the public "Knowledge-Distillation-Zoo"
collection (see the README).  This module compares every plain-PyTorch reference
in ``fastkd.reference`` with the collection's own code, in float64: the loss,
the gradient of every input that requires grad, and for modules with
parameters the parameter gradients, buffers and initialisation as well.

It runs only when the environment variable ``KDZOO_PATH`` points to a checkout
of the collection (a directory holding ``kd_losses/`` and ``network.py``);
otherwise the whole module is skipped.  Nothing of the collection is copied
into fastkd: its files are loaded by path at test time.

    KDZOO_PATH=/path/to/Knowledge-Distillation-Zoo python -m pytest tests/test_collection_parity.py

Places where fastkd deliberately differs (listed in the README: AFD
and CRD at batch size 1, RKD with N < 2) are not compared against the
collection; the fastkd behaviour there is asserted on its own terms.
"""
import ast
import importlib
import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

_KDZOO_ENV = os.environ.get("KDZOO_PATH", "")
if not _KDZOO_ENV:
    pytest.skip(
        "opt-in parity check against Knowledge-Distillation-Zoo: set KDZOO_PATH "
        "to a checkout of the collection to run it",
        allow_module_level=True,
    )
_ROOT = Path(_KDZOO_ENV).expanduser()
if not (_ROOT / "kd_losses").is_dir() or not (_ROOT / "network.py").is_file():
    pytest.skip(
        f"parity check against Knowledge-Distillation-Zoo: KDZOO_PATH={_KDZOO_ENV!r} holds no "
        "checkout of it (no kd_losses/ and network.py there)",
        allow_module_level=True,
    )

import fastkd.reference as ref  # noqa: E402

DT = torch.float64
FAMILIES = ("random", "duplicate", "offset", "tiny")
RTOL = 1e-7


# --------------------------------------------------------------------------
# Loading the collection's files (individually, by path)
# --------------------------------------------------------------------------
def _load_loss_file(stem, float_casts_to_double=False):
    path = _ROOT / "kd_losses" / f"{stem}.py"
    name = f"_kdzoo_kd_losses_{stem}" + ("_f64" if float_casts_to_double else "")
    if not float_casts_to_double:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    # See FLOAT_CASTS below: the same file with its `.float()` casts reading
    # `.double()`, so that a float64 run stays float64 throughout.
    source = path.read_text()
    assert ".float()" in source, f"{path}: no .float() cast left to adapt"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(source.replace(".float()", ".double()"), str(path), "exec"), module.__dict__)
    return module


def _zero_gradients_standin(x):
    """What torch.autograd.gradcheck.zero_gradients did before its removal."""
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, (list, tuple)):
        for elem in x:
            _zero_gradients_standin(elem)


def _load_bss_file(float_casts_to_double=False):
    # bss.py does `from torch.autograd.gradcheck import zero_gradients`, a helper
    # current torch no longer has: provide a stand-in only while loading it.
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    missing = not hasattr(gradcheck_module, "zero_gradients")
    if missing:
        gradcheck_module.zero_gradients = _zero_gradients_standin
    try:
        return _load_loss_file("bss", float_casts_to_double)
    finally:
        if missing:
            del gradcheck_module.zero_gradients


def _load_network_classes(names=("paraphraser", "translator")):
    # Only the two classes are taken from network.py; the rest of the file
    # (ResNets, DataParallel/cuda helpers) is not executed.
    path = _ROOT / "network.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in names]
    found = {n.name for n in body}
    assert found == set(names), f"network.py lacks {set(names) - found}"
    namespace = {"torch": torch, "nn": nn, "F": F, "__name__": "_kdzoo_network"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return {n: namespace[n] for n in names}


_FILES = {
    "Logits": "logits", "SoftTarget": "st", "AT": "at", "Hint": "fitnet",
    "NST": "nst", "PKTCosSim": "pkt", "FSP": "fsp", "FT": "ft", "RKD": "rkd",
    "AB": "ab", "SP": "sp", "Sobolev": "sobolev", "CC": "cc", "LwM": "lwm",
    "IRG": "irg", "VID": "vid", "OFD": "ofd", "AFD": "afd", "CRD": "crd",
    "DML": "dml",
}
ORIG = {cls: getattr(_load_loss_file(stem), cls) for cls, stem in _FILES.items()}
_bss = _load_bss_file()
ORIG["BSS"], ORIG["BSSAttacker"] = _bss.BSS, _bss.BSSAttacker
_net = _load_network_classes()
ORIG["Paraphraser"], ORIG["Translator"] = _net["paraphraser"], _net["translator"]

# The collection's own dtype handling: ofd.py and bss.py cast boolean masks with
# `.float()`, i.e. to float32 whatever the input dtype.  In float64 that rounds
# two constants to float32 before they meet float64 data: in OFD's margin the
# denominator `count(t < 0) + 1e-6` (the 1e-6 is mostly lost), and in
# BSSAttacker the step size `step_alpha * [prediction == target]` (0.3 becomes
# 0.30000001192...).  That is float32 rounding of the collection, not its math
# (fastkd.reference), and shows up as relative differences of ~1e-6 in float64.  So the
# float64 comparisons for these two use the same files with `.float()` read as
# `.double()` (ORIG64), and the unmodified files are compared in float32, the
# dtype they were written for, where the casts change nothing
# (test_*_float32_unmodified).  ab.py's `.float()` masks meet no constant that
# float32 would round, so AB is compared unmodified in float64.
ORIG64 = dict(ORIG)
ORIG64["OFD"] = _load_loss_file("ofd", float_casts_to_double=True).OFD
ORIG64["BSSAttacker"] = _load_bss_file(float_casts_to_double=True).BSSAttacker


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: thread start-up and contention cost more than
    # they save (seconds per test on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _family(x, family):
    """Apply an input family to a batch-first tensor (integers: duplicate only)."""
    x = x.detach().clone()
    if family == "duplicate":
        x[1] = x[0]
    elif x.is_floating_point():
        if family == "offset":
            x = x + 20.0
        elif family == "tiny":
            x = x * 1e-3
        else:
            assert family == "random", family
    return x


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _fresh(obj):
    """Detached copies; every floating-point tensor becomes a leaf requiring grad."""
    def leaf(t):
        t = t.detach().clone()
        return t.requires_grad_(True) if t.is_floating_point() else t
    return _map(obj, leaf)


def _close(actual, expected, what, rtol=RTOL, atol_rel=1e-10):
    if actual is None and expected is None:
        return
    if actual is None:
        actual = torch.zeros_like(expected)
    if expected is None:
        expected = torch.zeros_like(actual)
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach()
    assert not torch.isnan(expected).any(), f"{what}: the collection gives NaN (bad test input)"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = max(atol_rel * scale, 1e-300)
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol,
        msg=lambda m: f"{what} (rtol={rtol}, atol={atol:.3g}): {m}")


def _default_forward(module, args):
    return module(*args), []


def _run(module, args, forward=_default_forward):
    """Loss, extra outputs, input grads and parameter grads of one evaluation."""
    args = _fresh(args)
    loss, extras = forward(module, args)
    leaves = [t for t in _tensors(args) if t.requires_grad]
    named = list(module.named_parameters())
    grads = torch.autograd.grad(loss, leaves + [p for _, p in named], allow_unused=True)
    return (loss.detach(), [e.detach() for e in extras], list(grads[:len(leaves)]),
            {n: g for (n, _), g in zip(named, grads[len(leaves):])})


def _compare(what, orig, fk, args, forward=_default_forward, **tol):
    lo, eo, gio, gpo = _run(orig, args, forward)
    lf, ef, gif, gpf = _run(fk, args, forward)
    _close(lf, lo, f"{what}: loss", **tol)
    for i, (a, e) in enumerate(zip(ef, eo)):
        _close(a, e, f"{what}: output {i}", **tol)
    assert len(gif) == len(gio)
    for i, (a, e) in enumerate(zip(gif, gio)):
        _close(a, e, f"{what}: grad of input {i}", **tol)
    assert set(gpf) == set(gpo), f"{what}: parameter names {sorted(gpf)} != {sorted(gpo)}"
    for name in gpo:
        _close(gpf[name], gpo[name], f"{what}: grad of parameter {name}", **tol)


def _compare_state(what, fk, orig, **tol):
    so, sf = orig.state_dict(), fk.state_dict()
    assert set(sf) == set(so), f"{what}: state_dict keys {sorted(sf)} != {sorted(so)}"
    for k in so:
        if so[k].is_floating_point():
            _close(sf[k], so[k], f"{what}: state {k}", **tol)
        else:
            assert torch.equal(sf[k], so[k]), f"{what}: state {k}"


def _build_pair(name, ctor_args, seed=0, dtype=DT):
    """The collection's module, and the fastkd one with its state_dict loaded strictly."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        orig = (ORIG64 if dtype == torch.float64 else ORIG)[name](*ctor_args).to(dtype)
        fk = getattr(ref, name)(*ctor_args).to(dtype)
    fk.load_state_dict(orig.state_dict(), strict=True)
    return orig, fk


# --------------------------------------------------------------------------
# Stateless losses
# --------------------------------------------------------------------------
B = 4


def _irg_inputs(g):
    # student: fm1 has the larger H and fewer channels than fm2 (pooling and
    # channel-pair averaging in the transformation term); teacher: equal shapes.
    irg_s = [_randn(g, B, 2, 4, 4), _randn(g, B, 4, 2, 2), _randn(g, B, 6), _randn(g, B, 5)]
    irg_t = [_randn(g, B, 3, 4, 4), _randn(g, B, 3, 4, 4), _randn(g, B, 8), _randn(g, B, 5)]
    return [irg_s, irg_t]


STATELESS = {
    # id: (class, constructor args, inputs(generator))
    "Logits": ("Logits", (), lambda g: [_randn(g, B, 7), _randn(g, B, 7)]),
    "SoftTarget": ("SoftTarget", (4.0,), lambda g: [3 * _randn(g, B, 7), 3 * _randn(g, B, 7)]),
    "AT-p2": ("AT", (2,), lambda g: [_randn(g, B, 3, 4, 5), _randn(g, B, 6, 4, 5)]),
    "AT-p4": ("AT", (4,), lambda g: [_randn(g, B, 3, 4, 5), _randn(g, B, 6, 4, 5)]),
    "Hint": ("Hint", (), lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 3, 4, 4)]),
    "NST": ("NST", (), lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 5, 2, 8)]),
    "PKTCosSim": ("PKTCosSim", (), lambda g: [_randn(g, B, 6), _randn(g, B, 10)]),
    "FSP": ("FSP", (), lambda g: [_randn(g, B, 3, 8, 8), _randn(g, B, 4, 4, 4),
                                  _randn(g, B, 3, 4, 4), _randn(g, B, 4, 4, 4)]),
    "FT": ("FT", (), lambda g: [_randn(g, B, 4, 3, 3), _randn(g, B, 4, 3, 3)]),
    "RKD": ("RKD", (25.0, 50.0), lambda g: [_randn(g, 5, 6), _randn(g, 5, 10)]),
    "RKD-dist-only": ("RKD", (1.0, 0.0), lambda g: [_randn(g, 5, 6), _randn(g, 5, 10)]),
    "AB": ("AB", (1.0,), lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 3, 4, 4)]),
    "SP": ("SP", (), lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 5, 2, 2)]),
    "BSS": ("BSS", (3.0,), lambda g: [3 * _randn(g, B, 7), 3 * _randn(g, B, 7)]),
    "CC": ("CC", (0.4, 2), lambda g: [_randn(g, B, 6), _randn(g, B, 10)]),
    "CC-P4": ("CC", (0.4, 4), lambda g: [_randn(g, B, 6), _randn(g, B, 10)]),
    "IRG": ("IRG", (0.1, 5.0, 5.0), _irg_inputs),
    "DML": ("DML", (), lambda g: [3 * _randn(g, B, 7), 3 * _randn(g, B, 7)]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(STATELESS))
def test_stateless_loss(case, family):
    name, ctor_args, make_inputs = STATELESS[case]
    inputs = _map(make_inputs(torch.Generator().manual_seed(1)), lambda t: _family(t, family))
    if name == "IRG" and family == "duplicate":
        # also a sample whose teacher transformation distance is exactly 0 (clamped)
        inputs[1][1][2] = inputs[1][0][2]
    orig, fk = _build_pair(name, ctor_args)
    _compare(f"{case} [{family}]", orig, fk, inputs)


def test_rkd_needs_two_samples():
    # fastkd: the collection returns NaN for N = 1; fastkd raises a clear error.
    x_s, x_t = torch.randn(1, 6, dtype=DT), torch.randn(1, 10, dtype=DT)
    with pytest.raises(Exception) as info:
        ref.RKD(25.0, 50.0)(x_s, x_t)
    assert str(info.value)


# --------------------------------------------------------------------------
# Modules with parameters / buffers
# --------------------------------------------------------------------------
def _two_outputs_forward(module, args):
    # Paraphraser returns (factor, reconstruction): compare both and the
    # gradients of a fixed random weighting of them.
    z, out = module(*args)
    g = torch.Generator().manual_seed(7)
    loss = (z * _randn(g, *z.shape)).sum() + (out * _randn(g, *out.shape)).sum()
    return loss, [z, out]


def _one_output_forward(module, args):
    z = module(*args)
    g = torch.Generator().manual_seed(7)
    return (z * _randn(g, *z.shape)).sum(), [z]


PARAM_MODULES = {
    # id: (class, constructor args, inputs(generator), forward)
    "VID": ("VID", (3, 6, 5, 5.0),
            lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 5, 4, 4)], _default_forward),
    "OFD": ("OFD", (3, 5),
            lambda g: [_randn(g, B, 3, 4, 4), _randn(g, B, 5, 4, 4)], _default_forward),
    "AFD": ("AFD", (6, 0.5),
            lambda g: [_randn(g, B, 6, 4, 4), _randn(g, B, 6, 4, 4)], _default_forward),
    "Paraphraser-bn": ("Paraphraser", (4, 0.5, True),
                       lambda g: [_randn(g, B, 4, 5, 5)], _two_outputs_forward),
    "Paraphraser-nobn": ("Paraphraser", (4, 0.5, False),
                         lambda g: [_randn(g, B, 4, 5, 5)], _two_outputs_forward),
    "Translator-bn": ("Translator", (3, 4, 0.5, True),
                      lambda g: [_randn(g, B, 3, 5, 5)], _one_output_forward),
    "Translator-nobn": ("Translator", (3, 4, 0.5, False),
                        lambda g: [_randn(g, B, 3, 5, 5)], _one_output_forward),
}

CRD_ARGS = (12, 20, 8, 6, 0.1, 0.5, 40)  # s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data

INIT_CASES = {case: (spec[0], spec[1]) for case, spec in PARAM_MODULES.items()}
INIT_CASES["CRD"] = ("CRD", CRD_ARGS)


@pytest.mark.parametrize("case", sorted(INIT_CASES))
def test_same_initialisation(case):
    name, ctor_args = INIT_CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        orig = ORIG[name](*ctor_args)
        rng_orig = torch.get_rng_state()
        torch.manual_seed(1234)
        fk = getattr(ref, name)(*ctor_args)
        rng_fk = torch.get_rng_state()
    so, sf = orig.state_dict(), fk.state_dict()
    assert list(sf) == list(so), f"{case}: state_dict keys {list(sf)} != {list(so)}"
    for k in so:
        assert sf[k].dtype == so[k].dtype, f"{case}: dtype of {k}"
        assert torch.equal(sf[k], so[k]), f"{case}: initial value of {k} differs"
    assert torch.equal(rng_fk, rng_orig), f"{case}: construction draws a different amount of randomness"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(PARAM_MODULES))
def test_param_module(case, family):
    name, ctor_args, make_inputs, forward = PARAM_MODULES[case]
    inputs = _map(make_inputs(torch.Generator().manual_seed(2)), lambda t: _family(t, family))
    orig, fk = _build_pair(name, ctor_args, seed=3)
    for step in range(2):  # train mode twice (BatchNorm running statistics move)
        _compare(f"{case} [{family}] train step {step}", orig, fk, inputs, forward)
        _compare_state(f"{case} [{family}] after train step {step}", fk, orig)
    orig.eval()
    fk.eval()
    _compare(f"{case} [{family}] eval", orig, fk, inputs, forward)
    _compare_state(f"{case} [{family}] after eval", fk, orig)


def _sum_duplicated_grad(g):
    return None if g is None else g[0:1] + g[1:2]


def test_afd_batch_size_one():
    # fastkd: batch size 1 works (the collection squeezes the batch dim away).
    # A batch of two identical samples gives the same per-sample mean, so the
    # collection at B = 2 with duplicates is the expected value.
    g = torch.Generator().manual_seed(4)
    fm_s, fm_t = _randn(g, 1, 6, 4, 4), _randn(g, 1, 6, 4, 4)
    orig, fk = _build_pair("AFD", (6, 0.5), seed=5)
    lf, _, gif, gpf = _run(fk, [fm_s, fm_t])
    lo, _, gio, gpo = _run(orig, [fm_s.repeat(2, 1, 1, 1), fm_t.repeat(2, 1, 1, 1)])
    assert lf.shape == torch.Size([]) and torch.isfinite(lf)
    _close(lf, lo, "AFD B=1: loss")
    for i, (a, e) in enumerate(zip(gif, gio)):
        _close(a, _sum_duplicated_grad(e), f"AFD B=1: grad of input {i}")
    for k in gpo:
        _close(gpf[k], gpo[k], f"AFD B=1: grad of parameter {k}")


# --------------------------------------------------------------------------
# CRD: two consecutive calls (Z fixed on the first, memory updated after each)
# --------------------------------------------------------------------------
def _crd_calls(family, batch=4):
    s_dim, t_dim, feat_dim, nce_n, _, _, n_data = CRD_ARGS
    g = torch.Generator().manual_seed(6)
    perm = torch.randperm(n_data, generator=g)
    idx1, idx2 = perm[:batch], torch.cat([perm[batch // 2:batch], perm[batch:batch + batch // 2]])
    calls = []
    for idx in (idx1, idx2):
        # the second call samples some negatives among the rows the first call wrote
        negatives = torch.randint(0, n_data, (batch, nce_n), generator=g)
        negatives[:, 0] = idx1
        sample_idx = torch.cat([idx.view(-1, 1), negatives], dim=1)
        feat_s = _randn(g, batch, 3, 2, 2)  # flattened to s_dim = 12
        feat_t = _randn(g, batch, t_dim)
        calls.append([_family(feat_s, family), _family(feat_t, family),
                      _family(idx, family), _family(sample_idx, family)])
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_crd_two_calls(family):
    orig, fk = _build_pair("CRD", CRD_ARGS, seed=8)
    for call, inputs in enumerate(_crd_calls(family)):
        what = f"CRD [{family}] call {call}"
        _compare(what, orig, fk, inputs)
        _compare_state(f"{what}: memory after the call", fk, orig)


def test_crd_batch_size_one():
    # fastkd: batch size 1 works (the collection squeezes (B, N+1) to (N+1,)).
    # Expected: the collection on the sample duplicated to B = 2 (the same Z,
    # the same per-sample loss, the same memory rows written).
    orig, fk = _build_pair("CRD", CRD_ARGS, seed=9)
    for call, inputs in enumerate(_crd_calls("random", batch=2)):
        single = [t[0:1] for t in inputs]
        doubled = [torch.cat([t[0:1], t[0:1]]) for t in inputs]
        lf, _, gif, gpf = _run(fk, single)
        lo, _, gio, gpo = _run(orig, doubled)
        what = f"CRD B=1 call {call}"
        _close(lf, lo, f"{what}: loss")
        for i, (a, e) in enumerate(zip(gif, gio)):
            _close(a, _sum_duplicated_grad(e), f"{what}: grad of input {i}")
        for k in gpo:
            _close(gpf[k], gpo[k], f"{what}: grad of parameter {k}")
        _compare_state(f"{what}: memory after the call", fk, orig)


# --------------------------------------------------------------------------
# Sobolev and LwM: gradients of the outputs w.r.t. img / feature maps
# --------------------------------------------------------------------------
K = 5


class _TinyNet(nn.Module):
    """conv -> tanh gives the feature map; a nonlinear head gives the logits."""

    def __init__(self, c_in=2, c_mid=3, hw=4, n_class=K):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_mid, 3, padding=1)
        self.fc = nn.Linear(c_mid * hw * hw, n_class)

    def forward(self, x):
        fm = torch.tanh(self.conv(x))
        out = self.fc((fm * fm + fm).flatten(1))
        return fm, out


def _tiny_nets(seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _TinyNet().to(DT), _TinyNet().to(DT)


def _graph_inputs(family, seed):
    g = torch.Generator().manual_seed(seed)
    img = _family(_randn(g, B, 2, 4, 4), family)
    target = _family(torch.randint(0, K, (B,), generator=g), family)
    return img, target


def _run_graph_loss(loss_module, student, teacher, img, target, call):
    img = img.detach().clone().requires_grad_(True)
    fm_s, out_s = student(img)
    fm_t, out_t = teacher(img)
    loss = call(loss_module, out_s, fm_s, out_t, fm_t, img, target)
    named = [("student." + n, p) for n, p in student.named_parameters()]
    named += [("teacher." + n, p) for n, p in teacher.named_parameters()]
    grads = torch.autograd.grad(loss, [img] + [p for _, p in named], allow_unused=True)
    return loss.detach(), grads[0], {n: gr for (n, _), gr in zip(named, grads[1:])}


GRAPH_LOSSES = {
    "Sobolev": lambda m, out_s, fm_s, out_t, fm_t, img, target: m(out_s, out_t, img, target),
    "LwM": lambda m, out_s, fm_s, out_t, fm_t, img, target: m(out_s, fm_s, out_t, fm_t, target),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(GRAPH_LOSSES))
def test_graph_loss(name, family):
    student, teacher = _tiny_nets(10)
    img, target = _graph_inputs(family, 11)
    call = GRAPH_LOSSES[name]
    lo, gio, gpo = _run_graph_loss(ORIG[name](), student, teacher, img, target, call)
    lf, gif, gpf = _run_graph_loss(getattr(ref, name)(), student, teacher, img, target, call)
    what = f"{name} [{family}]"
    _close(lf, lo, f"{what}: loss")
    _close(gif, gio, f"{what}: grad of img")
    for k in gpo:
        _close(gpf[k], gpo[k], f"{what}: grad of {k}")


# --------------------------------------------------------------------------
# BSSAttacker: the attacked images
# --------------------------------------------------------------------------
class _SixTuple(nn.Module):
    """The collection's networks return 6 items, the logits last."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        fm, out = self.net(x)
        return fm, fm, fm, fm, fm, out


def _bss_attacks(num_steps, family, dtype, orig_attacker):
    net, _ = _tiny_nets(12)
    model = _SixTuple(net).to(dtype)
    g = torch.Generator().manual_seed(13)
    n = 6
    img = _family(_randn(g, n, 2, 4, 4), family).to(dtype)
    with torch.no_grad():
        pred = model(img)[-1].argmax(1)
    target = pred.clone()
    target[-1] = (pred[-1] + 1) % K  # one sample already misclassified: step size 0
    attack_class = (target + 1 + torch.randint(0, K - 1, (n,), generator=g)) % K
    target, attack_class = _family(target, family), _family(attack_class, family)

    attacked = {}
    for which, attacker in (("orig", orig_attacker(0.3, num_steps, 1e-4)),
                            ("fastkd", ref.BSSAttacker(0.3, num_steps, 1e-4))):
        model.zero_grad(set_to_none=True)
        out = attacker.attack(model, img.clone(), target.clone(), attack_class.clone())
        attacked[which] = out.detach()
    assert not torch.equal(attacked["orig"], img), "nothing attacked"
    return attacked["fastkd"], attacked["orig"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_steps", [1, 10])
def test_bss_attacker(num_steps, family):
    fk, orig = _bss_attacks(num_steps, family, DT, ORIG64["BSSAttacker"])
    _close(fk, orig, f"BSSAttacker steps={num_steps} [{family}]: attacked images")


# --------------------------------------------------------------------------
# OFD and BSSAttacker as the collection wrote them, in float32 (see ORIG64)
# --------------------------------------------------------------------------
F32_TOL = dict(rtol=1e-5, atol_rel=1e-6)  # float32 rounding, with a margin


@pytest.mark.parametrize("family", FAMILIES)
def test_ofd_float32_unmodified(family):
    name, ctor_args, make_inputs, forward = PARAM_MODULES["OFD"]
    inputs = _map(make_inputs(torch.Generator().manual_seed(2)),
                  lambda t: _family(t, family).float())
    orig, fk = _build_pair(name, ctor_args, seed=3, dtype=torch.float32)
    assert orig.__class__ is ORIG["OFD"]
    for step in range(2):
        _compare(f"OFD float32 [{family}] train step {step}", orig, fk, inputs, forward, **F32_TOL)
        _compare_state(f"OFD float32 [{family}] after step {step}", fk, orig, **F32_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_bss_attacker_float32_unmodified(family):
    fk, orig = _bss_attacks(10, family, torch.float32, ORIG["BSSAttacker"])
    _close(fk, orig, f"BSSAttacker float32 [{family}]: attacked images", **F32_TOL)


# --------------------------------------------------------------------------
# RKD's float32 kernels on the features the collection's networks produce
# --------------------------------------------------------------------------
def test_rkd_float32_kernels_on_the_collections_networks():
    """The collection's resnet20 student and resnet110 teacher (random initialisation) on a
    CIFAR-shaped batch of 64, their pooled features into the collection's RKD and into
    fastkd's Triton RKD (its float32 path for float32 features, not the float64 one): loss
    and student gradient within 10x the collection's own float32 error against float64."""
    from fastkd import RKD, use_backend
    from helpers import assert_within_reference_error
    nets = _load_network_classes(("resblock", "resnet20", "resnet110"))
    torch.manual_seed(0)
    student, teacher = nets["resnet20"](100), nets["resnet110"](100)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        feat_t = teacher(x)[-2]
        feat_s = student(x)[-2]
    results = []
    for make, dtype, backend_name in ((ORIG["RKD"], torch.float64, "torch"), (ORIG["RKD"], torch.float32, "torch"),
                                      (RKD, torch.float32, "triton")):
        s = feat_s.to(dtype).requires_grad_()
        with use_backend(backend_name):
            loss = make(25.0, 50.0)(s, feat_t.to(dtype))
        results.append((loss, *torch.autograd.grad(loss, s)))
    exact, own, fast = results
    for name, a, r, e in zip(("loss", "grad"), fast, own, exact):
        assert_within_reference_error(a, r, e, msg=f"RKD float32 on resnet20/resnet110 features: {name}")
