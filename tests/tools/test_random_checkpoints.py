"""Random-weight checkpoints at given shapes load through the pipeline's own loaders, with every
row of the real vocabulary and the real mask id."""

from __future__ import annotations

import json

import pytest

from qrobust.tools.random_checkpoints import REAL_SHAPES, RealShape, main, write_random_checkpoint

VOCAB = 3000  # past the 1024-token tokenizer, as a real vocabulary is


def small(family: str, mask_token_id: int | None) -> RealShape:
    return RealShape(family, "x/y", 64, 128, 1, 4, 2, 16, VOCAB, 512, mask_token_id)


def test_a_qwen3_checkpoint_loads_with_the_real_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = write_random_checkpoint(small("qwen3", None), tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert model.config.tie_word_embeddings and model.dtype.is_floating_point
    assert len(AutoTokenizer.from_pretrained(directory)) < VOCAB


@pytest.mark.parametrize("family", ["coda", "dream", "llada"])
def test_a_diffusion_checkpoint_converts_with_its_real_mask_id(tmp_path, family):
    import importlib

    from safetensors import safe_open

    directory = write_random_checkpoint(small(family, VOCAB - 7), tmp_path / family)
    assert json.loads((directory / "config.json").read_text())["mask_token_id"] == VOCAB - 7
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes == {"BF16"}
    convert = getattr(importlib.import_module(f"qrobust.tasks.models.{family}"), f"convert_{family}_checkpoint")
    marker = convert(directory, tmp_path / "converted", "bfloat16", VOCAB - 7)
    assert marker["mask_token_id"] == VOCAB - 7
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert model.get_input_embeddings().weight.shape[0] == VOCAB


def test_the_real_shapes_cover_the_grids_hub_models_they_name():
    from qrobust.tasks.presets import BUILTIN_MODELS

    for name, shape in REAL_SHAPES.items():
        preset = BUILTIN_MODELS[name]
        assert preset.hf_id == shape.hub_id
        assert preset.mask_token_id == shape.mask_token_id


def test_an_unknown_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--models", "gpt-5"])
    assert "unknown model 'gpt-5'; allowed: qwen3-1.7b" in capsys.readouterr().err
