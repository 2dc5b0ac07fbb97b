"""The workspace: where artifacts, the store, cached task results and reports live.

Artifacts are directories named by the cache key of the work that produced them. A
directory is written under a temporary name and renamed into place only when complete, so
a run killed at any moment leaves either a whole artifact or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike | None) -> "Workspace":
        root = Path(path or os.environ.get("QROBUST_WORKSPACE", "qrobust-workspace")).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def store_path(self) -> Path:
        return self.root / "results.duckdb"

    @property
    def prefect_results(self) -> Path:
        return self.root / "cache"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        path = self.root / "logs"
        path.mkdir(exist_ok=True)
        return path

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    @contextlib.contextmanager
    def new_artifact(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a scratch directory that becomes `artifact_dir(stage, key)` on success."""
        final = self.artifact_dir(stage, key)
        scratch = final.parent / f".{key}.{uuid.uuid4().hex[:8]}.partial"
        scratch.mkdir(parents=True)
        try:
            yield scratch
            if final.exists():  # a concurrent or earlier run finished the same work
                shutil.rmtree(scratch)
            else:
                os.replace(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict) -> dict:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def artifact_exists(manifest: dict | None) -> bool:
    """Whether the artifact a (possibly cached) manifest points to is still on disk."""
    if not manifest or "path" not in manifest:
        return False
    return (Path(manifest["path"]) / MANIFEST).exists()


def directory_bytes(directory: Path, suffixes: tuple[str, ...] = (".safetensors", ".bin")) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.suffix in suffixes)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
