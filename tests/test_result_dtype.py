"""One rule for the result dtype: every backend gives a loss of mixed-precision inputs the
dtype the reference gives it (torch's promotion of the dtypes its arithmetic mixes).
"""
import pytest
import torch

import fastkd
from fastkd.bench import cases
from fastkd.common import result_dtype
from helpers import route_through_operators

CPU = torch.device("cpu")
ONE_CASE_PER_LOSS = {c.loss: c for c in reversed(cases.cases("tiny", "cpu"))}


def _mixed(case, side, dtype):
    """The case's inputs with the floating tensors of one side (0: even positions, the
    student's in every case; 1: odd, the teacher's) in dtype, the others float32."""
    inputs = case.inputs(CPU, torch.float32, torch.Generator().manual_seed(0))
    return [x.detach().to(dtype).requires_grad_(x.requires_grad)
            if isinstance(x, torch.Tensor) and x.is_floating_point() and i % 2 == side else x
            for i, x in enumerate(inputs)]


@pytest.mark.parametrize("backend", ["torch", "triton", "operators"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("side", [0, 1], ids=["student", "teacher"])
@pytest.mark.parametrize("loss", sorted(ONE_CASE_PER_LOSS))
def test_mixed_precision_result_has_the_reference_dtype(loss, side, dtype, backend, monkeypatch):
    """"operators": compiled through fastkd.device_ops' operators (on CPU tensors here),
    whose fakes must give the dtype their kernels return."""
    case = ONE_CASE_PER_LOSS[loss]
    try:
        expected = case.build("reference", CPU, torch.float32)(*_mixed(case, side, dtype))
    except RuntimeError:
        pytest.skip(f"{loss} with inputs mixing {dtype} and float32: not a case the reference supports "
                    f"(it raises on the mix)")
    module = case.build("fastkd", CPU, torch.float32)
    if backend == "operators":
        route_through_operators(monkeypatch)
        torch._dynamo.reset()
        got = torch.compile(lambda *x: module(*x), backend="aot_eager")(*_mixed(case, side, dtype))
    else:
        with fastkd.use_backend(backend):
            got = module(*_mixed(case, side, dtype))
    assert got.dtype == expected.dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


def test_result_dtype_is_torch_promotion():
    f32, f64, bf16 = (torch.zeros(2, dtype=d) for d in (torch.float32, torch.float64, torch.bfloat16))
    assert result_dtype(f32, f64) == torch.float64
    assert result_dtype(bf16, f32) == torch.float32
    assert result_dtype(bf16) == torch.bfloat16
    assert result_dtype(bf16, torch.zeros(2, dtype=torch.float16)) == torch.float32
