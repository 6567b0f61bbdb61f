"""`segment_placement="uncertain"`: the cut lands where the sampling model is least sure of the
gold answer, from one teacher-forced pass, and the span covers that token."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.generation import gold_token_probabilities, self_augmented_pairs
from sapo.sampling import Sampler
from sapo.segments import UNSURE_BELOW, cut_covering, last_cut, replaced_span, uncertain_position

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
MODEL = tiny_llama(TOKENIZER, seed=4, tie_word_embeddings=False).eval()
PROBABILITY = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def test_the_first_unsure_token_is_chosen():
    assert uncertain_position([0.9, 0.99, 0.4, 0.1, 0.3]) == 2
    assert uncertain_position([0.9, 0.6, 0.7, 0.95]) == 1  # none below 1/2: the least likely
    assert uncertain_position([0.8, 0.6, 0.6]) == 1  # the first of equals
    with pytest.raises(ValueError, match="no tokens"):
        uncertain_position([])


@given(st.lists(PROBABILITY, min_size=1, max_size=40), st.integers(1, 12), st.integers(0, 10))
def test_the_span_covers_the_chosen_token(probabilities, segment_length, prompt_length):
    highest = last_cut(prompt_length, len(probabilities), segment_length, None)
    span = replaced_span(len(probabilities), segment_length)
    position = uncertain_position(probabilities[: highest + span])
    cut = cut_covering(position, highest)
    assert 0 <= cut <= highest and cut <= position < cut + span
    unsure = [i for i, p in enumerate(probabilities) if p < UNSURE_BELOW]
    if unsure:
        assert position == unsure[0]
    else:
        assert probabilities[position] == min(probabilities)


def rows(seed=0, count=6):
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        prompt = torch.randint(
            6, len(TOKENIZER), (int(torch.randint(2, 7, (1,), generator=generator)),), generator=generator
        )
        gold = torch.randint(
            6, len(TOKENIZER), (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator
        )
        made.append((prompt.tolist(), gold.tolist() + [EOS]))
    return made


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gold_token_probabilities_are_the_models_own(chunk_size):
    batch = rows()
    probabilities = gold_token_probabilities(MODEL, batch, PAD, chunk_size)
    for (prompt, gold), probs in zip(batch, probabilities):
        with torch.no_grad():
            logits = MODEL(torch.tensor([prompt + gold])).logits[0]
        expected = torch.softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1].gather(
            1, torch.tensor(gold)[:, None]
        )
        torch.testing.assert_close(torch.tensor(probs), expected[:, 0], atol=1e-5, rtol=1e-5)


def test_uncertain_pairs_are_cut_where_the_model_is_least_sure():
    batch = rows(seed=1)
    cut_generator = torch.Generator().manual_seed(0)
    before = cut_generator.get_state()
    negatives = self_augmented_pairs(
        MODEL, batch, Sampler(PAD, [EOS], seed=0), cut_generator, 4, None, placement="uncertain"
    )
    assert torch.equal(cut_generator.get_state(), before)  # placed, not drawn
    probabilities = gold_token_probabilities(MODEL, batch, PAD)
    for (prompt, gold), probs, pair, cut, placed in zip(
        batch, probabilities, negatives.pairs, negatives.cut_positions, negatives.placed_probabilities
    ):
        span = replaced_span(len(gold), 4)
        highest = last_cut(len(prompt), len(gold), 4, None)
        position = uncertain_position(probs[: highest + span])
        assert cut == cut_covering(position, highest) / len(gold)
        assert placed == pytest.approx(probs[position])
        assert pair.rejected_ids[: round(cut * len(gold))] == gold[: round(cut * len(gold))]


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1000))
def test_uniform_pairs_draw_their_cuts(seed):
    batch = rows(seed=seed % 7)
    negatives = self_augmented_pairs(
        MODEL, batch, Sampler(PAD, [EOS], seed=seed), torch.Generator().manual_seed(seed), 4, None
    )
    assert negatives.placed_probabilities is None
    for (prompt, gold), cut in zip(batch, negatives.cut_positions):
        assert 0 <= cut * len(gold) <= last_cut(len(prompt), len(gold), 4, None) + 1e-9


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement='middle'"):
        self_augmented_pairs(
            MODEL, rows(), Sampler(PAD, [EOS]), torch.Generator(), 4, None, placement="middle"
        )
