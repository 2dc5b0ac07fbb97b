"""Typed, frozen configuration of a grid, parsed from TOML.

Every config object is a frozen dataclass; `config_hash` of its canonical JSON is the
cache key of whatever it configures. Bad input raises `ConfigError` with a one-line
message naming the bad value and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


FAMILIES = ("ar", "diffusion")
METHODS = ("fp", "rtn", "gptq", "hawq")
ALLOWED_BITS = (2, 3, 4, 8)
BENCHMARKS = ("humaneval", "mbpp")
DIFFUSION_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
TRACE_ESTIMATORS = ("hutchinson", "fisher", "activation")
TIE_POLICIES = ("none", "qkv", "qkv+gate_up")
SANDBOX_BACKENDS = ("auto", "docker", "bwrap", "none")
PROMPT_STYLES = ("completion", "chat", "coda-instruct")
# How a model's weights are stored: "auto" = a transformers checkpoint (or a tiny model built
# here); "coda" = CoDA's own checkpoint format, converted to a Qwen3 checkpoint (qrobust.tasks.models.coda).
ARCHITECTURES = ("auto", "coda")
# How a quantized checkpoint runs at generation time: gptqmodel's kernels (the speed path) or
# plain linear layers holding exactly the dequantized weights (the accuracy path).
WEIGHT_MODES = ("kernel", "dequantized")
DEFAULT_MAX_NEW_TOKENS = 128


class ConfigError(ValueError):
    """A grid or model configuration is invalid; the message is one line for the user."""


def config_hash(obj: Any) -> str:
    """Content hash of a config (or any JSON-able value): the cache key."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def canonical_json(obj: Any) -> str:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _choice(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def _positive(value: Any, what: str, allow_zero: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return value


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class TinyArchitecture:
    """A Qwen3-architecture model small enough to build, train and quantize on a CPU."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 1024
    init_seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """A model of one family: a tiny one the project builds, or a Hugging Face checkpoint.

    `architecture = "coda"` reads the weights in CoDA's checkpoint format (the hub's, or for a
    tiny model one written in that format) and converts them to Qwen3 (qrobust.tasks.models.coda).
    """

    name: str
    family: str
    hf_id: str | None = None
    tiny: TinyArchitecture | None = None
    mask_token_id: int | None = None
    logits_shift: bool = True
    dtype: str = "float32"
    prompt_style: str = "completion"
    trust_remote_code: bool = False
    training: "TrainingSpec | None" = None
    architecture: str = "auto"

    def __post_init__(self) -> None:
        _choice(self.family, FAMILIES, "model family")
        _choice(self.prompt_style, PROMPT_STYLES, "prompt style")
        _choice(self.architecture, ARCHITECTURES, "architecture")
        if self.architecture == "coda" and self.family != "diffusion":
            raise ConfigError(
                f"model {self.name!r} has architecture 'coda', which needs family 'diffusion', not {self.family!r}"
            )
        if (self.hf_id is None) == (self.tiny is None):
            raise ConfigError(f"model {self.name!r} needs exactly one of hf_id or a tiny architecture")


@dataclass(frozen=True)
class TrainingSpec:
    """Training of a tiny demo model on the prompts and solutions of benchmark problems.

    `max_new_tokens` is the answer region the model is trained to fill; it must equal the
    grid's generation.max_new_tokens (parse_grid checks), and being a field here it is part
    of the trained model's cache key.
    """

    steps: int = 1000
    learning_rate: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    humaneval_problems: int = 20
    mbpp_problems: int = 20
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        _positive(self.steps, "training steps")
        _positive(self.learning_rate, "training learning_rate")
        _positive(self.batch_size, "training batch_size")
        _positive(self.max_new_tokens, "training max_new_tokens")
        _positive(self.humaneval_problems, "training humaneval_problems", allow_zero=True)
        _positive(self.mbpp_problems, "training mbpp_problems", allow_zero=True)
        if self.humaneval_problems + self.mbpp_problems == 0:
            raise ConfigError("training needs at least one problem; set humaneval_problems or mbpp_problems")


BUILTIN_MODELS: dict[str, ModelSpec] = {
    # bfloat16 because gptqmodel's CPU kernels run in half precision: the fp baseline must
    # run in the same dtype as the quantized models it is compared with.
    "tiny-ar": ModelSpec(name="tiny-ar", family="ar", tiny=TinyArchitecture(), dtype="bfloat16"),
    "tiny-diffusion": ModelSpec(name="tiny-diffusion", family="diffusion", tiny=TinyArchitecture(), dtype="bfloat16"),
    # Both real models take CoDA's published instruct prompts (qrobust.tasks.benchmarks), so the pair is
    # compared on identical inputs.
    "qwen3-1.7b": ModelSpec(
        name="qwen3-1.7b", family="ar", hf_id="Qwen/Qwen3-1.7B", dtype="bfloat16", prompt_style="coda-instruct"
    ),
    "coda-1.7b": ModelSpec(
        name="coda-1.7b",
        family="diffusion",
        hf_id="Salesforce/CoDA-v0-Instruct",
        mask_token_id=151669,
        dtype="bfloat16",
        prompt_style="coda-instruct",
        architecture="coda",
    ),
}


# --------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class MethodSpec:
    """One quantization configuration: a column of the grid."""

    name: str
    bits: int | None = None
    budget: float | None = None
    group_size: int = 32
    sym: bool = True
    estimator: str = "hutchinson"
    tie: str = "qkv"
    probes: int = 16
    trace_tolerance: float | None = 0.05

    def __post_init__(self) -> None:
        _choice(self.name, METHODS, "method")
        if self.name in ("rtn", "gptq"):
            if self.bits not in ALLOWED_BITS:
                raise ConfigError(
                    f"bits {self.bits!r} not allowed for {self.name}; allowed: {', '.join(map(str, ALLOWED_BITS))}"
                )
        if self.name == "hawq":
            if self.budget is None or not (min(ALLOWED_BITS) <= self.budget <= max(ALLOWED_BITS)):
                raise ConfigError(
                    f"hawq budget {self.budget!r} must be an average bit-width between {min(ALLOWED_BITS)} and {max(ALLOWED_BITS)}"
                )
            _choice(self.estimator, TRACE_ESTIMATORS, "trace estimator")
            _choice(self.tie, TIE_POLICIES, "tie policy")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size {self.group_size!r} must be a positive integer or -1 (per row)")

    @property
    def label(self) -> str:
        if self.name == "fp":
            return "fp"
        if self.name == "hawq":
            return f"hawq-{self.budget:g}"
        return f"{self.name}-w{self.bits}g{self.group_size}"

    @property
    def quantizes(self) -> bool:
        return self.name != "fp"


# --------------------------------------------------------------------------- benchmarks

@dataclass(frozen=True)
class BenchmarkSpec:
    """Which problems of a benchmark to run; `path` points MBPP at a local JSONL file."""

    name: str
    limit: int | None = None
    task_ids: tuple[str, ...] = ()
    path: str | None = None

    def __post_init__(self) -> None:
        _choice(self.name, BENCHMARKS, "benchmark")
        if self.limit is not None:
            _positive(self.limit, f"{self.name} limit")


# --------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class GenerationSpec:
    """Decoding settings shared by both families; the diffusion sampler adds its own."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 8
    shard_size: int = 8
    # diffusion sampler (CoDA / Dream style; block_length switches to LLaDA-style blocks)
    steps: int = 64
    alg: str = "entropy"
    alg_temp: float | None = None
    eps: float = 1e-3
    block_length: int | None = None
    weights: str = "kernel"

    def __post_init__(self) -> None:
        _choice(self.weights, WEIGHT_MODES, "weights mode")
        _positive(self.max_new_tokens, "max_new_tokens")
        _positive(self.n_samples, "n_samples")
        _positive(self.temperature, "temperature", allow_zero=True)
        _positive(self.steps, "steps")
        _positive(self.shard_size, "shard_size")
        _positive(self.batch_size, "batch_size")
        _choice(self.alg, DIFFUSION_ALGS, "diffusion alg")
        if self.n_samples > 1 and self.temperature == 0:
            raise ConfigError(f"n_samples {self.n_samples} needs temperature > 0 (greedy samples are identical)")


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration inputs for GPTQ and the Hessian: a local corpus or a Hugging Face dataset."""

    source: str = "stdlib"
    n_samples: int = 16
    seq_len: int = 128
    seed: int = 0
    mask_ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    dataset_split: str = "train"
    dataset_text_field: str = "text"

    def __post_init__(self) -> None:
        _positive(self.n_samples, "calibration n_samples")
        _positive(self.seq_len, "calibration seq_len")
        for ratio in self.mask_ratios:
            if not 0 < ratio <= 1:
                raise ConfigError(f"mask ratio {ratio!r} must lie in (0, 1]")


@dataclass(frozen=True)
class SandboxSpec:
    backend: str = "auto"
    timeout_s: float = 10.0
    memory_mb: int = 1024

    def __post_init__(self) -> None:
        _choice(self.backend, SANDBOX_BACKENDS, "sandbox backend")
        _positive(self.timeout_s, "sandbox timeout_s")


GPU_STAGES = ("hessian", "quantize", "generate")


@dataclass(frozen=True)
class ScaleSpec:
    """What each stage asks of a Ray cluster (`qrobust run --runner ray`); other runners ignore it.

    The GPU stages (hessian, quantize, generate) each load a model. `*_gpus` is the share of
    GPUs one run of that stage reserves: 1 = a GPU of its own (one model per GPU), 0.5 = two
    models share a GPU, 2 = two GPUs, 0 = no GPU (it runs on CPU). `worker_retries` is how many
    times Ray reruns a stage whose worker process died (a lost node, an OOM kill).
    """

    hessian_gpus: float = 1
    quantize_gpus: float = 1
    generate_gpus: float = 1
    worker_retries: int = 2

    def __post_init__(self) -> None:
        for stage in GPU_STAGES:
            gpus = _positive(getattr(self, f"{stage}_gpus"), f"scale {stage}_gpus", allow_zero=True)
            if gpus > 1 and gpus != int(gpus):
                raise ConfigError(f"scale {stage}_gpus {gpus!r} must be a whole number when above 1")
        retries = self.worker_retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"scale worker_retries must be a whole number >= 0, got {retries!r}")

    def gpus(self, stage: str) -> float:
        return getattr(self, f"{stage}_gpus") if stage in GPU_STAGES else 0


@dataclass(frozen=True)
class PairSpec:
    """A diffusion model and the AR model it is compared with."""

    diffusion: str
    ar: str


@dataclass(frozen=True)
class GridConfig:
    """A parsed grid. `generation` is the grid's own table; `model_generation` holds, for each
    model whose entry has a `generation` table, that table merged over the grid's."""

    name: str
    models: tuple[ModelSpec, ...]
    methods: tuple[MethodSpec, ...]
    benchmarks: tuple[BenchmarkSpec, ...]
    pairs: tuple[PairSpec, ...] = ()
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    model_generation: tuple[tuple[str, GenerationSpec], ...] = ()
    scale: ScaleSpec = field(default_factory=ScaleSpec)

    def generation_for(self, model: ModelSpec) -> GenerationSpec:
        """The settings `model` generates with: its own table if it has one, else the grid's."""
        return dict(self.model_generation).get(model.name, self.generation)

    def cells(self) -> list["Cell"]:
        return [
            Cell(model=m, method=q, benchmark=b, generation=self.generation_for(m), calibration=self.calibration)
            for m in self.models
            for q in self.methods
            for b in self.benchmarks
        ]


