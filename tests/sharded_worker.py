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
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from sapo import checkpoint
from sapo.ema import EMAModel
from sapo.reference import CopiedReference, build_ema_and_reference, reference_logps
from sapo.sharding import ShardedEMA, ShardedReference, fsdp_units, is_sharded, shard_like_policy
from sapo.tiny import char_tokenizer, tiny_llama

transformers.logging.set_verbosity_error()
DECAY = 0.75


class CollectiveCounter(TorchDispatchMode):
    """Counts the c10d operators dispatched inside the block (all-gathers, reductions, ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def collectives(action) -> int:
    with CollectiveCounter() as counter:
        action()
    return counter.count


def shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def whole(model) -> dict[str, torch.Tensor]:
    """Whole weights of a sharded model (collective), float32."""
    return {name: param.detach().full_tensor().float() for name, param in model.named_parameters()}


def max_difference(left: dict, right: dict) -> float:
    return max((left[name].float() - right[name].float()).abs().max().item() for name in left)


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


def generate(model, prompt, new_tokens: int) -> list[int]:
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    return output[0].tolist()


def check_generation(ema, tokenizer, rank: int) -> dict:
    """Greedy tokens from the sharded EMA and from an unsharded copy; each rank its own prompt and
    length, so a collective per token would hang. Counts the collectives of a 2- and an 8-token call."""
    unsharded = tiny_llama(tokenizer, seed=5)
    unsharded.load_state_dict(ema.full_tensors(), strict=False)
    unsharded.eval()
    prompt = torch.tensor([tokenizer.encode(["12+34=", "7*8="][rank])])
    new_tokens = 6 + 4 * rank
    with ema.sampling_model() as model:
        whole_inside = not is_sharded(model)
        sharded_tokens = generate(model, prompt, new_tokens)
    counts = {}
    for length in (2, 8):

        def call(length=length):
            with ema.sampling_model() as model:
                generate(model, prompt, length)

        counts[str(length)] = collectives(call)
    return {
        "generation_equal": sharded_tokens == generate(unsharded, prompt, new_tokens),
        "generated": len(sharded_tokens) - prompt.shape[1],
        "generation_collectives": counts,
        "whole_inside": whole_inside,
        "resharded_after": is_sharded(ema.model),
        "fsdp_units": len(fsdp_units(ema.model)),
    }


def check_reference(policy, ema, tokenizer) -> dict:
    """A sync copies the EMA shard to shard; the sharded forward equals an unsharded one."""
    reference = ShardedReference(policy)
    sync_collectives = collectives(lambda: reference.load_tensors(ema.tensors()))
    unsharded = tiny_llama(tokenizer, seed=5)
    unsharded.load_state_dict(ema.full_tensors(), strict=False)
    batch = torch.tensor([tokenizer.encode("12+34=46")])
    with torch.no_grad(), reference.scoring_model() as model:
        logits = model(batch).logits
    return {
        "sync_error": max_difference(whole(reference.model), whole(ema.model)),
        "sync_collectives": sync_collectives,
        "scoring_error": (logits - unsharded(batch).logits).abs().max().item(),
        "reference": reference,
    }


def check_checkpoint(policy, ema, reference, directory: Path, rank: int) -> dict:
    """Save (gathered, written by rank 0), load into fresh sharded copies: the same shards."""
    for state, name in ((ema, checkpoint.EMA_FILE), (reference, checkpoint.REFERENCE_FILE)):
        checkpoint.save_weights(state, directory / name, is_main_process=rank == 0)
    dist.barrier()
    fresh_ema, fresh_reference = ShardedEMA(policy, DECAY), ShardedReference(policy)
    checkpoint.load_weights(fresh_ema, directory / checkpoint.EMA_FILE)
    checkpoint.load_weights(fresh_reference, directory / checkpoint.REFERENCE_FILE)
    # the file is the unsharded format: a whole-model EMA loads it too
    plain = EMAModel(tiny_llama(char_tokenizer(), seed=5), DECAY)
    checkpoint.load_weights(plain, directory / checkpoint.EMA_FILE)
    return {
        "ema_reload_error": max_difference(fresh_ema.tensors(), ema.tensors()),
        "reference_reload_error": max_difference(fresh_reference.tensors(), reference.tensors()),
        "plain_reload_error": max_difference(plain.tensors(), whole(ema.model)),
        "files": sorted(path.name for path in directory.iterdir()),
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


def check_reference_cache(reference) -> dict:
    """A sharded reference scores every pair every time: ranks must run its forward together."""
    calls = []

    def score(model, batch):
        calls.append(len(batch["rows"]))
        return torch.zeros(len(batch["rows"]) * 2), None

    pairs = [{"ref_logps": (0.0, 0.0), "ref_version": 3}, {"ref_logps": (0.0, 0.0), "ref_version": 3}]
    reference_logps(reference, pairs, 3, lambda rows: {"rows": torch.zeros(len(rows))}, score, "cpu")
    return {"cached_pairs_scored": calls}


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
    report.update(check_generation(ema, tokenizer, rank))
    reference_report = check_reference(policy, ema, tokenizer)
    reference = reference_report.pop("reference")
    report.update(reference_report)
    report.update(check_checkpoint(policy, ema, reference, directory, rank))
    report.update(check_dispatch_and_handover(policy, tokenizer))
    report.update(check_reference_cache(reference))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        (directory / "report.json").write_text(json.dumps({"ranks": gathered}, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
    # gloo may abort at interpreter exit while a process group is alive: end the groups, then
    # free the FSDP states that still hold them (in reference cycles) before the exit
    dist.destroy_process_group()
    gc.collect()
