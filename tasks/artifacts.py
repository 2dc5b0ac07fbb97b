"""Typed hand-offs between stages: artifact manifests, and the records the store is given.

Every stage returns one frozen `Artifact`: a small manifest (counts, sizes, settings that later
stages need), never a tensor or a model. Its files live in the workspace at
`artifacts/<stage>/<key>/`, written by the stage that owns their format; the manifest itself is
`manifest.json` there, as JSON. Reading a manifest builds the dataclass again, so a field that
is missing, misspelt or of another stage fails at once (`ArtifactUnreadable`) and the cache
treats the artifact as absent.

`run` is how this run obtained the artifact (computed or read from cache, where, how long): it
is recorded in `stage_events` and never written into the manifest or any cache key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

MANIFEST = "manifest.json"
FULL_PRECISION_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


class ArtifactUnreadable(ValueError):
    """A manifest file that does not parse as the artifact it should be."""


@dataclass(frozen=True)
class RunInfo:
    """How one run obtained an artifact; recorded, never hashed."""

    cached: bool
    seconds: float
    started_at: float  # unix time
    placement: dict | None = None  # the Ray node, worker pid, resources and GPU ids, when on Ray


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A stage's result: `key` names it; `stage` (per class) says whose it is."""

    stage: ClassVar[str]
    key: str
    run: RunInfo | None = field(default=None, compare=False, repr=False)

    def directory(self, workspace) -> Path:
        return workspace.artifact_dir(self.stage, self.key)

    def to_json(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}
        return {"type": type(self).__name__, "stage": self.stage, "fields": fields}

    @classmethod
    def from_json(cls, data: Any) -> "Artifact":
        try:
            if data["type"] != cls.__name__ or data["stage"] != cls.stage:
                raise ArtifactUnreadable(f"holds a {data['type']} of stage {data['stage']!r}, not a {cls.__name__}")
            return cls(**data["fields"])
        except ArtifactUnreadable:
            raise
        except (KeyError, TypeError) as exc:
            raise ArtifactUnreadable(f"is not a {cls.__name__} manifest ({exc})") from None

    def with_run(self, run: RunInfo) -> "Artifact":
        return dataclasses.replace(self, run=run)


def write_manifest(directory: Path, artifact: Artifact) -> None:
    (directory / MANIFEST).write_text(json.dumps(artifact.to_json(), indent=1, sort_keys=True))


def read_manifest(directory: Path, kind: type[Artifact]) -> Artifact:
    """The artifact in `directory`; FileNotFoundError when there is none, ArtifactUnreadable when
    its manifest is not valid JSON of that kind (a half-written or planted file)."""
    text = (directory / MANIFEST).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactUnreadable(f"is not JSON ({exc.msg})") from None
    return kind.from_json(data)


# --------------------------------------------------------------------------- models

@dataclass(frozen=True, kw_only=True)
class Checkpoint(Artifact):
    """Weights a later stage can load, and how to run them."""

    name: str
    family: str
    dtype: str
    mask_token_id: int | None
    logits_shift: bool
    trust_remote_code: bool
    model_bytes: int | None

    quantized: ClassVar[bool] = False

    def location(self, workspace) -> str:
        """Where the weights are: a workspace directory, or a hub id resolved on the user's machine."""
        return str(self.directory(workspace))

    @property
    def avg_bits(self) -> float:
        return float(FULL_PRECISION_BITS.get(self.dtype, 16))

    @property
    def quantize_seconds(self) -> float:
        return 0.0

    @property
    def module_bits(self) -> dict[str, int]:
        return {}


@dataclass(frozen=True, kw_only=True)
class PreparedModel(Checkpoint):
    """A model's full-precision checkpoint: built (tiny models, trained or not), converted (CoDA) or
    named on the hub (`hf_id`, when no local copy is made)."""

    stage: ClassVar[str] = "prepare-model"
    hf_id: str | None = None
    training: dict | None = None  # the training run's statistics, for pipeline-trained tiny models
    conversion: dict | None = None  # what a native conversion did (source, family, mask id, shift)
    parameters: int | None = None  # counted in the saved weights (None for a model named on the hub)

    def location(self, workspace) -> str:
        return self.hf_id or super().location(workspace)


