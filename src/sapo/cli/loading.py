"""Turn the names a user writes into a tokenizer, a model, a LoRA config and SFT rows.

``builtin:`` names are resolved here and work offline: the tiny Llamas and char-level tokenizer
of ``sapo.builtin.tiny``, the SFT checkpoints shipped in ``sapo/builtin/assets``, and the
tasks of ``sapo.builtin.tasks``.
Every other name takes the ordinary path: ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained``
for models (with ``model_revision`` and ``trust_remote_code``) and ``datasets.load_dataset`` for data
(a Hub id, a local file or a local folder). ``load_in_4bit``/``load_in_8bit`` quantize a model's
linear layers with bitsandbytes as it loads, built-in models included.

Failures are ``ValueError`` with one line that names the field and the file.
"""

from __future__ import annotations

import tempfile
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
        _check_builtin_model(builtin, model_args)
        tokenizer = char_tokenizer()
    else:
        _check_local_model(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **hub_options(model_args))
        except Exception as error:
            raise loading_error("tokenizer", name, error) from error
    if model_args.chat_template is not None:
        tokenizer.chat_template = _read_chat_template(model_args.chat_template)
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A built-in model (random tiny Llamas are seeded by ``seed``) or ``from_pretrained``;
    quantized as it loads when ``load_in_4bit`` or ``load_in_8bit`` asks for it."""
    name = model_args.model_name_or_path
    quantization = quantization_config(model_args)
    builtin = builtin_name(name)
    if builtin is not None:
        _check_builtin_model(builtin, model_args)
        if quantization is None:
            if builtin in BUILTIN_CHECKPOINTS:
                model = AutoModelForCausalLM.from_pretrained(checkpoint_path(builtin))
            else:
                model = tiny_llama(tokenizer, builtin, seed=seed)
            if model_args.torch_dtype not in (None, "auto"):
                model.to(getattr(torch, model_args.torch_dtype))
            return model
        if builtin in BUILTIN_CHECKPOINTS:
            return _quantized(checkpoint_path(builtin), model_args, quantization)
        with tempfile.TemporaryDirectory() as folder:  # bitsandbytes quantizes what from_pretrained loads
            tiny_llama(tokenizer, builtin, seed=seed).save_pretrained(folder)
            return _quantized(folder, model_args, quantization)
    _check_local_model(name)
    kwargs = {"dtype": model_args.torch_dtype, "attn_implementation": model_args.attn_implementation}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=quantized_device_map())
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs, **hub_options(model_args))
    except Exception as error:
        raise loading_error("model", name, error) from error


def hub_options(model_args: ModelArguments) -> dict:
    """``from_pretrained`` keywords for the model's repository: its revision and remote code."""
    options = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.model_revision is not None:
        options["revision"] = model_args.model_revision
    return options


def quantization_config(model_args: ModelArguments):
    """A ``BitsAndBytesConfig`` for ``load_in_4bit``/``load_in_8bit`` (else ``None``): NF4 (or
    ``bnb_4bit_quant_type``), computing in ``torch_dtype`` (float32 when unset or ``auto``)."""
    bits = model_args.quantized_bits
    if bits is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"load_in_{bits}bit: needs bitsandbytes (pip install 'sapo[qlora]'): {root_cause_message(error)}"
        ) from error
    from transformers import BitsAndBytesConfig

    dtype = model_args.torch_dtype
    compute_dtype = torch.float32 if dtype in (None, "auto") else getattr(torch, dtype)
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_trainable(model_args: ModelArguments, command: str, adapters: bool = True) -> None:
    """A quantized base model trains only through a LoRA adapter: refuse it without ``use_peft``,
    and in a command that trains no adapters (``adapters=False``)."""
    bits = model_args.quantized_bits
    if bits is None:
        return
    if not adapters:
        raise ValueError(f"load_in_{bits}bit: {command} trains every weight and cannot train {bits}-bit ones")
    if not model_args.use_peft:
        raise ValueError(
            f"load_in_{bits}bit: {command} cannot train {bits}-bit weights; add --use_peft to train a "
            "LoRA adapter on the quantized base (QLoRA)"
        )


def _quantized(folder, model_args: ModelArguments, quantization) -> PreTrainedModel:
    dtype = {} if model_args.torch_dtype is None else {"dtype": model_args.torch_dtype}
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map=quantized_device_map(), **dtype
    )


def quantized_device_map() -> dict | None:
    """Each process's quantized model on its own GPU, where it is quantized as it loads; on a
    machine without one, the CPU (bitsandbytes quantizes there too)."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def loading_error(part: str, name: str, error: Exception) -> ValueError:
    """One line naming ``name`` and the ``part`` (model, tokenizer, config) that failed to load;
    for a model that ships its own code, the flag that runs it."""
    message = root_cause_message(error)
    if "trust_remote_code" in message:
        return ValueError(
            f"model_name_or_path: {name!r} ships its own Python code for its {part} (auto_map in "
            "config.json); read that code, then pass --trust_remote_code to run it"
        )
    return ValueError(f"model_name_or_path: cannot load a {part} from {name!r}: {message}")


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


def _check_builtin_model(name: str, model_args: ModelArguments) -> None:
    if name not in BUILTIN_MODELS:
        choices = [BUILTIN + model for model in BUILTIN_MODELS]
        raise ValueError(
            f"model_name_or_path: unknown built-in model {BUILTIN + name!r}{closest(BUILTIN + name, choices)}"
            f" (built-in: {', '.join(choices)})"
        )
    check_revision(model_args)


def check_revision(model_args: ModelArguments) -> None:
    """A revision names a snapshot of a Hub model: refuse one for a built-in model."""
    name = model_args.model_name_or_path
    if model_args.model_revision is not None and builtin_name(name) is not None:
        raise ValueError(f"model_revision: {name} ships with sapo and has no revisions; drop model_revision")


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
