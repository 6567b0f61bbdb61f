"""The EMA and the DPO reference for a policy partitioned by DeepSpeed ZeRO-3.

ZeRO-3 keeps, on each rank, one flat slice of every parameter (``param.ds_tensor``); a
parameter is whole only inside a forward or a ``GatheredParameters`` block. Its slices are cut
the same way for any model with the same parameter shapes and the same data-parallel group, so
SAPO partitions its EMA and its reference exactly like the policy (each is a DeepSpeed engine
of its own, without optimizer, as TRL's ``prepare_deepspeed`` does for DPO's reference) and
every per-step operation stays local:

- ``ZeroEMA.update`` is a float32 lerp of each rank's slice toward the policy's slice: no
  collective at all;
- a reference sync (``reference.load_tensors(ema.tensors())``) copies slices;
- ``ZeroEMA.sampling_model()`` gathers the EMA once per generation call and takes ZeRO-3's
  forward hooks off for the call (TRL's ``ds3_gather_for_generation``), so the token loop runs
  on whole weights with no collective per token or per layer;
- ``ZeroReference.scoring_model()`` is an ordinary ZeRO-3 forward (each layer gathered in
  turn): every rank must score in the same steps (see :func:`sapo.scoring.reference_logps`).

Neither copy keeps "persistent" (never released) weights: a local update writes the slices, and
a persistent whole copy would go stale.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers.utils import logging
from trl.trainer.utils import disable_dropout_in_model

from sapo.copies.contract import PolicyAdapters
from sapo.copies.weights import check_same_names, copy_weights, whole_for_generation
from sapo.ema import check_decay, move_average
from sapo.policy import is_peft_model

logger = logging.get_logger(__name__)


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (they carry a ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def check_supported(zero_config: dict) -> None:
    """Refuse the ZeRO-3 options under which SAPO's slices would not line up with the policy's."""
    if (zero_config.get("zero_hpz_partition_size") or 1) > 1:
        raise ValueError(
            "zero_optimization.zero_hpz_partition_size > 1 (ZeRO++) is not supported: SAPO's EMA "
            "and reference are partitioned over the whole data-parallel group"
        )
    if (zero_config.get("offload_param") or {}).get("device") == "nvme":
        raise ValueError("zero_optimization.offload_param.device 'nvme' is not supported; use 'cpu' or none")
    logger.warning_once(
        "DeepSpeed ZeRO-3: SAPO's partitioned EMA and reference are tested on CPU processes "
        "(torchrun, gloo) only; they have not been run on GPUs"
    )


def _slices(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slice of each parameter, by name."""
    slices = {}
    for name, param in model.named_parameters():
        if not hasattr(param, "ds_tensor"):
            raise ValueError(f"{name} is not partitioned by ZeRO-3")
        slices[name] = param.ds_tensor
    return slices


@torch.no_grad()
def copy_slices(source: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Copy this rank's slices into ``model``'s same-named partitions (cast to their dtype)."""
    copy_weights(source, _slices(model))


def empty_partitioned_like(policy: nn.Module, dtype: torch.dtype, zero_config: dict) -> nn.Module:
    """A new model of ``policy``'s class, partitioned at construction (zero.Init) in ``dtype``,
    holding ``policy``'s weights: no rank ever holds a whole copy, each copies its own slices.

    Built as transformers builds a model under ZeRO-3 (no random init, RoPE tables left in
    float32), but with SAPO's own zero.Init settings: the run's config would cast a float32 EMA
    to the run's bfloat16.
    """
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    model_config = copy.deepcopy(policy.config)
    model_config.dtype = dtype  # the class builds its weights in the config's dtype
    # the dtype comes from the config: zero.Init's own ``dtype`` argument is not honoured on every
    # accelerator (DeepSpeed's CPU accelerator turns float32 into bfloat16)
    init = deepspeed.zero.Init(config_dict_or_path=_engine_config(zero_config, dtype))
    with no_init_weights(), prevent_arange_dtype_change(), init:
        model = type(policy)(model_config)
    model.tie_weights()  # as transformers does after a ZeRO-3 construction
    if hasattr(policy, "generation_config"):
        model.generation_config = policy.generation_config
    with torch.no_grad():
        for name, buffer in policy.named_buffers():
            model.get_buffer(name).copy_(buffer)
    copy_slices(_slices(policy), model)
    return model.eval()


def _engine_config(zero_config: dict, dtype: torch.dtype) -> dict:
    """A DeepSpeed config for a partitioned copy that never trains, in ``dtype``."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}
    if zero_config.get("offload_param"):
        zero["offload_param"] = dict(zero_config["offload_param"])
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def partitioned(model: nn.Module, zero_config: dict, dtype: torch.dtype):
    """A DeepSpeed engine with no optimizer around ``model`` (used, not copied): a whole model is
    partitioned like the policy, an already partitioned one (built in ``dtype``) is kept as is."""
    import deepspeed

    if not is_partitioned(model):
        model = model.to(dtype=dtype)
    model = model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=_engine_config(zero_config, dtype))
    return engine


def _check_aligned(model: nn.Module, policy: nn.Module) -> None:
    mine, theirs = _slices(model), _slices(policy)
    check_same_names(mine, theirs)
    for name, part in mine.items():
        if part.numel() != theirs[name].numel():
            raise ValueError(f"{name}: the copy is partitioned differently from the policy")


