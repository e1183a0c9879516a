"""A non-editable install finds its presets and assets (slow): the package is installed from a copy of the
source tree into a fresh venv (offline: no index, no build isolation, no extension), and `hope-kernels aba
--preset quick` runs from a folder outside the source tree until it has loaded the preset and the shipped
pre-trained weights; then it is stopped."""

import ast
import os
import queue
import re
import shutil
import signal
import site
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT as REPO

ROOT = str(REPO)
# what the installed hope-kernels needs at run time, and what pip needs to build it without build isolation
RUNTIME = ("torch", "numpy", "yaml", "safetensors", "tqdm")
BUILD = ("pip", "setuptools")
# not copied: VCS data, venvs, build outputs, the compiled extension (the install builds none), run outputs
_SKIP_TOP = {".git", ".venv", "build", "dist", "runs", ".whl", ".gl", "tmp", ".benchmarks", ".pytest_cache"}
_SKIP_ANY = ("__pycache__", "*.egg-info", "*.so", "*.o", ".pytest_cache")


def _ignore(folder, names):
    skip = set(shutil.ignore_patterns(*_SKIP_ANY)(folder, names))
    if os.path.abspath(folder) == ROOT:
        skip |= _SKIP_TOP & set(names)
    return skip


def _clean_env(**extra) -> dict:
    """The environment without anything that would import hope_kernels from the source tree or reach a
    package index."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
        and not k.startswith("PIP_")
    }
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _missing(python, modules, env, cwd) -> list[str]:
    code = (
        "import importlib.util, sys; "
        f"print(' '.join(m for m in {list(modules)!r} if importlib.util.find_spec(m) is None))"
    )
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if r.returncode:
        return [f"(the venv's python failed: {r.stderr.strip()[-300:]})"]
    return r.stdout.split()


def _fresh_venv(path, env, cwd) -> str:
    """A venv at `path` whose python sees the dependencies without a download: the system site-packages
    (--system-site-packages), and where they lack something, the site-packages of the python running these
    tests through a .pth file (path lines only: the .pth files there, e.g. an editable install's hook of this
    source tree, are not run). Skips when neither has them."""
    r = subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if r.returncode:
        pytest.skip(f"cannot create a venv here (python -m venv): {r.stderr.strip()[-300:]}")
    python = str(path / "bin" / "python")
    if _missing(python, RUNTIME + BUILD, env, cwd):
        r = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            check=True,
        )
        ours = [p for p in site.getsitepackages() if os.path.isdir(p)]
        with open(os.path.join(r.stdout.strip(), "_hope_kernels_test_deps.pth"), "w") as f:
            f.write("".join(p + "\n" for p in ours))
    missing = _missing(python, RUNTIME + BUILD, env, cwd)
    if missing:
        pytest.skip(
            f"an offline install needs {missing} importable from a fresh venv (system site-packages or "
            f"{sys.executable}'s); not here"
        )
    if _missing(python, ["setuptools.command.bdist_wheel"], env, cwd) and _missing(python, ["wheel"], env, cwd):
        pytest.skip("an offline wheel build needs setuptools >= 70.1 or the wheel package; neither is here")
    return python


def _run_until(cmd, env, cwd, stop, timeout):
    """Run cmd (stdout and stderr merged) until stop(lines) is true, it exits, or timeout seconds pass; then
    stop its process group. -> (lines, return code or None when it was stopped, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True
    )
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(x) for x in proc.stdout] + [q.put(None)], daemon=True).start()
    rc = None
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                line = q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                rc = proc.wait()
                break
            lines.append(line.rstrip("\n"))
            if stop(lines):
                break
    finally:
        if proc.poll() is None:  # the job and its worker processes (its own session)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return lines, rc, time.perf_counter() - t0


SHIPPED = re.compile(r"^hope-kernels aba: (\S+): shipped weights \(\w+, \d+ steps\) from (.+)$")


