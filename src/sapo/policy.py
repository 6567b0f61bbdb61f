"""The policy as the trainer needs it: a model and tokenizer, wrapped in LoRA when asked.

A model id is loaded with ``AutoModelForCausalLM`` (and its tokenizer); a ``peft_config`` wraps
the model in a fresh adapter; a model that already carries an adapter trains that adapter.
:func:`check_master_precision` refuses weights that would be stepped in bfloat16 or float16.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl.trainer.utils import disable_dropout_in_model


def prepare_policy(model, args, processing_class=None, peft_config=None):
    """Return ``(model, tokenizer)`` ready for training; the tokenizer gets a pad token if it has none."""
    if isinstance(model, str):
        model_id = model
        init_kwargs = args.model_init_kwargs or {}
        model = AutoModelForCausalLM.from_pretrained(model_id, **init_kwargs)
        if processing_class is None:  # from the same revision, with the same trust in its code
            hub = {key: init_kwargs[key] for key in ("revision", "trust_remote_code") if key in init_kwargs}
            processing_class = AutoTokenizer.from_pretrained(model_id, **hub)
    if processing_class is None:
        raise ValueError("processing_class (the tokenizer) is required when model is given as an instance")
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    if peft_config is not None:
        if is_peft_model(model):
            raise ValueError(
                "peft_config: the model already carries adapters; "
                "pass peft_config=None to train its active adapter"
            )
        from peft import get_peft_model

        set_seed(args.seed)  # adapter initialisation is random: make it the run's
        model = get_peft_model(model, peft_config)
    elif is_peft_model(model):
        model.set_adapter(policy_adapter_name(model))  # an adapter loaded for inference becomes trainable
    if args.disable_dropout:
        disable_dropout_in_model(model)
    return model, processing_class


def check_master_precision(model, args, state) -> None:
    """Refuse to train ``model`` when its trainable weights are bfloat16 or float16 and nothing
    keeps float32 master weights for the optimizer (``state``: accelerate's ``AcceleratorState``).

    A bfloat16 weight of size 0.02 has a spacing of about 1.2e-4: a step of lr 5e-7 (the paper's
    DPO rate) rounds away and the run trains for hours without moving (tests/test_precision.py
    measures it). Masters exist under DeepSpeed (ZeRO-1/2/3 step float32 partitions; stage 0 with
    bf16 or fp16 enabled keeps float32 copies) and under FSDP2 with mixed precision (accelerate
    upcasts the trainable weights to float32 and computes on lower-precision copies). LoRA
    adapters, float32 over a low-precision base, pass. This is an error rather than a warning
    because the failure is silent and a warning is lost in a multi-GPU log; a deliberate choice
    (an optimizer with Kahan summation or stochastic rounding, a learning rate large enough)
    sets ``allow_low_precision_weights``.
    """
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not low or args.allow_low_precision_weights:
        return
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        config = deepspeed_plugin.deepspeed_config

        def enabled(name: str) -> bool:  # "auto" follows the TrainingArguments flag
            value = (config.get(name) or {}).get("enabled", False)
            return value is True or (value == "auto" and bool(getattr(args, name)))

        if (config.get("zero_optimization") or {}).get("stage", 0) >= 1 or enabled("bf16") or enabled("fp16"):
            return
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    already_sharded = any(isinstance(p, DTensor) for p in low)  # accelerate upcasts only what it shards
    if fsdp_plugin is not None and state.mixed_precision != "no" and not already_sharded:
        return
    dtype = str(low[0].dtype).removeprefix("torch.")
    raise ValueError(
        f"{len(low)} trainable weight tensors are {dtype} and nothing keeps float32 master weights: a step "
        f"smaller than half a weight's {dtype} spacing (0.2-0.4% of it) rounds away, as steps of lr 5e-7 do; "
        "load the model in float32 (torch_dtype: float32) and keep bf16: true (compute stays bfloat16), or "
        "train under DeepSpeed ZeRO (recipes/accelerate/zero3.yaml) or FSDP2 (recipes/accelerate/fsdp2.yaml),"
        " which keep float32 masters; allow_low_precision_weights=True trains as it is"
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return sorted(i for i in ids if i is not None)


def is_peft_model(model) -> bool:
    """Whether ``model`` is a PEFT model (it carries adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")


def policy_adapter_name(model) -> str:
    """The adapter that trains: the active one (PEFT models carry one active adapter here)."""
    active = model.active_adapter
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"the model has several active adapters {active}; SAPO trains exactly one")
        active = active[0]
    return active


@contextlib.contextmanager
def saving_policy_adapter_only(model) -> Iterator[None]:
    """For the block, ``save_pretrained`` of a PEFT ``model`` writes the policy adapter alone (not
    SAPO's EMA and reference adapters, which live on the same model); other models are unchanged."""
    if not is_peft_model(model):
        yield
        return
    save_all = model.save_pretrained
    model.save_pretrained = functools.partial(save_all, selected_adapters=[policy_adapter_name(model)])
    try:
        yield
    finally:
        del model.save_pretrained  # back to the class's method
