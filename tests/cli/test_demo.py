"""`sapo demo` on the real code path, shortened; and the shipped SFT warm start it begins from."""

import json

import pytest

from sapo.builtin.tasks import task_dataset
from sapo.cli import main
from sapo.cli.arguments import ModelArguments
from sapo.cli.loading import load_model, load_tokenizer
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
from sapo.evaluation import greedy_accuracy

SHORT = [
    "--steps",
    "4",
    "--eval_every",
    "2",
    "--batch_size",
    "8",
    "--validation_rows",
    "16",
    "--test_rows",
    "24",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "sapo-demo"
    status = main(["demo", "--output_dir", str(output), *SHORT])
    return status, output


def test_demo_writes_report_curves_results_and_models(demo_run):
    status, output = demo_run
    assert status == 0
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("sft", "sapo-dpo", "sapo-orpo"):
        assert (output / "models" / method / "model.safetensors").is_file()
    record = json.loads((output / "results.json").read_text())
    assert list(record["test"]) == ["SFT warm start", "+ SFT", "+ SAPO-DPO", "+ SAPO-ORPO"]
    for values in record["test"].values():
        assert set(values) == {"accuracy", "margin", "win_rate", "gold_logp"}
        assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["win_rate"] <= 1.0
    for method, curves in record["curves"].items():
        assert [step for step, _ in curves["accuracy"]] == [0, 2, 4], method
        assert [step for step, _ in curves["margin"]] == [0, 2, 4], method
        assert curves["loss"], method
    for method in ("+ SFT", "+ SAPO-DPO", "+ SAPO-ORPO"):  # every method trained
        assert record["test"][method]["gold_logp"] != record["test"]["SFT warm start"]["gold_logp"], method
    report = (output / "report.md").read_text()
    assert "| + SAPO-DPO" in report and "![curves](curves.png)" in report
    assert f"{record['test']['+ SAPO-ORPO']['margin']:.3f}" in report


def test_demo_prints_the_table(demo_run, capsys):
    # the module fixture ran before capsys of this test, so run a check on the saved report instead
    _, output = demo_run
    table = [line for line in (output / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].split("|")[2].strip() == "exact match"
    assert len(table) == 1 + 4 + 1 + len(json.loads((output / "results.json").read_text())["settings"])


def test_the_settings_table_keeps_every_value(demo_run):
    _, output = demo_run
    settings = json.loads((output / "results.json").read_text())["settings"]
    lines = (output / "report.md").read_text().split("## Settings")[1].strip().splitlines()[2:]
    shown = {name.strip(): value.strip() for _, name, value, _ in (line.split("|") for line in lines)}
    assert shown.keys() == settings.keys()
    assert shown["dpo_learning_rate"] == "3e-05"  # three decimals printed it as 0.000
    for name, value in settings.items():
        if isinstance(value, float):
            assert float(shown[name]) == value, name
        else:
            assert shown[name] == str(value), name


def test_non_empty_output_dir_is_not_overwritten(demo_run, capfd):
    _, output = demo_run
    before = {path: path.stat().st_mtime_ns for path in output.rglob("*")}
    assert main(["demo", "--output_dir", str(output), *SHORT]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith("error: output_dir:") and "--overwrite" in error and "\n" not in error
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*")} == before


def test_overwrite_replaces_an_earlier_demo(tmp_path):
    output = tmp_path / "demo"
    output.mkdir()
    (output / "report.md").write_text("old")
    short = [*SHORT[:1], "1", *SHORT[2:3], "1", *SHORT[4:]]  # one step, scored once
    assert main(["demo", "--output_dir", str(output), "--overwrite", *short]) == 0
    assert (output / "report.md").read_text().startswith("# sapo demo")


def test_bad_demo_settings_fail_before_anything_is_written(tmp_path, capfd):
    assert main(["demo", "--output_dir", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert capfd.readouterr().err.strip() == "error: steps=0: must be positive"
    assert main(["demo", "--output_dir", str(tmp_path / "d"), "--task", "division"]) == 2
    assert "unknown built-in dataset 'builtin:division'" in capfd.readouterr().err
    assert not (tmp_path / "d").exists()


def test_shipped_warm_start_is_the_measured_sft_model(tokenizer):
    model_args = ModelArguments(model_name_or_path="builtin:tiny-multiplication-sft")
    model = load_model(model_args, load_tokenizer(model_args))
    rows = prepare_dataset(task_dataset("multiplication", "test").select(range(300)), tokenizer, 32, 24)
    pairs = list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))
    accuracy = greedy_accuracy(model, pairs, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    # converged SFT, far from perfect (see recipes/warm-start/tiny-multiplication-sft.yaml)
    assert 0.33 < accuracy < 0.5, accuracy
