"""The ``sapo`` command.

    sapo train --config recipes/llama-3-8b/sapo-dpo.yaml [--field value ...]
    sapo sft   --config recipes/llama-3-8b/sft.yaml [--field value ...]
    sapo spin  --model_name_or_path MODEL --dataset_name DATA [--field value ...]
    sapo eval  --model_name_or_path MODEL --dataset_name DATA [--field value ...]
    sapo eval  --model_name_or_path MODEL --suite lm-eval --tasks T1,T2 [--include_path DIR] [...]
    sapo generate --suite alpaca-eval|mt-bench|arena-hard --model_name_or_path M --prompts FILE --output FILE
    sapo demo  [--output_dir sapo-demo] [--overwrite]

Each command runs in two phases. ``prepare`` checks all of the input (arguments, model, data,
tokenization) and writes nothing; its output is held back until it succeeds. Then the returned
``run`` does the work. Bad input ends the command in ``prepare`` with exit status 2 and a single
line ``error: ...`` on stderr; ``--debug`` shows the traceback and the held-back output instead.

While ``run`` works, what comes from the input or the disk ends the command the same way, after
the output it has printed: a checkpoint that is damaged, incomplete or another run's
(:class:`sapo.checkpoints.CheckpointError`), a non-finite loss (``FloatingPointError``, naming
the step and what to try) and the disk (``OSError``: full, over quota, read-only). Anything else
is a fault of the program and keeps its traceback. ``run`` returns the exit status: 0, or for a
training run stopped by SIGTERM or SIGINT after writing a checkpoint, 143 or 130
(:mod:`sapo.checkpoints.preemption`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence

from sapo.builtin import BUILTIN_MODELS
from sapo.builtin.tasks import TASKS
from sapo.checkpoints import CheckpointError
from sapo.cli.arguments import closest
from sapo.cli.commands import COMMANDS

_USAGE = """usage: sapo <command> [--config FILE.yaml] [--field value ...] [--debug]

Self-Augmented Preference Optimization (arXiv 2405.20830).

commands:
  train   SAPO training (SAPO-DPO or SAPO-ORPO) on SFT data
  sft     supervised fine-tuning, e.g. the warm start for SAPO-DPO
  spin    the SPIN baseline: each iteration trains on gold vs the model's own full answers
  eval    gold log-prob, gold-vs-own-segment margin, win rate (and exact match on built-in tasks);
          --suite lm-eval: lm-evaluation-harness tasks (IFEval, the Open LLM Leaderboard, local YAML)
  generate  the model's answers for the AlpacaEval, MT-Bench or Arena-Hard judges
          (--suite alpaca-eval|mt-bench|arena-hard)
  demo    offline demo on a built-in task: SFT vs SAPO-DPO vs SAPO-ORPO, in minutes on a CPU
  plan    memory per device of a recipe's run (weights, EMA, reference, activations...) and whether it fits

`sapo <command> --help` lists a command's fields. Built-in names work offline:
{models};
{tasks} (splits train, preference, validation, test)."""


def _wrapped(label: str, names) -> str:
    """``label`` and the ``builtin:`` names, wrapped at 95 columns."""
    return textwrap.fill(
        f"{label} " + ", ".join(f"builtin:{name}" for name in names), width=95, break_on_hyphens=False
    )


USAGE = _USAGE.format(models=_wrapped("models", BUILTIN_MODELS), tasks=_wrapped("datasets", TASKS))

# bad input surfaces as one of these while a command prepares
INPUT_ERRORS = (ValueError, TypeError, KeyError, OSError)


def _name_the_cpu_for_deepspeed() -> None:
    """DeepSpeed, when installed, prints to stdout that it fell back to the CPU whenever accelerate
    imports it; on a machine with no accelerator, name the CPU up front so that nothing lands
    among the command's output (tables, JSON)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not available:
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sapo`` console script; returns the exit status."""
    _name_the_cpu_for_deepspeed()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}{closest(command, list(COMMANDS))}", file=sys.stderr)
        return 2
    held_back = io.StringIO()
    try:
        with _holding_stderr(held_back):
            run = COMMANDS[command](rest)
    except INPUT_ERRORS as error:
        if debug:
            sys.stderr.write(held_back.getvalue())
            raise
        return _error(error)
    sys.stderr.write(held_back.getvalue())
    try:
        return run() or 0
    except (CheckpointError, FloatingPointError, OSError) as error:  # from the input or the disk
        if debug:
            raise
        return _error(error)


def _error(error: Exception) -> int:
    """Print ``error`` as the one line ``error: ...`` on stderr; the exit status of bad input."""
    message = " ".join(str(error).split()) if not isinstance(error, KeyError) else f"missing key {error}"
    print(f"error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _holding_stderr(buffer: io.StringIO) -> Iterator[None]:
    """Collect everything written to stderr (Python writes and file descriptor 2) into ``buffer``.

    Libraries print progress bars and warnings while a command prepares; on bad input the user
    should see the one ``error:`` line only.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        try:
            saved_fd = os.dup(2)
        except OSError:  # no file descriptor 2 (embedded interpreters): hold Python writes only
            saved_fd = None
        if saved_fd is not None:
            os.dup2(captured.fileno(), 2)
        try:
            with contextlib.redirect_stderr(buffer):
                yield
        finally:
            if saved_fd is not None:
                sys.__stderr__.flush()
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
                captured.seek(0)
                buffer.write(captured.read().decode(errors="replace"))


if __name__ == "__main__":
    sys.exit(main())
