"""Teacher-forced passes outside training never ask the model for the logits of every position:
the LM head runs on the scored positions in chunks (`sapo.logprobs.position_logps`), and the model's
own head sees at most one position per row (the sampler's next token)."""

import torch

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.evaluation import margin_batches
from sapo.generation import gold_token_probabilities

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id


def rows(count=5):
    return [
        (TOKENIZER(f"{i}+{i}=")["input_ids"], TOKENIZER(f"{2 * i}")["input_ids"] + [EOS])
        for i in range(count)
    ]


def positions_per_head_call(model):
    """The number of positions of every output of the model's LM head, as the model calls it."""
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.shape[-2]))
    return seen


def test_gold_token_probabilities_run_the_head_in_chunks():
    model = tiny_llama(TOKENIZER, seed=0, tie_word_embeddings=False).eval()
    seen = positions_per_head_call(model)
    probabilities = gold_token_probabilities(model, rows(), PAD)
    assert seen == [0]  # the chunks ran outside the model's forward
    assert [len(row) for row in probabilities] == [len(gold) for _, gold in rows()]
    # the model's own logits (no chunks): only from the shortest prompt's last position on
    gold_token_probabilities(model, rows(), PAD, chunk_size=0)
    width = max(len(prompt) + len(gold) for prompt, gold in rows())
    first = min(len(prompt) for prompt, _ in rows()) - 1
    assert seen[-1] == width - first < width


def test_held_out_margins_never_take_every_positions_logits():
    model = tiny_llama(TOKENIZER, seed=0, tie_word_embeddings=False).eval()
    seen = positions_per_head_call(model)
    batches = list(margin_batches(model, rows(), PAD, [EOS], segment_length=2, seed=0, batch_size=4))
    assert [len(gold) for gold, _ in batches] == [4, 1]
    assert seen and max(seen) <= 1  # sampling: one position per row; scoring: chunks, none here
    unchunked = list(
        margin_batches(model, rows(), PAD, [EOS], segment_length=2, seed=0, batch_size=4, chunk_size=0)
    )
    assert max(seen) > 1  # the whole-logits path is what the chunks replace
    for (gold, margin), (gold_whole, margin_whole) in zip(batches, unchunked):
        torch.testing.assert_close(gold, gold_whole, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(margin, margin_whole, atol=1e-4, rtol=1e-5)
