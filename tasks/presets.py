"""Built-in models a grid can name without describing them: the tiny demo pair, the study's pair,
and backbone-matched pairs of diffusion coders and their auto-regressive twins.

A real model also has a `ModelCard`: what it was made from, its tokenizer and size, and its
authors' own published evaluation settings with where they come from. A grid that names the
model generates with those settings unless its own `[models.generation]` table says otherwise,
and the store records the cards of every declared pair side by side (`tasks.pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Backbone-matched pairs. Each diffusion model runs with its authors' published sampler
    # (its card) on the same prompts as its twin: the Dream instruct-evaluation formats, which
    # CoDA's harness reuses ("coda-instruct"), each in its own chat template.
    "dream-7b": ModelSpec(
        name="dream-7b", family="diffusion", hf_id="Dream-org/Dream-v0-Instruct-7B", mask_token_id=151666,
        dtype="bfloat16", prompt_style="coda-instruct", architecture="dream",
    ),
    "dream-coder-7b": ModelSpec(
        name="dream-coder-7b", family="diffusion", hf_id="Dream-org/Dream-Coder-v0-Instruct-7B",
        dtype="bfloat16", prompt_style="coda-instruct", architecture="dream",
    ),
    "diffucoder-7b": ModelSpec(
        name="diffucoder-7b", family="diffusion", hf_id="apple/DiffuCoder-7B-Instruct",
        dtype="bfloat16", prompt_style="coda-instruct", architecture="dream",
    ),
    "llada-8b": ModelSpec(
        name="llada-8b", family="diffusion", hf_id="GSAI-ML/LLaDA-8B-Instruct", mask_token_id=126336,
        logits_shift=False, dtype="bfloat16", prompt_style="coda-instruct", architecture="llada",
    ),
    "qwen2.5-7b": ModelSpec(
        name="qwen2.5-7b", family="ar", hf_id="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16", prompt_style="coda-instruct"
    ),
    "qwen2.5-coder-7b": ModelSpec(
        name="qwen2.5-coder-7b", family="ar", hf_id="Qwen/Qwen2.5-Coder-7B-Instruct", dtype="bfloat16",
        prompt_style="coda-instruct",
    ),
    "llama3-8b": ModelSpec(
        name="llama3-8b", family="ar", hf_id="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16",
        prompt_style="coda-instruct",
    ),
}


@dataclass(frozen=True)
class ModelCard:
    """What a model is matched on in a pair, and how its authors evaluate it.

    - backbone: the pretrained checkpoint the model's training started from (for a diffusion
      model adapted from an AR one, that AR checkpoint), or "trained from scratch".
    - tokenizer: the vocabulary it reads, by the model family that defines it.
    - parameters: its parameter count (untied output projections counted).
    - evaluation_source: the authors' evaluation code or page its settings come from.
    - generation: those settings, as `[models.generation]` keys, for every benchmark;
      `benchmark_generation`: per benchmark, where the authors' settings differ by benchmark.
    - evaluation_prompts: the prompt format the authors evaluated with: a qrobust prompt style
      where qrobust implements it, else what it is.
    """

    backbone: str
    tokenizer: str
    parameters: int
    evaluation_source: str
    generation: dict = field(default_factory=dict)
    benchmark_generation: dict = field(default_factory=dict)
    evaluation_prompts: str = ""

    def generation_for(self, benchmark: str) -> dict:
        """The published settings for one benchmark."""
        return {**self.generation, **self.benchmark_generation.get(benchmark, {})}


# Parameter counts from each model's config: Qwen2.5-7B's shape (hidden 3584, 28 layers, 28/4
# heads, MLP 18944, vocab 152064, untied) for Dream, Dream-Coder, DiffuCoder and both Qwen2.5
# twins (Dream-v0-Instruct-7B's safetensors index holds exactly this many bf16 values);
# LLaDA-8B likewise from its index; Qwen3-1.7B ties its output projection to its embedding,
# CoDA's is a matrix of its own.
QWEN2_5_7B_PARAMETERS = 7_615_616_512
QWEN2_5_TOKENIZER = "Qwen2.5 (151643 BPE tokens)"
GREEDY = {"temperature": 0.0}

MODEL_CARDS: dict[str, ModelCard] = {
    "coda-1.7b": ModelCard(
        backbone="Qwen3-1.7B", tokenizer="Qwen3 (151643 BPE tokens)", parameters=2_031_739_904,
        evaluation_source="SalesforceAIResearch/CoDA evaluation/eval_mbpp_humaneval.sh",
        generation={"max_new_tokens": 768, "steps": 768, "temperature": 0.1, "top_p": 0.9, "alg": "entropy"},
        evaluation_prompts="coda-instruct",
    ),
    "qwen3-1.7b": ModelCard(
        backbone="Qwen3-1.7B", tokenizer="Qwen3 (151643 BPE tokens)", parameters=1_720_574_976,
        evaluation_source="greedy decoding, as the study runs its AR model", generation=GREEDY,
    ),
    "dream-7b": ModelCard(
        backbone="Qwen2.5-7B", tokenizer=QWEN2_5_TOKENIZER, parameters=QWEN2_5_7B_PARAMETERS,
        evaluation_source="DreamLM/Dream eval_instruct/eval.sh (humaneval_instruct, mbpp_instruct)",
        generation={"temperature": 0.1, "top_p": 0.9, "alg": "entropy"},
        benchmark_generation={"humaneval": {"max_new_tokens": 768, "steps": 768},
                              "mbpp": {"max_new_tokens": 1024, "steps": 1024}},
        evaluation_prompts="coda-instruct",  # Dream's instruct-evaluation formats, which CoDA reuses
    ),
    "dream-coder-7b": ModelCard(
        backbone="Qwen2.5-Coder-7B", tokenizer=QWEN2_5_TOKENIZER, parameters=QWEN2_5_7B_PARAMETERS,
        evaluation_source=("DreamLM/Dream-Coder instruct/code_eval/README.md (EvalPlus, backend dllm: "
                           "its defaults top_p 0.9, alg entropy, alg_temp 0)"),
        generation={"max_new_tokens": 512, "steps": 512, "temperature": 0.1, "top_p": 0.9, "alg": "entropy"},
        evaluation_prompts="EvalPlus instruct prompts",
    ),
    "diffucoder-7b": ModelCard(
        backbone="Qwen2.5-Coder-7B", tokenizer=QWEN2_5_TOKENIZER, parameters=QWEN2_5_7B_PARAMETERS,
        evaluation_source="apple/ml-diffucoder README, Instruct usage (no evaluation script is published)",
        generation={"max_new_tokens": 256, "steps": 256, "temperature": 0.3, "top_p": 0.95, "alg": "entropy"},
        evaluation_prompts="Qwen2.5-Coder's evaluation toolkit (qwencoder-eval), per its README",
    ),
    "llada-8b": ModelCard(
        backbone="trained from scratch", tokenizer="LLaDA (126464 rows, its own BPE)", parameters=8_015_581_184,
        evaluation_source=("ML-GSAI/LLaDA EVAL.md; opencompass/examples/"
                           "llada_instruct_gen_humaneval_length512_block512_logits.py and "
                           "llada_instruct_gen_mbpp_length256_block256_confidence.py"),
        # low-confidence remasking = commit by the drawn token's probability (maskgit_plus)
        generation={"temperature": 0.0, "alg": "maskgit_plus"},
        benchmark_generation={
            "humaneval": {"max_new_tokens": 512, "steps": 512, "block_length": 512,
                          "suppressed_tokens": ["<|endoftext|>"]},
            "mbpp": {"max_new_tokens": 256, "steps": 256, "block_length": 256,
                     "confidence_excluded_tokens": ["<|endoftext|>", "<|eot_id|>"]},
        },
        evaluation_prompts="OpenCompass humaneval_gen_8e312c / mbpp_gen",
    ),
    "qwen2.5-7b": ModelCard(
        backbone="Qwen2.5-7B", tokenizer=QWEN2_5_TOKENIZER, parameters=QWEN2_5_7B_PARAMETERS,
        evaluation_source="greedy decoding (Qwen2.5 technical report)", generation=GREEDY,
    ),
    "qwen2.5-coder-7b": ModelCard(
        backbone="Qwen2.5-Coder-7B", tokenizer=QWEN2_5_TOKENIZER, parameters=QWEN2_5_7B_PARAMETERS,
        evaluation_source="greedy decoding (QwenLM/Qwen2.5-Coder qwencoder-eval)", generation=GREEDY,
        evaluation_prompts="EvalPlus instruct prompts",
    ),
    "llama3-8b": ModelCard(
        backbone="Llama-3-8B", tokenizer="Llama 3 (128256 tiktoken BPE tokens)", parameters=8_030_261_248,
        evaluation_source="greedy decoding (LLaDA's comparison with LLaMA3-8B)", generation=GREEDY,
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
