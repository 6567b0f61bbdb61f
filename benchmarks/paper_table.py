"""The paper's comparison at small scale: SAPO against SFT, SPIN, DPO and ORPO on built-in tasks.

For each built-in task, every method starts from the same SFT warm start (``builtin:tiny-<task>-sft``,
trained on the task's ``train`` split until its validation exact match stopped rising;
``scripts/make_warm_start.py`` reproduces it) and trains for the same number of optimizer steps of
the same batch size on the same prompts of the task's ``preference`` split, which the warm start
never saw (``benchmarks/paper_methods.py`` says what each method does).

Learning rates are chosen on the validation split: every method is trained with each rate of
its grid at seed 0 and the rate with the best validation exact match is kept (ties: the smaller
rate); that rate is then trained with the other seeds. The table reports test exact match
(mean ± standard deviation over seeds) of the chosen rate only, with each method's cost.

    python benchmarks/paper_table.py           # the full grid (14 minutes on 2 CPU cores)
    python benchmarks/paper_table.py --quick   # a reduced grid (3 minutes on 2 CPU cores)

Writes ``table.md``, ``accuracy.png`` and ``results.json`` (every run) to ``--output_dir``. The
last line printed is one JSON object with each method's mean test exact match per task.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_methods import FAMILY, METHODS, Job, run_job, warm_start_name  # noqa: E402

GRIDS = {  # learning rates tried on the validation split, per family
    "full": {"sft": (3e-5, 1e-4, 3e-4), "dpo": (1e-5, 3e-5, 1e-4), "orpo": (3e-5, 1e-4, 3e-4)},
    "quick": {"sft": (1e-4, 3e-4), "dpo": (3e-5, 1e-4), "orpo": (1e-4, 3e-4)},
}
SETTINGS = {
    "full": dict(steps=500, seeds=(0, 1, 2), validation_rows=500, test_rows=1000),
    "quick": dict(steps=100, seeds=(0, 1, 2), validation_rows=300, test_rows=500),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the reduced grid (under 15 minutes)")
    parser.add_argument("--tasks", nargs="+", default=["multiplication", "long-multiplication"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--steps", type=int, help="optimizer steps of every method (a multiple of 10)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds; the first one chooses the learning rates"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.5, help="DPO's beta and ORPO's lambda, every method")
    parser.add_argument("--segment_length", type=int, default=3, help="SAPO's L (answers are 4-7 tokens)")
    parser.add_argument("--ref_model_sync_steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one CPU thread each")
    parser.add_argument("--output_dir", default="paper-table")
    parser.add_argument(
        "--warm_start", help="a model folder to start from instead of builtin:tiny-<task>-sft (one task only)"
    )
    args = parser.parse_args(argv)
    scale = "quick" if args.quick else "full"
    for name, value in SETTINGS[scale].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.validation_rows, args.test_rows = SETTINGS[scale]["validation_rows"], SETTINGS[scale]["test_rows"]
    args.grid = GRIDS[scale]
    if args.warm_start and len(args.tasks) != 1:
        parser.error("--warm_start goes with exactly one --tasks entry")
    from sapo.builtin import BUILTIN_CHECKPOINTS

    for task in [] if args.warm_start else args.tasks:
        if f"tiny-{task}-sft" not in BUILTIN_CHECKPOINTS:
            parser.error(f"no shipped warm start for builtin:{task}; pass --warm_start")
    if args.steps <= 0 or args.steps % 10:
        parser.error(
            "--steps must be a positive multiple of 10 (SAPO logs its generated tokens every 10 steps)"
        )
    return args


def make_job(args, task: str, method: str, learning_rate: float, seed: int) -> Job:
    folder = f"{task}-{method}-{learning_rate:g}-{seed}".replace(" ", "").replace(",", "-")
    return Job(
        task=task, method=method, learning_rate=learning_rate, seed=seed, steps=args.steps,
        batch_size=args.batch_size, beta=args.beta, segment_length=args.segment_length,
        ref_model_sync_steps=args.ref_model_sync_steps, validation_rows=args.validation_rows,
        test_rows=args.test_rows, output_dir=str(Path(args.output_dir) / "runs" / folder),
        warm_start=args.warm_start or warm_start_name(task),
    )  # fmt: skip


def run_all(args, jobs: list[Job], pool, description: str) -> list[dict]:
    results = []
    futures = [pool.submit(run_job, job) for job in jobs]
    for future in tqdm(futures, desc=description):
        results.append(future.result())
    return results


def choose_rates(runs: list[dict], seed: int) -> dict[tuple[str, str], float]:
    """Per (task, method): the learning rate with the best validation exact match at ``seed``."""
    best: dict[tuple[str, str], dict] = {}
    for run in sorted(runs, key=lambda run: run["learning_rate"]):
        key = (run["task"], run["method"])
        if run["seed"] == seed and (
            key not in best or run["validation_accuracy"] > best[key]["validation_accuracy"]
        ):
            best[key] = run
    return {key: run["learning_rate"] for key, run in best.items()}


def summarize(runs: list[dict], rates: dict, tasks, methods) -> dict:
    """Mean and standard deviation over seeds of the chosen rate's runs."""
    summary = {}
    for task in tasks:
        for method in methods:
            rate = rates[(task, method)]
            chosen = [
                run for run in runs
                if (run["task"], run["method"], run["learning_rate"]) == (task, method, rate)
            ]  # fmt: skip
            accuracies = [run["test_accuracy"] for run in chosen]
            summary[(task, method)] = {
                "learning_rate": rate,
                "seeds": len(chosen),
                "test_mean": statistics.mean(accuracies),
                "test_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "validation_mean": statistics.mean(run["validation_accuracy"] for run in chosen),
                "generated_tokens": statistics.mean(run["generated_tokens"] for run in chosen),
                "seconds": statistics.mean(run["seconds"] for run in chosen),
            }
    return summary


