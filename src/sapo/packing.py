"""Score a preference pair in one packed row: the shared prefix once, then both continuations.

SAPO's chosen and rejected answers agree on ``prompt + gold[:cut]`` (and on any further tokens
the sampled segment happens to repeat), so scoring them as two padded rows runs the model over
that prefix twice. A packed row holds it once::

    [shared prefix][chosen tail][rejected tail][padding]

Position ids restart at the prefix length for the rejected tail, and a 4D attention mask lets
each tail see the prefix and itself causally but not the other tail, so every token gets exactly
the hidden state it would get in its own unpadded sequence. :func:`pack_pairs` and
:func:`packed_completion_logps` return what ``sapo.scoring.collate_pairs`` and
``sapo.scoring.completion_logps`` return for the same pairs, so either pair of functions can
score a batch. Positions before the first scored token (the prompt) get no logits: the LM head
and log-softmax, large with real vocabularies, run on the scored part only, in chunks where the
model allows it (:mod:`sapo.logprobs`).

For DPO the shared prefix's response tokens need no scoring at all: their log-probs are the same
on both sides (same model, same context) and cancel in the margin. ``score_shared_prefix=False``
leaves them out of both sides' sums, so the head runs only from the last prefix position on.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sapo.logprobs import position_logps, uses_fsdp

if TYPE_CHECKING:
    from sapo.pairs import Pair

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
# attention implementations that accept an arbitrary 4D mask (flash attention and flex do not)
_MASK_FORMATS = {"sdpa": "bool", "eager": "additive"}


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Number of leading tokens ``first`` and ``second`` share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _pack_one(pair: Pair, score_shared_prefix: bool = True) -> dict[str, Any]:
    """One pair's packed row and, per side, the runs of positions whose predictions are scored.

    Position ``i`` of the packed row predicts the next token of the sequence it belongs to; the
    last prefix position predicts the first token of both tails, so targets come per side.
    A token at sequence position ``t`` is scored when it is a response token and ``t >= 1``
    (the first token of a sequence has no prediction), as in ``collate_pairs``, and, without
    ``score_shared_prefix``, when it lies past the shared prefix (``t >= shared``). Sequence
    position ``t - 1`` sits at packed position ``t - 1`` while inside the shared prefix and at
    ``offset + (t - 1 - shared)`` past it, so each side's targets fill at most two contiguous
    runs of the row: ``targets`` lists them as ``(column, start, tokens)``.
    """
    prompt = list(pair.prompt_ids)
    sides = (prompt + list(pair.chosen_ids), prompt + list(pair.rejected_ids))
    shared = common_prefix_length(*sides)
    tails = [sequence[shared:] for sequence in sides]
    first = max(1, len(prompt), 0 if score_shared_prefix else shared)  # the first scored sequence position
    runs = []
    offset = shared  # where the tail of this side starts in the packed row
    for column, (sequence, tail) in enumerate(zip(sides, tails)):
        inside = sequence[first : shared + 1]  # predicted from positions inside the shared prefix
        if inside:
            runs.append((column, first - 1, inside))
        after = max(first, shared + 1)  # the first token predicted from a position in this side's tail
        if sequence[after:]:
            runs.append((column, offset + (after - 1 - shared), sequence[after:]))
        offset += len(tail)
    return {
        "input_ids": sides[0][:shared] + tails[0] + tails[1],
        "position_ids": list(range(shared)) + [shared + i for tail in tails for i in range(len(tail))],
        "segment_ids": [PREFIX] * shared + [CHOSEN] * len(tails[0]) + [REJECTED] * len(tails[1]),
        "targets": runs,
    }


def _long_tensor(values: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """A long tensor of ``shape`` from a flat list: through an ``array`` buffer, a third of
    ``torch.tensor``'s time on a list of Python ints."""
    if not values:  # frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long).view(shape)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N, 1, W, W)`` mask, True where query ``q`` may attend to key ``k``.

    Causal within the packed row; a tail sees the prefix and itself, never the other tail;
    nobody sees padding. Every query also sees itself: a padding query in a row without a shared
    prefix would otherwise see nothing, and older torch versions and some GPU kernels turn a
    fully masked row into NaN, which reaches the gradients through ``0 * NaN``.
    """
    width = segment_ids.shape[1]
    positions = torch.arange(width, device=segment_ids.device)
    causal = positions[None, :] <= positions[:, None]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = (key == PREFIX) | (key == query)
    mask = causal & visible & (key != PADDING)
    mask |= torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    return mask[:, None]


def first_scored_position(target_mask: torch.Tensor) -> int:
    """The first packed position whose prediction any row scores (``target_mask`` ``(B, W, 2)``).

    Positions before it only feed attention (prompt tokens), so the model need not turn their
    hidden states into logits; at least the last position is kept.
    """
    scored = target_mask.any(dim=-1).any(dim=0)
    return int(scored.to(torch.uint8).argmax()) if scored.any() else scored.shape[0] - 1


def pack_pairs(
    pairs: Sequence[Pair],
    pad_token_id: int,
    skip_prompt_logits: bool = True,
    score_shared_prefix: bool = True,
) -> dict[str, torch.Tensor]:
    """Pack each pair into one right-padded row (drop-in for ``collate_pairs``).

    Each pair holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``. Returns, for ``B`` pairs
    and packed width ``W``: ``input_ids``, ``position_ids`` ``(B, W)``; ``attention_mask``
    ``(B, 1, W, W)`` boolean (see :func:`packed_attention_mask`); ``targets`` and
    ``target_mask`` ``(B, K, 2)`` for the last ``K`` positions: the token each position predicts
    for the chosen (column 0) and rejected (column 1) sequence, and whether it counts; and
    ``scored_positions``, the positions with a counted target, as indices ``i * K + k`` of that
    ``(B, K)`` grid (built here, on the host, so the forward needs no device sync to select them).

    With ``skip_prompt_logits``, ``K`` starts at :func:`first_scored_position`, so
    :func:`packed_completion_logps` asks the model for logits of those positions only: the LM head
    and log-softmax skip the prompt, which matters with large vocabularies. ``K`` is a shape, known
    on the host, so the forward needs no device sync to learn it. Otherwise ``K = W``.
    Without ``score_shared_prefix`` the response tokens inside each pair's shared prefix count
    for neither side (for DPO, whose margin they cancel out of).
    """
    rows = [_pack_one(pair, score_shared_prefix) for pair in pairs]
    width = max(len(row["input_ids"]) for row in rows)

    def stacked(key: str, fill: int) -> torch.Tensor:
        flat = [token for row in rows for token in row[key] + [fill] * (width - len(row[key]))]
        return _long_tensor(flat, (len(rows), width))

    segment_ids = stacked("segment_ids", PADDING)
    # (B, W, 2) flattened: entry (i, w, c) at 2 * (i * W + w) + c
    targets, target_mask = [0] * (2 * len(rows) * width), [0] * (2 * len(rows) * width)
    for index, row in enumerate(rows):
        for column, start, tokens in row["targets"]:
            first_entry = 2 * (index * width + start) + column
            entries = slice(first_entry, first_entry + 2 * len(tokens), 2)
            targets[entries], target_mask[entries] = tokens, [1] * len(tokens)
    targets = _long_tensor(targets, (len(rows), width, 2))
    target_mask = _long_tensor(target_mask, (len(rows), width, 2))
    first = first_scored_position(target_mask) if skip_prompt_logits else 0
    target_mask = target_mask[:, first:]
    return {
        "input_ids": stacked("input_ids", pad_token_id),
        "position_ids": stacked("position_ids", 0),
        "attention_mask": packed_attention_mask(segment_ids),
        "targets": targets[:, first:],
        "target_mask": target_mask,
        "scored_positions": target_mask.any(dim=-1).flatten().nonzero().flatten(),
    }


def _attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(getattr(model, "module", model), "config", None)  # DDP/FSDP wrap the model in .module
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _shortest_window(config) -> int | None:
    """The shortest sliding or chunked attention window of ``config``, ``None`` when it has none.

    A custom 4D mask replaces the model's own masks, windows included: it is exact only for
    sequences no longer than the window allows.
    """
    windows = [getattr(config, "attention_chunk_size", None)]
    if getattr(config, "use_sliding_window", True) is not False:
        windows.append(getattr(config, "sliding_window", None))
    windows = [window for window in windows if window]
    return min(windows) if windows else None


def supports_packing(model: torch.nn.Module, max_length: int | None = None) -> bool:
    """Whether the model's attention implementation takes the packed 4D mask, exactly.

    ``sdpa`` (transformers' default) and ``eager`` do; flash attention and flex attention do not,
    and such a model scores pairs with ``sapo.scoring.collate_pairs`` instead. So does a model
    with a sliding or chunked attention window unless every sequence (at most ``max_length``
    tokens) fits inside it: the packed mask would let tokens see past the window.
    """
    if _attention_implementation(model) not in _MASK_FORMATS:
        return False
    window = _shortest_window(getattr(getattr(model, "module", model), "config", None))
    return window is None or (max_length is not None and max_length < window)


def _computes_in_float32(model: torch.nn.Module, device: torch.device) -> bool:
    """Float32 weights and no autocast; FSDP may cast float32 weights for the forward, so never there."""
    dtype = getattr(getattr(model, "module", model), "dtype", None)
    if dtype != torch.float32 or torch.is_autocast_enabled(device.type):
        return False
    return not uses_fsdp(model)


def mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The boolean mask in the form the model's attention implementation reads.

    ``eager`` adds the mask to the scores, so it needs ``0``/``-inf``-like floats (a boolean would
    be added as 0/1 and silently mask nothing). ``sdpa`` takes booleans, or such floats in the
    query's dtype: a float32 model (no autocast) gets the floats, which SDPA's CPU kernels use
    as they are, where they convert a boolean mask in every layer (same log-probs to the bit;
    the saving is in docs/performance.md); other models get booleans.
    """
    implementation = _attention_implementation(model)
    mask_format = _MASK_FORMATS.get(implementation)
    if mask_format is None:
        raise ValueError(
            f"attn_implementation={implementation!r} cannot take the packed 4D attention mask; "
            f"use one of {sorted(_MASK_FORMATS)} or score pairs with sapo.scoring.collate_pairs"
        )
    if mask_format == "bool" and not _computes_in_float32(model, mask.device):
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )


