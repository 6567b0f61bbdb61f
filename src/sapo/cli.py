"""The ``sapo`` command.

    sapo train --config recipes/llama-3-8b/sapo-dpo.yaml [--field value ...]
    sapo sft   --config recipes/llama-3-8b/sft.yaml [--field value ...]
    sapo spin  --model_name_or_path MODEL --dataset_name DATA [--field value ...]
    sapo eval  --model_name_or_path MODEL --dataset_name DATA [--field value ...]
    sapo demo  [--output_dir sapo-demo] [--overwrite]

Each command runs in two phases. ``prepare`` checks all of the input (arguments, model, data,
tokenization) and writes nothing; its output is held back until it succeeds. Then the returned
``run`` does the work. Bad input ends the command in ``prepare`` with exit status 2 and a single
line ``error: ...`` on stderr; ``--debug`` shows the traceback and the held-back output instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .arguments import (
    ArgumentParser,
    DataArguments,
    EvalArguments,
    ModelArguments,
    check_training_arguments,
    closest,
)

USAGE = """usage: sapo <command> [--config FILE.yaml] [--field value ...] [--debug]

Self-Augmented Preference Optimization (arXiv 2405.20830).

commands:
  train   SAPO training (SAPO-DPO or SAPO-ORPO) on SFT data
  sft     supervised fine-tuning, e.g. the warm start for SAPO-DPO
  spin    the SPIN baseline: each iteration trains on gold vs the model's own full answers
  eval    gold log-prob, gold-vs-own-segment margin, win rate (and exact match on built-in tasks)
  demo    offline demo on a built-in task: SFT vs SAPO-DPO vs SAPO-ORPO, in minutes on a CPU

