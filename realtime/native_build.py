"""``python -m realtime.native_build``: compile the per-delivery path with mypyc.

Compiles ``realtime.native.MODULES`` with mypyc, and builds the C extensions of
``C_MODULES``, into ``realtime/_native/`` with the stamp that ``realtime.native`` checks
before it uses them. It needs a C compiler and Python's headers;
mypyc and setuptools come with the ``native`` group of uv.lock (in the dev group too).
``--optional`` (what ``make`` runs): a machine that cannot build says why and the server
runs interpreted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

import realtime
from realtime.native import C_MODULES, MODULES, NATIVE_DIR, PACKAGE_DIR, STAMP_NAME, current, stamp

#: The type-checking mypyc does before it compiles (the project's own checks are ``make lint``).
MYPY_CONFIG = """[mypy]
python_version = 3.11
plugins = pydantic.mypy
ignore_missing_imports = True
"""


def missing_toolchain() -> str | None:
    """What this machine lacks to build, or None."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}); install gcc to build the compiled hot path"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"no Python headers in {include}; install python3-dev to build it"
    for module in ("mypyc", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (uv sync --group native)"
    return None


def build(native_dir: Path = NATIVE_DIR) -> None:
    """Compile ``MODULES`` into ``native_dir`` (replaced whole, at the end); raises on failure.

    Compiles a copy of the package's sources in a folder of its own: mypy and setuptools read
    what the current folder holds, and mypy takes the folder of an installed package for
    sources of its own (site-packages would shadow the libraries)."""
    from mypyc.build import mypycify

    setup = importlib.import_module("setuptools").setup  # untyped: looked up, not imported
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="realtime-native-") as tmp:
        work = Path(tmp)
        sources = work / "src" / PACKAGE_DIR.name
        shutil.copytree(
            PACKAGE_DIR, sources, ignore=shutil.ignore_patterns("_native", "__pycache__")
        )
        (sources.parent / "mypy.ini").write_text(MYPY_CONFIG)
        os.chdir(sources.parent)
        try:
            extensions = mypycify(
                [f"{PACKAGE_DIR.name}/{m}.py" for m in MODULES],
                opt_level="3",
                target_dir=str(work / "c"),
            )
            extension = importlib.import_module("setuptools").Extension
            extensions += [
                extension(
                    f"{PACKAGE_DIR.name}.{m}",
                    sources=[f"{PACKAGE_DIR.name}/{m}.c"],
                    extra_compile_args=["-O2"],
                )
                for m in C_MODULES
            ]
            setup(
                name="piggybong-realtime-native",
                ext_modules=extensions,
                script_args=[
                    "--quiet",
                    "build_ext",
                    f"--build-lib={work / 'lib'}",
                    f"--build-temp={work / 'obj'}",
                ],
            )
        finally:
            os.chdir(here)
        built = sorted((work / "lib" / PACKAGE_DIR.name).glob("*.so"))
        if not built:
            raise RuntimeError("mypyc produced no extension")
        staging = work / "native"
        staging.mkdir()
        for path in built:
            shutil.copy2(path, staging / path.name)
        (staging / STAMP_NAME).write_text(json.dumps(stamp(), indent=1) + "\n")
        shutil.rmtree(native_dir, ignore_errors=True)
        shutil.copytree(staging, native_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m realtime.native_build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", nargs="?", default="build", choices=("build", "status"))
    parser.add_argument(
        "--if-needed", action="store_true", help="build only when no current build exists"
    )
    parser.add_argument(
        "--optional",
        action="store_true",
        help="a machine that cannot build says why and exits 0 (the server runs interpreted)",
    )
    args = parser.parse_args(argv)
    if args.command == "status":
        print(f"realtime.native: {realtime.NATIVE}")
        return 0
    if args.if_needed and current() is None:
        return 0
    lacking = missing_toolchain()
    if lacking is not None:
        print(f"realtime.native: not built: {lacking}; the server runs interpreted")
        return 0 if args.optional else 1
    print(
        f"realtime.native: compiling {', '.join(MODULES)} with mypyc"
        f" (and {', '.join(C_MODULES)}) ...",
        flush=True,
    )
    try:
        build()
    except (Exception, SystemExit) as exc:
        print(f"realtime.native: build failed ({exc}); the server runs interpreted")
        return 0 if args.optional else 1
    print(f"realtime.native: built into {NATIVE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
