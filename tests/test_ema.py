"""Tests for the whole-copy EMA, ``sapo.copies.whole.EMAModel``: the float32 average and its update rule.

``ema = ema_decay * ema + (1 - ema_decay) * policy`` (decay weights the OLD average), kept in fp32
even when the policy trains in bf16; at step 0 the EMA is a copy of the initial policy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.copies.weights import copy_weights
from sapo.copies.whole import EMAModel


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def perturb(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale
        p.add_(noise.to(p.dtype))


def test_shadow_is_float32_for_a_bf16_policy(tok):
    policy = tiny_llama(tok, seed=0).to(torch.bfloat16)
    ema = EMAModel(policy, decay=0.5)
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    assert all(v.dtype == torch.float32 for v in ema.model.state_dict().values() if v.is_floating_point())
    # The policy itself is left as it was (bf16), and keeps its own storage.
    assert all(p.dtype == torch.bfloat16 for p in policy.parameters())
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ema.model.parameters()}


def test_shadow_does_not_train(tok):
    ema = EMAModel(tiny_llama(tok, seed=0), decay=0.5)
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_creation_shadow_equals_the_policy(tok, dtype):
    policy = tiny_llama(tok, seed=0).to(dtype)
    ema = EMAModel(policy, decay=0.9)
    shadow = dict(ema.model.named_parameters())
    assert shadow.keys() == dict(policy.named_parameters()).keys()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(shadow[name], p.detach().float(), rtol=0, atol=0)


def test_shadow_is_independent_of_later_policy_changes(tok):
    policy = tiny_llama(tok, seed=0)
    ema = EMAModel(policy, decay=0.5)
    before = params(ema.model)
    perturb(policy, seed=1)
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_is_decay_times_old_plus_one_minus_decay_times_policy(tok, decay, dtype):
    policy = tiny_llama(tok, seed=0).to(dtype)
    ema = EMAModel(policy, decay=decay)
    for step in range(3):
        perturb(policy, seed=10 + step)
        old = params(ema.model)
        current = {name: p.detach().float() for name, p in policy.named_parameters()}
        policy_before = params(policy)

        ema.update(policy)

        for name, p in ema.model.named_parameters():
            expected = decay * old[name] + (1 - decay) * current[name]
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, expected)
        # The policy is only read.
        for name, p in policy.named_parameters():
            torch.testing.assert_close(p, policy_before[name], rtol=0, atol=0)


def test_update_weights_the_old_average_not_the_policy():
    # Hand-checked numbers: decay 0.9 keeps 90% of the old value.
    policy = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[0.0, 10.0]]))
    ema = EMAModel(policy, decay=0.9)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[10.0, 0.0]]))
    ema.update(policy)
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.0, 9.0]]))
    ema.update(policy)
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.9, 8.1]]))


def test_repeated_updates_toward_a_fixed_policy_follow_the_closed_form():
    start = nn.Linear(4, 3)
    ema = EMAModel(start, decay=0.5)
    target = nn.Linear(4, 3)
    initial = params(start)
    for _ in range(5):
        ema.update(target)
    factor = 0.5**5
    for name, p in ema.model.named_parameters():
        expected = factor * initial[name] + (1 - factor) * dict(target.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("decay", [-0.1, -1.0, 1.0, 1.5])
def test_decay_outside_unit_interval_raises(decay):
    with pytest.raises(ValueError):
        EMAModel(nn.Linear(2, 2), decay=decay)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999])
def test_decay_inside_unit_interval_is_accepted(decay):
    assert EMAModel(nn.Linear(2, 2), decay=decay).decay == decay


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_copying_the_average_casts_it_to_the_target_dtype(tok, target_dtype):
    policy = tiny_llama(tok, seed=0)
    ema = EMAModel(policy, decay=0.5)
    perturb(policy, seed=3)
    ema.update(policy)  # the average now differs from both the initial and the current policy

    target = tiny_llama(tok, seed=1).to(target_dtype)
    copy_weights(ema.tensors(), dict(target.named_parameters()))  # what a reference sync does

    shadow = dict(ema.model.named_parameters())
    for name, p in target.named_parameters():
        assert p.dtype == target_dtype
        torch.testing.assert_close(p, shadow[name].to(target_dtype), rtol=0, atol=0)
    # The shadow stays fp32 and is not tied to the target.
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    with torch.no_grad():
        next(target.parameters()).add_(1.0)
    name = next(iter(dict(target.named_parameters())))
    assert not torch.equal(shadow[name].to(target_dtype), dict(target.named_parameters())[name])


def test_copying_the_average_to_a_model_with_different_parameters_raises():
    ema = EMAModel(nn.Linear(2, 2), decay=0.5)
    with pytest.raises(ValueError):
        copy_weights(ema.tensors(), dict(nn.Sequential(nn.Linear(2, 2)).named_parameters()))


def test_fp32_shadow_keeps_moving_where_bf16_would_stall():
    decay = 0.999
    policy = nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.fill_(1.0)
    ema = EMAModel(policy, decay=decay)

    # The smallest bf16 step above 1.0 is 2**-7; the EMA step is (1 - decay) * 2**-7 ~ 7.8e-6.
    step = 2.0**-7
    with torch.no_grad():
        policy.weight.fill_(1.0 + step)
    assert policy.weight.dtype == torch.bfloat16 and policy.weight[0, 0].item() == 1.0 + step

    # Premise: the same update carried out in bf16 rounds back to 1.0, i.e. a bf16 EMA stalls.
    bf16_average = torch.ones(8, 8, dtype=torch.bfloat16)
    bf16_average.lerp_(policy.weight.detach(), 1 - decay)
    assert torch.equal(bf16_average, torch.ones(8, 8, dtype=torch.bfloat16))
    bf16_average = decay * torch.ones(8, 8, dtype=torch.bfloat16) + (1 - decay) * policy.weight.detach()
    assert torch.equal(bf16_average, torch.ones(8, 8, dtype=torch.bfloat16))

    # The fp32 shadow moves, by the right amount, and keeps moving over repeated updates.
    ema.update(policy)
    moved = ema.model.weight.detach().clone()
    assert (moved > 1.0).all()
    torch.testing.assert_close(moved, torch.full((8, 8), 1.0 + (1 - decay) * step))
    for _ in range(9):
        ema.update(policy)
    expected = 1.0 + (1 - decay**10) * step
    torch.testing.assert_close(ema.model.weight.detach(), torch.full((8, 8), expected))
    assert (ema.model.weight > moved).all()


def test_device_argument_places_the_shadow(tok):
    ema = EMAModel(tiny_llama(tok, seed=0), decay=0.5, device="cpu")
    assert all(p.device.type == "cpu" for p in ema.model.parameters())


def test_copy_weights_refuses_a_tensor_of_another_shape():
    from sapo.copies.weights import copy_weights

    target = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"w: a tensor of shape \(3,\), expected \(2, 3\)"):
        copy_weights({"w": torch.ones(3)}, target)  # would broadcast silently with copy_
    assert torch.equal(target["w"], torch.zeros(2, 3))
