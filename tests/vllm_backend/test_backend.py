"""`sapo.sampling.vllm.VLLMBackend` on vLLM's CPU build: the own loop's greedy tokens, seeds that
reproduce, weights pushed only when they change, stop ids honoured by the engine."""

import os
import random

import pytest
import torch
from vllm_required import needs_vllm

from sapo.builtin.tiny import tiny_llama
from sapo.sampling import Sampler
from sapo.sampling import vllm as sampling_vllm
from sapo.sampling.vllm import VLLMBackend

pytestmark = needs_vllm

STOP = 2  # the char tokenizer's <|end|>
LENGTH = 1024  # builtin models' positions: every test here shares one engine


def small(tokenizer, seed):
    """builtin:small's shape, untied (a tied one mostly repeats its last token under greedy)."""
    return tiny_llama(tokenizer, "small", seed=seed, tie_word_embeddings=False).eval()


def prefixes(tokenizer, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(6, len(tokenizer)) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def backend(tokenizer):
    return VLLMBackend(small(tokenizer, 0), max_model_length=LENGTH)


def greedy(tokenizer, backend, stop=(STOP,)):
    return Sampler.greedy(tokenizer.pad_token_id, stop, backend=backend)


def test_greedy_tokens_equal_the_own_loop(tokenizer, backend):
    rows, limits = prefixes(tokenizer, [3, 9, 1, 17, 6]), [12, 5, 20, 8, 16]
    for seed in (1, 2):
        model = small(tokenizer, seed)
        own = greedy(tokenizer, "auto").generate(model, rows, limits)
        assert greedy(tokenizer, backend).generate(model, rows, limits, version=seed) == own
        assert any(len(tokens) == limit for tokens, limit in zip(own, limits))
    tied = tiny_llama(tokenizer, "small", seed=3).eval()  # builtin:small: the engine holds it untied
    own = greedy(tokenizer, "auto").generate(tied, rows, limits)
    assert greedy(tokenizer, backend).generate(tied, rows, limits, version=0) == own


def test_stop_ids_end_a_row_in_the_engine(tokenizer, backend):
    model, rows = small(tokenizer, 4), prefixes(tokenizer, [5, 8, 2])
    free = greedy(tokenizer, "auto").generate(model, rows, [16] * 3)
    at = next(i for i in range(2, 16) if free[0][i] not in free[0][:i])  # a token met first there
    stop = free[0][at]
    settings = greedy(tokenizer, backend, stop=(stop,)).settings
    tokens = backend.sample(model, rows, [16] * 3, settings, version=0)
    assert tokens[0] == free[0][: at + 1]  # the engine stopped there, the sampler trimmed nothing
    assert tokens == greedy(tokenizer, "auto", stop=(stop,)).generate(model, rows, [16] * 3)


def test_seeds_reproduce_and_differ(tokenizer, backend):
    model, rows, limits = small(tokenizer, 5), prefixes(tokenizer, [4, 7, 3, 9]), [10, 10, 6, 12]

    def sampled(seed):
        sampler = Sampler(tokenizer.pad_token_id, [STOP], seed=seed, backend=backend)
        return [sampler.generate(model, rows, limits, version=0) for _ in range(2)]

    first, again, other = sampled(7), sampled(7), sampled(8)
    assert first == again
    assert first[0] != first[1]  # each call draws a new seed
    assert first != other


def test_a_push_changes_the_output_and_pushing_back_restores_it(tokenizer, backend, monkeypatch):
    pushes = []
    push = sampling_vllm._Engine.push
    monkeypatch.setattr(sampling_vllm._Engine, "push", lambda self, *a: (pushes.append(1), push(self, *a)))
    first, second = small(tokenizer, 11), small(tokenizer, 12)
    rows, limits = prefixes(tokenizer, [6, 2, 11]), [14, 14, 9]
    sampler = greedy(tokenizer, backend)
    before = sampler.generate(first, rows, limits, version=0)
    assert sampler.generate(first, rows, limits, version=0) == before
    assert len(pushes) == 1  # same model, same version: no push
    with torch.no_grad():
        for param, other in zip(first.parameters(), second.parameters()):
            param.copy_(other)  # the same model object, new weights: the caller's version moves
    changed = sampler.generate(first, rows, limits, version=1)
    assert changed != before and changed == greedy(tokenizer, "auto").generate(second, rows, limits)
    assert sampler.generate(small(tokenizer, 11), rows, limits, version=1) == before  # another object
    assert len(pushes) == 3


def test_a_call_longer_than_one_engine_step_reproduces(tokenizer, backend):
    """Prefixes of more tokens than the engine prefills in one step: whole prompts are prefilled
    step after step (vLLM 0.32's chunked prefill rewinds a seeded request's generator, which fails
    on a CPU), and the seeds still reproduce."""
    model, rows = small(tokenizer, 6), prefixes(tokenizer, [300] * 32, seed=2)  # 9,600 prefix tokens
    first, again = (
        Sampler(tokenizer.pad_token_id, [STOP], seed=1, backend=backend).generate(
            model, rows, [3] * 32, version=0
        )
        for _ in range(2)
    )
    assert first == again and all(len(tokens) >= 1 for tokens in first)


def test_with_sleep_mode_every_wake_pushes_again(tokenizer, backend, monkeypatch):
    """Sleep mode needs a GPU: the order of wake, push, generate and sleep is checked on the CPU
    engine with its sleep and wake recorded."""
    events = []
    engine = sampling_vllm._engine_for(backend)
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags: events.append(("wake", *tags)), raising=False)
    monkeypatch.setattr(engine.llm, "sleep", lambda level: events.append(("sleep", level)), raising=False)
    push = sampling_vllm._Engine.push
    monkeypatch.setattr(
        sampling_vllm._Engine, "push", lambda self, *a: (events.append(("push",)), push(self, *a))
    )
    monkeypatch.setattr(backend, "enable_sleep_mode", True)
    model, rows = small(tokenizer, 13), prefixes(tokenizer, [3, 5])
    for _ in range(2):  # the same version twice: pushed both times
        greedy(tokenizer, backend).generate(model, rows, [4, 4], version=0)
    call = [("wake", "weights"), ("push",), ("wake", "kv_cache"), ("sleep", 2)]
    assert events == call + call


def test_a_prefix_longer_than_the_engine_holds_is_an_error(tokenizer, backend):
    model = small(tokenizer, 0)
    with pytest.raises(ValueError, match="vllm_max_model_length=1024"):
        greedy(tokenizer, backend).generate(model, [[7] * LENGTH], [3], version=0)


def test_building_an_engine_leaves_the_process_as_it_was(tokenizer):
    environment, threads = dict(os.environ), torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = tiny_llama(tokenizer, "small", seed=9, num_hidden_layers=3).eval()  # another engine: rebuilt
    Sampler.greedy(tokenizer.pad_token_id, [STOP], backend=VLLMBackend(model)).generate(model, [[9, 9]], [4])
    assert torch.equal(torch.rand(3), expected)  # the engine's seeding stayed inside the call
    assert dict(os.environ) == environment  # no LD_PRELOAD for later subprocesses
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)  # not vLLM's no-op
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
