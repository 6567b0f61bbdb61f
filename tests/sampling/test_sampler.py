"""`sapo.sampling.Sampler`: batched, seeded sampling.

Every test runs with both backends: SAPO's sampling loop (`sapo.sampling.own_loop`, the default) and
transformers' `generate`.
"""

import random

import pytest
import torch

from sapo.builtin.tiny import tiny_llama
from sapo.sampling import Sampler
from sapo.sampling.backends import TORCH_BACKENDS

BACKEND = {"name": "auto"}


@pytest.fixture(autouse=True, params=list(TORCH_BACKENDS))  # vLLM: tests/vllm_backend
def backend(request, monkeypatch):
    monkeypatch.setitem(BACKEND, "name", request.param)
    return request.param


def make_generator(tokenizer, **kwargs):
    settings = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id], backend=BACKEND["name"]
    )
    settings.update(kwargs)
    return Sampler(**settings)


def random_prefixes(tokenizer, lengths, seed=0):
    rng = random.Random(seed)
    # printable characters only (ids after the 6 special tokens), so no prefix holds EOS or padding
    return [[rng.randrange(6, len(tokenizer)) for _ in range(n)] for n in lengths]


def eos_model(tokenizer):
    """A tiny Llama whose every next-token distribution puts (almost) all mass on EOS."""
    model = tiny_llama(tokenizer, seed=0, tie_word_embeddings=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 100.0
    model.lm_head = head
    return model.eval()


def untied_model(tokenizer, seed):
    """A tiny Llama with an untied LM head: its greedy continuations depend on the whole context
    (the tied one mostly repeats the last token, which would make batch-independence checks vacuous)."""
    return tiny_llama(tokenizer, seed=seed, tie_word_embeddings=False).eval()


class CountForwards:
    """Counts the model's forward calls and keeps the shape of each call's ``input_ids``."""

    def __init__(self, model):
        self.calls = 0
        self.shapes = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))


# ----------------------------------------------------------------------------------------------


def test_one_batched_call_per_call(tokenizer, tiny_model):
    model = tiny_model.eval()
    counter = CountForwards(model)
    # an end-of-answer id outside the vocabulary: no row can stop before its limit
    generator = make_generator(tokenizer, eos_token_ids=[model.config.vocab_size])
    prefixes = random_prefixes(tokenizer, [3, 7, 5, 1])
    segments = generator.generate(model, prefixes, [4, 2, 6, 3])
    assert len(segments) == 4
    # one prefill over all rows (left-padded to the longest prefix), then one token per row per step
    assert counter.shapes == [(4, 7)] + [(4, 1)] * 5
    counter.shapes.clear()
    generator.generate(model, prefixes[:2], [5, 5])
    assert counter.shapes == [(2, 7)] + [(2, 1)] * 4


def test_empty_and_mismatched_inputs(tokenizer, tiny_model):
    counter = CountForwards(tiny_model)
    generator = make_generator(tokenizer)
    assert generator.generate(tiny_model, [], []) == []
    assert counter.calls == 0
    with pytest.raises(ValueError):
        generator.generate(tiny_model, [[10, 11]], [3, 4])


