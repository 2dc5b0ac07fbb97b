"""The workspace: where artifacts, the store, locks, logs and reports live.

Artifacts are directories `artifacts/<stage>/<key>/`, named by the cache key of the work that
produced them. A directory is written under a temporary name and renamed into place only when
complete, so a run killed at any moment leaves either a whole artifact or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_WORKSPACE = "qrobust-workspace"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike | None) -> "Workspace":
        """The workspace at `path` (default $QROBUST_WORKSPACE or ./qrobust-workspace), created if absent."""
        workspace = cls.existing(path)
        workspace.root.mkdir(parents=True, exist_ok=True)
        return workspace

    @classmethod
    def existing(cls, path: str | os.PathLike | None) -> "Workspace":
        """The workspace at `path`, without creating anything (for readers)."""
        return cls(Path(path or os.environ.get("QROBUST_WORKSPACE", DEFAULT_WORKSPACE)).resolve())

    @property
    def store_path(self) -> Path:
        return self.root / "results.duckdb"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def logs(self) -> Path:
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    @contextlib.contextmanager
    def new_artifact(self, stage: str, key: str, replace: bool = False) -> Iterator[Path]:
        """Yield a scratch directory that becomes `artifact_dir(stage, key)` on success.

        An artifact already in place is kept (a concurrent or earlier run made the same one),
        unless `replace` (a forced recomputation) swaps the new one in.
        """
        final = self.artifact_dir(stage, key)
        scratch = final.parent / f".{key}.{uuid.uuid4().hex[:8]}.partial"
        scratch.mkdir(parents=True)
        try:
            yield scratch
            if final.exists() and replace:
                retired = final.parent / f".{key}.{uuid.uuid4().hex[:8]}.retired"
                os.replace(final, retired)
                shutil.rmtree(retired, ignore_errors=True)
            if final.exists():
                shutil.rmtree(scratch)
            else:
                os.replace(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)


def directory_bytes(directory: Path, suffixes: tuple[str, ...] = (".safetensors", ".bin")) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.suffix in suffixes)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
