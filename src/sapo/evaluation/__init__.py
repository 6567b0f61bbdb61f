"""How good a model is, as sapo measures it.

- :mod:`sapo.evaluation.margins`: the held-out quantity SAPO trains, gold against the model's own
  segment-spliced rewrite (margin, win rate, gold log-prob), and exact match on tasks with one
  right answer.
"""

from sapo.evaluation.margins import (
    evaluate,
    greedy_accuracy,
    margin_batches,
    preference_margin,
    summarize_margins,
)

__all__ = ["evaluate", "greedy_accuracy", "margin_batches", "preference_margin", "summarize_margins"]
