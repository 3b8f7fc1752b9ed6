"""SP, PKT, CC, IRG's edge and transformation terms and RKD's two terms on float32 inputs:
the Triton path computes in float32 (no float64 building block is called), and its compensated steps keep
these cases within the reference's own float32 error: each case fails (11x to 4e6x the
reference's error) with the step named beside it done in plain float32 (docs/numerics.md).

The cases come from tests/adversarial_rows.py and are judged as the adversarial tests judge
(tests/test_adversarial_pairwise.py: compare, against float64 on exactly the float32 values).
"""
import pytest
import torch

from adversarial_rows import rows
from fastkd import backend
from fastkd.kernels import angle, distance, gram, irg_transformation
from helpers import assert_close
from test_adversarial_pairwise import compare, inputs, loss_and_grads

# (op, n, d, case, gap_exp, near, seed, upstream gradient) where the float32 step named
# beside it matters.
CASES = {
    # G^_s - G^_t in double-float: each side's G / n rounded to float32 first, the loss is
    # 22x the reference's error off.
    "sp": ("sp", 5, 7, "tiny", 2, True, 2, 0.75),
    # The row sums S of C' double-float: with S rounded to float32, 560x.
    "pkt": ("pkt_cos_sim", 12, 24, "tiny", 4, True, 2, 0.75),
    # S = G / (n_a n_b) double-float: S = G w_a w_b in float32, 40x (cosines near 1).
    "cc": ("cc", 12, 24, "tiny", 7, True, 1, 0.75),
    # The maximum of E ordered by (hi, lo): a near-duplicate pair's two distances to the
    # farthest row round to one float32 value, and by hi alone the max's gradient goes to
    # both (the teacher's gradient 4e6x).
    "irg_edge max": ("irg_edge", 12, 20, "spread", 7, False, 1, 0.75),
    # E'_s - E'_t in double-float: each side's E / max(E) rounded to float32 first, the loss
    # is 23x off (teacher ~ student).
    "irg_edge near": ("irg_edge", 12, 20, "spread", 7, True, 0, 0.75),
    # IRG's transformation term (one distance per sample), likewise: its maximum ordered by
    # (hi, lo) (the teacher's gradient 4e6x by hi alone), T_s - T_t in double-float (11x);
    # and at the maximum, its own term of the max's share cancelling exactly (16x with the
    # share summed whole, the student's gradient).
    "irg_transformation max": ("irg_transformation", 12, 20, "spread", 7, False, 1, 0.75),
    "irg_transformation near": ("irg_transformation", 12, 20, "duplicates", 2, True, 0, 0.75),
    "irg_transformation share": ("irg_transformation", 5, 8, "spread", 7, False, 0, 0.25),
    # RKD's distance term (teacher ~ student): the sums of d double-float (with float32 sums,
    # so each mean rounded to float32, the loss is 31x the reference's error), and
    # d_s / m_s - d_t / m_t in double-float (each ratio rounded to float32 first, 16x); with
    # the angle term beside it, the loss 33x (float32 sums) and 27x (float32 ratios).
    "rkd_distance mean": ("rkd_distance", 12, 20, "huge", 4, True, 3, 0.75),
    "rkd_distance near": ("rkd_distance", 5, 7, "tiny", 7, True, 1, 0.75),
    "rkd both terms": ("rkd", 12, 20, "huge", 4, True, 3, 0.75),
    # RKD's angle term (teacher ~ student): A_s - A_t as the difference of each side's angles
    # in double-float, rounded once; the difference of the angles rounded to float32 leaves
    # the loss 10x the reference's error, 37x with the distance term beside it.
    "rkd_angle near": ("rkd_angle", 5, 7, "huge", 2, True, 1, 0.75),
    "rkd both terms near": ("rkd", 5, 7, "huge", 2, True, 1, 0.75),
}


def _refuse(*args, **kwargs):
    raise AssertionError("a float64 building block ran on float32 inputs")


@pytest.mark.parametrize("name", CASES)
def test_float32_path_within_the_reference_error(name, monkeypatch):
    op, n, d, case, gap_exp, near, seed, grad_out = CASES[name]
    s, t = inputs(n, d, case, gap_exp, near, torch.float32, seed)
    for name in ("gram", "prepare", "squared_distances"):  # the float64 path's kernels
        monkeypatch.setattr(gram, name, _refuse)
    for name in ("transformation_distances", "transformation_loss"):
        monkeypatch.setattr(irg_transformation, name, _refuse)
    compare(op, "triton", s, t, torch.tensor(grad_out, dtype=torch.float64),
            f"{op} float32 path, {case} gap 1e-{gap_exp} near={near}")


@pytest.mark.parametrize("name", CASES)
def test_float64_inputs_keep_the_float64_path(name, monkeypatch):
    """Float64 inputs never reach the float32 kernels."""
    op, n, d, case, gap_exp, near, seed, _ = CASES[name]
    s, t = inputs(n, d, case, gap_exp, near, torch.float64, seed)
    for name in ("gram_split", "slices", "squared_distances_parts", "squared_norms_split"):
        monkeypatch.setattr(gram, name, _refuse)
    for name in ("transformation_distances_split", "transformation_split_loss"):
        monkeypatch.setattr(irg_transformation, name, _refuse)
    grad_out = torch.tensor(0.75, dtype=torch.float64)
    for a, e in zip(loss_and_grads(op, "triton", s, t, grad_out), loss_and_grads(op, "reference", s, t, grad_out)):
        assert_close(a, e, msg=f"{op} float64")


@pytest.mark.parametrize("name", ["rkd_distance mean", "rkd both terms"])
def test_rkd_kernels_take_float32(name, monkeypatch):
    """On float32 inputs RKD's distance and angle terms read E's float32 parts and float32
    statistics: no float64 E is formed for either term (the angle term's exact anchors sum
    the parts in their kernels)."""
    op, n, d, case, gap_exp, near, seed, grad_out = CASES[name]
    s, t = inputs(n, d, case, gap_exp, near, torch.float32, seed)
    seen = []

    def recording(f):
        def run(*args, **kwargs):
            for a in (*args, *kwargs.values()):
                seen.extend(x.dtype for x in (a if isinstance(a, (tuple, list)) else (a,))
                            if isinstance(x, torch.Tensor) and x.is_floating_point())
            return f(*args, **kwargs)
        return run

    for module, names in ((distance, ("rkd_distance_forward", "rkd_distance_backward")),
                          (angle, ("rkd_angle_forward", "rkd_angle_backward"))):
        for f in names:
            monkeypatch.setattr(module, f, recording(getattr(module, f)))
    loss_and_grads(op, "triton", s, t, torch.tensor(grad_out, dtype=torch.float64))
    assert seen and set(seen) == {torch.float32}


def test_rkd_distance_not_finite_where_the_reference_is_not():
    """Rows whose squared distances overflow float32 (|x| ~ 1e22), and a NaN row: the
    reference's float32 loss is NaN, and so is the float32 path's (its clamp at 1e-12 lets
    NaN through rather than reading it as a clamped distance)."""
    s = rows(12, 20, "spread", 3).float()
    t = rows(12, 25, "spread", 4).float()
    with_nan = s.clone()
    with_nan[2] = float("nan")
    for x in (s * 1e19, with_nan):
        assert not torch.isfinite(backend.IMPLEMENTATIONS["rkd_distance"]["reference"](x, t))
        assert not torch.isfinite(backend.IMPLEMENTATIONS["rkd_distance"]["triton"](x, t))
