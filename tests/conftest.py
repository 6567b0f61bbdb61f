"""Shared fixtures: an offline char-level tokenizer, tiny Llamas and a small arithmetic task."""

import random

import pytest
from datasets import Dataset

from sapo.builtin.tiny import char_tokenizer, tiny_llama


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, seed=0)


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """`messages` rows of two-digit addition: prompt "a+b=", gold answer the sum."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{a}+{b}="},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        )
    return rows


@pytest.fixture
def addition_dataset():
    return Dataset.from_list(addition_rows(64, seed=0))
