"""The benchmark's own code (fastkd.bench) on tiny shapes: cases, measuring, reporting."""
import csv
import io
import json
import math
import statistics
import sys
import time
import types

import pytest
import torch

import fastkd
from fastkd import registry
from fastkd.bench import cases, cli, launch, measure, precompile, report

CPU = torch.device("cpu")
FAST = {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.0, "max_call_s": 60.0}
linux_only = pytest.mark.skipif(not measure.cpu_memory_supported(), reason="CPU peak-memory measurement: it "
                                "reads Linux's /proc, which this platform lacks")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the figures here are not read, and on a busy machine a second
    OpenMP thread only waits. The suite's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(**kw):
    # On the CPU also on a machine with a GPU: these tests are of the benchmark's machinery.
    args = cli.parser().parse_args(["--sweep", "tiny", "--device", "cpu", "--variants", "eager,fastkd",
                                    "--max-reps", "3", "--min-reps", "2", "--budget", "0.001", "--threads", "1"])
    return dict(cli.settings_from(args), **kw)


def _raising(err):
    """A variant whose step raises err (after the reference's forward, as a real failure would)."""
    def build(case, device, dtype):
        module = case.build("reference", device, dtype)

        def step(*inputs):
            module(*inputs)
            raise err
        return step, module
    return build


def _allocating(nbytes):
    """A variant whose forward also builds a temporary of nbytes that backward goes through."""
    def build(case, device, dtype):
        module = case.build("reference", device, dtype)

        def step(*inputs):
            loss = module(*inputs)
            big = torch.ones(nbytes // 4, device=device) * loss
            return big.sum() / big.numel()
        return step, module
    return build


def test_sweeps_cover_every_loss_once_per_shape():
    for sweep in cases.SWEEPS:
        for device_type in ("cpu", "cuda"):
            got = cases.cases(sweep, device_type)
            assert {c.loss for c in got} == set(registry.LOSSES), (sweep, device_type)
            every = cases.cases(sweep, device_type, cases.LOSSES)
            assert {c.loss for c in every} == set(cases.LOSSES) == (set(registry.LOSSES) | {"FusedLinearSoftTarget"}
                                                                    | set(registry.LM_HEAD))
            names = [c.name for c in every]
            assert len(names) == len(set(names))
    assert len(registry.LOSSES) == 21 and "Baseline" not in cases.LOSSES


def test_full_sweeps_have_the_issue_shapes():
    every = cases.cases("full", "cuda")
    gpu = [c for c in every if "call" not in c.params]  # the sweeps beyond the collection's calls
    assert [c.x for c in gpu if c.loss == "RKD"] == [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert {c.params["D"] for c in gpu if c.loss in ("RKD", "SP", "PKTCosSim", "CC", "IRG")} == {512}
    assert {c.x for c in gpu if c.loss == "SoftTarget"} == {10, 100, 1000, 32000, 128000}
    assert {c.params["rows"] for c in gpu if c.loss == "DML"} == {8192}
    crd = [c for c in gpu if c.loss == "CRD"]
    assert {(c.params["nce_n"], c.params["feat_dim"]) for c in crd} == {(16384, 128)}
    at = {(c.params["B"], c.params["C"], c.params["H"]) for c in gpu if c.loss == "AT"}
    assert {(128, 16, 32), (128, 64, 8), (256, 64, 56), (256, 2048, 7)} <= at
    assert max(c.x for c in cases.cases("full", "cpu") if c.loss == "RKD") < 8192
    lm = cases.cases("full", "cuda", ["FusedLinearSoftTarget"])
    assert {(c.params["BT"], c.params["H"], c.params["V"]) for c in lm} == {
        (bt, 4096, v) for bt in (1024, 8192) for v in (32000, 128000)}
    assert {c.dtype for c in lm} == {torch.bfloat16}
    divergences = cases.cases("full", "cuda", ["FusedLinearDistillation"])
    assert {(c.args[0], c.params["BT"], c.params["V"]) for c in divergences} == {
        (d, bt, v) for d in fastkd.functional.DIVERGENCES for bt in (1024, 8192) for v in (32000, 128000)}
    gkd = cases.cases("full", "cuda", ["generalized_jsd_loss"])
    assert {(c.params["B"] * c.params["L"], c.params["V"]) for c in gkd} == {
        (bt, v) for bt in (1024, 8192) for v in (32000, 128000)}
    assert {c.dtype for c in divergences + gkd} == {torch.bfloat16}


def test_full_sweeps_start_with_the_collections_calls():
    """Each call of the collection's CIFAR-100 training scripts, at its shapes (batch 128,
    100 classes, the resnet20/110 blocks and features), in both full sweeps."""
    collection = cases.cases("collection", "cpu")
    assert {c.loss for c in collection} == set(registry.LOSSES)
    shapes = {(c.loss, c.params["call"]): tuple(c.params["shape"]) for c in collection}
    assert shapes[("SoftTarget", "out")] == (128, 100) and shapes[("BSS", "attacked out")] == (32, 100)
    assert [shapes[("AT", b)] for b in ("rb1", "rb2", "rb3")] == [(128, 16, 32, 32), (128, 32, 16, 16),
                                                                  (128, 64, 8, 8)]
    assert shapes[("RKD", "feat")] == (128, 64) and shapes[("NST", "rb3")] == (128, 64, 8, 8)
    assert len([c for c in collection if c.loss == "FSP"]) == 3
    for device_type in ("cpu", "cuda"):
        names = [c.name for c in cases.cases("full", device_type)]
        assert {c.name for c in collection} <= set(names)


def test_collection_twins_take_the_cases_path():
    """The host harness measures each collection case on a small twin: the same losses and
    calls, the same backend on CUDA, NST's same form."""
    from fastkd.bench import host
    from fastkd.common import nst_spatial_form
    real, twins = cases.collection_cases(), cases.collection_cases(twin=True)
    assert [(c.loss, c.params["call"]) for c in real] == [(c.loss, c.params["call"]) for c in twins]
    for case, twin in zip(real, twins):
        assert host.cuda_choice(case) == host.cuda_choice(twin), case.name
        assert math.prod(twin.params["shape"]) < math.prod(case.params["shape"]), case.name
    nst = [(c, t) for c, t in zip(real, twins) if c.loss == "NST"]
    for case, twin in nst:
        forms = [nst_spatial_form(s[1], s[1], s[2] * s[3]) for s in (case.params["shape"], twin.params["shape"])]
        assert forms[0] == forms[1]


def test_cases_option_keeps_the_matching_cases_and_rejects_a_bad_pattern():
    settings = _settings(cases="^SP N=16|^Hint")
    names = [c.name for c in cases.cases("tiny", "cpu")]
    kept = [n for n in names if n.startswith("SP N=16") or n.startswith("Hint")]
    assert 1 < len(kept) < len(names)
    seen = []
    cli.run(settings, variants={"fastkd": measure.fastkd_auto}, progress=False,
            on_record=lambda run: seen.append([f"{r['loss']} {r['shape']}" for r in run["results"]]))
    assert seen == [kept[:i + 1] for i in range(len(kept))]
    with pytest.raises(SystemExit, match="--cases"):
        cli.settings_from(cli.parser().parse_args(["--cases", "SP("]))


def test_device_option_is_checked_before_the_run(monkeypatch):
    for bad in ("foo", "meta", "cuda:x"):
        with pytest.raises(SystemExit, match=r"^fastkd.bench: --device takes cpu, cuda or cuda:N"):
            cli.settings_from(cli.parser().parse_args(["--device", bad]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:7"):
        with pytest.raises(SystemExit, match=f"--device {name}: torch sees no CUDA device"):
            cli.settings_from(cli.parser().parse_args(["--device", name]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"--device cuda:7: torch sees 1 CUDA device\(s\)"):
        cli.settings_from(cli.parser().parse_args(["--device", "cuda:7"]))


def test_launch_option_sets_a_kernels_launch_options(monkeypatch, capsys):
    for bad, message in (("maxnreg=128", "KERNEL:KEY=VALUE"), ("_no_such_kernel:maxnreg=128", "no Triton kernel"),
                         ("_gram_kernel:warps=4", "KEY one of"), ("_gram_kernel:maxnreg=many", "an integer")):
        with pytest.raises(SystemExit, match=f"^fastkd.bench: .*{message}"):
            cli.settings_from(cli.parser().parse_args(["--launch", bad]))
    args = ["--launch", "_gram_kernel:maxnreg=128,num_warps=2", "--launch", "_gram_grad_kernel:num_stages=1"]
    settings = cli.settings_from(cli.parser().parse_args(args))
    assert settings["launch"] == {"_gram_kernel": {"maxnreg": 128, "num_warps": 2},
                                  "_gram_grad_kernel": {"num_stages": 1}}
    # Applied, a launch passes the options in place of the launcher's; the launch itself is
    # recorded instead of run.
    k = launch.kernel("_gram_kernel")
    seen = []
    monkeypatch.setattr(type(k), "run", lambda self, *a, **kw: seen.append(kw))
    try:
        launch.apply([("_gram_kernel", {"maxnreg": 128, "num_warps": 2})])
        k[(1,)](1, 2, num_warps=8, BLOCK=4)
    finally:
        vars(k).pop("run", None)  # the class's run again, for every later test
    assert seen == [{"grid": (1,), "warmup": False, "num_warps": 2, "BLOCK": 4, "maxnreg": 128}]
    print(report.header({"fastkd": "0", "torch": "0", "triton": "0", "git_commit": None,
                         "device": {"description": "cpu"}, "settings": {**settings, "max_memory": None}}))
    assert "launch options set: _gram_kernel maxnreg=128, num_warps=2; _gram_grad_kernel num_stages=1" in \
        capsys.readouterr().out


def test_usage_line_names_the_command_as_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fastkd-bench"])
    assert cli.parser().format_usage().startswith("usage: fastkd-bench [-h]")
    monkeypatch.setattr(sys, "argv", ["/src/fastkd/bench/__main__.py"])
    assert cli.parser().format_usage().startswith("usage: python -m fastkd.bench [-h]")


def test_a_run_stopped_part_way_leaves_the_cases_it_measured(tmp_path, monkeypatch):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    real, calls = measure.run_case, []

    def stop_at_the_second_case(case, *args, **kwargs):  # a time limit's signal, say
        calls.append(case.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, *args, **kwargs)
    monkeypatch.setattr(measure, "run_case", stop_at_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--sweep", "tiny", "--device", "cpu", "--losses", "SP", "--variants", "fastkd", "--min-reps", "1", "--max-reps", "1",
                  "--budget", "0.001", "--threads", "1", "--no-progress", "--json", str(json_path),
                  "--csv", str(csv_path)])
    run = json.loads(json_path.read_text())
    assert [f"{r['loss']} {r['shape']}" for r in run["results"]] == calls[:1]
    assert run["results"][0]["variants"]["fastkd"]["status"] == "ok"
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_losses_option_takes_aliases_and_rejects_unknown_names():
    picked = cases.cases("tiny", "cpu", ["rkd", "PKT", "FitNet"])
    assert {c.loss for c in picked} == {"RKD", "PKTCosSim", "Hint"}
    with pytest.raises(ValueError, match="unknown loss"):
        cases.cases("tiny", "cpu", ["NoSuchLoss"])


def test_every_tiny_case_runs_with_the_same_state_dict_in_both_modules():
    for case in cases.cases("tiny", "cpu"):
        ref, fast = case.build("reference", CPU, torch.float32), case.build("fastkd", CPU, torch.float32)
        assert isinstance(fast, getattr(fastkd, case.loss))
        for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), fast.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), case.name
        runner = measure.Runner(case, CPU, torch.float32)
        torch.manual_seed(0)
        loss = ref(*runner.inputs())
        assert loss.dim() == 0 and torch.isfinite(loss), case.name
        loss.backward()


def test_run_case_measures_each_variant():
    case = cases.cases("tiny", "cpu", ["SP"])[0]
    torch._dynamo.reset()
    results = measure.run_case(case, CPU, variants={"eager": measure.eager, "fastkd": measure.fastkd_auto,
                                                    "fastkd-compile": measure.fastkd_compiled}, **FAST)
    assert set(results) == {"eager", "fastkd", "fastkd-compile"}
    for res in results.values():
        assert res["status"] == measure.OK and res["error"] is None and not res["skipped"]
        assert res["reps"] == len(res["times_s"]) >= 2
        assert res["time_s"] == statistics.median(res["times_s"]) > 0
        assert res["warmup_s"] > 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_balanced_order_lets_each_variant_follow_each_other_once(n):
    names = [f"v{i}" for i in range(n)]
    order = measure.balanced_order(names)
    assert sorted(set(order)) == names and all(order.count(v) == max(n - 1, 1) for v in names)
    pairs = [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))] if n > 1 else []
    assert sorted(pairs) == sorted((a, b) for a in names for b in names if a != b)


