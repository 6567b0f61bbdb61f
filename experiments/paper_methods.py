"""Train one method of the paper table from an SFT warm start and score it; used by paper_table.py.

Every method gets the same warm start, the same training prompts, the same batch size and the same
number of optimizer steps, a linear learning-rate decay to 0 and no weight decay. What differs is
where its rejected answers come from:

- ``SFT``: the warm start itself, not trained further;
- ``continued SFT``: more supervised steps on the gold answers (``trl.SFTTrainer``);
- ``SPIN``: two SPIN iterations of half the steps each; each iteration the model answers every
  training prompt greedily and is trained with DPO on gold against those answers (``sapo.baselines.spin``);
- ``DPO`` / ``ORPO``: ``trl.DPOTrainer`` / ``trl.experimental.orpo.ORPOTrainer`` on a fixed paired
  dataset, chosen = gold, rejected = one answer sampled from the warm start before training;
- ``SAPO-DPO`` / ``SAPO-ORPO``: ``SAPOTrainer``, rejected = gold with a segment rewritten by the
  EMA model during training;
- ablations of SAPO (``ABLATIONS``), each trained at the learning rate chosen for the method it
  ablates: ``full answers`` (the EMA model rewrites the whole answer: no gold prefix, no gold
  suffix), ``on-policy`` (a replay buffer of one batch, so every step trains on the pairs it has
  just generated), ``segment N`` (the segment length), ``EMA decay D`` (0 samples from the policy
  itself), ``β B`` and ``ties skipped`` (``SAPOConfig.skip_tied_pairs``).

The cost of a method is the tokens it generated (sampled answers or segments, before or during
training) and the wall seconds of generation plus training, evaluation excluded.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from sapo.builtin.tasks import get_task

# the learning-rate family each method's grid is taken from
FAMILY = {
    "SFT": None,
    "continued SFT": "sft",
    "SPIN": "dpo",
    "DPO": "dpo",
    "ORPO": "orpo",
    "SAPO-DPO": "dpo",
    "SAPO-ORPO": "orpo",
}
# ablation -> (the method it ablates, whose chosen rate it reuses; SAPOConfig fields it changes)
ABLATIONS = {
    "SAPO-DPO, ties skipped": ("SAPO-DPO", {"skip_tied_pairs": True}),
    "SAPO-ORPO, ties skipped": ("SAPO-ORPO", {"skip_tied_pairs": True}),
    "SAPO-DPO, full answers": ("SAPO-DPO", {"segment_length": "whole answer"}),
    "SAPO-DPO, segment 4": ("SAPO-DPO", {"segment_length": 4}),
    "SAPO-DPO, segment 16": ("SAPO-DPO", {"segment_length": 16}),
    "SAPO-DPO, segment 32": ("SAPO-DPO", {"segment_length": 32}),
    "SAPO-DPO, EMA decay 0": ("SAPO-DPO", {"ema_decay": 0.0}),
    "SAPO-DPO, EMA decay 0.9": ("SAPO-DPO", {"ema_decay": 0.9}),
    "SAPO-DPO, on-policy": ("SAPO-DPO", {"replay_buffer_size": "one batch"}),
    "SAPO-DPO, β 0.1": ("SAPO-DPO", {"beta": 0.1}),
    "SAPO-DPO, β 2": ("SAPO-DPO", {"beta": 2.0}),
    # sapo's extensions: segments placed where the EMA model is least sure, and RPO's NLL term
    "SAPO-DPO, uncertain": ("SAPO-DPO", {"segment_placement": "uncertain"}),
    "SAPO-ORPO, uncertain": ("SAPO-ORPO", {"segment_placement": "uncertain"}),
    "SAPO-DPO, RPO": ("SAPO-DPO", {"rpo_alpha": 1.0}),
    "SAPO-DPO, uncertain, RPO": ("SAPO-DPO", {"segment_placement": "uncertain", "rpo_alpha": 1.0}),
    "SAPO-DPO, uncertain, temperature 1": (
        "SAPO-DPO",
        {"segment_placement": "uncertain", "temperature": 1.0},
    ),
    "DPO, RPO": ("DPO", {"rpo_alpha": 1.0}),
}
METHODS = (*FAMILY, *ABLATIONS)


@dataclass(frozen=True)
class Job:
    """One training run: a method at one learning rate and seed on one task."""

    task: str
    method: str
    learning_rate: float
    seed: int
    steps: int
    batch_size: int
    beta: float
    segment_length: int
    ref_model_sync_steps: int
    validation_rows: int
    test_rows: int
    output_dir: str
    warm_start: str  # model name or folder


# tasks whose table starts from the ~22k-parameter builtin:micro, trained to its plateau: the
# capacity-limited regime, where the SFT model has errors left (builtin:tiny's plateau there is 0.94)
MICRO_WARM_STARTS = ("worked-multiplication",)


def warm_start_name(task: str) -> str:
    return f"builtin:{'micro' if task in MICRO_WARM_STARTS else 'tiny'}-{task}-sft"


def run_job(job: Job) -> dict:
    """Train ``job.method``; return its validation and test exact match and edit distance, and its cost."""
    import torch

    torch.set_num_threads(1)  # a 0.1M-parameter model gains nothing from more threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()

    from sapo.builtin.tasks import task_dataset, task_scores
    from sapo.cli.arguments import ModelArguments
    from sapo.cli.loading import load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=job.warm_start)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer)
    # prompts the warm start never saw (it learned its own SFT split by heart; see sapo.builtin.tasks)
    train = training_rows(task_dataset(job.task, "preference"), job.steps * job.batch_size, job.seed)

    started = time.perf_counter()
    generated, extra = 0, {}
    if job.method != "SFT":
        # the trainers' logs and progress bars go to the run's folder, not the table's terminal
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(job.output_dir) / "train.log", "w") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                model, generated, extra = runner(job.method)(job, model, tokenizer, train)
    seconds = time.perf_counter() - started

    validation = task_scores(model, tokenizer, job.task, "validation", job.validation_rows)
    test = task_scores(model, tokenizer, job.task, "test", job.test_rows)
    return {
        "task": job.task,
        "method": job.method,
        "learning_rate": job.learning_rate,
        "seed": job.seed,
        "validation_accuracy": validation["exact_match"],
        "test_accuracy": test["exact_match"],
        "validation_edit_distance": validation["edit_distance"],
        "test_edit_distance": test["edit_distance"],
        "generated_tokens": int(generated),
        "seconds": round(seconds, 2),
        **extra,
    }


def training_rows(dataset, count: int, seed: int):
    """``count`` training rows drawn by ``seed`` (the whole split, shuffled, if it is smaller)."""
    shuffled = dataset.shuffle(seed=seed)
    return shuffled.select(range(min(count, len(shuffled))))


def common_settings(job: Job) -> dict:
    from sapo.builtin.settings import tiny_run_args

    return tiny_run_args(
        job.output_dir, job.steps, job.batch_size, job.learning_rate, job.seed, logging_steps=10
    )


def train_sft(job: Job, model, tokenizer, train):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(max_length=get_task(job.task).max_length, **common_settings(job))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    return trainer.model, 0, {}


def train_spin(job: Job, model, tokenizer, train):
    from sapo.baselines.spin import SPINConfig, run_spin

    task = get_task(job.task)
    settings = common_settings(job)
    settings["max_steps"] = job.steps // 2
    args = SPINConfig(
        spin_iterations=2,
        beta=job.beta,
        max_new_tokens=task.max_length - task.max_prompt_length,
        generation_batch_size=256,
        max_length=task.max_length,
        max_prompt_length=task.max_prompt_length,
        overwrite_output_dir=True,  # a job trained again replaces its own interrupted iterations
        **settings,
    )
    model, histories = run_spin(model, args, train, processing_class=tokenizer)
    return model, sum(history[0]["spin/generated_tokens"] for history in histories), {}


def sampled_pairs(model, tokenizer, train, task_name: str, seed: int, attempts: int = 4):
    """Chosen = gold, rejected = an answer sampled from ``model`` (SAPO's sampling settings).

    A row whose sample equals its gold answer is sampled again, up to ``attempts`` times in all,
    and dropped if every sample is right: a pair with chosen = rejected teaches nothing, and
    makes ORPO's odds infinite once the model is certain of the answer. Returns the pairs and
    the tokens generated, all attempts counted.
    """
    from datasets import Dataset

    from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
    from sapo.policy import eos_token_ids
    from sapo.sampling import Sampler, evaluating

    task = get_task(task_name)
    rows = prepare_dataset(train, tokenizer, task.max_length, task.max_prompt_length)
    if len(rows) != len(train):  # pairs are matched to ``train`` rows by position
        raise ValueError(f"{len(train) - len(rows)} training rows do not fit max_length={task.max_length}")
    all_prompts, golds = rows[PROMPT_IDS], rows[GOLD_IDS]  # each column read once, as lists
    sampler = Sampler(tokenizer.pad_token_id, eos_token_ids(model, tokenizer), seed=seed)
    rejected: dict[int, list[int]] = {}
    pending = list(range(len(rows)))
    generated = 0
    with evaluating(model):
        for _ in range(attempts):
            for start in range(0, len(pending), 256):
                chunk = pending[start : start + 256]
                prompts = [all_prompts[index] for index in chunk]
                answers = sampler.generate(model, prompts, [task.max_length - len(p) for p in prompts])
                generated += sum(len(answer) for answer in answers)
                for index, answer in zip(chunk, answers):
                    if answer != golds[index]:
                        rejected[index] = answer
            pending = [index for index in pending if index not in rejected]
    kept = sorted(rejected)
    pairs = Dataset.from_dict(
        {
            "prompt": [train[index]["prompt"] for index in kept],
            "chosen": [train[index]["completion"] for index in kept],
            "rejected": [
                [
                    {
                        "role": "assistant",
                        "content": tokenizer.decode(rejected[index], skip_special_tokens=True),
                    }
                ]
                for index in kept
            ],
        }
    )
    return pairs, generated


def train_paired(job: Job, model, tokenizer, train):
    """TRL's DPO or ORPO on gold vs one answer sampled from the warm start."""
    pairs, generated = sampled_pairs(model, tokenizer, train, job.task, job.seed)
    settings = common_settings(job)
    max_length = get_task(job.task).max_length
    base, overrides = ABLATIONS.get(job.method, (job.method, {}))
    if base == "DPO":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=job.beta, max_length=max_length, **overrides, **settings)
        trainer = DPOTrainer(
            model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=pairs,
            processing_class=tokenizer,
        )  # fmt: skip
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(beta=job.beta, max_length=max_length, **settings)
        # the chat template has no BOS and the warm start never saw one; ORPO would prepend it
        orpo_tokenizer = copy.deepcopy(tokenizer)
        orpo_tokenizer.bos_token = None
        trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=orpo_tokenizer)
    trainer.train()
    return trainer.model, generated, {"pairs": len(pairs)}


