"""Bad input gets a clear error before any computation; inputs are never modified."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fastkd

g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g)


class TinyNet(nn.Module):
    """img (B, 1, 4, 4) -> (fm (B, 3, 4, 4), logits (B, 5))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        fm = self.conv(x)
        return fm, self.fc(torch.relu(fm).mean(dim=(2, 3)))


def graph_inputs():
    img = r(4, 1, 4, 4).requires_grad_()
    fm_s, out_s = TinyNet()(img)
    fm_t, out_t = TinyNet()(img)
    return img, fm_s, out_s, fm_t, out_t, torch.tensor([0, 1, 2, 3])


# name -> (loss, valid positional inputs); each case below breaks one of them.
def cases():
    img, fm_s, out_s, fm_t, out_t, target = graph_inputs()
    return {
        "Logits": (fastkd.Logits(), [r(4, 10), r(4, 10)]),
        "SoftTarget": (fastkd.SoftTarget(4.0), [r(4, 10), r(4, 10)]),
        "DML": (fastkd.DML(), [r(4, 10), r(4, 10)]),
        "BSS": (fastkd.BSS(2.0), [r(4, 10), r(4, 10)]),
        "AT": (fastkd.AT(2), [r(2, 3, 4, 4), r(2, 5, 4, 4)]),
        "Hint": (fastkd.Hint(), [r(2, 3, 4, 4), r(2, 3, 4, 4)]),
        "NST": (fastkd.NST(), [r(2, 3, 4, 4), r(2, 5, 2, 8)]),
        "FSP": (fastkd.FSP(), [r(2, 3, 8, 8), r(2, 4, 4, 4), r(2, 3, 8, 8), r(2, 4, 4, 4)]),
        "FT": (fastkd.FT(), [r(2, 3, 4, 4), r(2, 3, 4, 4)]),
        "AB": (fastkd.AB(1.0), [r(2, 3, 4, 4), r(2, 3, 4, 4)]),
        "VID": (fastkd.VID(3, 4, 5, 5.0), [r(2, 3, 4, 4), r(2, 5, 4, 4)]),
        "OFD": (fastkd.OFD(3, 5), [r(2, 3, 4, 4), r(2, 5, 4, 4)]),
        "AFD": (fastkd.AFD(3, 0.5), [r(2, 3, 4, 4), r(2, 3, 4, 4)]),
        "PKTCosSim": (fastkd.PKTCosSim(), [r(4, 6), r(4, 7)]),
        "RKD": (fastkd.RKD(25, 50), [r(4, 6), r(4, 7)]),
        "SP": (fastkd.SP(), [r(4, 3, 2, 2), r(4, 5, 2, 2)]),
        "CC": (fastkd.CC(0.4, 2), [r(4, 6), r(4, 7)]),
        "IRG": (fastkd.IRG(0.1, 5, 5), [[r(4, 2, 4, 4), r(4, 4, 2, 2), r(4, 6), r(4, 10)],
                                         [r(4, 3, 4, 4), r(4, 3, 4, 4), r(4, 7), r(4, 10)]]),
        "CRD": (fastkd.CRD(6, 7, 8, 5, 0.1, 0.5, 20),
                [r(4, 6), r(4, 7), torch.arange(4), torch.randint(0, 20, (4, 6), generator=g)]),
        "Sobolev": (fastkd.Sobolev(), [out_s, out_t, img, target]),
        "LwM": (fastkd.LwM(), [out_s, fm_s, out_t, fm_t, target]),
    }


def test_valid_inputs_run():
    for name, (loss, args) in cases().items():
        assert torch.isfinite(loss(*args)), name


@pytest.mark.parametrize("name", list(cases()))
def test_non_tensor_is_type_error(name):
    loss, args = cases()[name]
    args[0] = args[0].tolist() if name != "IRG" else "not a sequence"
    with pytest.raises(TypeError, match="must be"):
        loss(*args)


@pytest.mark.parametrize("name", [n for n in cases() if n not in ("IRG",)])
def test_integer_dtype_is_type_error(name):
    loss, args = cases()[name]
    i = 1 if name in ("Sobolev", "LwM") else 0
    args[i] = args[i].detach().long()
    with pytest.raises(TypeError, match="floating-point dtype"):
        loss(*args)


@pytest.mark.parametrize("name", [n for n in cases() if n not in ("Sobolev", "LwM", "IRG", "CRD")])
def test_empty_batch_is_value_error(name):
    loss, args = cases()[name]
    args = [a[:0] for a in args]
    with pytest.raises(ValueError, match="must not be empty"):
        loss(*args)


@pytest.mark.parametrize("name", ["PKTCosSim", "RKD", "SP", "CC", "IRG"])
def test_relational_batch_of_one_is_value_error(name):
    loss, args = cases()[name]
    args = [[x[:1] for x in a] if isinstance(a, list) else a[:1] for a in args]
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss(*args)


def test_reference_rkd_batch_of_one_is_value_error():
    with pytest.raises(ValueError, match="feat_s needs a batch of at least 2"):
        fastkd.reference.RKD(25, 50)(r(1, 3), r(1, 3))


