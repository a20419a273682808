"""Which of an extra's packages are missing, read from the installed package's own metadata.

The base install is the client; the CLI's server commands ask here before they import server code, so
that a client-only install answers with the extra to install instead of a traceback. The extras are
defined once, in pyproject.toml; this reads them back (standard library only).
"""

from __future__ import annotations

import re
from importlib import metadata

DIST = "fastswitch"
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(extra: str, dist: str = DIST) -> set[str]:
    """Names of the distributions `extra` needs, following the extra's references to other extras of `dist`.

    Empty when `dist` is not installed (running from a source tree): nothing can be told then."""
    try:
        lines = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return set()
    names: set[str] = set()
    todo, seen = [extra], set()
    while todo:
        current = todo.pop()
        seen.add(current)
        for line in lines:
            requirement, _, marker = line.partition(";")
            found = _EXTRA_MARKER.search(marker)
            if found is None or found.group(1) != current:
                continue
            match = _REQUIREMENT.match(requirement)
            if match is None:
                continue
            name, extras = match.group(1), match.group(2)
            if _normal(name) == _normal(dist):
                todo += [e.strip() for e in (extras or "").split(",") if e.strip() and e.strip() not in seen]
            else:
                names.add(name)
    return names


def missing(extra: str, dist: str = DIST) -> list[str]:
    """The distributions of `extra` that are not installed, sorted."""
    absent = []
    for name in requirements_of(extra, dist):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
    return sorted(absent)


def install_hint(extra: str, dist: str = DIST) -> str:
    return f"pip install '{dist}[{extra}]'"
