"""The benchmark's floor (fastkd.bench.roofline, cases.work, measure.floor_bytes) and the traffic
report (fastkd.bench.traffic): the floor counts what a loss cannot avoid, no more, and the Triton
paths of the memory-bound losses move at least that."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastkd.bench import cases, measure, roofline, traffic

CPU = torch.device("cpu")
F32 = torch.float32
TINY = {case.name: case for case in cases.cases("tiny", "cpu", cases.LOSSES)}
COLLECTION = {case.name: case for case in cases.collection_cases()}
# A device's measured rates (flop/s, bytes/s), round numbers of an H100's kind.
INFO = {"bandwidth_Bps": 3e12, "peak_flops": 50e12, "peak_tf32_flops": 390e12, "peak_bf16_flops": 700e12,
        "peak_fp16_flops": 710e12, "fma_flops": 60e12, "conv_tf32": True}
needs_interpreter = pytest.mark.skipif(not traffic.interpreted(), reason="the traffic report counts the Triton "
                                       "interpreter's loads and stores; this run compiles the kernels for a GPU")


def _run_reference_counting_flops(case):
    module = case.build("reference", CPU, F32)
    with FlopCounterMode(display=False) as counter:
        module(*case.inputs(CPU, F32, torch.Generator().manual_seed(0))).backward()
    return counter.get_total_flops()


# --- bytes ---------------------------------------------------------------------------

def test_floor_bytes_read_each_input_once_and_write_the_students_gradient_once():
    case = TINY["AT B=4 C=8 8x8"]
    values = 4 * 8 * 8 * 8
    # Student read + its gradient written, teacher read (it needs no gradient).
    assert measure.floor_bytes(case, F32) == 3 * values * 4
    assert measure.floor_bytes(case, torch.bfloat16) == 3 * values * 2
    # A teacher that trains too: its gradient is written as well.
    both = dataclasses.replace(case, inputs=lambda device, dtype, gen: tuple(
        x.requires_grad_() for x in case.inputs(device, dtype, gen)))
    assert measure.floor_bytes(both, F32) == 4 * values * 4


def test_floor_bytes_count_each_parameter_and_its_gradient():
    case = TINY["VID B=4 C=8 8x8"]  # three 1x1 convs 8 -> 8 without bias, and alpha (8,)
    params = 3 * 8 * 8 + 8
    assert measure.floor_bytes(case, F32) == (3 * 4 * 8 * 8 * 8 + 2 * params) * 4


def test_floor_bytes_of_crd_count_its_distinct_memory_rows_once():
    case = TINY["CRD B=4 n=64 d=16"]
    b, n, d, n_data = 4, 64, 16, 500
    distinct = round(n_data * (1 - math.exp(-b * (n + 1) / n_data)))
    assert case.extra_values == 2 * (distinct + b) * d  # both banks: gathered rows, then the B updated
    assert distinct < b * (n + 1)  # rows repeat: each is read once, not at every gather
    assert case.vector_ops == 2 * 2 * b * (n + 1) * d


# --- work ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["VID rb1 B=128 C=16 32x32", "OFD rb3 B=128 C=64 8x8", "VID B=4 C=16 4x4",
                                  "OFD B=4 C=8 8x8"])
def test_convolution_flops_are_those_torch_runs(name):
    """VID's and OFD's convolutions: forward and both gradients, as torch's flop counter
    counts them in the reference (1x1 convs, no cheaper form exists)."""
    case = {**TINY, **COLLECTION}[name]
    assert case.conv_flops > 0 and case.flops == 0
    assert case.conv_flops == _run_reference_counting_flops(case)


@pytest.mark.parametrize("name", ["FSP B=4 8x8x8>16x4x4", "FSP rb1>rb2 B=128 C=16>32", "SP N=16 D=32",
                                  "PKTCosSim N=8 D=32", "CC N=16 D=32", "IRG N=8 D=32", "SP rb2 B=128 C=32 16x16"])
def test_product_flops_are_no_more_than_the_reference_runs(name):
    """The floor's products are at most what a correct implementation (the reference) runs:
    FSP exactly its four; the Gram losses three where the reference's autograd takes four
    (both operands of X X^T)."""
    case = {**TINY, **COLLECTION}[name]
    counted = _run_reference_counting_flops(case)
    assert 0 < case.flops <= counted
    if case.loss == "FSP":
        assert case.flops == counted


def test_nst_counts_five_products_in_the_smaller_form():
    b, c, hw = 128, 64, 64  # rb3: C = HW, the (C x C) form
    assert COLLECTION["NST rb3 B=128 C=64 8x8"].flops == 5 * 2 * b * c * hw * min(c, hw)


def test_rkd_angle_work_is_vector_work_of_order_n_cubed():
    case = TINY["RKD N=16 D=32"]
    assert case.vector_ops == cases.rkd_angle_ops(16) == 8 * 16 ** 3
    assert case.flops == 3 * 2 * 16 * 16 * 32
    assert cases.work("RKD", (1.0, 0.0), (16, 32))["vector_ops"] == 0  # no angle term


# --- time ----------------------------------------------------------------------------

def test_floor_time_is_the_slowest_unit_at_float32_accurate_rates():
    vid = COLLECTION["VID rb1 B=128 C=16 32x32"]
    floor = roofline.floor(vid, F32, INFO, time_s=1e-3)
    assert floor["bytes"] == measure.floor_bytes(vid, F32)
    assert floor["memory_s"] == pytest.approx(floor["bytes"] / INFO["bandwidth_Bps"])
    # cuDNN's float32 convolutions run in TF32 unless torch is told otherwise.
    assert floor["tensor_s"] == pytest.approx(vid.conv_flops / INFO["peak_tf32_flops"])
    assert floor["time_s"] == max(floor["memory_s"], floor["tensor_s"], floor["vector_s"])
    assert floor["fraction"] == pytest.approx(floor["time_s"] / 1e-3)
    ieee = roofline.floor(vid, F32, dict(INFO, conv_tf32=False))
    assert ieee["tensor_s"] == pytest.approx(vid.conv_flops / INFO["peak_flops"])
    assert ieee["fraction"] is None
    # Gram products at float32 accuracy: tf32x3, a third of the TF32 rate ...
    nst = COLLECTION["NST rb3 B=128 C=64 8x8"]
    assert roofline.floor(nst, F32, INFO)["tensor_s"] == pytest.approx(nst.flops / (INFO["peak_tf32_flops"] / 3))
    # ... or IEEE float32 where that is faster (a GPU with slow TF32 tensor cores).
    slow = dict(INFO, peak_tf32_flops=90e12)
    assert roofline.floor(nst, F32, slow)["tensor_s"] == pytest.approx(nst.flops / INFO["peak_flops"])
    # bfloat16: the native tensor-core rate, and half the bytes.
    assert roofline.floor(nst, torch.bfloat16, INFO)["tensor_s"] == pytest.approx(nst.flops / INFO["peak_bf16_flops"])
    # RKD's angle term: instructions at the FMA rate (an FMA is 2 flops, 1 instruction).
    rkd = dataclasses.replace(TINY["RKD N=16 D=32"], vector_ops=10 ** 12)
    floor = roofline.floor(rkd, F32, INFO)
    assert floor["vector_s"] == pytest.approx(1e12 / (INFO["fma_flops"] / 2))
    assert floor["bound"] == "vector" and floor["time_s"] == floor["vector_s"]
    logits = COLLECTION["SoftTarget out 128x100"]
    assert roofline.floor(logits, F32, INFO)["bound"] == "memory"


def test_the_h200_over_100_percent_floors_were_the_ieee_rate_on_tf32_convolutions():
    """benchmarks/results/gpu-NVIDIA-H200-20261127: VID at B=256 C=2048 7x7 took 5.38 ms
    where its convolutions alone, at the IEEE float32 rate measured there (51.0 TFLOP/s),
    need 18.6 ms: cuDNN ran them in TF32. The floor now takes the TF32 rate for them, so it
    reads under that time for any TF32 rate above the 176 TFLOP/s the run itself proves."""
    (vid,) = [c for c in cases.cases("full", "cuda", ["VID"]) if c.shape == "B=256 C=2048 7x7"]
    measured_s, ieee = 5.381631851196289e-3, 51047610101068.17
    assert vid.conv_flops / ieee > 3 * measured_s
    proven = vid.conv_flops / measured_s  # the least TF32 rate that run can have had
    assert proven > 170e12
    h200 = dict(INFO, bandwidth_Bps=4192993663394.591, peak_flops=ieee, peak_tf32_flops=proven)
    assert roofline.floor(vid, F32, h200, measured_s)["fraction"] <= 1.0


# --- the traffic report --------------------------------------------------------------

def test_tensor_bytes_count_what_a_view_spans_once():
    x = torch.zeros(4, 6)
    assert traffic.tensor_bytes(x) == 24 * 4
    assert traffic.tensor_bytes(x[:, ::2]) == 12 * 4  # every other column: its own elements
    assert traffic.tensor_bytes(torch.zeros(6).expand(4, 6)) == 6 * 4  # a repeated row once
    assert traffic.tensor_bytes(torch.zeros(0, 3)) == 0


def test_torch_operators_count_inputs_read_and_outputs_written():
    a, b = torch.ones(100), torch.ones(100)
    with traffic.OpTraffic() as ops:
        c = a + b
        c.copy_(a)  # c is overwritten, not read
        a.view(10, 10)  # a view launches nothing
    assert ops.ops == [("add", 800, 400), ("copy_", 400, 400)]


@needs_interpreter
def test_interpreted_launch_counts_the_distinct_bytes_loaded_and_stored():
    from fastkd.bench import fma
    x = torch.rand(2048)
    out = torch.empty_like(x)
    counter = traffic.KernelTraffic()
    with counter.counting():
        flops = fma.launch(x, out, iters=3)
    assert flops == 16 * 3 * 2048
    assert [(k["kernel"], k["read"], k["written"]) for k in counter.launches] == [("_fma_kernel", 8192, 8192)] * 1
    # The FMA chains as numpy computes them (the floor's FMA-rate kernel runs what it counts).
    xs = x.double().numpy()
    b, c = xs * 0.001 + 0.5, xs * 0.25
    chains = [xs, xs + 1, xs - 1, xs * 2]
    for _ in range(2 * 3):
        chains = [a * b + c for a in chains]
    np.testing.assert_allclose(out.numpy(), sum(chains), rtol=1e-5)


@needs_interpreter
def test_traffic_report_puts_every_memory_bound_loss_at_or_above_its_floor():
    results = traffic.run(traffic.traffic_cases("tiny"))
    assert {r["loss"] for r in results} == set(traffic.LOSSES)
    for r in results:
        assert r["kernels"], r["loss"]  # the Triton path ran
        assert r["moved"] == r["triton_bytes"] + r["torch_bytes"]
        assert r["ratio"] >= 1.0, (r["loss"], r["shape"], r["ratio"])
        assert r["reference_ratio"] >= 1.0, (r["loss"], r["shape"])
    text = traffic.table(results, kernels=True)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "_softmax_kl_forward_kernel" in text


@needs_interpreter
def test_traffic_of_ab_is_two_passes_over_its_maps():
    """AB's Triton path: a loss kernel that reads s and t, then a gradient kernel that reads
    them again and writes ds; 5/3 of the floor's single pass, counted exactly."""
    (result,) = traffic.run([TINY["AB B=4 C=8 8x8"]])
    map_bytes = 4 * 8 * 8 * 8 * 4
    loss, grad = result["kernels"]
    assert loss["read"] == 2 * map_bytes
    assert grad["read"] >= 2 * map_bytes and grad["written"] == map_bytes
    assert result["floor_bytes"] == 3 * map_bytes
    assert result["ratio"] == pytest.approx(5 / 3, rel=0.01)


