"""The dependency rule, read from the source with ``ast``: what ``make lint``'s import
contracts (pyproject.toml, import-linter) cannot see.

import-linter follows import statements, so it misses a module named in a string
(``importlib.import_module("portal")``, ``__import__``), and its wildcards cannot name
"keyturn less keyturn.launch" for the package root (keyturn/__init__.py). This test reads
every module's direct imports, those by name included, and checks the same rule: the
core imports no edge and no launcher module; proxies, portal and bots import no
launcher module.

It must not import the code it checks (it only parses files), and it does not follow
chains: import-linter does that.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = "keyturn.launch"
EDGES = ("proxies", "portal", "bots")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, module: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, module) for each import in the file, relative ones resolved against
    ``module`` (default: the file's own name), and for each call of
    ``importlib.import_module`` / ``__import__`` with a constant name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = (module or module_name(path)).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # ``from keyturn import launch`` names a module
                yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else \
                func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def core_files() -> list[Path]:
    launcher = ROOT / "keyturn" / "launch"
    return [p for p in files("keyturn") if launcher not in p.parents]


def test_the_launcher_exists_where_the_rule_says() -> None:
    assert (ROOT / "keyturn" / "launch" / "__init__.py").is_file()
    assert core_files() and len(core_files()) < len(files("keyturn"))


@pytest.mark.parametrize("path", core_files(), ids=lambda p: module_name(p) or "keyturn")
def test_the_core_imports_no_edge_and_no_launcher(path: Path) -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in imported_names(path)
           if within(name, LAUNCHER) or any(within(name, edge) for edge in EDGES)]
    assert not bad, "the core must not import an edge or the launcher:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", [p for edge in EDGES for p in files(edge)],
                         ids=module_name)
def test_the_edges_import_no_launcher(path: Path) -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in imported_names(path)
           if within(name, LAUNCHER)]
    assert not bad, "an edge must not import the launcher:\n" + "\n".join(bad)


def test_the_reader_sees_every_way_of_naming_a_module(tmp_path: Path) -> None:
    """The checks above are only as good as ``imported_names``."""
    sample = tmp_path / "sample.py"
    sample.write_text("import portal.htmx\nfrom keyturn import launch\n"
                      "from .launch import cli\n"
                      "def f():\n    import importlib\n"
                      "    importlib.import_module('bots.links')\n"
                      "    __import__('proxies')\n")
    names = {name for _, name in imported_names(sample, "keyturn.sample")}
    assert {"portal.htmx", "keyturn.launch", "keyturn.launch.cli", "bots.links",
            "proxies"} <= names


def _modules() -> list[Path]:
    return sorted(p for top in ("keyturn", "proxies", "portal", "bots")
                  for p in (ROOT / top).rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_is_for_and_what_it_must_not_do(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no module docstring"
    assert "must not" in " ".join(doc.split()), \
        f"{path}'s docstring does not say what it must not do"
