"""The GPU benchmark's pieces on CPU with a tiny model: arithmetic, model building, the
measurement functions and the resumable runner."""

import json
import math

import pytest
import torch

from qrobust.tools import gpu_speed as speed
from qrobust.tools.gpu_speed import BenchSettings, ModelShape, Runner, Unit

TINY = speed.TINY_SHAPE
SETTINGS = speed.TINY_SETTINGS
MASK_ID = TINY.vocab - 1
# one layer, two heads of width 2 sharing one KV head, so every count below is done by hand
HAND = ModelShape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_hand_shape_counts_every_linear_weight():
    # q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8, down 8x4
    assert HAND.layer_linear_params == 16 + 8 + 8 + 16 + 32 + 32 + 32
    # embedding 40 + lm_head 40 + linears 144 + norms (4 + 4 + 2 + 2) + final norm 4
    assert HAND.params == 240


def test_forward_flops_of_a_bidirectional_pass_match_a_hand_count():
    # linears 2*144*3 = 864, lm_head 2*40*3 = 240, attention 4 * (2*2) * 3*3 = 144
    assert speed.forward_flops(HAND, batch=1, seq_len=3, causal=False) == 864 + 240 + 144


def test_causal_attention_counts_only_the_lower_triangle_and_logits_can_be_cut():
    # 6 of the 9 query/key pairs; lm_head on one position: 2*40
    assert speed.forward_flops(HAND, batch=2, seq_len=3, causal=True, logit_positions=1) == 2 * (864 + 80 + 96)


def test_gptq_linear_bytes_match_a_hand_count():
    # 4 bits: qweight 8x64 int32 = 2048, qzeros 2x8 int32 = 64, scales 2x64 fp16 = 256, g_idx 64 int32 = 256
    assert speed.gptq_linear_bytes(64, 64, bits=4, group_size=32) == 2048 + 64 + 256 + 256
    # 3 bits: qweight 6x64 int32 = 1536, qzeros 2x6 int32 = 48
    assert speed.gptq_linear_bytes(64, 64, bits=3, group_size=32) == 1536 + 48 + 256 + 256


def test_bf16_checkpoint_bytes_are_two_per_parameter():
    assert speed.checkpoint_bytes(HAND, bits=None, group_size=32) == 480


def test_bandwidth_floor_and_extrapolation_arithmetic():
    assert speed.bandwidth_floor_seconds(3_000_000_000, 3e12) == pytest.approx(1e-3)
    assert speed.extrapolate_linearly(2, 10.0, 4, 16.0, 28) == pytest.approx(88.0)
    assert speed.hessian_probe_cost(1, 3.0, 3, 7.0) == {"per_batch_s": 2.0, "per_probe_overhead_s": 1.0}


def test_diffusion_forward_passes_skip_steps_that_commit_nothing():
    # 4 tokens in 4 steps commit 0, 1, 1, 2: the first step runs no forward pass
    assert speed.diffusion_forward_passes(4, 4, "entropy") == 3


