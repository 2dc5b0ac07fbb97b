"""Where a number came from: the software and machine a stage computed it with.

A stage that makes a result (quantization, generation) records this in its artifact; the store
keeps each distinct record once (`environments`) and every cell names the environment of its
generation, so a reader can tell a code change from a machine change. None of it enters a cache
key: it describes a result, it does not decide which result is wanted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from pathlib import Path

from qrobust.tasks.runtime.fingerprint import library_versions

RECORDED_LIBRARIES = ("torch", "transformers", "gptqmodel", "prefect", "duckdb")


def environment(device: str, dtype: str) -> dict:
    """The software, device and numeric settings computing on `device` in `dtype` right now."""
    import torch

    return {
        "qrobust": _qrobust_version(),
        "git_commit": checkout_commit(),
        **library_versions(("python", *RECORDED_LIBRARIES)),
        "device": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "platform": platform.platform(terse=True),
    }


def environment_id(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_model()


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _qrobust_version() -> str:
    from qrobust import __version__

    return __version__


@functools.lru_cache(maxsize=1)
def checkout_commit() -> str | None:
    """The git commit of the source checkout qrobust runs from (with "+dirty" when it has local
    changes); None for an installed wheel."""
    import qrobust

    root = Path(qrobust.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit[:12]}+dirty" if dirty else commit[:12]
