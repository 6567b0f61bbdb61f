"""What the trainer may ask of the EMA model and of the DPO reference, wherever their weights live.

Four homes implement both contracts in full: whole copies (:mod:`sapo.copies.whole`), LoRA
adapters on the policy's base (:mod:`sapo.copies.lora`), FSDP2 shards (:mod:`sapo.copies.fsdp2`)
and ZeRO-3 partitions (:mod:`sapo.copies.zero3`). Callers use these members only; none probes
for others. LoRA's copies live on the policy model itself, so when accelerate distributes the
policy they are distributed with it: :class:`PolicyAdapters` is how the FSDP2 and ZeRO-3
handovers tell them so.

Two kinds of weight access serve two needs:

- ``tensors`` / ``load_tensors``: this rank's part of each weight (the whole weight when not
  distributed). A reference sync is ``reference.load_tensors(ema.tensors())``: local, no collective.
- ``full_tensors`` / ``load_full_tensors``: whole weights, for checkpoint files that are the same
  whatever the placement. Every rank must call them together when ``sharded`` is true.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class CopyWeights(Protocol):
    """Weight access shared by the EMA and the reference."""

    @property
    def sharded(self) -> bool:
        """Whether the weights are distributed across ranks: the model's forward is then a
        collective, and every rank must score or sample in the same steps."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's part of each weight, by parameter name (tied weights once)."""
        ...

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy same-named parts (from :meth:`tensors` of a copy placed alike) into these weights."""
        ...

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole weights on the CPU; ``keep=False`` (ranks that do not write) returns ``{}``."""
        ...

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set these weights from whole tensors; each rank keeps its own part."""
        ...


@runtime_checkable
class EMA(CopyWeights, Protocol):
    """The float32 moving average of the policy, which samples SAPO's segments."""

    decay: float
    num_updates: int

    @property
    def model(self) -> nn.Module:
        """The module that holds the averaged weights (for LoRA, the policy model itself)."""
        ...

    def update(self, policy: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * policy``; counts one update."""
        ...

    def sampling_model(self, whole: bool = True) -> AbstractContextManager[nn.Module]:
        """A model to generate with, holding the averaged weights, for the ``with`` block.

        ``whole=False``: the weights as they are stored (sharded, partitioned), for a reader that
        gathers each weight itself (the vLLM backend's push); a forward is then collective.
        """
        ...


@runtime_checkable
class Reference(CopyWeights, Protocol):
    """The frozen DPO reference: scores answers, never trains."""

    @property
    def model(self) -> nn.Module:
        """The module whose forward scores (for LoRA, the policy model itself)."""
        ...

    def scoring_model(self) -> AbstractContextManager[nn.Module]:
        """The model to score with, reference weights active, for the ``with`` block."""
        ...


@runtime_checkable
class PolicyAdapters(Protocol):
    """Copies that are adapters on the policy model (:mod:`sapo.copies.lora`): distributing the
    policy distributes them, and the handover only tells them how."""

    def partitioned_by(self, engine) -> None:
        """DeepSpeed ZeRO-3 (the training ``engine``) partitioned the policy, adapters included."""
        ...

    def sharded_by_fsdp2(self) -> None:
        """FSDP2 sharded the policy, adapters included, and replaced its parameters."""
        ...
