"""The one dispatch point: backend names, precedence, availability, errors."""
import sys

import pytest
import torch

import fastkd
from fastkd import backend
from fastkd.__main__ import METHODS, device_from, main
from fastkd.registry import EXTENSIONS


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert fastkd.current_backend() == "auto"


def test_environment_variable_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert fastkd.current_backend() == "reference"
    monkeypatch.setenv("FASTKD_BACKEND", "Torch")
    assert fastkd.current_backend() == "torch"


def test_context_manager_overrides_environment_and_nests(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    with fastkd.use_backend("reference"):
        assert fastkd.current_backend() == "reference"
        with fastkd.use_backend("auto"):
            assert fastkd.current_backend() == "auto"
        assert fastkd.current_backend() == "reference"
    assert fastkd.current_backend() == "torch"


def test_context_manager_restores_after_an_exception(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    with pytest.raises(KeyError):
        with fastkd.use_backend("reference"):
            raise KeyError
    assert fastkd.current_backend() == "auto"


def test_unknown_backend_names_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastkd.use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTKD_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$FASTKD_BACKEND must be one of .*'fast'"):
        fastkd.functional.hint(torch.zeros(2), torch.zeros(2))


def test_every_op_has_a_reference_and_only_known_backends():
    for op, impls in backend.IMPLEMENTATIONS.items():
        assert "reference" in impls, op
        assert set(impls) <= set(backend.BACKENDS) - {"auto"}, op


def test_method_listing_covers_every_op_once():
    listed = [op for ops in (*METHODS.values(), *EXTENSIONS.values()) for op in ops]
    assert sorted(listed) == sorted(backend.IMPLEMENTATIONS)
    assert len(METHODS) == 21


def test_auto_prefers_triton_on_cuda_then_torch_then_reference(monkeypatch):
    fake = {"op": {"reference": 1, "torch": 2, "triton": 3}}
    monkeypatch.setattr(backend, "IMPLEMENTATIONS", fake)
    assert backend.resolve("op", torch.device("cuda"), "auto") == "triton"
    assert backend.resolve("op", torch.device("cpu"), "auto") == "torch"
    fake["op"] = {"reference": 1}
    assert backend.resolve("op", torch.device("cuda"), "auto") == "reference"


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "IMPLEMENTATIONS", {"op": {"reference": 1, "triton": 3}})
    assert backend.resolve("op", torch.device("cpu"), "auto") == "reference"
    assert backend.resolve("op", torch.device("cpu"), "triton") == "triton"


def test_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "IMPLEMENTATIONS", {"hint": {"reference": backend.fitnet.hint}})
    with fastkd.use_backend("triton"):
        with pytest.raises(fastkd.BackendUnavailableError, match="no triton implementation of hint"):
            fastkd.Hint()(torch.zeros(2, 3), torch.zeros(2, 3))
    with fastkd.use_backend("torch"):
        with pytest.raises(fastkd.BackendUnavailableError, match="no torch implementation of hint"):
            fastkd.Hint()(torch.zeros(2, 3), torch.zeros(2, 3))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "IMPLEMENTATIONS", {"op": {"reference": 1, "triton": 3}})
    with pytest.raises(fastkd.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backend.resolve("op", torch.device("cpu"), "triton")


def test_reference_backend_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setitem(backend.IMPLEMENTATIONS, "hint",
                        {"reference": lambda a, b: calls.append("ref") or torch.zeros(()),
                         "torch": lambda a, b: calls.append("torch") or torch.zeros(())})
    x = torch.zeros(2, 3)
    with fastkd.use_backend("reference"):
        fastkd.Hint()(x, x)
    with fastkd.use_backend("auto"):
        fastkd.Hint()(x, x)
    assert calls == ["ref", "torch"]


def test_listing_command_prints_every_method(capsys):
    main(["--device", "cpu"])
    out = capsys.readouterr().out
    for method in list(METHODS) + ["Baseline"]:
        assert f"\n{method} " in out


def test_use_backend_is_process_wide_and_restored_on_errors():
    """The documented semantics: a thread started inside the block sees its backend."""
    import threading
    seen = []
    with fastkd.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(fastkd.current_backend()))
        thread.start()
        thread.join()
    assert seen == ["reference"]
    with pytest.raises(ZeroDivisionError):
        with fastkd.use_backend("torch"):
            1 / 0
    assert fastkd.current_backend() == "auto"


def test_every_loss_runs_on_cpu_without_triton():
    """import fastkd and every CPU loss work where triton is not installed (macOS, Windows):
    here a child interpreter in which importing triton fails."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch, fastkd
from fastkd.bench import cases
cpu = torch.device("cpu")
for case in cases.cases("tiny", "cpu"):
    loss = case.build("fastkd", cpu, torch.float32)(*case.inputs(cpu, torch.float32, torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss), case.name
assert not any(b == "triton" for impls in fastkd.backend.IMPLEMENTATIONS.values() for b in impls)
try:
    with fastkd.use_backend("triton"):
        fastkd.RKD(25, 50)(torch.randn(4, 3), torch.randn(4, 3))
except fastkd.BackendUnavailableError as err:
    assert "not installed" in str(err), err
else:
    raise AssertionError("the triton backend ran without triton")
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_listing_command_names_itself_as_started(monkeypatch, capsys):
    for argv0, name in (("/usr/local/bin/fastkd", "fastkd"), ("/src/fastkd/__main__.py", "python -m fastkd")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit):
            main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {name} [-h]")


def test_help_lists_every_command_and_each_takes_help():
    import subprocess

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)

    done = run("fastkd", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    listed = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("  python -m ")]
    assert "  python -m fastkd.bench --host " in done.stdout
    assert {"fastkd.bench", "fastkd.bench.global_batch", "fastkd.examples.digits", "fastkd.examples.lm",
            "fastkd.kernels.resources"} <= set(listed), listed
    # Each command's --help in this process (a Python per command would import torch again):
    # the main() that `python -m module` runs (fastkd.bench's is its cli's).
    import contextlib
    import importlib
    import io
    for module in dict.fromkeys(listed):
        mod = importlib.import_module(module)
        main = getattr(mod, "main", None) or importlib.import_module(module + ".cli").main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0 and out.getvalue().startswith("usage: "), module


def test_device_option_says_what_it_takes(monkeypatch):
    for bad in ("foo", "meta", "cuda:-1", ""):
        with pytest.raises(SystemExit, match=r"^(fastkd|python -m fastkd): --device takes cpu, cuda or cuda:N"):
            main(["--device", bad])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device here; use --device cpu"):
        main(["--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:7: torch sees 2 CUDA device\(s\), so N in cuda:N goes from 0 to 1"):
        device_from("cuda:7")
    assert device_from("cuda:1") == torch.device("cuda", 1) and device_from("cpu") == torch.device("cpu")
