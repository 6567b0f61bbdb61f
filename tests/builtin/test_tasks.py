"""Built-in tasks: fixed, disjoint splits of correct problems that sapo and TRL can both read."""

import operator
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sapo.builtin.tasks import (
    SPLITS,
    TASKS,
    edit_distance,
    task_dataset,
    task_problems,
    task_rows,
    task_scores,
)
from sapo.data import prepare_dataset

OPERATORS = {"+": operator.add, "*": operator.mul}
LONG_TASKS = ("worked-multiplication", "wide-worked-multiplication", "sorting")
TEMPLATE_TOKENS = 3  # <|user|>, <|end|>, <|assistant|> around the prompt of the char tokenizer


def worked_product(prompt: str) -> str:
    """Long multiplication written out, computed independently of the task's generator."""
    left, right = (int(part) for part in prompt.rstrip("=").split("*"))
    digits = [int(digit) for digit in str(right)][::-1]
    partials = [left * digit * 10**power for power, digit in enumerate(digits)]
    steps = [
        f"{left}*{digit * 10**power}={partial}"
        for power, (digit, partial) in enumerate(zip(digits, partials))
    ]
    return ";".join(steps) + ";" + "+".join(str(partial) for partial in partials) + f"={left * right}"


def solve(prompt: str, task: str) -> str:
    if task in ("worked-multiplication", "wide-worked-multiplication"):
        return worked_product(prompt)
    if task == "sorting":
        numbers = prompt.removeprefix("sort:").rstrip("=").split(",")
        return ",".join(sorted(numbers, key=int))
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
            assert answer == solve(prompt, name), (split, prompt, answer)


def test_splits_are_pinned():
    # the shipped warm start was trained on these splits; changing them silently would leak test rows
    assert task_problems("addition", "test")[:2] == [("27611+84606=", "112217"), ("18271+43432=", "61703")]
    assert task_problems("addition", "train")[0] == ("41592+97747=", "139339")
    assert task_problems("multiplication", "test")[:2] == [("17*21=", "357"), ("20*56=", "1120")]
    assert task_problems("multiplication", "train")[0] == ("34*48=", "1632")
    assert task_problems("long-multiplication", "train")[0] == ("769*23=", "17687")
    assert task_problems("worked-multiplication", "test")[0] == (
        "341*48=",
        "341*8=2728;341*40=13640;2728+13640=16368",
    )
    assert task_problems("worked-multiplication", "train")[0][0] == "450*48="
    assert task_problems("wide-worked-multiplication", "test")[0] == (
        "431*254=",
        "431*4=1724;431*50=21550;431*200=86200;1724+21550+86200=109474",
    )
    assert task_problems("wide-worked-multiplication", "train")[0][0] == "285*925="
    assert task_problems("sorting", "test")[0] == (
        "sort:79,32,94,45,88,94,83,67,03,59,99=",
        "03,32,45,59,67,79,83,88,94,94,99",
    )
    assert task_problems("sorting", "train")[0][0] == "sort:60,61,39,65,12,43,63,33,84,63,36="


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_problem_fits_its_task_token_budgets(name):
    task = TASKS[name]
    for split in SPLITS:
        for prompt, answer in task_problems(name, split):
            prompt_tokens = len(prompt) + TEMPLATE_TOKENS
            assert prompt_tokens <= task.max_prompt_length, (split, prompt)
            assert prompt_tokens + len(answer) + 1 <= task.max_length, (split, prompt)  # + EOS


@pytest.mark.parametrize("name", LONG_TASKS)
def test_long_answer_tasks_have_long_answers_tokenized_whole(name, tokenizer):
    rows = task_rows(tokenizer, name, "test")
    assert len(rows) == TASKS[name].sizes["test"]  # no prompt dropped, so no answer cut either
    assert statistics.mean(len(gold) for _, gold in rows) >= 30
    for (_, gold), (_, answer) in zip(rows[:50], task_problems(name, "test")[:50]):
        assert tokenizer.decode(gold[:-1]) == answer and gold[-1] == tokenizer.eos_token_id


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


@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_edit_distance_is_a_metric_bounded_by_the_longer_sequence(first, second):
    distance = edit_distance(first, second)
    assert distance == edit_distance(second, first)
    assert (distance == 0) == (first == second)
    assert abs(len(first) - len(second)) <= distance <= max(len(first), len(second))


def test_edit_distance_counts_single_token_edits():
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # a deletion
    assert edit_distance([1, 2, 3], [1, 4, 3]) == 1  # a substitution
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2


def test_task_scores_match_greedy_generate_and_exact_match(tokenizer):
    from sapo.builtin.tasks import task_accuracy
    from sapo.cli.arguments import ModelArguments
    from sapo.cli.loading import load_model

    model = load_model(ModelArguments(model_name_or_path="builtin:tiny-multiplication-sft"), tokenizer)
    scores = task_scores(model, tokenizer, "multiplication", "test", count=24)
    assert scores["exact_match"] == task_accuracy(model, tokenizer, "multiplication", "test", 24)
    distances = []
    budget = TASKS["multiplication"].max_length
    for prompt, gold in task_rows(tokenizer, "multiplication", "test", 24):
        output = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=budget - len(prompt),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        answer = output[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
        distances.append(edit_distance(answer, gold) / len(gold))
    assert 0.0 < scores["exact_match"] < 1.0
    assert scores["edit_distance"] == pytest.approx(statistics.mean(distances))


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(
        ValueError,
        match="addition, long-multiplication, multiplication, sorting, wide-worked-multiplication, "
        "worked-multiplication",
    ):
        task_dataset("division", "train")
    with pytest.raises(ValueError, match="train, preference, validation, test"):
        task_problems("addition", "dev")