def test_timing_follows_the_balanced_order_to_the_repetitions_asked():
    """Each variant timed max_reps times, in balanced_order: with three, each follows each
    other as often (a plain rotation has one follow a given other twice as often)."""
    calls = []

    class Runner:
        def time_call(self, name, _):
            calls.append(name)
            return 1e-3
    names = ["eager", "compile", "fastkd"]
    results = {n: dict(measure.new_result(), warmup_s=1e-3) for n in names}
    measure._time_round_robin(results, {n: (n, None) for n in names}, Runner(), 4, 4, 0.0)
    assert all(results[n]["reps"] == 4 == calls.count(n) for n in names)
    cycle = measure.balanced_order(names)
    assert calls == (cycle * 2)[:len(calls)]
    follows = list(zip(calls, calls[1:] + calls[:1]))  # whole cycles: the last wraps to the first
    assert follows.count(("compile", "fastkd")) == follows.count(("compile", "eager")) == 2


@linux_only
def test_cpu_peak_memory_sees_a_known_temporary():
    case = cases.cases("tiny", "cpu", ["Hint"])[0]
    results = measure.run_case(case, CPU, variants={"eager": measure.eager, "big": _allocating(64 * 2 ** 20)},
                               **FAST)
    assert results["eager"]["peak_bytes"] < 8 * 2 ** 20
    assert 60 * 2 ** 20 <= results["big"]["peak_bytes"] < 300 * 2 ** 20


