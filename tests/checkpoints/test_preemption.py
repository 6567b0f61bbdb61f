"""Preemption: SIGTERM or SIGINT sent to a real `sapo train` process finishes the optimizer step,
writes a complete checkpoint and exits 143 or 130; resuming it ends on the weights of a run that
was never stopped. The signal is sent at chosen moments: during generation, during an update and
during a checkpoint write (which finishes, or is discarded on a second Ctrl-C)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoints import make_trainer
from transformers import TrainerCallback

from sapo.checkpoints import inspect, is_complete, stop_on_signals

ROOT = Path(__file__).resolve().parents[2]

# `sapo train` with a hook that prints MOMENT at the chosen point and waits there for the signal
DRIVER = """
import sys, time
import sapo.trainer
from sapo.cli import main

moment, step = sys.argv[1], int(sys.argv[2])

def announce():
    print("MOMENT", flush=True)
    time.sleep(3)

if moment == "generation":  # inside the EMA's sampling of the step-th step's segments
    generate, calls = sapo.trainer.self_augmented_pairs, []
    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            announce()
        return generate(*args, **kwargs)
    sapo.trainer.self_augmented_pairs = hooked
elif moment == "update":  # in the loss of the step-th step
    compute = sapo.trainer.SAPOTrainer.compute_loss
    def hooked(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            announce()
        return compute(self, *args, **kwargs)
    sapo.trainer.SAPOTrainer.compute_loss = hooked
elif moment == "checkpoint":  # Trainer's files of checkpoint-<step> written, SAPO's not yet
    save = sapo.checkpoints.save
    def hooked(parts, directory, rank, is_main_process, global_step):
        if global_step == step:
            announce()
        return save(parts, directory, rank, is_main_process, global_step)
    sapo.checkpoints.save = hooked
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows = [{"prompt": f"{a}+{a + 7}=", "completion": str(2 * a + 7)} for a in range(10, 58)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_command(rows_file, output_dir, *extra):
    return [
        "train", "--model_name_or_path", "builtin:tiny", "--dataset_name", str(rows_file),
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--max_length", "32",
        "--segment_length", "2", "--replay_buffer_size", "8", "--save_strategy", "steps",
        "--save_steps", "2", "--logging_steps", "100", "--report_to", "none", "--disable_tqdm", "true",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def sapo_train(rows_file, output_dir, moment="none", step=0, signals=(), *extra):
    """Run `sapo train`; once it reaches ``moment`` of ``step``, send ``signals`` half a second
    apart. Returns the exit status and stderr."""
    stderr = Path(str(output_dir) + ".stderr")
    command = [sys.executable, "-c", DRIVER, moment, str(step), *train_command(rows_file, output_dir, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        if signals:
            for line in process.stdout:
                if line.startswith("MOMENT"):
                    break
            for signum in signals:
                process.send_signal(signum)
                time.sleep(0.5)
        process.communicate(timeout=600)
    return process.returncode, stderr.read_text()


def final_tensors(output_dir):
    """The trained model and the EMA at the run's end."""
    return {
        **load_file(str(Path(output_dir) / "model.safetensors")),
        **{
            f"ema.{k}": v
            for k, v in load_file(str(Path(output_dir) / "checkpoint-6" / "sapo_ema.safetensors")).items()
        },
    }


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(rows_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    status, stderr = sapo_train(rows_file, output)
    assert status == 0, stderr[-3000:]
    return final_tensors(output)


def assert_stopped_with_a_checkpoint(output, status, stderr, name, code, step):
    assert status == code, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == f"stopped by {name} after step {step}: resume the run from {output}/checkpoint-{step}"
    assert "Traceback" not in stderr
    checkpoints = sorted(p.name for p in output.glob("checkpoint-*"))
    assert checkpoints[-1] == f"checkpoint-{step}" and is_complete(output / checkpoints[-1])
    assert inspect(output / checkpoints[-1]).verified
    assert not (output / ".staging").exists()
    assert not (output / "model.safetensors").exists()  # the final model is saved by the run that ends


def resume_and_compare(rows_file, output, uninterrupted):
    status, stderr = sapo_train(rows_file, output, "none", 0, (), "--resume_from_checkpoint", "last")
    assert status == 0, stderr[-3000:]
    assert_same_tensors(final_tensors(output), uninterrupted)


def test_sigterm_during_generation_checkpoints_that_step(rows_file, tmp_path, uninterrupted):
    output = tmp_path / "run"
    status, stderr = sapo_train(rows_file, output, "generation", 3, (signal.SIGTERM,))
    assert_stopped_with_a_checkpoint(output, status, stderr, "SIGTERM", 143, 3)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    resume_and_compare(rows_file, output, uninterrupted)


def test_sigterm_during_a_checkpoint_write_lets_it_finish_and_stops(rows_file, tmp_path, uninterrupted):
    output = tmp_path / "run"
    # a second SIGTERM (a wrapper script forwarding the same one) changes nothing
    status, stderr = sapo_train(rows_file, output, "checkpoint", 2, (signal.SIGTERM, signal.SIGTERM))
    assert_stopped_with_a_checkpoint(output, status, stderr, "SIGTERM", 143, 2)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    resume_and_compare(rows_file, output, uninterrupted)


def test_sigint_during_an_update_checkpoints_that_step(rows_file, tmp_path):
    output = tmp_path / "run"
    status, stderr = sapo_train(rows_file, output, "update", 5, (signal.SIGINT,))
    assert_stopped_with_a_checkpoint(output, status, stderr, "SIGINT", 130, 5)


def test_a_second_sigint_during_a_checkpoint_write_discards_it(rows_file, tmp_path):
    output = tmp_path / "run"
    status, stderr = sapo_train(rows_file, output, "checkpoint", 4, (signal.SIGINT, signal.SIGINT))
    assert status != 0 and "KeyboardInterrupt" in stderr
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete(output / "checkpoint-2")
    assert not (output / ".staging").exists()


class SendAtStep(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_stop_on_signals_checkpoints_and_restores_the_handlers(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path, save_strategy="no")
    trainer.add_callback(SendAtStep(2, signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals(trainer) as stop:
        trainer.train()
    assert (stop.received, stop.stopped_at, stop.exit_code) == (signal.SIGTERM, 2, 143)
    assert trainer.state.global_step == 2
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]  # although save_strategy="no"
    assert is_complete(tmp_path / "checkpoint-2")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop not in trainer.callback_handler.callbacks


def test_handlers_are_restored_when_training_fails(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"), stop_on_signals(trainer):
        assert signal.getsignal(signal.SIGTERM) != before
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before


def test_no_signal_means_no_stop(tmp_path, tokenizer):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, save_strategy="no")
    with stop_on_signals(trainer) as stop:
        trainer.train()
    assert (stop.received, stop.stopped_at, stop.exit_code) == (None, None, 0)
    assert trainer.state.global_step == 2 and not list(tmp_path.glob("checkpoint-*"))


def test_sigterm_at_random_moments_resumes_cleanly():
    """A short run of the kill script with SIGTERM: each stop leaves a checkpoint, same final weights."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kill_resume.py"), "--signal", "TERM", "--trials", "1",
         "--steps", "300", "--max_wait", "3", "--seed", "2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["signal"] == "TERM" and summary["trials"] == 1
    assert summary["clean_resumes"] == 1 and summary["final_matches_uninterrupted"] is True


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Two processes (torchrun, gloo): rank 1 alone gets SIGTERM; both stop after step 2 with one
    checkpoint and exit 143."""
    worker = Path(__file__).with_name("preemption_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [*command, str(worker), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode != 0  # torchrun reports the workers' status 143 as a failure
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"stopped_at": 2, "exit_code": 143, "global_step": 2}] * 2, result.stderr[-3000:]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert is_complete(tmp_path / "checkpoint-2", world_size=2)
