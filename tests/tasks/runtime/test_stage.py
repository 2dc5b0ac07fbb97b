"""The stage cache: one layer, keyed by inputs, code and library versions; JSON manifests only."""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from typing import ClassVar

import pytest

from qrobust.tasks.artifacts import Artifact, ArtifactUnreadable, read_manifest
from qrobust.tasks.runtime.stage import ArtifactRef, Stage, key_material
from qrobust.tasks.runtime.workspace import Workspace

CALLS: list[int] = []


@dataclass(frozen=True, kw_only=True)
class Doubled(Artifact):
    stage: ClassVar[str] = "double"
    value: int


def double(context, number: int) -> Doubled:
    CALLS.append(number)
    (context.directory / "value.txt").write_text(str(2 * number))
    return Doubled(key=context.key, value=2 * number)


DOUBLE = Stage("double", double, Doubled, libraries=("duckdb",))


@pytest.fixture
def workspace(tmp_path):
    CALLS.clear()
    return Workspace.at(tmp_path)


def test_a_second_run_reads_the_artifact_instead_of_computing(workspace):
    first = DOUBLE.run(workspace, (21,))
    second = DOUBLE.run(workspace, (21,))
    assert (first.value, first.run.cached, second.run.cached) == (42, False, True)
    assert first == second and CALLS == [21]


def test_other_inputs_make_another_key(workspace):
    assert DOUBLE.key((1,)) != DOUBLE.key((2,))
    DOUBLE.run(workspace, (1,))
    DOUBLE.run(workspace, (2,))
    assert CALLS == [1, 2]


def test_the_key_covers_the_library_versions(monkeypatch):
    import qrobust.tasks.runtime.stage as stage_module

    before = DOUBLE.key((1,))
    monkeypatch.setattr(stage_module, "library_versions", lambda names: {name: "9.9.9" for name in names})
    assert DOUBLE.key((1,)) != before


def test_an_upstream_artifact_enters_a_key_by_its_key_alone(workspace):
    artifact = DOUBLE.run(workspace, (3,))
    assert key_material(artifact) == key_material(ArtifactRef("double", artifact.key))
    moved = dataclasses.replace(artifact, value=99)  # what a manifest says besides its key is not an input
    assert key_material(moved) == key_material(artifact)


def test_a_forced_recomputation_replaces_the_artifact(workspace):
    DOUBLE.run(workspace, (5,))
    again = DOUBLE.run(workspace, (5,), recompute=True)
    assert not again.run.cached and CALLS == [5, 5]
    assert (again.directory(workspace) / "value.txt").read_text() == "10"


@pytest.mark.parametrize("damage", ["not json at all {", json.dumps({"type": "Doubled", "stage": "double",
                                                                        "fields": {"key": "k", "valu": 1}})])
def test_a_damaged_manifest_is_a_miss_recomputed_with_a_warning(workspace, damage, caplog):
    artifact = DOUBLE.run(workspace, (7,))
    (artifact.directory(workspace) / "manifest.json").write_text(damage)
    with caplog.at_level("WARNING", logger="qrobust.cache"):
        again = DOUBLE.run(workspace, (7,))
    assert not again.run.cached and again.value == 14 and CALLS == [7, 7]
    assert "ignoring unreadable double artifact" in caplog.text
    assert read_manifest(artifact.directory(workspace), Doubled).value == 14


def test_a_planted_pickle_in_the_workspace_is_never_loaded(workspace, tmp_path):
    canary = tmp_path / "canary"

    class Plant:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    artifact = DOUBLE.run(workspace, (8,))
    (artifact.directory(workspace) / "manifest.json").write_bytes(pickle.dumps(Plant()))
    for cache_file in ("cache/anything", "cache/" + artifact.key):
        (workspace.root / cache_file).parent.mkdir(parents=True, exist_ok=True)
        (workspace.root / cache_file).write_bytes(pickle.dumps(Plant()))
    again = DOUBLE.run(workspace, (8,))
    assert not canary.exists()
    assert not again.run.cached and again.value == 16


def test_a_misspelt_field_fails_where_the_manifest_is_made():
    with pytest.raises(TypeError):
        Doubled(key="k", valu=1)
    with pytest.raises(ArtifactUnreadable, match="is not a Doubled manifest"):
        Doubled.from_json({"type": "Doubled", "stage": "double", "fields": {"key": "k"}})


def test_a_stage_that_returns_another_key_is_refused(workspace):
    liar = Stage("double", lambda context, n: Doubled(key="wrong", value=n), Doubled)
    with pytest.raises(TypeError, match="not a Doubled keyed"):
        liar.run(workspace, (1,))
    assert not any(p for p in (workspace.root / "artifacts" / "double").iterdir() if not p.name.startswith("."))
