"""The `sapo` command end to end: train, sft and eval on built-ins, and bad input failing cleanly."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM

from sapo.builtin.tasks import task_dataset
from sapo.cli import main

# the built-in tasks' rows, a few of them in a local file: tokenizing all 20,000 would dominate the tests
ROWS = [row for row in task_dataset("addition", "validation").select(range(16))]
TINY_RUN_WITH = [
    "--model_name_or_path", "builtin:tiny", "--dataset_name", "DATA",
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32",
    "--report_to", "none", "--save_strategy", "no",
]  # fmt: skip
SAPO_RUN_WITH = [
    *TINY_RUN_WITH,
    "--max_prompt_length",
    "24",
    "--segment_length",
    "2",
    "--replay_buffer_size",
    "8",
]
TINY_RUN, SAPO_RUN = [], []  # the flags above with DATA replaced, set per test by `rows_file`


@pytest.fixture(autouse=True)
def rows_file(tmp_path, monkeypatch):
    """Fills TINY_RUN and SAPO_RUN, their DATA being a file of built-in task rows in ``tmp_path``."""
    path = write_jsonl(tmp_path / "addition.jsonl", ROWS)
    monkeypatch.setattr(
        sys.modules[__name__], "TINY_RUN", [path if f == "DATA" else f for f in TINY_RUN_WITH]
    )
    monkeypatch.setattr(
        sys.modules[__name__], "SAPO_RUN", [path if f == "DATA" else f for f in SAPO_RUN_WITH]
    )


def write_recipe(tmp_path, **values):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def good_rows(n=8):
    return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(n)]


def test_train_writes_a_model_that_loads(tmp_path):
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path, loss_type="orpo", beta=0.5, output_dir=str(output))
    assert main(["train", "--config", recipe, *SAPO_RUN]) == 0
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.num_hidden_layers == 2
    args = __import__("torch").load(output / "training_args.bin", weights_only=False)
    assert args.loss_type == "orpo" and args.beta == 0.5 and args.max_steps == 2


def test_train_resumes_from_the_last_checkpoint(tmp_path):
    output = str(tmp_path / "run")
    saving = ["--save_strategy", "steps", "--save_steps", "2"]
    assert main(["train", *SAPO_RUN, *saving, "--output_dir", output]) == 0
    resumed = ["--max_steps", "3", "--resume_from_checkpoint", "last"]
    assert main(["train", *SAPO_RUN, *saving, "--output_dir", output, *resumed]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_train_with_use_peft_trains_a_lora_adapter(tmp_path):
    output = tmp_path / "lora"
    argv = ["train", *SAPO_RUN, "--output_dir", str(output), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip
    assert main(argv) == 0
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert not (output / "model.safetensors").exists()


def test_train_reads_a_local_file_with_a_renamed_messages_column(tmp_path):
    rows = [
        {
            "chosen": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}],
            "score": i,
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    argv = ["train", *SAPO_RUN, "--dataset_name", data, "--messages_column", "chosen", "--output_dir",
            str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_sft_then_eval(tmp_path, capsys):
    model_dir = tmp_path / "sft"
    assert main(["sft", *TINY_RUN, "--output_dir", str(model_dir)]) == 0
    results = tmp_path / "eval.json"
    argv = ["eval", "--model_name_or_path", str(model_dir), "--dataset_name", "builtin:addition",
            "--max_rows", "24", "--segment_length", "2", "--output_file", str(results)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(results.read_text())
    assert record["rows"] == 24 and record["split"] == "test"
    assert set(record) >= {"gold_logp", "margin", "win_rate", "accuracy"}
    assert 0.0 <= record["win_rate"] <= 1.0 and record["accuracy"] == 0.0  # two SFT steps learn no sums
    table = capsys.readouterr().out
    assert "| model" in table and "exact match" in table and f"{record['margin']:.3f}" in table


def test_spin_saves_each_iteration(tmp_path):
    output = tmp_path / "spin"
    argv = ["spin", *TINY_RUN, "--output_dir", str(output), "--spin_iterations", "2", "--max_new_tokens", "6",
            "--max_prompt_length", "24"]  # fmt: skip
    assert main(argv) == 0
    for iteration in (1, 2):
        assert (output / f"iteration-{iteration}" / "model.safetensors").is_file()


def test_eval_on_a_local_file_reports_no_accuracy(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", good_rows())
    results = tmp_path / "eval.json"
    argv = ["eval", "--model_name_or_path", "builtin:tiny", "--dataset_name", data, "--segment_length", "2",
            "--output_file", str(results)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(results.read_text())
    assert record["rows"] == 8 and "accuracy" not in record


# -- bad input: exit 2, one `error:` line naming the culprit, nothing written -------------------


def bad_inputs(tmp_path):
    """(argv, text the error line must contain) per kind of bad input."""
    out = str(tmp_path / "out")
    run = ["train", "--output_dir", out]
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("model_name_or_path: builtin:tiny\n  dataset_name: [x\n")
    malformed = write_jsonl(
        tmp_path / "malformed.jsonl",
        [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
         {"messages": [{"role": "user", "content": "2+2="}, {"role": "user", "content": "4"}]}],
    )  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_columns = write_jsonl(tmp_path / "no_columns.jsonl", [{"question": "1+1=", "answer": "2"}])
    small = write_jsonl(tmp_path / "small.jsonl", good_rows())
    return {
        "bad yaml": (
            ["train", "--config", str(broken_yaml), "--output_dir", out],
            "broken.yaml: not valid YAML (line",
        ),
        "missing config": (["train", "--config", str(tmp_path / "nope.yaml")], "config file not found"),
        "unknown field": (
            ["train", "--config", write_recipe(tmp_path, learnin_rate=1e-5), *SAPO_RUN, "--output_dir", out],
            "unknown field 'learnin_rate'; did you mean 'learning_rate'?",
        ),
        "unknown flag": (
            [*run, *SAPO_RUN, "--betta", "0.1"],
            "unknown argument --betta; did you mean '--beta'?",
        ),
        "wrong type": (
            [*run, *SAPO_RUN, "--segment_length", "long"],
            "--segment_length: invalid int value: 'long'",
        ),
        "out of range": ([*run, *SAPO_RUN, "--ema_decay", "1.5"], "ema_decay=1.5: must be in [0, 1)"),
        "prompt budget": (
            [*run, *SAPO_RUN, "--max_prompt_length", "32"],
            "max_prompt_length=32: must be smaller",
        ),
        "missing file": (
            [*run, *SAPO_RUN, "--dataset_name", str(tmp_path / "missing.jsonl")],
            "dataset_name: no such file or folder",
        ),
        "malformed row": (
            [*run, *SAPO_RUN, "--dataset_name", malformed],
            "row 1: column 'messages': the last message",
        ),
        "empty dataset": ([*run, *SAPO_RUN, "--dataset_name", str(empty)], "empty.jsonl"),
        "missing columns": ([*run, *SAPO_RUN, "--dataset_name", no_columns], "missing column"),
        "unknown built-in model": (
            [*run, *SAPO_RUN, "--model_name_or_path", "builtin:tiyn"],
            "unknown built-in model 'builtin:tiyn'; did you mean 'builtin:tiny'?",
        ),
        "unknown built-in data": (
            [*run, *SAPO_RUN, "--dataset_name", "builtin:adition"],
            "did you mean 'builtin:addition'?",
        ),
        "missing checkpoint": (
            [*run, *SAPO_RUN, "--resume_from_checkpoint", str(tmp_path / "ckpt")],
            "resume_from_checkpoint: " + str(tmp_path / "ckpt") + " is not a folder",
        ),
        "resume last without checkpoints": (
            [*run, *SAPO_RUN, "--resume_from_checkpoint", "last"],
            "resume_from_checkpoint: no complete checkpoint in",
        ),
        "sft missing checkpoint": (
            ["sft", *TINY_RUN, "--output_dir", out, "--resume_from_checkpoint", str(tmp_path / "ckpt")],
            "resume_from_checkpoint: no such checkpoint folder",
        ),
        "bad lora target": (
            [*run, *SAPO_RUN, "--dataset_name", small, "--use_peft", "--lora_target_modules", "no_such_proj"],
            "no_such_proj",
        ),
        "sft malformed row": (["sft", *TINY_RUN, "--dataset_name", malformed, "--output_dir", out], "row 1"),
        "eval output folder": (
            [
                "eval",
                "--model_name_or_path",
                "builtin:tiny",
                "--dataset_name",
                small,
                "--output_file",
                str(tmp_path / "out" / "eval.json"),
            ],
            "output_file: no such folder",
        ),  # fmt: skip
        "eval missing file": (
            [
                "eval",
                "--model_name_or_path",
                "builtin:tiny",
                "--dataset_name",
                str(tmp_path / "x.parquet"),
                "--output_file",
                str(tmp_path / "eval.json"),
            ],
            "dataset_name: no such file or folder",
        ),  # fmt: skip
        "unknown command": (["trian"], "unknown command 'trian'; did you mean 'train'?"),
        "zero batch": (
            [*run, *SAPO_RUN, "--per_device_train_batch_size", "0"],
            "per_device_train_batch_size=0",
        ),
        "negative learning rate": ([*run, *SAPO_RUN, "--learning_rate", "-1"], "learning_rate=-1.0"),
        "missing model folder": (
            [*run, *SAPO_RUN, "--model_name_or_path", "./no/such/model"],
            "model_name_or_path: no such folder: ./no/such/model",
        ),
        "output_dir is a file": ([*run[:1], *SAPO_RUN, "--output_dir", small], "File exists"),
        "spin malformed row": (
            [
                "spin",
                *TINY_RUN,
                "--dataset_name",
                malformed,
                "--output_dir",
                out,
                "--max_prompt_length",
                "24",
            ],
            "row 1: column 'messages'",
        ),
    }


CASES = [
    "bad yaml", "missing config", "unknown field", "unknown flag", "wrong type", "out of range",
    "prompt budget", "missing file", "malformed row", "empty dataset", "missing columns",
    "unknown built-in model", "unknown built-in data", "missing checkpoint", "bad lora target",
    "sft malformed row", "eval output folder", "eval missing file", "unknown command", "zero batch",
    "negative learning rate", "missing model folder", "output_dir is a file", "spin malformed row",
    "resume last without checkpoints", "sft missing checkpoint",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(tmp_path, capfd, case):
    cases = bad_inputs(tmp_path)
    assert sorted(cases) == sorted(CASES)
    argv, expected = cases[case]
    before = set(os.listdir(tmp_path))
    assert main(argv) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert set(os.listdir(tmp_path)) == before  # in particular no out/


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        main(["train", *SAPO_RUN, "--output_dir", str(tmp_path / "out"), "--ema_decay", "1.5", "--debug"])
    assert not (tmp_path / "out").exists()


def test_console_script_exit_status_and_stderr(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "sapo.cli", "train", *SAPO_RUN, "--output_dir", str(tmp_path / "out"),
         "--top_p", "0"],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert process.returncode == 2
    assert process.stderr.strip() == "error: top_p=0.0: must be in (0, 1]"
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(command in usage for command in ("train", "sft", "spin", "eval", "demo"))
    assert main([]) == 2


def test_stdout_holds_only_the_commands_output_when_deepspeed_is_installed(tmp_path):
    """accelerate imports DeepSpeed (a dev dependency), which announces its CPU fallback on stdout
    unless told the accelerator; the CLI tells it on machines without one."""
    pytest.importorskip("deepspeed")
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    command = [sys.executable, "-m", "sapo.cli", "train", "--model_name_or_path", "builtin:tiny"]
    command += ["--dataset_name", "builtin:addition", "--max_steps", "1", "--report_to", "none"]
    command += ["--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accelerator" not in result.stdout.lower()
