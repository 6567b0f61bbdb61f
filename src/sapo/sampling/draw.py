"""The own loop's draw: one token per row from ``generate``'s temperature, top-k and top-p
distribution, computed on the tokens that can be drawn instead of the whole vocabulary.

transformers' warpers keep the vocabulary's shape: top-k sets all but the ``k`` highest logits to
``-inf``, then top-p sorts all of them to find the nucleus (151,936 per row and token at Qwen's
vocabulary, although ``k`` are finite), and the softmax and ``torch.multinomial`` run over the whole
vocabulary again. On a CPU that cost more per token than a small model's forward (4 rows of
151,936 logits, one thread: 64-71 ms against 1.2 ms here). The distribution needs only the
candidates: :func:`candidate_distribution` takes the ``k`` highest logits
(``torch.topk``), scales them by the temperature, applies top-p among them exactly as
``TopPLogitsWarper`` does (ascending cumulative probability ``<= 1 - top_p`` removed, the most
likely token always kept) and normalises over them; :func:`draw_next_tokens` draws one candidate
per row and maps it back to its vocabulary id.

The probabilities equal the warpers' (``softmax`` of the warped logits, up to float rounding;
tests/sampling/test_draw.py), ties included: every token tied with the ``k``-th logit is a
candidate, as ``TopKLogitsWarper`` keeps them all. One thing is not transformers': among tokens
with the same logit at the nucleus boundary, the warper removes whichever ``torch.sort``'s
unstable order puts first; here the higher ids go first. Which of two equally likely tokens is
kept may then differ; how much probability each logit value gets does not. The tokens drawn for a
seed differ from ``generate``'s (the draw runs over other tensors):
``generation_backend="transformers"`` gives those.

Without top-k (``top_k=0``) and with ``top_p < 1``, the nucleus is found by ``torch.topk`` of a
growing size until the candidates hold ``top_p`` of the probability (a peaked distribution's
nucleus is small: 10 against 128 ms per token for 4 rows on one thread), and by a full sort where
no size tried can (a flat one's is most of the vocabulary), the draw then inverting the sorted
cumulative sums instead of a second pass of ``torch.multinomial`` over the vocabulary (as fast as
the warpers). A size is tried only if its candidates could hold that much, judged from the
smallest probability seen so far. Without either, the draw is ``generate``'s own: a softmax over
the vocabulary and one ``torch.multinomial``, the same tokens for the same seed.
"""

from __future__ import annotations

import torch

# nucleus sizes tried before a full sort when top-k is off; each try costs one pass over the logits
NUCLEUS_SIZES = (64, 1024)
# the candidates must hold this much more than top_p: the warper's float sums may differ by rounding
MASS_MARGIN = 1e-5

Candidates = tuple[torch.Tensor, torch.Tensor]  # (scaled logits or probabilities, vocabulary ids), (B, C)


def draw_next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One vocabulary id per row of float32 ``logits`` ``(B, V)``, drawn from the global generator
    with ``generate``'s distribution for these settings (``top_k=0`` and ``top_p=1``: off)."""
    if not top_k and top_p >= 1.0:
        return torch.multinomial(torch.softmax(_scaled(logits, temperature), dim=-1), 1).squeeze(1)
    if not top_k:
        values, ids, cumulative = _nucleus_candidates(_scaled(logits, temperature), top_p)
        if values.shape[-1] == logits.shape[-1]:
            return _draw_from_sorted_vocabulary(ids, cumulative, top_p)
        probabilities = torch.softmax(_top_p_filtered(values, cumulative, top_p), dim=-1)
    else:
        probabilities, ids = candidate_distribution(logits, temperature, top_k, top_p)
    return ids.gather(1, torch.multinomial(probabilities, 1)).squeeze(1)


def candidate_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> Candidates:
    """``(probabilities, ids)``, both ``(B, C)``: the probability of vocabulary id ``ids[b, c]``
    under transformers' temperature, top-k and top-p warpers; every id not listed has none."""
    if top_k:
        values, ids = _top_k_candidates(logits, temperature, top_k)
        if top_p < 1.0:
            values, ids = _ascending(values, ids)
            values = _top_p_filtered(values, values.softmax(dim=-1).cumsum(dim=-1), top_p)
    elif top_p < 1.0:
        values, ids, cumulative = _nucleus_candidates(_scaled(logits, temperature), top_p)
        values = _top_p_filtered(values, cumulative, top_p)
    else:
        values = _scaled(logits, temperature)
        ids = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    return torch.softmax(values, dim=-1), ids


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``TemperatureLogitsWarper``'s division (none at 1, as ``generate`` adds no warper then)."""
    return logits if temperature == 1.0 else logits / temperature


def _ties_beyond(values: torch.Tensor, count: int) -> torch.Tensor:
    """Rows whose ``count``-th and ``count + 1``-th highest values (``values`` sorted descending)
    are equal and finite: a token outside the first ``count`` then has a say. A tie at ``-inf``
    has none: those tokens have no probability either way."""
    last, next_one = values[:, count - 1], values[:, count]
    return (last == next_one) & torch.isfinite(next_one)


