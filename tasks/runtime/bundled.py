"""Files shipped with the package: bundled grids, benchmark samples, the sandbox image's build files.

A checkout keeps `data/` and `docker/` at the repository's top level, beside `tasks/`; a wheel
installs them as `qrobust/data` and `qrobust/docker`, again beside `tasks/`. Either way they are
found next to the `tasks` package, so a wheel installed anywhere finds its own copy. Grids name
bundled files as `data/...`.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_PREFIX = "data/"
# tasks/runtime/bundled.py -> the folder holding tasks/, data/ and docker/
_ROOT = Path(__file__).resolve().parents[2]


def data_path(relative: str) -> Path:
    """A bundled data file or folder, e.g. `data_path("grids/tiny.toml")`."""
    return _ROOT / "data" / relative


def docker_path(relative: str = "") -> Path:
    """A bundled file of the sandbox image's build, e.g. `docker_path("build_sandbox_image.sh")`."""
    return _ROOT / "docker" / relative


def resolve_data_file(path: str) -> Path | None:
    """`path` as given when it exists, else the bundled file it names (`data/benchmarks/x.jsonl`)."""
    if Path(path).exists():
        return Path(path)
    bundled = data_path(path[len(BUNDLED_PREFIX):]) if path.startswith(BUNDLED_PREFIX) else None
    return bundled if bundled is not None and bundled.exists() else None