@pytest.mark.parametrize("err", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 34359738368 bytes.")])
def test_out_of_memory_variant_is_reported_and_not_run_at_larger_sizes(err):
    settings = _settings(losses=["RKD"])
    run = cli.run(settings, variants={"eager": _raising(err), "fastkd": measure.fastkd_auto}, progress=False)
    small, large = run["results"]
    assert small["variants"]["eager"]["status"] == measure.OOM
    assert not small["variants"]["eager"]["skipped"]
    assert large["variants"]["eager"]["status"] == measure.OOM and large["variants"]["eager"]["skipped"]
    assert small["variants"]["fastkd"]["status"] == large["variants"]["fastkd"]["status"] == measure.OK
    assert small["speedup"]["eager"] is None
    shapes = [small["shape"], large["shape"]]
    assert run["beyond"]["RKD"]["eager"] == {"oom": shapes, "first_oom": small["shape"], "fastkd_ran": shapes,
                                             "largest": large["shape"]}
    text = report.table(run)
    assert "OOM" in text and "OOM*" in text
    assert (f"RKD: eager ran out of memory at 2 shape(s) from {small['shape']}; fastkd ran 2 of them, "
            f"up to {large['shape']}.") in text


def test_lm_head_cases_compute_the_references_loss_and_each_divergence_runs_apart(monkeypatch):
    """FusedLinearDistillation's cases (one per divergence) and generalized_jsd_loss's: fastkd's
    module gives the reference's loss; a variant out of memory under one divergence is still
    run at larger sizes under the others (their references differ)."""
    picked = cases.cases("tiny", "cpu", ["FusedLinearDistillation", "generalized_jsd_loss"])
    assert [c.params.get("divergence") for c in picked] == [*fastkd.functional.DIVERGENCES, None]
    for case in picked:
        inputs = measure.Runner(case, CPU, torch.float32).inputs()
        ref, fast = (case.build(impl, CPU, torch.float32)(*inputs) for impl in ("reference", "fastkd"))
        torch.testing.assert_close(fast, ref, msg=case.name)
    monkeypatch.setitem(cases._LM_HEAD, "tiny", [(8, 16, 50), (16, 16, 50)])
    jsd_oom = _raising(MemoryError())

    def eager(case, device, dtype):
        return (jsd_oom if case.args == ("jsd",) else measure.eager)(case, device, dtype)
    run = cli.run(_settings(losses=["FusedLinearDistillation"]), variants={"eager": eager}, progress=False)
    status = {(r["params"]["divergence"], r["params"]["BT"]): r["variants"]["eager"] for r in run["results"]}
    assert status[("jsd", 8)]["status"] == status[("jsd", 16)]["status"] == measure.OOM
    assert status[("jsd", 16)]["skipped"] and not status[("jsd", 8)]["skipped"]
    assert all(res["status"] == measure.OK for (name, _), res in status.items() if name != "jsd")


def test_liger_variant_takes_the_divergences_its_fused_jsd_holds():
    lm = {c.params.get("divergence", c.loss): c for c in cases.cases("tiny", "cpu", cases.LOSSES)
          if c.loss in ("FusedLinearSoftTarget", "FusedLinearDistillation")}
    assert {name: measure._liger_beta(c) for name, c in lm.items()} == {
        "FusedLinearSoftTarget": 0.0, "kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5, "skew_kl": None,
        "skew_reverse_kl": None, "tvd": None}
    with pytest.raises(ValueError, match="no fused op for FusedLinearDistillation tvd"):
        measure.liger(lm["tvd"], CPU, torch.float32)


@linux_only
def test_memory_cap_turns_a_big_allocation_into_out_of_memory():
    case = cases.cases("tiny", "cpu", ["Hint"])[0]
    results = measure.run_case(case, CPU, variants={"eager": measure.eager, "big": _allocating(2 ** 31)},
                               max_memory=256 * 2 ** 20, **FAST)
    assert results["big"]["status"] == measure.OOM
    assert "allocate" in results["big"]["error"]
    assert results["eager"]["status"] == measure.OK


def test_compile_errors_and_slow_variants_are_reported():
    case = cases.cases("tiny", "cpu", ["SP"])[0]
    results = measure.run_case(case, CPU, variants={"compile": _raising(RuntimeError("inductor: no C++ compiler")),
                                                    "eager": measure.eager},
                               **dict(FAST, max_call_s=0.0))
    assert results["compile"]["status"] == measure.COMPILE_FAILED
    assert "no C++ compiler" in results["compile"]["error"]
    assert results["eager"]["status"] == measure.TOO_SLOW and results["eager"]["time_s"] is None


def _slow_calls(slow, seconds):
    """A variant whose first `slow` calls take `seconds` (a compile, then a second graph)."""
    def build(case, device, dtype):
        module = case.build("reference", device, dtype)
        calls = []

        def step(*inputs):
            calls.append(None)
            if len(calls) <= slow:
                time.sleep(seconds)
            return module(*inputs)
        return step, module
    return build


def test_the_compiled_variants_get_two_unjudged_warm_up_calls():
    """A compiled module may compile again on its second call (CRD, once its normalisers
    are fixed): neither compiled variant is judged too slow for its first two calls; any
    other variant is, from its second."""
    case = cases.cases("tiny", "cpu", ["SP"])[0]
    slow = _slow_calls(2, 0.05)
    results = measure.run_case(case, CPU, variants={"compile": slow, "fastkd-compile": slow, "fastkd": slow},
                               **dict(FAST, max_call_s=0.04))
    assert results["compile"]["status"] == results["fastkd-compile"]["status"] == measure.OK
    assert results["fastkd"]["status"] == measure.TOO_SLOW


def test_main_prints_each_row_as_its_case_ends(monkeypatch, capsys):
    """The header comes before the first case runs and each row right after its case, so
    a run written to a file shows its progress; --wide adds each variant's MiB."""
    seen = []
    real = measure.run_case

    def run_case(case, *args, **kwargs):
        seen.append(capsys.readouterr().out)  # what was printed before this case ran
        return real(case, *args, **kwargs)
    monkeypatch.setattr(measure, "run_case", run_case)
    assert cli.main(["--sweep", "tiny", "--device", "cpu", "--losses", "SP", "--variants", "eager,fastkd",
                     "--min-reps", "1", "--max-reps", "1", "--budget", "0", "--threads", "1", "--wide"]) == 0
    first, second = seen
    assert "loss" in first and "eager MiB" in first and "fastkd MiB" in first and "SP " not in first
    assert [line.split()[:3] for line in second.splitlines()] == [["SP", "N=8", "D=32"]]
    assert "SP " in capsys.readouterr().out  # the second row, then the legend


def test_main_prints_the_table_and_writes_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "out" / "bench.json", tmp_path / "bench.csv"
    code = cli.main(["--sweep", "tiny", "--device", "cpu", "--losses", "SP,Hint,CRD", "--variants", "eager,fastkd", "--min-reps", "2",
                     "--max-reps", "2", "--budget", "0.001", "--threads", "1", "--no-progress",
                     "--json", str(json_path), "--csv", str(csv_path), "--machine", "test machine"])
    assert code == 0
    out = capsys.readouterr().out
    assert "eager ms" in out and "x eager" in out and "mem x eager" in out and "test machine" in out
    assert "fastkd MiB" not in out  # the wide table's
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote ")) <= 120
    rows = [line.split() for line in out.splitlines()]
    for loss, shape in (("SP", "N=8 D=32"), ("Hint", "B=4 C=8 8x8"), ("CRD", "B=4 n=64 d=16")):
        assert any(r[:1 + len(shape.split())] == [loss, *shape.split()] for r in rows), (loss, shape)

    run = json.loads(json_path.read_text())
    for key in ("fastkd", "torch", "triton", "python", "git_commit", "date", "device", "settings", "results",
                "run_seconds", "beyond"):
        assert key in run
    assert run["torch"] == torch.__version__
    assert run["device"]["description"] == "test machine" and run["device"]["type"] == "cpu"
    assert len(run["results"]) == 6
    for rec in run["results"]:
        assert set(rec) >= {"loss", "shape", "x", "x_name", "params", "fastkd_path", "variants", "speedup",
                            "memory_ratio", "floor"}
        assert set(rec["variants"]) == {"eager", "fastkd"}
        for res in rec["variants"].values():
            assert set(res) == {"status", "time_s", "times_s", "reps", "peak_bytes", "warmup_s", "error", "skipped"}
            assert res["status"] == "ok" and res["time_s"] > 0
        assert rec["speedup"]["eager"] == pytest.approx(rec["variants"]["eager"]["time_s"]
                                                        / rec["variants"]["fastkd"]["time_s"])
        assert "memory_ratio" in rec and "eager" in rec["memory_ratio"]

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for col in ("eager_time_s", "fastkd_time_s", "eager_peak_bytes", "fastkd_peak_bytes", "speedup_vs_eager",
                "memory_ratio_vs_eager", "device", "torch", "triton", "git_commit"):
        assert col in rows[0]
    assert float(rows[0]["eager_time_s"]) == pytest.approx(run["results"][0]["variants"]["eager"]["time_s"])


def _small_run():
    return cli.run(_settings(losses=["SP", "AT"]), progress=False)


def test_plots_need_matplotlib(tmp_path, monkeypatch):
    run = _small_run()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.MissingMatplotlib, match="pip install matplotlib"):
        report.write_plots(run, tmp_path)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark's plots: matplotlib is not installed")
    run = _small_run()
    # The larger SP case: eager out of memory, fastkd too slow (marked at the top of the axes).
    run["results"][1]["variants"]["eager"].update(status=measure.OOM, time_s=None, peak_bytes=None)
    run["results"][1]["variants"]["fastkd"].update(status=measure.TOO_SLOW, time_s=None, peak_bytes=None)
    files = report.write_plots(run, tmp_path)
    assert sorted(p.split("/")[-1] for p in files) == ["AT.png", "SP.png"]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in ("AT.png", "SP.png"))


