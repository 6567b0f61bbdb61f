"""How good a model is, as sapo measures it, and what its negatives look like.

- :mod:`sapo.evaluation.margins`: the held-out quantity SAPO trains, gold against the model's own
  segment-spliced rewrite (margin, win rate, gold log-prob), and exact match on tasks with one
  right answer;
- :mod:`sapo.evaluation.harness`: EleutherAI's lm-evaluation-harness on a model in memory (the
  ``sapo[eval]`` extra);
- :mod:`sapo.evaluation.answers`: the model's answers to chat prompts, for the AlpacaEval,
  MT-Bench and Arena-Hard judges;
- :mod:`sapo.evaluation.arena_hard`: Arena-Hard-Auto's question files (v0.1, v2.0) and the
  answer lines its judge and style control read;
- :mod:`sapo.evaluation.during_training`: ``SAPOTrainer.evaluate``'s held-out metrics and the
  callbacks that evaluate or log while training;
- :mod:`sapo.evaluation.pairs`: replay-buffer pairs decoded, their rewritten span marked
  (``output_dir/pairs.jsonl``).
"""

from sapo.evaluation.margins import (
    greedy_accuracy,
    greedy_answers,
    held_out_scores,
    margin_batches,
    summarize_margins,
)

__all__ = ["greedy_accuracy", "greedy_answers", "held_out_scores", "margin_batches", "summarize_margins"]
