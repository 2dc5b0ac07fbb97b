from qrobust.tasks.artifacts import CellResult, SampleRecord
from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.storage.store import connect, write_cell

GRID = """
[[models]]
name = "tiny-ar"
[[methods]]
name = "fp"
[[benchmarks]]
name = "humaneval"
limit = 2
"""


def _sample(task_id, passed):
    return SampleRecord(task_id=task_id, sample_idx=0, completion="x", passed=passed,
                        status="passed" if passed else "failed", error=None, gen_seconds=0.1, exec_seconds=0.2)


def _result(pass_at_1):
    return CellResult(avg_bits=16.0, n_problems=2, n_samples=1, pass_at_1=pass_at_1, model_bytes=10,
                      peak_mem_bytes=20, gen_tokens_per_s=5.0, gen_seconds=1.0, quantize_seconds=0.0)


def test_writing_a_cell_twice_replaces_its_rows(tmp_path):
    cell = parse_grid(GRID).cells()[0]
    record = {"config": {"x": 1}, "status": "done", "sandbox": "docker"}
    with connect(tmp_path / "s.duckdb") as con:
        write_cell(con, cell, record, [_sample("A", True), _sample("B", False)], _result(0.5))
        write_cell(con, cell, record, [_sample("A", True), _sample("B", True)], _result(1.0))
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 2
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        assert con.execute("SELECT pass_at_1 FROM results").fetchone()[0] == 1.0
        assert con.execute("SELECT sandbox FROM samples LIMIT 1").fetchone()[0] == "docker"


def test_a_failed_cell_keeps_its_error_and_no_results(tmp_path):
    cell = parse_grid(GRID).cells()[0]
    with connect(tmp_path / "s.duckdb") as con:
        write_cell(con, cell, {"config": {}, "status": "done"}, [_sample("A", True)], _result(1.0))
        write_cell(con, cell, {"config": {}, "status": "failed", "error": "boom"}, [], None)
        assert con.execute("SELECT status, error FROM runs").fetchone() == ("failed", "boom")
        assert con.execute("SELECT count(*) FROM results").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 0


def test_runs_and_results_say_which_harness_generated_the_cell(tmp_path):
    grid = parse_grid(GRID.replace("tiny-ar", "tiny-diffusion")
                      + '[generation]\nharness = "coda-published"\nbatch_size = 32\nshard_size = 32\n')
    cell = grid.cells()[0]
    with connect(tmp_path / "s.duckdb") as con:
        write_cell(con, cell, {"config": {}, "status": "done"}, [_sample("A", True)], _result(1.0))
        assert con.execute("SELECT harness FROM runs").fetchone()[0] == "coda-published"
        assert con.execute("SELECT harness FROM results").fetchone()[0] == "coda-published"


def test_a_grids_published_scores_replace_only_its_own_models_rows(tmp_path):
    from qrobust.tasks.config import PublishedScore
    from qrobust.tasks.storage.store import write_published_scores

    with connect(tmp_path / "s.duckdb") as con:
        write_published_scores(con, [PublishedScore("a", "mbpp", 0.4, "x"), PublishedScore("b", "mbpp", 0.3, "y")])
        write_published_scores(con, [PublishedScore("a", "humaneval", 0.5, "z")])
        rows = con.execute("SELECT model, benchmark, pass_at_1, source FROM published_scores ORDER BY ALL").fetchall()
    assert rows == [("a", "humaneval", 0.5, "z"), ("b", "mbpp", 0.3, "y")]


def test_pair_facts_of_a_run_replace_those_of_the_one_before(tmp_path):
    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.pairs import pair_facts
    from qrobust.tasks.storage.store import write_pair_matching

    facts = pair_facts(load_grid("pairs"))
    with connect(tmp_path / "s.duckdb") as con:
        write_pair_matching(con, facts)
        write_pair_matching(con, [f for f in facts if f.diffusion_model == "llada-8b"])
        rows = con.execute("SELECT diffusion_model, attribute, verdict FROM pair_matching ORDER BY attribute_order").fetchall()
    assert [row[0] for row in rows] == ["llada-8b"] * 6
    assert rows[0][1:] == ("backbone", "differs")


def test_a_store_written_before_the_pair_facts_existed_still_has_a_digest(tmp_path):
    import duckdb

    from qrobust.tasks.storage.store import SCHEMA, content_digest

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    con.execute("DROP TABLE pair_matching")
    con.close()
    with connect(path, read_only=True) as old:
        assert len(content_digest(old)) == 20
