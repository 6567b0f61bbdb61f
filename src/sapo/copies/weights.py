"""Weight helpers every home of the EMA and the reference uses (:mod:`sapo.copies`): matching
weights by name, copying them across dtypes and devices, and whole weights for a generation call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from trl.models.utils import add_hooks, remove_hooks


def check_same_names(source, target) -> None:
    """Fail naming a few parameter names when two weight collections differ in names."""
    if source.keys() != target.keys():
        differing = sorted(source.keys() ^ target.keys())[:3]
        raise ValueError(f"weights differ in names, e.g. {differing}")


def zip_named(source: nn.Module, target: nn.Module):
    """Pairs ``(source_param, target_param)`` matched by name; fails loudly on a mismatch."""
    target_params = dict(target.named_parameters())
    source_params = dict(source.named_parameters())
    check_same_names(source_params, target_params)
    for name, param in source_params.items():
        yield param, target_params[name]


@torch.no_grad()
def copy_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """Copy tensors into same-named, same-shaped tensors (parameters, or this rank's shards or
    slices of them), casting to their dtype and device."""
    check_same_names(source, target)
    for name, param in target.items():
        if source[name].shape != param.shape:
            got, expected = tuple(source[name].shape), tuple(param.shape)
            raise ValueError(f"{name}: a tensor of shape {got}, expected {expected}")
        param.copy_(source[name].to(device=param.device, dtype=param.dtype))


@contextlib.contextmanager
def unsynced_generate(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` whose ``generate`` runs with ``synced_gpus=False`` for the block.

    transformers turns ``synced_gpus`` on under ZeRO-3 and FSDP, which keeps every rank decoding
    until the longest row of any rank ends, one all-reduce per token. Once the weights are
    gathered whole for a generation call no rank needs the others: each stops at its own length.
    """
    model.generate = functools.partial(type(model).generate, model, synced_gpus=False)
    try:
        yield model
    finally:
        del model.generate  # back to the class's method


@contextlib.contextmanager
def whole_for_generation(engine, model: nn.Module | None = None):
    """``model`` (default: the engine's module) with every weight of ``engine`` gathered once.

    ZeRO-3's hooks would fetch and release each layer at every token; they are taken off for the
    call. ``generate`` runs with ``synced_gpus=False`` (transformers turns it on under ZeRO-3):
    with the weights whole no rank needs the others, and each stops at its own length. Every
    rank must enter.
    """
    import deepspeed

    model = engine.module if model is None else model
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        remove_hooks(engine)
        try:
            with unsynced_generate(model):
                yield model
        finally:
            add_hooks(engine)
