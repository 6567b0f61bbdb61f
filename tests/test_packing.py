"""`sapo.packing`: one packed row per pair scores both sides exactly as two separate rows do."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.losses import dpo_loss
from sapo.packing import (
    CHOSEN,
    PREFIX,
    REJECTED,
    common_prefix_length,
    mask_for,
    pack_pairs,
    packed_completion_logps,
    supports_packing,
)
from sapo.pairs import Pair
from sapo.scoring import collate_pairs, completion_logps
from sapo.segments import splice

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
WORDS = range(EOS + 1, len(TOKENIZER))  # ordinary tokens: neither pad nor EOS
FEW_WORDS = [*WORDS[:6], EOS]  # segments that often repeat the gold text or stop early
TIED = tiny_llama(TOKENIZER, seed=0).eval()
UNTIED = tiny_llama(TOKENIZER, seed=5, tie_word_embeddings=False).eval()


def separate(model, pairs):
    return completion_logps(model, collate_pairs(pairs, PAD))


def packed(model, pairs):
    return packed_completion_logps(model, pack_pairs(pairs, PAD))


def sapo_pair(prompt, gold, cut, segment, segment_length):
    return Pair(
        prompt,
        gold,
        splice(gold, cut, segment, segment_length, EOS),
    )


# one batch with every case the trainer meets: different prompt lengths, cut 0, a segment that
# hits EOS (rejected shorter than chosen), rejected == chosen, a cut near the end, a long gold
CASES = [
    sapo_pair([7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, EOS], 0, [30, 31, 32], 3),
    sapo_pair([7], [20, 21, 22, 23, 24, 25, 26, 27, EOS], 3, [40, 41, EOS], 4),
    sapo_pair([7, 8, 9], [20, 21, 22, EOS], 0, [20, 21, 22, EOS], 4),
    sapo_pair([9, 8, 7, 6, 5, 50, 51, 52, 53, 54, 55, 56], [60, 61, 62, 63, EOS], 3, [70, 71], 2),
    sapo_pair([7, 8], [20 + i % 60 for i in range(30)] + [EOS], 11, [33] * 8, 8),
]


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([5], [6]) == 0
    assert common_prefix_length([], [1]) == 0


def test_pack_pairs_layout():
    # prompt [1, 2], gold [3, 4, 5], rejected [3, 6]: shared prefix [1, 2, 3], tails [4, 5] and [6]
    pairs = [
        Pair([1, 2], [3, 4, 5], [3, 6]),
        Pair([1], [8], [9]),
        Pair([], [8, 9], [7]),  # nothing shared
    ]
    batch = pack_pairs(pairs, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 6],
        [1, 8, 9, PAD, PAD, PAD],
        [8, 9, 7, PAD, PAD, PAD],
    ]
    # both tails continue the prefix's positions
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    # the last prefix position predicts the first token of each tail; chosen tokens are
    # predicted in the chosen tail, rejected ones in the rejected tail; gold[:1] counts for both
    assert batch["targets"][0].tolist() == [[0, 0], [3, 3], [4, 6], [5, 0], [0, 0], [0, 0]]
    assert batch["target_mask"][0].tolist() == [[0, 0], [1, 1], [1, 1], [1, 0], [0, 0], [0, 0]]
    assert batch["targets"][1].tolist()[:3] == [[8, 9], [0, 0], [0, 0]]
    assert batch["target_mask"][1].tolist() == [[1, 1]] + [[0, 0]] * 5
    mask = batch["attention_mask"]
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    segments = [PREFIX, PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED]
    expected = [
        [k <= q and (segments[k] == PREFIX or segments[k] == segments[q]) for k in range(6)] for q in range(6)
    ]
    assert mask[0, 0].tolist() == expected
    assert not mask[0, 0, 5, 3] and not mask[0, 0, 5, 4]  # rejected tail never sees the chosen tail
    # tails see the prefix and nothing sees padding
    assert mask[1, 0, 2].tolist() == [True, False, True, False, False, False]
    assert not mask[1:, 0, :3, 3:].any()
    # without a shared prefix the tails see only themselves; no query row is fully masked, not
    # even padding's (some attention kernels turn a fully masked row into NaN)
    assert mask[2, 0, :3, :3].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert mask.any(dim=-1).all()
    # only 9 is scored: the first token of a sequence has nothing before it to predict it
    assert batch["target_mask"][2].tolist() == [[1, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]


@pytest.mark.parametrize("model", [TIED, UNTIED], ids=["tied", "untied"])
def test_packed_logps_equal_separate_logps(model):
    with torch.no_grad():
        expected, expected_lengths = separate(model, CASES)
        logps, lengths = packed(model, CASES)
    assert logps.shape == lengths.shape == (2 * len(CASES),)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lengths, expected_lengths)
    # rejected == chosen scores identically on both sides
    assert logps[2].item() == pytest.approx(logps[len(CASES) + 2].item(), abs=1e-5)


pair_strategy = st.builds(
    lambda prompt, gold, cut_fraction, segment, segment_length: sapo_pair(
        prompt,
        gold + [EOS],
        int(cut_fraction * (len(gold) + 1 - min(segment_length, len(gold) + 1))),
        segment,
        segment_length,
    ),
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=10),
    st.lists(st.sampled_from(WORDS[:6]), min_size=0, max_size=14),
    st.floats(0, 1),
    st.lists(st.sampled_from(FEW_WORDS), min_size=0, max_size=6),
    st.integers(1, 6),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(pair_strategy, min_size=1, max_size=4))
def test_packed_logps_equal_separate_logps_random(pairs):
    with torch.no_grad():
        expected, expected_lengths = separate(UNTIED, pairs)
        logps, lengths = packed(UNTIED, pairs)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lengths, expected_lengths)


def dpo_gradients(score, pairs):
    policy = tiny_llama(TOKENIZER, seed=1)
    reference = tiny_llama(TOKENIZER, seed=2).eval()
    logps, _ = score(policy, pairs)
    with torch.no_grad():
        ref_logps, _ = score(reference, pairs)
    losses, _, _ = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.1)
    losses.mean().backward()
    return {name: param.grad for name, param in policy.named_parameters()}


def test_packed_gradients_equal_separate_gradients():
    expected = dpo_gradients(separate, CASES)
    grads = dpo_gradients(packed, CASES)
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_eager_attention_gets_an_additive_mask():
    model = copy.deepcopy(TIED)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(packed(model, CASES)[0], separate(TIED, CASES)[0], rtol=1e-5, atol=1e-5)


def test_sdpa_mask_form_follows_the_compute_dtype():
    batch = pack_pairs(CASES, PAD)
    mask = batch["attention_mask"]
    additive = mask_for(TIED, mask)  # float32 weights: floats, which SDPA's kernels use as they are
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mask_for(TIED, mask).dtype == torch.bool  # the query is bfloat16 under autocast
    assert mask_for(copy.deepcopy(TIED).to(torch.bfloat16), mask).dtype == torch.bool
    # both forms give the same logits, to the bit
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():
        from_booleans = TIED(attention_mask=mask, **inputs).logits
        from_floats = TIED(attention_mask=additive, **inputs).logits
    assert torch.equal(from_floats, from_booleans)


def test_attention_without_4d_masks_is_refused():
    assert supports_packing(TIED)
    model = copy.deepcopy(TIED)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_packing(model)
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed(model, CASES)


# prompts of at least 3 tokens: every row's first scored position is 2 or later, so the packed
# forward asks the model for logits of the last positions only
LONG_PROMPTS = [pair for pair in CASES if len(pair.prompt_ids) >= 3]


def test_prompt_positions_get_no_logits():
    full = pack_pairs(LONG_PROMPTS, PAD, skip_prompt_logits=False)
    batch = pack_pairs(LONG_PROMPTS, PAD)
    width = batch["input_ids"].shape[1]
    assert full["targets"].shape[1] == width
    # the shortest prompt has 3 tokens: position 2 is the first that predicts a response token
    assert batch["targets"].shape[1] == batch["target_mask"].shape[1] == width - 2
    assert not full["target_mask"][:, :2].any()
    assert torch.equal(batch["targets"], full["targets"][:, 2:])
    assert torch.equal(batch["target_mask"], full["target_mask"][:, 2:])
    for key in ("input_ids", "position_ids", "attention_mask"):
        assert torch.equal(batch[key], full[key])
    # the model is asked for that many logits
    kept = []
    handle = UNTIED.lm_head.register_forward_hook(lambda module, args, output: kept.append(args[0].shape[1]))
    with torch.no_grad():
        packed_completion_logps(UNTIED, batch)
    handle.remove()
    assert kept == [width - 2]


@pytest.mark.parametrize("model", [TIED, UNTIED], ids=["tied", "untied"])
def test_prompt_skipping_logps_equal_separate_logps(model):
    with torch.no_grad():
        expected, expected_lengths = separate(model, LONG_PROMPTS)
        logps, lengths = packed(model, LONG_PROMPTS)
        full, _ = packed_completion_logps(model, pack_pairs(LONG_PROMPTS, PAD, skip_prompt_logits=False))
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(lengths, expected_lengths)


def test_prompt_skipping_gradients_equal_separate_gradients():
    expected = dpo_gradients(separate, LONG_PROMPTS)
    grads = dpo_gradients(packed, LONG_PROMPTS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_nothing_to_score_keeps_one_position():
    # an empty prompt and one-token answers: no token has a prediction before it
    batch = pack_pairs([Pair([], [8], [9])], PAD)
    assert batch["targets"].shape[1] == 1
    with torch.no_grad():
        logps, lengths = packed_completion_logps(UNTIED, batch)
    assert logps.tolist() == [0.0, 0.0] and lengths.tolist() == [0.0, 0.0]
