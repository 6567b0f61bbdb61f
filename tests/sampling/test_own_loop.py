"""`sapo.sampling.own_loop`: SAPO's sampling loop computes `generate`'s logits step for step and
samples `generate`'s distribution from them, and runs only where that holds.

Where the draw is `generate`'s own (greedy; no top-k or top-p) the loop draws `generate`'s tokens
for the same seed. With top-k or top-p it draws among the top-k candidates (`sapo.sampling.draw`,
whose probabilities tests/sampling/test_draw.py checks against the warpers'), so its tokens differ:
there `generate`, made to follow the loop's tokens, must compute the logits the loop drew from at
every step of every row.
"""

import contextlib
import random
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule
from transformers import MistralConfig, MistralForCausalLM

from sapo import SAPOConfig
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.packing import mask_for, supports_packing, uses_fsdp
from sapo.sampling import Sampler, own_loop
from sapo.sampling.backends import generation_config, left_padded
from sapo.sampling.draw import candidate_distribution, draw_next_tokens
from sapo.sampling.own_loop import last_position_logits, supports_cached_loop

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
TIED = tiny_llama(TOKENIZER, seed=0).eval()
UNTIED = tiny_llama(TOKENIZER, seed=5, tie_word_embeddings=False).eval()
SETTINGS = {  # (temperature, top_k, top_p): SAPO's defaults, plain sampling, greedy (evaluation)
    "sapo": (0.7, 50, 0.95),
    "plain": (1.0, 0, 1.0),
    "greedy": (1.0, 1, 1.0),
    "narrow": (0.5, 5, 0.5),
}
SAME_TOKENS = {"plain", "greedy"}  # settings whose draw is generate's own: the same tokens for a seed


def both_backends(model, prefixes, limits, stop_ids=(EOS,), seed=0, knobs="sapo"):
    temperature, top_k, top_p = SETTINGS[knobs]
    segments = {}
    for backend in ("auto", "transformers"):
        generator = Sampler(
            PAD, list(stop_ids), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, backend=backend
        )
        segments[backend] = generator.generate(model, prefixes, limits)
    return segments["auto"], segments["transformers"]


@contextlib.contextmanager
def recorded_draws():
    """The logits and settings of every draw the loop makes in the block."""
    draws = []

    def record(logits, *knobs):
        draws.append((logits.clone(), knobs))
        return draw_next_tokens(logits, *knobs)

    with mock.patch.object(own_loop, "draw_next_tokens", record):
        yield draws


def generate_along(model, prefixes, segments, stop_ids, settings):
    """``generate``'s tokens and model logits ``(B, N, V)`` when each step may only take the loop's
    token (``prefix_allowed_tokens_fn`` masks before the warpers; ``output_logits`` are the model's)."""
    input_ids, attention_mask = left_padded(prefixes, PAD, "cpu")
    width = input_ids.shape[1]

    def loop_token(row, ids):
        step = ids.shape[0] - width
        return [segments[row][step]] if step < len(segments[row]) else [PAD]

    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config(settings, max(len(segment) for segment in segments)),
        prefix_allowed_tokens_fn=loop_token,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return output.sequences[:, width:].tolist(), torch.stack(output.logits, dim=1)


def loop_against_generate(model, prefixes, limits, stop_ids=(EOS,), seed=0, knobs="sapo"):
    """The loop's segments, checked against ``generate``: its tokens for the same seed where the
    draw is ``generate``'s own; elsewhere ``generate``'s logits along the loop's tokens, which the
    loop must have drawn from (with these settings, a token they allow) at every step of every row,
    drawing no more steps than its longest segment needed."""
    if knobs in SAME_TOKENS:
        loop, generated = both_backends(model, prefixes, limits, stop_ids, seed, knobs)
        assert loop == generated
        return loop
    temperature, top_k, top_p = SETTINGS[knobs]
    sampler = Sampler(PAD, list(stop_ids), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with recorded_draws() as draws:
        loop = sampler.generate(model, prefixes, limits)
    assert len(draws) == max(len(segment) for segment in loop)
    followed, logits = generate_along(model, prefixes, loop, stop_ids, sampler.settings)
    assert [row[: len(segment)] for row, segment in zip(followed, loop)] == loop
    for step, (drawn_from, knobs_used) in enumerate(draws):
        assert knobs_used == SETTINGS[knobs]
        for row, segment in enumerate(loop):
            if step < len(segment):
                assert torch.allclose(drawn_from[row], logits[row, step], rtol=1e-5, atol=1e-5)
                probabilities, ids = candidate_distribution(drawn_from[row : row + 1], *knobs_used)
                assert probabilities[ids == segment[step]].item() > 0
    return loop


def random_rows(rng, count, longest=14, most=16):
    words = range(EOS + 4, len(TOKENIZER))  # no special token: never EOS or padding
    prefixes = [[rng.choice(words) for _ in range(rng.randint(1, longest))] for _ in range(count)]
    return prefixes, [rng.randint(1, most) for _ in range(count)]


def spy_generate(model, monkeypatch):
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("knobs", sorted(SETTINGS))
@pytest.mark.parametrize("model", [TIED, UNTIED], ids=["tied", "untied"])
def test_matches_generate(model, knobs, monkeypatch):
    calls = spy_generate(model, monkeypatch)
    rng = random.Random(sorted(SETTINGS).index(knobs))  # not hash(): str hashes change per process
    prefixes, limits = random_rows(rng, 7)
    loop = loop_against_generate(model, prefixes, limits, knobs=knobs, seed=3)
    assert len(calls) == 1  # the loop did not call generate; the check against it did
    # a frequent token as a second stop id: rows stop mid-way, at different steps. Counted before
    # each row's last token, so that some row meets it before its limit and stops there
    stop = max(range(len(TOKENIZER)), key=lambda token: sum(s[:-1].count(token) for s in loop))
    loop = loop_against_generate(model, prefixes, limits, stop_ids=(EOS, stop), knobs=knobs, seed=3)
    assert any(s[-1] == stop and len(s) < limit for s, limit in zip(loop, limits))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 9), knobs=st.sampled_from(sorted(SETTINGS)))
