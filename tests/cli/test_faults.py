"""`sapo train` facing faults: damaged or incomplete checkpoints, another run's checkpoint, a
non-finite loss, a full disk. Each ends in a resume from the last intact checkpoint with one
warning, or in exit 2 with one `error:` line (a traceback only with --debug); defaults that
follow what the user set."""

import errno
import json
import logging
import shutil

import pytest
import torch

import sapo.checkpoints.files
import sapo.trainer
from sapo.builtin.tasks import task_dataset
from sapo.checkpoints import RUN_FILE, is_complete
from sapo.cli import main


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "addition.jsonl"
    rows = task_dataset("addition", "validation").select(range(24))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def train_argv(rows_file, output, *extra):
    return [
        "train", "--model_name_or_path", "builtin:tiny", "--dataset_name", rows_file,
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--max_length", "32",
        "--max_prompt_length", "24", "--segment_length", "2", "--replay_buffer_size", "8",
        "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
        "--output_dir", str(output), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(rows_file, tmp_path_factory):
    """A 6-step run with checkpoints 2, 4 and 6."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(rows_file, output)) == 0
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def error_line(capfd):
    """The last stderr line, checked to be the only `error:` line and to follow no traceback."""
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1, captured.err[-2000:]
    assert lines[-1].startswith("error: "), captured.err[-2000:]
    return lines[-1]


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


DAMAGES = {
    "weights cut short": (lambda f: truncate(f / "model.safetensors"), "model.safetensors is 100 bytes"),
    "EMA cut short": (lambda f: truncate(f / "sapo_ema.safetensors"), "sapo_ema.safetensors is 100 bytes"),
    "trainer state not JSON": (
        lambda f: (f / "trainer_state.json").write_text("{"),
        "trainer_state.json is 1",
    ),
    "rank state not JSON": (lambda f: (f / "sapo_rank0.json").write_text("{"), "sapo_rank0.json is 1 bytes"),
    "optimizer deleted": (lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_last_resumes_from_the_last_intact_checkpoint_with_one_warning(rows_file, run_copy, caplog, damage):
    harm, expected = DAMAGES[damage]
    harm(run_copy / "checkpoint-6")
    with caplog.at_level(logging.WARNING):
        status = main(train_argv(rows_file, run_copy, "--max_steps", "7", "--resume_from_checkpoint", "last"))
    assert status == 0
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint-6" in warnings[0] and expected in warnings[0], warnings
    state = json.loads((run_copy / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["global_step"] == 7  # from checkpoint-4: steps 5, 6 and 7 trained again
    assert is_complete(run_copy / "checkpoint-6")  # step 6 written again, whole


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_named_checkpoint_that_does_not_verify_exits_2(rows_file, run_copy, capfd, damage):
    harm, expected = DAMAGES[damage]
    harm(run_copy / "checkpoint-6")
    named = str(run_copy / "checkpoint-6")
    assert main(train_argv(rows_file, run_copy, "--max_steps", "8", "--resume_from_checkpoint", named)) == 2
    line = error_line(capfd)
    assert line.startswith(f"error: resume_from_checkpoint: {named} ") and expected in line
    assert not (run_copy / "checkpoint-8").exists()


def test_another_runs_checkpoint_found_while_training_exits_2(rows_file, run_copy, capfd):
    argv = train_argv(
        rows_file, run_copy, "--max_steps", "8", "--resume_from_checkpoint", "last", "--seed", "7"
    )
    assert main(argv) == 2
    assert "different run: seed is 42 there and 7 here" in error_line(capfd)
    with pytest.raises(ValueError, match="different run: seed"):
        main([*argv, "--debug"])


def test_a_non_finite_loss_exits_2_naming_the_step_and_what_to_try(rows_file, tmp_path, capfd, monkeypatch):
    objective, calls = sapo.trainer.preference_objective, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, metrics = objective(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    monkeypatch.setattr(sapo.trainer, "preference_objective", poisoned)
    assert main(train_argv(rows_file, tmp_path / "run")) == 2
    line = error_line(capfd)
    assert "non-finite loss at step 3" in line and "lower the learning rate" in line
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_full_disk_during_a_checkpoint_write_exits_2_and_keeps_the_earlier_ones(
    rows_file, tmp_path, capfd, monkeypatch
):
    save_file = sapo.checkpoints.files.save_file

    def filling(tensors, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(sapo.checkpoints.files, "save_file", filling)
    output = tmp_path / "run"
    assert main(train_argv(rows_file, output)) == 2
    line = error_line(capfd)
    assert line.startswith(
        f"error: [Errno 28] could not write checkpoint-4 in {output}: No space left on device"
    )
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete(output / "checkpoint-2")
    assert not (output / ".staging").exists()


def test_other_failures_keep_their_traceback(rows_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a fault of the program")

    monkeypatch.setattr(sapo.trainer, "preference_objective", broken)
    with pytest.raises(RuntimeError, match="a fault of the program"):
        main(train_argv(rows_file, tmp_path / "run"))


def test_train_with_only_max_length_set_derives_the_prompt_limit(rows_file, tmp_path):
    output = tmp_path / "run"
    argv = [item for item in train_argv(rows_file, output, "--max_length", "64") if item != "24"]
    argv.remove("--max_prompt_length")
    argv[argv.index("--max_steps") + 1] = "2"
    assert main(argv) == 0
    args = torch.load(output / "training_args.bin", weights_only=False)
    assert (args.max_length, args.max_prompt_length) == (64, 62)  # 64 - segment_length
    assert json.loads((output / "checkpoint-2" / RUN_FILE).read_text())["files"]


def test_eval_with_only_max_length_set_derives_the_prompt_limit(rows_file, tmp_path):
    results = tmp_path / "eval.json"
    argv = ["eval", "--model_name_or_path", "builtin:tiny", "--dataset_name", rows_file,
            "--max_length", "64", "--max_rows", "4", "--output_file", str(results)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(results.read_text())["rows"] == 4


def test_a_named_checkpoint_changed_in_place_exits_2(rows_file, run_copy, capfd):
    """Same size, one byte changed: only its checksum tells, when training begins."""
    path = run_copy / "checkpoint-6" / "sapo_ema.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    named = str(run_copy / "checkpoint-6")
    assert main(train_argv(rows_file, run_copy, "--max_steps", "8", "--resume_from_checkpoint", named)) == 2
    assert "sapo_ema.safetensors does not match its checksum" in error_line(capfd)