@dataclass(frozen=True, kw_only=True)
class QuantizedCheckpoint(Checkpoint):
    """A quantized checkpoint in GPTQ format, saved as a user would serve it."""

    stage: ClassVar[str] = "quantize"
    quantized: ClassVar[bool] = True
    method: str  # the method's label
    weight_bits: float  # parameter-weighted mean over the quantized modules
    layer_bits: dict[str, int]  # read back from the saved tensors
    seconds: dict[str, float]  # load / quantize (packing included) / save
    allocated_bits: dict[str, int] | None = None
    environment: dict | None = None  # where it was quantized (tasks.runtime.provenance)

    @property
    def avg_bits(self) -> float:
        return self.weight_bits

    @property
    def quantize_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def module_bits(self) -> dict[str, int]:
        return self.layer_bits


# --------------------------------------------------------------------------- calibration and HAWQ

@dataclass(frozen=True, kw_only=True)
class CalibrationSet(Artifact):
    stage: ClassVar[str] = "calibration"
    family: str
    n_samples: int
    seq_len: int
    source: str
    masked: bool  # diffusion inputs masked at the configured ratios


@dataclass(frozen=True, kw_only=True)
class LayerTraces(Artifact):
    stage: ClassVar[str] = "hessian"
    estimator: str
    seconds: float
    device: str


@dataclass(frozen=True, kw_only=True)
class BitAllocation(Artifact):
    stage: ClassVar[str] = "allocation"
    bits: dict[str, int]
    default_bits: int
    dynamic: dict[str, dict]  # gptqmodel's per-module overrides
    avg_bits: float
    sensitivity: dict[str, dict[str, float]]


# --------------------------------------------------------------------------- generation and execution

@dataclass(frozen=True, kw_only=True)
class GeneratedShard(Artifact):
    stage: ClassVar[str] = "generate"
    task_ids: tuple[str, ...]
    n_records: int
    gen_seconds: float
    gen_tokens: int
    peak_mem_bytes: int
    model_bytes: int | None
    device: str
    environment: dict | None = None  # where the answers were generated (tasks.runtime.provenance)
    kernel: str = "dense"  # the kernel classes the quantized layers ran on; "dequantized"; "dense" for fp
    warmup_seconds: float = 0.0  # loading (kernel builds) and a first batch, kept out of gen_seconds
    batch_size: int = 0
    model_tokens: int = 0  # tokens through the decoder backbone while generating (work done)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_ids", tuple(self.task_ids))  # JSON gives a list


@dataclass(frozen=True, kw_only=True)
class JudgedShard(Artifact):
    stage: ClassVar[str] = "execute"
    backend: str
    counts: dict[str, int]
    fallback_reason: str | None = None  # why `auto` did not pick the first backend


@dataclass(frozen=True, kw_only=True)
class Report(Artifact):
    stage: ClassVar[str] = "report"
    files: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))


# --------------------------------------------------------------------------- what the store is given

@dataclass(frozen=True)
class SampleRecord:
    """One judged answer: a row of `samples`."""

    task_id: str
    sample_idx: int
    completion: str
    passed: bool
    status: str
    error: str | None
    gen_seconds: float
    exec_seconds: float


@dataclass(frozen=True)
class CellResult:
    """A finished cell's summary: a row of `results`."""

    avg_bits: float | None
    n_problems: int
    n_samples: int
    pass_at_1: float
    model_bytes: int | None
    peak_mem_bytes: int | None
    gen_tokens_per_s: float | None
    gen_seconds: float
    quantize_seconds: float | None
    warmup_seconds: float | None = None
    kernel: str | None = None
