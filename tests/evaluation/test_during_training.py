"""Evaluation while SAPO trains: held-out margins at Trainer's evaluation steps (the same numbers
as sapo.evaluation.margins), lm-eval tasks every eval_lm_steps steps, pairs.jsonl; none of them
changes what the run trains."""

import json

import pytest
import torch
from conftest import addition_rows
from datasets import Dataset
from test_harness import write_echo_task
from test_trainer import make_args as trainer_args

from sapo import SAPOTrainer
from sapo.builtin.tiny import tiny_llama
from sapo.data import prepare_dataset
from sapo.evaluation import held_out_scores
from sapo.evaluation.during_training import held_out_metrics


def make_args(tmp_path, **overrides):
    settings = dict(segment_length=3, max_steps=6, logging_steps=3, log_pairs_steps=0)
    return trainer_args(tmp_path, **{**settings, **overrides})


def trainer_for(tmp_path, tokenizer, **overrides):
    return SAPOTrainer(
        model=tiny_llama(tokenizer, seed=0),
        args=make_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(addition_rows(48, seed=0)),
        eval_dataset=Dataset.from_list(addition_rows(12, seed=1)),
        processing_class=tokenizer,
    )


def test_held_out_metrics_are_the_margins_of_sapo_evaluation(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, per_device_eval_batch_size=5)
    metrics = trainer.evaluate()
    rows = prepare_dataset(Dataset.from_list(addition_rows(12, seed=1)), tokenizer, 2048, None)
    pairs = list(zip(rows["prompt_ids"], rows["gold_ids"]))
    expected = held_out_scores(
        trainer.model, pairs, tokenizer.pad_token_id, trainer.eos_token_ids, 3, False, seed=0, batch_size=5
    )
    for name, value in expected.items():
        assert metrics[f"eval_{name}"] == pytest.approx(value, abs=1e-6)
    assert trainer.state.log_history[-1]["eval_margin"] == metrics["eval_margin"]
    # a dataset given to evaluate() is tokenized as the training rows are
    again = trainer.evaluate(Dataset.from_list(addition_rows(12, seed=1)), metric_key_prefix="test")
    assert again["test_margin"] == pytest.approx(metrics["eval_margin"], abs=1e-6)


def test_held_out_metrics_need_rows(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="eval_dataset"):
        held_out_metrics(trainer.model, None, tokenizer, trainer.args, trainer.accelerator)


def test_training_logs_eval_metrics_and_pairs_without_changing_the_run(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_echo_task(tmp_path)
    watched = trainer_for(
        tmp_path / "watched", tokenizer, eval_strategy="steps", eval_steps=2, log_pairs_steps=3,
        eval_lm_tasks="echo", eval_lm_include_path=str(tmp_path), eval_lm_steps=3, eval_lm_limit=2,
    )  # fmt: skip
    watched.train()
    plain = trainer_for(tmp_path / "plain", tokenizer)
    plain.train()
    for (name, a), b in zip(watched.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name
    evaluations = [entry for entry in watched.state.log_history if "eval_margin" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4, 6]
    assert {"eval_win_rate", "eval_gold_logp", "eval_runtime"} <= set(evaluations[0])
    harness = [entry for entry in watched.state.log_history if "eval_echo/exact_match,none" in entry]
    assert [entry["step"] for entry in harness] == [3, 6]
    train_logs = [entry for entry in watched.state.log_history if "loss" in entry]
    assert train_logs and not any(name.startswith("eval_") for entry in train_logs for name in entry)
    records = [
        json.loads(line) for line in (tmp_path / "watched" / "out" / "pairs.jsonl").read_text().splitlines()
    ]
    assert [record["step"] for record in records] == [3] * 4 + [6] * 4
    assert all(set(record) >= {"prompt", "chosen", "rejected", "rewritten_span"} for record in records)


def test_logging_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="log_pairs_steps=-1"):
        make_args(tmp_path, log_pairs_steps=-1)
    with pytest.raises(ValueError, match="eval_lm_steps=0"):
        make_args(tmp_path, eval_lm_steps=0)
    with pytest.raises(ValueError, match="eval_lm_limit=0"):
        make_args(tmp_path, eval_lm_limit=0)
