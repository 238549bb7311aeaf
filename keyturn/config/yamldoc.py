"""YAML with the line of every key, and config errors that name file, line and key.

``Doc`` reads a config file into plain Python data (dicts, lists, scalars) and keeps
the source line of every key path, so that whatever validates the data later — the
core's sections and the sections and connection types that edges register — can say
``keyturn.yaml:14: policies.shop.rules[2].action: ...`` instead of raising a stack trace.

It must not know any section of the file: it parses and locates, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from keyturn.errors import ConfigError

#: Where a value sits in the file: keys and list indexes from the top.
KeyPath = tuple[Any, ...]


class Doc:
    """Plain Python data plus the source line of every key path."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: dict[KeyPath, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", exc)
            raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from exc
        self.data = self._convert(node, ()) if node is not None else {}

    def _convert(self, node: yaml.Node, at: KeyPath) -> Any:
        self.lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                key = yaml.safe_load(yaml.serialize(knode))
                if key in out:
                    line = knode.start_mark.line + 1
                    raise ConfigError(f"{self.path}:{line}: {format_path(at + (key,))}: "
                                      "duplicate key")
                out[key] = self._convert(vnode, at + (key,))
                self.lines[at + (key,)] = knode.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(v, at + (i,)) for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    def line(self, at: KeyPath) -> int | None:
        """The line of ``at``, or of the nearest enclosing key the file has (a missing key
        is reported where its mapping is)."""
        probe = at
        while probe and probe not in self.lines:
            probe = probe[:-1]
        return self.lines.get(probe)

    def where(self, at: KeyPath) -> str:
        """``file:line`` of ``at`` (``file`` alone when the file is empty)."""
        line = self.line(at)
        return f"{self.path}:{line}" if line else self.path

    def error(self, at: KeyPath, message: str) -> ConfigError:
        return ConfigError(f"{self.where(at)}: {format_path(at)}: {message}")


def format_path(at: Iterable[Any]) -> str:
    """``("policies", "shop", "rules", 2)`` -> ``policies.shop.rules[2]``."""
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