def test_matches_generate_random(seed, rows, knobs):
    prefixes, limits = random_rows(random.Random(seed), rows)
    loop_against_generate(UNTIED, prefixes, limits, stop_ids=(EOS, 60), seed=seed, knobs=knobs)


def test_matches_generate_with_eager_attention():
    model = tiny_llama(TOKENIZER, seed=2, tie_word_embeddings=False).eval()
    model.config._attn_implementation = "eager"
    prefixes, limits = random_rows(random.Random(1), 6)
    assert supports_cached_loop(model, 40)
    for knobs in ("sapo", "plain"):
        loop_against_generate(model, prefixes, limits, seed=9, knobs=knobs)


def test_matches_generate_with_a_lora_adapter():
    model = tiny_llama(TOKENIZER, seed=2, tie_word_embeddings=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the outputs
    model.eval()
    prefixes, limits = random_rows(random.Random(4), 5)
    loop = loop_against_generate(model, prefixes, limits, seed=4)
    assert loop_against_generate(model, prefixes, limits, seed=4, knobs="plain")
    with model.disable_adapter():
        without = loop_against_generate(model, prefixes, limits, seed=4)
    assert without != loop  # the adapter is active in the loop


def tiny_mistral(window):
    config = MistralConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def test_window_shorter_than_the_sequences_falls_back_to_generate(monkeypatch):
    model = tiny_mistral(window=8)
    calls = spy_generate(model, monkeypatch)
    prefixes, limits = [[40, 41, 42, 43, 44, 45], [50, 51]], [6, 6]  # 12 positions > window 8
    assert not supports_cached_loop(model, 12)
    loop, generated = both_backends(model, prefixes, limits, stop_ids=(200,), knobs="greedy")
    assert loop == generated and len(calls) == 2  # both calls went through generate
    # the window matters at this length: without it the last position's logits change
    sequence = torch.tensor([prefixes[0] + generated[0]])
    with torch.no_grad():
        windowed = model(sequence).logits[0, -1]
        model.config.sliding_window = None
        unwindowed = model(sequence).logits[0, -1]
    assert (windowed - unwindowed).abs().max() > 1e-4


def test_window_longer_than_the_sequences_keeps_the_loop(monkeypatch):
    model = tiny_mistral(window=64)
    calls = spy_generate(model, monkeypatch)
    prefixes, limits = random_rows(random.Random(2), 5)
    assert supports_cached_loop(model, 30) and not supports_cached_loop(model, 64)
    loop_against_generate(model, prefixes, limits, seed=1)
    assert len(calls) == 1  # the check against generate; the loop did not call it
    loop_against_generate(model, prefixes, limits, seed=1, knobs="plain")


def test_the_loop_runs_a_plain_cpu_head_itself():
    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False).eval()
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    ids = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        with last_position_logits(model) as logits_of:
            outputs = model(ids)
            assert outputs.logits.shape[-2] == 0  # the model's own head ran on no position
            torch.testing.assert_close(logits_of(outputs), expected, rtol=1e-5, atol=1e-5)
        # a LoRA layer as the head: the model's own logits
        adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
        with last_position_logits(adapted) as logits_of:
            outputs = adapted(ids)
            assert outputs.logits.shape[-2] == ids.shape[1]
            assert torch.equal(logits_of(outputs), outputs.logits[:, -1])


def test_models_the_loop_cannot_take():
    model = tiny_llama(TOKENIZER, seed=0)
    assert supports_cached_loop(model, 100)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_cached_loop(model, 100)
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert not supports_cached_loop(model, 100)


def test_a_model_with_fsdp_units_keeps_generate_and_boolean_masks():
    model, mask = tiny_llama(TOKENIZER, seed=0), torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert not uses_fsdp(model) and mask_for(model, mask).dtype == torch.float32
    layer = model.model.layers[0]
    # fully_shard turns a unit's class into FSDP<Name>(FSDPModule, Name); accelerate shards units only
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    assert uses_fsdp(model)
    assert not supports_cached_loop(model, 10)  # generate keeps the ranks in step
    assert mask_for(model, mask).dtype == torch.bool


def test_packing_respects_attention_windows():
    assert supports_packing(tiny_mistral(window=None))
    windowed = tiny_mistral(window=512)
    assert supports_packing(windowed, max_length=256)
    assert not supports_packing(windowed, max_length=512)
    assert not supports_packing(windowed)  # unknown sequence length


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend='vllm'"):
        Sampler(PAD, [EOS], backend="vllm")
    with pytest.raises(ValueError, match="generation_backend='vlm'"):
        SAPOConfig(output_dir="unused", generation_backend="vlm")
