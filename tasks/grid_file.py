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
    SandboxSpec,
    ScaleSpec,
    TinyArchitecture,
    TrainingSpec,
    build_config,
)
from qrobust.tasks.methods import parse_method_entry
from qrobust.tasks.presets import BUILTIN_MODELS, MODEL_CARDS
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
    allowed = {"name", "models", "methods", "benchmarks", "pairs", "generation", "calibration", "sandbox", "scale"}
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
    model_generation, benchmark_generation = [], []
    for model, (_, overrides) in zip(models, entries):
        own, benchmark_tables = _split_benchmark_tables(overrides, model.name)
        card = MODEL_CARDS.get(model.name)
        published = card.generation if card else {}
        what = f"model {model.name!r} generation"
        if card is not None or overrides is not None:
            model_generation.append(
                (model.name, build_config(GenerationSpec, {**grid_generation, **published, **own}, what)))
        for name in sorted({b.name for b in benchmarks}):
            published_here = card.benchmark_generation.get(name, {}) if card else {}
            if published_here or name in benchmark_tables:
                values = {**grid_generation, **published, **published_here, **own, **benchmark_tables.get(name, {})}
                benchmark_generation.append((model.name, name, build_config(GenerationSpec, values, f"{what} for {name}")))
    for model in models:
        _check_training_matches_generation(model, dict(model_generation).get(model.name, generation))
        for name, benchmark, specific in benchmark_generation:
            if name == model.name:
                _check_training_matches_generation(model, specific)
    return GridConfig(
        name=raw.get("name", name),
        models=models,
        methods=_unique(methods, "method"),
        benchmarks=benchmarks,
        pairs=pairs,
        generation=generation,
        calibration=build_config(CalibrationSpec, raw.get("calibration", {}), "calibration"),
        sandbox=build_config(SandboxSpec, raw.get("sandbox", {}), "sandbox"),
        model_generation=tuple(model_generation),
        scale=build_config(ScaleSpec, raw.get("scale", {}), "scale"),
        benchmark_generation=tuple(benchmark_generation),
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
