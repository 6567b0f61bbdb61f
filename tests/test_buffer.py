"""Tests for ``sapo.buffer.ReplayBuffer``, step 2 of SAPO's loop.

Bounded FIFO of capacity ``replay_buffer_size``; a batch is drawn with replacement with weight
``1 / (1 + times_sampled)``; drawn entries get their count incremented; sampling uses the buffer's
own seeded generator so that it is reproducible and checkpointable.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo.buffer import ReplayBuffer

SETTINGS = settings(max_examples=200, deadline=None)


def pair(i: int) -> dict:
    """A buffer entry shaped like the trainer's: token ids of prompt, chosen and rejected."""
    return {"prompt": [i], "chosen": [i, i + 1], "rejected": [i, i + 2]}


def roundtrip(state: dict) -> dict:
    """Serialise a state the way a checkpoint does, so the loaded items are new objects."""
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    return torch.load(stream, weights_only=True)


# --------------------------------------------------------------------------------------------------
# FIFO


@SETTINGS
@given(capacity=st.integers(min_value=1, max_value=12), n=st.integers(min_value=0, max_value=40))
def test_fifo_eviction_keeps_the_newest_capacity_items(capacity, n):
    buffer = ReplayBuffer(capacity, seed=0)
    for i in range(n):
        buffer.add(i)
        assert len(buffer) == min(i + 1, capacity)
        assert len(buffer) <= capacity
    assert len(buffer) == min(n, capacity)
    assert buffer.items() == list(range(n))[-capacity:]


def test_evicted_items_are_never_drawn_again():
    buffer = ReplayBuffer(3, seed=0)
    for i in range(10):
        buffer.add(i)
    drawn = buffer.sample(3000)
    assert set(drawn) == {7, 8, 9}  # the oldest seven left first; all three survivors get drawn


def test_eviction_drops_the_evicted_entry_count():
    buffer = ReplayBuffer(2, seed=0)
    buffer.add("a")
    buffer.sample(5)  # "a" is the only entry: drawn 5 times
    buffer.add("b")
    assert buffer.times_sampled() == [5, 0]
    buffer.add("c")  # evicts "a" and its count
    assert buffer.items() == ["b", "c"]
    assert buffer.times_sampled() == [0, 0]


@pytest.mark.parametrize("capacity", [0, -1])
def test_non_positive_capacity_raises(capacity):
    with pytest.raises(ValueError):
        ReplayBuffer(capacity, seed=0)


# --------------------------------------------------------------------------------------------------
# Sampling with replacement and counts


def test_sampling_is_with_replacement():
    buffer = ReplayBuffer(10, seed=0)
    buffer.add("only")
    assert buffer.sample(5) == ["only"] * 5
    assert buffer.times_sampled() == [5]

    buffer = ReplayBuffer(10, seed=0)
    for i in range(3):
        buffer.add(i)
    drawn = buffer.sample(12)
    assert len(drawn) == 12  # more draws than items: only possible with replacement
    assert len(buffer) == 3  # sampling does not remove anything


