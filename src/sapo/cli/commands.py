"""What each ``sapo`` command does: ``prepare_<command>(argv)`` checks all of its input and
returns the work as a callable (see :mod:`sapo.cli`). A new command is one ``prepare`` function
and one entry in :data:`COMMANDS`."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sapo.cli.arguments import ArgumentParser, DataArguments, EvalArguments, ModelArguments
from sapo.config import check_training_arguments


def prepare_train(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.checkpoints import resolve as resolve_checkpoint
    from sapo.cli.loading import load_model, load_rows, load_tokenizer, lora_config
    from sapo.config import SAPOConfig
    from sapo.data import prepare_dataset
    from sapo.trainer import SAPOTrainer

    config, model_args, data_args = ArgumentParser(
        (SAPOConfig, ModelArguments, DataArguments), "sapo train"
    ).parse(argv)
    check_training_arguments(config)
    resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)  # a folder, or "last"
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

    from sapo.cli.loading import check_rows, load_model, load_rows, load_tokenizer, lora_config

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
    from sapo.baselines.spin import SPINConfig, run_spin
    from sapo.cli.loading import load_model, load_rows, load_tokenizer
    from sapo.data import prepare_dataset

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

    from sapo.builtin import builtin_name
    from sapo.cli.loading import load_model, load_rows, load_tokenizer
    from sapo.cli.report import results_table
    from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
    from sapo.evaluation import evaluate
    from sapo.policy import eos_token_ids

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
            eos_token_ids(model, tokenizer),
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
    from sapo.cli.demo import prepare_demo as prepare

    return prepare(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], Callable[[], None]]] = {
    "train": prepare_train,
    "sft": prepare_sft,
    "spin": prepare_spin,
    "eval": prepare_eval,
    "demo": prepare_demo,
}


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
