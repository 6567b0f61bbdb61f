"""One owner per output folder (`sapo.checkpoints.ownership`): a new run refuses a folder holding
an earlier run's work and changes nothing in it, `overwrite_output_dir` replaces that work, a
folder in use is refused naming its owner, a killed owner leaves the folder to the next run, and
a 2-process run owns its folder once. The `sapo` command's side is in tests/cli/test_output_dirs.py."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import launch
import pytest
from test_checkpoints import make_trainer

from sapo.checkpoints import (
    LOCK_FILE,
    RUN_FILE,
    OutputDirError,
    earlier_work,
    owning_output_dir,
    read_json,
    write_whole,
)
from sapo.checkpoints.verify import FILES
from sapo.evaluation.pairs import PAIRS_FILE, PairLogCallback

HOLDER = """
import sys, types
from sapo.checkpoints import owning_output_dir
with owning_output_dir(types.SimpleNamespace(output_dir=sys.argv[1], process_index=0, world_size=1)):
    print("HOLDING", flush=True)
    sys.stdin.read()
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """A finished 3-step run: checkpoint-3 and the final model in its folder."""
    output = tmp_path_factory.mktemp("finished") / "run"
    trainer = make_trainer(tokenizer, output, max_steps=3)
    trainer.train()
    trainer.save_model(str(output))
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def holder(tmp_path):
    """Start a process that owns a folder; ``holder(folder)`` returns it once it holds the lock."""
    started = []

    def start(folder):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout.readline().strip() == "HOLDING"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def single_process(folder):
    return SimpleNamespace(output_dir=str(folder), process_index=0, world_size=1)


def test_earlier_work_is_checkpoints_models_and_iterations_not_logs_or_hidden_entries(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "iteration-1", "final", "runs", ".staging/checkpoint-11"):
        (tmp_path / name).mkdir(parents=True)
    models = ["final/model.safetensors", ".staging/checkpoint-11/model.safetensors", "config.json"]
    files = [
        *models,
        "adapter_model.safetensors",
        PAIRS_FILE,
        "runs/events.out",
        "README.md",
        "notes.txt",
        LOCK_FILE,
    ]
    for name in files:
        (tmp_path / name).write_text("x")
    assert earlier_work(tmp_path) == [
        "adapter_model.safetensors", "checkpoint-9", "checkpoint-10", "config.json", "final", "iteration-1",
    ]  # fmt: skip
    assert earlier_work(tmp_path / "missing") == []


def test_a_new_run_is_refused_in_a_finished_runs_folder_and_changes_nothing(run_copy, tokenizer):
    before = snapshot(run_copy)
    with pytest.raises(OutputDirError) as refused:
        make_trainer(tokenizer, run_copy, max_steps=3, seed=7).train()
    message = str(refused.value)
    assert message.startswith(f"output_dir: {run_copy} holds another run's work (checkpoint-3, config.json, ")
    assert "--resume_from_checkpoint last" in message and "--overwrite_output_dir" in message
    assert "\n" not in message
    assert snapshot(run_copy) == before
    # the refused run left the first one as it was: it resumes
    resumed = make_trainer(tokenizer, run_copy, max_steps=4)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 4
    recorded = read_json(run_copy / "checkpoint-4" / RUN_FILE)[FILES]
    assert "model.safetensors" in recorded and not any(LOCK_FILE in name for name in recorded)


def test_a_checkpoint_of_another_folder_does_not_continue_this_ones_run(run_copy, tmp_path, tokenizer):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_copy / "checkpoint-3", elsewhere / "checkpoint-3")
    with pytest.raises(OutputDirError, match="holds another run's work"):
        make_trainer(tokenizer, run_copy, max_steps=4).train(
            resume_from_checkpoint=str(elsewhere / "checkpoint-3")
        )


def test_overwrite_output_dir_replaces_the_earlier_run_naming_what_it_removed(run_copy, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        make_trainer(
            tokenizer, run_copy, max_steps=2, save_steps=2, seed=7, overwrite_output_dir=True
        ).train()
    ownership = [r.getMessage() for r in caplog.records if r.name == "sapo.checkpoints.ownership"]
    removed = [message for message in ownership if message.startswith("overwrite_output_dir")]
    assert len(removed) == 1 and "checkpoint-3, config.json, model.safetensors" in removed[0]
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run_copy / "model.safetensors").exists()
    assert read_json(run_copy / "checkpoint-2" / "sapo_run.json")["seed"] == 7


def test_a_folder_in_use_is_refused_naming_its_owner_who_keeps_it(tmp_path, tokenizer, holder):
    folder = tmp_path / "run"
    owner = holder(folder)
    lock = (folder / LOCK_FILE).read_bytes()
    assert json.loads(lock)["pid"] == owner.pid
    expected = (
        f"output_dir: {folder} is in use by another run (pid {owner.pid} on {socket.gethostname()}, since "
    )
    for resume in (None, "last"):  # resuming takes the lock too
        with pytest.raises(OutputDirError) as refused:
            make_trainer(tokenizer, folder, max_steps=2).train(resume_from_checkpoint=resume)
        assert str(refused.value).startswith(expected)
    with pytest.raises(OutputDirError, match="is in use by another run"):  # overwriting does not override it
        make_trainer(tokenizer, folder, max_steps=2, overwrite_output_dir=True).train()
    assert owner.poll() is None and (folder / LOCK_FILE).read_bytes() == lock
    owner.communicate("")  # the owner ends: its lock file goes with it, and the folder is free
    assert owner.returncode == 0 and not (folder / LOCK_FILE).exists()
    make_trainer(tokenizer, folder, max_steps=1).train()


def test_a_killed_owner_leaves_the_folder_to_the_next_run(tmp_path, holder):
    folder = tmp_path / "run"
    owner = holder(folder)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == owner.pid  # the file stays, unlocked
    with owning_output_dir(single_process(folder)):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_a_process_owns_its_folder_once_however_many_claims(tmp_path):
    """The `sapo` command owns the folder around training, the trainer around `train()`."""
    args = single_process(tmp_path / "run")
    with owning_output_dir(args):
        with owning_output_dir(args):
            pass
        assert (tmp_path / "run" / LOCK_FILE).exists()  # the outer claim still holds it
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_two_processes_own_their_folder_once(tmp_path):
    launch.torchrun(Path(__file__).with_name("ownership_worker.py"), tmp_path / "run")
    report = json.loads((tmp_path / "ownership.json").read_text())
    main, other = report["ranks"]
    assert main["lock"]["pid"] == main["pid"] and other["lock"] == main["lock"]  # rank 0 holds it for both
    assert f"is in use by another run (pid {main['pid']} on " in main["outside"]
    assert main["refusal"] == other["refusal"] and "holds another run's work (checkpoint-2" in main["refusal"]
    assert main["resumed_to"] == other["resumed_to"] == 3
    assert not report["lock_left"]


def test_pairs_log_starts_where_the_run_starts(tmp_path, tokenizer, caplog):
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=[])
    path = tmp_path / PAIRS_FILE
    path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (2, 4, 6)) + '{"step": 8, "pro')
    callback = PairLogCallback(tokenizer, lambda: [], every=2)
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]  # a resume at 4
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert path.read_text() == "" and "replacing the 2 records of an earlier run" in caplog.text


def test_write_whole_replaces_a_file_and_says_so(tmp_path):
    path = tmp_path / "results.json"
    assert write_whole(path, "first") is False and write_whole(path, "second") is True
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["results.json"]