@SETTINGS
@given(
    n_items=st.integers(min_value=1, max_value=10),
    batches=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_drawn_entries_counts_go_up_once_per_draw(n_items, batches, seed):
    buffer = ReplayBuffer(16, seed=seed)
    for i in range(n_items):
        buffer.add(i)
    expected = [0] * n_items
    for k in batches:
        drawn = buffer.sample(k)
        assert len(drawn) == k
        for item in drawn:
            expected[item] += 1
        assert buffer.times_sampled() == expected
    assert sum(buffer.times_sampled()) == sum(batches)


def test_weights_are_inverse_one_plus_times_sampled():
    buffer = ReplayBuffer(8, seed=0)
    for i in range(4):
        buffer.add(i)
    buffer.sample(10)
    counts = buffer.times_sampled()
    expected = torch.tensor([1.0 / (1 + c) for c in counts], dtype=torch.float64)
    torch.testing.assert_close(buffer.weights().to(torch.float64), expected)


def _frequency_check(buffer: ReplayBuffer, n: int) -> None:
    """Draw ``n`` in one batch; every entry's frequency must match its normalised weight.

    Weights are fixed for the whole batch (they are computed from the counts before the draw), so
    each entry's number of draws is Binomial(n, p). Tolerance: 5 binomial standard deviations (the
    generator is seeded, so the result is deterministic).
    """
    counts_before = buffer.times_sampled()
    weights = [1.0 / (1 + c) for c in counts_before]
    total = sum(weights)
    probabilities = [w / total for w in weights]

    drawn = buffer.sample(n)

    items = buffer.items()
    index_of = {item: index for index, item in enumerate(items)}
    observed = [0] * len(items)
    for item in drawn:
        observed[index_of[item]] += 1
    for index, p in enumerate(probabilities):
        std = math.sqrt(n * p * (1 - p))
        assert abs(observed[index] - n * p) <= 5 * std, (index, observed[index], n * p, std)
    # And the draw is reflected in the counts, entry by entry.
    assert buffer.times_sampled() == [before + o for before, o in zip(counts_before, observed, strict=True)]


def test_draw_frequencies_follow_inverse_count_weights():
    buffer = ReplayBuffer(10, seed=2024)
    # Two heavily drawn items ...
    buffer.add("old-a")
    buffer.add("old-b")
    for _ in range(100):
        buffer.sample(2)  # ~100 draws each
    # ... one drawn a few times ...
    buffer.add("mid")
    for _ in range(4):
        buffer.sample(1)
    # ... and three never drawn.
    for name in ("new-a", "new-b", "new-c"):
        buffer.add(name)
    counts = buffer.times_sampled()
    assert min(counts[:2]) > 50
    assert counts[3:] == [0, 0, 0]

    _frequency_check(buffer, 20_000)


def test_draw_frequencies_with_widely_spread_counts():
    buffer = ReplayBuffer(4, seed=7)
    buffer.add("d")
    buffer.sample(99)  # the only entry: count 99
    buffer.add("c")
    buffer.sample(10)  # mostly "c"
    buffer.add("b")
    buffer.sample(1)
    buffer.add("a")  # never drawn
    counts = buffer.times_sampled()
    assert counts[0] >= 99 and counts[-1] == 0
    _frequency_check(buffer, 50_000)


def test_least_drawn_entries_are_favoured():
    buffer = ReplayBuffer(4, seed=3)
    buffer.add("stale")
    buffer.sample(50)  # "stale" drawn 50 times
    buffer.add("fresh")
    drawn = buffer.sample(2000)
    # weight ratio fresh : stale = 1 : 1/51, so fresh is drawn about 98% of the time.
    assert drawn.count("fresh") > 0.95 * len(drawn)


# --------------------------------------------------------------------------------------------------
# Counts belong to entries, not to object identity


def test_equal_items_are_counted_separately():
    shared = pair(1)
    buffer = ReplayBuffer(8, seed=0)
    buffer.add(shared)
    buffer.add(shared)  # the same object twice
    buffer.add(pair(1))  # an equal but distinct object
    buffer.sample(1)
    # One draw raises exactly one entry's count, whatever object that entry holds.
    assert sorted(buffer.times_sampled()) == [0, 0, 1]
    buffer.sample(4)
    assert sum(buffer.times_sampled()) == 5
    assert len(buffer.times_sampled()) == 3


def test_same_object_entries_keep_their_own_weights():
    shared = "x"
    buffer = ReplayBuffer(4, seed=5)
    buffer.add(shared)
    buffer.sample(20)  # entry 0 drawn 20 times
    buffer.add(shared)  # same object, fresh entry: count 0
    assert buffer.times_sampled() == [20, 0]
    torch.testing.assert_close(
        buffer.weights().to(torch.float64), torch.tensor([1 / 21, 1.0], dtype=torch.float64)
    )


def test_counts_persist_through_state_dict_into_a_fresh_buffer():
    buffer = ReplayBuffer(6, seed=1)
    for i in range(5):
        buffer.add(pair(i))
    buffer.sample(17)
    counts = buffer.times_sampled()
    assert sum(counts) == 17

    fresh = ReplayBuffer(6, seed=99)
    fresh.load_state_dict(roundtrip(buffer.state_dict()))
    assert fresh.items() == buffer.items()
    assert all(
        a is not b for a, b in zip(fresh.items(), buffer.items(), strict=True)
    )  # new objects after the reload
    assert fresh.times_sampled() == counts
    torch.testing.assert_close(fresh.weights(), buffer.weights())
    assert len(fresh) == len(buffer)


# --------------------------------------------------------------------------------------------------
# Reproducibility and checkpointing


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(min_value=0, max_value=1000)),
        st.tuples(st.just("sample"), st.integers(min_value=1, max_value=6)),
    ),
    max_size=25,
)


