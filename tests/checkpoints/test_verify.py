"""Verified checkpoints: every file recorded with its size and checksum; "last" skips what does not
verify, with one warning naming the file; a named checkpoint that does not verify is an error;
a checkpoint without checksums (written before they were recorded) still resumes exactly."""

import json
import logging
import shutil

import pytest
import xxhash
from test_checkpoints import assert_same_weights, make_trainer

import sapo.checkpoints.verify as verify
from sapo.checkpoints import RUN_FILE, CheckpointError, inspect, is_complete, resolve, rotate
from sapo.checkpoints.verify import FILES, file_records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A finished 6-step run with checkpoints 2, 4 and 6; tests damage copies of it."""
    output = tmp_path_factory.mktemp("verified")
    make_trainer(tokenizer, output, max_steps=6, save_steps=2).train()
    return output


@pytest.fixture
def run_copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_json(path):
    path.write_text(path.read_text()[:-5])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def without_checksums(folder):
    """What sapo wrote before it recorded checksums: the run identity alone."""
    record = json.loads((folder / RUN_FILE).read_text())
    del record[FILES]
    (folder / RUN_FILE).write_text(json.dumps(record))


def sapo_messages(caplog):
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("sapo") and r.levelno == logging.WARNING
    ]


def test_every_file_is_recorded_with_its_size_and_checksum(run_dir):
    folder = run_dir / "checkpoint-6"
    record = json.loads((folder / RUN_FILE).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != RUN_FILE)
    assert sorted(record[FILES]) == on_disk
    model = record[FILES]["model.safetensors"]
    assert model["bytes"] == (folder / "model.safetensors").stat().st_size
    assert model["xxh3_128"] == xxhash.xxh3_128((folder / "model.safetensors").read_bytes()).hexdigest()
    assert record["loss_type"] == "dpo" and record["world_size"] == 1  # the identity keys stay
    assert inspect(folder).problem is None and inspect(folder).verified


DAMAGES = {
    "weights cut short": (lambda f: truncate(f / "model.safetensors"), "model.safetensors is"),
    "EMA cut short": (lambda f: truncate(f / "sapo_ema.safetensors"), "sapo_ema.safetensors is"),
    "trainer state not JSON": (lambda f: cut_json(f / "trainer_state.json"), "trainer_state.json is"),
    "rank state not JSON": (lambda f: cut_json(f / "sapo_rank0.json"), "sapo_rank0.json is"),
    "one byte changed": (lambda f: flip_a_byte(f / "optimizer.pt"), "optimizer.pt does not match its"),
    "optimizer deleted": (lambda f: (f / "optimizer.pt").unlink(), "not complete: optimizer.pt is missing"),
    "scheduler deleted": (lambda f: (f / "scheduler.pt").unlink(), "not complete: scheduler.pt is missing"),
    "RNG state deleted": (lambda f: (f / "rng_state.pth").unlink(), "not complete: rng_state.pth is missing"),
    "weights deleted": (lambda f: (f / "model.safetensors").unlink(), "not complete: model.safetensors is"),
    "reference deleted": (
        lambda f: (f / "sapo_reference.safetensors").unlink(),
        "not complete: sapo_reference.safetensors is missing",
    ),
    "buffer deleted": (
        lambda f: (f / "sapo_rank0.safetensors").unlink(),
        "not complete: sapo_rank0.safetensors is missing",
    ),
    "other file deleted": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "run file deleted": (
        lambda f: (f / RUN_FILE).unlink(),
        "not a complete SAPO checkpoint (no sapo_run.json)",
    ),
    "run file not JSON": (lambda f: cut_json(f / RUN_FILE), "sapo_run.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_last_skips_a_damaged_checkpoint_with_one_warning_naming_the_file(run_copy, caplog, damage):
    harm, expected = DAMAGES[damage]
    harm(run_copy / "checkpoint-6")
    with caplog.at_level(logging.WARNING):
        assert resolve(str(run_copy), "last") == str(run_copy / "checkpoint-4")
        assert resolve(str(run_copy), True) == str(run_copy / "checkpoint-4")  # no second warning
    warnings = sapo_messages(caplog)
    assert len(warnings) == 1, warnings
    assert f"skipping {run_copy / 'checkpoint-6'}" in warnings[0] and expected in warnings[0]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_named_checkpoint_that_does_not_verify_is_an_error_naming_the_file(run_copy, damage):
    harm, expected = DAMAGES[damage]
    harm(run_copy / "checkpoint-6")
    with pytest.raises(CheckpointError, match="resume_from_checkpoint: ") as raised:
        resolve(str(run_copy), str(run_copy / "checkpoint-6"))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_resuming_past_a_damaged_checkpoint_continues_the_run_exactly(run_dir, run_copy, tokenizer, caplog):
    truncate(run_copy / "checkpoint-6" / "model.safetensors")
    (run_copy / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        resumed = make_trainer(tokenizer, run_copy, max_steps=6, save_steps=2)
        resumed.train(resume_from_checkpoint="last")  # from checkpoint-2
    skipped = [m for m in sapo_messages(caplog) if "skipping" in m]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and "checkpoint-4" in skipped[1]
    finished = make_trainer(tokenizer, run_dir, max_steps=6, save_steps=2)
    finished.train(resume_from_checkpoint=str(run_dir / "checkpoint-6"))  # reloads the finished run
    assert resumed.state.global_step == 6
    assert_same_weights(finished.model, resumed.model)
    assert_same_weights(finished.ema.model, resumed.ema.model)
    assert is_complete(run_copy / "checkpoint-6")  # written again, whole


def test_nothing_that_verifies_is_an_error_listing_what_was_skipped(run_copy):
    for step in (2, 4, 6):
        (run_copy / f"checkpoint-{step}" / "scheduler.pt").unlink()
    with pytest.raises(
        CheckpointError, match="no complete checkpoint in .*checkpoint-6, checkpoint-4, checkpoint-2"
    ):
        resolve(str(run_copy), "last")


def test_a_checkpoint_without_checksums_resumes_exactly_with_one_warning(
    run_dir, run_copy, tokenizer, caplog
):
    for step in (2, 4, 6):
        without_checksums(run_copy / f"checkpoint-{step}")
    with caplog.at_level(logging.WARNING):
        resumed = make_trainer(tokenizer, run_copy, max_steps=6, save_steps=2)
        resumed.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))
    unverified = [m for m in sapo_messages(caplog) if "could not be verified" in m]
    assert len(unverified) == 1 and "checkpoint-2" in unverified[0]
    finished = make_trainer(tokenizer, run_dir, max_steps=6, save_steps=2)
    finished.train(resume_from_checkpoint=str(run_dir / "checkpoint-6"))
    assert_same_weights(finished.model, resumed.model)
    assert_same_weights(finished.ema.model, resumed.ema.model)
    assert finished.buffer.items() == resumed.buffer.items()
    assert inspect(run_copy / "checkpoint-6").verified  # the checkpoints it writes have checksums


OLD_DAMAGES = {
    "weights cut short": (lambda f: truncate(f / "model.safetensors"), "model.safetensors is"),
    "EMA cut short": (lambda f: truncate(f / "sapo_ema.safetensors"), "sapo_ema.safetensors is cut short"),
    "optimizer cut short": (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt is cut short"),
    "trainer state not JSON": (lambda f: cut_json(f / "trainer_state.json"), "trainer_state.json is cut"),
    "rank state not JSON": (lambda f: cut_json(f / "sapo_rank0.json"), "sapo_rank0.json is cut"),
    "optimizer deleted": (lambda f: (f / "optimizer.pt").unlink(), "optimizer.pt is missing"),
}


@pytest.mark.parametrize("damage", sorted(OLD_DAMAGES))
def test_a_damaged_checkpoint_without_checksums_is_skipped(run_copy, caplog, damage):
    harm, expected = OLD_DAMAGES[damage]
    for step in (4, 6):
        without_checksums(run_copy / f"checkpoint-{step}")
    harm(run_copy / "checkpoint-6")
    with caplog.at_level(logging.WARNING):
        assert resolve(str(run_copy), "last") == str(run_copy / "checkpoint-4")
    warnings = sapo_messages(caplog)
    assert len(warnings) == 2, warnings
    assert "skipping" in warnings[0] and expected in warnings[0]
    assert "checkpoint-4" in warnings[1] and "could not be verified" in warnings[1]


def test_damage_only_found_while_loading_is_a_checkpoint_error(run_copy, tokenizer):
    """Valid JSON that lacks what the resume reads, in a checkpoint without checksums."""
    folder = run_copy / "checkpoint-6"
    without_checksums(folder)
    (folder / "sapo_rank0.json").write_text("{}")
    trainer = make_trainer(tokenizer, run_copy, max_steps=8, save_steps=2)
    with pytest.raises(
        CheckpointError, match="sapo_rank0.json: could not be read \\(missing key 'buffer'\\)"
    ):
        trainer.train(resume_from_checkpoint=str(folder))


def test_unchanged_folders_are_not_read_twice(run_dir, monkeypatch):
    inspect(run_dir / "checkpoint-4")
    reads = []
    monkeypatch.setattr(verify, "_checksum", lambda path: reads.append(path) or "")
    assert inspect(run_dir / "checkpoint-4").problem is None
    assert not reads
    assert sorted(file_records(run_dir / "checkpoint-4")) and reads  # recording reads every file


def test_rotation_renames_a_checkpoint_away_before_deleting_it(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / RUN_FILE).write_text("{}")
    (tmp_path / ".deleted-checkpoint-0").mkdir()  # left by a process killed while deleting
    rotate(tmp_path, 2, str(tmp_path / "checkpoint-1"))  # keeps the best and the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4"]


def test_the_quick_check_compares_sizes_only(run_copy):
    folder = run_copy / "checkpoint-6"
    flip_a_byte(folder / "model.safetensors")
    assert inspect(folder, checksums=False).problem is None
    assert "model.safetensors does not match its checksum" in inspect(folder).problem
    truncate(folder / "optimizer.pt")
    assert "optimizer.pt is" in inspect(folder, checksums=False).problem
