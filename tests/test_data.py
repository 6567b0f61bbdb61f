"""`sapo.data.prepare_dataset`: formats, exact texts, EOS handling, length limits, malformed rows."""

import copy
import logging
import re

import datasets
import pytest
from datasets import Dataset

from sapo.data import prepare_dataset

datasets.disable_progress_bars()

EOS = "<|end|>"


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def msg(role, content):
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------------------------
# Formats and exact texts
# ----------------------------------------------------------------------------------------------


def test_messages_multi_turn(tokenizer):
    rows = [
        {
            "messages": [
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "2+2?"),
                msg("assistant", "4"),
            ]
        },
        {"messages": [msg("user", "12+34="), msg("assistant", "46")]},
    ]
    out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None)
    assert set(out.column_names) == {"prompt_ids", "gold_ids"}
    assert len(out) == 2
    # prompt: the earlier turns, rendered with the template, plus the generation prompt
    assert decode(tokenizer, out[0]["prompt_ids"]) == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>"
        "<|user|>2+2?<|end|><|assistant|>"
    )
    assert decode(tokenizer, out[0]["gold_ids"]) == "4" + EOS
    assert decode(tokenizer, out[1]["prompt_ids"]) == "<|user|>12+34=<|end|><|assistant|>"
    assert decode(tokenizer, out[1]["gold_ids"]) == "46" + EOS
    # the prompt ids are exactly the template's rendering, tokenized
    expected = tokenizer.apply_chat_template(
        [msg("user", "12+34=")], tokenize=False, add_generation_prompt=True
    )
    assert out[1]["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_prompt_completion_plain_strings(tokenizer):
    rows = [{"prompt": "Q: 3+4=", "completion": " 7"}, {"prompt": "Say hi.\n", "completion": "hi there"}]
    out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None)
    assert decode(tokenizer, out[0]["prompt_ids"]) == "Q: 3+4="
    assert decode(tokenizer, out[0]["gold_ids"]) == " 7" + EOS
    assert decode(tokenizer, out[1]["prompt_ids"]) == "Say hi.\n"
    assert decode(tokenizer, out[1]["gold_ids"]) == "hi there" + EOS


def test_prompt_completion_conversational(tokenizer):
    rows = [
        {
            "prompt": [
                msg("system", "S"),
                msg("user", "first"),
                msg("assistant", "ok"),
                msg("user", "second"),
            ],
            "completion": [msg("assistant", "answer")],
        }
    ]
    out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None)
    assert decode(tokenizer, out[0]["prompt_ids"]) == (
        "<|system|>S<|end|><|user|>first<|end|><|assistant|>ok<|end|><|user|>second<|end|><|assistant|>"
    )
    assert decode(tokenizer, out[0]["gold_ids"]) == "answer" + EOS


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [msg("user", "u"), msg("assistant", "abc")]},
        {"prompt": "p", "completion": "abc"},
        {"prompt": "p", "completion": "abc" + EOS},  # already ends with EOS: none added
        {"prompt": [msg("user", "u")], "completion": [msg("assistant", "abc")]},
    ],
    ids=["messages", "plain", "plain-with-eos", "conversational"],
)
def test_gold_ends_with_eos_exactly_once(tokenizer, row):
    out = prepare_dataset(Dataset.from_list([row]), tokenizer, max_length=None, max_prompt_length=None)
    gold = out[0]["gold_ids"]
    assert gold[-1] == tokenizer.eos_token_id
    assert gold.count(tokenizer.eos_token_id) == 1
    assert decode(tokenizer, gold) == "abc" + EOS


def test_addition_dataset_fixture(tokenizer, addition_dataset):
    out = prepare_dataset(addition_dataset, tokenizer, max_length=64, max_prompt_length=32)
    assert len(out) == len(addition_dataset)
    for source, row in zip(addition_dataset, out, strict=True):
        question, answer = source["messages"][0]["content"], source["messages"][1]["content"]
        assert decode(tokenizer, row["prompt_ids"]) == f"<|user|>{question}<|end|><|assistant|>"
        assert decode(tokenizer, row["gold_ids"]) == answer + EOS


# ----------------------------------------------------------------------------------------------
# Length limits
# ----------------------------------------------------------------------------------------------


def _plain(prompt_len, gold_len, tag="a"):
    return {"prompt": tag * prompt_len, "completion": "b" * gold_len}


