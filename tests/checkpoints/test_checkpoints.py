"""Checkpoints: exact resume, crash safety, safe formats, and clear errors on a wrong resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import addition_rows
from datasets import Dataset
from transformers import TrainerCallback

from sapo import SAPOConfig, SAPOTrainer
from sapo.buffer import ReplayBuffer
from sapo.builtin.tiny import tiny_llama
from sapo.checkpoints import RUN_FILE, is_complete, resolve
from sapo.checkpoints.files import buffer_from_tensors, buffer_to_tensors
from sapo.pairs import Pair

ROOT = Path(__file__).resolve().parents[2]


def make_trainer(tokenizer, output_dir, loss_type="dpo", rows=None, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        loss_type=loss_type,
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        sample_every_n_steps=2,
        segment_length=4,
        ref_model_sync_steps=3,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=100,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    settings.update(overrides)
    dataset = Dataset.from_list(rows if rows is not None else addition_rows(40, seed=1))
    return SAPOTrainer(
        model=tiny_llama(tokenizer, seed=0),
        args=SAPOConfig(**settings),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def assert_same_weights(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


SAPO_EXTENSIONS = {"segment_placement": "uncertain", "rpo_alpha": 1.0}


@pytest.mark.parametrize(
    "loss_type, options",
    [("dpo", {}), ("orpo", {}), ("dpo", SAPO_EXTENSIONS)],
    ids=["dpo", "orpo", "extensions"],
)
def test_resume_is_bit_identical(tmp_path, tokenizer, loss_type, options):
    full = make_trainer(tokenizer, tmp_path / "full", loss_type, save_strategy="no", **options)
    full.train()

    first = make_trainer(tokenizer, tmp_path / "split", loss_type, max_steps=8, **options)
    first.train()
    # checkpoint-3 lies inside a generation round (rounds start at steps 0, 2, 4, 6)
    resumed = make_trainer(tokenizer, tmp_path / "split", loss_type, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))

    assert resumed.state.global_step == 8
    assert_same_weights(full.model, resumed.model)
    assert_same_weights(full.ema.model, resumed.ema.model)
    if loss_type == "dpo":
        assert_same_weights(full.ref_model, resumed.ref_model)
    else:
        assert resumed.ref_model is None
    assert full.buffer.items() == resumed.buffer.items()
    assert full.buffer.times_sampled() == resumed.buffer.times_sampled()
    assert full.ema.num_updates == resumed.ema.num_updates
    # the next draws continue the same sequence
    assert full.buffer.sample(16) == resumed.buffer.sample(16)


def test_checkpoint_contents_are_safe_formats(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3)
    trainer.train()
    folder = tmp_path / "checkpoint-3"
    sapo_files = sorted(p.name for p in folder.iterdir() if p.name.startswith("sapo_"))
    assert sapo_files == [
        "sapo_ema.safetensors",
        "sapo_rank0.json",
        "sapo_rank0.safetensors",
        "sapo_reference.safetensors",
        "sapo_run.json",
    ]
    assert not (tmp_path / ".staging").exists()


def test_resume_never_unpickles(tmp_path, tokenizer, monkeypatch):
    make_trainer(tokenizer, tmp_path, max_steps=3).train()
    loads = []
    original = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    make_trainer(tokenizer, tmp_path, max_steps=4).train(resume_from_checkpoint="last")
    assert loads and all(flag is True for flag in loads)


def test_last_skips_incomplete_checkpoints(tmp_path, tokenizer):
    make_trainer(tokenizer, tmp_path, max_steps=3).train()
    half_written = tmp_path / "checkpoint-7"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"truncated")
    resumed = make_trainer(tokenizer, tmp_path, max_steps=4)
    assert resolve(str(tmp_path), "last") == str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="not a complete SAPO checkpoint"):
        resumed.train(resume_from_checkpoint=str(half_written))


def test_last_without_checkpoints_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        make_trainer(tokenizer, tmp_path).train(resume_from_checkpoint="last")


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(loss_type="orpo"), "loss_type"),
        (dict(rows=addition_rows(40, seed=2)), "dataset"),
        (dict(seed=4), "seed"),
    ],
)
def test_resume_from_another_run_is_refused(tmp_path, tokenizer, change, key):
    make_trainer(tokenizer, tmp_path, max_steps=3).train()
    other = make_trainer(tokenizer, tmp_path, **change)
    with pytest.raises(ValueError, match=f"different run: {key}"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_resume_with_another_world_size_is_refused(tmp_path, tokenizer):
    make_trainer(tokenizer, tmp_path, max_steps=3).train()
    run_file = tmp_path / "checkpoint-3" / RUN_FILE
    identity = json.loads(run_file.read_text())
    identity["world_size"] = 2
    run_file.write_text(json.dumps(identity))
    with pytest.raises(ValueError, match="different run: world_size is 2 there and 1 here"):
        make_trainer(tokenizer, tmp_path).train(resume_from_checkpoint="last")


def test_non_finite_loss_stops_at_its_step_without_a_checkpoint(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path, save_steps=1, gradient_accumulation_steps=1)
    calls = {"n": 0}
    original = trainer.compute_loss

    def poisoned(model, inputs, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third optimizer step
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return original(model, inputs, **kwargs)

    trainer.compute_loss = poisoned
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        trainer.train()
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert all(is_complete(tmp_path / name) for name in checkpoints)


def test_non_finite_weights_are_never_checkpointed(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path, save_steps=1, gradient_accumulation_steps=1)

    class PoisonAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # after the step's loss, before its checkpoint
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("inf"))

    trainer.add_callback(PoisonAfterStep2())
    with pytest.raises(FloatingPointError, match="non-finite weights at step 2; no checkpoint written"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


def test_buffer_tensor_round_trip():
    buffer = ReplayBuffer(capacity=4, seed=1)
    for i in range(6):
        buffer.add(Pair([i] * (i + 1), [i, 1], [], step=i))
    buffer.sample(5)
    tensors, metadata = buffer_to_tensors(buffer.state_dict())
    restored = ReplayBuffer(capacity=4, seed=99)
    restored.load_state_dict(buffer_from_tensors(tensors, metadata))
    assert restored.items() == buffer.items()
    assert restored.times_sampled() == buffer.times_sampled()
    assert restored.sample(8) == buffer.sample(8)


def test_killed_runs_resume_cleanly():
    """A short run of the kill script: SIGKILL at random moments, resume, same final weights."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "kill_resume.py"),
            "--trials",
            "3",
            "--steps",
            "40",
            "--max_wait",
            "3",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 3
    assert summary["clean_resumes"] == 3
    assert summary["final_matches_uninterrupted"] is True


def test_resuming_a_finished_run_trains_no_further(tmp_path, tokenizer):
    finished = make_trainer(tokenizer, tmp_path, max_steps=6, save_steps=6)
    finished.train()
    again = make_trainer(tokenizer, tmp_path, max_steps=6, save_steps=6)
    again.train(resume_from_checkpoint="last")
    assert again.state.global_step == 6
    assert_same_weights(finished.model, again.model)
    assert_same_weights(finished.ema.model, again.ema.model)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