def test_plot_subtitle_gives_dtype_threads_and_the_fixed_dimensions():
    run = _small_run()
    by_loss = {loss: [r for r in run["results"] if r["loss"] == loss] for loss in ("SP", "AT")}
    assert report.plot_subtitle(run, by_loss["SP"]) == "dtype float32; 1 CPU thread; fixed: D=32"
    assert report.plot_subtitle(run, by_loss["AT"]).startswith("dtype float32; 1 CPU thread; fixed: B=4")
    cuda_run = dict(run, device=dict(run["device"], type="cuda"))
    assert report.plot_subtitle(cuda_run, by_loss["SP"]) == "dtype float32; fixed: D=32"


def test_legend_explains_every_status_of_the_table():
    legend = " ".join(report.notes({"device": {"type": "cpu"}, "results": []}))
    for mark in ("OOM:", "too slow:", "OOM*/too slow*:", "no compile:", "failed:"):
        assert mark in legend


def test_progress_bar_is_drawn_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        bar = report.Progress(2, stream=stream)
        bar.show("SP N=8: eager")
        bar.advance("SP N=8")
        bar.advance("SP N=16")
        bar.close()
        text = stream.getvalue()
        if drawn:
            assert text.endswith("\n") and text.splitlines()[-1].rstrip().endswith("SP N=16")
            assert "[" + "#" * 24 + "] 2/2" in text.split("\r")[-1]
        else:
            assert text == ""  # off a terminal the table's rows are the progress


