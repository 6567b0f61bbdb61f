"""`sapo.sampling.draw`: the own loop's draw among the top-k candidates gives every token the
probability transformers' warpers give it (softmax of the warped logits over the whole vocabulary)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.sampling import SamplingSettings
from sapo.sampling.backends import generation_config
from sapo.sampling.draw import NUCLEUS_SIZES, candidate_distribution, draw_next_tokens

# chi-square statistic exceeded with probability 1e-4, by degrees of freedom
CHI_SQUARE_CRITICAL = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9, 8: 31.8, 9: 33.7}


def warped_probabilities(logits, temperature, top_k, top_p):
    """What `generate` samples from: its warpers in its order (temperature, top-k, top-p, each
    only where it is on), then the softmax over the whole vocabulary."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return torch.softmax(warpers(None, logits.clone()), dim=-1)


@pytest.mark.parametrize("knobs", [(0.7, 50, 0.95), (0.5, 5, 0.5), (1.3, 0, 0.9), (1.0, 3, 1.0)])
def test_the_reference_is_what_generate_samples_from(knobs):
    """`warped_probabilities`, the reference of these tests, warps as `generate` does: from the
    model's logits at each step it gives the softmax of `generate`'s own processed scores."""
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer, seed=1, tie_word_embeddings=False).eval()
    temperature, top_k, top_p = knobs
    settings = SamplingSettings(tokenizer.pad_token_id, (tokenizer.eos_token_id,), temperature, top_p, top_k)
    output = model.generate(
        input_ids=torch.tensor([[40, 41, 42], [50, 51, 52]]),
        generation_config=generation_config(settings, 6),
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for logits, scores in zip(output.logits, output.scores):
        assert torch.equal(warped_probabilities(logits, *knobs), torch.softmax(scores, dim=-1))


def draw_probabilities(logits, temperature, top_k, top_p):
    """The draw's probabilities, laid out over the whole vocabulary."""
    probabilities, ids = candidate_distribution(logits, temperature, top_k, top_p)
    in_order = ids.sort(dim=-1).values
    assert ids.shape == probabilities.shape and (in_order[:, 1:] != in_order[:, :-1]).all()  # no id twice
    return torch.zeros_like(logits).scatter_add_(1, ids, probabilities)


def assert_same_distribution(logits, temperature, top_k, top_p):
    """Each logit value gets the warpers' probability, and every token of that value that is kept
    gets the warpers' probability of one such token: token for token where logits are distinct.
    (Among equal logits at the nucleus boundary transformers keeps whichever its unstable sort
    puts last, the draw the lowest ids.)"""
    expected = warped_probabilities(logits, temperature, top_k, top_p)
    drawn = draw_probabilities(logits, temperature, top_k, top_p)
    for row in range(logits.shape[0]):
        values, group = logits[row].unique(return_inverse=True)
        per_value = torch.zeros(len(values), dtype=torch.float64)
        drawn_mass = per_value.scatter_add(0, group, drawn[row].double())
        expected_mass = per_value.scatter_add(0, group, expected[row].double())
        assert torch.allclose(drawn_mass, expected_mass, rtol=1e-5, atol=1e-7)
        each = per_value.scatter_reduce(0, group, expected[row].double(), "amax")[group]
        kept = drawn[row] > 0
        assert torch.allclose(drawn[row][kept].double(), each[kept], rtol=1e-5, atol=1e-7)
        kept_count = per_value.scatter_add(0, group, kept.double())
        for partly_kept in torch.nonzero((kept_count > 0) & (kept_count < group.bincount())).flatten():
            members = group == partly_kept
            assert kept[members].nonzero().max() < (~kept & members).nonzero().min()  # the lowest ids
    return drawn


def random_logits(seed, rows, vocabulary, kind):
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(rows, vocabulary, generator=generator) * 3
    if kind == "ties":  # few distinct values: ties at the k-th logit and at the nucleus boundary
        return torch.randint(0, 4, (rows, vocabulary), generator=generator).float() / 2
    # peaked, as a language model's next-token distribution: Zipf-like, shuffled over the ids
    ranks = torch.arange(1, vocabulary + 1, dtype=torch.float32)
    shuffled = torch.stack([torch.randperm(vocabulary, generator=generator) for _ in range(rows)])
    return (-1.5 * ranks.log())[shuffled] + 0.1 * torch.randn(rows, vocabulary, generator=generator)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 3),
    vocabulary=st.sampled_from([2, 7, 60, 700, 3000]),
    kind=st.sampled_from(["normal", "ties", "peaked"]),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 2, 5, 50, 5000]),
    top_p=st.sampled_from([1.0, 0.95, 0.9, 0.5, 0.1, 1e-3]),
)
def test_same_probabilities_as_the_warpers(seed, rows, vocabulary, kind, temperature, top_k, top_p):
    assert_same_distribution(random_logits(seed, rows, vocabulary, kind), temperature, top_k, top_p)


