"""The negatives made visible: a few replay-buffer pairs, decoded, every ``log_pairs_steps`` steps.

What the EMA model writes is the first thing to look at when self-play goes wrong. Each record
holds the prompt, the gold answer and the rejected answer with the span where it differs from
the gold marked ``⟦like this⟧``, plus both spans alone. The span is recomputed from the ids
(longest common prefix, then longest common suffix), so it is exactly what changed: where the
EMA model happened to rewrite a token as the gold has it, that token is outside the marks.

:class:`PairLogCallback` appends the records to ``output_dir/pairs.jsonl`` on the main process
and shows them as a table on W&B and trackio when they are in ``report_to``. The file holds one
run's records: a run starts it where it starts (a resumed run at its checkpoint's step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.utils import logging

from sapo.pairs import Pair

OPEN, CLOSE = "⟦", "⟧"
PAIRS_PER_LOG = 4
PAIRS_FILE = "pairs.jsonl"

logger = logging.get_logger(__name__)


def differing_span(chosen: Sequence[int], rejected: Sequence[int]) -> tuple[int, int, int]:
    """``(start, rejected_end, chosen_end)``: ``rejected[start:rejected_end]`` stands where
    ``chosen[start:chosen_end]`` was; both are empty when the two answers are equal."""
    shortest = min(len(chosen), len(rejected))
    start = 0
    while start < shortest and chosen[start] == rejected[start]:
        start += 1
    tail = 0
    while tail < shortest - start and chosen[-1 - tail] == rejected[-1 - tail]:
        tail += 1
    return start, len(rejected) - tail, len(chosen) - tail


def _marked(tokenizer, ids: Sequence[int], start: int, end: int) -> tuple[str, str]:
    """``ids`` decoded with ``ids[start:end]`` between the marks, and that span's text.

    Decoding growing prefixes keeps the text exactly as decoding the whole answer gives it
    (tokenizers that drop a word's leading space at the start of a decode would otherwise lose it).
    """

    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=True)

    before, through, whole = decode(ids[:start]), decode(ids[:end]), decode(ids)
    if through.startswith(before) and whole.startswith(through):
        span, after = through[len(before) :], whole[len(through) :]
    else:
        span, after = decode(ids[start:end]), decode(ids[end:])
    return f"{before}{OPEN}{span}{CLOSE}{after}", span


def describe_pair(pair: Pair, tokenizer) -> dict[str, Any]:
    """A buffer pair as text: ``prompt``, ``chosen``, ``rejected`` (its rewritten span marked,
    unless it is ``identical`` to the gold), ``gold_span`` and ``rewritten_span``, and the step
    it was generated at."""
    chosen, rejected = list(pair.chosen_ids), list(pair.rejected_ids)
    gold = tokenizer.decode(chosen, skip_special_tokens=True)
    rejected_text, rewritten, replaced = gold, "", ""  # a rewrite equal to the gold: nothing to mark
    if chosen != rejected:
        start, rejected_end, chosen_end = differing_span(chosen, rejected)
        rejected_text, rewritten = _marked(tokenizer, rejected, start, rejected_end)
        _, replaced = _marked(tokenizer, chosen, start, chosen_end)
    return {
        "generated_at_step": pair.step,
        "prompt": tokenizer.decode(pair.prompt_ids, skip_special_tokens=True),
        "chosen": gold,
        "rejected": rejected_text,
        "gold_span": replaced,
        "rewritten_span": rewritten,
        "identical": chosen == rejected,
    }


class PairLogCallback(TrainerCallback):
    """Every ``every`` optimizer steps and at the last one, the newest ``count`` buffer pairs
    (``pairs()`` returns the buffer's items, oldest first) as records in ``output_dir/pairs.jsonl``."""

    def __init__(self, tokenizer, pairs: Callable[[], list[Pair]], every: int, count: int = PAIRS_PER_LOG):
        self.tokenizer, self.pairs, self.every, self.count = tokenizer, pairs, every, count

    def on_train_begin(self, args, state, control, **kwargs):
        """Drop the records of steps after this run's start: a resumed run writes again those its
        killed predecessor wrote after the checkpoint; a new run replaces (with a warning) those of
        an earlier run that left nothing to resume (a folder with more is refused: see
        :mod:`sapo.checkpoints.ownership`)."""
        path = os.path.join(args.output_dir, PAIRS_FILE)
        if not state.is_world_process_zero or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as file:
            lines = file.readlines()
        kept = [line for line in lines if _logged_step(line) <= state.global_step]
        if len(kept) == len(lines):
            return
        if state.global_step == 0:
            logger.warning("%s: replacing the %d records of an earlier run", path, len(lines))
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.writelines(kept)
        os.replace(path + ".tmp", path)

    def on_step_end(self, args, state, control, **kwargs):
        # every `every` steps, and at the run's last step: a short run shows its pairs too
        due = state.global_step % self.every == 0 or state.global_step == state.max_steps
        if not due or not state.is_world_process_zero:
            return
        newest = self.pairs()[-self.count :]
        if not newest:
            return
        records = [{"step": state.global_step, **describe_pair(pair, self.tokenizer)} for pair in newest]
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, PAIRS_FILE), "a", encoding="utf-8") as file:
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        log_table(args.report_to, "sapo/pairs", records)


def _logged_step(line: str) -> float:
    """The step a record was written at; a line cut short by a killed run counts as after any."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def log_table(report_to: Sequence[str], name: str, records: list[dict[str, Any]]) -> None:
    """Show ``records`` as a table on the backends of ``report_to`` that take tables (W&B, trackio)."""
    columns = list(records[0])
    rows = [[record[column] for column in columns] for record in records]
    if "wandb" in report_to:
        with contextlib.suppress(ImportError):
            import wandb

            if wandb.run is not None:
                wandb.log({name: wandb.Table(columns=columns, data=rows)})
    if "trackio" in report_to:
        with contextlib.suppress(ImportError):
            import trackio

            trackio.log({name: trackio.Table(columns=columns, data=rows)})
