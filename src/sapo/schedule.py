"""Which dataset rows get their pairs generated at which optimizer step: SAPO's generation rounds.

SAPO generates every ``sample_every_n_steps`` optimizer steps. A round is that many steps: its
first step fetches the row batches of all its steps at once, so one batched generation call
covers every row of the round and no row goes without a segment (the paper's code discarded the
rows of the steps it skipped). The later steps then take the batches kept for them and generate
nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sapo.data import GOLD_IDS, PROMPT_IDS

Batches = list[dict[str, Any]]  # one optimizer step's row batches (one per accumulation step)
Row = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, gold_ids)


class GenerationSchedule:
    """The bookkeeping of generation rounds.

    Args:
        steps: optimizer steps per round (``sample_every_n_steps``).
        batches_per_step: row batches of a full optimizer step (``gradient_accumulation_steps``).
    """

    def __init__(self, steps: int, batches_per_step: int = 1):
        self.steps = steps
        self.batches_per_step = batches_per_step
        self._kept: deque[Batches] = deque()  # the batches of this round's later steps
        self._generated_ahead = 0  # after a resume inside a round: later steps whose rows have pairs

    @property
    def steps_ahead(self) -> int:
        """Steps still to come in this round whose rows already have pairs (for a checkpoint)."""
        return len(self._kept) + self._generated_ahead

    def restore(self, steps_ahead: int) -> None:
        """Continue a round from a checkpoint: the next ``steps_ahead`` steps fetch rows whose
        pairs were generated before the checkpoint, so they are not generated again."""
        self._kept.clear()
        self._generated_ahead = steps_ahead

    def next_step(self, fetch: Callable[[int | None], Batches]) -> tuple[Batches, list[Row]]:
        """This step's row batches, and the rows to generate for now: every row of the round at
        its first step, none at the others.

        ``fetch(count)`` returns the next ``count`` batches of the epoch (fewer, or none, at its
        end); ``count=None`` asks for this step's own number (Trainer's, shorter at an epoch's end).
        """
        if self._kept:
            return self._kept.popleft(), []
        round_batches = [fetch(None)]
        if self._generated_ahead > 0:
            self._generated_ahead -= 1
            return round_batches[0], []
        for _ in range(self.steps - 1):
            batches = fetch(self.batches_per_step)
            if not batches:
                break
            round_batches.append(batches)
        self._kept.extend(round_batches[1:])
        rows = [
            row
            for batches in round_batches
            for batch in batches
            for row in zip(batch[PROMPT_IDS], batch[GOLD_IDS])
        ]
        return round_batches[0], rows
