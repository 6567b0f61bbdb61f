"""Exact-match accuracy by batched greedy decoding, and the batch-wise margin behind the progress bars."""

import pytest
import torch

from sapo.builtin.tiny import tiny_llama
from sapo.evaluation import greedy_accuracy, held_out_scores, margin_batches


def greedy_one_by_one(model, prompt, length, tokenizer):
    output = model.generate(
        input_ids=torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return output[0, len(prompt) :].tolist()


def test_greedy_accuracy_counts_exactly_the_rows_whose_gold_is_the_greedy_answer(tokenizer):
    model = tiny_llama(tokenizer, seed=3).eval()
    # prompts of different lengths, so batching must left-pad correctly
    prompts = [tokenizer(f"{'x' * (i % 5)}{i}+{i}=")["input_ids"] for i in range(12)]
    greedy = [greedy_one_by_one(model, prompt, 4, tokenizer) for prompt in prompts]
    rows = []
    for i, (prompt, answer) in enumerate(zip(prompts, greedy)):
        wrong = [(answer[0] + 1) % len(tokenizer)] + answer[1:]
        rows.append((prompt, answer if i % 3 == 0 else wrong))
    assert (
        greedy_accuracy(model, rows, tokenizer.pad_token_id, [tokenizer.eos_token_id], batch_size=5) == 4 / 12
    )


def test_greedy_accuracy_needs_the_answer_to_stop(tokenizer):
    model = tiny_llama(tokenizer, seed=3).eval()
    prompt = tokenizer("12+34=")["input_ids"]
    answer = greedy_one_by_one(model, prompt, 3, tokenizer)
    assert tokenizer.eos_token_id not in answer
    rows = [(prompt, answer), (prompt, answer + [tokenizer.eos_token_id])]
    # the second gold ends in EOS where the model goes on: not a match
    assert greedy_accuracy(model, rows, tokenizer.pad_token_id, [tokenizer.eos_token_id]) == 0.5


def test_margin_batches_add_up_to_the_held_out_scores(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    rows = [
        (tokenizer(f"{i}+{i}=")["input_ids"], tokenizer(f"{2 * i}")["input_ids"] + [2]) for i in range(10)
    ]
    batches = list(
        margin_batches(model, rows, tokenizer.pad_token_id, [2], segment_length=2, seed=4, batch_size=4)
    )
    assert [len(gold) for gold, _ in batches] == [4, 4, 2]
    whole = held_out_scores(
        model, rows, tokenizer.pad_token_id, [2], segment_length=2, with_accuracy=False, seed=4, batch_size=4
    )
    margins = torch.cat([margin for _, margin in batches])
    assert whole["margin"] == pytest.approx(margins.mean().item())
    assert whole["win_rate"] == pytest.approx((margins > 0).float().mean().item())
    combined = held_out_scores(
        model, rows, tokenizer.pad_token_id, [2], 2, with_accuracy=True, seed=4, batch_size=4
    )
    assert combined == pytest.approx({**whole, "accuracy": combined["accuracy"]})
    assert model.training  # evaluation puts the model back in the mode it found it in
