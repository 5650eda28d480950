"""Which requests are captured: the route as the app sees it, matched against plain paths and patterns.

A server run with ``--root-path`` or an app mounted under a prefix sees ``scope["path"]`` with that prefix
in front (``scope["root_path"]``); routes are matched without it, as the app's own router does. One
trailing slash is ignored, so ``/v1/chat/completions/`` is the same route. Plain paths are a set lookup;
patterns (``{name}`` stands for one path segment) are tried only when the set misses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import Scope

_PARAMETER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def route_path(scope: Scope) -> str:
    """``scope["path"]`` without the ``root_path`` prefix (mounts, ``--root-path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    # Older servers and routers strip the prefix themselves; only remove it when it is there.
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :] or "/"
    return path


def _normal(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def _pattern_regex(pattern: str) -> str:
    parts: list[str] = []
    last = 0
    for parameter in _PARAMETER.finditer(pattern):
        parts.append(re.escape(pattern[last : parameter.start()]))
        parts.append("[^/]+")
        last = parameter.end()
    parts.append(re.escape(pattern[last:]))
    return "".join(parts)


class PathMatcher:
    """Matches route paths against the configured ``paths``."""

    __slots__ = ("_patterns", "_plain", "configured")

    def __init__(self, paths: Iterable[str]) -> None:
        self.configured = frozenset(paths)
        plain = {_normal(p) for p in self.configured if "{" not in p}
        patterns = sorted(_normal(p) for p in self.configured if "{" in p)
        self._plain = frozenset(plain)
        self._patterns = (
            re.compile("|".join(f"(?:{_pattern_regex(p)})" for p in patterns)) if patterns else None
        )

    def __call__(self, path: str) -> bool:
        path = _normal(path)
        if path in self._plain:
            return True
        return self._patterns is not None and self._patterns.fullmatch(path) is not None


def check_path(path: str) -> str | None:
    """Why a configured path is unusable, or None."""
    if not path.startswith("/"):
        return "must start with '/'"
    leftover = _PARAMETER.sub("", path)
    if "{" in leftover or "}" in leftover:
        return "has a malformed {parameter} (use {name}, letters, digits and _)"
    return None
