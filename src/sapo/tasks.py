"""Synthetic tasks whose answers can be checked exactly, so SAPO can be tried and measured offline.

Each task draws problems (``"27611+84606="`` → ``"112217"``) from its own seeded generator. The splits
are fixed: problems are drawn in order, duplicates skipped, and the first ``test`` problems form
the test split, the next ``validation`` ones the validation split and the rest the training split.
The held-out splits are drawn first, so they never change when the training split grows, and no
prompt appears in two splits.

Rows are conversational ``prompt``/``completion`` pairs: SAPO reads them as one user turn and a
gold answer, TRL's ``SFTTrainer`` trains on the completion only.

Both are hard for the built-in tiny Llama: after 12,000 SFT steps of 32 rows it answers 89% of
unseen additions and 32% of unseen multiplications exactly (``scripts/make_warm_start.py``
measures the curves).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

SPLITS = ("train", "validation", "test")


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


TASKS = {
    task.name: task
    for task in (
        Task(
            name="addition",
            description="five-digit addition, answer written most significant digit first",
            draw=_addition,
            sizes={"train": 20_000, "validation": 500, "test": 1_000},
            seed=1,
        ),
        Task(
            name="multiplication",
            description="two-digit by two-digit multiplication",
            draw=_multiplication,
            # 8100 distinct problems in all: the rest of them form the training split
            sizes={"train": 6_600, "validation": 500, "test": 1_000},
            seed=2,
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
    for split in ("test", "validation", "train"):
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