def test_ties_at_the_k_th_logit_are_all_kept():
    logits = torch.tensor([[3.0, 2.0, 1.0, 2.0, 2.0, 0.5, 2.0, -1.0]])
    drawn = assert_same_distribution(logits, 1.0, 2, 1.0)
    assert (drawn[0] > 0).tolist() == [True, True, False, True, True, False, True, False]
    # a tie made by the temperature's division (neighbouring floats, equal once divided) counts too
    close = torch.tensor([[5.0, 1.5 + 2**-23, 1.5, 0.0]])
    assert close[0, 1] > close[0, 2] and close[0, 1] / 0.3 == close[0, 2] / 0.3
    assert (assert_same_distribution(close, 0.3, 2, 1.0)[0] > 0).tolist() == [True, True, True, False]


def test_top_p_edge_cases():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    # the most likely token alone holds more than top_p: it is the only one left
    assert (assert_same_distribution(logits, 1.0, 0, 0.3)[0] > 0).tolist() == [True] + [False] * 4
    assert (assert_same_distribution(logits, 1.0, 3, 1e-6)[0] > 0).tolist() == [True] + [False] * 4
    # a cumulative probability exactly at 1 - top_p is removed (four equal tokens: 0.25, 0.5, ...)
    equal = torch.zeros(1, 4)
    assert (assert_same_distribution(equal, 1.0, 0, 0.5)[0] > 0).sum() == 2
    assert (assert_same_distribution(equal, 1.0, 4, 0.5)[0] > 0).sum() == 2
    # equal logits at the boundary: as many kept as transformers keeps (0.25 <= 0.4 removed), the
    # lowest ids
    assert (assert_same_distribution(equal, 1.0, 0, 0.6)[0] > 0).tolist() == [True, True, True, False]
    among_top_k = torch.tensor([[0.0, 0.0, -9.0, 0.0, 0.0]])
    kept = assert_same_distribution(among_top_k, 1.0, 4, 0.6)[0] > 0
    assert kept.tolist() == [True, True, False, True, False]
    # a top_p below float32's resolution: every cumulative probability is removed but the last's
    assert (assert_same_distribution(logits, 1.0, 0, 1e-9)[0] > 0).tolist() == [True] + [False] * 4
    assert (assert_same_distribution(logits, 0.7, 2, 1e-9)[0] > 0).tolist() == [True] + [False] * 4
    # top_p just below 1 keeps all but the tail the warper drops
    assert_same_distribution(torch.randn(2, 500), 0.7, 0, 0.999)


