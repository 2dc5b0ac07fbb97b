"""The method registry: each method declared once; the flow asks methods what they need."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qrobust.tasks.config import ConfigError
from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.methods import REGISTRY, method_class, parse_method_entry
from tests.conftest import REPO_ROOT

GRID = """
[[models]]
name = "tiny-ar"
[[methods]]
name = "fp"
[[methods]]
name = "gptaq"
bits = [3, 4]
alpha = 0.5
[[benchmarks]]
name = "humaneval"
limit = 1
"""


def test_a_registered_method_is_parsed_from_a_grid_with_its_own_settings():
    grid = parse_grid(GRID)
    assert [m.label for m in grid.methods] == ["fp", "gptaq-w3g32", "gptaq-w4g32"]
    gptaq = grid.methods[1]
    assert (gptaq.alpha, gptaq.needs_calibration, gptaq.needs_curvature, gptaq.quantizes) == (0.5, True, False, True)


@pytest.mark.parametrize("entry, message", [
    ({"name": "gptaq", "bits": [4], "alpha": 2.0}, "gptaq alpha 2.0 must be a number in [0, 1]"),
    ({"name": "gptaq", "bits": [4], "budget": 3}, "unknown key 'budget' in method gptaq; allowed: alpha, bits, "
                                                  "group_size, sym"),
    ({"name": "gptaq"}, "method gptaq needs bits = [...]; allowed: 2, 3, 4, 8"),
    ({"name": "hawq", "budgets": [3], "estimator": "exact"}, "unknown trace estimator 'exact'"),
    ({"name": "fp", "bits": [4]}, "method fp takes no settings"),
])
def test_bad_method_settings_are_one_line_errors_naming_what_is_allowed(entry, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_method_entry(entry)


def test_methods_with_the_same_settings_are_different_cells():
    grid = parse_grid(GRID.replace('name = "gptaq"\nbits = [3, 4]\nalpha = 0.5',
                                   'name = "gptq"\nbits = [4]\n[[methods]]\nname = "rtn"\nbits = [4]'))
    assert len({cell.cell_id for cell in grid.cells()}) == 3


def test_every_registered_method_declares_what_the_flow_and_report_ask_of_it():
    for name in REGISTRY:
        cls = method_class(name)
        assert cls.name == name and cls.report_name and len(cls.plot_style) == 2
        if cls.needs_curvature:
            assert cls.compared_with in REGISTRY


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_the_flow_names_no_method():
    for path in sorted((REPO_ROOT / "flows").glob("*.py")):
        assert not _string_constants(path) & set(REGISTRY), f"{path.name} names a method"


def test_only_the_method_modules_build_gptqmodel_configurations():
    builders = {"QuantizeConfig", "RTNConfig", "GPTQConfig", "GPTAQConfig"}
    for path in sorted((REPO_ROOT / "tasks").rglob("*.py")):
        if path.parent.name == "methods":
            continue
        names = {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
        assert not names & builders, f"{path.relative_to(REPO_ROOT)} configures gptqmodel itself"
