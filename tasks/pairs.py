"""What each declared pair holds equal: the facts a reader needs to weigh a pair's claim verdict.

A claim that a diffusion model degrades less than its AR partner is about the objective only
if the two differ in nothing else. For every `[[pairs]]` entry this module sets the two models
side by side on the facts that decide that: where their training started (backbone), their
size, tokenizer, prompt format, answer length, and whether each runs with its authors' published
evaluation settings. Facts come from the models' cards (`tasks.presets.MODEL_CARDS`), from the
grid itself (prompt style, generation settings), and for models built here from their spec and
their prepared checkpoint (parameters counted in the saved weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.config import GridConfig, ModelSpec, canonical

SAME, DIFFERS, UNKNOWN = "same", "differs", "unknown"
AS_PUBLISHED, NOT_AS_PUBLISHED = "each as published", "not as published"
ATTRIBUTES = ("backbone", "parameters", "tokenizer", "prompt format", "max new tokens", "evaluation settings")


@dataclass(frozen=True)
class PairFact:
    """One attribute of one declared pair: each side's value and whether they match."""

    diffusion_model: str
    ar_model: str
    attribute: str
    diffusion_value: str | None
    ar_value: str | None
    verdict: str
    attribute_order: int  # the attribute's place in ATTRIBUTES, so tables list them alike


def pair_facts(grid: GridConfig, prepared: dict | None = None) -> list[PairFact]:
    """The facts of every pair the grid declares; `prepared` maps model names to their
    prepare-model artifacts where they exist (for parameters counted in the saved weights)."""
    prepared = prepared or {}
    facts = []
    for pair in grid.pairs:
        sides = [_model_facts(grid, _spec(grid, name), prepared.get(name)) for name in (pair.diffusion, pair.ar)]
        for order, attribute in enumerate(ATTRIBUTES):
            diffusion_value, ar_value = (side[attribute] for side in sides)
            if attribute == "evaluation settings":
                verdict = _published_verdict(sides)
            elif attribute == "prompt format":  # the prompts run, not the notes on what the authors ran
                verdict = _verdict(*(side["prompt style"] for side in sides))
            else:
                verdict = _verdict(diffusion_value, ar_value)
            facts.append(PairFact(pair.diffusion, pair.ar, attribute, diffusion_value, ar_value, verdict, order))
    return facts


def _spec(grid: GridConfig, name: str) -> ModelSpec | None:
    from qrobust.tasks.presets import BUILTIN_MODELS

    return next((m for m in grid.models if m.name == name), BUILTIN_MODELS.get(name))


def _verdict(left: str | None, right: str | None) -> str:
    if left is None or right is None:
        return UNKNOWN
    return SAME if left == right else DIFFERS


def _published_verdict(sides: list[dict]) -> str:
    flags = [side["as published"] for side in sides]
    if None in flags:
        return UNKNOWN
    return AS_PUBLISHED if all(flags) else NOT_AS_PUBLISHED


def _model_facts(grid: GridConfig, spec: ModelSpec | None, prepared) -> dict:
    from qrobust.tasks.presets import MODEL_CARDS

    unknown = {attribute: None for attribute in ATTRIBUTES} | {"as published": None, "prompt style": None}
    if spec is None:
        return unknown
    card = MODEL_CARDS.get(spec.name)
    facts = dict(unknown)
    facts["prompt format"] = facts["prompt style"] = spec.prompt_style
    benchmarks = sorted({b.name: b for b in grid.benchmarks}.items())
    if spec in grid.models:
        facts["max new tokens"] = ", ".join(
            f"{name} {grid.generation_for(spec, benchmark).max_new_tokens}" for name, benchmark in benchmarks)
    counted = getattr(prepared, "parameters", None)
    if card is not None:
        facts["backbone"], facts["tokenizer"] = card.backbone, card.tokenizer
        facts["parameters"] = f"{card.parameters:,}"
        if card.evaluation_prompts and card.evaluation_prompts != spec.prompt_style:
            facts["prompt format"] = f"{spec.prompt_style} (authors evaluated with: {card.evaluation_prompts})"
        if spec in grid.models:
            changed = _changed_from_published(grid, spec, card, benchmarks)
            facts["as published"] = not changed
            facts["evaluation settings"] = (f"as published ({card.evaluation_source})" if not changed else
                                            f"changed from published ({card.evaluation_source}): {', '.join(changed)}")
    elif spec.tiny is not None:
        origin = "Qwen3" if spec.architecture == "auto" else f"{spec.architecture} format"
        facts["backbone"] = f"tiny {origin}, random initialisation (seed {spec.tiny.init_seed})"
        facts["tokenizer"] = f"qrobust tiny BPE ({spec.tiny.vocab_size}-token base vocabulary)"
        facts["evaluation settings"] = "none published"
    if counted is not None and card is None:
        facts["parameters"] = f"{counted:,}"
    return facts


def _changed_from_published(grid: GridConfig, spec: ModelSpec, card, benchmarks) -> list[str]:
    """The settings a grid runs a model with that differ from its card's, as 'benchmark key'."""
    changed = []
    for name, benchmark in benchmarks:
        generation = grid.generation_for(spec, benchmark)
        for key, value in card.generation_for(name).items():
            if canonical(getattr(generation, key)) != canonical(value):
                changed.append(f"{name} {key}")
    return changed
