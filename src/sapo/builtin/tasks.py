"""Synthetic tasks whose answers can be checked exactly, so SAPO can be tried and measured offline.

Each task draws problems (``"27611+84606="`` → ``"112217"``) from its own seeded generator. The splits
are fixed: problems are drawn in order, duplicates skipped: the first ``test`` problems form the
test split, then come ``validation``, ``train`` and ``preference``. No prompt appears in two splits.

- ``train``: the SFT data of the shipped warm starts (``builtin:tiny-<task>-sft``);
- ``preference``: prompts with gold answers that the warm start never saw, for the stage after SFT
  (SAPO, DPO, continued SFT...). A tiny model trained with SFT to its plateau has learned its
  training split by heart (99.8% exact match on the multiplication one against 43% on unseen
  problems), so its own rewrites of those answers are the gold answers: no preference to learn;
- ``validation`` (choosing settings) and ``test`` (reporting).

Rows are conversational ``prompt``/``completion`` pairs: SAPO reads them as one user turn and a
gold answer, TRL's ``SFTTrainer`` trains on the completion only.

Measured plateaus of SFT with the built-in tiny Llama (batch 32, cosine schedule; validation exact
match, ``scripts/make_warm_start.py``): addition is learned almost perfectly (99.8% after 24,000
steps), multiplication and long multiplication are not (see ``recipes/warm-start/``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset

SPLITS = ("train", "preference", "validation", "test")
# token budgets of the short-answer tasks (one token per character); long-answer tasks set their own
MAX_LENGTH, MAX_PROMPT_LENGTH = 32, 24
DRAW_ORDER = ("test", "validation", "train", "preference")


@dataclass(frozen=True)
class Task:
    """A family of problems with exactly one correct answer each.

    Args:
        name: the name after ``builtin:``.
        description: one line for listings and reports.
        draw: returns one ``(prompt, answer)`` from a ``random.Random``.
        sizes: number of distinct problems per split.
        seed: seed of the generator the splits are drawn from.
        max_length: tokens of prompt plus answer that every problem fits (chat template and EOS
            included; one token per character).
        max_prompt_length: tokens of every templated prompt.
    """

    name: str
    description: str
    draw: Callable[[random.Random], tuple[str, str]]
    sizes: dict[str, int]
    seed: int
    max_length: int = MAX_LENGTH
    max_prompt_length: int = MAX_PROMPT_LENGTH


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10_000, 99_999), rng.randint(10_000, 99_999)
    return f"{a}+{b}=", str(a + b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}*{b}=", str(a * b)


def _long_multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    return f"{a}*{b}=", str(a * b)


def _worked_product(a: int, b: int) -> tuple[str, str]:
    """``a*b=`` and the work: ``a`` times each digit of ``b`` at its place, then the partials' sum."""
    places = [int(digit) * 10**power for power, digit in enumerate(reversed(str(b)))]
    partials = [a * place for place in places]
    steps = [f"{a}*{place}={partial}" for place, partial in zip(places, partials)]
    return f"{a}*{b}=", ";".join([*steps, f"{'+'.join(map(str, partials))}={a * b}"])


def _worked_multiplication(rng: random.Random) -> tuple[str, str]:
    """``347*86=`` -> ``347*6=2082;347*80=27760;2082+27760=29842``: one partial product per digit
    of the multiplier, then their sum. A 4-16-token stretch is one step of the work."""
    return _worked_product(rng.randint(100, 999), rng.randint(10, 99))


def _wide_worked_multiplication(rng: random.Random) -> tuple[str, str]:
    """``431*254=`` -> ``431*4=1724;431*50=21550;431*200=86200;1724+21550+86200=109474``: three
    partial products and a sum of three, about 60 characters."""
    return _worked_product(rng.randint(100, 999), rng.randint(100, 999))


def _sorting(rng: random.Random) -> tuple[str, str]:
    """``sort:52,07,...=`` -> the 11 two-digit numbers in ascending order, duplicates kept."""
    numbers = [f"{rng.randint(0, 99):02d}" for _ in range(11)]
    return f"sort:{','.join(numbers)}=", ",".join(sorted(numbers))


LONG_SIZES = {"train": 20_000, "preference": 10_000, "validation": 500, "test": 1_000}

