"""What every fuzz target shares: the sanitized extension and the atheris entry point.

fuzz/build.sh compiles proxies/postgres/_speedups.c with clang, AddressSanitizer, UBSan
and libFuzzer's coverage instrumentation into build/fuzz/ (never over the extension in
the source tree). ``load()`` puts a finder first on ``sys.meta_path`` so that the name
``proxies.postgres._speedups`` resolves to that copy, imports the project's
``proxies.postgres.speedups`` (which picks it up as ``compiled``, for the Python session
too) and checks that it did. The process must run with atheris's ASan runtime preloaded
(fuzz/run.py sets LD_PRELOAD and the sanitizer options).

A target must not import anything from proxies/ before ``load()``, and this module must
not let a target run against any other build of the extension: it stops instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"
SANITIZED = BUILD / ("_speedups" + str(sysconfig.get_config_var("EXT_SUFFIX")))
NAME = "proxies.postgres._speedups"


class _SanitizedFinder(importlib.abc.MetaPathFinder):
    """Finds ``proxies.postgres._speedups`` in build/fuzz/, and nothing else."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, SANITIZED)


def load() -> Any:
    """The sanitized extension module, as the project's own code sees it."""
    if not SANITIZED.exists():
        raise SystemExit(f"{SANITIZED} is not built: run fuzz/build.sh (or make fuzz)")
    if "asan" not in os.environ.get("LD_PRELOAD", ""):
        raise SystemExit("run the fuzz targets through fuzz/run.py: the sanitizers' runtime "
                         "must be preloaded (LD_PRELOAD)")
    if NAME in sys.modules or "proxies.postgres.speedups" in sys.modules:
        raise SystemExit(f"{NAME} was imported before the sanitized copy was put in place")
    os.environ.pop("KEYTURN_NO_SPEEDUPS", None)
    sys.meta_path.insert(0, _SanitizedFinder())
    from proxies.postgres import speedups

    compiled = speedups.compiled
    if compiled is None or Path(compiled.__file__).resolve() != SANITIZED.resolve():
        raise SystemExit(f"the project did not load the sanitized extension ({speedups.state()}; "
                         f"{getattr(compiled, '__file__', None)}): rebuild with fuzz/build.sh")
    return compiled


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Hand the target to atheris (libFuzzer's flags come from the command line)."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def main(make_target: Callable[[Any], Callable[[bytes], None]]) -> None:
    """A target module's entry point: its test built on the sanitized extension, fuzzed."""
    fuzz(make_target(load()))
