"""Batch preference pairs and score their responses under a causal LM.

Chosen and rejected rows go through the model in one forward pass (chosen first, then rejected),
right-padded; only response tokens count (prompt and padding are masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from trl.trainer.utils import pad, selective_log_softmax


def collate_pairs(pairs: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack pairs into ``input_ids``/``attention_mask``/``completion_mask`` of shape ``(2B, T)``.

    Each pair holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (lists of ints). Rows
    ``[:B]`` are prompt + chosen, rows ``[B:]`` prompt + rejected.
    """
    sequences, completion_masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            prompt, response = pair["prompt_ids"], pair[side]
            sequences.append(torch.tensor(list(prompt) + list(response), dtype=torch.long))
            completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(response), dtype=torch.long))
    return {
        "input_ids": pad(sequences, padding_value=pad_token_id),
        "attention_mask": pad([torch.ones_like(s) for s in sequences], padding_value=0),
        "completion_mask": pad(completion_masks, padding_value=0),
    }


def completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts, one value per row.

    Returns ``(logps, lengths)`` with ``logps[i] = Σ_t log p(x_t | x_<t)`` over row ``i``'s
    response tokens.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    per_token = selective_log_softmax(logits, targets).float()
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)
