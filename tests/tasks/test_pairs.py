"""What each declared pair holds equal, from the models' cards, the grid and their checkpoints."""

import dataclasses

from qrobust.tasks.grid_file import load_grid, parse_grid
from qrobust.tasks.pairs import ATTRIBUTES, pair_facts


def _facts(grid, diffusion: str, prepared=None) -> dict:
    return {f.attribute: f for f in pair_facts(grid, prepared) if f.diffusion_model == diffusion}


def test_every_pair_gets_every_attribute_in_order():
    facts = pair_facts(load_grid("pairs"))
    assert len(facts) == 4 * len(ATTRIBUTES)
    assert [f.attribute for f in facts[:len(ATTRIBUTES)]] == list(ATTRIBUTES)
    assert [f.attribute_order for f in facts[:len(ATTRIBUTES)]] == list(range(len(ATTRIBUTES)))


def test_a_pair_adapted_from_one_backbone_holds_its_size_tokenizer_and_prompts_equal():
    facts = _facts(load_grid("pairs"), "dream-7b")
    assert {a: facts[a].verdict for a in ATTRIBUTES} == {
        "backbone": "same", "parameters": "same", "tokenizer": "same", "prompt format": "same",
        "max new tokens": "same", "evaluation settings": "each as published"}
    assert facts["backbone"].diffusion_value == "Qwen2.5-7B"


def test_llada_trained_from_scratch_differs_from_its_size_matched_twin():
    facts = _facts(load_grid("pairs"), "llada-8b")
    assert [a for a in ATTRIBUTES if facts[a].verdict == "differs"] == ["backbone", "parameters", "tokenizer"]
    assert facts["backbone"].diffusion_value == "trained from scratch"


def test_prompts_other_than_the_authors_are_noted_without_changing_the_verdict():
    facts = _facts(load_grid("pairs"), "llada-8b")
    assert facts["prompt format"].diffusion_value == "coda-instruct (authors evaluated with: OpenCompass humaneval_gen_8e312c / mbpp_gen)"
    assert facts["prompt format"].verdict == "same"


def test_an_answer_length_the_twin_cannot_share_with_both_partners_is_reported():
    facts = _facts(load_grid("pairs"), "diffucoder-7b")
    assert facts["max new tokens"].verdict == "differs"
    assert (facts["max new tokens"].diffusion_value, facts["max new tokens"].ar_value) == (
        "humaneval 256, mbpp 256", "humaneval 512, mbpp 512")


def test_settings_changed_from_the_published_ones_are_named():
    grid = parse_grid('[[models]]\nname = "dream-7b"\n[models.generation]\nsteps = 64\n[[models]]\nname = "qwen2.5-7b"\n'
                      '[[pairs]]\ndiffusion = "dream-7b"\nar = "qwen2.5-7b"\n[[methods]]\nname = "fp"\n'
                      '[[benchmarks]]\nname = "humaneval"\n')
    fact = _facts(grid, "dream-7b")["evaluation settings"]
    assert fact.verdict == "not as published"
    assert fact.diffusion_value.endswith(": humaneval steps")


def test_a_model_without_a_card_has_its_parameters_counted_in_its_prepared_checkpoint():
    from qrobust.tasks.artifacts import PreparedModel

    grid = load_grid("pairs-tiny")
    prepared = {name: PreparedModel(key=name, name=name, family="ar", dtype="float32", mask_token_id=None,
                                    logits_shift=True, trust_remote_code=False, model_bytes=1, parameters=count)
                for name, count in (("tiny-dream", 1000), ("tiny-twin", 1000))}
    facts = _facts(grid, "tiny-dream", prepared)
    assert (facts["parameters"].diffusion_value, facts["parameters"].verdict) == ("1,000", "same")
    assert _facts(grid, "tiny-llada", prepared)["parameters"].verdict == "unknown"
    assert facts["evaluation settings"].verdict == "unknown"


def test_a_pair_member_outside_a_partial_grid_keeps_its_cards_facts():
    grid = load_grid("pairs")
    partial = dataclasses.replace(grid, models=tuple(m for m in grid.models if m.name != "qwen2.5-7b"))
    facts = _facts(partial, "dream-7b")
    assert facts["backbone"].verdict == "same"
    assert facts["max new tokens"].ar_value is None and facts["max new tokens"].verdict == "unknown"
