"""The process environment models run in: library settings, dtypes, the device, quiet libraries."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# gptqmodel and transformers read these when first imported, so every entry point (the command
# line, the Python API, every stage run, the tests) sets them before anything imports them.
LIBRARY_ENVIRONMENT = {
    "GPTQMODEL_CPU_WORKERS": "2",
    "GPTQMODEL_DISABLE_PACK_EXT": "1",
    "TORCHDYNAMO_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def set_library_environment() -> None:
    """Environment gptqmodel and transformers need on a small CPU machine; user values win."""
    for key, value in LIBRARY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def library_output_to(log_path: Path):
    """Send everything third-party libraries print (at the fd level) to a log file."""
    import sys

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