@pytest.mark.parametrize("name,args", [
    ("Logits", [r(4, 10), r(4, 9)]),
    ("SoftTarget", [r(4, 10), r(3, 10)]),
    ("SoftTarget", [r(10), r(10)]),
    ("AT", [r(2, 3, 4, 4), r(2, 3, 4, 5)]),
    ("AT", [r(2, 3, 4), r(2, 3, 4)]),
    ("Hint", [r(2, 3, 4, 4), r(2, 4, 4, 4)]),
    ("NST", [r(2, 3, 4, 4), r(2, 3, 3, 3)]),
    ("FSP", [r(2, 3, 4, 4), r(2, 4, 8, 8), r(2, 3, 4, 4), r(2, 4, 8, 8)]),
    ("FSP", [r(2, 3, 8, 8), r(2, 4, 4, 4), r(2, 2, 8, 8), r(2, 4, 4, 4)]),
    ("FT", [r(2, 3, 4, 4), r(2, 3, 4, 3)]),
    ("AB", [r(2, 3, 4, 4), r(2, 3, 4, 3)]),
    ("VID", [r(2, 4, 4, 4), r(2, 5, 4, 4)]),
    ("VID", [r(2, 3, 4, 4), r(2, 4, 4, 4)]),
    ("OFD", [r(2, 2, 4, 4), r(2, 5, 4, 4)]),
    ("AFD", [r(2, 4, 4, 4), r(2, 4, 4, 4)]),
    ("PKTCosSim", [r(4, 6), r(5, 6)]),
    ("RKD", [r(4, 6, 1), r(4, 6, 1)]),
    ("SP", [r(4, 6), r(3, 6)]),
    ("CC", [r(4, 6), r(4)]),
    ("IRG", [[r(4, 2, 4, 4), r(4, 3, 2, 2), r(4, 6), r(4, 10)],
             [r(4, 3, 4, 4), r(4, 3, 4, 4), r(4, 7), r(4, 10)]]),
    ("CRD", [r(4, 5), r(4, 7), torch.arange(4), torch.randint(0, 20, (4, 6))]),
    ("CRD", [r(4, 6), r(4, 7), torch.arange(4), torch.randint(0, 20, (4, 5))]),
    ("CRD", [r(4, 6), r(4, 7), torch.arange(4), torch.randint(20, 30, (4, 6))]),
    ("CRD", [r(4, 6), r(4, 7), torch.arange(4).float(), torch.randint(0, 20, (4, 6))]),
])
def test_wrong_shapes_and_indices(name, args):
    loss = cases()[name][0]
    with pytest.raises((ValueError, TypeError), match="must|cannot|needs|do not"):
        loss(*args)


# The collection's constructor arguments (the names are the reference's), valid.
VALID = {
    "SoftTarget": dict(T=4.0), "BSS": dict(T=2.0), "AT": dict(p=2.0), "AB": dict(margin=1.0),
    "RKD": dict(w_dist=25, w_angle=50), "CC": dict(gamma=0.4, P_order=2),
    "IRG": dict(w_irg_vert=0.1, w_irg_edge=5, w_irg_tran=5),
    "VID": dict(in_channels=3, mid_channels=4, out_channels=5, init_var=5.0),
    "OFD": dict(in_channels=3, out_channels=5), "AFD": dict(in_channels=3, att_f=0.5),
    "CRD": dict(s_dim=6, t_dim=7, feat_dim=8, nce_n=5, nce_t=0.1, nce_mom=0.5, n_data=20),
    "FusedLinearSoftTarget": dict(T=2.0),
}

