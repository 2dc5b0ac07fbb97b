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


def test_the_calibration_set_is_stored_as_tensors_not_as_a_pickle(tiny_models, stdlib_calibration, shared_workspace):
    calibration = STAGE.run(shared_workspace, (stdlib_calibration, tiny_models["tiny-ar"]))
    files = sorted(p.name for p in calibration.directory(shared_workspace).iterdir())
    assert files == ["calibration.safetensors", "manifest.json"]


def test_mask_ratios_cycle_over_samples():
    assert mask_ratio_per_sample(CalibrationSpec(n_samples=5, mask_ratios=(0.2, 0.4))) == [0.2, 0.4, 0.2, 0.4, 0.2]
