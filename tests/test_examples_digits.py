"""The digits example: every method trains, and the backends train it alike.

A few steps of each method from one seed with the reference backend and with
the default backend must give the same loss trajectory (a fast path is the
same training); the command line runs every method end to end.
"""
import dataclasses
import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits example's tests: scikit-learn (its data set) is not installed")

import fastkd  # noqa: E402
from fastkd.examples import digits, models  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The example's nets are tiny; more threads only wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return digits.Digits("cpu")


@pytest.fixture(scope="module")
def run(data):
    """A teacher trained for 3 epochs (right on most samples, so BSS has samples to
    attack); students then train 2 epochs of 3 batches of 32."""
    teacher_cfg = digits.Config(epochs=3, progress=False)
    run = digits.setup_seed(data, teacher_cfg, seed=0)
    digits.train_teacher(run)
    return dataclasses.replace(run, cfg=digits.Config(epochs=2, batch_size=32, steps_per_epoch=3,
                                                      progress=False))


@pytest.fixture(scope="module")
def baseline(run):
    return digits.train_student(run, "Baseline")


def test_split_and_models(data):
    assert (data.train_y.shape[0], data.test_y.shape[0]) == (1437, 360)
    assert data.train_y.bincount().min() > 100
    x = torch.zeros(3, 1, 8, 8)
    for net, widths in ((models.teacher(), models.TEACHER_WIDTHS), (models.student(), models.STUDENT_WIDTHS)):
        f = net(x)
        sizes = [8, 8, 4, 2]
        for (pre, post), c, size in zip(f[:4], models.channels(widths), sizes):
            assert pre.shape == post.shape == (3, c, size, size)
            assert torch.equal(post, pre.clamp_min(0))
        assert f.feat.shape == (3, widths[-1]) and f.out.shape == (3, 10)


def test_contrast_indices_are_negatives(data):
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(0, 40)
    target = data.train_y[idx]
    sample_idx = data.contrast_indices(idx, target, 50, gen)
    assert sample_idx.shape == (40, 51)
    assert torch.equal(sample_idx[:, 0], idx)
    assert (data.train_y[sample_idx[:, 1:]] != target[:, None]).all()
    assert all(row.unique().numel() == 50 for row in sample_idx[:, 1:])


@pytest.mark.parametrize("name", list(digits.METHODS))
def test_backends_train_alike(run, baseline, name):
    with fastkd.use_backend("reference"):
        ref = digits.train_student(run, name)
    default = digits.train_student(run, name)
    ref_losses, losses = torch.tensor(ref.losses), torch.tensor(default.losses)
    assert ref_losses.shape == losses.shape and len(ref_losses) >= 6
    assert torch.isfinite(ref_losses).all() and torch.isfinite(losses).all()
    # The method's KD term took part: the trajectory is not the Baseline's.
    n = min(len(ref.losses), len(baseline.losses))
    assert not torch.allclose(ref_losses[-n:], torch.tensor(baseline.losses[-n:]))
    # Same first step from the same weights and batch; then the same training.
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=1e-4)


def test_command_line_runs_every_method(tmp_path, capsys):
    out_json, out_png = tmp_path / "digits.json", tmp_path / "digits.png"
    argv = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "32", "--seeds", "0", "1",
            "--no-progress", "--json", str(out_json)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(out_png)]
    except ImportError:
        out_png = None
    digits.main(argv)
    table = capsys.readouterr().out
    assert f"wrote {out_json}\n" in table
    if out_png is not None:
        assert f"wrote {out_png}\n" in table
    names = ["Teacher", "Baseline"] + list(digits.METHODS)
    for name in names:
        assert f"\n{name} " in table
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == names
    for r in rows:
        assert r["finite_losses"] and len(r["accuracy"]) == 2 and r["std"] is not None
        assert 0 <= r["mean"] <= 100 and r["sec_per_epoch"] > 0
    if out_png is not None:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_options(monkeypatch, capsys):
    assert digits.method_names(["all"]) == list(digits.METHODS)
    assert digits.method_names(["st,fitnet", "RKD", "rkd"]) == ["SoftTarget", "Hint", "RKD"]
    with pytest.raises(SystemExit):
        digits.parse_args(["--methods", "NoSuchMethod"])
    assert digits.parse_args(["--kd-weight", "at=62.5", "pkt=1e3"]).kd_weight == {"AT": 62.5, "PKTCosSim": 1e3}
    for bad in ("AT", "AT=x", "all=3", "NoSuchMethod=1"):
        with pytest.raises(SystemExit):
            digits.parse_args(["--kd-weight", bad])
    real_find_spec = digits.importlib.util.find_spec
    monkeypatch.setattr(digits.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real_find_spec(name))
    with pytest.raises(SystemExit):
        digits.parse_args(["--plot", "x.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err
