"""Turn the names a user writes into a tokenizer, a model, a LoRA config and SFT rows.

``builtin:`` names are resolved here and work offline: the tiny Llamas and char-level tokenizer
of ``sapo.builtin.tiny``, the SFT checkpoints shipped in ``sapo/builtin/assets``, and the
tasks of ``sapo.builtin.tasks``.
Every other name takes the ordinary path: ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained``
for models and ``datasets.load_dataset`` for data (a Hub id, a local file or a local folder).

Failures are ``ValueError`` with one line that names the field and the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sapo.builtin import BUILTIN, BUILTIN_CHECKPOINTS, BUILTIN_MODELS, builtin_name, checkpoint_path
from sapo.builtin.tasks import TASKS, task_dataset
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.cli.arguments import DataArguments, ModelArguments, closest
from sapo.data import split_row

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def root_cause_message(error: BaseException) -> str:
    """The innermost cause's message, on one line (library errors often wrap the useful one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split()) or type(error).__name__


def load_tokenizer(model_args: ModelArguments):
    """The built-in char tokenizer, or the model's own; with ``chat_template`` applied."""
    name = model_args.model_name_or_path
    builtin = builtin_name(name)
    if builtin is not None:
        _check_builtin_model(builtin)
        tokenizer = char_tokenizer()
    else:
        _check_local_model(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as error:
            raise ValueError(
                f"model_name_or_path: cannot load a tokenizer from {name!r}: {root_cause_message(error)}"
            ) from error
    if model_args.chat_template is not None:
        tokenizer.chat_template = _read_chat_template(model_args.chat_template)
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A built-in model (random tiny Llamas are seeded by ``seed``) or ``from_pretrained``."""
    name = model_args.model_name_or_path
    builtin = builtin_name(name)
    if builtin is not None:
        _check_builtin_model(builtin)
        if builtin in BUILTIN_CHECKPOINTS:
            model = AutoModelForCausalLM.from_pretrained(checkpoint_path(builtin))
        else:
            model = tiny_llama(tokenizer, builtin, seed=seed)
        if model_args.torch_dtype not in (None, "auto"):
            model.to(getattr(torch, model_args.torch_dtype))
        return model
    _check_local_model(name)
    kwargs = {"dtype": model_args.torch_dtype, "attn_implementation": model_args.attn_implementation}
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, **{k: v for k, v in kwargs.items() if v is not None}
        )
    except Exception as error:
        raise ValueError(
            f"model_name_or_path: cannot load a model from {name!r}: {root_cause_message(error)}"
        ) from error


def lora_config(model_args: ModelArguments):
    """A PEFT ``LoraConfig`` when ``use_peft`` is set, else ``None``."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    modules = model_args.lora_target_modules
    if modules == ["all-linear"]:  # PEFT takes this keyword as a string, a list would name a module
        modules = "all-linear"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=modules,
    )


def load_rows(data_args: DataArguments) -> Dataset:
    """One split of SFT rows, with ``messages_column`` renamed to ``messages``; not yet validated."""
    name = data_args.dataset_name
    builtin = builtin_name(name)
    if builtin is not None:
        if builtin not in TASKS:
            choices = [BUILTIN + task for task in TASKS]
            raise ValueError(
                f"dataset_name: unknown built-in dataset {name!r}{closest(name, choices)}"
                f" (built-in: {', '.join(choices)})"
            )
        try:
            dataset = task_dataset(builtin, data_args.dataset_split)
        except ValueError as error:
            raise ValueError(f"dataset_split: {error}") from error
    else:
        dataset = _load_external(name, data_args.dataset_split)
    column = data_args.messages_column
    if column is not None:
        if column not in dataset.column_names:
            raise ValueError(
                f"messages_column: {name} has no column {column!r}{closest(column, dataset.column_names)}"
                f" (columns: {', '.join(dataset.column_names)})"
            )
        dataset = dataset.select_columns([column])
        if column != "messages":
            dataset = dataset.rename_column(column, "messages")
    return dataset


def check_rows(dataset: Dataset, name: str) -> None:
    """Fail on an empty dataset or the first malformed row, naming the row and column."""
    if len(dataset) == 0:
        raise ValueError(f"dataset_name: {name} has no rows")
    try:
        for index, row in enumerate(dataset):
            split_row(row, index)
    except ValueError as error:
        raise ValueError(f"dataset_name: {name}: {error}") from error


def _load_external(name: str, split: str) -> Dataset:
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    local = suffix in DATA_FILE_BUILDERS or path.exists() or name.startswith((".", "/", "~"))
    if local and not path.exists():
        raise ValueError(f"dataset_name: no such file or folder: {name}")
    if local and path.is_file() and suffix not in DATA_FILE_BUILDERS:
        raise ValueError(f"dataset_name: {name}: expected a {', '.join(DATA_FILE_BUILDERS)} file or a folder")
    try:
        if not local:
            return load_dataset(name, split=split)
        if path.is_dir():
            return load_dataset(str(path), split=split)
        return load_dataset(DATA_FILE_BUILDERS[suffix], data_files=str(path), split="train")
    except Exception as error:
        raise ValueError(f"dataset_name: cannot load {name!r}: {root_cause_message(error)}") from error


def _check_builtin_model(name: str) -> None:
    if name not in BUILTIN_MODELS:
        choices = [BUILTIN + model for model in BUILTIN_MODELS]
        raise ValueError(
            f"model_name_or_path: unknown built-in model {BUILTIN + name!r}{closest(BUILTIN + name, choices)}"
            f" (built-in: {', '.join(choices)})"
        )


def _check_local_model(name: str) -> None:
    # a path that does not exist would otherwise be sent to the Hub as a (malformed) repository id
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ValueError(f"model_name_or_path: no such folder: {name}")


def _read_chat_template(value: str) -> str:
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template: neither a Jinja template nor an existing file: {value}")
    return path.read_text()
