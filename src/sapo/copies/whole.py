"""The DPO reference as a whole frozen copy of the policy on one device (DDP, ZeRO-2, one process).

Its EMA counterpart is :class:`sapo.ema.EMAModel`, the update rule itself.
"""

from __future__ import annotations

import contextlib

import torch
from trl.trainer.utils import disable_dropout_in_model

from sapo.ema import copy_weights


class CopiedReference:
    """A frozen full model used only to score responses; implements
    :class:`sapo.copies.contract.Reference`."""

    sharded = False

    def __init__(self, model: torch.nn.Module, device, disable_dropout: bool = True):
        self._model = model.to(device).eval().requires_grad_(False)
        if disable_dropout:
            disable_dropout_in_model(self._model)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def scoring_model(self):
        return contextlib.nullcontext(self._model)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._model.named_parameters())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(tensors, dict(self._model.named_parameters()))

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        return self.tensors() if keep else {}

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_tensors(tensors)