TASKS = {
    task.name: task
    for task in (
        Task(
            name="addition",
            description="five-digit addition, answer written most significant digit first",
            draw=_addition,
            sizes={"train": 20_000, "preference": 5_000, "validation": 500, "test": 1_000},
            seed=1,
        ),
        Task(
            name="multiplication",
            description="two-digit by two-digit multiplication",
            draw=_multiplication,
            # 8100 distinct problems in all: the rest of them form the preference split
            sizes={"train": 4_600, "preference": 2_000, "validation": 500, "test": 1_000},
            seed=2,
        ),
        Task(
            name="long-multiplication",
            description="three-digit by two-digit multiplication",
            draw=_long_multiplication,
            sizes={"train": 20_000, "preference": 5_000, "validation": 500, "test": 1_000},
            seed=3,
        ),
        Task(
            name="worked-multiplication",
            description="three-digit by two-digit multiplication, partial products written out",
            draw=_worked_multiplication,
            sizes=LONG_SIZES,  # of 81,000 distinct problems
            seed=4,
            max_length=56,
            max_prompt_length=16,
        ),
        Task(
            name="wide-worked-multiplication",
            description="three-digit by three-digit multiplication, partial products written out",
            draw=_wide_worked_multiplication,
            sizes=LONG_SIZES,  # of 810,000 distinct problems
            seed=7,
            max_length=80,
            max_prompt_length=16,
        ),
        Task(
            name="sorting",
            description="eleven two-digit numbers sorted in ascending order",
            draw=_sorting,
            sizes=LONG_SIZES,  # of 10**22 distinct lists
            seed=5,
            max_length=80,
            max_prompt_length=48,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


@functools.cache
def _problems(name: str) -> dict[str, tuple[tuple[str, str], ...]]:
    task = get_task(name)
    rng = random.Random(task.seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in DRAW_ORDER:
        drawn: list[tuple[str, str]] = []
        while len(drawn) < task.sizes[split]:
            prompt, answer = task.draw(rng)
            if prompt not in seen:
                seen.add(prompt)
                drawn.append((prompt, answer))
        splits[split] = drawn
    return {split: tuple(problems) for split, problems in splits.items()}


def task_problems(name: str, split: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` strings of one split, in their fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of builtin:{name}; choose one of {', '.join(SPLITS)}")
    return list(_problems(name)[split])


def task_dataset(name: str, split: str) -> Dataset:
    """One split as conversational ``prompt``/``completion`` rows."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": prompt}] for prompt, _ in task_problems(name, split)],
            "completion": [
                [{"role": "assistant", "content": answer}] for _, answer in task_problems(name, split)
            ],
        }
    )


def task_rows(
    tokenizer, name: str, split: str, count: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, gold_ids)`` of the first ``count`` rows of one split (all by default), within
    the task's token budgets."""
    from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset

    task = get_task(name)
    rows = task_dataset(name, split)
    if count is not None:
        rows = rows.select(range(min(count, len(rows))))
    rows = prepare_dataset(rows, tokenizer, task.max_length, task.max_prompt_length)
    return list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))


def task_accuracy(model, tokenizer, name: str, split: str, count: int | None = None) -> float:
    """Greedy exact match of ``model`` on the first ``count`` rows of one split (all by default)."""
    from sapo.evaluation import greedy_accuracy
    from sapo.policy import eos_token_ids

    rows = task_rows(tokenizer, name, split, count)
    return greedy_accuracy(model, rows, tokenizer.pad_token_id, eos_token_ids(model, tokenizer))


def edit_distance(first: Sequence[int], second: Sequence[int]) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of single tokens."""
    previous = list(range(len(second) + 1))
    for row, token in enumerate(first, start=1):
        current = [row]
        for column, other in enumerate(second, start=1):
            current.append(
                min(previous[column] + 1, current[-1] + 1, previous[column - 1] + (token != other))
            )
        previous = current
    return previous[-1]


def task_scores(
    model, tokenizer, name: str, split: str, count: int | None = None, batch_size: int = 256
) -> dict[str, float]:
    """Greedy answers of ``model`` on the first ``count`` rows of one split, scored two ways.

    ``exact_match``: the fraction of answers equal to the gold answer (EOS included).
    ``edit_distance``: the mean token edit distance to the gold answer over the gold's length
    (0 is right; one wrong digit of a 60-token answer is 1/60), a per-token score that credits an
    answer for its right steps. Answers may run up to the task's ``max_length``.
    """
    from sapo.evaluation import greedy_answers
    from sapo.policy import eos_token_ids

    task = get_task(name)
    rows = task_rows(tokenizer, name, split, count)
    prompts = [prompt for prompt, _ in rows]
    limits = [task.max_length - len(prompt) for prompt in prompts]
    ends = eos_token_ids(model, tokenizer)
    exact, distance = 0, 0.0
    answers = greedy_answers(model, prompts, limits, tokenizer.pad_token_id, ends, batch_size)
    for answer, (_, gold) in zip(answers, rows):
        exact += answer == list(gold)
        distance += edit_distance(answer, gold) / len(gold)
    return {"exact_match": exact / len(rows), "edit_distance": distance / len(rows)}
