"""fastkd.<Name> is a drop-in: same numbers and gradients as fastkd.reference.<Name>."""
import pytest
import torch

import fastkd
from fastkd import reference

from helpers import assert_close
from test_validation import TinyNet


def r(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]), dtype=torch.float64)


def leaf(*shape):
    return r(*shape).requires_grad_()


STATELESS = {
    "Logits": ((), lambda: [leaf(4, 10), leaf(4, 10)]),
    "SoftTarget": ((4.0,), lambda: [leaf(4, 10), leaf(4, 10)]),
    "DML": ((), lambda: [leaf(4, 10), leaf(4, 10)]),
    "BSS": ((2.0,), lambda: [leaf(4, 10), leaf(4, 10)]),
    "AT": ((2,), lambda: [leaf(2, 3, 4, 4), leaf(2, 5, 4, 4)]),
    "Hint": ((), lambda: [leaf(2, 3, 4, 4), leaf(2, 3, 4, 4)]),
    "NST": ((), lambda: [leaf(2, 3, 4, 4), leaf(2, 5, 2, 8)]),
    "FSP": ((), lambda: [leaf(2, 3, 8, 8), leaf(2, 4, 4, 4), leaf(2, 3, 8, 8), leaf(2, 4, 4, 4)]),
    "FT": ((), lambda: [leaf(2, 3, 4, 4), leaf(2, 3, 4, 4)]),
    "AB": ((1.0,), lambda: [leaf(2, 3, 4, 4), leaf(2, 3, 4, 4)]),
    "PKTCosSim": ((), lambda: [leaf(5, 6), leaf(5, 7)]),
    "RKD": ((25, 50), lambda: [leaf(5, 6), leaf(5, 7)]),
    "SP": ((), lambda: [leaf(5, 3, 2, 2), leaf(5, 5, 2, 2)]),
    "CC": ((0.4, 2), lambda: [leaf(5, 6), leaf(5, 7)]),
    "IRG": ((0.1, 5, 5), lambda: [[leaf(4, 2, 4, 4), leaf(4, 4, 2, 2), leaf(4, 6), leaf(4, 10)],
                                  [leaf(4, 3, 4, 4), leaf(4, 3, 4, 4), leaf(4, 7), leaf(4, 10)]]),
}


def _leaves(args):
    return [x for a in args for x in (a if isinstance(a, list) else [a]) if x.requires_grad]


