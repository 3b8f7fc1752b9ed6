"""Modules with parameters or buffers keep the collection's names: state_dicts round-trip."""
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
