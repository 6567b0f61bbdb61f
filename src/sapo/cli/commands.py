"""What each ``sapo`` command does: ``prepare_<command>(argv)`` checks all of its input and
returns the work as a callable (see :mod:`sapo.cli`). A new command is one ``prepare`` function
and one entry in :data:`COMMANDS`."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from sapo.cli.arguments import ArgumentParser, DataArguments, ModelArguments, OverwriteArguments
from sapo.cli.evaluate import EvalDataArguments, load_eval_rows, prepare_eval
from sapo.cli.generate import prepare_generate
from sapo.cli.plan import PlanningArguments, prepare_plan
from sapo.config import check_training_arguments


def prepare_train(argv: Sequence[str]) -> Callable[[], int]:
    from sapo.checkpoints import check_output_dir
    from sapo.checkpoints import resolve as resolve_checkpoint
    from sapo.cli.loading import check_trainable, load_model, load_rows, load_tokenizer, lora_config
    from sapo.data import prepare_dataset
    from sapo.trainer import SAPOTrainer

    parser = ArgumentParser(train_arguments(), "sapo train")
    config, model_args, data_args, eval_data_args, _ = parser.parse(argv)  # _: PlanningArguments
    check_training_arguments(config)
    check_trainable(model_args, "sapo train")
    check_output_dir(
        config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir,
        main_process=config.process_index == 0,
    )  # fmt: skip
    # a quick check here (file sizes): the trainer's main process reads and verifies every file
    resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, config.world_size, checksums=False)
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    with _naming(data_args.dataset_name):
        rows = prepare_dataset(
            rows, tokenizer, config.max_length, config.max_prompt_length, config.dataset_num_proc
        )
    eval_rows = load_eval_rows(eval_data_args, data_args, tokenizer, config)
    model = load_model(model_args, tokenizer, seed=config.seed)
    names = {"base_model": model_args.model_name_or_path, "dataset_name": data_args.dataset_name}
    peft_config = lora_config(model_args)
    return _training_job(
        SAPOTrainer, model, config, rows, tokenizer, peft_config, eval_rows, names,
        overwrite=config.overwrite_output_dir,
    )  # fmt: skip


def train_arguments() -> tuple[type, ...]:
    """The dataclasses a `sapo train` recipe fills; `sapo plan` reads recipes with them too
    (:class:`PlanningArguments`, the hardware the recipe targets, is read by `sapo plan` only)."""
    from sapo.config import SAPOConfig

    return SAPOConfig, ModelArguments, DataArguments, EvalDataArguments, PlanningArguments


def prepare_sft(argv: Sequence[str]) -> Callable[[], int]:
    from transformers.utils import is_torch_bf16_gpu_available
    from trl import SFTConfig, SFTTrainer

    from sapo.checkpoints import check_output_dir
    from sapo.cli.loading import (
        check_rows,
        check_trainable,
        load_model,
        load_rows,
        load_tokenizer,
        lora_config,
    )

    # SFTConfig turns bf16 on, which fails on a machine without a bf16 GPU unless asked for
    parser = ArgumentParser(
        (SFTConfig, ModelArguments, DataArguments, OverwriteArguments),
        "sapo sft",
        bf16=is_torch_bf16_gpu_available(),
    )
    config, model_args, data_args, overwrite_args = parser.parse(argv)
    check_training_arguments(config)
    check_trainable(model_args, "sapo sft")
    config.resume_from_checkpoint = _sft_checkpoint(config.output_dir, config.resume_from_checkpoint)
    check_output_dir(
        config.output_dir, config.resume_from_checkpoint, overwrite_args.overwrite_output_dir,
        main_process=config.process_index == 0,
    )  # fmt: skip
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    check_rows(rows, data_args.dataset_name)
    model = load_model(model_args, tokenizer, seed=config.seed)
    return _training_job(
        SFTTrainer, model, config, rows, tokenizer, lora_config(model_args),
        overwrite=overwrite_args.overwrite_output_dir,
    )  # fmt: skip


def prepare_spin(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.baselines.spin import SPINConfig, run_spin
    from sapo.checkpoints import check_output_dir
    from sapo.cli.loading import check_trainable, load_model, load_rows, load_tokenizer
    from sapo.data import prepare_dataset

    parser = ArgumentParser((SPINConfig, ModelArguments, DataArguments), "sapo spin")
    config, model_args, data_args = parser.parse(argv)
    check_training_arguments(config)
    check_trainable(model_args, "sapo spin", adapters=False)
    check_output_dir(
        config.output_dir, None, config.overwrite_output_dir, can_resume=False,
        main_process=config.process_index == 0,
    )  # fmt: skip
    tokenizer = load_tokenizer(model_args)
    rows = load_rows(data_args)
    with _naming(data_args.dataset_name):  # run_spin tokenizes again; this only checks the rows
        prepare_dataset(rows, tokenizer, config.max_length, config.max_prompt_length)
    model = load_model(model_args, tokenizer, seed=config.seed)

    def run() -> None:
        names = {"base_model": model_args.model_name_or_path, "dataset_name": data_args.dataset_name}
        run_spin(model, config, rows, processing_class=tokenizer, card_names=names)
        print(f"saved each iteration's model under {config.output_dir}/iteration-*")

    return run


def prepare_demo(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.cli.demo import prepare_demo as prepare

    return prepare(argv)


# each returns the work: a callable whose result (None: 0) is the exit status
COMMANDS: dict[str, Callable[[Sequence[str]], Callable[[], int | None]]] = {
    "train": prepare_train,
    "sft": prepare_sft,
    "spin": prepare_spin,
    "eval": prepare_eval,
    "generate": prepare_generate,
    "demo": prepare_demo,
    "plan": functools.partial(prepare_plan, recipe_arguments=train_arguments),
}


@contextlib.contextmanager
def _naming(dataset_name: str) -> Iterator[None]:
    """Prefix data errors (``row 3: column 'messages': ...``) with the dataset they come from."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"dataset_name: {dataset_name}: {error}") from error


