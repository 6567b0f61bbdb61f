"""Where the EMA model and the DPO reference live, for each way the policy can be placed.

Every home implements the two contracts of :mod:`sapo.copies.contract` in full:

=================  =================================  ====================================
policy             EMA                                reference
=================  =================================  ====================================
whole (DDP, one    :class:`~sapo.copies.whole.EMAModel` :class:`~sapo.copies.whole.CopiedReference`
device, ZeRO-2)    (float32 copy)                     (frozen copy)
LoRA               :class:`~sapo.copies.lora.AdapterEMA`  :class:`~sapo.copies.lora.AdapterReference`
                   (adapter on the same base)         (adapter on the same base)
FSDP2              :class:`~sapo.copies.fsdp2.ShardedEMA`  :class:`~sapo.copies.fsdp2.ShardedReference`
ZeRO-3             :class:`~sapo.copies.zero3.ZeroEMA`     :class:`~sapo.copies.zero3.ZeroReference`
=================  =================================  ====================================

:func:`build_ema_and_reference` picks the home when the trainer is built;
:func:`distribute_like_policy` moves whole copies to shards or partitions once accelerate has
distributed the policy (it does so only when training starts). :mod:`sapo.copies.teardown` ends
a multi-process run cleanly.
"""

from __future__ import annotations

import copy

from transformers.utils import logging

from sapo.copies import zero3
from sapo.copies.contract import EMA, Reference
from sapo.copies.fsdp2 import build_sharded, is_sharded, shard_like_policy
from sapo.copies.lora import AdapterEMA, AdapterReference
from sapo.copies.whole import CopiedReference, EMAModel
from sapo.copies.zero3 import build_partitioned, is_partitioned, partition_like_policy
from sapo.policy import is_peft_model, policy_adapter_name

logger = logging.get_logger(__name__)

__all__ = ["EMA", "Reference", "build_ema_and_reference", "check_supported", "distribute_like_policy"]


def check_supported(state) -> None:
    """Refuse the sharding setups (of an accelerate ``state``) whose EMA and reference SAPO cannot
    shard; warn once on the others.

    FSDP1 wraps the model in flat parameters that give no per-parameter shard for a local lerp;
    FSDP2 (DTensor shards, :mod:`sapo.copies.fsdp2`) and ZeRO-3 (per-parameter slices,
    :mod:`sapo.copies.zero3`) do.
    """
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    version = None if fsdp_plugin is None else getattr(fsdp_plugin, "fsdp_version", 1)
    if version == 1:
        raise ValueError(
            "FSDP1 is not supported: SAPO shards its EMA and reference under FSDP2 (fsdp_version: 2) "
            "or DeepSpeed ZeRO-3; otherwise use DeepSpeed ZeRO-2 or DDP, or LoRA"
        )
    zero = {} if deepspeed_plugin is None else deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3:
        zero3.check_supported(zero)
    if version == 2:
        logger.warning_once(
            "FSDP2: SAPO's sharded EMA and reference are tested on CPU processes (torchrun, gloo) "
            "only; the Trainer + accelerate FSDP2 path has not been run on GPUs"
        )


def build_ema_and_reference(policy, args, ref_model=None, device=None) -> tuple[EMA, Reference | None]:
    """The EMA model and (DPO only, else ``None``) the reference for ``policy``.

    Both start as exact copies of the policy at step 0, except a reference the user passed. For a
    policy sharded with FSDP2 both are sharded like it (:mod:`sapo.copies.fsdp2`). ``device``, when
    given, is where whole copies live: the CPU while accelerate has yet to shard the policy.
    For a policy that ZeRO-3 partitioned at loading both are partitioned like it (:mod:`sapo.copies.zero3`).
    """
    if is_sharded(policy):
        return build_sharded(policy, args, ref_model)
    if is_peft_model(policy):
        if ref_model is not None:
            raise ValueError("ref_model: with a PEFT policy the reference is an adapter on the same base")
        adapter = policy_adapter_name(policy)
        ema = AdapterEMA(policy, adapter, args.ema_decay)
        reference = AdapterReference(policy, adapter) if args.loss_type == "dpo" else None
        return ema, reference
    if is_partitioned(policy):
        return build_partitioned(policy, args, ref_model)
    ema = EMAModel(policy, args.ema_decay, device=device or args.ema_device or args.device)
    reference = None
    if args.loss_type == "dpo":
        reference_model = ref_model if ref_model is not None else copy.deepcopy(policy)
        reference = CopiedReference(reference_model, device or args.device, args.disable_dropout)
    return ema, reference


def distribute_like_policy(
    policy, ema: EMA, reference: Reference | None, accelerator, wrapped=None
) -> tuple[EMA, Reference | None]:
    """Shard (FSDP2) or partition (ZeRO-3) whole EMA and reference copies like the policy.

    accelerate distributes the policy only when training starts, after SAPO built its copies
    (and maybe loaded a checkpoint into them). ``wrapped`` is the training model as prepared (the
    DeepSpeed engine under ZeRO-3). Anything not distributed is returned as is.
    """
    ema, reference = shard_like_policy(policy, ema, reference)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        zero_config = plugin.deepspeed_config.get("zero_optimization", {})
        ema, reference = partition_like_policy(policy, ema, reference, zero_config, wrapped)
    return ema, reference
