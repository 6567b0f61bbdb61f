"""Kill a SAPO run at random moments, resume it each time, and check nothing is lost.

Each trial starts (or resumes, from the newest complete checkpoint) a run, waits a random time,
and sends it a signal. With ``--signal KILL`` (the default) the run saves a checkpoint every step
and dies at once; a trial is clean when every ``checkpoint-*`` folder left behind is complete and
the next start resumes from the newest one. With ``--signal TERM`` the run saves no checkpoint of
its own: it must finish its step, write a checkpoint and exit 143 (``sapo.checkpoints.preemption``),
and a trial is clean when it did and the next start resumes from that checkpoint. After the trials
the run is finished without interruption and its final weights are compared with those of a run
that was never stopped.

    python scripts/kill_resume.py --trials 20
    python scripts/kill_resume.py --trials 10 --signal TERM

Last line: one JSON object with ``trials``, ``clean_resumes``, ``final_matches_uninterrupted``
and ``signal``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = "SAPO-TRAINING-STARTED"
STOPPED = "SAPO-TRAINING-STOPPED"


def child(output_dir: str, max_steps: int, loss_type: str, save_steps: int) -> None:
    """One training process: resume from the newest complete checkpoint if there is one; exit
    with 143 after the checkpoint a SIGTERM asks for."""
    import datasets
    import transformers
    from datasets import Dataset

    from sapo import SAPOConfig, SAPOTrainer
    from sapo.builtin.tiny import char_tokenizer, tiny_llama
    from sapo.checkpoints import resolve, stop_on_signals

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = char_tokenizer()
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    args = SAPOConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        sample_every_n_steps=2,
        segment_length=4,
        ref_model_sync_steps=5,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=1000,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SAPOTrainer(
        model=tiny_llama(tokenizer, seed=0),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    try:
        resume = resolve(output_dir, "last")  # the checkpoint the trainer will take
    except ValueError:
        resume = None
    with stop_on_signals(trainer) as stop:
        print(f"{STARTED} resume_from={resume.rsplit('-', 1)[-1] if resume else 'none'}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:
        print(f"{STOPPED} at={stop.stopped_at}", flush=True)
        sys.exit(stop.exit_code)
    digest = hashlib.sha256()
    for tensor in trainer.model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    Path(output_dir, "final.json").write_text(json.dumps({"sha256": digest.hexdigest()}))


def run_child(
    output_dir: Path, max_steps: int, loss_type: str, kill_after: float | None, signum: int = signal.SIGKILL
) -> tuple[str, int, int | None]:
    """Start a child; with ``kill_after``, send it ``signum`` that many seconds after training
    starts. Returns its first line, its exit status and the step it said it stopped at."""
    # under SIGKILL a checkpoint every step; under SIGTERM only the one the signal asks for
    save_steps = 1 if signum == signal.SIGKILL else max_steps
    command = [sys.executable, __file__, "--child", str(output_dir), "--steps", str(max_steps)]
    command += ["--loss", loss_type, "--save_steps", str(save_steps)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # libraries may print before the child does (DeepSpeed, once installed, announces its accelerator)
    first_line = process.stdout.readline()
    while first_line and STARTED not in first_line:
        first_line = process.stdout.readline()
    if kill_after is not None:
        time.sleep(kill_after)
        process.send_signal(signum)
    rest = process.communicate()[0]
    stopped = [int(line.split("at=")[1]) for line in rest.splitlines() if line.startswith(STOPPED)]
    return first_line.strip(), process.returncode, (stopped[0] if stopped else None)


def newest_complete(output_dir: Path) -> tuple[int | None, bool]:
    """Newest complete checkpoint step, and whether every checkpoint-* folder is complete."""
    from sapo.checkpoints import is_complete

    folders = list(output_dir.glob("checkpoint-*")) if output_dir.exists() else []
    complete = [int(p.name.split("-")[1]) for p in folders if is_complete(p)]
    return (max(complete) if complete else None), len(complete) == len(folders)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1500, help="long enough that every kill lands mid-run")
    parser.add_argument("--loss", default="dpo", choices=["dpo", "orpo"])
    parser.add_argument("--max_wait", type=float, default=4.0, help="longest wait before a kill, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--signal", default="KILL", choices=["KILL", "TERM"], help="the signal each trial sends"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--save_steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.loss, args.save_steps)
        return {}
    signum = signal.Signals[f"SIG{args.signal}"]

    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="sapo-kill-"))
    try:
        reference, killed = workdir / "uninterrupted", workdir / "killed"
        run_child(reference, args.steps, args.loss, kill_after=None)
        clean = 0
        for trial in range(args.trials):
            expected, all_complete = newest_complete(killed)
            wait = rng.uniform(0.0, args.max_wait)
            started, status, stopped = run_child(killed, args.steps, args.loss, wait, signum)
            resumed_from = started.split("resume_from=")[-1] if STARTED in started else None
            ok = all_complete and resumed_from == (str(expected) if expected is not None else "none")
            outcome = f"exit {status}"
            if signum == signal.SIGTERM:  # it must have stopped with a checkpoint of the step it reached
                newest, _ = newest_complete(killed)
                ok = ok and status == 128 + signum and stopped is not None and newest == stopped
                outcome += f", checkpoint-{stopped} written"
            clean += ok
            print(
                f"trial {trial + 1}: resumed from {resumed_from}, newest complete before {expected}, "
                f"all folders complete: {all_complete}, {outcome} -> {'clean' if ok else 'NOT clean'}",
                flush=True,
            )
        run_child(killed, args.steps, args.loss, kill_after=None)
        final = {
            name: json.loads((workdir / name / "final.json").read_text())["sha256"]
            for name in ("uninterrupted", "killed")
        }
        result = {
            "trials": args.trials,
            "clean_resumes": clean,
            "final_matches_uninterrupted": final["uninterrupted"] == final["killed"],
            "loss_type": args.loss,
            "steps": args.steps,
            "signal": args.signal,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