def test_parse_memory():
    assert cli.parse_memory("8G") == 8 * 2 ** 30
    assert cli.parse_memory("512MiB") == 512 * 2 ** 20
    assert cli.parse_memory("1000") == 1000
    assert cli.parse_memory("25%", total=400) == 100
    with pytest.raises(ValueError):
        cli.parse_memory("lots")


def test_ratios_ignore_missing_and_noise_level_figures():
    rec = {"variants": {"eager": dict(measure.new_result(), time_s=2.0, peak_bytes=4 * 2 ** 20),
                        "compile": dict(measure.new_result(), status=measure.COMPILE_FAILED),
                        "fastkd": dict(measure.new_result(), time_s=0.5, peak_bytes=1000)}}
    report.add_ratios(rec, min_memory_bytes=2 ** 20)
    assert rec["speedup"] == {"eager": 4.0, "compile": None}
    assert rec["memory_ratio"] == {"eager": None, "compile": None}


def test_fastkd_path_follows_the_dispatcher(monkeypatch):
    from fastkd import backend
    assert cli.fastkd_path("RKD", CPU) == {op: backend.resolve(op, CPU, "auto") for op in ("rkd", "rkd_distance", "rkd_angle")}
    calls = []

    def fast_sp(fm_s, fm_t):
        calls.append(fm_s.shape)
        return fastkd.reference.sp.sp(fm_s, fm_t)
    monkeypatch.setitem(backend.IMPLEMENTATIONS["sp"], "torch", fast_sp)
    run = cli.run(_settings(losses=["SP"]), progress=False)
    assert [rec["fastkd_path"] for rec in run["results"]] == [{"sp": "torch"}] * 2
    assert calls and all(rec["variants"]["fastkd"]["status"] == measure.OK for rec in run["results"])
    rows = [line.split() for line in report.table(run).splitlines() if line.startswith("SP ")]
    assert len(rows) == 2 and all(row[3] == "torch" for row in rows)


