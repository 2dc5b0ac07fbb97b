"""Grids from TOML: the bundled ones by name, any other by path.

Parsing is the only place that turns names into objects: a model name into its preset
(`tasks.presets`), a method name into its registered class (`tasks.methods`). Bad input raises
`ConfigError` with a one-line message naming the bad value and the allowed ones.

A model generates with, from weakest to strongest: the grid's `[generation]`, its preset's
published settings (its `ModelCard`: every benchmark, then the benchmark's own), its entry's
`[models.generation]`, and that table's per-benchmark tables (`[models.generation.mbpp]`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from qrobust.tasks.config import (
    BENCHMARKS,
    BenchmarkSpec,
    CalibrationSpec,
    ConfigError,
    GenerationSpec,
    GridConfig,
    ModelSpec,
    PairSpec,
    PublishedScore,
    SandboxSpec,
    ScaleSpec,
    TinyArchitecture,
    TrainingSpec,
    build_config,
)
from qrobust.tasks.methods import parse_method_entry
from qrobust.tasks.presets import BUILTIN_MODELS, KNOWN_INPUT_WIDTHS, MODEL_CARDS, PUBLISHED_SCORES
from qrobust.tasks.runtime.bundled import data_path


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
        raw["tiny"] = build_config(TinyArchitecture, raw["tiny"], f"model {name!r} tiny")
    if "training" in raw:
        raw["training"] = build_config(TrainingSpec, raw["training"], f"model {name!r} training")
    if base is not None:
        merged = dataclasses.asdict(base)
        merged["tiny"] = base.tiny
        merged["training"] = base.training
        merged.update(raw)
        raw = merged
    return build_config(ModelSpec, raw, f"model {name!r}")


def parse_grid(text: str, name: str = "grid") -> GridConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed grid TOML: {exc}") from None
    allowed = {"name", "models", "methods", "benchmarks", "pairs", "generation", "calibration", "sandbox", "scale",
               "published"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in grid; allowed: {', '.join(sorted(allowed))}")
    for key in ("models", "methods", "benchmarks"):
        if not raw.get(key):
            raise ConfigError(f"grid has no {key}; add at least one [[{key}]] entry")
    entries = [_split_model_generation(m) for m in raw["models"]]
    models = tuple(_parse_model(entry) for entry, _ in entries)
    methods = tuple(m for entry in raw["methods"] for m in parse_method_entry(entry))
    benchmarks = tuple(build_config(BenchmarkSpec, b, "benchmark") for b in raw["benchmarks"])
    pairs = tuple(build_config(PairSpec, p, "pair") for p in raw.get("pairs", []))
    model_families = {m.name: m.family for m in models}
    for pair in pairs:
        for role, family in (("diffusion", "diffusion"), ("ar", "ar")):
            member = getattr(pair, role)
            if model_families.get(member) != family:
                raise ConfigError(f"pair member {member!r} must be a {family} model of this grid")
    grid_generation = raw.get("generation", {})
    generation = build_config(GenerationSpec, grid_generation, "generation")
    _unique(models, "model", key=lambda m: m.name)
    calibration = build_config(CalibrationSpec, raw.get("calibration", {}), "calibration")
    model_generation, benchmark_generation = [], []
    for model, (_, overrides) in zip(models, entries):
        own, benchmark_tables = _split_benchmark_tables(overrides, model.name)
        card = MODEL_CARDS.get(model.name)
        published = card.generation if card else {}
        what = f"model {model.name!r} generation"
        if card is not None or overrides is not None:
            model_generation.append(
                (model.name, build_config(GenerationSpec, {**grid_generation, **published, **own}, what)))
        for benchmark_name in sorted({b.name for b in benchmarks}):
            published_here = card.benchmark_generation.get(benchmark_name, {}) if card else {}
            if published_here or benchmark_name in benchmark_tables:
                values = {**grid_generation, **published, **published_here, **own,
                          **benchmark_tables.get(benchmark_name, {})}
                benchmark_generation.append((model.name, benchmark_name,
                                             build_config(GenerationSpec, values, f"{what} for {benchmark_name}")))
    for model in models:
        widths = input_widths(model)
        for method in methods if widths else ():
            method.check_input_widths(widths, model.name)
        settings = [dict(model_generation).get(model.name, generation)]
        settings += [specific for model_name, _, specific in benchmark_generation if model_name == model.name]
        for model_settings in settings:
            _check_training_matches_generation(model, model_settings)
            _check_harness_fits_family(model, model_settings)
        _check_curvature_loss_has_masks(model, methods, calibration)
    return GridConfig(
        name=raw.get("name", name),
        models=models,
        methods=_unique(methods, "method"),
        benchmarks=benchmarks,
        pairs=pairs,
        generation=generation,
        calibration=calibration,
        sandbox=build_config(SandboxSpec, raw.get("sandbox", {}), "sandbox"),
        model_generation=tuple(model_generation),
        scale=build_config(ScaleSpec, raw.get("scale", {}), "scale"),
        published=_published_scores(models, raw.get("published", [])),
        benchmark_generation=tuple(benchmark_generation),
    )


def input_widths(model: ModelSpec) -> tuple[int, ...] | None:
    """The input widths of a model's quantized layers, when known without loading it."""
    if model.tiny is not None:
        arch = model.tiny
        return (arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.intermediate_size)
    return KNOWN_INPUT_WIDTHS.get(model.hf_id)


