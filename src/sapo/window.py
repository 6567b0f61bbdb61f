"""Which dataset rows get their pairs generated when: SAPO's generation windows.

SAPO generates every ``sample_every_n_steps`` optimizer steps. A window is that many steps: its
first step fetches the row batches of all its steps at once, so one batched generation call
covers every row of the window and no row goes without a segment (the paper's code discarded the
rows of the steps it skipped). The later steps then train on the batches kept for them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sapo.data import GOLD_IDS, PROMPT_IDS

Batches = list[dict[str, Any]]  # one optimizer step's row batches (one per accumulation step)


class GenerationWindow:
    """The bookkeeping of one generation window.

    Args:
        steps: optimizer steps per window (``sample_every_n_steps``).
    """

    def __init__(self, steps: int):
        self.steps = steps
        self._kept: deque[Batches] = deque()  # the batches of this window's later steps
        self._generated_ahead = 0  # after a resume inside a window: later steps whose rows have pairs

    @property
    def steps_ahead(self) -> int:
        """Steps still to come in this window whose rows already have pairs (for a checkpoint)."""
        return len(self._kept) + self._generated_ahead

    def restore(self, steps_ahead: int) -> None:
        """Continue a window from a checkpoint: the next ``steps_ahead`` steps fetch rows whose
        pairs were generated before the checkpoint, so they are not generated again."""
        self._kept.clear()
        self._generated_ahead = steps_ahead

    def next_step(
        self,
        fetch_first: Callable[[], Batches],
        fetch_later: Callable[[], Batches],
        generate: Callable[[Sequence[tuple[list[int], list[int]]]], None],
    ) -> Batches:
        """This step's row batches. At a window's first step, also fetch the later steps' batches
        (``fetch_later``, empty at the end of an epoch) and ``generate`` for every row of them."""
        if self._kept:
            return self._kept.popleft()
        window = [fetch_first()]
        if self._generated_ahead > 0:
            self._generated_ahead -= 1
            return window[0]
        for _ in range(self.steps - 1):
            batches = fetch_later()
            if not batches:
                break
            window.append(batches)
        rows = [
            row for batches in window for batch in batches for row in zip(batch[PROMPT_IDS], batch[GOLD_IDS])
        ]
        if rows:
            generate(rows)
        self._kept.extend(window[1:])
        return window[0]
