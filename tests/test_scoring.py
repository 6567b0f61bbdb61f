"""`sapo.scoring`: pair collation and summed response log-probs."""

import random

import pytest
import torch

from sapo.builtin.tiny import tiny_llama
from sapo.pairs import Pair
from sapo.scoring import collate_pairs, completion_logps

PAD = 0


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-5)


def test_collate_pairs_layout_and_masks():
    pairs = [
        Pair([11, 12, 13], [21, 22], [31]),
        Pair([14], [23], [32, 33, 34, 35]),
    ]
    batch = collate_pairs(pairs, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "scored_positions"}
    # 2B rows; width = the longest prompt+response over both sides (1 + 4 = 5)
    expected_ids = torch.tensor(
        [
            [11, 12, 13, 21, 22],  # pair 0, chosen
            [14, 23, PAD, PAD, PAD],  # pair 1, chosen
            [11, 12, 13, 31, PAD],  # pair 0, rejected
            [14, 32, 33, 34, 35],  # pair 1, rejected
        ]
    )
    expected_attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    expected_completion = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 1, 1]])
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["attention_mask"], expected_attention)
    assert torch.equal(batch["completion_mask"], expected_completion)
    # flat indices row * 5 + t of the positions t that predict a response token
    assert batch["scored_positions"].tolist() == [2, 3, 5, 12, 15, 16, 17, 18]
    for key in batch:
        assert batch[key].dtype == torch.long, key


def test_collate_pairs_random_shapes_and_masks():
    rng = random.Random(0)
    pad = 99
    for _ in range(20):
        b = rng.randint(1, 5)
        pairs = [
            Pair(
                [rng.randint(1, 50) for _ in range(rng.randint(1, 8))],
                [rng.randint(1, 50) for _ in range(rng.randint(1, 8))],
                [rng.randint(1, 50) for _ in range(rng.randint(1, 8))],
            )
            for _ in range(b)
        ]
        batch = collate_pairs(pairs, pad_token_id=pad)
        width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert batch[key].shape == (2 * b, width), key
        # the scored positions are those predicting a completion token
        predicts_response = torch.zeros(2 * b, width, dtype=torch.long)
        predicts_response[:, :-1] = batch["completion_mask"][:, 1:]
        assert batch["scored_positions"].tolist() == predicts_response.flatten().nonzero().flatten().tolist()
        for row in range(2 * b):
            pair = pairs[row % b]
            response = pair.chosen_ids if row < b else pair.rejected_ids
            n_prompt, n = len(pair.prompt_ids), len(pair.prompt_ids) + len(response)
            assert batch["input_ids"][row, :n].tolist() == pair.prompt_ids + response
            assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)  # right padding
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            # prompt and padding are out of the completion mask
            assert batch["completion_mask"][row].tolist() == [0] * n_prompt + [1] * len(response) + [0] * (
                width - n
            )


def _naive_logps(model, prompt, response):
    """Unpadded forward of one sequence; sum of log-probs of its response tokens."""
    sequence = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for position in range(len(prompt), sequence.shape[1]):
        total += log_probs[position - 1, sequence[0, position]].item()
    return total


def _random_pairs(tokenizer, n, seed):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    return [
        Pair(
            [rng.randrange(vocab) for _ in range(rng.randint(1, 12))],
            [rng.randrange(vocab) for _ in range(rng.randint(1, 10))],
            [rng.randrange(vocab) for _ in range(rng.randint(1, 10))],
        )
        for _ in range(n)
    ]


def test_completion_logps_matches_naive_loop(tokenizer, tiny_model):
    model = tiny_model.eval()
    pairs = _random_pairs(tokenizer, 5, seed=1)
    # make the lengths differ a lot so padding is heavy on some rows
    pairs[0].chosen_ids = pairs[0].chosen_ids * 3
    batch = collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logps, lengths = completion_logps(model, batch)
    assert logps.shape == (10,) and lengths.shape == (10,)
    expected, expected_lengths = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            expected.append(_naive_logps(model, pair.prompt_ids, getattr(pair, side)))
            expected_lengths.append(len(getattr(pair, side)))
    torch.testing.assert_close(
        logps.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    assert lengths.tolist() == expected_lengths
    assert (logps < 0).all()


def test_completion_logps_ignores_pad_id_and_is_differentiable(tokenizer):
    model = tiny_llama(tokenizer, seed=3)
    pairs = _random_pairs(tokenizer, 4, seed=2)
    batch = collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id)
    other = collate_pairs(pairs, pad_token_id=tokenizer.eos_token_id)
    assert not torch.equal(batch["input_ids"], other["input_ids"])  # padding present, and it differs
    logps, _ = completion_logps(model, batch)
    other_logps, _ = completion_logps(model, other)
    torch.testing.assert_close(logps, other_logps, rtol=1e-5, atol=1e-5)
    # gradients reach the model
    logps.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_completion_logps_excludes_prompt_tokens(tokenizer, tiny_model):
    # only response tokens are scored: the rejected row (one token longer) scores exactly one more
    model = tiny_model.eval()
    response = [20, 21, 22]
    pairs = [Pair([10, 11], response, response + [23])]
    batch = collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logps, lengths = completion_logps(model, batch)
    assert lengths.tolist() == [3, 4]
    assert logps[0].item() == approx(_naive_logps(model, [10, 11], response))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([[10, 11, 20, 21, 22, 23]])).logits[0], -1)
    extra = log_probs[4, 23].item()
    assert logps[1].item() == approx(logps[0].item() + extra)
