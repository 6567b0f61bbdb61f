"""LoRA: the policy, its EMA and the DPO reference as three adapters on one frozen base model.

Three full copies of a 7B model do not fit where DPO fits. With PEFT, only the adapters differ:
the policy adapter trains, the ``sapo_ema`` adapter holds the moving average of the policy
adapter (a float32 master copy is kept beside it), and the ``sapo_reference`` adapter holds the
EMA weights of the last sync. Generation and reference passes switch the active adapter; the
base weights exist once and never change.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from trl.trainer.utils import use_adapter

from sapo.copies.weights import copy_weights, whole_for_generation
from sapo.ema import check_decay, move_average

EMA_ADAPTER = "sapo_ema"
REFERENCE_ADAPTER = "sapo_reference"


def adapter_parameters(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one adapter, keyed by their name with the adapter's name left out,
    so that the same key names the same weight in every adapter."""
    found = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if adapter_name in parts:
            found[".".join(part for part in parts if part != adapter_name)] = param
    return found


def add_frozen_copy(model, source_adapter: str, new_adapter: str) -> dict[str, torch.nn.Parameter]:
    """Add ``new_adapter`` with ``source_adapter``'s config and weights; it never trains."""
    if new_adapter in model.peft_config:
        raise ValueError(f"the model already has an adapter named {new_adapter!r}")
    model.add_adapter(new_adapter, copy.deepcopy(model.peft_config[source_adapter]))
    params = adapter_parameters(model, new_adapter)
    copy_weights(adapter_parameters(model, source_adapter), params)
    for param in params.values():
        param.requires_grad_(False)
    return params


def _gathered(params, partitioned: bool, modifier_rank: int | None = None):
    """Under ZeRO-3, the block sees ``params`` whole (and, with ``modifier_rank``, what that rank
    writes into them is partitioned back); otherwise it does nothing."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


@torch.no_grad()
def _whole(params: dict[str, torch.nn.Parameter], mode: str | None) -> dict[str, torch.Tensor]:
    """Whole copies of adapter ``params``, gathered under ZeRO-3 or FSDP2 (every rank calls this)."""
    if mode == "fsdp2":
        return {name: param.detach().full_tensor() for name, param in params.items()}
    with _gathered(params.values(), mode == "zero3"):
        return {name: param.detach().clone() for name, param in params.items()}


@torch.no_grad()
def _write(tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], mode: str | None) -> None:
    """Copy whole ``tensors`` into adapter ``params``; every rank holds the same tensors. Under
    FSDP2 each rank keeps its shard (no collective); under ZeRO-3 rank 0's copy is partitioned."""
    if mode == "fsdp2":
        from torch.distributed.tensor import distribute_tensor

        shards = {
            name: distribute_tensor(
                tensors[name].to(device=param.device, dtype=param.dtype),
                param.device_mesh,
                param.placements,
                src_data_rank=None,
            ).to_local()
            for name, param in params.items()
            if name in tensors
        }
        copy_weights(shards, {name: param.to_local() for name, param in params.items()})
        return
    with _gathered(params.values(), mode == "zero3", modifier_rank=0):
        copy_weights(tensors, params)


class _AdapterWeights:
    """Where an adapter's weights live: on every rank whole (``mode`` None), or partitioned with
    the model by DeepSpeed ZeRO-3 (``"zero3"``), or sharded by FSDP2 (``"fsdp2"``)."""

    mode: str | None = None
    engine = None  # the training DeepSpeed engine under ZeRO-3

    @property
    def sharded(self) -> bool:
        """Whether the model's forward is collective (every rank must score at every step)."""
        return self.mode is not None

    def partitioned_by(self, engine) -> None:
        """DeepSpeed ZeRO-3 (the training ``engine``) partitioned the model, adapters included:
        the parameter objects stay the same."""
        self.mode, self.engine = "zero3", engine

    def sharded_by_fsdp2(self) -> None:
        """FSDP2 sharded the model, adapters included, and replaced its parameters: read them again."""
        self.mode = "fsdp2"
        self._rebind()

    def _rebind(self) -> None:
        self._adapter = adapter_parameters(self.model, self.adapter_name)


