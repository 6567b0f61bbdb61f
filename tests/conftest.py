"""Shared fixtures: an offline char-level tokenizer, tiny Llamas and a small arithmetic task."""

import os
import random

import pytest
import torch
from datasets import Dataset

from sapo.builtin.tiny import char_tokenizer, tiny_llama

# under pytest-xdist (`-n`) every worker gets its share of the cores: torch's default, a thread
# per core in each worker, would have the workers' threads wait on each other
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
