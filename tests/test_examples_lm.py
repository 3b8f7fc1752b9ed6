"""The LM example: a few steps of teacher and students, on both the default and the
reference backend, give finite held-out losses; the top-k teacher runs too."""
import math

import pytest
import torch

from fastkd.examples import lm


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("extra", [[], ["--topk", "8"], ["--backend", "reference"]])
def test_example_runs(extra, capsys):
    results = lm.main(["--steps", "2", "--teacher-steps", "2", "--chars", "8000", "--batch", "4",
                       "--context", "32", *extra])
    assert set(results) == {"teacher", "student, cross-entropy", "student, FusedLinearSoftTarget"}
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    assert "held-out cross-entropy" in capsys.readouterr().out


def test_padding_is_ignored():
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(200) % 7
    for x, y in lm.batches(ids, 64, 16, 1, gen, pad_id=0):
        padded = y == lm.IGNORE
        assert padded.any() and not padded.all()
        assert torch.all(x[padded] == 0)