def _top_k_candidates(logits: torch.Tensor, temperature: float, top_k: int) -> Candidates:
    """The scaled logits ``TopKLogitsWarper`` keeps and their ids.

    The warper keeps every token at or above the ``k``-th highest scaled logit, so a tie there
    keeps more than ``k``. The temperature divides after ``topk`` (dividing by a positive number
    keeps the order), and one more logit than ``k`` tells whether a tie reaches past the ``k``-th:
    only then do the scaled logits of the whole vocabulary decide which tokens are kept.
    """
    vocabulary = logits.shape[-1]
    top_k = min(top_k, vocabulary)
    values, ids = torch.topk(logits, min(top_k + 1, vocabulary))
    values = _scaled(values, temperature)
    if top_k == vocabulary or not _ties_beyond(values, top_k).any():
        return values[:, :top_k], ids[:, :top_k]
    scaled = _scaled(logits, temperature)
    threshold = values[:, top_k - 1 : top_k]
    widest = int((scaled >= threshold).sum(dim=-1).max())
    values, ids = torch.topk(scaled, widest)
    return values.masked_fill(values < threshold, float("-inf")), ids


def _ascending(values: torch.Tensor, ids: torch.Tensor) -> Candidates:
    """Candidates in ascending order of value, equal values by descending id: the order in which
    :func:`_top_p_filtered` removes them (two sorts of a few candidates)."""
    by_id = ids.argsort(dim=-1, descending=True)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = values.argsort(dim=-1, stable=True)
    return values.gather(-1, by_value), ids.gather(-1, by_value)


def _nucleus_candidates(scaled: torch.Tensor, top_p: float) -> tuple[torch.Tensor, ...]:
    """``(values, ids, cumulative probabilities)`` in :func:`_ascending` order, for top-p alone:
    the fewest of :data:`NUCLEUS_SIZES` highest logits that hold ``top_p`` of every row's
    probability (``TopPLogitsWarper`` removes every other token), else the whole vocabulary.

    The cumulative probability of a candidate counts every token below it, as the warper's sum
    over the sorted vocabulary does: the candidates' own from the smallest, after the mass of all
    tokens that are not candidates. A size is tried only where the smallest probability already
    seen, times the tokens a size adds, could bring every row to ``top_p``.
    """
    vocabulary = scaled.shape[-1]
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    seen = 0  # highest tokens looked at, which hold `mass`; none further is likelier than `smallest`
    mass, smallest = torch.zeros(scaled.shape[0], device=scaled.device), torch.ones(scaled.shape[0])
    for size in NUCLEUS_SIZES:
        if size >= vocabulary:
            break
        if bool((mass + (size - seen) * smallest.to(mass.device) < top_p + MASS_MARGIN).any()):
            continue  # this many candidates cannot hold top_p of every row
        values, ids = torch.topk(scaled, size + 1)
        probabilities = (values - log_normaliser).exp()
        seen, mass, smallest = size, probabilities[:, :size].sum(dim=-1), probabilities[:, size]
        if bool(((mass >= top_p + MASS_MARGIN) & ~_ties_beyond(values, size)).all()):
            values, ids = _ascending(values[:, :size], ids[:, :size])
            outside = (1.0 - mass[:, None]).clamp_(min=0.0)
            return values, ids, outside + (values - log_normaliser).exp().cumsum(dim=-1)
    # ascending by value, equal values by descending id: a stable sort of the reversed vocabulary
    values, order = scaled.flip(-1).sort(dim=-1, stable=True)
    return values, vocabulary - 1 - order, (values - log_normaliser).exp().cumsum(dim=-1)


def _top_p_removed(cumulative: torch.Tensor, top_p: float) -> torch.Tensor:
    """``TopPLogitsWarper``'s rule on candidates in :func:`_ascending` order and their cumulative
    probabilities: a token at most ``1 - top_p`` is removed, the last (most likely) never is."""
    removed = cumulative <= 1 - top_p
    removed[:, -1] = False
    return removed


def _top_p_filtered(values: torch.Tensor, cumulative: torch.Tensor, top_p: float) -> torch.Tensor:
    """``values`` with ``-inf`` where :func:`_top_p_removed` removes the token."""
    return values.masked_fill(_top_p_removed(cumulative, top_p), float("-inf"))


def _draw_from_sorted_vocabulary(ids: torch.Tensor, cumulative: torch.Tensor, top_p: float) -> torch.Tensor:
    """One id per row from the whole vocabulary in :func:`_ascending` order, top-p applied.

    ``torch.multinomial`` over a whole vocabulary costs as much again as the sort (it normalises
    and sums the row once more: 23 ms for 4 rows of 151,936 on one thread); the cumulative sums at
    hand give the same draw by inversion. The removed tokens are the first ones, so the kept ones
    span ``(base, total]`` of the cumulative sums: a uniform point in it falls on each kept token
    with its probability over the kept mass.
    """
    vocabulary = cumulative.shape[-1]
    total = cumulative[:, -1:]
    if not bool(torch.isfinite(total).all()):  # the error torch.multinomial gives, which Sampler reports
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    first_kept = _top_p_removed(cumulative, top_p).sum(dim=-1, keepdim=True)
    base = torch.where(first_kept > 0, cumulative.gather(1, (first_kept - 1).clamp(min=0)), 0.0)
    point = base + torch.rand(total.shape, dtype=total.dtype, device=total.device) * (total - base)
    position = torch.searchsorted(cumulative, point, right=True).clamp(max=vocabulary - 1)
    return ids.gather(1, torch.maximum(position, first_kept)).squeeze(1)
