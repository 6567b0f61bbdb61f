"""Arguments of the ``sapo`` commands, and the parser that fills them from a YAML file and flags.

A command's arguments are dataclasses: its training config (``SAPOConfig``, TRL's ``SFTConfig``)
plus ``ModelArguments`` and ``DataArguments`` below. :class:`ArgumentParser` is TRL's
``TrlParser`` (an ``HfArgumentParser``) with the conventions of ``trl <command> --config``: keys of
the YAML file given with ``--config`` become defaults, and flags override them. On top of that:

- YAML values go through the same converters as flags, so ``learning_rate: 5e-7`` (a string to
  YAML) becomes a float and ``per_device_train_batch_size: 8.5`` is refused;
- an unknown key or flag fails naming the closest valid one;
- every failure is a ``ValueError`` whose one-line message names the field; nothing exits;
- a field two of the dataclasses share (``trust_remote_code`` of TRL's ``SFTConfig`` and of
  ``ModelArguments``) is one flag that fills both.
"""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from trl import TrlParser

from sapo.config import derived_prompt_limit


@dataclass
class ModelArguments:
    r"""
    Which model to train or evaluate, how to load it and whether to train a LoRA adapter.

    Parameters:
        model_name_or_path (`str`):
            A built-in model (`builtin:tiny`, `builtin:small` or a warm start
            `builtin:tiny-<task>-sft`; `sapo --help` lists them), a Hub id or a local folder saved
            with `save_pretrained`.
        torch_dtype (`str`, *optional*):
            Weight dtype when loading: `auto`, `bfloat16`, `float16` or `float32`.
        attn_implementation (`str`, *optional*):
            Attention kernel passed to `from_pretrained`, e.g. `sdpa` or `flash_attention_2`.
        chat_template (`str`, *optional*):
            A Jinja chat template, or the path of a file holding one, set on the tokenizer. Base
            models need one for conversational data.
        use_peft (`bool`, *optional*, defaults to `False`):
            Train a LoRA adapter instead of all weights.
        lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the LoRA branch.
        lora_target_modules (`list[str]`, *optional*):
            Module names that get adapters, or `all-linear`; PEFT's per-architecture default when
            unset.
        model_revision (`str`, *optional*):
            Branch, tag or commit of a Hub model to load (its default branch when unset); pinning
            one makes a run repeatable when the model's repository changes.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Run the Python code a model ships for its config, model or tokenizer (`auto_map` in
            its `config.json`). Off by default: read that code before turning it on.
        load_in_4bit (`bool`, *optional*, defaults to `False`):
            Load the base model's linear layers quantized to 4 bits with bitsandbytes (QLoRA; needs
            `use_peft` to train, and `pip install "sapo[qlora]"`). Computes in `torch_dtype`, or
            float32 when it is unset or `auto`.
        load_in_8bit (`bool`, *optional*, defaults to `False`):
            Load the base model's linear layers quantized to 8 bits with bitsandbytes (LLM.int8).
        bnb_4bit_quant_type (`str`, *optional*, defaults to `"nf4"`):
            4-bit data type: `nf4` (NormalFloat, QLoRA's) or `fp4`.
        use_bnb_nested_quant (`bool`, *optional*, defaults to `False`):
            Quantize the 4-bit quantization constants again (about 0.37 bits per weight saved).
    """

    model_name_or_path: str = field(
        metadata={"help": "builtin:tiny, builtin:small, builtin:tiny-<task>-sft, a Hub id or a folder."}
    )
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = field(
        default=None, metadata={"help": "Weight dtype when loading the model."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel passed to from_pretrained, e.g. sdpa or flash_attention_2."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "A Jinja chat template, or the path of a file holding one."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names that get adapters, or all-linear."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of a Hub model (default branch when unset)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the Python code a model ships (auto_map); off by default."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Quantize the base model's linear layers to 4 bits (QLoRA)."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Quantize the base model's linear layers to 8 bits."}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."}
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants again."}
    )

    def __post_init__(self):
        if self.lora_r <= 0:
            raise ValueError(f"lora_r={self.lora_r}: must be a positive rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_8bit: choose one of load_in_4bit and load_in_8bit")

    @property
    def quantized_bits(self) -> int | None:
        """4 or 8 when the base model is loaded quantized, else ``None``."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None


@dataclass
class DataArguments:
    r"""
    Which SFT rows to use.

    Parameters:
        dataset_name (`str`):
            A built-in task (`builtin:<task>`, e.g. `builtin:sorting`; `sapo --help` lists them),
            a Hub id, a local `.json`/`.jsonl`/`.parquet` file, or a local folder of such files.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split to read. A single local file is one split and ignores this. Built-in tasks have
            `train` (the shipped warm starts' SFT data), `preference` (prompts those warm starts
            never saw: train SAPO on these), `validation` and `test`.
        messages_column (`str`, *optional*):
            Read this column as `messages`, for datasets that store the conversation under another
            name (the paper trains on the `chosen` column of a preference dataset).
    """

    dataset_name: str = field(
        metadata={"help": "builtin:<task> (sapo --help lists them), a Hub id, a local data file or folder."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read; a single file ignores it."})
    messages_column: str | None = field(
        default=None, metadata={"help": "Read this column as `messages` (e.g. `chosen`)."}
    )


@dataclass
class OverwriteArguments:
    r"""
    Whether `sapo sft` may replace an earlier run in its `output_dir` (`SAPOConfig` and
    `SPINConfig` have this field; TRL's `SFTConfig` lost it when transformers 5 dropped it).

    Parameters:
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a new run in an `output_dir` that holds an earlier run's checkpoints or saved
            model, removing them first (a warning names them). Off, such a folder is refused
            unless the run resumes it (`sapo.checkpoints.ownership`).
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the checkpoints and model an earlier run left in output_dir."},
    )


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping stored in a YAML file; ``ValueError`` naming the file otherwise."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: must hold a mapping of field: value, got {type(values).__name__}")
    return values