def test_full_sweep_cut_keeps_each_maps_size_every_vocabulary_and_the_kernels():
    picked = traffic.traffic_cases("full", batch=4, losses=["AT", "SoftTarget"])
    shapes = {c.shape for c in picked}
    assert "B=4 C=2048 7x7" in shapes and "4x128000" in shapes
    assert all(c.params.get("batch_cut_from", 4) >= 4 for c in picked)
    # 8192 x 10 logits run a forward and a backward kernel; 4 x 10 would be one fused kernel,
    # so the cut stops where the path is still the GPU sweep's.
    (full,) = [c for c in cases.cases("full", "cuda", ["SoftTarget"]) if c.shape == "8192x10"]
    (cut,) = [c for c in picked if c.params.get("batch_cut_from") == 8192 and c.shape.endswith("x10")]
    assert traffic.launched_kernels(cut) == traffic.launched_kernels(full) == [
        "_softmax_kl_forward_kernel", "_softmax_kl_backward_kernel"]
    assert cut.shape == "4096x10"
    at = [c for c in picked if c.shape == "B=4 C=256 56x56"][0]
    s, t = at.inputs(torch.device("meta"), F32, None)
    assert tuple(s.shape) == (4, 256, 56, 56) and s.requires_grad and not t.requires_grad


