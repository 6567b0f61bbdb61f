"""lm-evaluation-harness on an in-memory model: task names, data errors naming the task, metrics
as the harness names them, and a run that leaves the model's mode and the random state alone."""

import json
import random

import numpy as np
import pytest
import torch
import yaml

from sapo.builtin.tiny import tiny_llama
from sapo.evaluation.harness import load_tasks, run_tasks, task_manager, task_metrics, task_names


def write_echo_task(folder):
    """A local generate_until task, ``echo``, in ``folder``; returns its data file."""
    data = folder / "echo.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}=", "answer": str(i)}) + "\n" for i in range(4)))
    config = {
        "task": "echo",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "question",  # column names
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["<|end|>"], "max_gen_toks": 4},
        "metric_list": [{"metric": "exact_match"}],
    }
    (folder / "echo.yaml").write_text(yaml.safe_dump(config))
    return data


@pytest.fixture
def echo_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path, write_echo_task(tmp_path)


def test_task_names_split_on_commas():
    assert task_names("ifeval, gsm8k,,") == ["ifeval", "gsm8k"]
    assert task_names(["a", " b "]) == ["a", "b"]
    with pytest.raises(ValueError, match="tasks"):
        task_names(" , ")


def test_a_task_whose_data_is_missing_fails_naming_it(echo_task):
    folder, data = echo_task
    data.unlink()
    manager = task_manager(["echo"], str(folder))
    with pytest.raises(ValueError, match="tasks: echo: cannot load"):
        load_tasks(manager, ["echo"])


def seed_all(seed):
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


def draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_a_run_leaves_the_model_mode_and_the_random_state_alone(echo_task, tokenizer):
    folder, _ = echo_task
    manager = task_manager(["echo"], str(folder))
    tasks = load_tasks(manager, ["echo"])
    model = tiny_llama(tokenizer, seed=0).train()
    seed_all(5)
    expected = draws()
    seed_all(5)
    results = run_tasks(model, tokenizer, tasks, manager, limit=2, batch_size=2)
    assert draws() == expected  # the harness seeds the generators itself: put back
    assert model.training
    metrics = task_metrics(results)
    assert set(metrics) == {"echo"} and set(metrics["echo"]) >= {"exact_match,none"}
    assert results["n-samples"]["echo"]["effective"] == 2


def test_task_metrics_keep_the_harness_names_and_numbers_only():
    results = {
        "results": {
            "t": {"alias": "t", "name": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "g": {"alias": "g", "exact_match,strict": 1, "exact_match_stderr,strict": 0.0},
        }
    }
    assert task_metrics(results) == {
        "t": {"acc,none": 0.5},
        "g": {"exact_match,strict": 1.0, "exact_match_stderr,strict": 0.0},
    }
    assert task_metrics(results, with_stderr=False)["g"] == {"exact_match,strict": 1.0}