def test_built_bf16_model_has_the_shape_and_the_predicted_checkpoint_bytes():
    model = speed.build_random_model(TINY, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == TINY.params
    assert speed.state_dict_bytes(model) == speed.checkpoint_bytes(TINY, None, 32)


@pytest.mark.parametrize("bits", [3, 8])
def test_gptq_kernels_replace_every_decoder_linear_with_the_predicted_bytes(bits):
    model = speed.build_random_model(TINY, "cpu")
    kernel = speed.replace_linears_with_gptq(model, bits, 32, "gptq_torch", "cpu")
    assert kernel == "TorchLinear"
    assert speed.state_dict_bytes(model) == speed.checkpoint_bytes(TINY, bits, 32)
    speed.finish_gptq_kernels(model)
    ids = speed.random_prompt(2, 5, TINY.vocab, "cpu")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_dropped_quantized_model_is_freed(tmp_path):
    import gc
    import weakref

    speed.import_gptqmodel_before_any_model()
    runner = fake_runner(tmp_path)
    runner._load_weights("gptq4")
    model = weakref.ref(runner.model)
    runner._drop_model()
    gc.collect()
    assert model() is None


def test_static_cache_decode_gives_the_greedy_tokens_of_full_forwards():
    model = speed.build_random_model(TINY, "cpu", "float32")
    prompt = speed.random_prompt(2, 5, TINY.vocab, "cpu")
    max_len = 12
    cache = speed.new_static_cache(model, max_len)
    state = speed.start_decoding(model, cache, prompt, max_len)
    decoded = [state.token.clone()]
    for _ in range(4):
        speed.decode_step(model, cache, state)
        decoded.append(state.token.clone())
    ids = prompt
    with torch.no_grad():
        for token in decoded:
            expected = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(token, expected)
            ids = torch.cat([ids, expected], dim=1)


def test_measure_ar_gives_positive_latencies_and_a_floor_ratio():
    model = speed.build_random_model(TINY, "cpu")
    record = speed.measure_ar(model, TINY, 2, SETTINGS, "cpu")
    assert record["prefill_s"] > 0 and record["decode_eager_s"] > 0
    assert record["decode_graph_s"] is None and "GPU" in record["decode_graph_error"]
    assert record["decode_best_s"] == record["decode_eager_s"]
    assert record["peak_bytes"] > 0


def test_measure_diffusion_extrapolates_steps_to_the_full_schedule():
    model = speed.build_random_model(TINY, "cpu")
    record = speed.measure_diffusion(model, TINY, 2, SETTINGS, "cpu", MASK_ID)
    passes = speed.diffusion_forward_passes(SETTINGS.answer_tokens, SETTINGS.diffusion_steps, SETTINGS.alg)
    assert record["study_forward_passes"] == passes
    assert record["answer_s_extrapolated"] == pytest.approx(record["step_s"] * passes)
    assert record["answer_tokens_per_s"] == pytest.approx(2 * SETTINGS.answer_tokens / record["answer_s_extrapolated"])
    seq_len = SETTINGS.prompt_tokens + SETTINGS.answer_tokens
    assert record["forward_flops"] == speed.forward_flops(TINY, 2, seq_len, causal=False)
    assert record["answer_forward_flops"] == speed.forward_flops(
        TINY, 2, seq_len, causal=False, logit_positions=SETTINGS.answer_tokens)
    assert record["answer_forward_s"] > 0 and record["bidirectional_unpadded"] is True


@pytest.mark.parametrize("family", ["ar", "diffusion"])
def test_hutchinson_probe_is_timed_with_the_hawq_stage_loss(family):
    model = speed.build_random_model(TINY, "cpu", "float32")
    batch = speed.hessian_batch(family, 2, 8, TINY.vocab, MASK_ID, "cpu")
    assert speed.time_hutchinson_probe(model, family, batch, 1, "cpu") > 0


def test_gptq_quantization_time_covers_load_quantize_and_save(tmp_path):
    seconds = speed.time_gptq_quantization(TINY.with_layers(1), True, 4, 32, 4, 16, tmp_path, "cpu")
    assert seconds > 0
    assert list((tmp_path / "gptq-1-4").glob("*.safetensors"))


def fake_runner(tmp_path, budget_s=math.inf):
    return Runner(TINY, SETTINGS, "cpu", tmp_path / "results.json", tmp_path, budget_s, reserve_s=0)


def test_runner_writes_each_record_and_a_later_run_skips_it(tmp_path):
    fake_runner(tmp_path).run([Unit("one/a", None, lambda runner: {"value": 1})])

    def must_not_run(runner):
        raise AssertionError("a recorded unit ran again")

    fake_runner(tmp_path).run([Unit("one/a", None, must_not_run), Unit("one/b", None, lambda runner: {"value": 2})])
    results = json.loads((tmp_path / "results.json").read_text())
    assert {key: r["value"] for key, r in results["records"].items()} == {"one/a": 1, "one/b": 2}
    assert len(results["runs"]) == 2 and results["runs"][1]["device"] == "cpu"


def test_runner_records_a_failing_unit_and_goes_on(tmp_path):
    def fails(runner):
        raise RuntimeError("kernel missing\nsecond line")

    fake_runner(tmp_path).run([Unit("one/a", None, fails), Unit("one/b", None, lambda runner: {"value": 2})])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert records["one/a"]["error"] == "RuntimeError: kernel missing"
    assert records["one/b"]["value"] == 2


def test_runner_measures_failed_units_again_only_when_asked(tmp_path):
    fake_runner(tmp_path).run([Unit("one/a", None, lambda runner: {"error": "out of memory"})])
    fake_runner(tmp_path).run([Unit("one/a", None, lambda runner: {"value": 1})])
    assert "error" in json.loads((tmp_path / "results.json").read_text())["records"]["one/a"]
    runner = fake_runner(tmp_path)
    runner.retry_errors = True
    runner.run([Unit("one/a", None, lambda runner: {"value": 1})])
    assert json.loads((tmp_path / "results.json").read_text())["records"]["one/a"]["value"] == 1


def test_runner_starts_nothing_once_the_budget_is_spent(tmp_path):
    fake_runner(tmp_path, budget_s=-1).run([Unit("one/a", None, lambda runner: {"value": 1})])
    assert json.loads((tmp_path / "results.json").read_text())["records"] == {}


def synthetic_results(decode_s: float, forward_tflops: float) -> dict:
    format_record = {"format": "bf16", "kernel": "torch.nn.Linear (bf16)", "group_size": None,
                     "checkpoint_bytes": 3_000_000_000, "build_s": 2.0, "run": 0}
    return {
        "runs": [{"device": "NVIDIA H100", "date": "2026-11-25", "software": {"torch": "2.11"},
                  "matmul_tflops": 800.0, "copy_bytes_per_s": 3e12, "matmul_size": 8192}],
        "records": {
            "ar/Qwen3-1.7B/bf16/b1": {**format_record, "prefill_s": 0.01, "prefill_tokens_per_s": 2e4,
                                      "decode_eager_s": 0.008, "decode_graph_s": decode_s,
                                      "decode_best_s": decode_s, "peak_bytes": 4e9},
            "diffusion/CoDA-1.7B/bf16/b32": {**format_record, "forward_s": 0.2, "forward_tflops": forward_tflops,
                                             "step_s": 0.3, "answer_s_extrapolated": 230.0,
                                             "answer_tokens_per_s": 107.0, "peak_bytes": 7e10},
        },
    }


def test_report_memory_is_net_of_what_the_process_held_before():
    results = synthetic_results(0.0025, 480.0)
    record = results["records"]["ar/Qwen3-1.7B/bf16/b1"]
    record |= {"baseline_bytes": 1_000_000_000, "baseline_inferred": "from another record"}
    text = speed.render_markdown(results, speed.REAL_SHAPE, BenchSettings(), "cmd")
    assert "| 3.00* |" in text


def test_report_states_where_each_target_stands():
    met = speed.render_markdown(synthetic_results(0.0025, 480.0), speed.REAL_SHAPE, BenchSettings(), "cmd")
    assert "| AR decode vs its own bandwidth floor | ar/Qwen3-1.7B/bf16/b1 | 2.50x | <= 3x | yes |" in met
    assert ("| diffusion forward rate (full forward) | diffusion/CoDA-1.7B/bf16/b32 | 60% of matmul | >= 50% | yes |"
            in met)
    missed = speed.render_markdown(synthetic_results(0.004, 320.0), speed.REAL_SHAPE, BenchSettings(), "cmd")
    assert "4.00x | <= 3x | no |" in missed and "40% of matmul | >= 50% | no |" in missed
    assert "NVIDIA H100" in met and "cmd" in met


def test_report_takes_the_target_from_the_sampler_forward_and_sets_before_beside_after():
    results = synthetic_results(0.0025, 320.0)
    record = results["records"]["diffusion/CoDA-1.7B/bf16/b32"]
    before = {**record, "step_s": 0.56, "peak_bytes": 7e10}
    record |= {"answer_forward_s": 0.15, "answer_forward_tflops": 440.0, "step_s": 0.28, "peak_bytes": 1.4e10}
    results["before"] = {"diffusion/CoDA-1.7B/bf16/b32": before}
    text = speed.render_markdown(results, speed.REAL_SHAPE, BenchSettings(), "cmd")
    assert "| diffusion forward rate (sampler forward) | diffusion/CoDA-1.7B/bf16/b32 | 55% of matmul | >= 50% | yes |" in text
    assert "| diffusion/CoDA-1.7B/bf16/b32 | step ms | 560.00 (run 0) | 280.00 (run 0) | 2.00x |" in text
    assert "| diffusion/CoDA-1.7B/bf16/b32 | step peak GB | 70.00 (run 0) | 14.00 (run 0) | 5.00x |" in text
