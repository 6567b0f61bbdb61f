"""The replay buffer: a bounded FIFO of preference pairs, drawn favouring the least-drawn ones.

Counts live beside each entry (not keyed by object identity, which means nothing after a
reload), and draws come from the buffer's own seeded generator, so a saved and restored buffer
continues exactly the same draw sequence.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch


class ReplayBuffer:
    """Bounded FIFO of items; ``sample(k)`` draws with replacement, weight ``1 / (1 + times_drawn)``.

    Args:
        capacity: the most items kept; adding to a full buffer evicts the oldest item.
        seed: seed of the buffer's own ``torch.Generator`` used for every draw.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self._items: deque[Any] = deque()
        self._times_sampled: deque[int] = deque()
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any) -> None:
        """Append ``item`` with a draw count of 0, evicting the oldest item when full."""
        if len(self._items) == self.capacity:
            self._items.popleft()
            self._times_sampled.popleft()
        self._items.append(item)
        self._times_sampled.append(0)

    def weights(self) -> torch.Tensor:
        """Current draw weights, ``1 / (1 + times_sampled)``, unnormalised, in buffer order."""
        counts = torch.tensor(list(self._times_sampled), dtype=torch.float64)
        return 1.0 / (1.0 + counts)

    def draw(self, k: int) -> list[int]:
        """Draw ``k`` positions with replacement (0: the oldest item); every drawn entry's count
        goes up once per draw. Positions name entries until the next :meth:`add`."""
        if len(self._items) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        positions = torch.multinomial(self.weights(), k, replacement=True, generator=self._generator).tolist()
        for position in positions:
            self._times_sampled[position] += 1
        return positions

    def sample(self, k: int) -> list[Any]:
        """Draw ``k`` items with replacement (:meth:`draw`)."""
        return [self._items[position] for position in self.draw(k)]

    def __getitem__(self, position: int) -> Any:
        return self._items[position]

    def items(self) -> list[Any]:
        """The items, oldest first."""
        return list(self._items)

    def times_sampled(self) -> list[int]:
        """How often each item has been drawn, oldest first."""
        return list(self._times_sampled)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: items in order, counts and generator state."""
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "items": list(self._items),
            "times_sampled": list(self._times_sampled),
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"buffer capacity {self.capacity} does not match saved capacity {state['capacity']}"
            )
        self.seed = state["seed"]
        self._items = deque(state["items"])
        self._times_sampled = deque(int(count) for count in state["times_sampled"])
        self._generator.set_state(state["generator_state"])


def buffer_metrics(buffer: ReplayBuffer, step: int) -> dict[str, float]:
    """``sapo/buffer_size``, ``sapo/mean_times_sampled`` and ``sapo/mean_pair_age`` (steps since a
    pair was generated, at optimizer step ``step``) of a buffer of :class:`~sapo.pairs.Pair`."""
    if len(buffer) == 0:
        return {"sapo/buffer_size": 0.0}
    counts = buffer.times_sampled()
    ages = [step - pair.step for pair in buffer.items()]
    return {
        "sapo/buffer_size": float(len(buffer)),
        "sapo/mean_times_sampled": sum(counts) / len(counts),
        "sapo/mean_pair_age": sum(ages) / len(ages),
    }
