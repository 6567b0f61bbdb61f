"""Run by tests/test_zero3.py under `torchrun --nproc_per_node 2` (CPU, gloo, DS_ACCELERATOR=cpu).

    torchrun --nproc_per_node 2 tests/zero3_worker.py OUTPUT_DIR

Partitions a tiny Llama policy with DeepSpeed ZeRO-3 (an engine with an optimizer, default
persistence threshold), builds SAPO's partitioned EMA and reference for it, trains the policy
one step and measures, on each rank: the EMA update against the formula on whole tensors, the
collectives each operation issues, greedy generation from the partitioned EMA against a whole
copy of the same weights, the reference sync and forward, the checkpoint round trip and the
gathering of a policy partitioned at loading. Rank 0 writes `report.json`.
"""

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, get_peft_model
from transformers.integrations import HfDeepSpeedConfig
from worker_checks import (
    check_checkpoint,
    check_generation,
    check_reference,
    collectives,
    generate,
    max_difference,
    write_report,
)

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.copies import build_ema_and_reference
from sapo.copies.lora import EMA_ADAPTER, REFERENCE_ADAPTER, adapter_parameters
from sapo.copies.whole import CopiedReference, EMAModel
from sapo.copies.zero3 import ZeroEMA, ZeroReference, is_partitioned, partition_like_policy

transformers.logging.set_verbosity_error()
DECAY = 0.75
ZERO = {"stage": 3}  # the policy's: tiny weights fall under the default persistence threshold


def whole(model) -> dict[str, torch.Tensor]:
    """Whole float32 weights of a partitioned model (collective)."""
    tensors = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            tensors[name] = param.detach().float().clone()
    return tensors


def is_whole(model) -> bool:
    """Whether every weight is gathered right now (a released one has no elements)."""
    return all(param.numel() == param.ds_numel for param in model.parameters())


def train_step(engine, tokenizer, rank: int) -> None:
    batch = torch.tensor([tokenizer.encode(["12+34=46", "7*8=56"][rank])] * 2)
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()


def check_update(engine, ema, tokenizer, rank: int, start: dict) -> dict:
    """Two training steps, each followed by an EMA update, against the formula on whole tensors."""
    expected = whole(ema.model)
    pointers = [param.ds_tensor.data_ptr() for param in ema.model.parameters()]
    counts = []
    for _ in range(2):
        train_step(engine, tokenizer, rank)
        target = whole(engine.module)
        counts.append(collectives(lambda: ema.update(engine.module)))
        expected = {name: DECAY * expected[name] + (1 - DECAY) * target[name] for name in expected}
    return {
        "update_error": max_difference(whole(ema.model), expected),
        "policy_moved": max_difference(target, start),
        "update_collectives": counts,
        "update_in_place": pointers == [param.ds_tensor.data_ptr() for param in ema.model.parameters()],
        "num_updates": ema.num_updates,
    }


def check_loaded_partitioned(tokenizer) -> dict:
    """A policy partitioned at loading (zero.Init) gets partitioned copies built slice by slice;
    whole copies (a policy that arrived whole) are handed over when training starts."""
    source = tiny_llama(tokenizer, seed=3)
    # what TrainingArguments(deepspeed=...) sets up: from_config/from_pretrained then use zero.Init
    zero3_enabled = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": ZERO})
    loaded = type(source)._from_config(source.config)
    engine, *_ = deepspeed.initialize(
        model=loaded, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": ZERO}
    )
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.copy_(source.get_parameter(name))
    args = SimpleNamespace(
        ema_decay=DECAY, loss_type="dpo", disable_dropout=True, ema_device=None, device=torch.device("cpu")
    )
    ema, reference = build_ema_and_reference(engine.module, args, device="cpu")
    del zero3_enabled
    expected = {name: param.detach() for name, param in source.named_parameters()}
    whole_ema, whole_reference = EMAModel(source, DECAY), CopiedReference(copy.deepcopy(source), "cpu")
    whole_ema.num_updates = 7
    handed_ema, handed_reference = partition_like_policy(engine.module, whole_ema, whole_reference, ZERO)
    return {
        "partitioned_at_loading": is_partitioned(engine.module),
        "copies": [type(ema).__name__, type(reference).__name__],
        "copies_error": max(
            max_difference(whole(ema.model), expected), max_difference(whole(reference.model), expected)
        ),
        "handover": [type(handed_ema).__name__, type(handed_reference).__name__],
        "handover_error": max(
            max_difference(whole(handed_ema.model), expected),
            max_difference(whole(handed_reference.model), expected),
        ),
        "handover_updates": handed_ema.num_updates,
        "already_partitioned_left_alone": partition_like_policy(engine.module, ema, reference, ZERO)
        == (ema, reference),
        "whole_policy_left_alone": partition_like_policy(source, whole_ema, whole_reference, ZERO)
        == (whole_ema, whole_reference),
    }


