"""The YAML-and-flags parser: typed values, flags over YAML, and one-line errors naming the field."""

import pytest
import yaml

from sapo import SAPOConfig
from sapo.cli.arguments import ArgumentParser, DataArguments, EvalArguments, ModelArguments, read_yaml


def parse(tmp_path, values=None, flags=()):
    argv = list(flags)
    if values is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(values))
        argv = ["--config", str(path), *argv]
    return ArgumentParser((SAPOConfig, ModelArguments, DataArguments), "sapo train").parse(argv)


BASE = {"model_name_or_path": "builtin:tiny", "dataset_name": "builtin:addition", "output_dir": "out"}


def test_yaml_numbers_and_booleans_get_their_types(tmp_path):
    path = tmp_path / "recipe.yaml"
    # written by hand: YAML reads 5e-7 (no dot) as a string, the classic crash of the paper's code
    path.write_text(
        "model_name_or_path: builtin:tiny\ndataset_name: builtin:addition\noutput_dir: out\n"
        "learning_rate: 5e-7\nper_device_train_batch_size: '4'\nbf16: false\nuse_peft: yes\n"
        "ref_model_sync_steps: null\nlora_target_modules: [q_proj, v_proj]\n"
        "model_init_kwargs: {revision: main}\n"
    )
    config, model_args, data_args = ArgumentParser((SAPOConfig, ModelArguments, DataArguments)).parse(
        ["--config", str(path)]
    )
    assert config.learning_rate == 5e-7 and isinstance(config.learning_rate, float)
    assert config.per_device_train_batch_size == 4 and isinstance(config.per_device_train_batch_size, int)
    assert config.bf16 is False and model_args.use_peft is True
    assert config.ref_model_sync_steps is None
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert config.model_init_kwargs == {"revision": "main"}
    assert data_args.dataset_name == "builtin:addition"


def test_flags_override_yaml(tmp_path):
    config, model_args, _ = parse(
        tmp_path,
        {**BASE, "beta": 0.3, "segment_length": 64},
        ["--beta", "0.05", "--model_name_or_path", "builtin:small"],
    )
    assert config.beta == 0.05
    assert config.segment_length == 64
    assert model_args.model_name_or_path == "builtin:small"


def test_flags_alone_work_without_a_file(tmp_path):
    config, _, data_args = parse(tmp_path, None, ["--model_name_or_path", "x", "--dataset_name", "d.jsonl",
                                                  "--output_dir", "o", "--loss_type", "orpo"])  # fmt: skip
    assert config.loss_type == "orpo" and data_args.dataset_split == "train"


@pytest.mark.parametrize(
    "values, flags, message",
    [
        ({**BASE, "learnin_rate": 1e-5}, [], "unknown field 'learnin_rate'; did you mean 'learning_rate'?"),
        (
            BASE,
            ["--segment_lenght", "8"],
            "unknown argument --segment_lenght; did you mean '--segment_length'?",
        ),
        (
            {**BASE, "per_device_train_batch_size": 8.5},
            [],
            "per_device_train_batch_size: expected an integer, got 8.5",
        ),
        ({**BASE, "beta": "high"}, [], "beta: expected a number, got 'high'"),
        ({**BASE, "bf16": "maybe"}, [], "bf16: expected true or false, got 'maybe'"),
        ({**BASE, "segment_length": [1, 2]}, [], "segment_length: expected int, got a list"),
        ({**BASE, "model_init_kwargs": 5}, [], "model_init_kwargs: expected dict[str, Any] | None, got 5"),
        (
            {**BASE, "lr_scheduler_type": "cosine_annealing"},
            [],
            "lr_scheduler_type: 'cosine_annealing' is not one of",
        ),
        (
            {**BASE, "torch_dtype": "fp8"},
            [],
            "torch_dtype: 'fp8' is not one of auto, bfloat16, float16, float32",
        ),
        (BASE, ["--beta", "high"], "--beta: invalid float value: 'high'"),
        ({**BASE, "beta": -1}, [], "beta=-1.0: must be positive"),
        (
            {**BASE, "max_length": 128, "max_prompt_length": 128},
            [],
            "max_prompt_length=128: must be smaller than",
        ),
        ({**BASE, "lora_r": 0}, [], "lora_r=0: must be a positive rank"),
        ({"dataset_name": "builtin:addition", "output_dir": "o"}, [], "required: --model_name_or_path"),
    ],
)
def test_bad_values_fail_naming_the_field(tmp_path, values, flags, message):
    with pytest.raises(ValueError) as raised:
        parse(tmp_path, values, flags)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config file not found: .*missing.yaml"):
        read_yaml(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: 1e-5\n  beta: [0.1\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML \(line \d+, column \d+\)"):
        read_yaml(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- learning_rate\n- beta\n")
    with pytest.raises(ValueError, match="must hold a mapping of field: value, got list"):
        read_yaml(str(listing))


def test_eval_defaults_to_the_test_split_and_checks_its_own_fields(tmp_path):
    parser = ArgumentParser((EvalArguments, ModelArguments, DataArguments), "sapo eval", dataset_split="test")
    eval_args, _, data_args = parser.parse(["--model_name_or_path", "m", "--dataset_name", "d"])
    assert data_args.dataset_split == "test" and eval_args.segment_length == 256
    parser = ArgumentParser((EvalArguments, ModelArguments, DataArguments), "sapo eval")
    with pytest.raises(ValueError, match="top_p=1.5: must be in"):
        parser.parse(["--model_name_or_path", "m", "--dataset_name", "d", "--top_p", "1.5"])
