"""The floor: the least time a correct implementation of a case can take on a device.

A loss cannot take less time than any one of
  memory   the bytes it cannot avoid moving (fastkd.bench.measure.floor_bytes: each input
           and parameter read once, each gradient written once, plus CRD's memory rows) over
           the measured copy bandwidth;
  tensor   its matrix products (Case.flops) on tensor cores at the fastest rate that keeps
           the inputs' accuracy: for float32 a float32-accurate split (tf32x3, three TF32
           products per product: a third of the measured TF32 rate, or the IEEE float32 rate
           where that is faster), for bfloat16 / float16 the native rate; plus torch's own
           convolutions (Case.conv_flops: VID, OFD) at the rate cuDNN runs them, TF32 for
           float32 unless torch is told otherwise (torch.backends.cudnn), native otherwise;
  vector   its elementwise work that no matrix unit takes (Case.vector_ops: RKD's angle
           term, CRD's gathered dots) at the measured float32 FMA rate, one instruction an FMA.
The floor is the largest of the three (the units run side by side, so their sum would be
more than a perfect kernel needs). Each rate is measured on the device (device_peaks), so a
floor can only read above a kernel's time where the kernel beats the measured rate.
"""
import contextlib
import statistics

import torch

from . import measure


def _median_seconds(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _matmul_precision(precision):
    """torch's float32 matmul precision ("highest": IEEE, "high": TF32) inside the block,
    through the API that does not mix torch's legacy and new TF32 flags."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def conv_runs_tf32():
    """Whether cuDNN runs float32 convolutions in TF32 (torch's default)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch's legacy and new flags disagree: its default
        return True


def fma_rate(device, reps=10, iters=2048):
    """Measured float32 FMA flop/s (fastkd.bench.fma), or None without Triton."""
    try:
        from . import fma
    except ImportError:
        return None
    block = 1024
    n = torch.cuda.get_device_properties(device).multi_processor_count * 32 * block
    x = torch.rand(n, device=device)
    out = torch.empty_like(x)
    flops = fma.launch(x, out, iters, block)
    return flops / _median_seconds(lambda: fma.launch(x, out, iters, block), reps)


def device_peaks(device, reps=10):
    """The floor's rates, measured on a CUDA device: {bandwidth_Bps (a 1 GiB device copy),
    peak_flops (IEEE float32 matmul, 8192^3), peak_tf32_flops, peak_bf16_flops,
    peak_fp16_flops (the same in TF32, bfloat16, float16), fma_flops (float32 vector FMAs;
    the IEEE matmul rate where Triton is missing), conv_tf32 (cuDNN's float32 convolutions
    in TF32)}."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    out = {"bandwidth_Bps": 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), reps)}
    del src, dst
    n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for key, precision in (("peak_flops", "highest"), ("peak_tf32_flops", "high")):
        with _matmul_precision(precision):
            out[key] = 2 * n ** 3 / _median_seconds(lambda: a @ b, reps)
    for key, dtype in (("peak_bf16_flops", torch.bfloat16), ("peak_fp16_flops", torch.float16)):
        a16, b16 = a.to(dtype), b.to(dtype)
        out[key] = 2 * n ** 3 / _median_seconds(lambda: a16 @ b16, reps)
        del a16, b16
    del a, b
    try:
        out["fma_flops"] = fma_rate(device, reps)
    except Exception:  # noqa: BLE001 - a failed measurement falls back, never stops the run
        out["fma_flops"] = None
    out["fma_flops"] = out["fma_flops"] or out["peak_flops"]
    out["conv_tf32"] = conv_runs_tf32()
    torch.cuda.empty_cache()
    return out


def rates(info, dtype):
    """{products, convs, vector}: flop/s of the floor's units for inputs of dtype, from the
    measured peaks in info (device_peaks)."""
    if dtype == torch.bfloat16:
        native = info["peak_bf16_flops"]
        products = convs = native
    elif dtype == torch.float16:
        native = info["peak_fp16_flops"]
        products = convs = native
    else:
        # tf32x3: a third of the TF32 rate, unless plain IEEE float32 is faster on this GPU.
        products = max(info["peak_tf32_flops"] / 3, info["peak_flops"])
        convs = info["peak_tf32_flops"] if info.get("conv_tf32", True) else info["peak_flops"]
    return {"products": products, "convs": convs, "vector": info.get("fma_flops") or info["peak_flops"]}


def floor(case, dtype, info, time_s=None):
    """{bytes, flops, conv_flops, vector_ops, memory_s, tensor_s, vector_s, time_s, bound,
    fraction}: the case's floor on the device info describes (device_peaks' figures), in
    dtype (the case's own where it has one); fraction = floor / time_s, the measured time."""
    dtype = case.dtype or dtype
    nbytes = measure.floor_bytes(case, dtype)
    r = rates(info, dtype)
    parts = {"memory": nbytes / info["bandwidth_Bps"],
             "tensor": case.flops / r["products"] + case.conv_flops / r["convs"],
             "vector": case.vector_ops / (r["vector"] / 2)}  # an FMA: 2 flops, 1 instruction
    bound = max(parts, key=parts.get)
    seconds = parts[bound]
    return {"bytes": nbytes, "flops": case.flops, "conv_flops": case.conv_flops, "vector_ops": case.vector_ops,
            "memory_s": parts["memory"], "tensor_s": parts["tensor"], "vector_s": parts["vector"],
            "time_s": seconds, "bound": bound, "fraction": seconds / time_s if time_s else None}