def markdown(summary: dict, tasks, methods, args) -> str:
    lines = []
    for task in tasks:
        start = summary[(task, "SFT")]["test_mean"] if (task, "SFT") in summary else None
        lines += [
            f"**builtin:{task}** (from `{args.warm_start or warm_start_name(task)}`; {args.steps} steps of "
            f"{args.batch_size} rows; test exact match on {args.test_rows} rows, mean ± std over "
            f"{len(args.seeds)} seeds)",
            "",
            "| method | test exact match | vs SFT | validation | learning rate | generated tokens "
            "| seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for method in methods:
            row = summary[(task, method)]
            rate = "–" if method == "SFT" else f"{row['learning_rate']:g}"
            gain = "–" if start is None or method == "SFT" else f"{row['test_mean'] - start:+.3f}"
            lines.append(
                f"| {method} | {row['test_mean']:.3f} ± {row['test_std']:.3f} | {gain} | "
                f"{row['validation_mean']:.3f} | {rate} | {row['generated_tokens']:,.0f} | "
                f"{row['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, tasks, methods, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(tasks), figsize=(max(9.0, 6.5 * len(tasks)), 5.2), constrained_layout=True, squeeze=False
    )
    for axis, task in zip(axes[0], tasks):
        means = [summary[(task, method)]["test_mean"] for method in methods]
        stds = [summary[(task, method)]["test_std"] for method in methods]
        for row, (method, mean, std) in enumerate(zip(methods, means, stds)):
            color = "tab:green" if method.startswith("SAPO") else "tab:gray"
            axis.errorbar(mean, row, xerr=std, fmt="o", color=color, markersize=7, capsize=4)
        axis.set_yticks(range(len(methods)), methods, fontsize=10)
        axis.invert_yaxis()
        if (task, "SFT") in summary:
            axis.axvline(summary[(task, "SFT")]["test_mean"], color="black", linestyle=":", linewidth=1)
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        axis.set_xlim(max(0.0, low - 0.05), min(1.0, high + 0.03))
        axis.set_xlabel("test exact match (mean ± std over seeds)", fontsize=11)
        axis.set_title(f"builtin:{task}", fontsize=12)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=12)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    first, rest = args.seeds[0], args.seeds[1:]
    methods = ["SFT", *(method for method in args.methods if method != "SFT")]
    tuning = [
        make_job(args, task, method, rate, first)
        for task in args.tasks
        for method in methods
        for rate in ((0.0,) if FAMILY[method] is None else args.grid[FAMILY[method]])
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        runs = run_all(args, tuning, pool, f"learning rates (seed {first})")
        rates = choose_rates(runs, first)
        seeds = [
            make_job(args, task, method, rates[(task, method)], seed)
            for (task, method) in rates
            for seed in rest
        ]
        runs += run_all(args, seeds, pool, f"seeds {', '.join(map(str, rest))}")
    minutes = (time.perf_counter() - started) / 60

    summary = summarize(runs, rates, args.tasks, methods)
    table = markdown(summary, args.tasks, methods, args)
    command = "python benchmarks/paper_table.py" + (" --quick" if args.quick else "")
    (output / "table.md").write_text(f"{table}\nReproduce: `{command}` ({minutes:.1f} min).\n")
    title = f"Same SFT warm start, {args.steps} steps per method; learning rates chosen on validation"
    plot(summary, args.tasks, methods, output / "accuracy.png", title)
    settings = {key: value for key, value in vars(args).items() if key != "grid"}
    record = {
        "settings": settings, "grid": args.grid, "minutes": round(minutes, 1), "runs": runs,
        "summary": [{"task": task, "method": method, **row} for (task, method), row in summary.items()],
    }  # fmt: skip
    (output / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    written = ", ".join(str(output / name) for name in ("table.md", "accuracy.png", "results.json"))
    print(f"Wrote {written} ({minutes:.1f} min)")
    mean_accuracy = {
        method: {task: round(summary[(task, method)]["test_mean"], 4) for task in args.tasks}
        for method in methods
    }
    print(
        json.dumps({"quick": args.quick, "minutes": round(minutes, 1), "mean_test_accuracy": mean_accuracy})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