`sapo <command> --help` lists a command's fields. Built-in names work offline:
models builtin:tiny, builtin:small, builtin:tiny-multiplication-sft,
builtin:tiny-long-multiplication-sft; datasets builtin:addition, builtin:multiplication,
builtin:long-multiplication (splits train, preference, validation, test)."""

# bad input surfaces as one of these while a command prepares
INPUT_ERRORS = (ValueError, TypeError, KeyError, OSError)


def prepare_train(argv: Sequence[str]) -> Callable[[], None]:
    from . import checkpoint
    from .config import SAPOConfig
    from .data import prepare_dataset
    from .loading import load_model, load_rows, load_tokenizer, lora_config
    from .trainer import SAPOTrainer

    config, model_args, data_args = ArgumentParser(
        (SAPOConfig, ModelArguments, DataArguments), "sapo train"
    ).parse(argv)
    check_training_arguments(config)
    checkpoint.resolve(config.output_dir, config.resume_from_checkpoint)  # a folder, or "last"
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    with _naming(data_args.dataset_name):
        rows = prepare_dataset(
            rows, tokenizer, config.max_length, config.max_prompt_length, config.dataset_num_proc
        )
    model = load_model(model_args, tokenizer, seed=config.seed)
    return _training_job(SAPOTrainer, model, config, rows, tokenizer, lora_config(model_args))


def prepare_sft(argv: Sequence[str]) -> Callable[[], None]:
    from transformers.utils import is_torch_bf16_gpu_available
    from trl import SFTConfig, SFTTrainer

    from .loading import check_rows, load_model, load_rows, load_tokenizer, lora_config

    # SFTConfig turns bf16 on, which fails on a machine without a bf16 GPU unless asked for
    parser = ArgumentParser(
        (SFTConfig, ModelArguments, DataArguments), "sapo sft", bf16=is_torch_bf16_gpu_available()
    )
    config, model_args, data_args = parser.parse(argv)
    check_training_arguments(config)
    _check_checkpoint(config.resume_from_checkpoint)
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    check_rows(rows, data_args.dataset_name)
    model = load_model(model_args, tokenizer, seed=config.seed)
    return _training_job(SFTTrainer, model, config, rows, tokenizer, lora_config(model_args))


def prepare_spin(argv: Sequence[str]) -> Callable[[], None]:
    from .data import prepare_dataset
    from .loading import load_model, load_rows, load_tokenizer
    from .spin import SPINConfig, run_spin

    parser = ArgumentParser((SPINConfig, ModelArguments, DataArguments), "sapo spin")
    config, model_args, data_args = parser.parse(argv)
    check_training_arguments(config)
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    with _naming(data_args.dataset_name):  # run_spin tokenizes again; this only checks the rows
        prepare_dataset(rows, tokenizer, config.max_length, config.max_prompt_length)
    model = load_model(model_args, tokenizer, seed=config.seed)

    def run() -> None:
        run_spin(model, config, rows, processing_class=tokenizer)
        print(f"saved each iteration's model under {config.output_dir}/iteration-*")

    return run


def prepare_eval(argv: Sequence[str]) -> Callable[[], None]:
    import torch

    from .data import GOLD_IDS, PROMPT_IDS, prepare_dataset
    from .evaluation import evaluate
    from .loading import builtin_name, load_model, load_rows, load_tokenizer
    from .report import results_table

    parser = ArgumentParser((EvalArguments, ModelArguments, DataArguments), "sapo eval", dataset_split="test")
    eval_args, model_args, data_args = parser.parse(argv)
    output = Path(eval_args.output_file)
    if not output.parent.is_dir():
        raise ValueError(f"output_file: no such folder: {output.parent}")
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    if eval_args.max_rows is not None:
        rows = rows.select(range(min(eval_args.max_rows, len(rows))))
    with _naming(data_args.dataset_name):
        rows = prepare_dataset(rows, tokenizer, eval_args.max_length, eval_args.max_prompt_length)
    model = load_model(model_args, tokenizer, seed=eval_args.seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    pairs = list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))
    with_accuracy = builtin_name(data_args.dataset_name) is not None

    def run() -> None:
        results = evaluate(
            model,
            pairs,
            tokenizer.pad_token_id,
            [tokenizer.eos_token_id],
            eval_args.segment_length,
            with_accuracy=with_accuracy,
            seed=eval_args.seed,
            batch_size=eval_args.batch_size,
            progress=True,
            temperature=eval_args.temperature,
            top_p=eval_args.top_p,
            top_k=eval_args.top_k,
        )
        metrics = ["gold_logp", "margin", "win_rate"] + (["accuracy"] if with_accuracy else [])
        print(results_table({model_args.model_name_or_path: results}, metrics, "model"))
        record = {
            "model": model_args.model_name_or_path,
            "dataset": data_args.dataset_name,
            "split": data_args.dataset_split,
            "rows": len(pairs),
            "segment_length": eval_args.segment_length,
            "seed": eval_args.seed,
            **results,
        }
        output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {output}")

    return run


def prepare_demo(argv: Sequence[str]) -> Callable[[], None]:
    from .demo import prepare_demo as prepare

    return prepare(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], Callable[[], None]]] = {
    "train": prepare_train,
    "sft": prepare_sft,
    "spin": prepare_spin,
    "eval": prepare_eval,
    "demo": prepare_demo,
}


def _name_the_cpu_for_deepspeed() -> None:
    """DeepSpeed, when installed, prints to stdout that it fell back to the CPU whenever accelerate
    imports it; on a machine with no accelerator, name the CPU up front so that nothing lands
    among the command's output (tables, JSON)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not available:
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sapo`` console script; returns the exit status."""
    _name_the_cpu_for_deepspeed()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}{closest(command, list(COMMANDS))}", file=sys.stderr)
        return 2
    held_back = io.StringIO()
    try:
        with _holding_stderr(held_back):
            run = COMMANDS[command](rest)
    except INPUT_ERRORS as error:
        if debug:
            sys.stderr.write(held_back.getvalue())
            raise
        message = " ".join(str(error).split()) if not isinstance(error, KeyError) else f"missing key {error}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    sys.stderr.write(held_back.getvalue())
    run()
    return 0


@contextlib.contextmanager
def _holding_stderr(buffer: io.StringIO) -> Iterator[None]:
    """Collect everything written to stderr (Python writes and file descriptor 2) into ``buffer``.

    Libraries print progress bars and warnings while a command prepares; on bad input the user
    should see the one ``error:`` line only.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        try:
            saved_fd = os.dup(2)
        except OSError:  # no file descriptor 2 (embedded interpreters): hold Python writes only
            saved_fd = None
        if saved_fd is not None:
            os.dup2(captured.fileno(), 2)
        try:
            with contextlib.redirect_stderr(buffer):
                yield
        finally:
            if saved_fd is not None:
                sys.__stderr__.flush()
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
                captured.seek(0)
                buffer.write(captured.read().decode(errors="replace"))


@contextlib.contextmanager
def _naming(dataset_name: str) -> Iterator[None]:
    """Prefix data errors (``row 3: column 'messages': ...``) with the dataset they come from."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"dataset_name: {dataset_name}: {error}") from error


def _training_job(trainer_class, model, config, rows, tokenizer, peft_config) -> Callable[[], None]:
    """Build the trainer now (so its errors count as bad input), train and save when run."""
    with _removing_new_folder(config.output_dir):
        trainer = trainer_class(
            model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
        )

    def run() -> None:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        trainer.save_model(config.output_dir)
        print(f"saved the model to {config.output_dir}")

    return run


@contextlib.contextmanager
def _removing_new_folder(path: str) -> Iterator[None]:
    """``transformers.Trainer`` creates its output folder while it is built: remove it if building fails."""
    existed = os.path.exists(path)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise


def _check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint: no such checkpoint folder: {path}")


if __name__ == "__main__":
    sys.exit(main())
