"""FusedLinearSoftTarget on a CUDA GPU, taken apart (bfloat16, dense teacher, T=2,
hard_weight=0.5, every token kept):

    python benchmarks/lm_head_profile.py [--json PATH] [--quick]

For each (BT, H, V) it times forward + backward (median of CUDA-event timings,
triton.testing.do_bench) and the peak memory above the inputs of:

  gemm     the four head products alone, each once over all BT tokens: the student's and
           the teacher's logits h W^T, then dz W and dz^T h. Every version does at least
           these (4 x 2 BT V H flops): this is the floor the others are read against.
  rows     fastkd's Triton rows kernel alone (fastkd/kernels/fused_linear.py) over all BT
           rows of both models' logits, the pass that replaces the softmax, KL, CE and
           their gradients.
  eager    the materialised reference, fastkd/reference/fused_linear_soft_target.py.
  fastkd   fastkd.functional.fused_linear_soft_target at its default chunk, and at other
           chunk sizes (rows per chunk) where asked, on the triton and torch backends.

and the error of fastkd's and the bfloat16 reference's loss and gradients against the
float64 reference at one shape. Prints one table; --json keeps every number.
"""
import argparse
import json
import sys

import torch
import triton
from triton.testing import do_bench

import fastkd
from fastkd.chunked_linear import default_chunk
from fastkd.functional import fused_linear_soft_target
from fastkd.kernels.fused_linear import linear_kl_rows
from fastkd.reference.fused_linear_soft_target import fused_linear_soft_target as reference

T, HARD = 2.0, 0.5
MIB = 2 ** 20
DEVICE = "cuda"  # --smoke: "cpu", tiny shapes, Triton through its interpreter


def inputs(bt, h, v, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, device=DEVICE, generator=g, dtype=torch.float32) * scale).to(dtype)
    hs, ws = randn(bt, h).requires_grad_(), randn(v, h, scale=h ** -0.5).requires_grad_()
    ht, wt = randn(bt, h), randn(v, h, scale=2 * h ** -0.5)  # a sharper teacher
    labels = torch.randint(0, v, (bt,), device=DEVICE, generator=g)
    return hs, ws, ht, wt, labels


def bench(fn, warmup=25, rep=100, grad_to_none=()):
    """Median ms of fn: CUDA events on the GPU (do_bench), a host clock with --smoke."""
    if DEVICE == "cpu":
        import time
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none), return_mode="median")


def timed(fn, grads=(), rep_ms=300):
    """(median ms, peak MiB above what was allocated before): one call measured for memory
    after do_bench's warm-up and timed calls."""
    ms = bench(fn, warmup=50, rep=rep_ms, grad_to_none=list(grads))
    if DEVICE == "cpu":
        return ms, 0.0
    for x in grads:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MIB
    for x in grads:
        x.grad = None
    return ms, peak


def loss_step(fn, hs, ws, ht, wt, labels, **kw):
    def step():
        fn(hs, ws, ht, wt, labels, T=T, hard_weight=HARD, **kw).backward()
    return step


def profile(bt, h, v, chunks, backends=("triton",)):
    hs, ws, ht, wt, labels = inputs(bt, h, v, torch.bfloat16)
    out = {"BT": bt, "H": h, "V": v, "gemm_tflop": 4 * 2 * bt * v * h / 1e12}
    with torch.no_grad():
        z = hs @ ws.t()
        zt = ht @ wt.t()
        gemm = [bench(lambda: torch.mm(hs, ws.t(), out=z)),
                bench(lambda: torch.mm(ht, wt.t(), out=zt)),
                bench(lambda: z @ ws),
                bench(lambda: z.t() @ hs)]
        out["gemm_ms"] = sum(gemm)
        out["gemm_each_ms"] = gemm
        chunk = default_chunk(bt, v, hs.device)
        w = torch.full((bt,), 1.0 / bt, device=DEVICE)
        lab = labels.clone()

        def rows():
            for r0 in range(0, bt, chunk):
                linear_kl_rows(z[r0:r0 + chunk], zt[r0:r0 + chunk], lab[r0:r0 + chunk], w[r0:r0 + chunk],
                               w[r0:r0 + chunk], T, HARD, True)
        out["rows_ms"] = bench(rows)
        # bytes of the rows pass: read z and t twice, write dz once (bfloat16)
        out["rows_gb"] = 5 * 2 * bt * v / 1e9
        del z, zt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    try:
        out["eager_ms"], out["eager_mib"] = timed(loss_step(reference, hs, ws, ht, wt, labels), (hs, ws))
    except torch.OutOfMemoryError:
        out["eager_ms"] = out["eager_mib"] = None
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    for backend in backends:
        with fastkd.use_backend(backend):
            for c in [None, *chunks]:
                key = f"{backend}_{c or 'default'}"
                out[key + "_ms"], out[key + "_mib"] = timed(
                    loss_step(fused_linear_soft_target, hs, ws, ht, wt, labels, chunk_size=c), (hs, ws))
    out["default_chunk"] = default_chunk(bt, v, hs.device)
    return out