def packed_completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts from one forward over packed rows.

    Same contract as ``sapo.scoring.completion_logps``: ``(logps, lengths)`` of shape ``(2B,)``,
    rows ``[:B]`` chosen and ``[B:]`` rejected. Response tokens inside the shared prefix (such as
    ``gold[:cut]``) count for both sides, as they do when the sides are scored separately, unless
    the batch was packed without them (``score_shared_prefix=False``). Where the model allows it,
    the LM head runs on ``batch["scored_positions"]`` only, ``chunk_size`` positions at a time
    (:func:`sapo.logprobs.position_logps`); otherwise the model computes the logits of the last
    ``K`` positions, those ``batch["targets"]`` covers. Each scored position gets one log-softmax
    for the targets of both sides.
    """
    targets, target_mask = batch["targets"], batch["target_mask"]
    pairs, keep = targets.shape[:2]
    positions = batch["scored_positions"]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": mask_for(model, batch["attention_mask"]),
        "position_ids": batch["position_ids"],
    }
    per_token = position_logps(model, inputs, targets, positions, chunk_size)  # (N, 2)
    counted = target_mask.flatten(0, 1).index_select(0, positions).float()
    # back onto the (B, K, 2) grid (each position once: deterministic, unlike a scattered sum)
    grid = per_token.new_zeros(pairs * keep, 2).index_copy(0, positions, per_token * counted)
    counts = counted.new_zeros(pairs * keep, 2).index_copy(0, positions, counted)
    logps, lengths = grid.view(pairs, keep, 2).sum(dim=1), counts.view(pairs, keep, 2).sum(dim=1)
    return logps.T.reshape(-1), lengths.T.reshape(-1)
