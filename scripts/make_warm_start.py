"""Reproduce the SFT warm starts shipped as `builtin:<size>-<task>-sft`; measure where SFT plateaus.

    python scripts/make_warm_start.py [--install] [--dataset_name builtin:TASK] [--name NAME] [flags ...]

Runs `sapo sft --config recipes/warm-start/NAME.yaml` (NAME defaults to `tiny-<task>-sft`; other
flags are passed on to it), scores every saved checkpoint by greedy exact match on the task's
validation split, and prints the curve. `--install` then copies the final weights into
src/sapo/builtin/assets/NAME, the built-in model `builtin:NAME`. The final model is also scored
on the first 1000 rows of every split (train against test shows whether it learned its data by
heart). The last line printed is a JSON object.

Measure other budgets with e.g. `--max_steps 12000` (the cosine schedule then decays over the
shorter run): the recipes' budgets are where the validation exact match stopped rising.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from sapo.builtin import builtin_name, checkpoint_path
from sapo.builtin.tasks import SPLITS, task_accuracy
from sapo.builtin.tiny import char_tokenizer
from sapo.cli import main as sapo

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "warm-start"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def validation_accuracy(model_dir: Path, task: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return task_accuracy(model, char_tokenizer(), task, "validation")


def split_accuracies(model_dir: Path, task: str, rows: int = 1000) -> dict[str, float]:
    """Exact match on the first ``rows`` of every split: a train score far above the test score
    means the split was learned by heart."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {split: task_accuracy(model, char_tokenizer(), task, split, rows) for split in SPLITS}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--install", action="store_true", help="copy the final weights into the package")
    parser.add_argument("--dataset_name", default="builtin:multiplication")
    parser.add_argument("--name", help="the warm start's recipe and built-in name; default tiny-<task>-sft")
    parser.add_argument("--output_dir", help="default: outputs/NAME")
    args, sft_flags = parser.parse_known_args()
    task = builtin_name(args.dataset_name)
    args.name = args.name or f"tiny-{task}-sft"
    recipe = RECIPES / f"{args.name}.yaml"
    if task is None or not recipe.exists():
        parser.error(f"--dataset_name must be a built-in task and {args.name}.yaml a recipe in {RECIPES}")
    args.output_dir = args.output_dir or str(ROOT / "outputs" / args.name)

    started = time.perf_counter()
    flags = ["--dataset_name", args.dataset_name, "--output_dir", args.output_dir, *sft_flags]
    status = sapo(["sft", "--config", str(recipe), *flags])
    if status:
        return status
    minutes = (time.perf_counter() - started) / 60

    output = Path(args.output_dir)
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    curve = [(int(path.name.split("-")[1]), validation_accuracy(path, task)) for path in checkpoints]
    print(
        f"{args.dataset_name}: validation exact match of the SFT checkpoints ({minutes:.1f} min of training)"
    )
    for step, accuracy in curve:
        print(f"  step {step:>6}  {accuracy:.3f}")
    final = validation_accuracy(output, task)
    print(f"  final        {final:.3f}")
    splits = split_accuracies(output, task)
    print("  final, first 1000 rows of each split: " + ", ".join(f"{k} {v:.3f}" for k, v in splits.items()))

    if args.install:
        target = checkpoint_path(args.name)
        target.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copy2(output / name, target / name)
        print(f"installed {', '.join(MODEL_FILES)} into {target}")
    print(
        json.dumps(
            {
                "task": task,
                "curve": curve,
                "final_accuracy": final,
                "split_accuracy": splits,
                "train_minutes": round(minutes, 1),
            }  # fmt: skip
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
