"""sapo's one batched sampler: up to ``max_new_tokens[i]`` tokens after each prefix, seeded.

Every place sapo generates goes through :class:`Sampler`: SAPO's segments (the EMA model,
:mod:`sapo.generation`), SPIN's answers, greedy exact match and the answers written for judges.
All rows of a call go through one batched call of the backend (:mod:`sapo.sampling.backends`);
a row stops at its own limit or at an end-of-answer id. Each call draws its seed from the
sampler's own ``torch.Generator``, so a run is reproducible and the generator's state can be
checkpointed. On a CPU, ``num_threads`` can cap torch's intra-op threads while sampling: a decode
step is dozens of small matrix products, and when other processes share the cores, each one split
across threads waits for whichever thread was descheduled (docs/performance.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from sapo.config import GENERATION_BACKENDS
from sapo.sampling.backends import TORCH_BACKENDS, SamplingBackend, SamplingSettings


@dataclass
class Sampler:
    """Batched, seeded sampling.

    Args:
        pad_token_id: id used for padding.
        eos_token_ids: ids that end an answer.
        temperature, top_p, top_k: sampling knobs (see ``SAPOConfig``); :meth:`greedy` builds the
            argmax sampler.
        seed: seed of the generator that draws one sampling seed per call.
        num_threads: torch intra-op threads while generating on CPU (``None``: leave torch's
            setting); restored afterwards. Has no effect on other devices.
        backend: ``"auto"``: SAPO's cached loop where the model allows it
            (:func:`sapo.sampling.own_loop.supports_cached_loop`), else ``generate``;
            ``"transformers"``: always ``generate``; or any :class:`SamplingBackend` instance.
    """

    pad_token_id: int
    eos_token_ids: Sequence[int]
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    seed: int = 0
    num_threads: int | None = None
    backend: str | SamplingBackend = "auto"

    def __post_init__(self):
        if isinstance(self.backend, str) and self.backend not in TORCH_BACKENDS:
            known = ", ".join(name for name in GENERATION_BACKENDS if name in TORCH_BACKENDS)
            raise ValueError(f"backend={self.backend!r}: must be one of {known}, or a SamplingBackend")
        self.eos_token_ids = list(self.eos_token_ids)
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def greedy(cls, pad_token_id: int, eos_token_ids: Sequence[int], **options) -> Sampler:
        """The argmax sampler (sampling from the top token alone): evaluation's and SPIN's default."""
        return cls(pad_token_id, eos_token_ids, temperature=1.0, top_p=1.0, top_k=1, **options)

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            self.pad_token_id, tuple(self.eos_token_ids), self.temperature, self.top_p, self.top_k
        )

    def threads_for(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The block with this sampler's CPU thread cap (``num_threads``) when ``model`` is on the
        CPU: for other passes of the sampling model that belong to a generation call."""
        on_cpu = next(model.parameters()).device.type == "cpu"
        return _intra_op_threads(self.num_threads if on_cpu else None)

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prefixes: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        version: int | None = None,
    ) -> list[list[int]]:
        """Sample up to ``max_new_tokens[i]`` tokens after ``prefixes[i]`` for every row at once.

        A returned answer ends at its first end-of-answer id (kept) or at its limit, whichever
        comes first. ``version`` names the weights ``model`` holds (see
        :meth:`SamplingBackend.sample`). A model whose weights diverged raises
        ``FloatingPointError``.
        """
        if len(prefixes) != len(max_new_tokens):
            raise ValueError("prefixes and max_new_tokens differ in length")
        if not prefixes:
            return []
        backend = TORCH_BACKENDS[self.backend]() if isinstance(self.backend, str) else self.backend
        device = next(model.parameters()).device
        call_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        devices = [device] if device.type == "cuda" else []
        threads = self.num_threads if device.type == "cpu" else None
        with torch.random.fork_rng(devices=devices), _intra_op_threads(threads), _diverged_model_error():
            torch.manual_seed(call_seed)
            new_tokens = backend.sample(model, prefixes, max_new_tokens, self.settings, version)
        return [
            cut_after_first(tokens[:limit], self.eos_token_ids)
            for tokens, limit in zip(new_tokens, max_new_tokens)
        ]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _diverged_model_error():
    """Turn torch's sampling error on NaN or infinite probabilities (a model whose weights
    diverged) into a ``FloatingPointError``, which the CLI reports in one line."""
    try:
        yield
    except RuntimeError as error:
        if "probability tensor contains" not in str(error):
            raise
        raise FloatingPointError(
            "the sampling model's next-token probabilities are not finite (its weights diverged): "
            "lower the learning rate, raise ema_decay or train in float32"
        ) from error


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """Run the block with ``count`` torch intra-op threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cut_after_first(tokens: list[int], stop_ids: Iterable[int]) -> list[int]:
    """``tokens`` up to and including the first of ``stop_ids`` (all of them if none occurs)."""
    stop = set(stop_ids)
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1]
    return tokens
