import torch

from qrobust.tasks.stages.calibration import build_calibration, load_calibration, mask_ratio_per_sample
from qrobust.tasks.config import CalibrationSpec


def test_calibration_windows_have_the_configured_shape_and_are_deterministic(tiny_models, tmp_path):
    from qrobust.tasks.runtime.workspace import Workspace

    spec = CalibrationSpec(n_samples=6, seq_len=32, seed=3)
    first = load_calibration(build_calibration(spec, tiny_models["tiny-ar"], Workspace.at(tmp_path / "a")))
    second = load_calibration(build_calibration(spec, tiny_models["tiny-ar"], Workspace.at(tmp_path / "b")))
    assert first["input_ids"].shape == (6, 32)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert "masked_input_ids" not in first


def test_diffusion_calibration_is_masked_at_varied_ratios(tiny_models, shared_workspace):
    spec = CalibrationSpec(n_samples=40, seq_len=64, mask_ratios=(0.1, 0.9))
    manifest = tiny_models["tiny-diffusion"]
    tensors = load_calibration(build_calibration(spec, manifest, shared_workspace))
    masked = tensors["masked_input_ids"] == manifest["mask_token_id"]
    assert torch.equal(masked, tensors["masked_positions"])
    fraction = masked.float().mean(dim=1)
    low, high = fraction[0::2].mean().item(), fraction[1::2].mean().item()
    assert abs(low - 0.1) < 0.05 and abs(high - 0.9) < 0.05
    clean = tensors["input_ids"]
    assert torch.equal(tensors["masked_input_ids"][~masked], clean[~masked])


def test_mask_ratios_cycle_over_samples():
    assert mask_ratio_per_sample(CalibrationSpec(n_samples=5, mask_ratios=(0.2, 0.4))) == [0.2, 0.4, 0.2, 0.4, 0.2]