# --- compiling ahead in a second process (fastkd.bench.precompile) --------------------

def test_precompile_runs_the_cases_after_the_benchmarks_from_the_last(monkeypatch):
    calls = []

    def recording(case, device, dtype):
        module = case.build("reference", device, dtype)
        return (lambda *xs: (calls.append(case.name), module(*xs))[1]), module
    monkeypatch.setitem(measure.VARIANTS, "compile", recording)
    settings = _settings(losses=["Logits", "SP"], variants=["eager", "compile"])
    names = [c.name for c in cli.sweep_cases(settings, CPU)]
    assert len(names) >= 4
    ran = precompile.compile_backwards(settings, ["compile"], types.SimpleNamespace(value=1))
    assert ran == names[:1:-1]  # the last down to the one after the benchmark's position
    assert calls == [name for name in ran for _ in range(2)]  # two calls each, the warm-up's
    assert precompile.compile_backwards(settings, ["compile"], types.SimpleNamespace(value=len(names) - 1)) == []


def test_precompile_only_with_compiled_variants_on_a_spare_cpu_core():
    settings = _settings()
    assert not precompile.Precompiler(settings, []).active
    assert not precompile.Precompiler(dict(settings, device="cuda"), ["compile"]).active
    busy = dict(settings, threads=precompile.spare_cores(0))
    assert not precompile.Precompiler(busy, ["compile"]).active


def test_precompile_process_fills_inductors_cache(tmp_path, monkeypatch):
    if precompile.spare_cores(1) < 1:
        pytest.skip("a one-core machine has no core to compile ahead on")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the second process inherits it
    settings = _settings(losses=["Logits"], cases="8x10$", variants=["eager", "compile"])
    ahead = precompile.Precompiler(settings, ["compile"])
    assert ahead.active
    try:
        deadline = time.monotonic() + 60
        while ahead._group() is None and ahead._proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # until it has made its process group
        if ahead._group() is not None and sys.platform.startswith("linux"):
            with ahead.paused():
                time.sleep(0.2)
                assert _process_state(ahead._proc.pid) == "T"  # stopped while the benchmark times
            assert _process_state(ahead._proc.pid) != "T"
        ahead._proc.join(timeout=300)
        assert ahead._proc.exitcode == 0
    finally:
        ahead.close()
    assert any((tmp_path / "fxgraph").rglob("*")), "no compiled graph was cached"


def _process_state(pid):
    """The state letter of /proc/<pid>/stat (R running, S sleeping, T stopped, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
