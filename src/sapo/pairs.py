"""The preference pair: what generation makes, the buffer keeps, the scorer reads and a checkpoint
saves.

A pair holds token ids only (on the CPU): the prompt, the chosen (gold) answer and the rejected
answer. ``step`` is the optimizer step it was generated at (a pair's age in the buffer); the
reference log-probs of its two answers are cached on it for one reference version, so a pair
drawn again before the next reference sync is not scored again. How often a pair was drawn is
the replay buffer's to count (:class:`sapo.buffer.ReplayBuffer`), beside each entry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pair:
    """One preference pair, as token ids.

    Attributes:
        prompt_ids: the prompt (every turn before the gold answer, rendered).
        chosen_ids: the gold answer, ending in an end-of-answer id.
        rejected_ids: the rejected answer (for SAPO the gold answer with one segment rewritten).
        step: the optimizer step the pair was generated at.
        reference_logps: the reference's summed log-probs ``(chosen, rejected)``, valid for
            ``reference_version`` only (``None``: not scored yet).
        reference_version: the reference version ``reference_logps`` belongs to.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    step: int = 0
    reference_logps: tuple[float, float] | None = None
    reference_version: int | None = None

    @property
    def tied(self) -> bool:
        """Whether the rejected answer is the chosen one: such a pair has no preference gradient."""
        return self.rejected_ids == self.chosen_ids

    def reference_cached(self, version: int) -> bool:
        """Whether the reference log-probs cached on this pair belong to reference ``version``."""
        return self.reference_logps is not None and self.reference_version == version

    def cache_reference(self, logps: tuple[float, float], version: int) -> None:
        self.reference_logps, self.reference_version = logps, version