@dataclass(frozen=True)
class Cell:
    """One model x quantization x benchmark run of the grid."""

    model: ModelSpec
    method: MethodSpec
    benchmark: BenchmarkSpec
    generation: GenerationSpec
    calibration: CalibrationSpec

    @property
    def cell_id(self) -> str:
        return config_hash(self)

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.method.label}/{self.benchmark.name}"


# --------------------------------------------------------------------------- parsing

def _build(cls: type, raw: dict, what: str, **extra: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a table, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {what}; allowed: {', '.join(sorted(names))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    values.update(extra)
    try:
        return cls(**values)
    except TypeError as exc:  # a missing required key
        raise ConfigError(f"{what}: {exc}") from None


def _split_model_generation(raw: Any) -> tuple[Any, dict | None]:
    """A model entry without its `generation` table, and that table (None if absent)."""
    if not isinstance(raw, dict) or "generation" not in raw:
        return raw, None
    raw = dict(raw)
    overrides = raw.pop("generation")
    if not isinstance(overrides, dict):
        raise ConfigError(f"generation of model {raw.get('name')!r} must be a table, got {overrides!r}")
    return raw, overrides


def _parse_model(raw: Any) -> ModelSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"a model entry needs a name, got {raw!r}")
    raw = dict(raw)
    name = raw["name"]
    base = BUILTIN_MODELS.get(name)
    if base is None and "hf_id" not in raw and "tiny" not in raw:
        raise ConfigError(
            f"unknown model {name!r}; allowed: {', '.join(BUILTIN_MODELS)} or a table with hf_id and family"
        )
    if "tiny" in raw:
        raw["tiny"] = _build(TinyArchitecture, raw["tiny"], f"model {name!r} tiny")
    if "training" in raw:
        raw["training"] = _build(TrainingSpec, raw["training"], f"model {name!r} training")
    if base is not None:
        merged = dataclasses.asdict(base)
        merged["tiny"] = base.tiny
        merged["training"] = base.training
        merged.update(raw)
        raw = merged
    return _build(ModelSpec, raw, f"model {name!r}")


def _parse_methods(raw: Any) -> list[MethodSpec]:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"a method entry needs a name, got {raw!r}")
    raw = dict(raw)
    _choice(raw["name"], METHODS, "method")
    bits_list = raw.pop("bits", None)
    budgets = raw.pop("budgets", None)
    if raw["name"] in ("rtn", "gptq"):
        if bits_list is None:
            raise ConfigError(f"method {raw['name']} needs bits = [...]; allowed: {', '.join(map(str, ALLOWED_BITS))}")
        bits_list = bits_list if isinstance(bits_list, list) else [bits_list]
        return [_build(MethodSpec, {**raw, "bits": b}, f"method {raw['name']}") for b in bits_list]
    if raw["name"] == "hawq":
        if budgets is None:
            raise ConfigError("method hawq needs budgets = [...] (average bits, e.g. [2.5, 3.5])")
        budgets = budgets if isinstance(budgets, list) else [budgets]
        return [_build(MethodSpec, {**raw, "budget": float(b)}, "method hawq") for b in budgets]
    if bits_list is not None or budgets is not None:
        raise ConfigError("method fp takes no bits or budgets")
    return [_build(MethodSpec, raw, "method fp")]