@pytest.mark.slow(minutes=1)
def test_wheel_install_finds_presets_and_assets(tmp_path):
    """Measured on this 2-core CPU with a training run on the other core (2026-12-04): 20-40 s in all (two runs);
    pip install 3-5 s, the aba command 11-21 s until both shipped weights were loaded (mostly simulating the
    quick data)."""
    work = tmp_path / "elsewhere"  # the working directory: outside the source tree, nothing in it
    work.mkdir()
    assert not str(work.resolve()).startswith(ROOT + os.sep)
    env = _clean_env()
    python = _fresh_venv(tmp_path / "venv", env, work)
    venv = str((tmp_path / "venv").resolve())

    # 1. install a copy of the source tree, non-editable (pip builds a wheel of it), offline, without the extension
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    t0 = time.perf_counter()
    r = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", str(src)],
        capture_output=True,
        text=True,
        env=_clean_env(HOPE_KERNELS_SKIP_EXT="1"),
        cwd=work,
        timeout=900,
    )
    assert r.returncode == 0, f"pip install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"pip install: {time.perf_counter() - t0:.1f} s")
    shutil.rmtree(src)  # nothing of the copy is needed (or used) from here on

    # 2. the installed package: files in the venv (none from the source tree), presets and assets among them
    code = (
        "import hope_kernels, importlib.resources as r; d = r.files('hope_kernels'); "
        "print(hope_kernels.__file__); "
        "print(sorted(f.name for f in d.joinpath('configs').iterdir())); "
        "print(d.joinpath('assets', 'pretrained', 'quick', 'index.json').is_file(), "
        "d.joinpath('assets', 'embedded_encoder.safetensors').is_file())"
    )
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    init, configs, assets = r.stdout.strip().splitlines()[-3:]
    print(f"installed: {init}\nconfigs: {configs}\nassets (quick index, embedded encoder): {assets}")
    init = os.path.realpath(init)
    assert init.startswith(venv + os.sep) and not init.startswith(ROOT + os.sep), init
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "hope_kernels", "configs")) if f.endswith(".yaml"))
    assert ast.literal_eval(configs) == shipped and assets == "True True"
    pkg = os.path.dirname(init)
    for name in shipped:  # byte for byte what the source tree holds
        with (
            open(os.path.join(pkg, "configs", name), "rb") as a,
            open(os.path.join(ROOT, "hope_kernels", "configs", name), "rb") as b,
        ):
            assert a.read() == b.read(), name

    # 3. the documented command, from the outside folder, until the preset and shipped weights are loaded
    exe = os.path.join(venv, "bin", "hope-kernels")

    def enough(lines):
        return sum(bool(SHIPPED.match(x)) for x in lines) >= 2 or any(
            "pre-training it here" in x or "Traceback" in x for x in lines
        )

    lines, rc, secs = _run_until(
        [exe, "aba", "--preset", "quick", "--seeds", "0", "--no-progress", "--out", str(tmp_path / "out")],
        env,
        work,
        enough,
        timeout=600,
    )
    text = "\n".join(lines)
    print(f"hope-kernels aba ({secs:.0f} s, then stopped):\n{text}")
    assert rc is None, f"hope-kernels aba exited with {rc} before loading the shipped weights:\n{text[-4000:]}"
    assert "pre-training it here" not in text and "Traceback" not in text, text[-4000:]
    preset = [x for x in lines if x.startswith("hope-kernels aba: preset quick (")]
    assert preset and os.path.realpath(preset[0][len("hope-kernels aba: preset quick (") : -1]) == os.path.join(
        pkg, "configs", "aba_quick.yaml"
    ), text
    found = [SHIPPED.match(x) for x in lines if SHIPPED.match(x)]
    assert len(found) >= 2, text
    for m in found:  # the venv's copy of the weights, not the source tree's
        path = os.path.realpath(m.group(2))
        assert path.startswith(os.path.join(pkg, "assets", "pretrained", "quick") + os.sep), m.group(0)
    # the dataset it simulated (with the shipped embedded encoder) is the one the shipped weights were trained on
    assert (tmp_path / "out" / "data" / "manifest.json").is_file()