def closest(name: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the candidate nearest to ``name``, or ``""``."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


class ArgumentParser(TrlParser):
    """``TrlParser`` that reports bad input as a one-line ``ValueError`` instead of exiting."""

    def __init__(self, dataclass_types, prog: str | None = None, **defaults: Any):
        super().__init__(dataclass_types, prog=prog, allow_abbrev=False, conflict_handler="resolve")
        if defaults:
            self.set_defaults(**defaults)
        self.hints = {}
        for dataclass_type in self.dataclass_types:
            resolved = typing.get_type_hints(dataclass_type)
            self.hints.update({f.name: resolved[f.name] for f in fields(dataclass_type) if f.init})

    def error(self, message: str):
        # "argument --max_length/--max-length: invalid int value: 'x'" becomes
        # "--max_length: invalid int value: 'x'"
        raise ValueError(re.sub(r"argument (--\w+)(?:/--[\w-]+)*:", r"\1:", message))

    def parse(self, argv: Sequence[str]) -> tuple:
        """Dataclass instances from ``[--config FILE] [--field value ...]``; flags win over the file."""
        argv = list(argv)
        if "--config" in argv:
            index = argv.index("--config")
            if index + 1 >= len(argv):
                raise ValueError("--config needs the path of a YAML file")
            path = argv[index + 1]
            del argv[index : index + 2]
            self._set_defaults_from(read_yaml(path), path)
        namespace, remaining = self.parse_known_args(args=argv)
        values = vars(namespace)  # a shared field's one value goes to every dataclass that has it
        instances = [
            kind(**{f.name: values[f.name] for f in fields(kind) if f.init and f.name in values})
            for kind in self.dataclass_types
        ]
        if remaining:
            flag = next((item for item in remaining if item.startswith("-")), remaining[0])
            flags = [option for action in self._actions for option in action.option_strings]
            raise ValueError(f"unknown argument {flag}{closest(flag, flags)}")
        return tuple(instances)

    def _set_defaults_from(self, values: dict[str, Any], source: str) -> None:
        actions: dict[str, list[argparse.Action]] = {}
        for action in self._actions:
            if action.dest in self.hints:
                actions.setdefault(action.dest, []).append(action)
        for key, value in values.items():
            if key not in actions:
                raise ValueError(f"{source}: unknown field {key!r}{closest(str(key), sorted(actions))}")
            converted = self._convert(actions[key][0], key, value)
            for action in actions[key]:
                action.default = converted
                action.required = False

    def _convert(self, action: argparse.Action, key: str, value: Any) -> Any:
        """``value`` as the flag ``--key`` would parse it; mappings and lists where the field takes them."""
        hint = self.hints[key]
        if value is None:
            return None
        if isinstance(value, dict):
            if _accepts(hint, dict):
                return value
            raise ValueError(f"{key}: expected {_describe(hint)}, got a mapping")
        if isinstance(value, list):
            if action.nargs in ("+", "*"):
                return [self._convert_scalar(action, key, item, hint) for item in value]
            if _accepts(hint, list):
                return value
            raise ValueError(f"{key}: expected {_describe(hint)}, got a list")
        return self._convert_scalar(action, key, value, hint)

    @staticmethod
    def _convert_scalar(action: argparse.Action, key: str, value: Any, hint: Any = None) -> Any:
        if action.type is None:
            return value
        try:
            converted = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            expected = _TYPE_NAMES.get(getattr(action.type, "__name__", ""), _describe(hint))
            raise ValueError(f"{key}: expected {expected}, got {value!r}") from None
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(str(choice) for choice in action.choices)
            raise ValueError(f"{key}: {value!r} is not one of {choices}")
        return converted


def _accepts(hint: Any, container: type) -> bool:
    """Whether a type hint admits ``container`` (e.g. ``dict[str, Any] | str | None`` admits ``dict``)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    return any(option is container or typing.get_origin(option) is container for option in options)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_UnionType = type(int | None)
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "string_to_bool": "true or false"}


@dataclass
class EvalArguments:
    r"""
    How `sapo eval` scores a model on a dataset.

    Parameters:
        output_file (`str`, *optional*, defaults to `"sapo-eval.json"`):
            Where the results are written as JSON.
        max_rows (`int`, *optional*):
            Score only the first this many rows.
        segment_length (`int`, *optional*, defaults to `256`):
            Tokens of each gold answer the model rewrites to make its own rejected answer.
        max_length (`int`, *optional*, defaults to `2048`):
            Most tokens of prompt plus answer; longer gold answers are cut.
        max_prompt_length (`int`, *optional*):
            Rows with longer prompts are skipped, with a warning that counts them. Unset, it follows
            `max_length` as in training: `max_length - min(segment_length, max_length // 2)`
            (1792 for 2048 and 256).
        batch_size (`int`, *optional*, defaults to `32`):
            Rows per generation and scoring batch.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the cut points and of sampling; the same seed gives two models the same cuts.
        temperature (`float`, *optional*, defaults to `0.7`), top_p (`float`, *optional*, defaults to `0.95`),
        top_k (`int`, *optional*, defaults to `50`):
            Sampling of the model's own segments, as in training.
    """

    output_file: str = field(
        default="sapo-eval.json", metadata={"help": "Where the results are written as JSON."}
    )
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first this many rows."})
    segment_length: int = field(
        default=256, metadata={"help": "Tokens of each gold answer the model rewrites."}
    )
    max_length: int | None = field(default=2048, metadata={"help": "Most tokens of prompt plus answer."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Rows with longer prompts are skipped; unset: follows max_length."},
    )
    batch_size: int = field(default=32, metadata={"help": "Rows per generation and scoring batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the cut points and of sampling."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of the model's own segments."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus threshold of the model's own segments."})
    top_k: int = field(
        default=50, metadata={"help": "Top-k filter of the model's own segments; 0 disables it."}
    )

    def __post_init__(self):
        if self.max_prompt_length is None:
            self.max_prompt_length = derived_prompt_limit(self.max_length, self.segment_length)
        for name in ("segment_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"max_rows={self.max_rows}: must be positive")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise ValueError(
                    f"max_prompt_length={self.max_prompt_length}: "
                    f"must be smaller than max_length ({self.max_length})"
                )
