"""What a stage's result depends on besides its inputs: its code and its libraries.

A stage's code is the source of its own module plus every qrobust module that module imports,
transitively, found by reading `import` statements (those inside functions too, where qrobust
imports its heavy parts). Editing any of them changes the stage's fingerprint and so its cache
key; editing a module the stage never imports does not. Third-party code is covered by the
versions of the libraries the stage declares.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PROJECT = "qrobust"
# Infrastructure that decides where and when a stage runs, never what it computes: editing it
# invalidates nothing.
NOT_RESULT_CODE = frozenset({
    "qrobust",  # the package root: the Python API, which runs grids and computes nothing itself
    "qrobust.tasks.runtime.stage",
    "qrobust.tasks.runtime.fingerprint",
    "qrobust.tasks.runtime.locks",
    "qrobust.tasks.runtime.workspace",
    "qrobust.tasks.runtime.provenance",  # describes where a result was made, never what it is
})


@dataclass(frozen=True)
class CodeFingerprint:
    """The hash of a set of modules' sources, and each module's own hash (to say what changed)."""

    digest: str
    modules: tuple[tuple[str, str], ...]  # (module name, sha256 of its source), sorted

    def changed_modules(self, other: "CodeFingerprint") -> list[str]:
        """Modules whose source differs between two fingerprints (added or removed ones too)."""
        mine, theirs = dict(self.modules), dict(other.modules)
        return sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))


def _source_path(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_project_modules(path: Path) -> set[str]:
    """The qrobust modules a source file imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PROJECT)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PROJECT:
            for alias in node.names:  # `from qrobust.x import y` imports the module x.y when there is one
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _source_path(submodule) else node.module)
    return found


@functools.lru_cache(maxsize=None)
def module_closure(roots: tuple[str, ...]) -> tuple[str, ...]:
    """`roots` and every qrobust module they import, transitively, sorted."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        if module.startswith(f"{PROJECT}.flows"):
            raise ImportError(f"{module} is reached from {roots}: stage code must not import flows")
        path = _source_path(module)
        if path is None:
            raise ImportError(f"no source for module {module!r}")
        seen.add(module)
        pending.extend(_imported_project_modules(path) - seen - NOT_RESULT_CODE)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def code_fingerprint(roots: tuple[str, ...]) -> CodeFingerprint:
    modules = tuple(
        (name, hashlib.sha256(_source_path(name).read_bytes()).hexdigest()[:16]) for name in module_closure(roots)
    )
    digest = hashlib.sha256(repr(modules).encode()).hexdigest()[:16]
    return CodeFingerprint(digest, modules)


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` ("python" is the interpreter's major.minor); "absent" when missing."""
    versions = {}
    for name in names:
        if name == "python":
            versions[name] = ".".join(platform.python_version_tuple()[:2])
            continue
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions
