"""The install is reproducible: one lock, and the installer pinned the same way everywhere."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bootstrap_uv_is_the_locked_uv() -> None:
    """`make` installs uv from requirements-uv.txt (hashes) and then syncs uv.lock, which
    holds uv too: both must name one version, or every `make` would rebuild the venv."""
    boot = re.search(r"^uv==([0-9.]+)", (ROOT / "requirements-uv.txt").read_text(), re.M)
    assert boot, "requirements-uv.txt pins no uv"
    assert "--hash=sha256:" in (ROOT / "requirements-uv.txt").read_text()
    group = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    assert f"uv=={boot.group(1)}" in group
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p.get("version") for p in lock["package"]}
    assert locked["uv"] == boot.group(1)


def test_every_locked_package_has_hashes() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    unhashed = [
        p["name"]
        for p in lock["package"]
        if p.get("source", {}).get("registry")
        and not all("hash" in w for w in [*p.get("wheels", []), p.get("sdist", {"hash": 1})])
    ]
    assert unhashed == []


def test_ci_the_image_and_make_install_from_the_lock() -> None:
    assert re.search(r"\) sync --locked", (ROOT / "Makefile").read_text())
    assert "uv sync --locked --no-dev" in (ROOT / "Dockerfile").read_text()
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_the_package_ships_the_c_sources_its_native_build_compiles() -> None:
    """An installed package (the Docker image's) builds and checks them from its own files."""
    from realtime.native import C_MODULES

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]["realtime"]
    for module in C_MODULES:
        assert f"{module}.c" in shipped and (ROOT / "realtime" / f"{module}.c").exists()
        assert f"{module}.pyi" in shipped
