"""The paper's comparison at small scale: SAPO against SFT, SPIN, DPO and ORPO on built-in tasks.

For each built-in task, every method starts from the same SFT warm start (``builtin:tiny-<task>-sft``,
or ``builtin:micro-worked-multiplication-sft``, a model too small for that task, at its plateau;
``--warm_start`` names another; ``recipes/warm-start/`` gives each one's curve and
``scripts/make_warm_start.py`` reproduces it) and trains for the same number of optimizer steps of
the same batch size on the same prompts of the task's ``preference`` split, which the warm start
never saw (``experiments/paper_methods.py`` says what each method does). The default tasks have long
answers (``worked-multiplication``, ``wide-worked-multiplication``, ``sorting``: 33-61 tokens) so
that a segment is a local part of the answer; ``--tasks multiplication long-multiplication
--segment_length 3`` runs the short ones.

Learning rates are chosen on the validation split: every method is trained with each rate of
its grid at seed 0 and the rate with the best validation exact match is kept (ties: the smaller
rate); that rate is then trained with the other seeds. An ablation of SAPO is not tuned: it is
trained at every seed with the rate chosen for the method it ablates. The table reports test exact
match and test edit distance to the gold answer (mean ± standard deviation over seeds) of the
chosen rate only, with each method's cost and, for SAPO, the fraction of its pairs that were ties.

    python -m experiments.paper_table           # the full grid
    python -m experiments.paper_table --quick   # a reduced grid, to check that every method runs

Writes ``table.md``, ``accuracy.png`` and ``results.json`` (the summary as
``{"tasks": {task: {"mean_answer_tokens", "methods": {method: {"mean", "std", ...}}}}}``, then
every run) to ``--output_dir``. The last line printed is one JSON object with each method's mean
test exact match per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "experiments.paper_table", *sys.argv[1:]])

from tqdm.auto import tqdm

from experiments.paper_methods import ABLATIONS, FAMILY, METHODS, Job, run_job, warm_start_name

LONG_ANSWER_TASKS = ("worked-multiplication", "wide-worked-multiplication", "sorting")
GRIDS = {  # learning rates tried on the validation split, per family
    "full": {"sft": (1e-4, 3e-4), "dpo": (1e-5, 3e-5, 1e-4), "orpo": (1e-4, 3e-4)},
    "quick": {"sft": (1e-4, 3e-4), "dpo": (3e-5, 1e-4), "orpo": (1e-4, 3e-4)},
}
SETTINGS = {
    "full": dict(steps=100, seeds=(0, 1, 2), validation_rows=200, test_rows=500),
    "quick": dict(steps=20, seeds=(0, 1, 2), validation_rows=50, test_rows=100),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the reduced grid (under 15 minutes)")
    parser.add_argument("--tasks", nargs="+", default=list(LONG_ANSWER_TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--steps", type=int, help="optimizer steps of every method (a multiple of 10)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds; the first one chooses the learning rates"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.5, help="DPO's beta and ORPO's lambda, every method")
    parser.add_argument(
        "--segment_length",
        type=int,
        default=8,
        help="SAPO's L (the long answers are 33-61 tokens; 3 for the short-answer tasks)",
    )
    parser.add_argument("--ref_model_sync_steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one CPU thread each")
    parser.add_argument("--output_dir", default="paper-table")
    parser.add_argument(
        "--warm_start", help="a model folder to start from instead of builtin:tiny-<task>-sft (one task only)"
    )
    parser.add_argument(
        "--rates_from",
        help="a results.json of an earlier run: train every method at the rate chosen there (for its first "
        "task) with every seed, instead of choosing rates on this run's validation split",
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
        if warm_start_name(task).removeprefix("builtin:") not in BUILTIN_CHECKPOINTS:
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
    """Train ``jobs`` on ``pool``; a run whose folder holds the result of the very same job (an
    interrupted table run again) is read back instead of trained again."""
    results: dict[int, dict] = {}
    futures = {}
    for index, job in enumerate(jobs):
        saved = Path(job.output_dir) / "result.json"
        record = json.loads(saved.read_text()) if saved.exists() else {}
        if record.get("job") == dataclasses.asdict(job):
            results[index] = record["result"]
        else:
            futures[pool.submit(run_job, job)] = index
    for future in tqdm(as_completed(futures), total=len(futures), desc=description):
        job = jobs[futures[future]]
        results[futures[future]] = future.result()
        record = {"job": dataclasses.asdict(job), "result": results[futures[future]]}
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.output_dir) / "result.json").write_text(json.dumps(record) + "\n")
    return [results[index] for index in range(len(jobs))]


def choose_rates(runs: list[dict], seed: int) -> dict[tuple[str, str], float]:
    """Per (task, method): the learning rate with the best validation exact match at ``seed``;
    equal exact match goes to the lower validation edit distance, then to the smaller rate.

    An ablation is not tuned: it takes the rate chosen for the method it ablates."""

    def score(run: dict) -> tuple[float, float]:
        return run["validation_accuracy"], -run.get("validation_edit_distance", 0.0)

    best: dict[tuple[str, str], dict] = {}
    for run in sorted(runs, key=lambda run: run["learning_rate"]):
        key = (run["task"], run["method"])
        if run["seed"] == seed and (key not in best or score(run) > score(best[key])):
            best[key] = run
    rates = {key: run["learning_rate"] for key, run in best.items()}
    for (task, method), rate in list(rates.items()):
        for ablation, (base, _) in ABLATIONS.items():
            if base == method:
                rates[(task, ablation)] = rate
    return rates


def borrowed_rates(path: Path, tasks, methods) -> dict[tuple[str, str], float]:
    """Each method's rate as chosen in the results file of another run (its first task)."""
    chosen = next(iter(json.loads(path.read_text())["tasks"].values()))["methods"]
    missing = [method for method in methods if method not in chosen]
    if missing:
        raise SystemExit(f"--rates_from {path}: no rate for {', '.join(missing)}")
    return {(task, method): chosen[method]["learning_rate"] for task in tasks for method in methods}


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
            distances = [run["test_edit_distance"] for run in chosen]
            summary[(task, method)] = {
                "learning_rate": rate,
                "seeds": len(chosen),
                "test_mean": statistics.mean(accuracies),
                "test_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "edit_distance_mean": statistics.mean(distances),
                "edit_distance_std": statistics.stdev(distances) if len(distances) > 1 else 0.0,
                "validation_mean": statistics.mean(run["validation_accuracy"] for run in chosen),
                "generated_tokens": statistics.mean(run["generated_tokens"] for run in chosen),
                "seconds": statistics.mean(run["seconds"] for run in chosen),
            }
            if all("tied_fraction" in run for run in chosen):
                summary[(task, method)]["tied_fraction"] = statistics.mean(
                    run["tied_fraction"] for run in chosen
                )
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
            "| method | test exact match | vs SFT | test edit distance | validation | learning rate "
            "| ties | generated tokens | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method in methods:
            row = summary[(task, method)]
            rate = "–" if method == "SFT" else f"{row['learning_rate']:g}"
            gain = "–" if start is None or method == "SFT" else f"{row['test_mean'] - start:+.3f}"
            ties = f"{row['tied_fraction']:.2f}" if "tied_fraction" in row else "–"
            lines.append(
                f"| {method} | {row['test_mean']:.3f} ± {row['test_std']:.3f} | {gain} | "
                f"{row['edit_distance_mean']:.4f} ± {row['edit_distance_std']:.4f} | "
                f"{row['validation_mean']:.3f} | {rate} | {ties} | {row['generated_tokens']:,.0f} | "
                f"{row['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def results_document(summary: dict, tasks, methods, answer_tokens: dict[str, float]) -> dict:
    """``{"tasks": {task: {"mean_answer_tokens", "methods": {method: {"mean", "std", ...}}}}}``:
    test exact match mean and std over seeds, then the other figures of the table."""
    document = {"tasks": {}}
    for task in tasks:
        rows = {}
        for method in methods:
            row = summary[(task, method)]
            rows[method] = {
                "mean": round(row["test_mean"], 4), "std": round(row["test_std"], 4),
                **{name: value if name == "learning_rate" or not isinstance(value, float) else round(value, 4)
                   for name, value in row.items() if name not in ("test_mean", "test_std")},
            }  # fmt: skip
        document["tasks"][task] = {"mean_answer_tokens": round(answer_tokens[task], 2), "methods": rows}
    return document


def mean_answer_tokens(task: str, rows: int) -> float:
    """Mean tokens of the gold answers (EOS included) of the first ``rows`` test rows."""
    from sapo.builtin.tasks import task_rows
    from sapo.builtin.tiny import char_tokenizer

    golds = [gold for _, gold in task_rows(char_tokenizer(), task, "test", rows)]
    return float(statistics.mean(len(gold) for gold in golds))


def plot(summary: dict, tasks, methods, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(max(9.0, 6.5 * len(tasks)), 1.6 + 0.32 * len(methods)),
        constrained_layout=True,
        squeeze=False,
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


def end_with_the_driver() -> None:
    """A worker's initializer: on Linux the kernel sends the worker SIGTERM when the driver ends,
    however it ends. A driver stopped by a signal runs no cleanup, and its workers would otherwise
    train on, orphaned, until their jobs finish."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    first, rest = args.seeds[0], args.seeds[1:]
    methods = ["SFT", *(method for method in args.methods if method != "SFT")]
    # an ablation needs its method's chosen rate: that method is tuned even if not asked for
    tuned = [
        method for method in FAMILY
        if method in methods or any(ABLATIONS[other][0] == method for other in methods if other in ABLATIONS)
    ]  # fmt: skip
    tuning = [
        make_job(args, task, method, rate, first)
        for task in args.tasks
        for method in tuned
        for rate in ((0.0,) if FAMILY[method] is None else args.grid[FAMILY[method]])
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=end_with_the_driver) as pool:
        if args.rates_from:
            rates, rest = borrowed_rates(Path(args.rates_from), args.tasks, methods), args.seeds
            runs = []
        else:
            runs = run_all(args, tuning, pool, f"learning rates (seed {first})")
            rates = choose_rates(runs, first)
        # the main methods' seeds first, then the ablations seed by seed: a run cut short still
        # has every ablation at its first seeds
        main = [
            (task, method, seed)
            for task in args.tasks
            for method in methods
            if method not in ABLATIONS
            for seed in rest
        ]
        ablated = [(task, method, seed) for seed in args.seeds for task in args.tasks for method in methods
                   if method in ABLATIONS]  # fmt: skip
        seeds = [
            make_job(args, task, method, rates[(task, method)], seed) for task, method, seed in main + ablated
        ]
        runs += run_all(args, seeds, pool, f"seeds {', '.join(map(str, rest))}")
    minutes = (time.perf_counter() - started) / 60

    summary = summarize(runs, rates, args.tasks, methods)
    table = markdown(summary, args.tasks, methods, args)
    command = "python -m experiments.paper_table" + (" --quick" if args.quick else "")
    (output / "table.md").write_text(f"{table}\nReproduce: `{command}` ({minutes:.1f} min).\n")
    title = f"Same SFT warm start, {args.steps} steps per method; learning rates chosen on validation"
    plot(summary, args.tasks, methods, output / "accuracy.png", title)
    settings = {key: value for key, value in vars(args).items() if key != "grid"}
    answer_tokens = {task: mean_answer_tokens(task, args.test_rows) for task in args.tasks}
    record = {
        **results_document(summary, args.tasks, methods, answer_tokens),
        "settings": settings, "grid": args.grid, "minutes": round(minutes, 1), "runs": runs,
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
