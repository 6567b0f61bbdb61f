"""How results are shown: aligned tables (for the terminal and Markdown alike) and curve figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

METRIC_LABELS = {
    "accuracy": "exact match",
    "margin": "margin",
    "win_rate": "win rate",
    "gold_logp": "gold log-prob",
}


def format_value(value: object) -> str:
    """A result to three decimals (scores and margins are compared at that precision)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_setting(value: object) -> str:
    """A setting exactly as given: Python's shortest form that reads back to the same number
    (``3e-05``, ``0.0005``, ``0.5``), since three decimals would print a learning rate as 0.000."""
    return repr(value) if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown pipe table whose columns are also aligned as plain text."""
    cells = [list(header)] + [[format_value(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def settings_table(settings: Mapping[str, object]) -> str:
    """A two-column table of settings, each value exact (:func:`format_setting`)."""
    rows = [[name, format_setting(value)] for name, value in settings.items()]
    return markdown_table(["setting", "value"], rows)


def results_table(
    results: Mapping[str, Mapping[str, float]], metrics: Sequence[str], first_column: str
) -> str:
    """One row per entry of ``results`` (e.g. per model or method), one column per metric."""
    header = [first_column, *(METRIC_LABELS.get(metric, metric) for metric in metrics)]
    rows = [[name, *(values.get(metric, "n/a") for metric in metrics)] for name, values in results.items()]
    return markdown_table(header, rows)


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    panels: Sequence[tuple[str, str]],
    path: str,
    title: str,
) -> None:
    """Save one panel per ``(metric, y label)`` with a line per method.

    ``curves[method][metric]`` is a list of ``(step, value)`` points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), constrained_layout=True)
    for axis, (metric, label) in zip(axes, panels):
        for method, series in curves.items():
            points = series.get(metric, [])
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=4, label=method)
        axis.set_title(label, fontsize=12)
        axis.set_xlabel("optimizer step", fontsize=11)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=10)
    labelled = {label: handle for axis in axes for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(
        labelled.values(), labelled.keys(), loc="outside lower center", ncols=len(labelled), fontsize=11
    )
    figure.suptitle(title, fontsize=13)
    figure.savefig(path, dpi=120)
    plt.close(figure)
