"""The sampling model's weights as an inference engine loads them: whole, one at a time, under the
names of a transformers checkpoint.

An engine that keeps its own copy of the weights (:mod:`sapo.sampling.vllm`) is refreshed from the
torch model it stands in for. :func:`engine_weights` yields ``(name, tensor)`` pairs lazily, so the
engine copies each tensor before the next one exists:

- a whole model: every parameter, a tied one under each of its names (``lm_head.weight`` as well
  as ``model.embed_tokens.weight``): the engine is built untied, since on a CPU vLLM keeps a
  repacked copy of its output layer that a push through the tied embedding would leave stale;
- DeepSpeed ZeRO-3: each partitioned parameter gathered alone (``GatheredParameters([param])``)
  and released before the next, so no rank holds more than one whole weight at a time; a
  parameter already gathered by the caller is read as it is;
- FSDP2: each DTensor's ``full_tensor()``, one at a time (a collective: every rank iterates);
- PEFT: the active adapter merged into each base weight, ``W + scaling * B @ A`` computed in float32
  beside the model (``merge_and_unload`` would change the live model and every other adapter on
  it, the policy's included); ``modules_to_save`` give the active adapter's copy under the original
  name.

Each tensor is cast to the engine's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

from sapo.policy import is_peft_model, policy_adapter_name

# parameter names of LoRA's own weights: merged into the base weight, never pushed themselves
_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


def engine_weights(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of ``model`` (merged with its active adapter for a PEFT model), whole, cast to
    ``dtype``, one at a time. Under ZeRO-3 or FSDP2 every rank must iterate in full."""
    if is_peft_model(model):
        yield from _merged_adapter_weights(model, dtype)
        return
    for name, param in model.named_parameters(remove_duplicate=False):
        with _whole(param) as tensor:
            yield name, tensor.to(dtype)


@contextlib.contextmanager
def _whole(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """``param``'s whole value for the block (a copy when it had to be gathered)."""
    if isinstance(param, DTensor):
        yield param.detach().full_tensor()
        return
    if _partitioned_away(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            yield param.detach().clone()  # the gathered storage is freed on exit
        return
    yield param.detach()


def _partitioned_away(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partition not gathered at the moment."""
    if not hasattr(param, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _merged_adapter_weights(model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    adapter = policy_adapter_name(model)  # the active one: the EMA adapter inside sampling_model()
    base = model.get_base_model()
    for name, param in base.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if _LORA_PARTS.intersection(parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:  # ModulesToSaveWrapper: one trained copy per adapter
            at = parts.index("modules_to_save")
            if parts[at + 1] != adapter:
                continue
            parts = parts[:at] + parts[at + 2 :]
        layer = None
        if "base_layer" in parts:  # a LoRA layer wraps the base module as `base_layer`
            at = parts.index("base_layer")
            layer = base.get_submodule(".".join(parts[:at]))
            parts = parts[:at] + parts[at + 1 :]
        with _whole(param) as tensor:
            delta = _lora_delta(layer, adapter) if layer is not None and parts[-1] == "weight" else None
            if delta is not None:
                tensor = tensor.float() + delta.to(tensor.device)
            yield ".".join(parts), tensor.to(dtype)


def _lora_delta(layer: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    """``scaling * B @ A`` of ``adapter`` on a LoRA ``layer``, in float32 and the base weight's
    layout; ``None`` where the adapter does not touch the layer."""
    if adapter in getattr(layer, "lora_A", {}):
        down, up = layer.lora_A[adapter], layer.lora_B[adapter]
        if not isinstance(down, torch.nn.Linear):
            raise ValueError(
                f"generation_backend='vllm': LoRA on a {type(layer).__name__} layer cannot be merged "
                "for the engine (linear and embedding layers can)"
            )
        down, up, transpose = down.weight, up.weight, layer.fan_in_fan_out
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        down, up, transpose = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True
    else:
        return None
    for option in ("use_dora", "lora_bias"):
        if getattr(layer, option, {}).get(adapter, False):
            raise ValueError(
                f"generation_backend='vllm': adapters with {option} cannot be merged for the engine"
            )
    with _whole(down) as a, _whole(up) as b:
        delta = (b.float() @ a.float().to(b.device)) * layer.scaling[adapter]
    return delta.T if transpose else delta
