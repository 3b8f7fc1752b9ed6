"""The README and docs/ as a new user reads them: the quick start runs as pasted, every
install line works from a clone, every linked page and file exists."""
import ast
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from packaging.requirements import InvalidRequirement, Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _setup_call():
    """setup()'s keyword arguments from setup.py, module-level names resolved."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    names = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")

    def value(node):
        return ast.literal_eval(names[node.id] if isinstance(node, ast.Name) else
                                ast.List([names.get(e.id, e) if isinstance(e, ast.Name) else e for e in node.elts],
                                         ast.Load()) if isinstance(node, ast.List) else node)
    out = {}
    for kw in call.keywords:
        if kw.arg == "extras_require":
            out[kw.arg] = {ast.literal_eval(k): value(v) for k, v in zip(kw.value.keys, kw.value.values)}
        elif kw.arg in ("name", "version", "install_requires"):
            out[kw.arg] = value(kw.value)
    return out


SETUP = _setup_call()


def _code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _pip_commands():
    """(page, argv) of every `pip install` / `pip wheel` in the pages' code blocks and inline code."""
    found = []
    for page in PAGES:
        text = page.read_text()
        snippets = [line for block in _code_blocks(text, "bash") for line in block.splitlines()]
        snippets += re.findall(r"`([^`\n]*pip (?:install|wheel)[^`\n]*)`", text)
        for snippet in snippets:
            for part in re.split(r"&&|;", snippet.split(" #")[0]):
                argv = shlex.split(part.strip())
                if argv[:1] in (["pip"], ["pip3"]) or argv[:3] == ["python", "-m", "pip"]:
                    found.append((page.name, argv[argv.index("pip") + 1 if "pip" in argv else 1:]))
    return found


PIP = _pip_commands()


def test_the_pages_have_install_lines():
    assert len(PIP) >= 8
    assert ("README.md", ["install", "torch==2.13.0", "-e", "."]) in PIP


@pytest.mark.parametrize("page, argv", PIP, ids=[f"{p}: {' '.join(a)}" for p, a in PIP])
def test_every_install_line_works_from_a_clone(page, argv):
    """Each requirement is this checkout (with extras setup.py defines), the wheel built from
    it (its file name), or a package on the index; never fastkd by name (not on an index)."""
    command, args = argv[0], argv[1:]
    assert command in ("install", "wheel"), argv
    options_with_value = {"-w", "--wheel-dir", "-r", "--requirement"}
    requirements, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options_with_value:
            skip = True
        elif arg.startswith("-"):
            assert arg in ("-e", "--editable", "--no-deps", "--no-build-isolation", "-q", "--quiet", "-U",
                           "--upgrade"), f"{page}: unknown pip option {arg} in {argv}"
        else:
            requirements.append(arg)
    assert requirements, argv
    for req in requirements:
        match = re.fullmatch(r"(\.|dist/fastkd-([^-]+)-py3-none-any\.whl)(\[([\w,]+)\])?", req)
        if match:
            if match.group(2):
                assert match.group(2) == SETUP["version"], f"{page}: the wheel is fastkd-{SETUP['version']}"
            for extra in (match.group(4) or "").split(","):
                assert not extra or extra in SETUP["extras_require"], f"{page}: setup.py has no extra {extra!r}"
            continue
        try:
            parsed = Requirement(req)
        except InvalidRequirement:
            pytest.fail(f"{page}: {req!r} in {argv} is neither a path nor a requirement")
        assert parsed.name != "fastkd", f"{page}: fastkd is not on a package index; install from a clone"


def test_the_wheel_the_readme_names_builds(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert [p.name for p in tmp_path.glob("*.whl")] == [f"fastkd-{SETUP['version']}-py3-none-any.whl"]


def test_a_cpu_install_does_not_require_triton():
    assert not any(Requirement(r).name == "triton" for r in SETUP["install_requires"])
    assert any(Requirement(r).name == "triton" for r in SETUP["extras_require"]["test"])


def test_the_quick_start_runs_as_pasted():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start") + 1)]
    (code,) = _code_blocks(section, "python")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"loss \d+\.\d{4}\n", result.stdout), result.stdout


def test_links_and_named_files_exist():
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"
        for path in re.findall(r"`((?:fastkd|tests|benchmarks|docs)/[\w./-]+\.(?:py|md|sh|txt))`", text):
            assert (ROOT / path).exists(), f"{page.name} names {path}, which is not there"
