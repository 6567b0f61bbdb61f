"""Evaluation while SAPO trains: held-out margins at Trainer's evaluation steps, and (optionally)
lm-evaluation-harness tasks every ``eval_lm_steps`` steps.

- :func:`held_out_metrics` is what ``SAPOTrainer.evaluate`` returns: on the held-out rows the
  policy rewrites a segment of each gold answer (SAPO's rule, seeded by ``args.seed`` so every
  evaluation sees the same cuts) and scores gold against its rewrite (:mod:`sapo.evaluation.margins`).
  Trainer's prediction loop has nothing to compute these from, so it is not used. Names carry
  Trainer's prefix (``eval_margin``, ``eval_win_rate``, ``eval_gold_logp``), which W&B, trackio
  and the other ``report_to`` backends show as ``eval/margin`` and so on.
- :class:`LMEvalCallback` runs harness tasks on the policy, capped at ``eval_lm_limit`` documents
  per task so that it stays cheap, and logs ``eval_<task>/<metric>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from datasets import Dataset
from transformers import TrainerCallback

from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
from sapo.evaluation.harness import load_tasks, run_tasks, task_manager, task_metrics, task_names
from sapo.evaluation.margins import margin_batches, summarize_margins
from sapo.evaluation.pairs import PairLogCallback
from sapo.policy import eos_token_ids


def training_callbacks(
    args, tokenizer, buffer_items: Callable[[], list[dict]], log: Callable[[dict[str, float]], None]
) -> list[TrainerCallback]:
    """The callbacks ``args`` asks for: ``pairs.jsonl`` every ``log_pairs_steps`` steps (from
    ``buffer_items()``), lm-eval tasks every ``eval_lm_steps`` steps (results go to ``log``)."""
    callbacks = []
    if args.log_pairs_steps:
        callbacks.append(PairLogCallback(tokenizer, buffer_items, args.log_pairs_steps))
    if args.eval_lm_tasks:
        callbacks.append(LMEvalCallback(args, log))
    return callbacks


def tokenized_rows(dataset: Dataset | None, tokenizer, args) -> Dataset | None:
    """``dataset`` with ``prompt_ids`` and ``gold_ids``, tokenized as the training rows are."""
    if dataset is None or {PROMPT_IDS, GOLD_IDS} <= set(dataset.column_names):
        return dataset
    with args.main_process_first(desc="tokenizing the evaluation set"):
        return prepare_dataset(
            dataset, tokenizer, args.max_length, args.max_prompt_length, args.dataset_num_proc
        )


def held_out_metrics(
    model: torch.nn.Module, dataset: Dataset, tokenizer, args, accelerator, prefix: str = "eval"
) -> dict[str, float]:
    """``{prefix}_margin``, ``{prefix}_win_rate``, ``{prefix}_gold_logp`` and ``{prefix}_runtime``
    of ``model`` (as ``accelerator`` wraps it) on the SFT rows of ``dataset``, each process
    scoring its share of them; answers end at ``sapo.policy.eos_token_ids``.

    Every process runs as many batches (the last share is padded with repeats that are not
    counted), since under ZeRO-3 or FSDP each forward is collective.
    """
    started = time.perf_counter()
    if dataset is None:
        raise ValueError("eval_dataset: SAPOTrainer.evaluate needs held-out rows")
    rows = tokenized_rows(dataset, tokenizer, args)
    model = accelerator.unwrap_model(model)
    pairs = list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))
    if not pairs:
        raise ValueError("eval_dataset: no rows to evaluate")
    share = -(-len(pairs) // accelerator.num_processes)
    mine = pairs[accelerator.process_index * share :][:share]
    counted = torch.zeros(share, dtype=torch.bool)
    counted[: len(mine)] = True
    mine = mine + [pairs[0]] * (share - len(mine))
    ends = eos_token_ids(model, tokenizer)
    with accelerator.autocast():
        batches = list(
            margin_batches(
                model, mine, tokenizer.pad_token_id, ends, args.segment_length, seed=args.seed,
                batch_size=args.per_device_eval_batch_size, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, chunk_size=args.logprob_chunk_size,
            )
        )  # fmt: skip
    gold = torch.cat([gold for gold, _ in batches])
    margin = torch.cat([margin for _, margin in batches])
    local = torch.stack([gold.float(), margin.float(), counted.float()], dim=1).to(accelerator.device)
    gathered = accelerator.gather(local).cpu()
    kept = gathered[gathered[:, 2] > 0]
    summary = summarize_margins([(kept[:, 0], kept[:, 1])])
    metrics = {f"{prefix}_{name}": value for name, value in summary.items()}
    metrics[f"{prefix}_runtime"] = round(time.perf_counter() - started, 4)
    return metrics


class LMEvalCallback(TrainerCallback):
    """Harness tasks on the policy every ``args.eval_lm_steps`` optimizer steps.

    ``log`` receives the results as ``{"eval_<task>/<metric>": value}`` (e.g. Trainer's ``log``).
    The tasks and their data are loaded once, when the callback is built, so a bad task name
    fails before training starts. The harness runs an in-memory model in one process only.
    """

    def __init__(self, args, log: Callable[[dict[str, float]], None]):
        if args.world_size > 1:
            raise ValueError(
                "eval_lm_tasks: lm-evaluation-harness runs an in-memory model in one process; with "
                "several processes, evaluate saved checkpoints with `sapo eval --suite lm-eval`"
            )
        names = task_names(args.eval_lm_tasks)
        self.manager = task_manager(names, args.eval_lm_include_path)
        self.tasks = load_tasks(self.manager, names)
        self.every, self.limit = args.eval_lm_steps, args.eval_lm_limit
        self.batch_size = args.per_device_eval_batch_size
        self.log = log

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        started = time.perf_counter()
        results = run_tasks(
            model, processing_class, self.tasks, self.manager, limit=self.limit,
            apply_chat_template=processing_class.chat_template is not None,
            batch_size=self.batch_size,
        )  # fmt: skip
        logs = {
            f"eval_{task}/{name}": value
            for task, metrics in task_metrics(results, with_stderr=False).items()
            for name, value in metrics.items()
        }
        logs["eval_lm_runtime"] = round(time.perf_counter() - started, 4)
        should_log = control.should_log  # logging clears it, and this step's training log is still due
        self.log(logs)
        control.should_log = should_log
