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
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

SPLITS = ("train", "preference", "validation", "test")
# every built-in prompt and answer fits these token budgets (one token per character)
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
    """

    name: str
    description: str
    draw: Callable[[random.Random], tuple[str, str]]
    sizes: dict[str, int]
    seed: int


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10_000, 99_999), rng.randint(10_000, 99_999)
    return f"{a}+{b}=", str(a + b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}*{b}=", str(a * b)


def _long_multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    return f"{a}*{b}=", str(a * b)


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


def task_accuracy(model, tokenizer, name: str, split: str, count: int | None = None) -> float:
    """Greedy exact match of ``model`` on the first ``count`` rows of one split (all by default)."""
    from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
    from sapo.evaluation import greedy_accuracy
    from sapo.policy import eos_token_ids

    rows = task_dataset(name, split)
    if count is not None:
        rows = rows.select(range(min(count, len(rows))))
    rows = prepare_dataset(rows, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    pairs = list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))
    return greedy_accuracy(model, pairs, tokenizer.pad_token_id, eos_token_ids(model, tokenizer))
