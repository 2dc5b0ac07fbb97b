import re

import pytest

from qrobust.tasks.config import ConfigError
from qrobust.tasks.grid_file import load_grid, parse_grid

MINIMAL = """
[[models]]
name = "tiny-ar"
[[methods]]
name = "gptq"
bits = [4]
[[benchmarks]]
name = "humaneval"
limit = 2
"""


def test_bundled_tiny_grid_expands_to_every_model_method_benchmark_cell():
    grid = load_grid("tiny")
    assert len(grid.cells()) == len(grid.models) * len(grid.methods) * len(grid.benchmarks)
    assert {m.label for m in grid.methods} >= {"fp", "rtn-w4g32", "gptq-w2g32", "gptq-w8g32"}


def test_cell_id_is_stable_and_changes_with_any_setting():
    first = parse_grid(MINIMAL).cells()[0]
    again = parse_grid(MINIMAL).cells()[0]
    other = parse_grid(MINIMAL.replace("limit = 2", "limit = 3")).cells()[0]
    assert first.cell_id == again.cell_id
    assert first.cell_id != other.cell_id


@pytest.mark.parametrize(
    "text, fragment",
    [
        (MINIMAL.replace("bits = [4]", "bits = [5]"), "bits 5 not allowed for gptq; allowed: 2, 3, 4, 8"),
        (MINIMAL.replace('"tiny-ar"', '"gpt-17"'), "unknown model 'gpt-17'"),
        (MINIMAL.replace('name = "gptq"', 'name = "awq"'), "unknown method 'awq'; allowed: fp, rtn, gptq, gptaq, hawq"),
        (MINIMAL.replace('"humaneval"', '"apps"'), "unknown benchmark 'apps'; allowed: humaneval, mbpp"),
        (MINIMAL + "\n[generation]\nalg = 'best'\n", "unknown diffusion alg 'best'"),
        (MINIMAL + "\n[generation]\nsteps = 0\n", "steps must be a positive number, got 0"),
        (MINIMAL + "\n[generation]\nmax_new_tokens = 64\nblock_length = 512\n",
         "max_new_tokens 64 must be a multiple of block_length 512"),
        (MINIMAL + "\n[generation]\nmax_new_tokens = 64\nblock_length = 16\nsteps = 6\n",
         "steps 6 must be a multiple of the number of blocks 4"),
        ("shards = 3\n" + MINIMAL, "unknown key 'shards' in grid"),
        (MINIMAL + "shards = 3\n", "unknown key 'shards' in benchmark; allowed: limit, name, path, task_ids"),
        ("[[models]\nname=", "malformed grid TOML"),
    ],
)
def test_bad_input_gives_one_line_message_naming_the_value(text, fragment):
    with pytest.raises(ConfigError) as error:
        parse_grid(text)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_hawq_needs_budgets_in_range():
    text = MINIMAL.replace('name = "gptq"\nbits = [4]', 'name = "hawq"\nbudgets = [9]')
    with pytest.raises(ConfigError, match="hawq budget 9 must be"):
        parse_grid(text)


def test_pairs_must_name_models_of_the_right_family():
    text = MINIMAL + '\n[[pairs]]\ndiffusion = "tiny-ar"\nar = "tiny-ar"\n'
    with pytest.raises(ConfigError, match="must be a diffusion model"):
        parse_grid(text)


def test_unknown_grid_name_lists_bundled_grids():
    with pytest.raises(ConfigError, match="bundled: .*tiny"):
        load_grid("no-such-grid")


def test_a_group_size_that_does_not_divide_a_layer_width_is_refused_when_the_grid_is_read():
    grid = ('[[models]]\nname = "qwen3-1.7b"\n[[methods]]\nname = "gptq"\nbits = [4]\ngroup_size = 33\n'
            '[[benchmarks]]\nname = "humaneval"\n')
    with pytest.raises(ConfigError, match="group_size 33 does not divide the layer input width 2048 of model "
                                          "'qwen3-1.7b'; allowed: -1 .per row. or a divisor of 2048, 6144"):
        parse_grid(grid)
    assert parse_grid(grid.replace("33", "128")).methods[0].group_size == 128


def test_a_tiny_models_widths_are_checked_too():
    grid = ('[[models]]\nname = "tiny-ar"\n[[methods]]\nname = "rtn"\nbits = [4]\ngroup_size = 48\n'
            '[[benchmarks]]\nname = "humaneval"\n')
    with pytest.raises(ConfigError, match="group_size 48 does not divide the layer input width 64"):
        parse_grid(grid)


def test_kernel_and_batch_size_settings_are_validated():
    base = '[[models]]\nname = "tiny-ar"\n[[methods]]\nname = "fp"\n[[benchmarks]]\nname = "humaneval"\n'
    with pytest.raises(ConfigError, match="unknown kernel 'fastest'; allowed: auto, marlin"):
        parse_grid(base + '[generation]\nkernel = "fastest"\n')
    with pytest.raises(ConfigError, match="batch_size 'many' must be a positive integer or 'auto'"):
        parse_grid(base + '[generation]\nbatch_size = "many"\n')
    assert parse_grid(base + '[generation]\nbatch_size = "auto"\n').generation.batch_size == "auto"


def test_models_from_a_directory_replace_the_hub_ids_of_the_models_found_there(tmp_path):
    from qrobust.tasks.grid_file import load_grid, with_local_models

    (tmp_path / "coda-1.7b").mkdir()
    grid, moved = with_local_models(load_grid("paper"), str(tmp_path))
    assert moved == ["coda-1.7b"]
    models = {m.name: m.hf_id for m in grid.models}
    assert models == {"coda-1.7b": str((tmp_path / "coda-1.7b").resolve()), "qwen3-1.7b": "Qwen/Qwen3-1.7B"}
    with pytest.raises(ConfigError, match="holds no folder named after a hub model of the grid; expected one of: "
                                          "coda-1.7b, qwen3-1.7b"):
        with_local_models(load_grid("paper"), str(tmp_path / "coda-1.7b"))