class _PartitionedWeights:
    """Weights access shared by the ZeRO-3 EMA and reference: ``self.engine`` is a DeepSpeed engine."""

    sharded = True
    engine = None

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's slices (a reference sync copies them slice to slice)."""
        return _slices(self.model)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_slices(tensors, self.model)

    def full_tensors(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU, gathered one at a time on every rank (a collective)."""
        import deepspeed

        gathered = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if keep:
                    gathered[name] = param.detach().cpu().clone()
        return gathered

    @torch.no_grad()
    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep this rank's slice of each whole tensor: each rank writes the whole tensor into the
        gathered parameter and DeepSpeed re-partitions it from rank 0's copy (all hold the same)."""
        import deepspeed

        params = dict(self.model.named_parameters())
        check_same_names(tensors, params)
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))


class ZeroEMA(_PartitionedWeights):
    """Float32 moving average of a ZeRO-3 policy, partitioned like it; interface of :class:`EMAModel`.

    For a policy in a lower precision (bfloat16), a second partitioned copy in that precision
    follows the average (a local cast after each update) and is the one gathered for generation:
    the gathered weights take half the memory and the segments are sampled in the policy's
    precision, as its own forward computes.
    """

    def __init__(self, model: nn.Module, policy: nn.Module, decay: float, zero_config: dict):
        check_decay(decay)
        self.decay = decay
        self.engine = partitioned(model, zero_config, torch.float32)
        _check_aligned(self.model, policy)
        self.sampler = None
        policy_dtype = next(iter(_slices(policy).values())).dtype
        if policy_dtype != torch.float32:
            self.sampler = partitioned(
                empty_partitioned_like(policy, policy_dtype, zero_config), zero_config, policy_dtype
            )
            copy_slices(self.tensors(), self.sampler.module)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * policy`` on this rank's slices only: no collective."""
        current = _slices(policy)
        for name, average in _slices(self.model).items():
            move_average(average, current[name], self.decay)
        self._sync_sampler()
        self.num_updates += 1

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self._sync_sampler()

    def load_full_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_full_tensors(tensors)
        self._sync_sampler()

    def _sync_sampler(self) -> None:
        if self.sampler is not None:
            copy_slices(self.tensors(), self.sampler.module)

    def sampling_model(self, whole: bool = True):
        """The EMA with whole weights: gathered once on entry, released on exit (all ranks enter);
        ``whole=False``: partitioned as it is stored (a forward gathers layer by layer)."""
        if not whole:
            return contextlib.nullcontext((self.sampler or self.engine).module)
        return whole_for_generation(self.sampler or self.engine)


class ZeroReference(_PartitionedWeights):
    """The frozen DPO reference, partitioned like the ZeRO-3 policy; interface of :class:`CopiedReference`."""

    def __init__(self, model: nn.Module, policy: nn.Module, zero_config: dict, disable_dropout: bool = True):
        dtype = next(iter(_slices(policy).values())).dtype
        self.engine = partitioned(model, zero_config, dtype)
        _check_aligned(self.model, policy)
        if disable_dropout:
            disable_dropout_in_model(self.model)

    def scoring_model(self):
        """A ZeRO-3 forward, one layer whole at a time; every rank must score together."""
        return contextlib.nullcontext(self.model)


def build_partitioned(policy: nn.Module, args, ref_model: nn.Module | None = None):
    """The partitioned EMA and (DPO only) reference for a policy ZeRO-3 partitioned at loading,
    built slice by slice: no whole copy. A ``ref_model`` given whole is partitioned as it is."""
    from transformers.integrations.deepspeed import deepspeed_config

    zero_config = (deepspeed_config() or {}).get("zero_optimization", {})
    ema = ZeroEMA(
        empty_partitioned_like(policy, torch.float32, zero_config), policy, args.ema_decay, zero_config
    )
    if args.loss_type != "dpo":
        return ema, None
    dtype = next(iter(_slices(policy).values())).dtype
    model = ref_model if ref_model is not None else empty_partitioned_like(policy, dtype, zero_config)
    return ema, ZeroReference(model, policy, zero_config, args.disable_dropout)


def partition_like_policy(policy: nn.Module, ema, reference, zero_config: dict, engine=None):
    """Replace whole-model EMA and reference with ZeRO-3 partitioned ones holding the same weights.

    DeepSpeed partitions the policy when training starts, after SAPO built its whole copies (and
    maybe loaded a checkpoint into them); called then, this partitions those copies in place and
    keeps the update count. A PEFT policy's EMA and reference adapters were partitioned with it by
    ``engine`` (the training one): they are told so. Anything else (not partitioned, already
    partitioned) is returned as is.
    """
    if not is_partitioned(policy) or ema.sharded:
        return ema, reference
    if is_peft_model(policy):  # the adapters were partitioned with the model: same objects
        for copied in (ema, reference):
            if isinstance(copied, PolicyAdapters):
                copied.partitioned_by(engine)
        return ema, reference
    partitioned_ema = ZeroEMA(ema.model, policy, ema.decay, zero_config)
    partitioned_ema.num_updates = ema.num_updates
    if reference is None:
        return partitioned_ema, None
    # the whole copy is already in eval mode without dropout
    return partitioned_ema, ZeroReference(reference.model, policy, zero_config, disable_dropout=False)
