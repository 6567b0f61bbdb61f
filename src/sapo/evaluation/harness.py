"""EleutherAI's lm-evaluation-harness on a model already in memory (the ``sapo[eval]`` extra).

The paper reports the Open LLM Leaderboard tasks and IFEval, both run by the harness. sapo does
not reimplement them: :func:`run_tasks` wraps the model and tokenizer in the harness's ``HFLM``
and calls ``lm_eval.simple_evaluate`` with the harness's own seeds, so that numbers compare with
published ones. Task names are checked (:func:`task_manager`) and each task's data loaded
(:func:`load_tasks`) before any model runs, so a typo or a dataset that cannot be reached fails
first, naming the task. Local tasks are YAML files in a folder given as ``include_path``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapo.sampling import evaluating

INSTALL_HINT = "pip install 'sapo[eval]'"


def require_harness():
    """The ``lm_eval`` module; ``ValueError`` saying how to install it when it is missing."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError as error:
        message = f"the lm-eval suite needs lm-evaluation-harness: {INSTALL_HINT} ({error})"
        raise ValueError(message) from error
    return lm_eval


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` as a list of names, blanks dropped."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [item.strip() for item in items if item.strip()]
    if not names:
        raise ValueError("tasks: name at least one lm-eval task")
    return names


def task_manager(names: Sequence[str], include_path: str | None = None):
    """A harness ``TaskManager`` that knows every name in ``names``; ``ValueError`` naming the
    first unknown one (with the closest known name).

    When every name is a local task of ``include_path``, the harness's own index (thousands of
    YAML files, tens of seconds to scan) is not built.
    """
    from difflib import get_close_matches

    require_harness()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).exists():
        raise ValueError(f"include_path: no such folder: {include_path}")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, name) for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    for name in names:
        if not _known(manager, name):
            match = get_close_matches(name, manager.all_tasks, n=1, cutoff=0.6)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            where = f" or in {include_path}" if include_path else ""
            raise ValueError(f"tasks: unknown lm-eval task {name!r} (not in the harness{where}){hint}")
    return manager


def _known(manager, name: str) -> bool:
    return bool(manager.match_tasks([name])) or Path(name).is_file()


def load_tasks(manager, names: Sequence[str]) -> list[Any]:
    """The harness's task (or group) objects for ``names``, their data loaded; a task whose data
    cannot be loaded (offline without a cache, a bad local file) fails naming the task."""
    loaded = []
    for name in names:
        try:
            found = manager.load([name])
        except Exception as error:
            message = " ".join(str(error).split()) or type(error).__name__
            if isinstance(error, ImportError):  # lm-eval's extras are named after their tasks
                message += f" (the task needs more packages, e.g. pip install 'lm_eval[{name}]')"
            raise ValueError(f"tasks: {name}: cannot load the task or its data: {message}") from error
        if name in found["groups"]:
            loaded.append(found["groups"][name])
        elif name in found["tasks"]:
            loaded.append(found["tasks"][name])
        else:  # a tag or a pattern: its tasks
            loaded.extend(found["tasks"].values())
    return loaded


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[Any],
    manager,
    limit: int | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model``: the harness's whole results dictionary.

    The model's train/eval mode and the global random states (Python, NumPy, torch) are as
    before afterwards, so evaluating in the middle of training does not change the run.
    """
    lm_eval = require_harness()
    from lm_eval.models.huggingface import HFLM

    # HFLM puts the model in eval mode; evaluating() puts it back in the mode it was in
    with _kept_random_state(next(model.parameters()).device), evaluating(model):
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=wrapped,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template,
            log_samples=False,
        )


@contextlib.contextmanager
def _kept_random_state(device: torch.device) -> Iterator[None]:
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def task_metrics(results: dict[str, Any], with_stderr: bool = True) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's results, metric names as it reports them
    (``exact_match,none``: metric, then filter); non-numeric entries (aliases, ``N/A``) left out."""
    metrics = {}
    for task, values in results["results"].items():
        metrics[task] = {
            name: float(value)
            for name, value in values.items()
            if "," in name
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (with_stderr or "_stderr," not in name)
        }
    return metrics


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of ``results``."""
    from lm_eval.utils import make_table

    return make_table(results)