def test_without_top_k_the_nucleus_comes_from_a_partial_top_k():
    peaked, flat = random_logits(0, 2, 20000, "peaked"), random_logits(0, 2, 20000, "normal") / 10
    probabilities, ids = candidate_distribution(peaked, 0.7, 0, 0.95)
    assert ids.shape[-1] in NUCLEUS_SIZES  # no full sort
    assert_same_distribution(peaked, 0.7, 0, 0.95)
    # a tie across the edge of the first partial top-k, inside the nucleus: the tied tokens the
    # nucleus keeps are the lowest ids of all of them, not of those the partial top-k returned
    generator = torch.Generator().manual_seed(3)
    tied = torch.full((1, 3000), -30.0)
    ids = torch.randperm(3000, generator=generator)
    tied[0, ids[:40]], tied[0, ids[40:140]] = 10.0, 9.0
    drawn = assert_same_distribution(tied, 1.0, 0, 0.6)
    assert 0 < int((drawn[0, ids[40:140]] > 0).sum()) < 100
    probabilities, ids = candidate_distribution(flat, 1.0, 0, 0.95)
    assert ids.shape[-1] == 20000  # most of the vocabulary: sorted whole
    assert_same_distribution(flat, 1.0, 0, 0.95)


# (temperature, top_k, top_p)
FREQUENCY_KNOBS = {"sapo": (0.7, 5, 0.9), "top_p": (1, 0, 0.8), "top_k": (1.3, 3, 1), "plain": (0.5, 0, 1)}


@pytest.mark.parametrize("knobs", FREQUENCY_KNOBS.values(), ids=FREQUENCY_KNOBS.keys())
def test_draw_frequencies_follow_the_warpers(knobs):
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.3, 2.0, -2.0, 0.9, 1.4, -1.0, 0.0]])
    expected = warped_probabilities(logits, *knobs)[0]
    draws = 40000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = draw_next_tokens(logits.expand(draws, -1).contiguous(), *knobs)
    counts = torch.bincount(tokens, minlength=logits.shape[-1]).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing drawn that the warpers removed
    expected_counts = expected[support].double() * draws
    critical = CHI_SQUARE_CRITICAL[int(support.sum()) - 1]
    assert chi_square(counts[support], expected_counts) < critical
    # the same draws against another distribution over the same tokens fail the check
    assert chi_square(counts[support], torch.roll(expected_counts, 1)) > critical


def test_a_draw_over_the_whole_vocabulary_keeps_to_the_nucleus():
    """Without top-k a flat distribution's nucleus is most of the vocabulary: the draw then inverts
    the sorted cumulative sums. Every token drawn is one the warpers keep, and the drawn logits
    average what the warpers' distribution gives (within 5 standard errors)."""
    logits = random_logits(2, 1, 3000, "normal") / 10
    expected = warped_probabilities(logits, 1.0, 0, 0.5)[0].double()
    assert int((expected > 0).sum()) > NUCLEUS_SIZES[-1]  # no partial top-k holds it
    draws = 20000
    with torch.random.fork_rng():
        torch.manual_seed(1)
        tokens = draw_next_tokens(logits.expand(draws, -1).contiguous(), 1.0, 0, 0.5)
    assert expected[tokens].min() > 0
    values = logits[0].double()
    mean = float((expected * values).sum())
    spread = float((expected * (values - mean) ** 2).sum()) ** 0.5
    assert abs(float(values[tokens].mean()) - mean) < 5 * spread / draws**0.5
    # the check can fail: draws from the whole vocabulary would average far outside that band
    assert abs(float(values.mean()) - mean) > 50 * spread / draws**0.5


def chi_square(counts, expected_counts):
    return float(((counts - expected_counts) ** 2 / expected_counts).sum())


def test_greedy_is_the_argmax():
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw_next_tokens(logits, 1.0, 1, 1.0), logits.argmax(dim=-1))
    assert torch.equal(draw_next_tokens(logits, 0.7, 1, 0.95), logits.argmax(dim=-1))


@pytest.mark.parametrize("knobs", [(0.7, 50, 0.95), (1.0, 0, 0.9), (1.0, 0, 1.0)])
def test_non_finite_logits_fail_as_the_warpers_do(knobs):
    logits = torch.randn(2, 300)
    logits[1, 17] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        draw_next_tokens(logits, *knobs)