def test_segments_respect_their_own_limits(tokenizer, tiny_model):
    model = tiny_model.eval()
    eos = tokenizer.eos_token_id
    generator = make_generator(tokenizer, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    limits = [1, 4, 9, 16, 2, 7]
    prefixes = random_prefixes(tokenizer, [2, 9, 4, 6, 12, 1], seed=1)
    for _ in range(3):
        segments = generator.generate(model, prefixes, limits)
        assert len(segments) == len(limits)
        for segment, limit in zip(segments, limits, strict=True):
            assert 1 <= len(segment) <= limit
            if eos in segment:
                assert segment.index(eos) == len(segment) - 1  # ends at its first EOS
            else:
                assert len(segment) == limit  # no EOS: runs to its own limit


def test_forced_eos_stops_every_row_immediately(tokenizer):
    model = eos_model(tokenizer)
    counter = CountForwards(model)
    generator = make_generator(tokenizer, seed=0)
    prefixes = random_prefixes(tokenizer, [3, 8, 5])
    segments = generator.generate(model, prefixes, [50, 50, 50])
    assert segments == [[tokenizer.eos_token_id]] * 3
    # every row hit EOS on the first step, so the call stops instead of running 50 steps
    assert counter.calls == 1


def test_early_stop_when_all_rows_done(tokenizer, tiny_model):
    # without EOS the call runs exactly as many steps as the largest limit, and no more
    model = tiny_model.eval()
    generator = make_generator(
        tokenizer, eos_token_ids=[tokenizer.convert_tokens_to_ids("<|system|>")], top_k=1
    )
    counter = CountForwards(model)
    prefixes = random_prefixes(tokenizer, [4, 4, 6])
    segments = generator.generate(model, prefixes, [3, 5, 2])
    assert [len(s) for s in segments] == [3, 5, 2]
    assert counter.calls == 5


def _greedy(tokenizer, **kwargs):
    return make_generator(tokenizer, temperature=1.0, top_k=1, top_p=1.0, **kwargs)


def test_segment_stops_at_first_eos_mid_batch(tokenizer):
    """Make a token that row 0 produces mid-way the "EOS": that row stops there, the others run on."""
    model = untied_model(tokenizer, seed=0)
    prefixes = random_prefixes(tokenizer, [5, 3, 7], seed=0)
    limits = [12, 12, 12]
    never = tokenizer.eos_token_id
    free = _greedy(tokenizer, eos_token_ids=[never]).generate(model, prefixes, limits)
    assert all(len(s) == 12 for s in free)
    # a stop token that first occurs in row 0 at position k >= 1 and never in row 1
    candidates = [
        (k, token)
        for k, token in enumerate(free[0])
        if k >= 1 and token not in free[0][:k] and token not in free[1]
    ]
    assert candidates, free  # deterministic for this model/prefix choice
    k, stop = candidates[0]
    stopped = _greedy(tokenizer, eos_token_ids=[stop]).generate(model, prefixes, limits)
    assert stopped[0] == free[0][: k + 1]  # kept up to and including the first stop token
    assert stopped[1] == free[1]  # the row without the stop token is unaffected
    # row 2: cut at its own first stop token if any
    expected_2 = free[2][: free[2].index(stop) + 1] if stop in free[2] else free[2]
    assert stopped[2] == expected_2
    # several stop ids: each row stops at the first of any of them
    second = free[1][3]
    both = _greedy(tokenizer, eos_token_ids=[stop, second]).generate(model, prefixes, limits)
    assert both[1] == free[1][: free[1].index(second) + 1]
    assert len(both[0]) <= k + 1


def test_same_seed_same_segments_different_seed_different(tokenizer, tiny_model):
    model = tiny_model.eval()
    prefixes = random_prefixes(tokenizer, [4, 6, 2, 8], seed=2)
    limits = [10, 10, 10, 10]
    knobs = dict(temperature=1.0, top_k=0, top_p=1.0)
    a = make_generator(tokenizer, seed=123, **knobs).generate(model, prefixes, limits)
    torch.manual_seed(999)  # the global RNG must not matter
    b = make_generator(tokenizer, seed=123, **knobs).generate(model, prefixes, limits)
    torch.manual_seed(1)
    c = make_generator(tokenizer, seed=124, **knobs).generate(model, prefixes, limits)
    assert a == b
    assert a != c


def test_successive_calls_differ_and_state_is_checkpointable(tokenizer, tiny_model):
    model = tiny_model.eval()
    prefixes = random_prefixes(tokenizer, [4, 6], seed=5)
    limits = [10, 10]
    knobs = dict(temperature=1.0, top_k=0, top_p=1.0)
    generator = make_generator(tokenizer, seed=7, **knobs)
    first = generator.generate(model, prefixes, limits)
    state = generator.generator.get_state()  # what a checkpoint saves
    second = generator.generate(model, prefixes, limits)
    assert first != second  # each call draws a fresh sampling seed
    restored = make_generator(tokenizer, seed=0, **knobs)
    restored.generator.set_state(state)
    assert restored.generate(model, prefixes, limits) == second


def test_global_rng_state_unchanged(tokenizer, tiny_model):
    model = tiny_model.eval()
    generator = make_generator(tokenizer, temperature=1.0, seed=11)
    torch.manual_seed(2024)
    before = torch.get_rng_state().clone()
    generator.generate(model, random_prefixes(tokenizer, [3, 5]), [6, 6])
    assert torch.equal(torch.get_rng_state(), before)
    # and the next global draw is what it would have been without the call
    expected = torch.Generator().manual_seed(2024)
    assert torch.equal(torch.rand(5), torch.rand(5, generator=expected))


def test_left_padding_row_independent_of_batch(tokenizer):
    model = untied_model(tokenizer, seed=1)
    prefixes = random_prefixes(tokenizer, [2, 11, 6, 1, 9, 4], seed=6)
    limits = [8, 5, 8, 3, 6, 8]
    generator = _greedy(tokenizer)
    batched = generator.generate(model, prefixes, limits)
    for prefix, limit, segment in zip(prefixes, limits, batched, strict=True):
        alone = generator.generate(model, [prefix], [limit])[0]
        assert segment == alone
    # another batch order and composition gives the same rows
    reordered = generator.generate(model, prefixes[::-1], limits[::-1])[::-1]
    assert reordered == batched
    pairs = generator.generate(model, [prefixes[0], prefixes[1]], [limits[0], limits[1]])
    assert pairs == batched[:2]


def test_continuation_depends_on_context(tokenizer):
    # guards the test above: the model's greedy output depends on more than the last token, so
    # broken left padding (pads attended to, wrong positions) would show up as a difference
    model = untied_model(tokenizer, seed=1)
    generator = _greedy(tokenizer)
    last = 50
    prefixes = [[20, 30, 40, last], [60, 70, 80, last], [last], [21, 22, 23, 24, 25, 26, 27, 28, last]]
    segments = generator.generate(model, prefixes, [8] * 4)
    assert len({tuple(s) for s in segments}) == 4
    # the same prefix behind more left padding (a longer neighbour) gives the same continuation
    alone = generator.generate(model, [prefixes[2]], [8])[0]
    assert alone == segments[2]


def test_num_threads_applies_while_generating_and_is_restored(tokenizer):
    model = untied_model(tokenizer, seed=1)
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(torch.get_num_threads()))
    prefixes = random_prefixes(tokenizer, [3, 6, 2], seed=4)
    limits = [5, 5, 5]
    before = torch.get_num_threads()
    capped = _greedy(tokenizer, num_threads=1).generate(model, prefixes, limits)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
    seen.clear()
    assert _greedy(tokenizer).generate(model, prefixes, limits) == capped
    assert set(seen) == {before}
    handle.remove()


def test_num_threads_restored_when_generation_fails(tokenizer):
    model = untied_model(tokenizer, seed=1)
    before = torch.get_num_threads()

    def broken(module, args):
        assert torch.get_num_threads() == 1
        raise RuntimeError("generation failed")

    model.register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        _greedy(tokenizer, num_threads=1).generate(model, random_prefixes(tokenizer, [3]), [4])
    assert torch.get_num_threads() == before


def test_diverged_sampling_model_is_a_floating_point_error(tokenizer):
    from sapo.generation import self_augmented_pairs

    model = untied_model(tokenizer, seed=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    rows = [(prefix, [7, 8, 9, 10, tokenizer.eos_token_id]) for prefix in random_prefixes(tokenizer, [3, 5])]
    with pytest.raises(FloatingPointError, match="not finite"):
        generator = torch.Generator().manual_seed(0)
        self_augmented_pairs(model, rows, make_generator(tokenizer), generator, 3, None)