def parse_grid(text: str, name: str = "grid") -> GridConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed grid TOML: {exc}") from None
    allowed = {"name", "models", "methods", "benchmarks", "pairs", "generation", "calibration", "sandbox", "scale"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in grid; allowed: {', '.join(sorted(allowed))}")
    for key in ("models", "methods", "benchmarks"):
        if not raw.get(key):
            raise ConfigError(f"grid has no {key}; add at least one [[{key}]] entry")
    entries = [_split_model_generation(m) for m in raw["models"]]
    models = tuple(_parse_model(entry) for entry, _ in entries)
    methods = tuple(m for entry in raw["methods"] for m in _parse_methods(entry))
    benchmarks = tuple(_build(BenchmarkSpec, b, "benchmark") for b in raw["benchmarks"])
    pairs = tuple(_build(PairSpec, p, "pair") for p in raw.get("pairs", []))
    model_families = {m.name: m.family for m in models}
    for pair in pairs:
        for role, family in (("diffusion", "diffusion"), ("ar", "ar")):
            member = getattr(pair, role)
            if model_families.get(member) != family:
                raise ConfigError(f"pair member {member!r} must be a {family} model of this grid")
    grid_generation = raw.get("generation", {})
    generation = _build(GenerationSpec, grid_generation, "generation")
    model_generation = tuple(
        (model.name, _build(GenerationSpec, {**grid_generation, **overrides}, f"model {model.name!r} generation"))
        for model, (_, overrides) in zip(models, entries)
        if overrides is not None
    )
    _unique(models, "model", key=lambda m: m.name)
    for model in models:
        _check_training_matches_generation(model, dict(model_generation).get(model.name, generation))
    return GridConfig(
        name=raw.get("name", name),
        models=models,
        methods=_unique(methods, "method"),
        benchmarks=benchmarks,
        pairs=pairs,
        generation=generation,
        calibration=_build(CalibrationSpec, raw.get("calibration", {}), "calibration"),
        sandbox=_build(SandboxSpec, raw.get("sandbox", {}), "sandbox"),
        model_generation=model_generation,
        scale=_build(ScaleSpec, raw.get("scale", {}), "scale"),
    )


def _check_training_matches_generation(model: ModelSpec, generation: GenerationSpec) -> None:
    """A trained model fills exactly the answer region it was trained on."""
    if model.training is not None and model.training.max_new_tokens != generation.max_new_tokens:
        raise ConfigError(
            f"model {model.name!r} training.max_new_tokens {model.training.max_new_tokens} differs from "
            f"its generation max_new_tokens {generation.max_new_tokens}; set them equal"
        )


def _unique(items: tuple, what: str, key=lambda item: item.label) -> tuple:
    seen: set[str] = set()
    for item in items:
        if key(item) in seen:
            raise ConfigError(f"duplicate {what} {key(item)!r} in grid")
        seen.add(key(item))
    return items


def bundled_grids() -> list[str]:
    from qrobust.tasks.runtime.bundled import data_path

    return sorted(p.stem for p in data_path("grids").glob("*.toml"))


def load_grid(path_or_name: str | None) -> GridConfig:
    """Load a grid from a TOML path, or a bundled grid by name (default: `tiny`)."""
    name = path_or_name or "tiny"
    path = Path(name)
    if not path.suffix and not path.exists():
        from qrobust.tasks.runtime.bundled import data_path

        path = data_path(f"grids/{name}.toml")
        if not path.exists():
            raise ConfigError(f"unknown grid {name!r}; bundled: {', '.join(bundled_grids())}, or a path to a .toml file")
    if not path.exists():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    return parse_grid(path.read_text(), name=path.stem)
