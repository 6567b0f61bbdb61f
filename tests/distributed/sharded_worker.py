"""Run by tests/test_sharding.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    torchrun --nproc_per_node 2 tests/sharded_worker.py OUTPUT_DIR

Shards a tiny Llama with FSDP2 (`fully_shard` per decoder layer and at the root), builds SAPO's
sharded EMA and reference for it and measures, on each rank: the EMA update against the formula
on whole tensors, the collectives each operation issues, greedy generation from the sharded EMA
against an unsharded copy of the same weights, the reference sync, the checkpoint round trip
and the hand-over from whole copies. Rank 0 writes `report.json` with every rank's numbers.
"""

import copy
import gc
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from worker_checks import (
    check_checkpoint,
    check_generation,
    check_reference,
    collectives,
    max_difference,
    write_report,
)

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.copies import build_ema_and_reference
from sapo.copies.fsdp2 import ShardedEMA, ShardedReference, fsdp_units, is_sharded, shard_like_policy
from sapo.copies.whole import CopiedReference, EMAModel

transformers.logging.set_verbosity_error()
DECAY = 0.75


def shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def whole(model) -> dict[str, torch.Tensor]:
    """Whole weights of a sharded model (collective), float32."""
    return {name: param.detach().full_tensor().float() for name, param in model.named_parameters()}


@torch.no_grad()
def set_policy(policy, tensors: dict[str, torch.Tensor]) -> None:
    """Give the sharded policy these whole weights (every rank holds the same ones)."""
    for name, param in policy.named_parameters():
        local = distribute_tensor(tensors[name], param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())


def check_update(policy, ema) -> dict:
    """Two updates toward new policies, against ``d * ema + (1 - d) * policy`` on whole tensors."""
    expected = whole(ema.model)
    pointers = [param.to_local().data_ptr() for param in ema.model.parameters()]
    counts = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        target = {
            name: value + 0.1 * torch.randn(value.shape, generator=generator)
            for name, value in whole(policy).items()
        }
        set_policy(policy, target)
        counts.append(collectives(lambda: ema.update(policy)))
        expected = {name: DECAY * expected[name] + (1 - DECAY) * target[name] for name in expected}
    return {
        "update_error": max_difference(whole(ema.model), expected),
        "update_collectives": counts,
        "update_in_place": pointers == [param.to_local().data_ptr() for param in ema.model.parameters()],
        "num_updates": ema.num_updates,
    }


def check_dispatch_and_handover(policy, tokenizer) -> dict:
    """build_ema_and_reference on a sharded policy; whole copies handed over to sharded ones."""
    args = SimpleNamespace(
        ema_decay=DECAY, loss_type="dpo", disable_dropout=True, ema_device=None, device=torch.device("cpu")
    )
    ema, reference = build_ema_and_reference(policy, args)
    source = tiny_llama(tokenizer, seed=3)
    whole_ema, whole_reference = EMAModel(source, DECAY), CopiedReference(copy.deepcopy(source), "cpu")
    whole_ema.num_updates = 7
    handed_ema, handed_reference = shard_like_policy(policy, whole_ema, whole_reference)
    expected = {name: param.detach() for name, param in source.named_parameters()}
    return {
        "dispatch": [type(ema).__name__, type(reference).__name__],
        "dispatch_error": max_difference(whole(ema.model), whole(policy)),
        "handover": [type(handed_ema).__name__, type(handed_reference).__name__],
        "handover_error": max(
            max_difference(whole(handed_ema.model), expected),
            max_difference(whole(handed_reference.model), expected),
        ),
        "handover_updates": handed_ema.num_updates,
    }


def main():
    directory = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    policy = shard(tiny_llama(tokenizer, seed=0))
    ema = ShardedEMA(policy, DECAY)
    report = {"initial_error": max_difference(whole(ema.model), whole(policy))}
    report["sharded_placements"] = sorted({str(p.placements) for p in ema.model.parameters()})
    report["gather_collectives"] = collectives(lambda: ema.full_tensors(keep=False))
    report.update(check_update(policy, ema))
    report.update(check_generation(ema, tokenizer, rank, is_whole=lambda model: not is_sharded(model)))
    report["fsdp_units"] = len(fsdp_units(ema.model))
    reference = ShardedReference(policy)
    report.update(check_reference(reference, ema, tokenizer, whole))
    fresh = ShardedEMA(policy, DECAY), ShardedReference(policy)
    report.update(check_checkpoint(ema, reference, fresh, whole, tokenizer, directory, rank))
    report.update(check_dispatch_and_handover(policy, tokenizer))
    write_report(report, directory, rank)


if __name__ == "__main__":
    main()
    # gloo may abort at interpreter exit while a process group is alive: end the groups, then
    # free the FSDP states that still hold them (in reference cycles) before the exit
    dist.destroy_process_group()
    gc.collect()
