"""bf16 and gradient checkpointing, with full fine-tuning and with LoRA."""

import pytest
import torch
from test_lora import lora
from test_trainer import make_args

from sapo import SAPOTrainer
from sapo.builtin.tiny import tiny_llama


@pytest.mark.parametrize("use_lora", [False, True])
@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_bf16_and_gradient_checkpointing_train(tmp_path, tokenizer, addition_dataset, use_lora, loss_type):
    model = tiny_llama(tokenizer, seed=0)
    trainer = SAPOTrainer(
        model=model,
        args=make_args(
            tmp_path,
            loss_type=loss_type,
            max_steps=3,
            logging_steps=1,
            bf16=True,
            gradient_checkpointing=True,
        ),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
        peft_config=lora() if use_lora else None,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bf16_policy_keeps_a_float32_ema(tmp_path, tokenizer, addition_dataset):
    model = tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    trainer = SAPOTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2, bf16=True, ema_decay=0.99),
        train_dataset=addition_dataset,
        processing_class=tokenizer,
    )
    initial = {n: p.detach().float().clone() for n, p in trainer.ema.model.named_parameters()}
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.ema.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.ref_model.parameters())
    # with decay 0.99 the change per step is far below bf16's resolution, yet the EMA moves
    moved = [n for n, p in trainer.ema.model.named_parameters() if not torch.equal(p, initial[n])]
    assert moved
