"""Checks shared by the sharded (FSDP2) and partitioned (ZeRO-3) workers, run on each rank.

Each takes the distribution-specific parts as functions: ``whole(model)`` gathers whole float32
weights (a collective), ``is_whole(model)`` tells whether the weights are gathered right now.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from sapo.builtin.tiny import tiny_llama
from sapo.checkpoints import files as checkpoint
from sapo.copies.whole import EMAModel
from sapo.pairs import Pair
from sapo.scoring import PairScorer, pairs_to_score, reference_logps


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


def max_difference(left: dict, right: dict) -> float:
    return max((left[name].float() - right[name].float()).abs().max().item() for name in left)


def plain_copy(state, tokenizer):
    """A whole, undistributed model holding the weights of an EMA or reference."""
    model = tiny_llama(tokenizer, seed=5)
    model.load_state_dict(state.full_tensors(), strict=False)
    return model.eval()


def generate(model, prompt, new_tokens: int) -> list[int]:
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    return output[0].tolist()


def check_generation(ema, tokenizer, rank: int, is_whole) -> dict:
    """Greedy tokens from the distributed EMA and from a whole copy; each rank its own prompt and
    length, so a collective per token would hang. Counts the collectives of a 2- and an 8-token call."""
    plain = plain_copy(ema, tokenizer)
    prompt = torch.tensor([tokenizer.encode(["12+34=", "7*8="][rank])])
    new_tokens = 6 + 4 * rank
    with ema.sampling_model() as model:
        whole_inside = is_whole(model)
        tokens = generate(model, prompt, new_tokens)
    counts = {}
    for length in (2, 8):

        def call(length=length):
            with ema.sampling_model() as model:
                generate(model, prompt, length)

        counts[str(length)] = collectives(call)
    return {
        "generation_equal": tokens == generate(plain, prompt, new_tokens),
        "generated": len(tokens) - prompt.shape[1],
        "generation_collectives": counts,
        "whole_inside": whole_inside,
        "distributed_after": not is_whole(ema.model),
    }


def check_reference(reference, ema, tokenizer, whole) -> dict:
    """A sync copies the EMA piece by piece; the distributed forward equals a whole model's; pairs
    with cached log-probs are scored again (the forward is collective: every rank scores together)."""
    sync_collectives = collectives(lambda: reference.load_tensors(ema.tensors()))
    plain = plain_copy(ema, tokenizer)
    batch = torch.tensor([tokenizer.encode("12+34=46")])
    with torch.no_grad(), reference.scoring_model() as model:
        logits = model(batch).logits
    calls = []

    def score(model, batch):
        calls.append(len(batch["rows"]))
        return torch.zeros(len(batch["rows"]) * 2), None

    pairs = [Pair([1], [2], [3]), Pair([1], [2], [4])]
    for pair in pairs:
        pair.cache_reference((0.0, 0.0), 3)
    scorer = PairScorer(collate=lambda rows: {"rows": torch.zeros(len(rows))}, score=score, packed=False)
    reference_logps(reference, pairs_to_score(reference, pairs, 3), scorer, "cpu")
    return {
        "sync_error": max_difference(whole(reference.model), whole(ema.model)),
        "sync_collectives": sync_collectives,
        "scoring_error": (logits - plain(batch).logits).abs().max().item(),
        "cached_pairs_scored": calls,
    }


def check_checkpoint(ema, reference, fresh, whole, tokenizer, directory: Path, rank: int) -> dict:
    """Save (gathered, written by rank 0), load into ``fresh`` distributed copies (EMA, reference):
    the same pieces. The files are the whole format: a plain EMA loads them too."""
    fresh_ema, fresh_reference = fresh
    for state, name in ((ema, checkpoint.EMA_FILE), (reference, checkpoint.REFERENCE_FILE)):
        checkpoint.save_weights(state, directory / name, is_main_process=rank == 0)
    dist.barrier()
    checkpoint.load_weights(fresh_ema, directory / checkpoint.EMA_FILE)
    checkpoint.load_weights(fresh_reference, directory / checkpoint.REFERENCE_FILE)
    plain = EMAModel(tiny_llama(tokenizer, seed=5), 0.5)
    checkpoint.load_weights(plain, directory / checkpoint.EMA_FILE)
    return {
        "ema_reload_error": max_difference(fresh_ema.tensors(), ema.tensors()),
        "reference_reload_error": max_difference(fresh_reference.tensors(), reference.tensors()),
        "plain_reload_error": max_difference(plain.tensors(), whole(ema.model)),
        "files": sorted(path.name for path in directory.iterdir()),
    }


def write_report(report: dict, directory: Path, rank: int) -> None:
    """Rank 0 writes every rank's ``report`` to ``directory/report.json`` (all ranks call this)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        (directory / "report.json").write_text(json.dumps({"ranks": gathered}, indent=1))
    dist.barrier()
