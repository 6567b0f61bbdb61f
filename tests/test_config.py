"""Tests for ``sapo.config.SAPOConfig``: the paper's settings as defaults, validation and documentation."""

from __future__ import annotations

import dataclasses
import re

import pytest
from transformers import HfArgumentParser, TrainingArguments

from sapo import SAPOConfig


def make(tmp_path, **kwargs) -> SAPOConfig:
    return SAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


PAPER_DEFAULTS = {  # the settings of the paper's runs, which a user gets without setting anything
    "loss_type": "dpo",
    "beta": 0.1,
    "segment_length": 256,
    "ema_decay": 0.5,
    "ema_update_interval": 1,
    "replay_buffer_size": 2000,
    "sample_every_n_steps": 1,
    "ref_model_sync_steps": None,
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 50,
    "max_length": 2048,
    "max_prompt_length": 1792,
}


def test_is_a_training_arguments_subclass(tmp_path):
    assert issubclass(SAPOConfig, TrainingArguments)
    config = make(tmp_path)
    assert isinstance(config, TrainingArguments)
    assert config.output_dir == str(tmp_path)


@pytest.mark.parametrize("name, value", sorted(PAPER_DEFAULTS.items()))
def test_defaults_are_the_papers_settings(tmp_path, name, value):
    config = make(tmp_path)
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is type(value)
    # The dataclass default itself, not just a value patched in afterwards; max_prompt_length alone
    # is derived from max_length and segment_length when unset, 2048 - 256 by default.
    expected_default = None if name == "max_prompt_length" else value
    assert {f.name: f.default for f in dataclasses.fields(SAPOConfig)}[name] == expected_default


def test_every_sapo_field_set_at_once_is_accepted(tmp_path):
    config = make(
        tmp_path,
        loss_type="orpo",
        beta=0.05,
        segment_length=16,
        ema_decay=0.9,
        ema_update_interval=2,
        replay_buffer_size=8,
        per_device_train_batch_size=8,
        sample_every_n_steps=3,
        ref_model_sync_steps=5,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_length=64,
        max_prompt_length=32,
        learning_rate=5e-7,
    )
    assert (config.loss_type, config.beta, config.segment_length) == ("orpo", 0.05, 16)
    assert (config.ema_decay, config.ema_update_interval, config.replay_buffer_size) == (0.9, 2, 8)
    assert (config.sample_every_n_steps, config.ref_model_sync_steps) == (3, 5)
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0)
    assert (config.max_length, config.max_prompt_length, config.learning_rate) == (64, 32, 5e-7)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("segment_length", {"segment_length": 0}),
        ("segment_length", {"segment_length": -1}),
        ("ema_decay", {"ema_decay": -0.1}),
        ("ema_decay", {"ema_decay": 1.0}),
        ("ema_decay", {"ema_decay": 1.5}),
        ("replay_buffer_size", {"replay_buffer_size": 3, "per_device_train_batch_size": 4}),
        ("replay_buffer_size", {"replay_buffer_size": 0}),
        ("loss_type", {"loss_type": "ipo"}),
        ("loss_type", {"loss_type": "DPO-typo"}),
        ("max_prompt_length", {"max_length": 128, "max_prompt_length": 128}),
        ("max_prompt_length", {"max_length": 128, "max_prompt_length": 200}),
        ("max_prompt_length", {"max_prompt_length": 2048}),  # equal to the default max_length
        ("sample_every_n_steps", {"sample_every_n_steps": 0}),
        ("sample_every_n_steps", {"sample_every_n_steps": -2}),
        ("ema_update_interval", {"ema_update_interval": 0}),
        ("ema_update_interval", {"ema_update_interval": -1}),
        ("ref_model_sync_steps", {"ref_model_sync_steps": 0}),
        ("ref_model_sync_steps", {"ref_model_sync_steps": -5}),
        ("temperature", {"temperature": 0.0}),
        ("temperature", {"temperature": -0.7}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": -0.5}),
        ("top_p", {"top_p": 1.01}),
        ("beta", {"beta": 0.0}),
        ("beta", {"beta": -0.1}),
        ("generation_num_threads", {"generation_num_threads": 0}),
    ],
)
def test_invalid_value_raises_naming_the_field(tmp_path, field, kwargs):
    with pytest.raises(ValueError, match=rf"\b{re.escape(field)}\b"):
        make(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ema_decay": 0.0},
        {"ema_decay": 0.999},
        {"top_p": 1.0},
        {"replay_buffer_size": 4, "per_device_train_batch_size": 4},
        {"ref_model_sync_steps": 1},
        {"segment_length": 1},
        {"sample_every_n_steps": 1, "ema_update_interval": 1},
        {"max_length": 128, "max_prompt_length": 127},
        {"temperature": 1e-3, "beta": 1e-3},
        {"generation_num_threads": 1},
    ],
)
def test_boundary_values_are_accepted(tmp_path, kwargs):
    config = make(tmp_path, **kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


def sapo_fields() -> list[dataclasses.Field]:
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(SAPOConfig) if f.name not in base]


def test_sapo_fields_include_the_papers_settings():
    names = {f.name for f in sapo_fields()}
    assert set(PAPER_DEFAULTS) <= names


@pytest.mark.parametrize("field", sapo_fields(), ids=lambda f: f.name)
def test_every_sapo_field_is_documented(field):
    docstring = SAPOConfig.__doc__ or ""
    assert re.search(rf"^\s*{re.escape(field.name)} \(", docstring, flags=re.MULTILINE), (
        f"{field.name} has no `{field.name} (` entry in the SAPOConfig docstring"
    )
    help_text = field.metadata.get("help", "")
    assert isinstance(help_text, str) and help_text.strip(), f"{field.name} has no metadata help"


def test_command_line_numbers_are_parsed_to_numbers(tmp_path):
    # The official code kept CLI numbers as strings; HfArgumentParser must give real types.
    (config,) = HfArgumentParser(SAPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--report_to",
            "none",
            "--beta",
            "0.2",
            "--segment_length",
            "16",
            "--ema_decay",
            "0.75",
            "--ref_model_sync_steps",
            "7",
            "--top_p",
            "0.9",
        ]
    )
    assert config.beta == 0.2 and isinstance(config.beta, float)
    assert config.segment_length == 16 and isinstance(config.segment_length, int)
    assert config.ema_decay == 0.75 and isinstance(config.ema_decay, float)
    assert config.ref_model_sync_steps == 7 and isinstance(config.ref_model_sync_steps, int)
    assert config.top_p == 0.9


def test_command_line_invalid_value_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\bsegment_length\b"):
        HfArgumentParser(SAPOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--segment_length", "0"]
        )
