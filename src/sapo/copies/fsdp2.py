"""The EMA and the DPO reference for a policy sharded with FSDP2 (its parameters are DTensors).

Under FSDP2 no rank holds a whole weight, so full copies (:mod:`sapo.ema`, :mod:`sapo.copies`)
would defeat the sharding and an update on full tensors would gather both models every step.
Here the EMA and the reference are sharded exactly like the policy (same FSDP units, same mesh,
same placements), which makes every per-step operation local:

- ``ShardedEMA.update`` is a lerp of each rank's float32 shard toward the policy's shard: no
  collective at all;
- a reference sync (``reference.load_tensors(ema.tensors())``) copies local shards;
- ``ShardedEMA.sampling_model()`` all-gathers the EMA once per generation call (one all-gather
  per FSDP unit, as TRL's ``ds3_gather_for_generation`` does for ZeRO-3) and reshards after, so
  the token loop runs on whole weights with no collective per token or per layer;
- ``ShardedReference.scoring_model()`` is an ordinary FSDP2 forward (one unit unsharded at a
  time): every rank must score in the same steps (see :func:`sapo.scoring.reference_logps`).

Checkpoints hold whole tensors (:func:`sapo.checkpoints.files.save_weights`): ``full_tensors`` gathers
them on every rank, one at a time, and ``load_full_tensors`` keeps this rank's shard, so the files
are the same as an unsharded run's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.utils import logging
from trl.trainer.utils import disable_dropout_in_model

from sapo.copies.contract import PolicyAdapters
from sapo.copies.weights import check_same_names, copy_weights, unsynced_generate, zip_named
from sapo.ema import check_decay, move_average
from sapo.policy import is_peft_model

logger = logging.get_logger(__name__)
PEFT_UNSUPPORTED = (
    "a PEFT policy sharded before SAPOTrainer is not supported: let accelerate shard it (FSDP2), "
    "so that SAPO's EMA and reference adapters are sharded with it"
)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2, or transformers' distributed loading)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def fsdp_units(model: nn.Module) -> list[list[str]]:
    """The modules ``fully_shard`` was applied to, by name, grouped as they were sharded together
    (``fully_shard([norm, embed, lm_head])`` makes one unit of three modules, as accelerate does
    for tied embeddings); units ordered children before parents (the order to shard in)."""
    units: dict[int, list[str]] = {}
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, FSDPModule):
            units.setdefault(id(fully_shard.state(module)), []).append(name)
    return list(units.values())


def _unit_policies(unit: FSDPModule) -> dict:
    """The mixed-precision and offload policies ``fully_shard`` gave the policy's ``unit``.

    The copies compute as the policy does: a bfloat16 ``param_dtype`` gathers the float32 EMA in
    bfloat16 for generation and runs the reference's forward in bfloat16, as the policy's.
    """
    state = fully_shard.state(unit)
    policies = {}
    if getattr(state, "_mp_policy", None) is not None:
        policies["mp_policy"] = state._mp_policy
    group = getattr(state, "_fsdp_param_group", None)
    if group is not None:
        policies["offload_policy"] = group.offload_policy
    return policies


def _unsharded_class(model: nn.Module) -> type:
    """FSDP2 gives a sharded module the class ``FSDP<Name>(FSDPModule, Name)``; this is ``Name``."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _sharded_params(model: nn.Module) -> dict[str, DTensor]:
    params = dict(model.named_parameters())
    plain = [name for name, param in params.items() if not isinstance(param, DTensor)]
    if plain:
        raise ValueError(
            f"{plain[0]} is not sharded: the model is unsharded (reshard it first) or only partly "
            "sharded (apply fully_shard at the root too)"
        )
    return params


