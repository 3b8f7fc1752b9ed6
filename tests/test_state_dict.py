"""Modules with parameters or buffers keep the collection's names: state_dicts round-trip.

CRD's state (memory banks, and Z once its first call fixed it) survives a save and load
exactly, and a call that raises leaves it bit-identical."""
import pytest
import torch

import fastkd
from fastkd import reference

# The collection's state_dict keys, spelled out so a renamed submodule fails here.
MODULES = {
    "VID": (lambda m: m.VID(3, 4, 5, 2.0),
            ["alpha", "regressor.0.weight", "regressor.2.weight", "regressor.4.weight"]),
    "OFD": (lambda m: m.OFD(3, 5),
            ["connector.0.weight", "connector.1.weight", "connector.1.bias", "connector.1.running_mean",
             "connector.1.running_var", "connector.1.num_batches_tracked"]),
    "AFD": (lambda m: m.AFD(4, 0.5),
            ["attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias"]),
    "CRD": (lambda m: m.CRD(6, 7, 8, 5, 0.1, 0.5, 20),
            ["embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
             "embed_t.linear.bias", "contrast.memory_t", "contrast.memory_s"]),
    "Paraphraser": (lambda m: m.Paraphraser(4, 0.5),
                    [f"encoder.{i}.{p}" for i in (0, 3, 6) for p in ("weight",)]
                    + [f"encoder.{i}.{p}" for i in (1, 4, 7)
                       for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
                    + [f"decoder.{i}.{p}" for i in (0, 3, 6) for p in ("weight",)]
                    + [f"decoder.{i}.{p}" for i in (1, 4, 7)
                       for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]),
    "Translator": (lambda m: m.Translator(3, 4, 0.5, use_bn=False),
                   [f"encoder.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_state_dict_keys_are_the_collections(name):
    make, keys = MODULES[name]
    assert sorted(make(reference).state_dict()) == sorted(keys)
    assert sorted(make(fastkd).state_dict()) == sorted(keys)


@pytest.mark.parametrize("name", list(MODULES))
def test_state_dict_round_trips_between_reference_and_public(name):
    make, _ = MODULES[name]
    torch.manual_seed(1)
    src = make(reference)
    torch.manual_seed(2)
    dst = make(fastkd)
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    dst.load_state_dict(src.state_dict(), strict=True)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    back = make(reference)
    back.load_state_dict(dst.state_dict(), strict=True)


@pytest.mark.parametrize("name", list(MODULES))
def test_same_seed_gives_same_initialisation(name):
    make, _ = MODULES[name]
    torch.manual_seed(3)
    a = make(reference).state_dict()
    torch.manual_seed(3)
    b = make(fastkd).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vid_starts_at_init_var():
    vid = fastkd.VID(3, 4, 5, init_var=2.0)
    var = torch.nn.functional.softplus(vid.alpha) + vid.eps
    torch.testing.assert_close(var, torch.full((5,), 2.0))


# --- CRD: the memory banks and the normalisers Z are state ---------------------------------

CRD_ARGS = (6, 7, 8, 5, 0.1, 0.5, 20)  # s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data
Z_KEYS = ["contrast.Z_s", "contrast.Z_t"]
BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton"])


def crd_batches(n, seed=0, batch=4):
    """n batches (feat_s, feat_t, idx, sample_idx); the positive first in sample_idx."""
    s_dim, t_dim, _, nce_n, _, _, n_data = CRD_ARGS
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randperm(n_data, generator=g)[:batch]
        sample_idx = torch.cat([idx[:, None], torch.randint(0, n_data, (batch, nce_n), generator=g)], 1)
        out.append((torch.randn(batch, 3, 2, generator=g), torch.randn(batch, t_dim, generator=g),
                    idx, sample_idx))
    return out


def crd_state(crd):
    """Everything a call may change, copied: the state_dict (Z in it once set) and Z itself."""
    return ({k: v.clone() for k, v in crd.state_dict().items()}, crd.contrast.Z_s, crd.contrast.Z_t)


def assert_same_state(crd, before):
    sd, z_s, z_t = crd_state(crd)
    assert list(sd) == list(before[0])
    for k, v in before[0].items():  # exactly equal (a NaN a test put there stays NaN)
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for z, z0 in ((z_s, before[1]), (z_t, before[2])):
        assert (z is None) == (z0 is None) and (z is None or torch.equal(z, z0))


def crd_module(calls, backend="torch", seed=0):
    """A fastkd.CRD after `calls` calls (calls=0: Z not fixed yet)."""
    torch.manual_seed(seed)
    crd = fastkd.CRD(*CRD_ARGS)
    with fastkd.use_backend(backend):
        for batch in crd_batches(calls, seed=100):
            crd(*batch)
    return crd


def test_crd_state_dict_holds_z_once_the_first_call_fixed_it():
    crd = fastkd.CRD(*CRD_ARGS)
    assert crd.contrast.Z_s is None and crd.contrast.Z_t is None
    assert sorted(crd.state_dict()) == sorted(MODULES["CRD"][1])
    crd(*crd_batches(1)[0])
    sd = crd.state_dict()
    assert sorted(sd) == sorted(MODULES["CRD"][1] + Z_KEYS)
    assert torch.equal(sd["contrast.Z_s"], crd.contrast.Z_s) and sd["contrast.Z_s"] > 0
    assert crd.double().contrast.Z_t.dtype == torch.float64  # a buffer: follows .to()


@BACKENDS
@pytest.mark.parametrize("calls_before_save", [0, 2])
def test_crd_resumed_from_state_dict_computes_the_same_losses(backend, calls_before_save):
    original = crd_module(calls_before_save, backend)
    resumed = crd_module(3, backend, seed=1)  # other weights and memory, Z fixed by its own calls
    resumed.load_state_dict(original.state_dict(), strict=True)
    assert_same_state(resumed, crd_state(original))
    with fastkd.use_backend(backend):
        for batch in crd_batches(3, seed=200):
            loss, resumed_loss = original(*batch), resumed(*batch)
            assert torch.equal(loss, resumed_loss)
            grads = torch.autograd.grad(loss, list(original.parameters()))
            resumed_grads = torch.autograd.grad(resumed_loss, list(resumed.parameters()))
            for a, b in zip(grads, resumed_grads):
                assert torch.equal(a, b)
            assert_same_state(resumed, crd_state(original))


def test_crd_without_z_in_the_state_dict_fixes_z_again():
    # What the test above guards against: the banks alone do not resume the loss.
    original = crd_module(2)
    resumed = fastkd.CRD(*CRD_ARGS)
    sd = {k: v for k, v in original.state_dict().items() if k not in Z_KEYS}
    resumed.load_state_dict(sd, strict=True)
    batch = crd_batches(1, seed=200)[0]
    assert not torch.equal(original(*batch), resumed(*batch))


def test_crd_collection_state_dict_loads_strictly_and_resumes_as_the_collection():
    # The collection's CRD saves the banks only; a module that loads them fixes Z from its
    # next batch, as the collection's own module does after loading.
    torch.manual_seed(0)
    collection = reference.CRD(*CRD_ARGS)
    for batch in crd_batches(2, seed=100):
        collection(*batch)
    sd = collection.state_dict()
    assert sorted(sd) == sorted(MODULES["CRD"][1])
    ours = crd_module(2, seed=1)  # Z set: loading the banks without Z unsets it
    ours.load_state_dict(sd, strict=True)
    assert ours.contrast.Z_s is None and ours.contrast.Z_t is None
    resumed_collection = reference.CRD(*CRD_ARGS)
    resumed_collection.load_state_dict(sd, strict=True)
    for batch in crd_batches(2, seed=200):
        torch.testing.assert_close(ours(*batch), resumed_collection(*batch))
        assert ours.contrast.Z_s.item() == pytest.approx(resumed_collection.contrast.Z_s)


def test_crd_state_dict_loads_into_the_reference_without_z():
    # The collection (and fastkd.reference, its mirror) keep Z outside state_dict: strict
    # loading names the two extra keys; strict=False loads the rest, and the reference
    # fixes its own Z from its next batch.
    ours = crd_module(2)
    ref = reference.CRD(*CRD_ARGS)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*contrast\.Z_s.*contrast\.Z_t"):
        ref.load_state_dict(ours.state_dict(), strict=True)
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == Z_KEYS and result.missing_keys == []
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert ref.contrast.Z_s is None


def test_crd_state_dict_without_the_banks_keeps_z():
    # strict=False with only the embeddings' weights: Z goes with the banks, which stay.
    crd = crd_module(2)
    before = crd_state(crd)
    other = crd_module(0, seed=1)
    crd.load_state_dict({k: v for k, v in other.state_dict().items() if k.startswith("embed_")},
                        strict=False)
    assert torch.equal(crd.contrast.Z_s, before[1]) and torch.equal(crd.contrast.Z_t, before[2])


# --- CRD: a failing call changes nothing ----------------------------------------------------


def _with(batch, i, value):
    batch = list(batch)
    batch[i] = value
    return batch


def _poison(x, value):
    x = x.clone()
    x.view(-1)[1] = value
    return x


@BACKENDS
@pytest.mark.parametrize("calls", [0, 1], ids=["first-call", "later-call"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("i,name", [(0, "feat_s"), (1, "feat_t")])
def test_crd_non_finite_features_change_nothing(backend, calls, value, i, name):
    crd = crd_module(calls, backend)
    before = crd_state(crd)
    batch = crd_batches(1, seed=200)[0]
    with fastkd.use_backend(backend), pytest.raises(ValueError, match=f"^{name} has NaN or Inf"):
        crd(*_with(batch, i, _poison(batch[i], value)))
    assert_same_state(crd, before)


@BACKENDS
@pytest.mark.parametrize("calls", [0, 1], ids=["first-call", "later-call"])
@pytest.mark.parametrize("side", ["s", "t"])
def test_crd_non_finite_embeddings_change_nothing(backend, calls, side):
    crd = crd_module(calls, backend)
    with torch.no_grad():
        getattr(crd, f"embed_{side}").linear.weight[0, 0] = float("nan")
    before = crd_state(crd)
    with fastkd.use_backend(backend), pytest.raises(ValueError, match=rf"^embed_{side}\(feat_{side}\) has NaN"):
        crd(*crd_batches(1, seed=200)[0])
    assert_same_state(crd, before)


def test_crd_non_finite_z_changes_nothing():
    # exp(memory . embed / nce_t) overflows float32 at this nce_t: Z would be inf.
    crd = fastkd.CRD(*CRD_ARGS[:4], 1e-3, *CRD_ARGS[5:])
    before = crd_state(crd)
    with pytest.raises(ValueError, match=r"^Z_s = .* is inf, not a positive finite number \(nce_t=0.001\)"):
        crd(*crd_batches(1, seed=200)[0])
    assert_same_state(crd, before)


def test_crd_non_finite_memory_rows_are_named():
    crd = crd_module(1)
    batch = crd_batches(1, seed=200)[0]
    with torch.no_grad():
        crd.contrast.memory_t[batch[2][0]] = float("nan")
    before = crd_state(crd)
    with pytest.raises(ValueError, match="^memory_t at rows idx has NaN or Inf"):
        crd(*batch)
    assert_same_state(crd, before)


def _bad_inputs():
    feat_s, feat_t, idx, sample_idx = crd_batches(1, seed=200)[0]
    return {
        "feat_s not a tensor": ([feat_s.tolist(), feat_t, idx, sample_idx], TypeError, "feat_s must be"),
        "feat_t integer": ([feat_s, feat_t.long(), idx, sample_idx], TypeError, "feat_t must have a floating"),
        "feat_s width": ([feat_s[..., :1], feat_t, idx, sample_idx], ValueError, "feat_s must hold 6 values"),
        "batch sizes": ([feat_s, feat_t[:3], idx, sample_idx], ValueError, "same batch size"),
        "idx float": ([feat_s, feat_t, idx.float(), sample_idx], TypeError, "idx must have an integer"),
        "idx shape": ([feat_s, feat_t, idx[:3], sample_idx], ValueError, r"idx must have shape \(4,\)"),
        "idx range": ([feat_s, feat_t, idx + 20, sample_idx], ValueError, r"idx values must lie in \[0, 20\)"),
        "sample_idx width": ([feat_s, feat_t, idx, sample_idx[:, :5]], ValueError,
                             r"sample_idx must have shape \(4, 6\)"),
        "sample_idx range": ([feat_s, feat_t, idx, sample_idx - 1], ValueError,
                             r"sample_idx values must lie in \[0, 20\)"),
        "idx device": ([feat_s, feat_t, idx.to("meta"), sample_idx], ValueError, "idx on meta"),
    }


@BACKENDS
@pytest.mark.parametrize("calls", [0, 1], ids=["first-call", "later-call"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_crd_bad_input_changes_nothing(backend, calls, case):
    args, error, match = _bad_inputs()[case]
    crd = crd_module(calls, backend)
    before = crd_state(crd)
    with fastkd.use_backend(backend), pytest.raises(error, match=match):
        crd(*args)
    assert_same_state(crd, before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_crd_narrow_integer_indices_work_as_int64(dtype):
    a, b = crd_module(0), crd_module(0)
    for feat_s, feat_t, idx, sample_idx in crd_batches(2, seed=200):
        expected = a(feat_s, feat_t, idx, sample_idx)
        assert torch.equal(b(feat_s, feat_t, idx.to(dtype), sample_idx.to(dtype)), expected)
        assert_same_state(b, crd_state(a))
