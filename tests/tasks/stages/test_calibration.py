import dataclasses

import torch

from qrobust.tasks.config import CalibrationSpec
from qrobust.tasks.stages import prepare_model
from qrobust.tasks.stages.calibration import STAGE, load_calibration, mask_ratio_per_sample


def test_calibration_windows_have_the_configured_shape_and_are_deterministic(tiny_grid, tmp_path):
    from qrobust.tasks.runtime.workspace import Workspace

    spec = CalibrationSpec(n_samples=6, seq_len=32, seed=3)
    model_spec = dataclasses.replace(tiny_grid.models[0], training=None)
    tensors = []
    for name in ("a", "b"):
        workspace = Workspace.at(tmp_path / name)
        model = prepare_model.STAGE.run(workspace, (model_spec,))
        tensors.append(load_calibration(STAGE.run(workspace, (spec, model)), workspace))
    first, second = tensors
    assert first["input_ids"].shape == (6, 32)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert "masked_input_ids" not in first


def test_diffusion_calibration_is_masked_at_varied_ratios(tiny_models, shared_workspace):
    spec = CalibrationSpec(n_samples=40, seq_len=64, mask_ratios=(0.1, 0.9))
    model = tiny_models["tiny-diffusion"]
    tensors = load_calibration(STAGE.run(shared_workspace, (spec, model)), shared_workspace)
    masked = tensors["masked_input_ids"] == model.mask_token_id
    assert torch.equal(masked, tensors["masked_positions"])
    fraction = masked.float().mean(dim=1)
    low, high = fraction[0::2].mean().item(), fraction[1::2].mean().item()
    assert abs(low - 0.1) < 0.05 and abs(high - 0.9) < 0.05
    clean = tensors["input_ids"]
    assert torch.equal(tensors["masked_input_ids"][~masked], clean[~masked])


def test_diffusion_calibration_is_the_same_while_another_thread_loads_a_bfloat16_model(tiny_models, shared_workspace):
    """torch's default dtype is process-wide: a model loading in bfloat16 on another thread sets it
    for a while. The masks and ratios must not change with it."""
    spec = CalibrationSpec(n_samples=8, seq_len=32)
    model = tiny_models["tiny-diffusion"]
    built = []
    for default in (torch.float32, torch.bfloat16):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            calibration = STAGE.run(shared_workspace, (spec, model), recompute=True)
            built.append(load_calibration(calibration, shared_workspace))
        finally:
            torch.set_default_dtype(previous)
    first, second = built
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


def test_the_calibration_set_is_stored_as_tensors_not_as_a_pickle(tiny_models, stdlib_calibration, shared_workspace):
    calibration = STAGE.run(shared_workspace, (stdlib_calibration, tiny_models["tiny-ar"]))
    files = sorted(p.name for p in calibration.directory(shared_workspace).iterdir())
    assert files == ["calibration.safetensors", "manifest.json"]


def test_mask_ratios_cycle_over_samples():
    assert mask_ratio_per_sample(CalibrationSpec(n_samples=5, mask_ratios=(0.2, 0.4))) == [0.2, 0.4, 0.2, 0.4, 0.2]


WIKITEXT2 = dict(source="wikitext2", path="data/calibration/wikitext2_sample.txt")


def test_wikitext2_text_is_the_first_thousand_rows_joined_with_empty_rows_as_space_newline():
    from qrobust.tasks.stages.calibration import wikitext2_rows, wikitext2_text

    rows = wikitext2_rows(WIKITEXT2["path"])
    assert rows[0] == "" and rows[1] == " = Harbour Lights of the Northern Coast = \n"
    assert wikitext2_text(rows).startswith(" \n = Harbour Lights of the Northern Coast = \n \n The harbour")
    assert wikitext2_text(["a\n"] * 1200) == "a\n" * 1000


def test_a_diffusion_model_calibrated_on_wikitext2_without_mask_ratios_sees_clean_text(tiny_models, shared_workspace):
    spec = CalibrationSpec(n_samples=4, seq_len=32, mask_ratios=(), **WIKITEXT2)
    model = tiny_models["tiny-diffusion"]
    calibration = STAGE.run(shared_workspace, (spec, model))
    tensors = load_calibration(calibration, shared_workspace)
    assert not calibration.masked and "masked_input_ids" not in tensors
    assert not (tensors["input_ids"] == model.mask_token_id).any()
    from qrobust.tasks.stages.calibration import gptq_calibration_examples

    examples = gptq_calibration_examples(calibration, shared_workspace)
    assert [e["input_ids"] for e in examples] == tensors["input_ids"].tolist()


def test_the_same_wikitext2_spec_with_mask_ratios_masks_the_diffusion_models_inputs(tiny_models, shared_workspace):
    spec = CalibrationSpec(n_samples=4, seq_len=32, mask_ratios=(0.5,), **WIKITEXT2)
    calibration = STAGE.run(shared_workspace, (spec, tiny_models["tiny-diffusion"]))
    assert calibration.masked and "masked_input_ids" in load_calibration(calibration, shared_workspace)
