"""The policy as the trainer needs it: a model and tokenizer, wrapped in LoRA when asked.

A model id is loaded with ``AutoModelForCausalLM`` (and its tokenizer); a ``peft_config`` wraps
the model in a fresh adapter; a model that already carries an adapter trains that adapter.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl.trainer.utils import disable_dropout_in_model


def prepare_policy(model, args, processing_class=None, peft_config=None):
    """Return ``(model, tokenizer)`` ready for training; the tokenizer gets a pad token if it has none."""
    if isinstance(model, str):
        model_id = model
        model = AutoModelForCausalLM.from_pretrained(model_id, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id)
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
