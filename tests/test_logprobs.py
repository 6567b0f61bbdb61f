"""`sapo.logprobs`: log-probs from the LM head in chunks equal the model's own logits, and their
gradients too; models whose logits the chunks would not reproduce keep the model's logits."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_trainer import make_args
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig, AutoModelForCausalLM

from sapo import SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.logprobs import PLAIN_HEAD_MODELS, chunkable_head, token_logps
from sapo.losses import dpo_loss
from sapo.packing import pack_pairs, packed_completion_logps
from sapo.pairs import Pair
from sapo.scoring import collate_pairs, completion_logps
from sapo.segments import splice

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
LAYOUTS = {"packed": (pack_pairs, packed_completion_logps), "padded": (collate_pairs, completion_logps)}


def pair(prompt, gold, cut, segment):
    return Pair(
        prompt,
        gold,
        splice(gold, cut, segment, len(segment), EOS),
    )


# prompts of different lengths, cut 0, a segment ending in EOS, rejected == chosen, a long gold
PAIRS = [
    pair([7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, EOS], 0, [30, 31, 32]),
    pair([7], [20, 21, 22, 23, 24, 25, 26, 27, EOS], 3, [40, 41, EOS]),
    pair([7, 8, 9], [20, 21, 22, EOS], 0, [20, 21, 22, EOS]),
    pair([9, 8, 7, 6, 5, 50, 51, 52, 53, 54, 55, 56], [60, 61, 62, 63, EOS], 3, [70, 71]),
    pair([7, 8], [20 + i % 60 for i in range(30)] + [EOS], 11, [33] * 8),
]


def scored(model, layout, chunk_size, pairs=PAIRS, score_shared_prefix=True):
    collate, score = LAYOUTS[layout]
    return score(model, collate(pairs, PAD, score_shared_prefix=score_shared_prefix), chunk_size=chunk_size)


def dpo_gradients(policy, layout, chunk_size, score_shared_prefix=True):
    """Gradients of a DPO loss on PAIRS, against fixed reference log-probs."""
    policy.zero_grad()
    logps, _ = scored(policy, layout, chunk_size, score_shared_prefix=score_shared_prefix)
    reference = torch.linspace(-40.0, -20.0, logps.shape[0])
    losses, _, _ = dpo_loss(*logps.chunk(2), *reference.chunk(2), beta=0.1)
    losses.mean().backward()
    return losses.detach(), {
        name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None
    }


def assert_same_gradients(grads, expected):
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_logps_and_gradients_equal_the_models_logits(layout, tied, chunk_size):
    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=tied)
    assert chunkable_head(model) is model.lm_head
    with torch.no_grad():
        expected, expected_lengths = scored(model, layout, None)
        logps, lengths = scored(model, layout, chunk_size)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(lengths, expected_lengths)
    expected_loss, expected_grads = dpo_gradients(model, layout, None)
    loss, grads = dpo_gradients(model, layout, chunk_size)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, expected_grads)


def test_the_head_sees_no_position_when_chunked():
    model = tiny_llama(TOKENIZER, seed=3)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    with torch.no_grad():
        scored(model, "packed", 8)
    assert seen == [0]  # the forward's own head call got an empty slice; the chunks did the work
    assert not model.lm_head._forward_pre_hooks  # and the recording hook is gone


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_lora_head_chunks_through_checkpoints(layout):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False), config)
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    head = chunkable_head(model)
    assert head is not None and type(head) is not torch.nn.Linear  # the LoRA layer itself
    with torch.no_grad():
        torch.testing.assert_close(
            scored(model, layout, 5)[0], scored(model, layout, None)[0], rtol=1e-5, atol=1e-5
        )
    expected_loss, expected_grads = dpo_gradients(model, layout, None)
    loss, grads = dpo_gradients(model, layout, 5)
    assert any("lm_head.lora" in name for name in grads)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, expected_grads)


def test_a_biased_head_in_chunks_equals_its_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11, 2))
    weights = torch.randn(11, 2)  # an upstream gradient that differs per target

    def gradients(compute):
        head.zero_grad()
        hidden.grad = None
        logps = compute()
        (logps * weights).sum().backward()
        return logps.detach(), [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]

    expected, expected_grads = gradients(lambda: head(hidden).log_softmax(-1).gather(1, targets))
    logps, grads = gradients(lambda: token_logps(hidden, head, targets, chunk_size=4))
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_chunks_under_bfloat16_autocast_follow_the_models_head():
    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected_grads = dpo_gradients(model, "packed", None)
        loss, grads = dpo_gradients(model, "packed", 6)
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_an_empty_batch_of_positions_still_backpropagates():
    model = tiny_llama(TOKENIZER, seed=3)
    same = [Pair([7, 8], [20, 21, EOS], [20, 21, EOS])]
    logps, lengths = scored(model, "packed", 4, pairs=same, score_shared_prefix=False)
    assert logps.tolist() == [0.0, 0.0] and lengths.tolist() == [0.0, 0.0]
    logps.sum().backward()  # connected to the model, with zero gradients


def tiny_causal_lm(model_type: str):
    config = AutoConfig.for_model(
        model_type, vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


PLAIN_HEAD_TYPES = [
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo2",
    "smollm3",
]  # fmt: skip


def test_every_plain_head_class_is_covered():
    assert {type(tiny_causal_lm(kind)).__name__ for kind in PLAIN_HEAD_TYPES} == PLAIN_HEAD_MODELS


@pytest.mark.parametrize("model_type", [*PLAIN_HEAD_TYPES, "gemma2", "cohere", "granite"])
def test_chunks_reproduce_each_models_logits_or_are_not_used(model_type):
    model = tiny_causal_lm(model_type)
    # soft-capped (Gemma 2) and scaled (Cohere, Granite) logits keep the model's own computation
    assert (chunkable_head(model) is not None) == (model_type in PLAIN_HEAD_TYPES)
    with torch.no_grad():
        expected, _ = scored(model, "padded", None)
        logps, _ = scored(model, "padded", 3)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_sharded_or_partitioned_heads_keep_the_models_logits():
    model = tiny_llama(TOKENIZER, seed=0)
    wrapper = torch.nn.Module()  # what DDP and DeepSpeed's engine look like from outside: .module
    wrapper.module = model
    assert chunkable_head(wrapper) is model.lm_head
    sharded = copy.deepcopy(model)
    layer = sharded.model.layers[0]  # fully_shard turns a unit's class into FSDP<Name>(FSDPModule, Name)
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    assert chunkable_head(sharded) is None
    partitioned = copy.deepcopy(model)
    partitioned.lm_head.weight.ds_id = 0  # ZeRO-3 marks its partitioned parameters
    assert chunkable_head(partitioned) is None
    dispatched = copy.deepcopy(model)
    dispatched.lm_head._hf_hook = object()  # accelerate's device_map hooks move weights in the forward
    assert chunkable_head(dispatched) is None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_leaving_out_the_shared_prefix_keeps_the_dpo_loss_and_gradients(layout):
    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        full, full_lengths = scored(model, layout, 4)
        tails, tail_lengths = scored(model, layout, 4, score_shared_prefix=False)
    chosen, rejected = full.chunk(2)
    tail_chosen, tail_rejected = tails.chunk(2)
    # what is left out is the same on both sides: the margin does not move
    torch.testing.assert_close(chosen - rejected, tail_chosen - tail_rejected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chosen - tail_chosen, rejected - tail_rejected, rtol=1e-5, atol=1e-4)
    # each side counts its tokens past the shared prefix: the answer length less the shared part
    for index, item in enumerate(PAIRS):
        shared = 0
        while shared < min(len(item.chosen_ids), len(item.rejected_ids)):
            if item.chosen_ids[shared] != item.rejected_ids[shared]:
                break
            shared += 1
        skipped = max(shared, 1 - len(item.prompt_ids))
        assert tail_lengths[index] == len(item.chosen_ids) - skipped
        assert tail_lengths[len(PAIRS) + index] == len(item.rejected_ids) - skipped
    assert (tail_lengths < full_lengths).any()
    expected_loss, expected_grads = dpo_gradients(model, layout, None)
    loss, grads = dpo_gradients(model, layout, 4, score_shared_prefix=False)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads, expected_grads)


@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
@pytest.mark.parametrize("pair_scoring", ["packed", "padded"])
def test_the_trainer_scores_what_its_loss_reads(tmp_path, addition_dataset, loss_type, pair_scoring):
    args = make_args(tmp_path, loss_type=loss_type, pair_scoring=pair_scoring, logprob_chunk_size=3)
    trainer = SAPOTrainer(
        model=tiny_llama(TOKENIZER, seed=0),
        args=args,
        train_dataset=addition_dataset,
        processing_class=TOKENIZER,
    )
    with torch.no_grad():
        logps, lengths = trainer.scorer.score(trainer.model, trainer.scorer.collate(PAIRS))
        full, full_lengths = scored(trainer.model, pair_scoring, None)
    if loss_type == "orpo":  # ORPO's averages need whole answers
        torch.testing.assert_close(logps, full, rtol=1e-5, atol=1e-5)
        assert torch.equal(lengths, full_lengths)
    else:  # DPO leaves the shared prefix out of both sides
        assert (lengths < full_lengths).any()
        torch.testing.assert_close(logps.chunk(2)[0] - logps.chunk(2)[1], full.chunk(2)[0] - full.chunk(2)[1])


def test_a_negative_chunk_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^logprob_chunk_size=-1: "):
        make_args(tmp_path, logprob_chunk_size=-1)
    assert make_args(tmp_path, logprob_chunk_size=0).logprob_chunk_size == 0
