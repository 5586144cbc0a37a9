"""Which modules run compiled: the per-delivery path built with mypyc, where it was built.

``python -m realtime.native_build`` compiles the modules of ``MODULES`` (``realtime.writer``:
the writers, the flush queue and the fan-out loop) into ``realtime/_native/`` and writes a
stamp there: each module's source digest and the Python it was built for. Where a machine
cannot build it the server runs interpreted: the same code, slower.

``enable``, called by ``realtime/__init__`` before any other module loads, puts that folder
first on the package's search path when its stamp matches the sources beside it: a module
edited after the build is never shadowed by a stale one (it runs interpreted until rebuilt).
``REALTIME_NATIVE=off`` keeps every module interpreted (the test suite's coverage run does);
read here, from the environment, because it is decided before the settings exist.
``python -m realtime.native_build status`` says which runs and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Final

#: The modules compiled, by name within the package.
MODULES: Final = ("writer",)
#: The C extensions built beside them (``<name>.c`` in the package): ``sendfast``, the
#: writer's send from C.
C_MODULES: Final = ("sendfast",)
PACKAGE_DIR: Final = Path(__file__).resolve().parent
NATIVE_DIR: Final = PACKAGE_DIR / "_native"
STAMP_NAME: Final = "stamp.json"
#: Values of ``REALTIME_NATIVE`` that keep every module interpreted.
OFF: Final = frozenset({"off", "0", "false", "no"})


def _digest(module: str) -> str:
    suffix = ".c" if module in C_MODULES else ".py"
    return hashlib.sha256((PACKAGE_DIR / f"{module}{suffix}").read_bytes()).hexdigest()


def _python() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"


def stamp() -> dict[str, object]:
    return {"python": _python(), "sources": {m: _digest(m) for m in MODULES + C_MODULES}}


def current(native_dir: Path = NATIVE_DIR) -> str | None:
    """None when ``native_dir`` holds a build of the sources beside it, else why not."""
    try:
        stamp = json.loads((native_dir / STAMP_NAME).read_text())
    except FileNotFoundError:
        return "not built (python -m realtime.native_build)"
    except (OSError, ValueError) as exc:
        return f"unreadable stamp: {exc}"
    if not isinstance(stamp, dict) or stamp.get("python") != _python():
        return f"built for another Python than {_python()}"
    stale = [m for m in MODULES + C_MODULES if stamp.get("sources", {}).get(m) != _digest(m)]
    if stale:
        return f"stale: {', '.join(stale)} changed since the build (rebuild to use it)"
    return None


def enable(package_path: list[str]) -> str:
    """Put the compiled modules first on ``package_path`` when they are current and not
    switched off; what runs, and why. Never raises: interpreted is always a valid answer."""
    if os.environ.get("REALTIME_NATIVE", "").strip().lower() in OFF:
        return "interpreted: REALTIME_NATIVE=off"
    try:
        why = current()
    except Exception as exc:  # a broken build never stops the server
        why = f"not usable: {exc}"
    if why is not None:
        return f"interpreted: {why}"
    package_path.insert(0, str(NATIVE_DIR))
    return f"compiled: {', '.join(MODULES + C_MODULES)}"