def test_long_prompts_dropped_with_one_warning(tokenizer, caplog):
    rows = [
        _plain(5, 3, "a"),
        _plain(11, 3, "b"),  # too long
        _plain(10, 3, "c"),  # exactly the limit: kept
        _plain(30, 3, "d"),  # too long
        _plain(1, 3, "e"),
    ]
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=100, max_prompt_length=10)
    assert [decode(tokenizer, r["prompt_ids"]) for r in out] == ["a" * 5, "c" * 10, "e"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert re.search(r"\b2\b", warnings[0].getMessage()), warnings[0].getMessage()


def test_no_warning_when_nothing_dropped(tokenizer, caplog):
    rows = [_plain(5, 3), _plain(10, 3)]
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=100, max_prompt_length=10)
    assert len(out) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_prompt_limit_also_bounded_by_max_length(tokenizer, caplog):
    # max_prompt_length alone would allow 20, but a prompt of max_length tokens leaves no room for an answer
    rows = [_plain(8, 3), _plain(9, 3), _plain(12, 3)]
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=9, max_prompt_length=20)
    assert [len(r["prompt_ids"]) for r in out] == [8]
    assert all(len(r["prompt_ids"]) + len(r["gold_ids"]) <= 9 for r in out)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_gold_cut_to_fit_max_length_keeping_start(tokenizer):
    rows = [
        {"prompt": "PPPP", "completion": "0123456789"},  # 4 + 11 (with EOS) > 10: cut
        {"prompt": "PP", "completion": "ab"},  # 2 + 3 fits: untouched
        {"prompt": "PPPP", "completion": "abcde"},  # 4 + 6 == 10: fits exactly
    ]
    out = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=10, max_prompt_length=None)
    assert len(out) == 3
    assert decode(tokenizer, out[0]["gold_ids"]) == "012345"
    assert len(out[0]["prompt_ids"]) + len(out[0]["gold_ids"]) == 10
    assert decode(tokenizer, out[1]["gold_ids"]) == "ab" + EOS
    assert decode(tokenizer, out[2]["gold_ids"]) == "abcde" + EOS
    for row in out:
        assert len(row["prompt_ids"]) + len(row["gold_ids"]) <= 10


# ----------------------------------------------------------------------------------------------
# Malformed input
# ----------------------------------------------------------------------------------------------


def _good_messages(i):
    return {"messages": [msg("user", f"q{i}"), msg("assistant", f"a{i}")]}


def _expect_row_error(tokenizer, rows, index, column):
    with pytest.raises(ValueError) as info:
        prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None)
    message = str(info.value)
    assert re.search(rf"\brow {index}\b", message), message
    assert column in message, message
    return message


def test_missing_column(tokenizer):
    for rows in ([{"text": "hello"}], [{"prompt": "p", "answer": "a"}]):
        with pytest.raises(ValueError) as info:
            prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None)
        message = str(info.value)
        assert "missing column" in message
        assert "messages" in message and "completion" in message


def test_last_message_not_from_assistant(tokenizer):
    rows = [_good_messages(0), _good_messages(1), {"messages": [msg("assistant", "a"), msg("user", "q")]}]
    message = _expect_row_error(tokenizer, rows, 2, "messages")
    assert "assistant" in message


def test_empty_answer_messages(tokenizer):
    rows = [_good_messages(0), {"messages": [msg("user", "q"), msg("assistant", "")]}, _good_messages(2)]
    _expect_row_error(tokenizer, rows, 1, "messages")


def test_empty_answer_plain(tokenizer):
    rows = [
        {"prompt": "p", "completion": "x"},
        {"prompt": "p", "completion": "y"},
        {"prompt": "p", "completion": ""},
    ]
    _expect_row_error(tokenizer, rows, 2, "completion")


def test_content_not_a_string(tokenizer):
    rows = [_good_messages(0), {"messages": [msg("user", "q"), {"role": "assistant", "content": None}]}]
    _expect_row_error(tokenizer, rows, 1, "messages")


def test_content_not_a_string_conversational_prompt(tokenizer):
    rows = [
        {"prompt": [msg("user", "q")], "completion": [msg("assistant", "a")]},
        {"prompt": [{"role": "user", "content": None}], "completion": [msg("assistant", "a")]},
    ]
    _expect_row_error(tokenizer, rows, 1, "prompt")


def test_empty_messages_list(tokenizer):
    rows = [_good_messages(0), _good_messages(1), _good_messages(2), {"messages": []}]
    _expect_row_error(tokenizer, rows, 3, "messages")


def test_empty_dataset(tokenizer):
    empty = Dataset.from_dict({"messages": []})
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset(empty, tokenizer, max_length=None, max_prompt_length=None)


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "a string prompt", "completion": [msg("assistant", "a")]},
        {"prompt": [msg("user", "q")], "completion": "a string completion"},
    ],
    ids=["str-prompt-list-completion", "list-prompt-str-completion"],
)
def test_mixed_string_and_list(tokenizer, bad):
    rows = [dict(bad), dict(bad)]
    message = _expect_row_error(tokenizer, rows, 0, "prompt")
    assert "completion" in message


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def test_a_bad_row_past_the_first_batch_is_named(tokenizer):
    rows = [_good_messages(i) for i in range(1500)]
    rows[1234] = {"messages": [msg("user", "q"), msg("assistant", "")]}
    _expect_row_error(tokenizer, rows, 1234, "messages")


def test_a_bad_row_is_named_from_a_worker_process(tokenizer):
    rows = [_good_messages(i) for i in range(40)]
    rows[33] = {"messages": [msg("assistant", "a"), msg("user", "q")]}
    with pytest.raises(ValueError, match=r"\brow 33\b.*messages"):
        prepare_dataset(
            Dataset.from_list(rows), tokenizer, max_length=None, max_prompt_length=None, num_proc=2
        )


def test_a_template_that_does_not_prefix_the_prompt_is_named_by_row(tokenizer):
    template_tokenizer = copy.deepcopy(tokenizer)
    # renders the generation prompt with an extra space the conversation does not have
    template_tokenizer.chat_template = tokenizer.chat_template.replace(
        "'<|assistant|>' }}", "'<|assistant|> ' }}"
    )
    rows = [_good_messages(0), _good_messages(1)]
    with pytest.raises(ValueError, match=r"^row 0: the chat template does not render the prompt as a prefix"):
        prepare_dataset(Dataset.from_list(rows), template_tokenizer, max_length=None, max_prompt_length=None)
