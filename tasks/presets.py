"""Built-in models a grid can name without describing them: the tiny demo pair and the study's pair."""

from __future__ import annotations

from qrobust.tasks.config import ModelSpec, PublishedScore, TinyArchitecture

BUILTIN_MODELS: dict[str, ModelSpec] = {
    # bfloat16 because gptqmodel's CPU kernels run in half precision: the fp baseline must
    # run in the same dtype as the quantized models it is compared with.
    "tiny-ar": ModelSpec(name="tiny-ar", family="ar", tiny=TinyArchitecture(), dtype="bfloat16"),
    "tiny-diffusion": ModelSpec(name="tiny-diffusion", family="diffusion", tiny=TinyArchitecture(), dtype="bfloat16"),
    # Both real models take CoDA's published instruct prompts (qrobust.tasks.benchmarks), so the pair is
    # compared on identical inputs.
    "qwen3-1.7b": ModelSpec(
        name="qwen3-1.7b", family="ar", hf_id="Qwen/Qwen3-1.7B", dtype="bfloat16", prompt_style="coda-instruct"
    ),
    "coda-1.7b": ModelSpec(
        name="coda-1.7b",
        family="diffusion",
        hf_id="Salesforce/CoDA-v0-Instruct",
        mask_token_id=151669,
        dtype="bfloat16",
        prompt_style="coda-instruct",
        architecture="coda",
    ),
}

# The input widths of the quantized linear layers (hidden size, attention output, MLP inner size)
# of hub checkpoints whose configs are known, so that a group size that does not divide them is
# refused when the grid is read; other hub models are checked when their config is loaded.
KNOWN_INPUT_WIDTHS: dict[str, tuple[int, ...]] = {
    "Qwen/Qwen3-1.7B": (2048, 2048, 6144),
    "Salesforce/CoDA-v0-Instruct": (2048, 2048, 6144),
    "Salesforce/CoDA-v0-Base": (2048, 2048, 6144),
}

# What the models' authors published, set beside each fp cell by the report. CoDA's numbers come
# from its evaluation harness (CoDA's repository, evaluation/lm_eval: 0-shot instruct prompts,
# 768 tokens in 768 steps, temperature 0.1, top-p 0.9, entropy); Qwen3-1.7B's are the ones CoDA's
# report lists for it as self-reported, with no harness settings given.
CODA_REPORT = "CoDA technical report (arXiv 2510.03270), CoDA-1.7B-Instruct"
QWEN3_IN_CODA_REPORT = "CoDA technical report (arXiv 2510.03270), Qwen3-1.7B as self-reported"


def _scores(model: str, source: str, **by_benchmark: float) -> tuple[PublishedScore, ...]:
    return tuple(PublishedScore(model, benchmark.replace("_", "-"), value, source)
                 for benchmark, value in by_benchmark.items())


PUBLISHED_SCORES: dict[str, tuple[PublishedScore, ...]] = {
    "coda-1.7b": _scores("coda-1.7b", CODA_REPORT,
                         humaneval=0.543, humaneval_plus=0.476, mbpp=0.472, mbpp_plus=0.632),
    "qwen3-1.7b": _scores("qwen3-1.7b", QWEN3_IN_CODA_REPORT,
                          humaneval=0.665, humaneval_plus=0.616, mbpp=0.462, mbpp_plus=0.659),
}
