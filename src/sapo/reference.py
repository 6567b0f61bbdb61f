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
from .ema import EMAModel, copy_weights
from .sharding import build_sharded, is_sharded, shard_like_policy
from .zero3 import build_partitioned, is_partitioned, partition_like_policy


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

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(tensors, dict(self.model.named_parameters()))


def build_ema_and_reference(policy, args, ref_model=None, device=None):
    """The EMA model and (DPO only, else ``None``) the reference for ``policy``.

    Both start as exact copies of the policy at step 0, except a reference the user passed. For a
    policy sharded with FSDP2 both are sharded like it (:mod:`sapo.sharding`). ``device``, when
    given, is where whole copies live: the CPU while accelerate has yet to shard the policy.
    For a policy that ZeRO-3 partitioned at loading both are partitioned like it (:mod:`sapo.zero3`).
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


def distribute_like_policy(policy, ema, reference, accelerator, wrapped=None):
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


def reference_logps(
    reference, pairs, version: int, collate, score, device, collated=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of each pair's chosen and rejected answers, ``(chosen, rejected)``.

    A pair drawn again before the next sync (same ``version``) reuses the values stored on it
    (``ref_logps``, ``ref_version``); only the other pairs go through the reference model, in one
    batch built by ``collate`` and scored by ``score`` (e.g. ``collate_pairs``/``completion_logps``).
    ``collated``, when given, is ``collate(pairs)`` (the policy's batch, which the caller has
    already built): when every pair needs scoring it goes through the reference as it is. A pair
    listed twice is scored twice; the trainer passes each distinct pair once.
    A whole reference scores under ``torch.inference_mode`` (6% faster than ``no_grad`` on the
    benchmark's model); a sharded one under ``no_grad``, as its forward gathers weights in place.
    """
    # a sharded reference's forward gathers weights from all ranks: each rank scores every pair,
    # every time, or a rank with nothing left to score would leave the others waiting
    rescore = getattr(reference, "sharded", False)
    missing = [p for p in pairs if rescore or p.get("ref_version") != version]
    if missing:
        whole = collated is not None and len(missing) == len(pairs)
        batch = collated if whole else collate(missing)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        grad_off = torch.no_grad() if rescore else torch.inference_mode()
        with grad_off, reference.scoring_model() as model:
            logps, _ = score(model, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        for pair, chosen_logp, rejected_logp in zip(missing, chosen.tolist(), rejected.tolist()):
            pair["ref_logps"] = (chosen_logp, rejected_logp)
            pair["ref_version"] = version
    chosen = torch.tensor([p["ref_logps"][0] for p in pairs], dtype=torch.float32)
    rejected = torch.tensor([p["ref_logps"][1] for p in pairs], dtype=torch.float32)
    return chosen, rejected
