"""The compiled per-delivery path (realtime/native.py): used only when current, never stale.

``make test`` builds it where the machine can (``make native``) and runs the per-delivery
path's suites a second time on it (NATIVE_TESTS in the Makefile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import realtime
from realtime.native import C_MODULES, MODULES, NATIVE_DIR, STAMP_NAME, current, stamp

ROOT = Path(__file__).resolve().parent.parent
BUILT = current() is None


def _loaded(env: dict[str, str], cwd: Path = ROOT) -> tuple[str, str]:
    """Where a fresh interpreter loads realtime.writer from, and what realtime.NATIVE says."""
    code = "import realtime, realtime.writer as w; print(w.__file__); print(realtime.NATIVE)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return out[0], out[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REALTIME_NATIVE"}
    env.update(extra)
    return env


def test_switched_off_every_module_is_interpreted() -> None:
    path, native = _loaded(_env(REALTIME_NATIVE="off"))
    assert path == str(ROOT / "realtime" / "writer.py")
    assert native == "interpreted: REALTIME_NATIVE=off"


@pytest.mark.skipif(not BUILT, reason=f"no compiled build here: {current()}")
def test_a_current_build_is_used_by_default() -> None:
    path, native = _loaded(_env())
    assert Path(path).parent == NATIVE_DIR and path.endswith(".so")
    assert native == f"compiled: {', '.join(MODULES + C_MODULES)}"


@pytest.mark.skipif(not BUILT, reason=f"no compiled build here: {current()}")
def test_this_run_uses_what_its_environment_asks_for() -> None:
    from realtime import writer

    compiled = writer.__file__ is not None and writer.__file__.endswith(".so")
    assert compiled == (os.environ.get("REALTIME_NATIVE") != "off"), realtime.NATIVE


def test_a_build_of_other_sources_or_another_python_is_not_used(tmp_path: Path) -> None:
    native = tmp_path / "_native"
    native.mkdir()
    assert current(native) == "not built (python -m realtime.native_build)"
    good = stamp()
    (native / STAMP_NAME).write_text(json.dumps(good))
    assert current(native) is None
    stale = dict(good, sources={m: "0" * 64 for m in MODULES + C_MODULES})
    (native / STAMP_NAME).write_text(json.dumps(stale))
    assert current(native) == (
        f"stale: {', '.join(MODULES + C_MODULES)} changed since the build (rebuild to use it)"
    )
    c_edited = dict(good, sources=dict(good["sources"], sendfast="0" * 64))  # type: ignore[call-overload]
    (native / STAMP_NAME).write_text(json.dumps(c_edited))
    assert current(native) == "stale: sendfast changed since the build (rebuild to use it)"
    (native / STAMP_NAME).write_text(json.dumps(dict(good, python="cpython-39-other")))
    assert (current(native) or "").startswith("built for another Python")
    (native / STAMP_NAME).write_text("{not json")
    assert (current(native) or "").startswith("unreadable stamp")


@pytest.mark.skipif(not BUILT, reason=f"no compiled build here: {current()}")
def test_an_edited_module_runs_interpreted_until_rebuilt(tmp_path: Path) -> None:
    """A copy of the package with the build, then writer.py edited: the copy runs the edit."""
    copy = tmp_path / "realtime"
    shutil.copytree(ROOT / "realtime", copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(PYTHONPATH=str(tmp_path))
    path, native = _loaded(env, tmp_path)
    assert path.startswith(str(copy / "_native")), native
    with (copy / "writer.py").open("a") as f:
        f.write("\nEDITED = True\n")
    path, native = _loaded(env, tmp_path)
    assert path == str(copy / "writer.py")
    assert native == "interpreted: stale: writer changed since the build (rebuild to use it)"


def test_a_build_compiles_the_sources_beside_it_and_is_then_used(tmp_path: Path) -> None:
    """``python -m realtime.native_build`` in a copy of the package: the copy's writer then
    loads compiled, and ``status`` says so (about 30 s: mypyc and a C compiler at work)."""
    from realtime.native_build import missing_toolchain

    lacking = missing_toolchain()
    if lacking is not None:
        pytest.skip(lacking)
    copy = tmp_path / "realtime"
    shutil.copytree(
        ROOT / "realtime", copy, ignore=shutil.ignore_patterns("__pycache__", "_native")
    )
    env = _env(PYTHONPATH=str(tmp_path))
    assert _loaded(env, tmp_path)[1] == "interpreted: not built (python -m realtime.native_build)"
    built = subprocess.run(
        [sys.executable, "-m", "realtime.native_build"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"built into {copy / '_native'}" in built.stdout
    path, native = _loaded(env, tmp_path)
    assert path.startswith(str(copy / "_native")) and path.endswith(".so")
    assert native == f"compiled: {', '.join(MODULES + C_MODULES)}"