def _loss_and_grads(loss_fn, args):
    loss = loss_fn(*args)
    leaves = _leaves(args)
    return loss, torch.autograd.grad(loss * 1.7, leaves, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name", list(STATELESS))
@pytest.mark.parametrize("backend", ["auto", "triton"])  # auto: torch on CPU tensors
def test_stateless_losses_match_the_reference(name, backend):
    hyper, make = STATELESS[name]
    args = make()
    expected, expected_grads = _loss_and_grads(getattr(reference, name)(*hyper), args)
    with fastkd.use_backend(backend):
        loss, grads = _loss_and_grads(getattr(fastkd, name)(*hyper), args)
    assert loss.dtype == expected.dtype
    assert_close(loss, expected, msg=name)
    for a, b in zip(grads, expected_grads):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("make,shapes", [
    (lambda m: m.VID(3, 4, 5, 2.0), [(2, 3, 4, 4), (2, 5, 4, 4)]),
    (lambda m: m.OFD(3, 5), [(2, 3, 4, 4), (2, 5, 4, 4)]),
    (lambda m: m.AFD(3, 0.5), [(2, 3, 4, 4), (2, 3, 4, 4)]),
    (lambda m: m.AFD(3, 0.5), [(1, 3, 4, 4), (1, 3, 4, 4)]),
])
def test_modules_with_parameters_match_the_reference(make, shapes):
    ref = make(reference).double()
    fast = make(fastkd).double()
    fast.load_state_dict(ref.state_dict())
    args = [leaf(*s) for s in shapes]
    expected = ref(*args)
    expected_grads = torch.autograd.grad(expected, args + list(ref.parameters()))
    loss = fast(*args)
    grads = torch.autograd.grad(loss, args + list(fast.parameters()))
    assert_close(loss, expected)
    for a, b in zip(grads, expected_grads):
        assert_close(a, b)


def test_crd_matches_the_reference_over_two_calls():
    torch.manual_seed(0)
    ref = reference.CRD(6, 7, 8, 5, 0.1, 0.5, 20).double()
    fast = fastkd.CRD(6, 7, 8, 5, 0.1, 0.5, 20).double()
    fast.load_state_dict(ref.state_dict())
    for _ in range(2):
        feat_s, feat_t = leaf(4, 6), leaf(4, 7)
        idx = torch.randperm(20)[:4]
        sample_idx = torch.cat([idx[:, None], torch.randint(0, 20, (4, 5))], dim=1)
        expected = ref(feat_s, feat_t, idx, sample_idx)
        expected_grads = torch.autograd.grad(expected, [feat_s, feat_t, *ref.parameters()])
        loss = fast(feat_s, feat_t, idx, sample_idx)
        grads = torch.autograd.grad(loss, [feat_s, feat_t, *fast.parameters()])
        assert_close(loss, expected)
        for a, b in zip(grads, expected_grads):
            assert_close(a, b)
        assert fast.contrast.Z_s == pytest.approx(ref.contrast.Z_s, rel=1e-12)
        for k, v in ref.state_dict().items():
            assert_close(fast.state_dict()[k], v, msg=k)


def test_crd_batch_of_one_keeps_its_batch_dimension():
    crd = fastkd.CRD(6, 7, 8, 5, 0.1, 0.5, 20)
    loss = crd(r(1, 6).float(), r(1, 7).float(), torch.tensor([3]), torch.randint(0, 20, (1, 6)))
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["Sobolev", "LwM"])
def test_gradient_losses_match_and_train_the_student(name):
    torch.manual_seed(0)
    student, teacher = TinyNet().double(), TinyNet().double()
    img = r(4, 1, 4, 4).requires_grad_()
    target = torch.tensor([0, 1, 2, 4])

    def run(loss_module):
        fm_s, out_s = student(img)
        fm_t, out_t = teacher(img)
        args = [out_s, out_t, img, target] if name == "Sobolev" else [out_s, fm_s, out_t, fm_t, target]
        loss = loss_module(*args)
        return loss, torch.autograd.grad(loss, list(student.parameters()), materialize_grads=True)

    expected, expected_grads = run(getattr(reference, name)())
    loss, grads = run(getattr(fastkd, name)())
    assert_close(loss, expected)
    # The loss reaches the student's weights through its input gradient (double backward).
    assert any(g.abs().sum() > 0 for g in grads)
    for a, b in zip(grads, expected_grads):
        assert_close(a, b)


def test_rkd_skips_a_term_with_zero_weight():
    s, t = leaf(5, 6), leaf(5, 7)
    torch.testing.assert_close(fastkd.RKD(25, 0)(s, t), 25 * reference.rkd.rkd_distance(s, t))
    torch.testing.assert_close(fastkd.RKD(0, 50)(s, t), 50 * reference.rkd.rkd_angle(s, t))
    zero = fastkd.RKD(0, 0)(s, t)
    assert zero.item() == 0 and zero.requires_grad


def test_functional_terms_of_rkd_and_irg_add_up():
    s, t = leaf(5, 6), leaf(5, 7)
    F = fastkd.functional
    torch.testing.assert_close(F.rkd(s, t, 2.0, 3.0), 2 * F.rkd_distance(s, t) + 3 * F.rkd_angle(s, t))
    irg_s = [leaf(4, 2, 4, 4), leaf(4, 4, 2, 2), leaf(4, 6), leaf(4, 10)]
    irg_t = [leaf(4, 3, 4, 4), leaf(4, 3, 4, 4), leaf(4, 7), leaf(4, 10)]
    torch.testing.assert_close(F.irg(irg_s, irg_t, 0.1, 5, 5), reference.IRG(0.1, 5, 5)(irg_s, irg_t))


def test_bss_attacker_is_exported_and_moves_towards_the_boundary():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).double()
    img = r(8, 6)
    target = model(img).argmax(1)
    attack_class = (target + 1) % 3
    attacked = fastkd.BSSAttacker(step_alpha=0.3, num_steps=5).attack(model, img, target, attack_class)
    p0, p1 = model(img).softmax(1), model(attacked).softmax(1)
    rows = torch.arange(8)
    gap0 = p0[rows, target] - p0[rows, attack_class]
    gap1 = p1[rows, target] - p1[rows, attack_class]
    assert not attacked.requires_grad and attacked.shape == img.shape
    assert (gap1 < gap0).all()


def test_importing_fastkd_leaves_torchdynamo_unimported():
    # TorchDynamo costs about a second of import (three times the rest of fastkd's): a process
    # that never compiles, a spawned rank or a script's first line, should not pay it.
    import subprocess
    import sys
    code = "import sys, fastkd; assert 'torch._dynamo' not in sys.modules, 'fastkd imported torch._dynamo'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