def sharded_copy(policy: nn.Module, dtype: torch.dtype, reshard_after_forward: bool) -> nn.Module:
    """A new model sharded like ``policy`` in ``dtype``, holding ``policy``'s weights.

    FSDP2 modules cannot be deep-copied, so the copy is built from the config on the meta device,
    sharded unit by unit like the policy, materialised shard-only on the policy's device, and
    filled from the policy's local shards and buffers: no rank ever holds a whole model.
    """
    if not hasattr(policy, "config"):
        raise TypeError("a sharded policy must be a transformers model (its config rebuilds the copy)")
    params = _sharded_params(policy)
    any_param = next(iter(params.values()))
    if not fsdp_units(policy):
        raise ValueError(
            "the policy's weights are DTensors but not in FSDP2 units (tensor parallel?): "
            "only FSDP2 is supported"
        )
    with torch.device("meta"):
        model = _unsharded_class(policy)._from_config(copy.deepcopy(policy.config), dtype=dtype)
    for names in fsdp_units(policy):
        modules = [model.get_submodule(name) for name in names]
        fully_shard(
            modules if len(modules) > 1 else modules[0],
            mesh=any_param.device_mesh,
            reshard_after_forward=reshard_after_forward,
            **_unit_policies(policy.get_submodule(names[0])),
        )
    model.to_empty(device=any_param.device)
    if hasattr(policy, "generation_config"):
        model.generation_config = copy.deepcopy(policy.generation_config)
    with torch.no_grad():
        for name, buffer in policy.named_buffers():
            model.get_buffer(name).copy_(buffer)
        copy_local_shards({name: param.to_local() for name, param in params.items()}, model)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def copy_local_shards(source: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Copy this rank's shards into ``model``'s same-named DTensor parameters (cast to their dtype)."""
    copy_weights(source, {name: param.to_local() for name, param in _sharded_params(model).items()})


@torch.no_grad()
def load_full(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Keep this rank's shard of each whole tensor (a checkpoint, a full copy); no communication."""
    params = _sharded_params(model)
    check_same_names(tensors, params)
    if any(tensor.is_meta for tensor in tensors.values()):
        raise ValueError(
            "the full weights are on the meta device (FSDP's cpu_ram_efficient_loading): SAPO needs "
            "the weights on every rank to build its EMA and reference; turn that option off"
        )
    shards = {}
    for name, param in params.items():
        whole = tensors[name].detach().to(device=param.device, dtype=param.dtype)
        shards[name] = distribute_tensor(
            whole, param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
    copy_local_shards(shards, model)


def full_tensors(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Whole weights on the CPU, gathered one tensor at a time; every rank must call this.

    ``keep=False`` (ranks that do not write) drops each tensor once gathered.
    """
    gathered = {}
    for name, param in _sharded_params(model).items():
        whole = param.detach().full_tensor().cpu()
        if keep:
            gathered[name] = whole
    return gathered


class _ShardedWeights:
    """Weights access shared by the sharded EMA and reference: ``self.model`` is an FSDP2 copy."""

    sharded = True
    model: nn.Module

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shards (a reference sync copies them shard to shard)."""
        return {name: param.to_local() for name, param in _sharded_params(self.model).items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_local_shards(tensors, self.model)

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole tensors, gathered on every rank (a collective); ``keep`` them on this rank or not."""
        return full_tensors(self.model, keep)

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_full(self.model, tensors)


class ShardedEMA(_ShardedWeights):
    """Float32 moving average of an FSDP2 policy, sharded like it; interface of :class:`EMAModel`."""

    def __init__(self, policy: nn.Module, decay: float):
        check_decay(decay)
        self.decay = decay
        # never trained: once gathered for generation, the weights stay whole until the call ends
        self.model = sharded_copy(policy, torch.float32, reshard_after_forward=False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * policy`` on this rank's shards only: no collective."""
        _sharded_params(policy)
        for average, current in zip_named(self.model, policy):
            if average.placements != current.placements or average.device_mesh != current.device_mesh:
                raise ValueError("the EMA and the policy are sharded differently")
            move_average(average.to_local(), current.to_local(), self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def sampling_model(self, whole: bool = True):
        """The EMA with whole weights: gathered once on entry, resharded on exit (all ranks enter).

        ``generate`` runs with ``synced_gpus=False``: transformers turns it on for FSDP modules,
        which keeps every rank decoding until the longest finishes, one all-reduce per token.
        With the weights whole no rank needs the others, and each stops at its own length.
        ``whole=False``: sharded as it is stored (a forward gathers unit by unit), resharded on exit
        where a forward ran (before any, FSDP2 has nothing to reset).
        """
        if not whole:
            forwards = []
            hook = self.model.register_forward_pre_hook(lambda *_: forwards.append(1))
            try:
                yield self.model
            finally:
                hook.remove()
                if forwards:
                    _reshard(self.model)
            return
        units = [self.model.get_submodule(names[0]) for names in fsdp_units(self.model)]
        handles = [unit.unshard(async_op=True) for unit in units]
        for handle in handles:
            handle.wait()
        try:
            with unsynced_generate(self.model):
                yield self.model
        finally:
            _reshard(self.model)


class ShardedReference(_ShardedWeights):
    """The frozen DPO reference, sharded like the FSDP2 policy; interface of :class:`CopiedReference`."""

    def __init__(self, policy: nn.Module, disable_dropout: bool = True):
        dtype = next(iter(_sharded_params(policy).values())).dtype
        self.model = sharded_copy(policy, dtype, reshard_after_forward=True)
        if disable_dropout:
            disable_dropout_in_model(self.model)

    @contextlib.contextmanager
    def scoring_model(self):
        """An FSDP2 forward, one unit whole at a time; every rank must score together."""
        try:
            yield self.model
        finally:
            _reshard(self.model)


def _reshard(model: nn.Module) -> None:
    """Reshard every unit and clear FSDP2's per-forward bookkeeping.

    FSDP2 clears its record of forwards only after a backward; a model that never trains would
    grow it by one entry per unit and forward, for the whole run.
    """
    model.reset_iter_state()


def build_sharded(policy: nn.Module, args, ref_model: nn.Module | None = None):
    """The sharded EMA and (DPO only) reference for a sharded ``policy``; a ``ref_model`` given
    whole is sharded like the policy."""
    if is_peft_model(policy):
        raise ValueError(PEFT_UNSUPPORTED)
    ema = ShardedEMA(policy, args.ema_decay)
    if args.loss_type != "dpo":
        return ema, None
    reference = ShardedReference(policy, args.disable_dropout)
    if ref_model is not None:
        if is_sharded(ref_model):
            reference.load_tensors({name: p.to_local() for name, p in _sharded_params(ref_model).items()})
        else:
            reference.load_full_tensors(dict(ref_model.named_parameters()))
    return ema, reference


def shard_like_policy(policy: nn.Module, ema, reference):
    """Replace whole-model EMA and reference with sharded ones holding the same weights.

    accelerate shards the policy only when training starts, after SAPO built its copies (and
    maybe loaded a checkpoint into them); called then, this hands over the weights and the
    update count. A PEFT policy's EMA and reference adapters were sharded with it: they are told
    so. Anything else (not sharded, already sharded) is returned unchanged.
    """
    if not is_sharded(policy) or ema.sharded:
        return ema, reference
    if is_peft_model(policy):  # the adapters were sharded with the model
        for copied in (ema, reference):
            if isinstance(copied, PolicyAdapters):
                copied.sharded_by_fsdp2()
        return ema, reference
    sharded_ema = ShardedEMA(policy, ema.decay)
    sharded_ema.load_full_tensors(ema.tensors())
    sharded_ema.num_updates = ema.num_updates
    if reference is None:
        return sharded_ema, None
    sharded_reference = ShardedReference(policy)  # in eval mode, as the whole copy was: no dropout
    sharded_reference.load_full_tensors(reference.tensors())
    return sharded_ema, sharded_reference