def _training_job(
    trainer_class,
    model,
    config,
    rows,
    tokenizer,
    peft_config,
    eval_rows=None,
    card_names=None,
    *,
    overwrite: bool = False,
) -> Callable[[], int]:
    """Build the trainer now (so its errors count as bad input), train and save when run;
    ``card_names`` (the model and data as the command named them) go into the model card.

    The run owns ``output_dir`` from before training to after the final save, ``overwrite``
    replacing an earlier run's work there (:mod:`sapo.checkpoints.ownership`).

    SIGTERM or SIGINT during training writes a checkpoint after the current step and ends the run
    with 143 or 130 instead of saving the model (:mod:`sapo.checkpoints.preemption`)."""
    from sapo.checkpoints import owning_output_dir, stop_on_signals, writing

    with _removing_new_folder(config.output_dir):
        trainer = trainer_class(
            model=model, args=config, train_dataset=rows, eval_dataset=eval_rows,
            processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip

    def run() -> int:
        owning = owning_output_dir(config, config.resume_from_checkpoint, overwrite)
        with owning, stop_on_signals(trainer) as stop:
            trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
            if stop.stopped_at is None:
                with writing("the model", config.output_dir):
                    trainer.save_model(config.output_dir)
                    trainer.save_state()  # trainer_state.json: the logged metrics beside the model
                    if card_names is not None:  # a push goes again with the names, as TRL's scripts do
                        write_card = trainer.push_to_hub if config.push_to_hub else trainer.create_model_card
                        write_card(**card_names)
        if stop.stopped_at is not None:
            print(stop.describe(config.output_dir), file=sys.stderr)
            return stop.exit_code
        print(f"saved the model to {config.output_dir}")
        return 0

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


def _sft_checkpoint(output_dir: str, requested: str | None) -> str | None:
    """The checkpoint `sapo sft` resumes: a folder, or for ``last`` the newest ``checkpoint-N``
    of ``output_dir``."""
    if requested == "last":
        from transformers.trainer_utils import get_last_checkpoint

        newest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if newest is None:
            raise ValueError(f"resume_from_checkpoint: no checkpoint in {output_dir}")
        return newest
    if requested is not None and not os.path.isdir(requested):
        raise ValueError(f"resume_from_checkpoint: no such checkpoint folder: {requested}")
    return requested
