"""Sampling: one :class:`Sampler` for every place sapo generates, engines behind a small protocol.

- :mod:`~sapo.sampling.sampler`: the :class:`Sampler` (seeds, threads, trimming) and
  :func:`evaluating`;
- :mod:`~sapo.sampling.backends`: the :class:`SamplingBackend` protocol and the two engines that
  run on a ``torch.nn.Module`` (SAPO's cached loop, transformers' ``generate``);
- :mod:`~sapo.sampling.own_loop`: SAPO's cached sampling loop.
"""

from sapo.sampling.backends import SamplingBackend, SamplingSettings
from sapo.sampling.sampler import Sampler, evaluating

__all__ = ["Sampler", "SamplingBackend", "SamplingSettings", "evaluating"]