def sapo_overrides(job: Job) -> dict:
    """The SAPOConfig fields an ablation changes, resolved for ``job``'s task and batch size."""
    _, overrides = ABLATIONS.get(job.method, (job.method, {}))
    resolved = {"whole answer": get_task(job.task).max_length, "one batch": job.batch_size}
    return {name: resolved.get(value, value) for name, value in overrides.items()}


def train_sapo(job: Job, model, tokenizer, train):
    from sapo import SAPOConfig, SAPOTrainer
    from sapo.data import prepare_dataset

    task = get_task(job.task)
    base = ABLATIONS.get(job.method, (job.method, {}))[0]
    settings = dict(
        loss_type="orpo" if base == "SAPO-ORPO" else "dpo",
        beta=job.beta,
        segment_length=job.segment_length,
        replay_buffer_size=2000,
        ref_model_sync_steps=job.ref_model_sync_steps,
        max_length=task.max_length,
        max_prompt_length=task.max_prompt_length,
    )
    settings.update(sapo_overrides(job))
    args = SAPOConfig(**settings, **common_settings(job))
    rows = prepare_dataset(train, tokenizer, task.max_length, task.max_prompt_length)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    history = trainer.state.log_history
    ties = [entry["sapo/tied_fraction"] for entry in history if "sapo/tied_fraction" in entry]
    extra = {"tied_fraction": round(sum(ties) / len(ties), 4)} if ties else {}
    return trainer.model, segment_tokens(history), extra


def segment_tokens(log_history: list[dict]) -> float:
    """Total segment tokens: each log holds the mean per step since the previous log."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "sapo/segment_tokens" in entry:
            total += entry["sapo/segment_tokens"] * (entry["step"] - previous)
            previous = entry["step"]
    return round(total)


RUNNERS = {
    "continued SFT": train_sft,
    "SPIN": train_spin,
    "DPO": train_paired,
    "ORPO": train_paired,
    "SAPO-DPO": train_sapo,
    "SAPO-ORPO": train_sapo,
}


def runner(method: str):
    """The training function of ``method`` (an ablation trains like the method it ablates)."""
    return RUNNERS[ABLATIONS[method][0] if method in ABLATIONS else method]
