"""`sapo.sampling.own_loop`: SAPO's sampling loop draws exactly the tokens `generate` draws, and runs only
where that holds."""

import random

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
from sapo.sampling import Sampler
from sapo.sampling.own_loop import sampling_processors, supports_cached_loop

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


def both_backends(model, prefixes, limits, stop_ids=(EOS,), seed=0, knobs="sapo"):
    temperature, top_k, top_p = SETTINGS[knobs]
    segments = {}
    for backend in ("auto", "transformers"):
        generator = Sampler(
            PAD, list(stop_ids), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, backend=backend
        )
        segments[backend] = generator.generate(model, prefixes, limits)
    return segments["auto"], segments["transformers"]


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
def test_same_tokens_as_generate(model, knobs, monkeypatch):
    calls = spy_generate(model, monkeypatch)
    rng = random.Random(sorted(SETTINGS).index(knobs))  # not hash(): str hashes change per process
    prefixes, limits = random_rows(rng, 7)
    loop, generated = both_backends(model, prefixes, limits, knobs=knobs, seed=3)
    assert loop == generated
    assert len(calls) == 1  # the loop did not call generate; the transformers backend did
    # a frequent token as a second stop id: rows stop mid-way, at different steps. Counted before
    # each row's last token, so that some row meets it before its limit and stops there
    stop = max(range(len(TOKENIZER)), key=lambda token: sum(s[:-1].count(token) for s in generated))
    loop, generated = both_backends(model, prefixes, limits, stop_ids=(EOS, stop), knobs=knobs, seed=3)
    assert loop == generated
    assert any(s[-1] == stop and len(s) < limit for s, limit in zip(loop, limits))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 9), knobs=st.sampled_from(sorted(SETTINGS)))
def test_same_tokens_as_generate_random(seed, rows, knobs):
    prefixes, limits = random_rows(random.Random(seed), rows)
    loop, generated = both_backends(UNTIED, prefixes, limits, stop_ids=(EOS, 60), seed=seed, knobs=knobs)
    assert loop == generated


def test_same_tokens_as_generate_with_eager_attention():
    model = tiny_llama(TOKENIZER, seed=2, tie_word_embeddings=False).eval()
    model.config._attn_implementation = "eager"
    prefixes, limits = random_rows(random.Random(1), 6)
    assert supports_cached_loop(model, 40)
    loop, generated = both_backends(model, prefixes, limits, seed=9)
    assert loop == generated


def test_same_tokens_as_generate_with_a_lora_adapter():
    model = tiny_llama(TOKENIZER, seed=2, tie_word_embeddings=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the outputs
    model.eval()
    prefixes, limits = random_rows(random.Random(4), 5)
    loop, generated = both_backends(model, prefixes, limits, seed=4)
    assert loop == generated
    with model.disable_adapter():
        without, _ = both_backends(model, prefixes, limits, seed=4)
    assert without != loop  # the adapter is active in the loop


def test_processors_follow_generate_settings():
    assert [type(p).__name__ for p in sampling_processors(0.7, 50, 0.95)] == [
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert len(sampling_processors(1.0, 0, 1.0)) == 0


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
    loop, generated = both_backends(model, prefixes, limits, seed=1)
    assert loop == generated and len(calls) == 1


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
