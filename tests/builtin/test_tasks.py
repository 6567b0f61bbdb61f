"""Built-in tasks: fixed, disjoint splits of correct problems that sapo and TRL can both read."""

import operator

import pytest

from sapo.builtin.tasks import SPLITS, TASKS, task_dataset, task_problems
from sapo.data import prepare_dataset

OPERATORS = {"+": operator.add, "*": operator.mul}


def solve(prompt: str) -> str:
    for symbol, apply in OPERATORS.items():
        if symbol in prompt:
            left, right = prompt.rstrip("=").split(symbol)
            return str(apply(int(left), int(right)))
    raise AssertionError(f"no operator in {prompt!r}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_have_their_sizes_and_share_no_prompt(name):
    prompts = {split: [prompt for prompt, _ in task_problems(name, split)] for split in SPLITS}
    for split in SPLITS:
        assert len(prompts[split]) == TASKS[name].sizes[split]
        assert len(set(prompts[split])) == len(prompts[split]), f"duplicate prompt in {split}"
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            assert not set(prompts[first]) & set(prompts[second]), (first, second)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_answer_is_correct(name):
    for split in SPLITS:
        for prompt, answer in task_problems(name, split):
            assert answer == solve(prompt), (split, prompt, answer)


def test_splits_are_pinned():
    # the shipped warm start was trained on these splits; changing them silently would leak test rows
    assert task_problems("addition", "test")[:2] == [("27611+84606=", "112217"), ("18271+43432=", "61703")]
    assert task_problems("addition", "train")[0] == ("41592+97747=", "139339")
    assert task_problems("multiplication", "test")[:2] == [("17*21=", "357"), ("20*56=", "1120")]
    assert task_problems("multiplication", "train")[0] == ("34*48=", "1632")
    assert task_problems("long-multiplication", "train")[0] == ("769*23=", "17687")


def test_multiplication_uses_every_two_digit_problem():
    prompts = {prompt for split in SPLITS for prompt, _ in task_problems("multiplication", split)}
    assert prompts == {f"{a}*{b}=" for a in range(10, 100) for b in range(10, 100)}


def test_rows_are_conversational_prompt_completion_that_sapo_tokenizes(tokenizer):
    dataset = task_dataset("addition", "validation")
    assert dataset[0] == {
        "prompt": [{"role": "user", "content": "31064+52602="}],
        "completion": [{"role": "assistant", "content": "83666"}],
    }
    tokenized = prepare_dataset(dataset.select(range(8)), tokenizer, max_length=32, max_prompt_length=24)
    gold = tokenized["gold_ids"][0]
    assert tokenizer.decode(gold[:-1]) == "83666" and gold[-1] == tokenizer.eos_token_id


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ValueError, match="addition, long-multiplication, multiplication"):
        task_dataset("division", "train")
    with pytest.raises(ValueError, match="train, preference, validation, test"):
        task_problems("addition", "dev")
