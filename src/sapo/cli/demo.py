"""``sapo demo``: Self-Augmented Preference Optimization on a built-in task, offline, on a CPU.

From one SFT warm start (``builtin:tiny-multiplication-sft``: a tiny Llama trained with SFT on
two-digit multiplication until its validation exact match stopped rising, at about 43%), three runs
of the same number of optimizer steps on the same training rows, the task's ``preference`` split
(prompts and gold answers the warm start never saw; it knows its own SFT rows by heart):

- ``SFT``: more supervised fine-tuning on the gold answers (TRL's ``SFTTrainer``);
- ``SAPO-DPO`` and ``SAPO-ORPO``: ``SAPOTrainer``, whose rejected answers are the EMA model's
  own rewrites of a segment of each gold answer.

Every ``eval_every`` steps each run is scored on validation rows (exact match and the
gold-vs-own-segment margin); at the end every model is scored on the test split. The table goes
to the terminal; ``report.md``, ``curves.png``, ``results.json`` and the three trained models go
to the output folder.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from sapo.builtin.settings import tiny_run_args
from sapo.builtin.tasks import MAX_LENGTH, MAX_PROMPT_LENGTH, get_task
from sapo.cli.arguments import ArgumentParser, DataArguments, ModelArguments
from sapo.cli.loading import load_model, load_rows, load_tokenizer
from sapo.cli.report import plot_curves, results_table, settings_table
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
from sapo.evaluation import held_out_scores
from sapo.policy import eos_token_ids

METHODS = ("SFT", "SAPO-DPO", "SAPO-ORPO")
TABLE_METRICS = ("accuracy", "margin", "win_rate", "gold_logp")


@dataclass
class DemoArguments:
    r"""
    Settings of `sapo demo`; the defaults are the demo (see `recipes/demo/demo.yaml`).

    Parameters:
        output_dir (`str`, *optional*, defaults to `"sapo-demo"`):
            Folder for `report.md`, `curves.png`, `results.json` and `models/`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into a non-empty `output_dir`, replacing the files of an earlier demo.
        model_name_or_path (`str`, *optional*, defaults to `"builtin:tiny-multiplication-sft"`):
            The SFT warm start every method begins from.
        task (`str`, *optional*, defaults to `"multiplication"`):
            Built-in task (see `sapo.builtin.tasks`).
        steps (`int`, *optional*, defaults to `1000`):
            Optimizer steps of each method.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows per optimizer step (SAPO: pairs drawn from the replay buffer).
        sft_learning_rate, dpo_learning_rate, orpo_learning_rate (`float`, *optional*):
            Peak learning rate of each method, decayed linearly to 0 (defaults `1e-4`, `3e-5`, `1e-4`:
            a tenth of the warm start's peak, whose schedule has run out; DPO's loss has no likelihood
            term to hold the model, so it gets less).
        dpo_beta (`float`, *optional*, defaults to `0.5`), orpo_beta (`float`, *optional*, defaults to `0.5`):
            DPO's β and ORPO's λ.
        segment_length (`int`, *optional*, defaults to `4`):
            Tokens of each gold answer the EMA model rewrites (an answer is 3 to 5 tokens: most of it).
        ref_model_sync_steps (`int`, *optional*, defaults to `60`):
            SAPO-DPO copies the EMA model into its reference every this many steps.
        eval_every (`int`, *optional*, defaults to `100`):
            Score every run on the validation rows every this many steps (the curves' points).
        validation_rows (`int`, *optional*, defaults to `500`):
            Validation rows scored for the curves.
        test_rows (`int`, *optional*, defaults to `1000`):
            Test rows scored for the final table.
        seed (`int`, *optional*, defaults to `0`):
            Seed of training and of the evaluations' sampling.
    """

    output_dir: str = field(
        default="sapo-demo", metadata={"help": "Folder for the report, curves and models."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})
    model_name_or_path: str = field(
        default="builtin:tiny-multiplication-sft",
        metadata={"help": "The SFT warm start every method begins from."},
    )
    task: str = field(default="multiplication", metadata={"help": "Built-in task."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps of each method."})
    batch_size: int = field(default=32, metadata={"help": "Rows per optimizer step."})
    sft_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of continued SFT."})
    dpo_learning_rate: float = field(default=3e-5, metadata={"help": "Learning rate of SAPO-DPO."})
    orpo_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of SAPO-ORPO."})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO's beta."})
    orpo_beta: float = field(default=0.5, metadata={"help": "ORPO's lambda."})
    segment_length: int = field(
        default=4, metadata={"help": "Characters of each gold answer the EMA model rewrites."}
    )
    ref_model_sync_steps: int = field(default=60, metadata={"help": "SAPO-DPO reference refresh interval."})
    eval_every: int = field(default=100, metadata={"help": "Validation scoring interval (curve points)."})
    validation_rows: int = field(default=500, metadata={"help": "Rows scored for the curves."})
    test_rows: int = field(default=1000, metadata={"help": "Rows scored for the final table."})
    seed: int = field(default=0, metadata={"help": "Seed of training and evaluation."})

    def __post_init__(self):
        for name in (
            "steps", "batch_size", "sft_learning_rate", "dpo_learning_rate", "orpo_learning_rate",
            "dpo_beta", "orpo_beta", "segment_length", "ref_model_sync_steps", "eval_every",
            "validation_rows", "test_rows",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")


class _QuietProgress(ProgressCallback):
    """Trainer's progress bar without the metrics line it prints at every log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _ValidationCurve(TrainerCallback):
    """Scores the policy on validation rows every ``every`` optimizer steps."""

    def __init__(self, score: Callable, every: int, start: dict[str, float]):
        self.score, self.every = score, every
        self.points: list[tuple[int, dict[str, float]]] = [(0, start)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points.append((state.global_step, self.score(model)))


def prepare_demo(argv: Sequence[str]) -> Callable[[], None]:
    """Check the settings, the warm start and the task data; the returned callable runs the demo."""
    started = time.perf_counter()
    (args,) = ArgumentParser((DemoArguments,), "sapo demo").parse(argv)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir: {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(
            f"output_dir: {output} is not empty; pass --overwrite to replace it, or choose another folder"
        )
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path)
    tokenizer = load_tokenizer(model_args)
    warm_start = load_model(model_args, tokenizer, seed=args.seed)

    def rows(split: str, count: int):
        dataset = load_rows(DataArguments(dataset_name=f"builtin:{args.task}", dataset_split=split))
        return dataset.select(range(min(count, len(dataset))))

    # the warm start learned its own SFT split by heart; every method trains on unseen prompts
    train = rows("preference", args.steps * args.batch_size)
    tokenized = {
        split: prepare_dataset(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
        for split, dataset in (
            ("train", train),
            ("validation", rows("validation", args.validation_rows)),
            ("test", rows("test", args.test_rows)),
        )
    }
    configs = _configs(args)

    def run() -> None:
        # an 80k-parameter model gains nothing from more CPU threads, and they stall on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_demo(args, configs, tokenizer, warm_start, train, tokenized, started)
        finally:
            torch.set_num_threads(threads)

    return run


def run_demo(
    args: DemoArguments, configs: dict, tokenizer, warm_start, train, tokenized, started: float
) -> dict:
    """Train and score every method; write the report, the curves, the results and the models."""
    output = Path(args.output_dir)
    pairs = {split: list(zip(rows[PROMPT_IDS], rows[GOLD_IDS])) for split, rows in tokenized.items()}

    def score(model, split: str, progress: bool = False) -> dict[str, float]:
        return held_out_scores(
            model, pairs[split], tokenizer.pad_token_id, eos_token_ids(model, tokenizer), args.segment_length,
            with_accuracy=True, seed=args.seed, batch_size=256, progress=progress,
        )  # fmt: skip

    parameters = sum(p.numel() for p in warm_start.parameters())
    print(
        f"sapo demo: builtin:{args.task}, {args.model_name_or_path} ({parameters / 1e3:.0f}k parameters); "
        f"{args.steps} steps of {args.batch_size} rows per method: {', '.join(METHODS)}"
    )
    print("Scoring the warm start ...")
    before = score(warm_start, "test", progress=True)
    start_point = score(warm_start, "validation")
    curves, after = {}, {}
    for method in METHODS:
        print(f"Training {method} ...")
        curve = _ValidationCurve(lambda model: score(model, "validation"), args.eval_every, start_point)
        model = copy.deepcopy(warm_start)
        trainer = _trainer(method, configs[method], model, tokenizer, train, tokenized["train"], curve)
        trainer.train()
        trainer.save_model()
        after[method] = score(trainer.model, "test", progress=True)
        losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        curves[method] = {
            "loss": losses,
            "accuracy": [(step, values["accuracy"]) for step, values in curve.points],
            "margin": [(step, values["margin"]) for step, values in curve.points],
        }

    results = {"SFT warm start": before, **{f"+ {method}": values for method, values in after.items()}}
    table = results_table(results, TABLE_METRICS, f"builtin:{args.task} test ({len(pairs['test'])} rows)")
    minutes = (time.perf_counter() - started) / 60
    print()
    print(table)
    plot_curves(
        curves,
        [("loss", "training loss (each method's own)"), ("margin", "held-out margin: gold vs own segment"),
         ("accuracy", "held-out exact match")],
        str(output / "curves.png"),
        f"{args.model_name_or_path} on builtin:{args.task}: {args.steps} steps from the same SFT warm start",
    )  # fmt: skip
    report = _report(args, table, before["accuracy"], len(pairs["test"]), parameters, minutes)
    (output / "report.md").write_text(report)
    record = {"settings": asdict(args), "test": results, "curves": curves, "minutes": round(minutes, 2)}
    (output / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nWrote {output / 'report.md'}, {output / 'curves.png'}, {output / 'results.json'} and models/ "
          f"({minutes:.1f} min)")  # fmt: skip
    return record


def _configs(args: DemoArguments) -> dict:
    """The training config of each method (built while preparing, so bad settings fail early)."""
    from trl import SFTConfig

    from sapo.config import SAPOConfig

    def common(method: str, learning_rate: float) -> dict:
        output_dir = str(Path(args.output_dir) / "models" / method.lower())
        return tiny_run_args(
            output_dir,
            args.steps,
            args.batch_size,
            learning_rate,
            args.seed,
            use_cpu=False,
            disable_tqdm=False,
        )

    configs = {"SFT": SFTConfig(max_length=MAX_LENGTH, **common("SFT", args.sft_learning_rate))}
    for method, loss_type, beta, learning_rate in (
        ("SAPO-DPO", "dpo", args.dpo_beta, args.dpo_learning_rate),
        ("SAPO-ORPO", "orpo", args.orpo_beta, args.orpo_learning_rate),
    ):
        configs[method] = SAPOConfig(
            loss_type=loss_type,
            beta=beta,
            segment_length=args.segment_length,
            ref_model_sync_steps=args.ref_model_sync_steps,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            overwrite_output_dir=args.overwrite,  # models/ of an earlier demo: refused without --overwrite
            **common(method, learning_rate),
        )
    return configs


def _trainer(method: str, config, model, tokenizer, train, train_ids, curve):
    if method == "SFT":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    else:
        from sapo.trainer import SAPOTrainer

        trainer = SAPOTrainer(model=model, args=config, train_dataset=train_ids, processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgress())
    trainer.add_callback(curve)
    return trainer


def _report(
    args: DemoArguments, table: str, start_accuracy: float, rows: int, parameters: int, minutes: float
) -> str:
    settings = settings_table(asdict(args))
    noise = 2 * math.sqrt(start_accuracy * (1 - start_accuracy) / rows)
    return f"""# sapo demo: SFT vs SAPO-DPO vs SAPO-ORPO on builtin:{args.task}

Self-Augmented Preference Optimization (arXiv 2405.20830) makes its own rejected answers: the EMA
of the policy rewrites a segment of `{args.segment_length}` tokens of each gold answer, and the
policy learns to prefer the gold answer over that rewrite.

Task: `builtin:{args.task}`, {get_task(args.task).description}. All three methods start from the
same SFT warm start, `{args.model_name_or_path}`
({parameters / 1e3:.0f}k parameters), and train for {args.steps} optimizer steps of {args.batch_size}
rows each on the same training rows. Scores are on the test split of `builtin:{args.task}`:

- **exact match**: greedy answers equal to the gold answer (end of answer included);
- **margin**: mean `log p(gold) - log p(own rewrite)`, the rewrite sampled by the scored model;
- **win rate**: share of rows where the gold answer is the more likely one;
- **gold log-prob**: mean summed log-probability of the gold answer.

{table}

One seed: exact-match differences below about {noise:.3f} (two standard errors over {rows} rows) are
within sampling noise.

![curves](curves.png)

`curves.png`: each method's training loss (not comparable across methods: SFT is a token
cross-entropy, SAPO-DPO a sigmoid preference loss, SAPO-ORPO cross-entropy plus λ times the
odds-ratio term), and the validation margin and exact match every {args.eval_every} steps.

The models are in `models/`; score one again with

    sapo eval --model_name_or_path {Path(args.output_dir) / "models" / "sapo-dpo"} \\
        --dataset_name builtin:{args.task} --segment_length {args.segment_length}

Wall time: {minutes:.1f} minutes.

## Settings

{settings}
"""
