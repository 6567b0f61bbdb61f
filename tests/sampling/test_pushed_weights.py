"""`sapo.sampling.pushed_weights.engine_weights`: what an engine that copies the weights receives.
A LoRA adapter arrives merged exactly as peft merges it, computed beside the live model."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sapo.builtin.tiny import tiny_llama
from sapo.sampling.pushed_weights import engine_weights


def lora(**options):
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **options
    )


def test_a_tied_weight_is_pushed_under_each_of_its_names(tokenizer):
    model = tiny_llama(tokenizer, seed=0)  # tied embeddings
    weights = dict(engine_weights(model, torch.bfloat16))
    assert weights.keys() == dict(model.named_parameters(remove_duplicate=False)).keys()
    assert torch.equal(weights["lm_head.weight"], model.model.embed_tokens.weight.to(torch.bfloat16))
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())


@pytest.mark.parametrize("options", [{}, {"fan_in_fan_out": False, "modules_to_save": ["lm_head"]}])
def test_the_active_adapter_arrives_merged_and_nothing_else_changes(tokenizer, options):
    model = get_peft_model(tiny_llama(tokenizer, seed=0, tie_word_embeddings=False), lora(**options))
    model.add_adapter("other", lora(**options))  # random B too: merging the wrong one would show
    model.set_adapter("other")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save.other" in name:
                param.add_(1.0)  # the active adapter's copy differs from the original module
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    merged = dict(engine_weights(model, torch.float32))

    expected = copy.deepcopy(model).merge_and_unload(adapter_names=["other"])
    assert merged.keys() == dict(expected.named_parameters(remove_duplicate=False)).keys()
    for name, param in expected.named_parameters():
        torch.testing.assert_close(merged[name], param, rtol=0, atol=1e-6, msg=name)
    assert model.active_adapter == "other"
    assert all(torch.equal(before[name], param) for name, param in model.named_parameters())


def test_dora_is_refused(tokenizer):
    model = get_peft_model(tiny_llama(tokenizer, seed=0), lora(use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        dict(engine_weights(model, torch.float32))
