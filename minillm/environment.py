"""What the commands check before importing torch and transformers: every dependency is
installed, and none is shadowed by a folder of the directory Python was started from.

Python puts that directory first on ``sys.path``, so a folder there named like an installed
package (``kernels``, which transformers imports) replaces it, and the failure surfaces as a
traceback deep inside transformers. These checks name the culprit in one line instead.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys
from pathlib import Path

OWN = {"minillm"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normalized(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])


def dependency_closure(root: str = "minillm") -> set[str]:
    """Normalized names of the installed distributions ``root`` needs, directly or not."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if _normalized(name) in seen:
            continue
        seen.add(_normalized(name))
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in reqs if "extra ==" not in r and _applies(r)]
    return seen - {_normalized(root)}


def shadowing(start: Path | None = None) -> list[tuple[Path, str]]:
    """``(path, distribution)`` for each package or module in ``start`` (default: the first
    entry of ``sys.path``, the start directory) named like a top-level package of a
    distribution minillm needs (directly or through its dependencies)."""
    start = start or Path(sys.path[0] or os.getcwd())
    if not start.is_dir():
        return []
    needed = dependency_closure()
    top_level = metadata.packages_distributions()
    found = []
    for entry in sorted(start.iterdir()):
        name = entry.stem if entry.suffix == ".py" else entry.name
        is_module = entry.suffix == ".py" or (entry / "__init__.py").is_file()
        dists = [d for d in top_level.get(name, []) if _normalized(d) in needed]
        if is_module and dists and name not in OWN:
            found.append((entry, dists[0]))
    return found


def missing(requirements: list[str] | None = None) -> list[str]:
    """Requirements (PEP 508 strings, default: minillm's own, extras left out) whose
    distribution is not installed."""
    if requirements is None:
        try:
            requirements = metadata.requires("minillm") or []
        except metadata.PackageNotFoundError:  # a checkout that was never installed
            return ["minillm itself"]
    absent = []
    for req in requirements:
        if "extra ==" in req or not _applies(req):
            continue
        name = _requirement_name(req)
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            absent.append(req.split(";")[0].strip())
    return absent


def _applies(req: str) -> bool:
    """Whether the environment marker of ``req`` (after ``;``) holds here."""
    if ";" not in req:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:  # packaging absent: check the requirement anyway
        return True
    return Marker(req.split(";", 1)[1]).evaluate()


def problem() -> str | None:
    """One line describing what keeps minillm from importing its dependencies, or None."""
    absent = missing()
    if absent:
        return f"missing dependencies {', '.join(absent)}: install minillm with pip install -e ."
    shadows = shadowing()
    if shadows:
        path, dist = shadows[0]
        return (
            f"'{path}' shadows the installed package '{path.stem}' (distribution {dist}), "
            "which minillm's dependencies import: run minillm from another directory or "
            "rename it"
        )
    return None
