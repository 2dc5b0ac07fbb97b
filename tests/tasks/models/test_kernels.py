"""Kernel choice: a grid's kernel name resolved to gptqmodel's backend, or refused with one line."""

from __future__ import annotations

import pytest

from qrobust.tasks.config import KERNEL_NAMES, ConfigError
from qrobust.tasks.models.kernels import KERNELS, resolve_kernel, resolve_kernel_for_widths, runnable_kernels


def test_every_kernel_a_grid_may_name_maps_to_a_gptqmodel_backend():
    from gptqmodel.utils.backend import BACKEND

    assert tuple(KERNELS) == KERNEL_NAMES
    assert all(BACKEND(backend) for backend in KERNELS.values())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_picks_a_kernel_that_runs_the_bits_on_this_cpu(bits):
    backend = resolve_kernel("auto", bits, 32, True, "cpu", "bfloat16")
    assert backend in {KERNELS[name] for name in runnable_kernels(bits, 32, True, "cpu", "bfloat16")}


def test_a_gpu_kernel_on_a_cpu_is_refused_naming_the_kernels_that_can_run_there():
    with pytest.raises(ConfigError) as raised:
        resolve_kernel("marlin", 4, 128, True, "cpu", "bfloat16")
    message = str(raised.value)
    assert message.startswith("kernel 'marlin' cannot run 4-bit weights at group size 128 on cpu (")
    assert "requires CUDA" in message and message.endswith("allowed there: torch-aten, torch-fused, torch")
    assert "\n" not in message


def test_a_kernel_without_the_bit_width_is_refused():
    with pytest.raises(ConfigError, match=r"kernel 'torch-aten' cannot run 3-bit weights .* allowed there: torch$"):
        resolve_kernel("torch-aten", 3, 32, True, "cpu", "bfloat16")


def test_an_unknown_kernel_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown kernel 'fast'; allowed: auto, marlin, machete"):
        resolve_kernel("fast", 4, 32, True, "cpu", "bfloat16")


def test_a_mixed_precision_checkpoint_gets_one_kernel_that_runs_all_its_widths():
    assert resolve_kernel("auto", 4, 32, True, "cpu", "bfloat16") == "gptq_torch_aten"
    assert resolve_kernel_for_widths("auto", {2, 4, 8}, 32, True, "cpu", "bfloat16") == "gptq_torch"


def test_a_kernel_that_downloads_code_at_first_use_is_only_chosen_with_a_local_copy(monkeypatch):
    from qrobust.tasks.models.kernels import _works_offline

    monkeypatch.delenv("GPTQMODEL_CUTLASS_DIR", raising=False)
    assert not _works_offline("gptq_machete")
    monkeypatch.setenv("GPTQMODEL_CUTLASS_DIR", "/opt/cutlass")
    assert _works_offline("gptq_machete") and _works_offline("gptq_marlin")