# (module, the one argument changed, its message); call=True: the module stores the argument
# under its name and checks it at each call too, with the same message.
BAD = [
    ("SoftTarget", dict(T=0.0), "T must be > 0", True),
    ("SoftTarget", dict(T=-1), "T must be > 0", True),
    ("SoftTarget", dict(T="4"), "T must be a real number", True),
    ("BSS", dict(T=float("nan")), "T must be finite", True),
    ("AT", dict(p=0), "p must be > 0", True),
    ("AB", dict(margin=-1.0), "margin must be >= 0", True),
    ("RKD", dict(w_dist="25"), "w_dist must be a real number", True),
    ("RKD", dict(w_angle=float("inf")), "w_angle must be finite", True),
    ("CC", dict(gamma=float("nan")), "gamma must be finite", True),
    ("CC", dict(P_order=1.5), "P_order must be an integer", True),
    ("CC", dict(P_order=-1), "P_order must be >= 0", True),
    ("IRG", dict(w_irg_vert=None), "w_irg_vert must be a real number", True),
    ("IRG", dict(w_irg_edge=float("inf")), "w_irg_edge must be finite", True),
    ("IRG", dict(w_irg_tran=float("nan")), "w_irg_tran must be finite", True),
    ("VID", dict(eps=0.0), "eps must be > 0", True),
    ("VID", dict(in_channels=0), "in_channels must be >= 1", False),
    ("VID", dict(mid_channels=0), "mid_channels must be >= 1", False),
    ("VID", dict(out_channels=2.5), "out_channels must be an integer", False),
    ("OFD", dict(in_channels=-3), "in_channels must be >= 1", False),
    ("OFD", dict(out_channels=0), "out_channels must be >= 1", False),
    ("AFD", dict(in_channels=0), "in_channels must be >= 1", False),
    ("AFD", dict(att_f=0.25), r"int\(in_channels \* att_f\) must be >= 1, got 0", False),
    ("CRD", dict(s_dim=0), "s_dim must be >= 1", False),
    ("CRD", dict(t_dim=6.0), "t_dim must be an integer", False),
    ("CRD", dict(feat_dim=0), "feat_dim must be >= 1", False),
    ("CRD", dict(nce_n=0), "nce_n must be >= 1", False),
    ("CRD", dict(nce_t=0.0), "nce_t must be > 0", False),
    ("CRD", dict(n_data=0), "n_data must be >= 1", False),
    ("FusedLinearSoftTarget", dict(T=0.0), "T must be > 0", False),
    ("FusedLinearSoftTarget", dict(hard_weight=-0.5), "hard_weight must be >= 0", False),
    ("FusedLinearSoftTarget", dict(reduction="avg"), "reduction must be one of batchmean, sum, mean, none", False),
    ("FusedLinearSoftTarget", dict(ignore_index=-100.0), "ignore_index must be an integer", False),
    ("FusedLinearSoftTarget", dict(chunk_size=0), "chunk_size must be >= 1", False),
]


@pytest.mark.parametrize("name,bad,match,call", BAD)
def test_bad_constructor_arguments_raise_at_construction(name, bad, match, call):
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(fastkd, name)(**{**VALID[name], **bad})
    if call:  # the same check, with the same message, at each call
        loss, args = cases()[name]
        (key, value), = bad.items()
        setattr(loss, key, value)
        with pytest.raises((ValueError, TypeError), match=match):
            loss(*args)


@pytest.mark.parametrize("name", ["PKTCosSim", "RKD", "SP", "CC", "IRG", "CRD"])
def test_global_batch_must_be_a_bool_at_construction(name):
    with pytest.raises(TypeError, match="global_batch must be True or False, got int"):
        getattr(fastkd, name)(**VALID.get(name, {}), global_batch=1)


def test_what_a_call_accepts_constructs():
    for name, kwargs in VALID.items():
        assert getattr(fastkd, name)(**kwargs) is not None
    fastkd.SoftTarget(4), fastkd.SoftTarget(torch.tensor(4.0)), fastkd.AT(2)
    fastkd.AB(0.0), fastkd.CC(0.0, 0), fastkd.RKD(0, -1.5), fastkd.IRG(0, 0, torch.tensor(5.0))
    fastkd.FusedLinearSoftTarget(2.0, reduction="sum", ignore_index=-1, hard_weight=0.5, chunk_size=8)
    # Sizes as torch's constructors read them (e.g. numpy or 0-d tensor integers), and
    # AFD's attention one channel wide.
    fastkd.VID(np.int64(3), torch.tensor(4), 5, 5.0)
    fastkd.CRD(torch.tensor(6), 7, 8, np.int64(5), torch.tensor(0.1), 0.5, torch.tensor(20))
    fastkd.AFD(4, 0.25)


def test_target_checks():
    img, fm_s, out_s, fm_t, out_t, target = graph_inputs()
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 5\)"):
        fastkd.Sobolev()(out_s, out_t, img, target + 2)
    with pytest.raises(TypeError, match="target must have an integer dtype"):
        fastkd.Sobolev()(out_s, out_t, img, target.float())
    with pytest.raises(ValueError, match="target must have shape"):
        fastkd.LwM()(out_s, fm_s, out_t, fm_t, target[:2])
    with pytest.raises(ValueError, match="img must require grad"):
        fastkd.Sobolev()(out_s, out_t, img.detach(), target)


def test_different_devices_are_a_clear_error():
    # The meta device stands in for a second device on a machine without a GPU.
    with pytest.raises(ValueError, match="one device.*out_s on cpu.*out_t on meta"):
        fastkd.SoftTarget(4)(r(4, 10), torch.empty(4, 10, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        fastkd.FSP()(r(2, 3, 4, 4), r(2, 4, 4, 4), r(2, 3, 4, 4), torch.empty(2, 4, 4, 4, device="meta"))


@pytest.mark.parametrize("name", list(cases()))
def test_inputs_are_never_modified(name):
    loss, args = cases()[name]
    flat = [x for a in args for x in (a if isinstance(a, list) else [a])]
    leaves = [x for x in flat if x.is_floating_point() and x.is_leaf]
    for x in leaves:
        x.requires_grad_(True)
    before = [x.detach().clone() for x in flat]
    loss(*args).backward()
    for x, b in zip(flat, before):
        assert torch.equal(x.detach(), b), name
