"""The DPO reference model and the EMA model, built for a policy: full copies, or adapters.

A full fine-tune keeps the reference as a frozen copy of the policy (or the model the user
passed) and the EMA as a float32 copy. A PEFT policy keeps both as extra adapters on the same
base (see :mod:`sapo.adapters`). Either way the trainer sees the same small interface:
``ema.update / sampling_model / tensors / load_tensors`` and
``reference.scoring_model / tensors / load_tensors``; a reference sync is
``reference.load_tensors(ema.tensors())``.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from trl.trainer.utils import disable_dropout_in_model

from .adapters import AdapterEMA, AdapterReference, is_peft_model, policy_adapter_name
from .ema import EMAModel


class CopiedReference:
    """A frozen full model used only to score responses."""

    def __init__(self, model: torch.nn.Module, device, disable_dropout: bool = True):
        self.model = model.to(device).eval().requires_grad_(False)
        if disable_dropout:
            disable_dropout_in_model(self.model)

    def scoring_model(self):
        return contextlib.nullcontext(self.model)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, param in self.model.named_parameters():
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))


def build_ema_and_reference(policy, args, ref_model=None):
    """The EMA model and (DPO only, else ``None``) the reference for ``policy``.

    Both start as exact copies of the policy at step 0, except a reference the user passed.
    """
    if is_peft_model(policy):
        if ref_model is not None:
            raise ValueError("ref_model: with a PEFT policy the reference is an adapter on the same base")
        adapter = policy_adapter_name(policy)
        ema = AdapterEMA(policy, adapter, args.ema_decay)
        reference = AdapterReference(policy, adapter) if args.loss_type == "dpo" else None
        return ema, reference
    ema = EMAModel(policy, args.ema_decay, device=args.ema_device or args.device)
    reference = None
    if args.loss_type == "dpo":
        reference_model = ref_model if ref_model is not None else copy.deepcopy(policy)
        reference = CopiedReference(reference_model, args.device, args.disable_dropout)
    return ema, reference