def rows_sweep(bt=2048, v=128000):
    """The rows kernel alone over (bt, v) bfloat16 logits at other tiles than its own:
    {"BLOCK_R x BLOCK_V / warps": ms}, and its own tile without the hard term."""
    from fastkd.kernels import fused_linear
    hs, ws, ht, wt, labels = inputs(bt, 64, v, torch.bfloat16, seed=2)
    with torch.no_grad():
        z, t = (hs @ ws.t()).contiguous(), (ht @ wt.t()).contiguous()
    w = torch.full((bt,), 1.0 / bt, device=DEVICE)
    own = fused_linear._blocks(bt, v, torch.float32)
    res = {f"own {own[0]}x{own[1]}/{own[2]} no hard": bench(
        lambda: linear_kl_rows(z, t, None, w, w, T, 0.0, True))}
    configs = [own, (1, 512, 2), (1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (1, 4096, 16), (2, 1024, 8), (4, 512, 8)]
    original = fused_linear._blocks
    try:
        for cfg in configs:
            fused_linear._blocks = lambda R, V, dtype, cfg=cfg: cfg
            res[f"{cfg[0]}x{cfg[1]}/{cfg[2]}"] = bench(lambda: linear_kl_rows(z, t, labels, w, w, T, HARD, True))
    finally:
        fused_linear._blocks = original
    return res


def errors(bt=1024, h=1024, v=32000):
    """Relative 2-norm errors against float64 of loss, dh, dW: fastkd bfloat16 and the
    bfloat16 reference."""
    hs, ws, ht, wt, labels = inputs(bt, h, v, torch.bfloat16, seed=1)
    res = {}

    def grads(fn, dtype):
        a, b = hs.detach().to(dtype).requires_grad_(), ws.detach().to(dtype).requires_grad_()
        loss = fn(a, b, ht.to(dtype), wt.to(dtype), labels, T=T, hard_weight=HARD)
        loss.backward()
        return [loss.detach().double(), a.grad.double(), b.grad.double()]
    exact = grads(reference, torch.float64)
    for name, fn in (("fastkd", fused_linear_soft_target), ("reference_bf16", reference)):
        got = grads(fn, torch.bfloat16)
        res[name] = [float((g - e).norm() / e.norm()) for g, e in zip(got, exact)]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="the two 1,024-token shapes only")
    p.add_argument("--rows-sweep", action="store_true", help="also time the rows kernel at other tiles")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (set TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    global DEVICE
    shapes = [(1024, 4096, 32000), (1024, 4096, 128000)]
    if not args.quick:
        shapes += [(8192, 4096, 32000), (8192, 4096, 128000)]
    if args.smoke:
        DEVICE, shapes, big = "cpu", [(64, 32, 300), (128, 32, 1000)], (64, 16, 500)
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "errors": errors(*(big if args.smoke else ())), "shapes": []}
    print("errors vs float64 (loss, dh, dW):", json.dumps(res["errors"]), flush=True)
    if args.rows_sweep:
        res["rows_sweep"] = rows_sweep(*((128, 1000) if args.smoke else ()))
        print("rows kernel alone, ms by tile:", json.dumps(res["rows_sweep"]), flush=True)
    for bt, h, v in shapes:
        sweep = bt * v >= (128 * 1000 if args.smoke else 8192 * 128000)
        chunks = ((16, 32) if args.smoke else (256, 512, 2048, 4096)) if sweep else ()
        r = profile(bt, h, v, chunks=chunks, backends=("triton", "torch"))
        res["shapes"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    print(f"\n{'shape':24} {'gemm4 ms':>9} {'rows ms':>8} {'eager ms':>9} {'fastkd ms':>10} {'torch ms':>9} "
          f"{'x eager':>8} {'eager MiB':>10} {'fastkd MiB':>11}")
    for r in res["shapes"]:
        e, f = r["eager_ms"], r["triton_default_ms"]
        print(f"BT={r['BT']} H={r['H']} V={r['V']:<7} {r['gemm_ms']:9.2f} {r['rows_ms']:8.2f} "
              f"{e or float('nan'):9.2f} {f:10.2f} {r['torch_default_ms']:9.2f} "
              f"{(e or float('nan')) / f:8.2f} {r['eager_mib'] or float('nan'):10.0f} {r['triton_default_mib']:11.0f}")
        sweep = {k: round(v, 2) for k, v in r.items() if k.endswith("_ms") and k.startswith(("triton_", "torch_")) and "default" not in k}
        if sweep:
            print("   chunk sweep:", sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