def _published_scores(models: tuple[ModelSpec, ...], entries: Any) -> tuple[PublishedScore, ...]:
    """The presets' published scores of the grid's models, then the grid's own `[[published]]`
    entries (which replace a preset's score of the same model and benchmark)."""
    if not isinstance(entries, list):
        raise ConfigError(f"published must be a list of [[published]] tables, got {entries!r}")
    names = {m.name for m in models}
    scores = {(s.model, s.benchmark): s for name in names for s in PUBLISHED_SCORES.get(name, ())}
    for entry in entries:
        score = build_config(PublishedScore, entry, "published score")
        if score.model not in names:
            raise ConfigError(f"published score names model {score.model!r}, which is not in the grid")
        scores[(score.model, score.benchmark)] = score
    return tuple(sorted(scores.values(), key=lambda s: (s.model, s.benchmark)))


def _check_harness_fits_family(model: ModelSpec, generation: GenerationSpec) -> None:
    """The published harness is CoDA's diffusion harness, run in bf16; an AR model has none to reproduce."""
    if generation.harness != "coda-published":
        return
    if model.family != "diffusion":
        raise ConfigError(
            f"harness 'coda-published' reproduces CoDA's diffusion evaluation; model {model.name!r} is "
            f"{model.family!r}: give it harness = 'row-independent'"
        )
    if model.dtype != "bfloat16":
        raise ConfigError(f"harness 'coda-published' runs the model in bfloat16 as the harness does; "
                          f"model {model.name!r} has dtype {model.dtype!r}")


def _check_curvature_loss_has_masks(model: ModelSpec, methods: tuple, calibration: CalibrationSpec) -> None:
    """A diffusion model's curvature loss is the masked-denoising loss on masked calibration inputs."""
    if model.family != "diffusion" or calibration.mask_ratios:
        return
    curvature = sorted({m.name for m in methods if m.needs_curvature})
    if curvature:
        raise ConfigError(
            f"method {curvature[0]!r} on diffusion model {model.name!r} needs calibration mask_ratios (its loss "
            f"is the masked-denoising loss); mask_ratios = [] calibrates on clean text, for GPTQ-style methods only"
        )



def _split_benchmark_tables(overrides: dict | None, model: str) -> tuple[dict, dict[str, dict]]:
    """A model's generation table without its per-benchmark tables, and those tables by benchmark."""
    own, tables = {}, {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            if key not in BENCHMARKS:
                raise ConfigError(
                    f"unknown benchmark table {key!r} in model {model!r} generation; allowed: {', '.join(BENCHMARKS)}"
                )
            tables[key] = value
        else:
            own[key] = value
    return own, tables


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
    return sorted(p.stem for p in data_path("grids").glob("*.toml"))


def load_grid(path_or_name: str | None) -> GridConfig:
    """Load a grid from a TOML path, or a bundled grid by name (default: `tiny`)."""
    name = path_or_name or "tiny"
    path = Path(name)
    if not path.suffix and not path.exists():
        path = data_path(f"grids/{name}.toml")
        if not path.exists():
            raise ConfigError(f"unknown grid {name!r}; bundled: {', '.join(bundled_grids())}, or a path to a .toml file")
    if not path.exists():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    return parse_grid(path.read_text(), name=path.stem)


def with_local_models(grid: GridConfig, directory: str) -> tuple[GridConfig, list[str]]:
    """`grid` with every hub model that has a folder `directory/<model name>` loaded from there
    (offline GPU nodes, random-weight checkpoints at real configurations); returns the models moved."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--models-from {directory!r} is not a directory")
    moved, models = [], []
    for model in grid.models:
        local = root / model.name
        if model.hf_id is not None and local.is_dir():
            models.append(dataclasses.replace(model, hf_id=str(local.resolve())))
            moved.append(model.name)
        else:
            models.append(model)
    if not moved:
        hub = [m.name for m in grid.models if m.hf_id is not None]
        raise ConfigError(f"--models-from {directory!r} holds no folder named after a hub model of the grid; "
                          f"expected one of: {', '.join(hub) or '(the grid has no hub models)'}")
    return dataclasses.replace(grid, models=tuple(models)), moved
