"""Whole copies on one device (DDP, ZeRO-2, one process): the float32 EMA model
(:class:`EMAModel`) and the frozen DPO reference (:class:`CopiedReference`)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from trl.trainer.utils import disable_dropout_in_model

from sapo.copies.weights import copy_weights, zip_named
from sapo.ema import check_decay, move_average


class _WholeWeights:
    """Weight access of a whole copy on one device (``self.model``): its parts are its weights."""

    sharded = False  # a whole copy on one device
    model: nn.Module

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights, one entry per distinct parameter (tied weights once)."""
        return dict(self.model.named_parameters())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(tensors, dict(self.model.named_parameters()))

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        return self.tensors() if keep else {}

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_tensors(tensors)


class EMAModel(_WholeWeights):
    """A float32 copy of a model whose weights track the policy's moving average; the whole-copy
    home of :class:`sapo.copies.contract.EMA`.

    Args:
        model: the policy at step 0; the average starts as an exact copy of it.
        decay: weight of the old average in each update, in ``[0, 1)``.
        device: where the average lives (defaults to the policy's device); ``"cpu"`` keeps it off
            the accelerator for large models.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None):
        check_decay(decay)
        self.decay = decay
        self.model = copy.deepcopy(model).to(dtype=torch.float32)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    def update(self, policy: nn.Module) -> None:
        """Move the average toward ``policy``: ``ema = decay * ema + (1 - decay) * policy``."""
        for average, current in zip_named(self.model, policy):
            move_average(average, current, self.decay)
        self.num_updates += 1

    def sampling_model(self, whole: bool = True):
        """The model to generate with: the float32 average itself (always whole)."""
        return contextlib.nullcontext(self.model)


class CopiedReference(_WholeWeights):
    """A frozen full model used only to score responses; implements
    :class:`sapo.copies.contract.Reference`."""

    def __init__(self, model: torch.nn.Module, device, disable_dropout: bool = True):
        self.model = model.to(device).eval().requires_grad_(False)
        if disable_dropout:
            disable_dropout_in_model(self.model)

    def scoring_model(self):
        return contextlib.nullcontext(self.model)