def apply(buffer: ReplayBuffer, operations) -> list:
    """Run add/sample operations; returns the draws (skipping samples of an empty buffer)."""
    draws = []
    for op, value in operations:
        if op == "add":
            buffer.add(pair(value))
        elif len(buffer):
            draws.append(buffer.sample(value))
    return draws


@SETTINGS
@given(
    capacity=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    before=ops,
    after=ops,
)
def test_state_dict_round_trip_continues_the_same_draw_sequence(capacity, seed, before, after):
    original = ReplayBuffer(capacity, seed=seed)
    apply(original, before)
    state = roundtrip(original.state_dict())

    # The original carries on; a fresh buffer (different seed) restored from the snapshot must
    # reproduce exactly what the original did after the snapshot.
    expected_draws = apply(original, after)
    restored = ReplayBuffer(capacity, seed=seed + 1)
    restored.load_state_dict(state)
    assert apply(restored, after) == expected_draws
    assert restored.items() == original.items()
    assert restored.times_sampled() == original.times_sampled()
    assert len(restored) == len(original)


def test_state_dict_is_a_snapshot():
    buffer = ReplayBuffer(4, seed=0)
    for i in range(3):
        buffer.add(i)
    state = buffer.state_dict()
    first = buffer.sample(5)
    buffer.add(3)
    buffer.add(4)  # evicts 0

    restored = ReplayBuffer(4, seed=0)
    restored.load_state_dict(state)
    assert restored.items() == [0, 1, 2]
    assert restored.times_sampled() == [0, 0, 0]
    assert restored.sample(5) == first


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**31 - 1), operations=ops)
def test_same_seed_same_draws(seed, operations):
    a = ReplayBuffer(5, seed=seed)
    b = ReplayBuffer(5, seed=seed)
    assert apply(a, operations) == apply(b, operations)
    assert a.times_sampled() == b.times_sampled()


def test_different_seeds_give_different_draws():
    def draws(seed):
        buffer = ReplayBuffer(20, seed=seed)
        for i in range(20):
            buffer.add(i)
        return [buffer.sample(4) for _ in range(10)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_draws_do_not_depend_on_the_global_torch_rng():
    def draws(global_seed):
        buffer = ReplayBuffer(20, seed=42)
        for i in range(20):
            buffer.add(i)
        result = []
        for _ in range(10):
            torch.manual_seed(global_seed)
            torch.rand(3)
            result.append(buffer.sample(4))
        return result

    assert draws(0) == draws(12345)


# --------------------------------------------------------------------------------------------------
# Errors


def test_sampling_an_empty_buffer_raises():
    with pytest.raises(ValueError):
        ReplayBuffer(4, seed=0).sample(1)


def test_load_with_capacity_mismatch_raises():
    buffer = ReplayBuffer(4, seed=0)
    buffer.add(1)
    other = ReplayBuffer(5, seed=0)
    with pytest.raises(ValueError):
        other.load_state_dict(copy.deepcopy(buffer.state_dict()))
    assert len(other) == 0  # left untouched
