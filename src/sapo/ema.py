"""The exponential moving average (EMA) of the policy, the model that samples SAPO's segments.

Update rule, applied every ``ema_update_interval`` optimizer steps::

    ema = decay * ema + (1 - decay) * policy

``decay`` weights the OLD average (the paper uses 0.5). TRL's ``ref_model_mixup_alpha`` is the
other way round: there ``alpha`` weights the NEW policy. The average is kept in float32 even when
the policy trains in bfloat16: with a decay near 1 the per-step change ``(1 - decay) * delta`` is
smaller than bfloat16's resolution and a bf16 average would stop moving.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def check_decay(decay: float) -> None:
    """The one rule for a decay, shared by every EMA home and by ``SAPOConfig``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")


def check_same_names(source, target) -> None:
    """Fail naming a few parameter names when two weight collections differ in names."""
    if source.keys() != target.keys():
        differing = sorted(source.keys() ^ target.keys())[:3]
        raise ValueError(f"weights differ in names, e.g. {differing}")


class EMAModel:
    """A float32 copy of a model whose weights track the policy's moving average; the whole-copy
    home of :class:`sapo.copies.contract.EMA`.

    Args:
        model: the policy at step 0; the average starts as an exact copy of it.
        decay: weight of the old average in each update, in ``[0, 1)``.
        device: where the average lives (defaults to the policy's device); ``"cpu"`` keeps it off
            the accelerator for large models.
    """

    sharded = False  # a whole copy on one device

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None):
        check_decay(decay)
        self.decay = decay
        self.model = copy.deepcopy(model).to(dtype=torch.float32)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """Move the average toward ``policy``: ``ema = decay * ema + (1 - decay) * policy``."""
        for average, current in zip_named(self.model, policy):
            average.lerp_(current.detach().to(device=average.device, dtype=torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    def copy_to(self, target: nn.Module) -> None:
        """Write the averaged weights into ``target`` (cast to its dtype), e.g. the DPO reference."""
        copy_weights(self.tensors(), dict(target.named_parameters()))

    def sampling_model(self):
        """The model to generate with: the float32 average itself."""
        return contextlib.nullcontext(self.model)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights (float32), one entry per distinct parameter (tied weights once)."""
        return dict(self.model.named_parameters())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(tensors, dict(self.model.named_parameters()))

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        return self.tensors() if keep else {}

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_tensors(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict (float32)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


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
