"""The `sapo` commands and the folders they write (`sapo.checkpoints.ownership`): a new run on a
folder holding another run's work, or on one in use, ends with exit 2 and one `error:` line and
changes nothing; `--overwrite_output_dir` replaces that work, saying what it removed; the first
run still resumes; an evaluation replaces its own file whole."""

import json
import logging
import os
import subprocess
import sys
import time

import test_faults

from sapo.checkpoints import LOCK_FILE, RUN_FILE, read_json
from sapo.cli import main

# test_faults' finished 6-step `sapo train` run (checkpoints 2, 4 and 6), its copies and helpers
rows_file, finished_run, run_copy = test_faults.rows_file, test_faults.finished_run, test_faults.run_copy
train_argv, error_line = test_faults.train_argv, test_faults.error_line


def tiny(rows_file, output, *extra):
    """The flags `sapo sft` and `sapo spin` take here."""
    return [
        "--model_name_or_path", "builtin:tiny", "--dataset_name", rows_file, "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--max_length", "32", "--report_to", "none",
        "--output_dir", str(output), *extra,
    ]  # fmt: skip


def with_steps(argv, steps):
    argv = list(argv)
    argv[argv.index("--max_steps") + 1] = str(steps)
    return argv


def snapshot(folder):
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_new_run_on_a_finished_runs_folder_exits_2_changing_nothing_and_the_first_resumes(
    rows_file, run_copy, capfd
):
    before = snapshot(run_copy)
    assert main(train_argv(rows_file, run_copy, "--seed", "7")) == 2
    line = error_line(capfd)
    work = "3 checkpoints: checkpoint-2 to checkpoint-6, config.json, model.safetensors"
    assert line.startswith(f"error: output_dir: {run_copy} holds another run's work ({work}")
    assert "--resume_from_checkpoint last" in line and "--overwrite_output_dir" in line
    assert snapshot(run_copy) == before
    assert main(with_steps(train_argv(rows_file, run_copy, "--resume_from_checkpoint", "last"), 8)) == 0
    assert read_json(run_copy / "checkpoint-8" / "trainer_state.json")["global_step"] == 8


def test_overwrite_output_dir_starts_again_saying_what_it_replaced(rows_file, run_copy, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(train_argv(rows_file, run_copy, "--seed", "7", "--overwrite_output_dir")) == 0
    removed = (
        f"removing the earlier run's work from {run_copy}: 3 checkpoints: checkpoint-2 to checkpoint-6, "
    )
    assert removed in caplog.text
    assert all(read_json(run_copy / f"checkpoint-{step}" / RUN_FILE)["seed"] == 7 for step in (2, 4, 6))
    assert not (run_copy / LOCK_FILE).exists()


def test_sft_and_spin_refuse_an_earlier_runs_folder_and_sft_overwrites_it(rows_file, tmp_path, capfd):
    output = tmp_path / "run"
    for name in ("checkpoint-4/optimizer.pt", "iteration-1/model.safetensors", "model.safetensors"):
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text("earlier")
    before = snapshot(output)
    assert main(["sft", *tiny(rows_file, output)]) == 2
    line = error_line(capfd)
    assert (
        f"output_dir: {output} holds another run's work (checkpoint-4, iteration-1, model.safetensors)"
        in line
    )
    assert "--resume_from_checkpoint last" in line and "--overwrite_output_dir" in line
    spin = ["spin", *tiny(rows_file, output, "--max_prompt_length", "24", "--spin_iterations", "1")]
    assert main(spin) == 2
    line = error_line(capfd)
    assert "holds another run's work" in line and "--overwrite_output_dir" in line
    assert "resume" not in line  # SPIN does not resume
    assert snapshot(output) == before
    assert main(["sft", *tiny(rows_file, output, "--save_strategy", "no", "--overwrite_output_dir")]) == 0
    assert not (output / "checkpoint-4").exists() and not (output / "iteration-1").exists()
    assert (output / "model.safetensors").read_bytes() != b"earlier"


def test_sft_resumes_its_last_checkpoint(rows_file, tmp_path, capfd):
    output = tmp_path / "run"
    assert main(["sft", *tiny(rows_file, output, "--resume_from_checkpoint", "last")]) == 2
    assert f"resume_from_checkpoint: no checkpoint in {output}" in error_line(capfd)
    assert main(["sft", *tiny(rows_file, output, "--save_strategy", "steps", "--save_steps", "2")]) == 0
    resumed = tiny(rows_file, output, "--save_strategy", "steps", "--save_steps", "3")
    assert main(["sft", *with_steps(resumed, 3), "--resume_from_checkpoint", "last"]) == 0
    assert read_json(output / "checkpoint-3" / "trainer_state.json")["global_step"] == 3


def test_of_two_runs_on_one_folder_the_second_exits_2_naming_the_first_which_finishes(
    rows_file, tmp_path, capfd
):
    output = tmp_path / "run"
    argv = with_steps(train_argv(rows_file, output, "--save_steps", "20"), 40)
    first = subprocess.Popen([sys.executable, "-m", "sapo.cli", *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (output / LOCK_FILE).is_file() or not (output / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.1)
        assert main(train_argv(rows_file, output)) == 2
        running = first.poll() is None
        line = error_line(capfd)
        assert line.startswith(f"error: output_dir: {output} is in use by another run (pid {first.pid} on ")
        assert running, "the first run ended before the second was refused: nothing was tested"
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    assert read_json(output / "checkpoint-40" / "trainer_state.json")["global_step"] == 40
    assert (output / "model.safetensors").is_file() and not (output / LOCK_FILE).exists()


def test_eval_replaces_its_results_file_whole_and_says_so(rows_file, tmp_path, capsys):
    results = tmp_path / "eval.json"
    results.write_text("an earlier evaluation")
    argv = ["eval", "--model_name_or_path", "builtin:tiny", "--dataset_name", rows_file, "--max_rows", "4",
            "--segment_length", "2", "--max_length", "32", "--output_file", str(results)]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {results} (replacing the earlier file)" in capsys.readouterr().out
    assert json.loads(results.read_text())["rows"] == 4
    assert os.listdir(tmp_path) == ["eval.json"]
