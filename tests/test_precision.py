"""bf16 and gradient checkpointing, with full fine-tuning and with LoRA; the guard against
bfloat16 weights stepped without float32 masters, and what it prevents."""

import copy
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_lora import lora
from test_trainer import make_args

from sapo import SAPOTrainer
from sapo.builtin.tiny import tiny_llama
from sapo.policy import check_master_precision


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
        args=make_args(tmp_path, max_steps=2, bf16=True, ema_decay=0.99, allow_low_precision_weights=True),
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


def rmsprop_step_changes(model, dtype, lr=5e-7):
    """Fraction of ``model``'s weights, held in ``dtype``, that one RMSprop step of ``lr`` changes
    (the gradients of a language-modelling loss computed in float32, then cast)."""
    ids = torch.randint(7, 100, (8, 24), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    stepped = copy.deepcopy(model).to(dtype)
    for param, source in zip(stepped.parameters(), model.parameters()):
        param.grad = source.grad.to(dtype)
    before = [param.detach().clone() for param in stepped.parameters()]
    torch.optim.RMSprop(stepped.parameters(), lr=lr).step()
    changed = sum((param != old).sum().item() for param, old in zip(stepped.parameters(), before))
    return changed / sum(param.numel() for param in stepped.parameters())


def test_a_bfloat16_step_at_the_papers_rate_rounds_away(tokenizer):
    # what the guard prevents: at lr 5e-7 (SAPO-DPO's) RMSprop moves a weight by about 5e-6, below
    # half the bfloat16 spacing of any weight larger than ~1e-3, so nearly every weight keeps its
    # value; float32 masters take the same step everywhere (measured: 7.8% vs 100% of the weights)
    model = tiny_llama(tokenizer, seed=0)
    assert rmsprop_step_changes(model, torch.float32) > 0.99
    assert rmsprop_step_changes(model, torch.bfloat16) < 0.15


def test_trainer_refuses_bfloat16_weights_without_float32_masters(tmp_path, tokenizer, addition_dataset):
    model = tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 master weights.*torch_dtype: float32.*zero3.yaml"):
        SAPOTrainer(
            model=model,
            args=make_args(tmp_path, bf16=True, learning_rate=5e-7),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
        )


def test_lora_adapters_over_a_bfloat16_base_pass_silently(tmp_path, tokenizer, addition_dataset, caplog):
    model = tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        trainer = SAPOTrainer(
            model=model,
            args=make_args(tmp_path, bf16=True),
            train_dataset=addition_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
        )
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "float32" in message or "precision" in message]


def accelerate_state(deepspeed=None, fsdp=False, mixed_precision="bf16"):
    """What the guard reads of accelerate's state: the DeepSpeed config, the FSDP plugin, the precision."""
    plugin = None if deepspeed is None else SimpleNamespace(deepspeed_config=deepspeed)
    return SimpleNamespace(
        deepspeed_plugin=plugin, fsdp_plugin=object() if fsdp else None, mixed_precision=mixed_precision
    )


@pytest.mark.parametrize(
    "state, allowed",
    [
        (accelerate_state(), False),  # one device or DDP: the optimizer steps the bfloat16 weights
        (accelerate_state(deepspeed={"zero_optimization": {"stage": 3}}), True),
        (accelerate_state(deepspeed={"zero_optimization": {"stage": 2}}), True),
        (accelerate_state(deepspeed={"zero_optimization": {"stage": 0}, "bf16": {"enabled": "auto"}}), True),
        (accelerate_state(deepspeed={"zero_optimization": {"stage": 0}}), False),
        (accelerate_state(fsdp=True), True),  # accelerate upcasts the trainable weights to float32
        (accelerate_state(fsdp=True, mixed_precision="no"), False),
    ],
)
def test_master_weights_that_deepspeed_and_fsdp2_keep_pass_the_guard(tmp_path, tokenizer, state, allowed):
    model = tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    args = SimpleNamespace(allow_low_precision_weights=False, bf16=True, fp16=False)
    if allowed:
        check_master_precision(model, args, state)
    else:
        with pytest.raises(ValueError, match="float32"):
            check_master_precision(model, args, state)
    check_master_precision(
        model, SimpleNamespace(**{**vars(args), "allow_low_precision_weights": True}), state
    )
