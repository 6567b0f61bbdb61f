"""LoRA: policy, EMA and reference as three adapters on one frozen base."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_trainer import held_out_margin, make_args

from sapo import SAPOTrainer
from sapo.builtin.tiny import tiny_llama
from sapo.copies.lora import EMA_ADAPTER, REFERENCE_ADAPTER, adapter_parameters


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_three_adapters_share_one_base(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=4, ref_model_sync_steps=3, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    model = trainer.model
    assert set(model.peft_config) == {"default", EMA_ADAPTER, REFERENCE_ADAPTER}
    before = base_weights(model)
    initial = {k: v.detach().clone() for k, v in adapter_parameters(model, "default").items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    trainer.train()

    after = base_weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n].float(), after[n].float()) for n in before), "the base changed"
    policy = adapter_parameters(model, "default")
    assert any(not torch.equal(initial[k], policy[k]) for k in initial), "the policy adapter did not train"
    # only the policy adapter is trainable after generation and reference passes switched adapters
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # the reference adapter was synced from the EMA at step 3, then the EMA moved once more
    ema = adapter_parameters(model, EMA_ADAPTER)
    for name, value in trainer.ema.shadow.items():
        torch.testing.assert_close(ema[name], value.to(ema[name].dtype))
    assert trainer.ema.num_updates == 4


def test_adapter_ema_follows_the_formula(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=1, ema_decay=0.75, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    initial = {k: v.detach().clone().float() for k, v in adapter_parameters(trainer.model, "default").items()}
    trainer.train()
    policy = adapter_parameters(trainer.model, "default")
    for name, average in trainer.ema.shadow.items():
        assert average.dtype == torch.float32
        torch.testing.assert_close(average, 0.75 * initial[name] + 0.25 * policy[name].detach().float())


def test_reference_adapter_equals_ema_right_after_sync(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=3, ref_model_sync_steps=3, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    reference = adapter_parameters(trainer.model, REFERENCE_ADAPTER)
    for name, value in trainer.ema.shadow.items():
        torch.testing.assert_close(reference[name], value.to(reference[name].dtype), rtol=0, atol=0)


def test_saved_adapter_is_the_policy_and_loads_with_peft(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved
    assert EMA_ADAPTER not in saved and REFERENCE_ADAPTER not in saved
    loaded = PeftModel.from_pretrained(tiny_llama(tokenizer, seed=0), str(tmp_path / "adapter"))
    ids = torch.tensor([[4, 20, 21, 30, 9]])
    with trainer.ema.sampling_model():
        pass  # leaves the policy adapter active
    torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits)


def test_lora_training_raises_the_margin(tmp_path, tokenizer, tiny_model, addition_dataset):
    base = tiny_llama(tokenizer, seed=0)
    before = held_out_margin(base, tokenizer)
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, max_steps=30, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    after = held_out_margin(trainer.model, tokenizer)
    assert after["margin"] > before["margin"] + 0.3, (before, after)


def test_model_that_already_carries_an_adapter(tmp_path, tokenizer, addition_dataset):
    sft = get_peft_model(tiny_llama(tokenizer, seed=0), lora())
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained-looking adapter
    sft.save_pretrained(tmp_path / "sft")
    loaded = PeftModel.from_pretrained(tiny_llama(tokenizer, seed=0), str(tmp_path / "sft"))  # inference mode
    start = {k: v.detach().clone() for k, v in adapter_parameters(loaded, "default").items()}
    trainer = SAPOTrainer(
        model=loaded,
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    # EMA and reference start from the loaded adapter, not from zero
    for name, value in adapter_parameters(loaded, REFERENCE_ADAPTER).items():
        assert torch.equal(value, start[name])
    trainer.train()
    assert any(not torch.equal(start[k], v) for k, v in adapter_parameters(loaded, "default").items())


def test_adapter_resume_is_bit_identical(tmp_path, tokenizer, addition_dataset):
    def run(output_dir, **overrides):
        settings = dict(
            max_steps=6, save_strategy="steps", save_steps=3, sample_every_n_steps=2, learning_rate=1e-2
        )
        settings.update(overrides)
        trainer = SAPOTrainer(
            model=tiny_llama(tokenizer, seed=0),
            args=make_args(output_dir, ref_model_sync_steps=2, gradient_accumulation_steps=2, **settings),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
        )
        return trainer

    full = run(tmp_path / "full", save_strategy="no")
    full.train()
    run(tmp_path / "split").train()
    resumed = run(tmp_path / "split")
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "out" / "checkpoint-3"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert full.buffer.items() == resumed.buffer.items()


def test_adapter_misuse_is_refused(tmp_path, tokenizer, addition_dataset):
    with pytest.raises(ValueError, match="already carries adapters"):
        SAPOTrainer(
            model=get_peft_model(tiny_llama(tokenizer), lora()),
            args=make_args(tmp_path),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
        )
    with pytest.raises(ValueError, match="ref_model"):
        SAPOTrainer(
            model=tiny_llama(tokenizer),
            args=make_args(tmp_path),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
            ref_model=tiny_llama(tokenizer, seed=1),
        )


def test_orpo_with_lora_adds_no_reference_adapter(tmp_path, tokenizer, tiny_model, addition_dataset):
    trainer = SAPOTrainer(
        model=tiny_model,
        args=make_args(tmp_path, loss_type="orpo", max_steps=2, learning_rate=1e-2),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    assert set(trainer.model.peft_config) == {"default", EMA_ADAPTER}
    assert trainer.reference is None
