"""Tests for ``sapo.segments``: the replaced span, the cut point and the rejected-answer splice.

Step 1 of SAPO's loop: ``L = min(segment_length, len(g))``; ``c`` uniform in ``[0, len(g) - L]``, capped so
that ``len(p) + c + L <= max_length``; ``r = g[:c] + s + g[c+L:]``, or ``g[:c] + s[:first_eos+1]``
when the segment contains EOS.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo.segments import replaced_span, sample_cut, splice

SETTINGS = settings(max_examples=200, deadline=None)

# Ordinary tokens are 0..49; EOS ids are drawn from 100..103 so they never collide with them.
TOKENS = st.integers(min_value=0, max_value=49)
EOS_CHOICES = (100, 101, 102, 103)


@st.composite
def eos_spec(draw):
    """An EOS given as one int or as a non-empty list of ints; returns (eos_token_id, eos_set)."""
    ids = draw(st.lists(st.sampled_from(EOS_CHOICES), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        return ids[0], {ids[0]}
    return list(ids), set(ids)


@st.composite
def gold_and_cut(draw):
    """A gold answer, a segment_length, its replaced span L and a valid cut in [0, len(gold) - L]."""
    gold = draw(st.lists(TOKENS, min_size=1, max_size=40))
    segment_length = draw(st.integers(min_value=1, max_value=50))
    span = min(segment_length, len(gold))
    cut = draw(st.integers(min_value=0, max_value=len(gold) - span))
    return gold, segment_length, span, cut


# --------------------------------------------------------------------------------------------------
# replaced_span


@SETTINGS
@given(
    gold_length=st.integers(min_value=0, max_value=500),
    segment_length=st.integers(min_value=1, max_value=500),
)
def test_replaced_span_is_min_of_segment_length_and_gold_length(gold_length, segment_length):
    assert replaced_span(gold_length, segment_length) == min(segment_length, gold_length)


@pytest.mark.parametrize("segment_length", [0, -1, -256])
def test_replaced_span_rejects_non_positive_segment_length(segment_length):
    with pytest.raises(ValueError):
        replaced_span(10, segment_length)


# --------------------------------------------------------------------------------------------------
# splice


@SETTINGS
@given(data=gold_and_cut(), eos=eos_spec(), st_data=st.data())
def test_splice_without_eos_replaces_exactly_the_span(data, eos, st_data):
    gold, segment_length, span, cut = data
    eos_token_id, _ = eos
    # The EMA samples *up to* L tokens; a segment may be shorter than the span.
    segment = st_data.draw(st.lists(TOKENS, min_size=0, max_size=span))

    rejected = splice(gold, cut, segment, segment_length, eos_token_id)

    assert isinstance(rejected, list)
    assert rejected[:cut] == gold[:cut]
    assert len(rejected) == len(gold) - span + len(segment)
    assert rejected[cut : cut + len(segment)] == segment
    assert rejected[cut + len(segment) :] == gold[cut + span :]


@SETTINGS
@given(data=gold_and_cut(), eos=eos_spec(), st_data=st.data())
def test_splice_with_eos_ends_at_first_eos_and_drops_gold_tail(data, eos, st_data):
    gold, segment_length, span, cut = data
    eos_token_id, eos_set = eos
    # A segment with at least one EOS in it; tokens after the first EOS may be anything (more EOS too).
    before = st_data.draw(st.lists(TOKENS, min_size=0, max_size=max(span - 1, 0)))
    first_eos = st_data.draw(st.sampled_from(sorted(eos_set)))
    after = st_data.draw(
        st.lists(
            st.one_of(TOKENS, st.sampled_from(EOS_CHOICES)),
            min_size=0,
            max_size=max(span - 1 - len(before), 0),
        )
    )
    segment = before + [first_eos] + after

    rejected = splice(gold, cut, segment, segment_length, eos_token_id)

    assert rejected == gold[:cut] + before + [first_eos]
    assert rejected[:cut] == gold[:cut]
    assert rejected[-1] in eos_set
    assert len(rejected) == cut + len(before) + 1
    # Nothing in the rejected answer after the cut precedes the first EOS in the segment.
    assert not any(token in eos_set for token in rejected[cut:-1])


def test_splice_worked_example_without_eos():
    gold = [1, 2, 3, 4, 5, 6, 7, 99]
    # L = 3, cut 2: replace gold[2:5] == [3, 4, 5]
    assert splice(gold, 2, [40, 41, 42], 3, 99) == [1, 2, 40, 41, 42, 6, 7, 99]
    # A short segment keeps the gold tail after the whole span.
    assert splice(gold, 2, [40], 3, 99) == [1, 2, 40, 6, 7, 99]


def test_splice_worked_example_with_eos():
    gold = [1, 2, 3, 4, 5, 6, 7, 99]
    assert splice(gold, 2, [40, 99, 41], 3, 99) == [1, 2, 40, 99]
    assert splice(gold, 2, [40, 98, 99], 3, [99, 98]) == [1, 2, 40, 98]
    # EOS as the very first token: rejected is the gold prefix plus EOS.
    assert splice(gold, 5, [99], 3, [99]) == [1, 2, 3, 4, 5, 99]


def test_splice_only_treats_listed_ids_as_eos():
    gold = [1, 2, 3, 4, 5, 6]
    # 7 is not an EOS here, so the segment is kept whole and the gold tail stays.
    assert splice(gold, 1, [7, 8], 2, [9, 10]) == [1, 7, 8, 4, 5, 6]
    assert splice(gold, 1, [7, 8], 2, 9) == [1, 7, 8, 4, 5, 6]


def test_splice_gold_shorter_than_segment_length_regenerates_whole():
    gold = [5, 6, 7]
    # L = min(256, 3) = 3, cut must be 0; the whole gold is replaced.
    assert splice(gold, 0, [1, 2, 3, 4], 256, 99) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        splice(gold, 1, [1], 256, 99)


def test_splice_does_not_mutate_inputs():
    gold = [1, 2, 3, 4, 5]
    segment = [8, 9]
    splice(gold, 1, segment, 2, 0)
    assert gold == [1, 2, 3, 4, 5]
    assert segment == [8, 9]


@SETTINGS
@given(
    gold=st.lists(TOKENS, min_size=1, max_size=40),
    segment_length=st.integers(min_value=1, max_value=50),
    offset=st.integers(min_value=1, max_value=20),
    below=st.booleans(),
)
def test_splice_out_of_range_cut_raises(gold, segment_length, offset, below):
    span = min(segment_length, len(gold))
    cut = -offset if below else len(gold) - span + offset
    with pytest.raises(ValueError):
        splice(gold, cut, [1], segment_length, 99)


@pytest.mark.parametrize("segment_length", [0, -1])
def test_splice_non_positive_segment_length_raises(segment_length):
    with pytest.raises(ValueError):
        splice([1, 2, 3], 0, [4], segment_length, 99)


# --------------------------------------------------------------------------------------------------
# sample_cut


@SETTINGS
@given(
    prompt_length=st.integers(min_value=0, max_value=300),
    gold_length=st.integers(min_value=1, max_value=300),
    segment_length=st.integers(min_value=1, max_value=300),
    max_length=st.one_of(st.none(), st.integers(min_value=1, max_value=700)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sample_cut_in_range_and_within_length_budget(
    prompt_length, gold_length, segment_length, max_length, seed
):
    generator = torch.Generator().manual_seed(seed)
    cut, span = sample_cut(prompt_length, gold_length, segment_length, max_length, generator)
    assert isinstance(cut, int) and isinstance(span, int)
    assert span == min(segment_length, gold_length)
    assert 0 <= cut <= gold_length - span
    if max_length is not None and prompt_length + span <= max_length:
        # Feasible: some cut fits the budget, so the drawn one must.
        assert prompt_length + cut + span <= max_length


@SETTINGS
@given(
    prompt_length=st.integers(min_value=0, max_value=300),
    gold_length=st.integers(min_value=1, max_value=300),
    extra=st.integers(min_value=0, max_value=300),
    max_length=st.one_of(st.none(), st.integers(min_value=1, max_value=700)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sample_cut_gold_not_longer_than_segment_length_gives_cut_zero(
    prompt_length, gold_length, extra, max_length, seed
):
    segment_length = gold_length + extra
    cut, span = sample_cut(
        prompt_length, gold_length, segment_length, max_length, torch.Generator().manual_seed(seed)
    )
    assert cut == 0
    assert span == gold_length


def _chi_square(counts: list[int], n: int) -> float:
    expected = n / len(counts)
    return sum((observed - expected) ** 2 / expected for observed in counts)


# Upper 0.1% points of the chi-square distribution (df: critical value).
CHI2_999 = {10: 29.588, 15: 37.697}


@pytest.mark.parametrize(
    "prompt_length, gold_length, segment_length, max_length, highest",
    [
        (10, 20, 5, None, 15),  # uniform over [0, 15]
        (10, 20, 5, 1000, 15),  # budget not binding
        (10, 20, 5, 25, 10),  # budget binding: 10 + c + 5 <= 25  ->  c in [0, 10]
    ],
)
def test_sample_cut_is_uniform(prompt_length, gold_length, segment_length, max_length, highest):
    n = 32_000
    generator = torch.Generator().manual_seed(1234)  # fixed seed: deterministic, cannot flake
    counts = [0] * (highest + 1)
    for _ in range(n):
        cut, _ = sample_cut(prompt_length, gold_length, segment_length, max_length, generator)
        assert 0 <= cut <= highest
        counts[cut] += 1
    assert min(counts) > 0, "every admissible cut must be reachable"
    assert _chi_square(counts, n) < CHI2_999[highest]
    # And no bin strays more than 5 binomial standard deviations from n / (highest + 1).
    p = 1 / (highest + 1)
    std = (n * p * (1 - p)) ** 0.5
    assert all(abs(c - n * p) < 5 * std for c in counts)


def test_sample_cut_same_seed_same_cuts_different_seed_different_cuts():
    def draws(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_cut(7, 200, 16, 2048, generator)[0] for _ in range(50)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_sample_cut_uses_only_the_given_generator():
    generator_a = torch.Generator().manual_seed(11)
    generator_b = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    first = [sample_cut(0, 100, 10, None, generator_a)[0] for _ in range(30)]
    torch.manual_seed(999)
    second = [sample_cut(0, 100, 10, None, generator_b)[0] for _ in range(30)]
    assert first == second


@pytest.mark.parametrize("segment_length", [0, -3])
def test_sample_cut_non_positive_segment_length_raises(segment_length):
    with pytest.raises(ValueError):
        sample_cut(5, 20, segment_length, None, torch.Generator().manual_seed(0))