class AdapterEMA(_AdapterWeights):
    """Moving average of the policy adapter, used for generation through the ``sapo_ema`` adapter.

    Same interface as :class:`sapo.ema.EMAModel`; the float32 average lives in ``shadow`` and is
    written into the adapter after each update (adapters may be stored in a lower precision).

    Under ZeRO-3 or FSDP2 the adapters are partitioned or sharded with the rest of the model.
    Adapters are small, so the average stays whole on every rank: an update gathers the policy
    adapter only. Under ZeRO-3 generation gathers the model once per call (TRL's
    ``ds3_gather_for_generation``) with ZeRO-3's hooks off; under FSDP2 it is an ordinary FSDP2
    forward per token, every rank decoding until the longest row ends (as TRL generates there).
    """

    adapter_name = EMA_ADAPTER

    def __init__(self, model, policy_adapter: str, decay: float):
        check_decay(decay)
        self.model = model
        self.decay = decay
        self.num_updates = 0
        self.policy_adapter = policy_adapter
        self._policy = adapter_parameters(model, policy_adapter)
        self._adapter = add_frozen_copy(model, policy_adapter, EMA_ADAPTER)
        self.shadow = {name: param.detach().float().clone() for name, param in self._policy.items()}

    def _rebind(self) -> None:
        super()._rebind()
        self._policy = adapter_parameters(self.model, self.policy_adapter)

    @torch.no_grad()
    def update(self, policy: torch.nn.Module | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * policy`` over the policy adapter's weights."""
        current = _whole(self._policy, self.mode) if self.sharded else self._policy
        for name, average in self.shadow.items():
            move_average(average, current[name], self.decay)
        _write(self.shadow, self._adapter, self.mode)
        self.num_updates += 1

    def sampling_model(self, whole: bool = True):
        """The model with the EMA adapter active (gathered whole under ZeRO-3 unless ``whole`` is
        false)."""
        if self.mode == "zero3" and whole:
            return _gathered_for_generation(self.engine, self.model)
        return _activated(self.model, EMA_ADAPTER)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(tensors, self.shadow)
        _write(self.shadow, self._adapter, self.mode)

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The float32 average, whole on every rank (no collective)."""
        return {name: tensor.cpu() for name, tensor in self.shadow.items()} if keep else {}

    load_full_tensors = load_tensors


class AdapterReference(_AdapterWeights):
    """The DPO reference as the ``sapo_reference`` adapter; starts as a copy of the policy adapter.

    Under ZeRO-3 or FSDP2 its forward is collective: every rank scores at every step (see
    :func:`sapo.scoring.reference_logps`)."""

    adapter_name = REFERENCE_ADAPTER

    def __init__(self, model, policy_adapter: str):
        self.model = model
        self._adapter = add_frozen_copy(model, policy_adapter, REFERENCE_ADAPTER)

    def scoring_model(self):
        """The model with the reference adapter active."""
        return _activated(self.model, REFERENCE_ADAPTER)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._adapter)

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole weights on the CPU (gathered when distributed; every rank calls this)."""
        gathered = {name: tensor.cpu() for name, tensor in _whole(self._adapter, self.mode).items()}
        return gathered if keep else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _write(tensors, self._adapter, self.mode)

    load_full_tensors = load_tensors


@contextlib.contextmanager
def _gathered_for_generation(engine, model):
    """The whole model gathered once (ZeRO-3), with the EMA adapter active; every rank enters."""

    with use_adapter(model, EMA_ADAPTER), whole_for_generation(engine, model) as whole:
        yield whole


@contextlib.contextmanager
def _activated(model, adapter_name: str):
    with use_adapter(model, adapter_name):
        yield model
