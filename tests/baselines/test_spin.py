"""SPIN baseline: generate-then-train iterations built from sapo's components."""

import pytest
import torch
from test_trainer import held_out_margin

from sapo.baselines.spin import SPINConfig, generate_answers, run_spin
from sapo.builtin.tiny import tiny_llama


def spin_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        spin_iterations=2,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_new_tokens=6,
        max_length=64,
        max_prompt_length=32,
        logging_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return SPINConfig(**settings)


def test_spin_trains_against_its_own_answers(tmp_path, tokenizer, addition_dataset):
    start = tiny_llama(tokenizer, seed=0)
    before = held_out_margin(start, tokenizer)
    model, histories = run_spin(
        tiny_llama(tokenizer, seed=0), spin_args(tmp_path), addition_dataset, tokenizer
    )
    after = held_out_margin(model, tokenizer)
    assert len(histories) == 2
    for iteration, history in enumerate(histories, start=1):
        generation = history[0]
        assert generation["spin/iteration"] == iteration
        # every prompt of the dataset gets an answer of at least one token
        assert generation["spin/generated_tokens"] >= len(addition_dataset)
        assert generation["spin/generation_seconds"] > 0
        logged = set().union(*(entry.keys() for entry in history))
        assert {"rewards/margins", "rewards/accuracies", "logps/rejected"} <= logged
    assert (tmp_path / "iteration-1" / "config.json").exists() and (
        tmp_path / "iteration-2" / "config.json"
    ).exists()
    assert after["gold_logp"] > before["gold_logp"]
    assert after["margin"] > before["margin"], (before, after)


def test_greedy_answers_are_the_models_argmax(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, seed=0)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "12+34="}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answers = generate_answers(
        model, [(prompt, [0])], tokenizer, spin_args(tmp_path, max_new_tokens=4), seed=0
    )
    ids = torch.tensor([prompt])
    expected = []
    with torch.no_grad():
        for _ in range(4):
            token = int(model(ids).logits[0, -1].argmax())
            expected.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert answers == [expected]


@pytest.mark.parametrize("field, value", [("spin_iterations", 0), ("beta", 0.0), ("temperature", -1.0)])
def test_spin_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        spin_args(tmp_path, **{field: value})


@pytest.mark.parametrize("mix", [True, False])
def test_later_iterations_mix_in_the_previous_iterations_pairs(
    tmp_path, tokenizer, addition_dataset, monkeypatch, mix
):
    import sapo.baselines.spin

    answers, datasets = [], []
    generate = sapo.baselines.spin.generate_answers
    monkeypatch.setattr(
        sapo.baselines.spin,
        "generate_answers",
        lambda *a, **k: answers.append(generate(*a, **k)) or answers[-1],
    )

    class RecordingTrainer(sapo.baselines.spin.PairTrainer):
        def __init__(self, model, args, pairs, *rest, **kwargs):
            datasets.append(pairs)
            super().__init__(model, args, pairs, *rest, **kwargs)

    monkeypatch.setattr(sapo.baselines.spin, "PairTrainer", RecordingTrainer)
    args = spin_args(tmp_path, spin_iterations=3, max_steps=1, mix_previous_iteration=mix)
    _, histories = run_spin(tiny_llama(tokenizer, seed=0), args, addition_dataset, tokenizer)
    count = len(addition_dataset)
    assert [history[0]["spin/pairs"] for history in histories] == [count, *[2 * count if mix else count] * 2]
    for iteration in (1, 2):  # the previous iteration's answers are rejected answers here
        rejected = datasets[iteration]["rejected_ids"]
        assert rejected[:count] == answers[iteration]
        assert (rejected[count:] == answers[iteration - 1]) if mix else len(rejected) == count