def check_lora(tokenizer, rank: int) -> dict:
    """LoRA under ZeRO-3: the EMA and reference adapters partitioned with the model by the
    training engine; the update, the reference sync and generation on gathered weights."""
    torch.manual_seed(4)  # the same LoRA initialisation on every rank, as a seeded run has
    peft_model = get_peft_model(
        tiny_llama(tokenizer, seed=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    args = SimpleNamespace(ema_decay=DECAY, loss_type="dpo", ema_device=None, device=torch.device("cpu"))
    ema, reference = build_ema_and_reference(peft_model, args)
    engine, *_ = deepspeed.initialize(
        model=peft_model,
        model_parameters=[param for param in peft_model.parameters() if param.requires_grad],
        config={
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        },
    )
    partition_like_policy(peft_model, ema, reference, ZERO, engine)
    policy = adapter_parameters(peft_model, "default")
    adapter = adapter_parameters(peft_model, EMA_ADAPTER)

    expected = {name: value.clone() for name, value in ema.shadow.items()}
    train_step(engine, tokenizer, rank)
    target = whole_params(policy)
    update_collectives = collectives(ema.update)
    expected = {name: DECAY * expected[name] + (1 - DECAY) * target[name] for name in expected}
    reference.load_tensors(ema.tensors())
    prompt = torch.tensor([tokenizer.encode(["12+34=", "7*8="][rank])])
    with ema.sampling_model() as model:
        whole_inside = all(param.numel() == param.ds_numel for param in model.parameters())
        active_inside = model.active_adapter
        tokens = generate(model, prompt, 6 + 4 * rank)
    train_step(engine, tokenizer, rank)  # hooks are back: training goes on
    return {
        "lora_partitioned": all(hasattr(param, "ds_id") for param in adapter.values()),
        "lora_sharded_flags": [ema.sharded, reference.sharded],
        "lora_update_error": max_difference(whole_params(adapter), expected),
        "lora_shadow_error": max_difference(ema.shadow, expected),
        "lora_update_gathers": update_collectives > 0,  # adapters only: small
        "lora_sync_error": max_difference(
            whole_params(adapter_parameters(peft_model, REFERENCE_ADAPTER)), expected
        ),
        "lora_reference_file": sorted(reference.full_tensors()) == sorted(expected),
        "lora_generation": [whole_inside, active_inside, len(tokens) - prompt.shape[1]],
        "lora_active_after": peft_model.active_adapter,
    }


def whole_params(params: dict) -> dict:
    tensors = {}
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param]):
            tensors[name] = param.detach().float().clone()
    return tensors


def main():
    directory = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    start = tiny_llama(tokenizer, seed=0)
    engine, *_ = deepspeed.initialize(
        model=copy.deepcopy(start),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": ZERO,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        },
    )
    policy = engine.module
    ema = ZeroEMA(copy.deepcopy(start), policy, DECAY, ZERO)
    start_weights = whole(ema.model)
    report = {
        "initial_error": max_difference(start_weights, whole(policy)),
        "ema_dtypes": sorted({str(param.ds_tensor.dtype) for param in ema.model.parameters()}),
        "ema_partitioned": is_partitioned(ema.model),
        "gather_collectives": collectives(lambda: ema.full_tensors(keep=False)),
    }
    report.update(check_update(engine, ema, tokenizer, rank, start_weights))
    report.update(check_generation(ema, tokenizer, rank, is_whole=is_whole))
    reference = ZeroReference(tiny_llama(tokenizer, seed=9), policy, ZERO)
    report.update(check_reference(reference, ema, tokenizer, whole))
    fresh = (
        ZeroEMA(tiny_llama(tokenizer, seed=7), policy, DECAY, ZERO),
        ZeroReference(tiny_llama(tokenizer, seed=8), policy, ZERO),
    )
    report.update(check_checkpoint(ema, reference, fresh, whole, tokenizer, directory, rank))
    report.update(check_loaded_partitioned(tokenizer))
    report.update(check_lora(tokenizer, rank))
    write_report(report, directory, rank)


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