# --------------------------------------------------------------------------- harness, calibration, published scores

GRID = '[[models]]\nname = "tiny-diffusion"\n[[methods]]\nname = "fp"\n[[benchmarks]]\nname = "humaneval"\n'


def test_the_published_harness_needs_batches_of_32_that_shards_hold_whole():
    from qrobust.tasks.config import ConfigError, GenerationSpec

    with pytest.raises(ConfigError, match="harness 'coda-published' runs batches of 32, got batch_size 8"):
        GenerationSpec(harness="coda-published")
    with pytest.raises(ConfigError, match="shard_size 40 to be a multiple of batch_size 32"):
        GenerationSpec(harness="coda-published", batch_size=32, shard_size=40)
    with pytest.raises(ConfigError, match="unknown harness 'dream'"):
        GenerationSpec(harness="dream")


def test_the_published_harness_is_refused_for_an_ar_model_and_outside_bf16():
    published = '[generation]\nharness = "coda-published"\nbatch_size = 32\nshard_size = 32\n'
    with pytest.raises(ConfigError, match="model 'tiny-ar' is 'ar'"):
        parse_grid(GRID.replace("tiny-diffusion", "tiny-ar") + published)
    with pytest.raises(ConfigError, match="runs the model in bfloat16 .* has dtype 'float32'"):
        parse_grid(GRID.replace('"tiny-diffusion"', '"tiny-diffusion"\ndtype = "float32"') + published)


def test_a_model_under_the_published_harness_is_judged_at_its_3_second_timeout():
    grid = parse_grid(GRID + '[models.generation]\nharness = "coda-published"\nbatch_size = 32\nshard_size = 32\n'
                      '[[models]]\nname = "tiny-ar"\n[sandbox]\ntimeout_s = 10\n')
    diffusion, ar = grid.models
    assert grid.sandbox_for(diffusion).timeout_s == 3.0 and grid.sandbox_for(ar).timeout_s == 10


def test_hawq_on_a_diffusion_model_needs_masked_calibration():
    hawq = '[[methods]]\nname = "hawq"\nbudgets = [3.0]\n[calibration]\nmask_ratios = []\n'
    with pytest.raises(ConfigError, match="method 'hawq' on diffusion model 'tiny-diffusion' needs calibration"):
        parse_grid(GRID + hawq)
    assert parse_grid(GRID.replace("tiny-diffusion", "tiny-ar") + hawq).calibration.mask_ratios == ()


def test_a_calibration_path_is_only_for_wikitext2():
    with pytest.raises(ConfigError, match="calibration path 'x.txt' is read only by source 'wikitext2'"):
        parse_grid(GRID + '[calibration]\npath = "x.txt"\n')


def test_the_study_models_carry_their_published_scores_and_a_grid_may_add_its_own():
    grid = load_grid("paper")
    scores = {(s.model, s.benchmark): s.pass_at_1 for s in grid.published}
    assert scores[("coda-1.7b", "humaneval")] == 0.543 and scores[("coda-1.7b", "mbpp-plus")] == 0.632
    assert scores[("qwen3-1.7b", "humaneval-plus")] == 0.616 and scores[("qwen3-1.7b", "mbpp")] == 0.462
    own = parse_grid(GRID + '[[published]]\nmodel = "tiny-diffusion"\nbenchmark = "humaneval"\n'
                            'pass_at_1 = 0.5\nsource = "our notes"\n').published
    assert [(s.model, s.benchmark, s.pass_at_1, s.source) for s in own] == [
        ("tiny-diffusion", "humaneval", 0.5, "our notes")]


@pytest.mark.parametrize("entry, fragment", [
    ('model = "nobody"\nbenchmark = "mbpp"\npass_at_1 = 0.5\nsource = "x"', "model 'nobody', which is not in the grid"),
    ('model = "tiny-diffusion"\nbenchmark = "mbpp"\npass_at_1 = 47.2\nsource = "x"', "must be a fraction in [0, 1]"),
    ('model = "tiny-diffusion"\nbenchmark = "apps"\npass_at_1 = 0.5\nsource = "x"', "unknown benchmark of a published"),
])
def test_a_bad_published_score_names_the_bad_value(entry, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_grid(GRID + "[[published]]\n" + entry + "\n")


def test_a_grid_without_a_name_takes_the_one_it_is_given():
    text = ('[[models]]\nname="tiny-ar"\n[[methods]]\nname="fp"\n[[benchmarks]]\nname="humaneval"\n'
            '[[benchmarks]]\nname="mbpp"\npath="x.jsonl"\n')
    assert parse_grid(text, name="from-the-file-name").name == "from-the-file-name"
    assert parse_grid('name = "mine"\n' + text, name="from-the-file-name").name == "mine"


def test_hawq_probes_too_few_to_judge_the_trace_tolerance_are_refused():
    text = ('[[models]]\nname="tiny-ar"\n[[methods]]\nname="hawq"\nbudgets=[3.0]\nprobes=4\n'
            '[[benchmarks]]\nname="humaneval"\n')
    with pytest.raises(ConfigError, match="hawq probes 4 is below 8, the fewest that judge trace_tolerance"):
        parse_grid(text)
    parse_grid(text.replace("probes=4", "probes=8"))
