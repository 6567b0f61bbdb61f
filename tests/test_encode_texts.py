"""`sapo.data.encode_texts`: the ids of ``tokenizer(texts)``, through the backend's fast batch
encoder only where the call would reach it unchanged."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sapo.builtin.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, char_tokenizer
from sapo.data import encode_texts

SPECIALS = [PAD, BOS, EOS, *ROLE_TOKENS]
CORPUS = ["the cat sat on the mat", "ünïcödé text, digits 12345 and tabs\t", "a b c d e f g"] * 20


def byte_level_bpe(bos_processor: bool = False, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``CORPUS``; with ``bos_processor`` its post-processor adds BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    if bos_processor:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, **kwargs
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


TOKENIZERS = {
    "char": char_tokenizer(),
    "byte-bpe": byte_level_bpe(),
    "byte-bpe-bos": byte_level_bpe(bos_processor=True),
    "split-specials": byte_level_bpe(bos_processor=True, split_special_tokens=True),
}
# texts with the specials inside them, so that splitting them or not shows in the ids
PIECES = [*SPECIALS, "the cat", " sat", "ünï", "\n", "12", " ", "\t", "x"]
TEXTS = st.lists(st.lists(st.sampled_from(PIECES), max_size=12).map("".join), min_size=1, max_size=8)


def called_ids(tokenizer, texts, add_special_tokens):
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("add_special_tokens", [True, False])
@settings(max_examples=40, deadline=None)
@given(texts=TEXTS)
def test_the_ids_are_those_of_calling_the_tokenizer(name, add_special_tokens, texts):
    tokenizer = TOKENIZERS[name]
    expected = called_ids(tokenizer, texts, add_special_tokens)
    assert encode_texts(tokenizer, texts, add_special_tokens) == expected


def test_specials_are_split_or_kept_as_the_tokenizer_says():
    text = [f"a{EOS}b"]
    eos = TOKENIZERS["byte-bpe"].eos_token_id
    assert eos in encode_texts(TOKENIZERS["byte-bpe"], text, False)[0]
    assert eos not in encode_texts(TOKENIZERS["split-specials"], text, False)[0]


def test_split_special_tokens_set_after_loading_is_followed():
    tokenizer = byte_level_bpe()
    tokenizer.split_special_tokens = True  # the backend learns of it only at the next call
    eos = tokenizer.eos_token_id
    assert eos not in encode_texts(tokenizer, [f"a{EOS}b"], False)[0]


def test_a_plain_fast_tokenizer_skips_the_python_call_path():
    tokenizer = byte_level_bpe(bos_processor=True)
    expected = called_ids(tokenizer, ["the cat sat"], True)
    with mock.patch.object(tokenizer, "_encode_plus", side_effect=AssertionError("took the slow path")):
        assert encode_texts(tokenizer, ["the cat sat"], True) == expected


@pytest.mark.parametrize(
    "setting",
    [
        lambda backend: backend.enable_truncation(max_length=3),
        lambda backend: backend.enable_padding(length=40, pad_id=0, pad_token=PAD),
    ],
    ids=["truncation", "padding"],
)
def test_backend_settings_the_call_would_reset_go_through_the_call(setting):
    tokenizer = byte_level_bpe()
    texts = ["the cat sat on the mat", "a b"]
    expected = called_ids(tokenizer, texts, False)  # the call resets truncation and padding...
    setting(tokenizer.backend_tokenizer)
    assert encode_texts(tokenizer, texts, False) == expected  # ...so the ids must not be cut or padded
    assert [len(ids) for ids in expected] == [len(ids) for ids in encode_texts(tokenizer, texts, False)]


def test_a_subclass_with_its_own_encoding_is_called():
    class Lowercasing(PreTrainedTokenizerFast):
        def _encode_plus(self, text, *args, **kwargs):
            lowered = [t.lower() for t in text] if isinstance(text, list) else text.lower()
            return super()._encode_plus(lowered, *args, **kwargs)

    base = byte_level_bpe()
    tokenizer = Lowercasing(tokenizer_object=base.backend_tokenizer, pad_token=PAD, eos_token=EOS)
    assert encode_texts(tokenizer, ["THE CAT"], False) == called_ids(base, ["the cat"], False)