def test_a_cuda_runs_floor_reaches_the_wide_table_the_header_and_the_csv():
    """A run's records as cli.run leaves them on CUDA (its floors from roofline.floor), drawn
    by report: the wide table's floor, share and bound, the measured rates in the header, every
    figure of the floor in the CSV; the default table stays within 120 columns."""
    from fastkd.bench import report
    big_vid = [c for c in cases.cases("full", "cuda", ["VID"]) if c.shape == "B=256 C=2048 7x7"]
    picked = big_vid + [COLLECTION["SoftTarget out 128x100"]]
    results = []
    for case in picked:
        variants = {v: dict(measure.new_result(), time_s=t, peak_bytes=2 ** 21) for v, t in
                    (("eager", 2e-3), ("fastkd", 1e-3))}
        rec = {"loss": case.loss, "shape": case.shape, "x": case.x, "x_name": case.x_name, "size": case.size,
               "monotone": case.monotone, "params": case.params, "fastkd_path": {"op": "triton"},
               "variants": variants, "dtype": "float32", "floor": roofline.floor(case, F32, INFO, 1e-3)}
        results.append(report.add_ratios(rec, 0))
    run = {"fastkd": "0", "torch": torch.__version__, "triton": None, "git_commit": None, "python": "3",
           "device": dict(INFO, type="cuda", description="a GPU"), "results": results, "beyond": {},
           "settings": {"variants": ["eager", "fastkd"], "sweep": "collection", "dtype": "float32", "threads": 1,
                        "max_memory": None}}
    wide = report.table(run, wide=True)
    vid = next(line for line in wide.splitlines() if line.startswith("VID"))
    floor = results[0]["floor"]  # its convolutions at TF32 outweigh its bytes
    assert floor["bound"] == "tensor" and floor["time_s"] == floor["tensor_s"] > floor["memory_s"]
    assert vid.split()[-3:] == [f"{floor['time_s'] * 1e3:.2f}", f"{100 * floor['time_s'] / 1e-3:.0f}%", "tensor"]
    assert next(line for line in wide.splitlines() if line.startswith("SoftTarget")).endswith("memory")
    assert "tf32x3" in wide and "(TF32 390, bf16 700, FMA 60)" in report.header(run)
    assert max(len(line) for line in report.table(run).splitlines()) <= 120
    row = next(report.csv_rows(run))
    assert {f"floor_{k}" for k in report.FLOOR_FIELDS} <= set(row)
    assert row["floor_conv_flops"] == picked[0].conv_flops and row["floor_bound"] == "tensor"
