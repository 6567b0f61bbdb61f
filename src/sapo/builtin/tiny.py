"""Offline building blocks: a character-level tokenizer with a chat template and tiny Llama models.

Everything here is made locally (no hub access), so tests, examples and benchmarks run anywhere.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TINY_MODEL_SIZES = {
    # ~22k parameters: too small to learn the long-answer tasks perfectly (a capacity-limited SFT
    # plateau, where preference methods have errors left to fix)
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    # ~0.1M parameters: unit and end-to-end tests
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    # ~0.8M parameters: demos and benchmarks where the model must actually learn a task
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per printable ASCII character plus pad/bos/eos and role markers.

    Its chat template renders ``<|role|>content<|end|>`` per turn; ``<|end|>`` is the EOS token,
    so every assistant turn ends with EOS.
    """
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    characters = list(string.printable[:95]) + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast, size: str = "tiny", seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``size`` (see ``TINY_MODEL_SIZES``) for ``tokenizer``."""
    import torch

    if size not in TINY_MODEL_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(TINY_MODEL_SIZES)}")
    settings = dict(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(TINY_MODEL_SIZES[size])
    settings.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
